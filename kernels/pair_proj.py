"""The decoder blocks' skip adapter, one pass forward and one backward.

A decoder Factorizer block first mixes the skip connection and the upsampled tensor with a 1x1
conv (no bias) of their concatenation, then drops out (models/layers.py: ``SkipAdapter.pair``,
``FactorizerBlock._context_skip``). Without the concatenation that is two convs of its halves:

    a = drop(Ws s + Wx x)    per voxel; s: (B, Cs, *S), x: (B, Cx, *S), Ws: (C, Cs), Wx: (C, Cx)

on channels-first tensors; tiles, persistent programs, dropout masks (mask ``k = 0``, indexed by
the output channel) and precision follow :mod:`fastnmf.kernels._glue`. Forward: s and x read
once, a written once. Backward, per tile, with ``m`` the mask's scale factor regenerated from
the seed:

- ``do = m da``; ``dWs += do s^T``, ``dWx += do x^T``;
- ``ds = Ws^T do``, ``dx = Wx^T do``.

da, s and x read once, ds and dx written once; the weight gradients are summed per program in
registers (one row per program, reduced afterwards in a fixed order).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, acc_dtype, compute_dtype, launch
from ._glue import (
    N_MASKS,
    check_offsets,
    dot_dtype,
    dropout_scale,
    load_weight,
    matmul_dtype,
    n_tiles,
    persistent_programs,
    tile_coords,
    to_dot,
)
from .proj_glue import _check_grad, _check_input, _pad

__all__ = ["pair_proj_forward", "pair_proj_backward", "supported", "pair_proj_workspace_bytes"]

# COUT_PAD * (CS_PAD + CX_PAD): both weights' gradients held in a program's registers (C = 64
# with Cs = Cx = 64 takes half of it; C = 128 with Cs = Cx = 64 all of it)
MAX_PARAM_ELEMENTS = 16384
# C_PAD * BLOCK_V of the widest activation tile on a GPU, and the warps, per pass. Compiled for
# sm_90a (Triton 3.9): no spills at C = Cs = Cx = 16, 32, 64 and at the limit's edges (C = 128,
# Cs = Cx = 64; C = 64, Cs = 128, Cx = 16) in bf16, fp32 and fp32 under bf16 autocast, 94-220
# registers; fp64 (the checking dtype) up to C = Cs = Cx = 32 (python -m
# fastnmf.profile.static.glue_report gates C = 32, 64)
TUNING = {"fwd_elems": 2048, "fwd_warps": 4, "bwd_elems": 1024, "bwd_warps": 8}


def supported(cs: int, cx: int, cout: int) -> bool:
    """Whether the kernels take this adapter (skip channels ``cs``, upsampled channels ``cx``,
    ``cout`` out): both weight gradients fit in a program's registers."""
    return _pad(cout) * (_pad(cs) + _pad(cx)) <= MAX_PARAM_ELEMENTS


