"""Analytic traffic model of the rank R > 1 kernels (``window_nmf_rank``, ``global_nmf_rank``).

The same conventions as :mod:`.traffic_model` (which dispatches here): per launch and tensor
argument, bytes loaded / stored, unique bytes, 32-byte sectors per access.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import torch
import triton

from .cases import StaticCase
from .counter import SECTOR
from .traffic_model import (
    F32,
    _blocks_secs,
    _check_rows,
    _distinct_per_block,
    _Launch,
    _per_prog_vectors,
    _rolled_g0_sectors,
    _secs,
    _spatial3,
    _torch_op,
    _vec_secs,
    _voxel_windows,
    _window_geometry,
    _window_rows_sectors,
)

__all__ = ["window_rank_launches", "global_rank_launches"]


# ----------------------------------------------------------------------------------------------
# window kernels, rank R > 1 (window_nmf_rank)


def window_rank_launches(case: StaticCase, pass_: str) -> list[_Launch]:
    geo = _window_geometry(case)
    isz, R, E, T, PN, NS = case.itemsize, case.rank, geo.E, case.iters, geo.pn, geo.nshift
    _check_rows(geo.S, isz)
    bh = geo.batch * geo.heads
    progs = geo.nwin * NS * bh
    grid = (geo.nwin, NS, bh)
    rows1 = _window_rows_sectors(geo, isz) * bh * E  # one read of every window of every shift
    fsz, gsz = E * R * F32, PN * R * F32  # one window's F and G
    xbytes = case.numel * isz

    def window_part(L):
        L.add("x_ptr", loaded=progs * E * PN * isz, sectors=rows1, unique=xbytes)
        L.add("u0_ptr", loaded=progs * fsz, sectors=progs * _vec_secs(0, E * R, F32), unique=fsz)
        L.add("v0_ptr", loaded=progs * gsz, sectors=progs * _vec_secs(0, PN * R, F32),
              unique=gsz)  # fmt: skip

    if pass_ == "fwd":
        fwd = _Launch("_window_fwd_kernel", grid)
        window_part(fwd)
        fwd.add("f_ptr", stored=progs * fsz, sectors=_per_prog_vectors(progs, E * R, E * R),
                unique=progs * fsz)  # fmt: skip
        fwd.add("g_ptr", stored=progs * gsz, sectors=_per_prog_vectors(progs, PN * R, PN * R),
                unique=progs * gsz)  # fmt: skip
        return [_torch_op("ones", outs=[fsz]), fwd, _window_rank_apply(geo, case)]
    bwd = _Launch("_window_bwd_kernel", grid)
    window_part(bwd)
    bwd.add("dy_ptr", loaded=progs * E * PN * isz, sectors=rows1, unique=xbytes)
    nf, ng = progs * T, progs * T
    for name, size, n in (("fs_ptr", E * R, nf), ("gs_ptr", PN * R, ng)):
        secs = _per_prog_vectors(n, size, size)
        bwd.add(name, loaded=n * size * F32, stored=n * size * F32, sectors=2 * secs,
                unique=n * size * F32)  # fmt: skip
    numel = case.numel
    bwd.add("dx_ptr", stored=progs * E * PN * F32,
            sectors=_window_rows_sectors(geo, F32) * bh * E, unique=NS * numel * F32)
    out = [bwd]
    if NS > 1:
        out.append(_torch_op("sum", ins=[NS * numel * F32], outs=[numel * F32]))
    out.append(_torch_op("gt", ins=[xbytes], outs=[numel]))  # torch.where(x > 0, dx, 0)
    out.append(_torch_op("where", ins=[numel, numel * F32], outs=[numel * F32]))
    if isz != F32:
        out.append(_torch_op("_to_copy", ins=[numel * F32], outs=[xbytes]))  # .to(x.dtype)
    return out


def _window_rank_apply(geo, case) -> _Launch:
    R, E, PN, NS, BV, nvox = case.rank, geo.E, geo.pn, geo.nshift, geo.block_v, geo.nvox
    bh = geo.batch * geo.heads
    nblk = math.ceil(nvox / BV)
    L = _Launch("_window_apply_kernel", (nblk, bh))
    block = np.arange(nvox, dtype=np.int64) // BV
    wins = geo.nwin * NS * bh
    for s, r in enumerate(geo.rows):
        w, p = _voxel_windows(geo, r)
        nwin = _distinct_per_block(block, w) * bh
        prog = s * geo.nwin + w  # one head; heads add whole multiples of the window buffers
        for c in range(R):
            fsec = _secs((np.arange(E) * R + c) * F32)  # F rows start sector-aligned (checked)
            L.add("f_ptr", loaded=bh * E * nvox * F32, sectors=nwin * fsec)
            gsec = _distinct_per_block(block, ((prog * PN + p) * R + c) * F32 // SECTOR)
            L.add("g_ptr", loaded=bh * nvox * F32, sectors=gsec * bh)
    L.add("f_ptr", unique=wins * E * R * F32)
    L.add("g_ptr", unique=wins * PN * R * F32)
    L.add("y_ptr", stored=bh * E * nvox * case.itemsize,
          sectors=_blocks_secs(nvox, BV, case.itemsize) * E * bh, unique=case.numel * case.itemsize)
    return L


# ----------------------------------------------------------------------------------------------
# global kernels, rank R > 1 (global_nmf_rank: forward only)


def _strided_secs(n: int, block: int, stride: int, offset: int) -> int:
    """Sectors of fp32 elements (v * stride + offset) for v < n, read in blocks of ``block``."""
    v = np.arange(n, dtype=np.int64)
    return _distinct_per_block(v // block, (v * stride + offset) * F32 // SECTOR)


def _f_update_ops(ms: int, E: int, R: int) -> list[_Launch]:
    """The PyTorch F update of one iteration (HALS sweep, F^T F), recorded on tensors of the
    launcher's shapes: a fixed sequence of small ops whose sizes depend on ms, E, R only."""
    from .counter import torch_ops

    loop = importlib.import_module("fastnmf.loop")  # the launcher's F update (HALS sweep)
    a, b = torch.zeros(ms, E, R), torch.zeros(ms, R, R)  # (Bm*nshift, M, R), (.., R, R)
    f, d = torch.ones(ms, E, R), torch.empty(ms, R, R)
    with torch_ops() as ops:
        f = loop.hals_sweep(f, a, b).contiguous()
        torch.matmul(f.transpose(-1, -2), f, out=d)
    out = []
    for op in ops:
        launch = _Launch(op.kernel, kind="torch")
        launch.args = op.args
        out.append(launch)
    return out


