"""Analytic model of the memory traffic of the NMF layer's kernels, launch by launch.

For a :class:`~fastnmf.profile.static.cases.StaticCase` and a pass ("fwd": the training forward,
which saves the iterates; "bwd"), :func:`model_launches` gives what :mod:`.counter` measures
under the interpreter: per launch and per tensor argument, bytes loaded, bytes stored, unique
bytes and 32-byte sectors (summed over accesses: the distinct sectors of each access's active
lanes), from formulas of the case and of the launch geometry the launcher computes on a GPU
(its ``_Geometry`` / ``_Plan``, read under :func:`.counter.gpu_geometry`).

Sectors of x-like tensors (x, y, dy, dx: one (S0, S1, S2) plane per channel) follow from rows
along the last axis: when a row of the volume is a whole number of sectors (``S2 * itemsize %
32 == 0``) different rows never share a sector, so an access's sectors are the sum over its rows
of the distinct sectors of the row's positions (e.g. a window row of P2 voxels starting at
``w2 * P2 - s2`` mod S2, a tile row of h2 voxels). Other buffers are indexed by program and
element: their sectors are counted from the byte offsets of one access (tiny sets). Where a
kernel gathers per voxel (the per-voxel apply kernels, the global kernels' rolled g0) the
distinct sectors per program are counted over one head's voxels (vectorised; exact).

Covered, with the PyTorch ops between the launches, for HALS (the layer's solver; MU adds g0
loads that are not modelled): rank one, window (``_stats_fwd_kernel``, ``_stats_bwd_kernel``,
fused or not, ``_apply_{fwd,bwd}_tile_kernel``, ``_apply_{fwd,bwd}_kernel``) and global
(``_reduce_kernel``, ``_iterate_kernel``, ``_iterate_bwd_kernel``, ``_apply_{fwd,bwd}_kernel``);
rank R > 1, window (``_window_fwd_kernel``, ``_window_apply_kernel``, ``_window_bwd_kernel``)
and global, forward only as the Triton path (``_pass_kernel`` T + 1 times, ``_apply_kernel``;
the PyTorch F update between the passes, ~20 small ops on (B*heads*shifts, E, R) tensors, is
recorded by running it on tensors of those shapes, not derived by hand). Refused with the reason
(:class:`ModelUnsupported`; :mod:`.traffic` then takes the counter's figures, scaled):
rows that are not whole sectors (``S2 * itemsize % 32``), ``E * 4`` (rank one) or ``E * R * 4``
not a multiple of 32, non-default ``TUNING``.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import torch

from .cases import DTYPES, StaticCase
from .counter import SECTOR, gpu_geometry

__all__ = ["model_launches", "ModelUnsupported"]

F32 = 4  # the kernels keep factors, iterates and partials in fp32 (fp64 only for fp64 input)


class ModelUnsupported(NotImplementedError):
    """The analytic model does not cover this case (the reason is the message)."""


def _secs(byte_offsets) -> int:
    """Distinct 32-byte sectors of one access (byte offsets from a sector-aligned base)."""
    return int(np.unique(np.asarray(byte_offsets, dtype=np.int64) // SECTOR).size)


def _vec_secs(start: int, n: int, size: int) -> int:
    """Sectors of one access of n contiguous elements of ``size`` bytes at element ``start``."""
    return _secs((start + np.arange(n)) * size)


def _blocks_secs(n: int, block: int, size: int) -> int:
    """Sectors of n contiguous elements read in blocks of ``block`` elements (one access each)."""
    starts = np.arange(0, n, block, dtype=np.int64)
    ends = np.minimum(starts + block, n)
    return int(((ends * size - 1) // SECTOR - (starts * size) // SECTOR + 1).sum())


class _Launch:
    def __init__(self, kernel: str, grid=(), kind: str = "triton"):
        self.kind, self.kernel, self.grid, self.args = kind, kernel, tuple(grid), {}

    def add(self, label, *, loaded=0, stored=0, sectors=0, unique=None):
        a = self.args.setdefault(
            label, dict(bytes_loaded=0, bytes_stored=0, unique_bytes=0, sectors=0)
        )
        a["bytes_loaded"] += int(loaded)
        a["bytes_stored"] += int(stored)
        a["sectors"] += int(sectors)
        if unique is not None:
            a["unique_bytes"] = int(unique)
        return self

    def as_dict(self) -> dict:
        grid = self.grid + (1,) * (3 - len(self.grid)) if self.kind == "triton" else ()
        return dict(kind=self.kind, kernel=self.kernel, grid=grid, args=self.args)


def _torch_op(name, ins=(), outs=()) -> _Launch:
    """A PyTorch op as the counter records it: contiguous inputs read, outputs written."""
    op = _Launch(f"aten.{name}", kind="torch")
    for i, nbytes in enumerate(ins):
        op.add(f"in{i}", loaded=nbytes, sectors=math.ceil(nbytes / SECTOR), unique=nbytes)
    for i, nbytes in enumerate(outs):
        op.add(f"out{i}", stored=nbytes, sectors=math.ceil(nbytes / SECTOR), unique=nbytes)
    return op


# ----------------------------------------------------------------------------------------------
# geometry


def _spatial3(case: StaticCase):
    pad = 3 - len(case.spatial)
    S = (1,) * pad + tuple(case.spatial)
    rows = []
    for s in case.shifts if case.mode == "window" else (None,):
        t = (0,) * 3 if s is None else (0,) * pad + ((s,) * len(case.spatial) if isinstance(
            s, int) else tuple(s))  # fmt: skip
        rows.append(tuple(v % n for v, n in zip(t, S, strict=True)))
    return S, rows


def _window_geometry(case: StaticCase):
    wn = importlib.import_module("fastnmf.kernels.window_nmf")
    x = torch.empty(case.shape, dtype=DTYPES[case.dtype], device="meta")
    patch = (case.window,) * len(case.spatial)
    _, rows = _spatial3(case)
    shifts = [None if r == (0, 0, 0) else r[3 - len(case.spatial):] for r in rows]
    with gpu_geometry():
        geo = wn._Geometry(x, case.head_dim, patch, shifts)
        min_tile = wn._MIN_TILE
    if geo.gram_dot or wn.TUNING["chunk"] or wn.TUNING["block_v"]:
        raise ModelUnsupported("the model covers the default TUNING of window_nmf only")
    geo.rows = rows
    geo.min_tile = min_tile
    return geo


_ROW_CHECK = {"on": True}  # model_launches(sectors=False) turns the row check off


def _check_rows(S, isz: int):
    if _ROW_CHECK["on"] and S[2] * isz % SECTOR:
        raise ModelUnsupported(
            f"the model needs rows of whole sectors: last spatial size {S[2]} x {isz} bytes is "
            f"not a multiple of {SECTOR}"
        )


# ----------------------------------------------------------------------------------------------
# window kernels, rank one


def _window_rows_sectors(geo, isz: int) -> int:
    """Sectors of one pass over every window of every shift, for one channel of one head."""
    S, P, NW = geo.S, geo.P, geo.NW
    total = 0
    for r in geo.rows:
        for w2 in range(NW[2]):
            v2 = (w2 * P[2] + np.arange(P[2]) - r[2]) % S[2]
            total += _secs(v2 * isz)
    return total * NW[0] * NW[1] * P[0] * P[1]


def _per_prog_vectors(n_progs: int, per_prog: int, count: int, offset: int = 0) -> int:
    """Sectors of ``count`` contiguous fp32 elements at prog * per_prog + offset, all programs."""
    starts = (np.arange(n_progs, dtype=np.int64) * per_prog + offset) * F32
    first = starts // SECTOR
    last = (starts + count * F32 - 1) // SECTOR
    return int((last - first + 1).sum())


def _stats_launch(name: str, geo, isz: int):
    """A stats kernel's launch (a program per window, shift and head; HALS reads no row mask:
    kernels/_common.row_mask), its programs, passes over x (two when the output pass is fused)
    and the sectors of one pass over every window."""
    progs = geo.nwin * geo.nshift * geo.batch * geo.heads
    bh = geo.batch * geo.heads
    L = _Launch(name, (geo.nwin * geo.nshift, bh))
    xsec = _window_rows_sectors(geo, isz) * bh * geo.E
    return L, progs, 2 if geo.fused else 1, xsec


def _stats_fwd(geo, case, isz) -> _Launch:
    E, T, PN, CH = geo.E, case.iters, geo.pn, geo.chunk
    if CH % geo.P[2]:
        raise ModelUnsupported(f"chunk {CH} is not a multiple of the window row {geo.P[2]}")
    L, progs, passes, xsec = _stats_launch("_stats_fwd_kernel", geo, isz)
    L.add("x_ptr", loaded=passes * progs * E * PN * isz, sectors=passes * xsec,
          unique=case.numel * isz)  # fmt: skip
    L.add("g0_ptr", loaded=progs * PN * F32, sectors=progs * _blocks_secs(PN, CH, F32),
          unique=PN * F32)  # fmt: skip
    L.add("hats_ptr", stored=progs * T * E * F32, sectors=_per_prog_vectors(progs * T, E, E),
          unique=progs * T * E * F32)  # fmt: skip
    L.add("norms_ptr", stored=progs * T * F32, sectors=progs * T, unique=progs * T * F32)
    L.add("u_ptr", stored=progs * E * F32, sectors=_per_prog_vectors(progs, E, E),
          unique=progs * E * F32)  # fmt: skip
    if geo.fused:
        L.add("y_ptr", stored=progs * E * PN * isz, sectors=xsec, unique=case.numel * isz)
    return L


def _stats_bwd(geo, case, isz) -> _Launch:
    E, T, PN, CH = geo.E, case.iters, geo.pn, geo.chunk
    L, progs, passes, xsec = _stats_launch("_stats_bwd_kernel", geo, isz)
    for name in ("x_ptr", "dy_ptr"):
        L.add(name, loaded=passes * progs * E * PN * isz, sectors=passes * xsec,
              unique=case.numel * isz)  # fmt: skip
    hat_loads = 1 + 2 * T + (1 if geo.fused else 0)  # u, (a_hat, prev) per step, u again
    hat_secs = _per_prog_vectors(progs * T, E, E) // T  # one E-vector per program
    L.add("hats_ptr", loaded=hat_loads * progs * E * F32, sectors=hat_loads * hat_secs,
          unique=progs * T * E * F32)  # fmt: skip
    L.add("norms_ptr", loaded=progs * T * F32, sectors=progs * T, unique=progs * T * F32)
    L.add("sym_ptr", stored=progs * E * E * F32, sectors=_per_prog_vectors(progs, E * E, E * E),
          unique=progs * E * E * F32)  # fmt: skip
    L.add("hbar_ptr", stored=progs * E * F32, sectors=_per_prog_vectors(progs, E, E),
          unique=progs * E * F32)  # fmt: skip
    if geo.fused:
        L.add("g0_ptr", loaded=progs * PN * F32, sectors=progs * _blocks_secs(PN, CH, F32),
              unique=PN * F32)  # fmt: skip
        L.add("dx_ptr", stored=progs * E * PN * isz, sectors=xsec, unique=case.numel * isz)
    return L


def _tile_rows_sectors(geo, isz: int) -> int:
    """Sectors of one pass of the tiled kernels over one channel of one head."""
    S, h = geo.S, geo.h
    nt = [S[d] // h[d] for d in range(3)]
    row = sum(_secs((t2 * h[2] + np.arange(h[2])) * isz) for t2 in range(nt[2]))
    return row * nt[0] * nt[1] * h[0] * h[1]


def _tile_g0_sectors(geo) -> int:
    """Sectors of the g0 loads (positions of the tile in its window) over all tiles and shifts
    of one head: tiles whose origin has the same residues mod P load the same positions."""
    S, P, h = geo.S, geo.P, geo.h
    q = np.stack(np.meshgrid(*[np.arange(n) for n in h], indexing="ij"), -1).reshape(-1, 3)
    total = 0
    for r in geo.rows:
        counts = []
        for d in range(3):
            res = ((np.arange(S[d] // h[d]) * h[d] + r[d]) % S[d]) % P[d]
            vals, n = np.unique(res, return_counts=True)
            counts.append(dict(zip(vals.tolist(), n.tolist(), strict=True)))
        for c0, n0 in counts[0].items():
            for c1, n1 in counts[1].items():
                for c2, n2 in counts[2].items():
                    p = ((c0 + q[:, 0]) * P[1] + c1 + q[:, 1]) * P[2] + c2 + q[:, 2]
                    total += n0 * n1 * n2 * _secs(p * F32)
    return total


def _apply_tile(geo, case, isz, backward: bool) -> _Launch:
    E, NS = geo.E, geo.nshift
    bh = geo.batch * geo.heads
    progs = geo.ntiles * bh
    valid = math.prod(geo.h)
    name = "_apply_bwd_tile_kernel" if backward else "_apply_fwd_tile_kernel"
    L = _Launch(name, (geo.ntiles, bh))
    xsec = _tile_rows_sectors(geo, isz) * bh * E
    wins = geo.nwin * NS * bh  # every window of every shift is some tile's window
    ins = ("x_ptr", "dy_ptr") if backward else ("x_ptr",)
    for n in ins:
        L.add(n, loaded=progs * E * valid * isz, sectors=xsec, unique=case.numel * isz)
    L.add("dx_ptr" if backward else "y_ptr", stored=progs * E * valid * isz, sectors=xsec,
          unique=case.numel * isz)  # fmt: skip
    vec = _vec_secs(0, E, F32)  # u / hbar rows are E-aligned (E * 4 a multiple of 32 checked)
    if backward:
        L.add("hats_ptr", loaded=progs * NS * E * F32, sectors=progs * NS * vec,
              unique=wins * E * F32)  # fmt: skip
        L.add("hbar_ptr", loaded=progs * NS * E * F32, sectors=progs * NS * vec,
              unique=wins * E * F32)  # fmt: skip
        L.add("sym_ptr", loaded=progs * NS * E * E * F32,
              sectors=progs * NS * _vec_secs(0, E * E, F32), unique=wins * E * E * F32)
        L.add("g0_ptr", loaded=progs * NS * valid * F32, sectors=_tile_g0_sectors(geo) * bh,
              unique=geo.pn * F32 if valid else 0)  # fmt: skip
    else:
        L.add("u_ptr", loaded=progs * NS * E * F32, sectors=progs * NS * vec,
              unique=wins * E * F32)  # fmt: skip
    return L


def _voxel_windows(geo, r):
    """Window and position in it of every voxel of one head under shift row r (numpy)."""
    S, P, NW = geo.S, geo.P, geo.NW
    v = np.arange(geo.nvox, dtype=np.int64)
    r2 = (v % S[2] + r[2]) % S[2]
    r1 = ((v // S[2]) % S[1] + r[1]) % S[1]
    r0 = (v // (S[1] * S[2]) + r[0]) % S[0]
    w = ((r0 // P[0]) * NW[1] + r1 // P[1]) * NW[2] + r2 // P[2]
    p = ((r0 % P[0]) * P[1] + r1 % P[1]) * P[2] + r2 % P[2]
    return w, p


def _distinct_per_block(block, keys) -> int:
    """Sum over blocks of the number of distinct keys in the block."""
    return int(np.unique(block * (int(keys.max()) + 1) + keys).size)


def _apply_voxel(geo, case, isz, backward: bool) -> _Launch:
    E, NS, BV, nvox = geo.E, geo.nshift, geo.block_v, geo.nvox
    bh = geo.batch * geo.heads
    nblk = math.ceil(nvox / BV)
    name = "_apply_bwd_kernel" if backward else "_apply_fwd_kernel"
    L = _Launch(name, (nblk, bh))
    xsec = _blocks_secs(nvox, BV, isz) * E * bh
    for n in ("x_ptr", "dy_ptr") if backward else ("x_ptr",):
        L.add(n, loaded=bh * E * nvox * isz, sectors=xsec, unique=case.numel * isz)
    L.add("dx_ptr" if backward else "y_ptr", stored=bh * E * nvox * isz, sectors=xsec,
          unique=case.numel * isz)  # fmt: skip
    block = np.arange(nvox, dtype=np.int64) // BV
    vec, mat = _vec_secs(0, E, F32), _vec_secs(0, E * E, F32)
    wins = geo.nwin * NS * bh
    for r in geo.rows:
        w, p = _voxel_windows(geo, r)
        nwin = _distinct_per_block(block, w) * bh  # distinct windows per program, all programs
        if backward:
            L.add("hats_ptr", loaded=bh * E * nvox * F32, sectors=nwin * vec,
                  unique=wins * E * F32)  # fmt: skip
            L.add("hbar_ptr", loaded=bh * E * nvox * F32, sectors=nwin * vec,
                  unique=wins * E * F32)  # fmt: skip
            L.add("sym_ptr", loaded=bh * E * E * nvox * F32, sectors=nwin * mat,
                  unique=wins * E * E * F32)  # fmt: skip
            L.add("g0_ptr", loaded=bh * nvox * F32,
                  sectors=_distinct_per_block(block, p * F32 // SECTOR) * bh,
                  unique=geo.pn * F32)  # fmt: skip
        else:
            L.add("u_ptr", loaded=bh * E * nvox * F32, sectors=nwin * vec, unique=wins * E * F32)
    return L


def _window_launches(case: StaticCase, pass_: str) -> list[_Launch]:
    geo = _window_geometry(case)
    isz = case.itemsize
    _check_rows(geo.S, isz)
    if geo.E * F32 % SECTOR:
        raise ModelUnsupported(f"the model needs E * 4 a multiple of {SECTOR}, E = {geo.E}")
    if pass_ == "fwd":
        out = [_stats_fwd(geo, case, isz)]
        if not geo.fused:
            out.append((_apply_tile if geo.tiled else _apply_voxel)(geo, case, isz, False))
        return out
    out = [_stats_bwd(geo, case, isz)]
    if not geo.fused:
        out.append((_apply_tile if geo.tiled else _apply_voxel)(geo, case, isz, True))
    return out


# ----------------------------------------------------------------------------------------------
# global kernels, rank one


def _global_plan(case: StaticCase):
    gn = importlib.import_module("fastnmf.kernels.global_nmf")
    x = torch.empty(case.shape, dtype=DTYPES[case.dtype], device="meta")
    with gpu_geometry():
        return gn._Plan(x, case.head_dim, case.spatial, None, False)


def _rolled_g0_sectors(plan, S, rows, scale: int = 1, block_v: int | None = None) -> int:
    """Distinct sectors of g0[(v + s) mod S] per block of ``block_v`` (default BLOCK_V) voxels,
    summed over blocks and shifts (one matrix); ``scale`` > 1: the ``scale`` fp32 entries of each
    voxel's row (v0 of rank R: the R entries of row (v + s) mod S)."""
    v = np.arange(plan.nvox, dtype=np.int64)
    block = v // (block_v or plan.block_v)
    total = 0
    for r in rows:
        r2 = (v % S[2] + r[2]) % S[2]
        r1 = ((v // S[2]) % S[1] + r[1]) % S[1]
        r0 = (v // (S[1] * S[2]) + r[0]) % S[0]
        idx = (r0 * S[1] + r1) * S[2] + r2
        keys = np.concatenate([(idx * scale + c) * F32 // SECTOR for c in range(scale)])
        total += _distinct_per_block(np.tile(block, scale), keys)  # one access: all R entries
    return total


def _global_launches(case: StaticCase, pass_: str) -> list[_Launch]:
    plan = _global_plan(case)
    S, rows = _spatial3(case)
    E, NS, NK, T, M = plan.E, plan.nshift, plan.nk, case.iters, plan.matrices
    BV, NC, nvox, isz = plan.block_v, plan.nchunk, plan.nvox, case.itemsize
    if E * F32 % SECTOR:
        raise ModelUnsupported(f"the model needs E * 4 a multiple of {SECTOR}, E = {E}")
    progs = NC * M
    xsec = _blocks_secs(nvox, BV, isz) * E * M
    backward = pass_ == "bwd"
    # the reduction reads its chunks SUB * PAIR columns at a time
    step = plan.sub * plan.pair
    rsec, rg0sec = _blocks_secs(nvox, step, isz) * E * M, _rolled_g0_sectors(
        plan, S, rows, block_v=step) * M  # fmt: skip
    vec, mat = _vec_secs(0, E, F32), _vec_secs(0, E * E, F32)
    xbytes = case.numel * isz
    NG = plan.ngroup  # the reduction's programs a matrix (groups of chunks), one partial each
    red = _Launch("_reduce_kernel", (NG, M))
    red.add("x_ptr" if backward else "dy_ptr/x_ptr", loaded=xbytes, sectors=rsec, unique=xbytes)
    if backward:
        red.add("dy_ptr", loaded=xbytes, sectors=rsec, unique=xbytes)
    red.add("g0_ptr", loaded=NS * M * nvox * F32, sectors=rg0sec, unique=nvox * F32)
    kp = NG * M * NK * E * E * F32
    red.add("hp_ptr/kp_ptr" if backward else "kp_ptr", stored=kp, sectors=NG * M * NK * mat,
            unique=kp)  # fmt: skip
    if not backward:
        hp = NG * M * NS * E * F32
        red.add("hp_ptr", stored=hp, sectors=NG * M * NS * vec, unique=hp)
    ms = M * NS
    kk = M * NK * E * E * F32
    # the iterate kernels: each (shift, matrix) sums its K's (dP's) partials, all groups
    parts = dict(loaded=ms * NG * E * E * F32, sectors=ms * NG * mat, unique=kp)
    if not backward:
        it = _Launch("_iterate_kernel", (NS, M))
        it.add("kp_ptr", **parts)
        it.add("hp_ptr", loaded=ms * NG * E * F32, sectors=ms * NG * vec, unique=hp)
        it.add("k_ptr", stored=kk, sectors=M * NK * mat, unique=kk)
        it.add("hats_ptr", stored=ms * T * E * F32, sectors=ms * T * vec, unique=ms * T * E * F32)
        it.add("norms_ptr", stored=ms * T * F32, sectors=ms * T, unique=ms * T * F32)
        it.add("u_ptr", stored=ms * E * F32, sectors=ms * vec, unique=ms * E * F32)
        ap = _Launch("_apply_fwd_kernel", (NC, M))
        ap.add("x_ptr", loaded=xbytes, sectors=xsec, unique=xbytes)
        ap.add("u_ptr", loaded=progs * NS * E * F32, sectors=progs * NS * vec, unique=ms * E * F32)
        ap.add("y_ptr", stored=xbytes, sectors=xsec, unique=xbytes)
        return [red, it, ap]
    it = _Launch("_iterate_bwd_kernel", (NS, M))
    it.add("k_ptr", loaded=ms * E * E * F32, sectors=ms * mat, unique=kk)
    it.add("dpp_ptr", **parts)
    it.add("hats_ptr", loaded=ms * (1 + 2 * T) * E * F32, sectors=ms * (1 + 2 * T) * vec,
           unique=ms * T * E * F32)  # fmt: skip
    it.add("norms_ptr", loaded=ms * T * F32, sectors=ms * T, unique=ms * T * F32)
    it.add("sym_ptr", stored=ms * E * E * F32, sectors=ms * mat, unique=ms * E * E * F32)
    it.add("hbar_ptr", stored=ms * E * F32, sectors=ms * vec, unique=ms * E * F32)
    ap = _global_apply_bwd(plan, case, S, rows, xbytes)
    return [red, it, ap]


def _global_apply_bwd(plan, case: StaticCase, S, rows, xbytes: int) -> _Launch:
    """The global backward's output pass (kernels/_global_apply.py): with the rows in a thread
    (``_apply_bwd_kernel``) a program of ``apply_v`` columns loads x and dY, each shift's u, then
    row by row u and h̄ of every shift (a gather across the shifts) and S's row of each shift, and
    stores dX row by row; else (``_apply_bwd_many_rows_kernel``) u, h̄ and S whole a shift."""
    E, NS, M, isz = plan.E, plan.nshift, plan.matrices, case.itemsize
    progs, ms = plan.apply_nchunk * M, M * NS
    vec, mat = _vec_secs(0, E, F32), _vec_secs(0, E * E, F32)
    xsec = _blocks_secs(plan.nvox, plan.apply_v, isz) * E * M
    if plan.rows_in_thread:
        ap = _Launch("_apply_bwd_kernel", (plan.apply_nchunk, M))
        # a row's gather of one entry of every shift's E-vector: distinct sectors over the rows
        gather = sum(len({((m * NS + s) * E + c) * F32 // SECTOR for s in range(NS)})
                     for m in range(M) for c in range(E)) * plan.apply_nchunk  # fmt: skip
        uvec = dict(loaded=2 * progs * NS * E * F32, sectors=progs * NS * vec + gather)
        hvec = dict(loaded=progs * NS * E * F32, sectors=gather)
        srows = dict(loaded=progs * NS * E * E * F32, sectors=progs * NS * E * vec)
    else:
        ap = _Launch("_apply_bwd_many_rows_kernel", (plan.apply_nchunk, M))
        uvec = hvec = dict(loaded=progs * NS * E * F32, sectors=progs * NS * vec)
        srows = dict(loaded=progs * NS * E * E * F32, sectors=progs * NS * mat)
    ap.add("x_ptr", loaded=xbytes, sectors=xsec, unique=xbytes)
    ap.add("dy_ptr", loaded=xbytes, sectors=xsec, unique=xbytes)
    ap.add("u_ptr", **uvec, unique=ms * E * F32)
    ap.add("hbar_ptr", **hvec, unique=ms * E * F32)
    ap.add("sym_ptr", **srows, unique=ms * E * E * F32)
    g0sec = _rolled_g0_sectors(plan, S, rows, block_v=plan.apply_v) * M
    ap.add("g0_ptr", loaded=NS * M * plan.nvox * F32, sectors=g0sec, unique=plan.nvox * F32)
    ap.add("dx_ptr", stored=xbytes, sectors=xsec, unique=xbytes)
    return ap


def model_launches(case: StaticCase, pass_: str, *, sectors: bool = True) -> list[dict]:
    """The launches of one call of ``case`` (``pass_`` "fwd" or "bwd"), in launch order: dicts
    with kind, kernel, grid, args ({label: bytes_loaded, bytes_stored, unique_bytes, sectors}).

    ``sectors=False``: bytes only (sectors set to None), also for shapes whose rows are not whole
    sectors (e.g. the deep levels of a U-Net, S2 * itemsize < 32).
    """
    if pass_ not in ("fwd", "bwd"):
        raise ValueError(f"pass_ must be 'fwd' or 'bwd', got {pass_!r}")
    if case.design != 1:
        raise ModelUnsupported(
            f"the second window design (kernels/window_nmf2.py) of {case.id} is not modelled; "
            "its bytes are the counter's"
        )
    if not sectors:
        _ROW_CHECK["on"] = False
        try:
            out = model_launches(case, pass_)
        finally:
            _ROW_CHECK["on"] = True
        for launch in out:
            for a in launch["args"].values():
                a["sectors"] = None
        return out
    if case.rank != 1 and case.mode == "window":
        if case.rank * case.head_dim * F32 % SECTOR:
            raise ModelUnsupported(f"rank {case.rank}: the model needs E * R * 4 a multiple of 32")
        from .traffic_model_rank import window_rank_launches

        launches = window_rank_launches(case, pass_)
    elif case.rank != 1 and case.mode == "global":
        if pass_ == "bwd":
            raise ModelUnsupported("global rank > 1 has no Triton backward")
        from .traffic_model_rank import global_rank_launches

        launches = global_rank_launches(case)
    elif case.mode == "window":
        launches = _window_launches(case, pass_)
    elif case.mode == "global":
        launches = _global_launches(case, pass_)
    else:
        raise ValueError(f"unknown mode {case.mode!r}; valid: window, global")
    return [launch.as_dict() for launch in launches]