def _config(c_pad: int, voxels: int, *, backward: bool) -> tuple[int, int]:
    """(BLOCK_V, warps) of a pass for the widest padded channel count ``c_pad`` (:data:`TUNING`);
    under the interpreter the biggest tile (it pays per operation)."""
    if INTERPRET:
        return max(16, min(256, triton.next_power_of_2(voxels))), 4
    pass_ = "bwd" if backward else "fwd"
    block_v = max(16, min(128, TUNING[f"{pass_}_elems"] // c_pad))
    return block_v, TUNING[f"{pass_}_warps"]


def _check_weight(name: str, w: torch.Tensor, cin: int) -> int:
    """Cout of a (Cout, cin) weight; a clear error for any other shape."""
    if w.dim() != 2 or w.shape[1] != cin:
        raise ValueError(f"pair_proj: for {cin} {name} channels expects a 2-D weight (C, {cin}) "
                         f"(a conv weight: .flatten(1)), got {tuple(w.shape)}")  # fmt: skip
    return w.shape[0]


def _check(s, x, ws, wx, p: float) -> tuple[int, int, int, int]:
    """(Cs, Cx, C, S) of a pair_proj call."""
    _check_input("pair_proj: skip", s)
    _check_input("pair_proj: x", x)
    if x.shape[0] != s.shape[0] or x.shape[2:] != s.shape[2:]:
        raise ValueError(f"pair_proj: skip {tuple(s.shape)} and x {tuple(x.shape)} must share "
                         "batch and spatial sizes")  # fmt: skip
    if x.dtype != s.dtype:
        raise TypeError(f"pair_proj: skip has dtype {s.dtype}, x {x.dtype}; expects one dtype")
    cs, cx = s.shape[1], x.shape[1]
    cout = _check_weight("skip", ws, cs)
    if _check_weight("x", wx, cx) != cout:
        raise ValueError(f"pair_proj: the weights' output channels differ: skip's "
                         f"{tuple(ws.shape)}, x's {tuple(wx.shape)}")  # fmt: skip
    if not supported(cs, cx, cout):
        raise ValueError(f"pair_proj: Cs={cs}, Cx={cx}, C={cout} is beyond the fused kernel "
                         f"(COUT_PAD * (CS_PAD + CX_PAD) > {MAX_PARAM_ELEMENTS})")  # fmt: skip
    if not 0.0 <= p < 1.0:
        raise ValueError(f"pair_proj: dropout rate p must be in [0, 1), got {p}")
    voxels = math.prod(s.shape[2:])
    check_offsets(max(cs, cx, cout), voxels)
    return cs, cx, cout, voxels


def _launch_args(s, cs: int, cx: int, cout: int, voxels: int, *, backward: bool,
                 dot: torch.dtype | None):  # fmt: skip
    """(programs, (tiles per item, tiles), constexprs) of a launch over s's batch and voxels."""
    pads = _pad(cs), _pad(cx), _pad(cout)
    block_v, warps = _config(max(pads), voxels, backward=backward)
    per, tiles = n_tiles(s.shape[0], voxels, block_v)
    programs = persistent_programs(tiles, s.device)
    meta = dict(CS_PAD=pads[0], CX_PAD=pads[1], CO_PAD=pads[2], BLOCK_V=block_v,
                ACC=acc_dtype(s.dtype), DOT=dot_dtype(dot or matmul_dtype(s)),
                num_warps=warps)  # fmt: skip
    return programs, (per, tiles), meta


@triton.jit
def _fwd_kernel(s_ptr, x_ptr, wsk_ptr, wx_ptr, a_ptr,
                CS, CX, CO, S, tiles_per_item, tiles, p, seed,
                CS_PAD: tl.constexpr, CX_PAD: tl.constexpr, CO_PAD: tl.constexpr,
                BLOCK_V: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                DROP: tl.constexpr):  # fmt: skip
    wsk = load_weight(wsk_ptr, CO, CS, CO_PAD, CS_PAD, ACC, DOT)  # (CO_PAD, CS_PAD)
    wx = load_weight(wx_ptr, CO, CX, CO_PAD, CX_PAD, ACC, DOT)  # (CO_PAD, CX_PAD)
    for t in range(tl.program_id(0), tiles, tl.num_programs(0)):
        _, _, _, smask, soffs = tile_coords(t, tiles_per_item, CS, S, CS_PAD, BLOCK_V)
        _, _, _, xmask, xoffs = tile_coords(t, tiles_per_item, CX, S, CX_PAD, BLOCK_V)
        b, o, v, mask, offs = tile_coords(t, tiles_per_item, CO, S, CO_PAD, BLOCK_V)
        s = to_dot(tl.load(s_ptr + soffs, mask=smask, other=0.0), DOT, ACC)  # (CS_PAD, BLOCK_V)
        x = to_dot(tl.load(x_ptr + xoffs, mask=xmask, other=0.0), DOT, ACC)  # (CX_PAD, BLOCK_V)
        a = tl.dot(wx, x, acc=tl.dot(wsk, s, out_dtype=ACC), out_dtype=ACC)  # (CO_PAD, BLOCK_V)
        a = a * dropout_scale(seed, b, 0, o, v, S, p, N_MASKS, DROP)
        tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(da_ptr, s_ptr, x_ptr, wsk_ptr, wx_ptr, ds_ptr, dx_ptr, part_ptr,
                CS, CX, CO, S, tiles_per_item, tiles, p, seed,
                CS_PAD: tl.constexpr, CX_PAD: tl.constexpr, CO_PAD: tl.constexpr,
                BLOCK_V: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
                DROP: tl.constexpr):  # fmt: skip
    wskt = tl.trans(load_weight(wsk_ptr, CO, CS, CO_PAD, CS_PAD, ACC, DOT))  # (CS_PAD, CO_PAD)
    wxt = tl.trans(load_weight(wx_ptr, CO, CX, CO_PAD, CX_PAD, ACC, DOT))  # (CX_PAD, CO_PAD)
    dwsk = tl.zeros((CO_PAD, CS_PAD), ACC)
    dwx = tl.zeros((CO_PAD, CX_PAD), ACC)
    for t in range(tl.program_id(0), tiles, tl.num_programs(0)):
        _, _, _, smask, soffs = tile_coords(t, tiles_per_item, CS, S, CS_PAD, BLOCK_V)
        _, _, _, xmask, xoffs = tile_coords(t, tiles_per_item, CX, S, CX_PAD, BLOCK_V)
        b, o, v, mask, offs = tile_coords(t, tiles_per_item, CO, S, CO_PAD, BLOCK_V)
        da = tl.load(da_ptr + offs, mask=mask, other=0.0).to(ACC)  # (CO_PAD, BLOCK_V)
        do = to_dot(da * dropout_scale(seed, b, 0, o, v, S, p, N_MASKS, DROP), DOT, ACC)
        s = to_dot(tl.load(s_ptr + soffs, mask=smask, other=0.0), DOT, ACC)  # (CS_PAD, BLOCK_V)
        dwsk += tl.dot(do, tl.trans(s), out_dtype=ACC)  # (CO_PAD, CS_PAD)
        ds = tl.dot(wskt, do, out_dtype=ACC)  # (CS_PAD, BLOCK_V)
        tl.store(ds_ptr + soffs, ds.to(ds_ptr.dtype.element_ty), mask=smask)
        x = to_dot(tl.load(x_ptr + xoffs, mask=xmask, other=0.0), DOT, ACC)  # (CX_PAD, BLOCK_V)
        dwx += tl.dot(do, tl.trans(x), out_dtype=ACC)  # (CO_PAD, CX_PAD)
        dx = tl.dot(wxt, do, out_dtype=ACC)  # (CX_PAD, BLOCK_V)
        tl.store(dx_ptr + xoffs, dx.to(dx_ptr.dtype.element_ty), mask=xmask)
    # this program's row of partial sums: dWs (CO, CS), dWx (CO, CX)
    o = tl.arange(0, CO_PAD)
    i = tl.arange(0, CS_PAD)
    j = tl.arange(0, CX_PAD)
    row = part_ptr + tl.program_id(0).to(tl.int64) * (CO * CS + CO * CX)
    tl.store(row + o[:, None] * CS + i[None, :], dwsk, mask=(o < CO)[:, None] & (i < CS)[None, :])
    tl.store(row + CO * CS + o[:, None] * CX + j[None, :], dwx,
             mask=(o < CO)[:, None] & (j < CX)[None, :])  # fmt: skip


def pair_proj_forward(s, x, ws, wx, p: float, seed: int, *, dot: torch.dtype | None = None,
                      out_dtype: torch.dtype | None = None, wrap: bool = False) -> torch.Tensor:
    """``a = drop(ws s + wx x)`` (B, C, *spatial), ``out_dtype`` (default s's); s: (B, Cs,
    *spatial), x: (B, Cx, *spatial), ws: (C, Cs), wx: (C, Cx); ``p``: the dropout's rate,
    ``seed``: its Philox seed (:func:`fastnmf.kernels._glue.dropout_seed`), ``dot``: the matrix
    products' operand dtype (default :func:`~fastnmf.kernels._glue.matmul_dtype` of s). The
    model's op stores a in ``dot``'s dtype, as autocast's convolutions return theirs."""
    cs, cx, cout, voxels = _check(s, x, ws, wx, p)
    s, x = s.contiguous(), x.contiguous()
    a = torch.empty((s.shape[0], cout, *s.shape[2:]), device=s.device,
                    dtype=out_dtype or s.dtype)  # fmt: skip
    programs, (per, tiles), meta = _launch_args(s, cs, cx, cout, voxels, backward=False, dot=dot)
    launch(_fwd_kernel, wrap=wrap)[(programs,)](
        s, x, ws.contiguous(), wx.contiguous(), a, cs, cx, cout, voxels, per, tiles, float(p),
        int(seed), DROP=p > 0, **meta)  # fmt: skip
    return a


def pair_proj_backward(da, s, x, ws, wx, p: float, seed: int, *, dot: torch.dtype | None = None,
                       wrap: bool = False):  # fmt: skip
    """``(ds, dx, dws, dwx)`` of :func:`pair_proj_forward` (same p, seed and dot) given ``da``."""
    cs, cx, cout, voxels = _check(s, x, ws, wx, p)
    _check_grad("pair_proj", da, (s.shape[0], cout, *s.shape[2:]))
    s, x, da = s.contiguous(), x.contiguous(), da.contiguous()
    programs, (per, tiles), meta = _launch_args(s, cs, cx, cout, voxels, backward=True, dot=dot)
    ds, dx = torch.empty_like(s), torch.empty_like(x)
    acc = compute_dtype(s.dtype)
    part = torch.empty(programs, cout * (cs + cx), device=s.device, dtype=acc)  # partial sums
    launch(_bwd_kernel, wrap=wrap)[(programs,)](
        da, s, x, ws.contiguous(), wx.contiguous(), ds, dx, part, cs, cx, cout, voxels, per,
        tiles, float(p), int(seed), DROP=p > 0, **meta)  # fmt: skip
    # each gradient its own sum over the programs' rows (a fixed order), not a view of another
    dws, dwx = (rows.sum(0) for rows in part.split([cout * cs, cout * cx], dim=1))
    return ds, dx, dws.view(cout, cs).to(ws.dtype), dwx.view(cout, cx).to(wx.dtype)


def pair_proj_workspace_bytes(shape: tuple[int, ...], out_channels: int, dtype: torch.dtype,
                              programs: int, *, x_channels: int | None = None) -> int:  # fmt: skip
    """Bytes :func:`pair_proj_backward` moves besides its inputs and outputs (skip of ``shape``;
    x of ``x_channels`` channels, default skip's, as in the U-Net's decoder): ``programs`` rows
    of partial sums written by the kernel and read by their reduction."""
    cx = shape[1] if x_channels is None else x_channels
    row = out_channels * (shape[1] + cx)
    return 2 * programs * row * torch.empty((), dtype=compute_dtype(dtype)).element_size()