def global_rank_launches(case: StaticCase) -> list[_Launch]:
    S, rows = _spatial3(case)
    E, R, T, isz = case.head_dim, case.rank, case.iters, case.itemsize
    nvox = math.prod(S)
    M = case.numel // (E * nvox)
    NS = len(rows)
    ms = M * NS
    block_e, block_r = max(triton.next_power_of_2(E), 2), max(triton.next_power_of_2(R), 2)
    BV = max(16, min(256, 4096 // (block_e * block_r)))  # global_nmf_rank's GPU block
    NC = math.ceil(nvox / BV)
    progs = NC * ms
    xsec = _blocks_secs(nvox, BV, isz) * E * ms  # every shift re-reads its matrix
    gsz = ms * nvox * R * F32
    gsec = _blocks_secs(nvox * R, BV * R, F32) * ms
    out = [_torch_op("ones", outs=[ms * E * R * F32])]
    for t in range(T + 1):
        L = _Launch("_pass_kernel", (NC, ms))
        L.add("x_ptr", loaded=NS * case.numel * isz, sectors=xsec, unique=case.numel * isz)
        if t == 0:
            v0sec = sum(_rolled_g0_sectors(_PlanLike(nvox, BV), S, [r], scale=R) for r in rows)
            L.add("v0_ptr", loaded=ms * nvox * R * F32, sectors=v0sec * M,
                  unique=nvox * R * F32)  # fmt: skip
            L.add("g_ptr", stored=gsz, sectors=gsec, unique=gsz)
        else:
            L.add("g_ptr", loaded=gsz, stored=gsz, sectors=2 * gsec, unique=gsz)
            L.add("f_ptr", loaded=progs * E * R * F32,
                  sectors=NC * _per_prog_vectors(ms, E * R, E * R), unique=ms * E * R * F32)
            L.add("d_ptr", loaded=progs * R * R * F32,
                  sectors=NC * _per_prog_vectors(ms, R * R, R * R), unique=ms * R * R * F32)
        if t < T:
            n = progs
            L.add("ap_ptr", stored=n * E * R * F32, sectors=_per_prog_vectors(n, E * R, E * R),
                  unique=n * E * R * F32)  # fmt: skip
            L.add("bp_ptr", stored=n * R * R * F32, sectors=_per_prog_vectors(n, R * R, R * R),
                  unique=n * R * R * F32)  # fmt: skip
        out.append(L)
        if t < T:
            out.append(_torch_op("sum", ins=[progs * E * R * F32], outs=[ms * E * R * F32]))
            out.append(_torch_op("sum", ins=[progs * R * R * F32], outs=[ms * R * R * F32]))
            out.extend(_f_update_ops(ms, E, R))
    ap = _Launch("_apply_kernel", (NC, M))
    fsec = sum(_secs(((s * E + np.arange(E)) * R + r) * F32) for s in range(ms) for r in range(R))
    ap.add("f_ptr", loaded=NC * ms * R * E * F32, sectors=NC * fsec, unique=ms * E * R * F32)
    gs = sum(_strided_secs(nvox, BV, R, r) for r in range(R)) * ms
    ap.add("g_ptr", loaded=ms * R * nvox * F32, sectors=gs, unique=gsz)
    ap.add("y_ptr", stored=case.numel * isz, sectors=_blocks_secs(nvox, BV, isz) * E * M,
           unique=case.numel * isz)  # fmt: skip
    out.append(ap)
    return out


class _PlanLike:
    def __init__(self, nvox, block_v):
        self.nvox, self.block_v = nvox, block_v
