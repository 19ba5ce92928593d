"""The context branch's projections with their glue, one pass forward and one backward each.

Two kernel pairs around the NMF of a Factorizer block (``x + drop(out_proj(NMF(in_proj(LN(x)))))``,
models/layers.py: FactorizerBlock._mix, WrappedNMF.after_in_proj), on channels-first (B, C, S)
tensors; tiles, persistent programs, dropout masks and precision follow
:mod:`fastnmf.kernels._glue`.

**norm_proj**: ``z = W LN(x)`` per voxel (LN over the C channels with weight / bias; W: (Cout, C),
no bias: the block's norm1 and the NMF layer's in_proj). Forward: x read once, z written once.
Backward, per tile, with ``n = xhat * lnw + lnb`` recomputed from x:

- ``dW += dz n^T``; ``dn = W^T dz``; ``dlnw += sum dn xhat``, ``dlnb += sum dn``;
- ``dx = LN'(dn)`` (:func:`~fastnmf.kernels._glue.layer_norm_tile_backward`), plus ``dres``
  when given (x's gradient from the block's residual, so that no separate pass adds the two).

x and dz (and dres) read once, dx written once.

**proj_residual**: ``out = x + drop(W z + b)`` per voxel (W: (Cout, Cin), b: (Cout,): the NMF
layer's out_proj, its dropout (mask ``k = 0``, indexed by the output channel) and the block's
residual add). Forward: z and x read once, out written once. Backward, per tile, with ``s`` the
mask's scale factor regenerated from the seed:

- ``do = s dout``; ``dW += do z^T``, ``db += sum do``; ``dz = W^T do``.

dout and z read once, dz written once; the residual's gradient ``dx`` is ``dout`` itself (the
caller passes it on, no copy).

In both backwards the parameter gradients are summed per program in registers (one row per
program, reduced afterwards in a fixed order).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastnmf._checks import FLOAT_DTYPES

from ._common import INTERPRET, acc_dtype, compute_dtype, launch
from ._glue import (
    N_MASKS,
    check_offsets,
    dot_dtype,
    dropout_scale,
    layer_norm_tile,
    layer_norm_tile_backward,
    load_vector,
    load_weight,
    matmul_dtype,
    n_tiles,
    persistent_programs,
    tile_coords,
    to_dot,
)

__all__ = ["norm_proj_forward", "norm_proj_backward", "proj_residual_forward",
           "proj_residual_backward", "supported", "norm_proj_workspace_bytes",
           "proj_residual_workspace_bytes"]  # fmt: skip

MAX_PARAM_ELEMENTS = 16384  # CIN_PAD * COUT_PAD: the weight and its gradient held in registers
FWD_TILE_ELEMENTS = 2048  # C_PAD * BLOCK_V of the widest activation tile on a GPU, forward
BWD_TILE_ELEMENTS = 1024  # and backward


def _pad(channels: int) -> int:
    return max(16, triton.next_power_of_2(channels))


def supported(cin: int, cout: int) -> bool:
    """Whether the kernels take this projection: the weight gradient fits in a program's
    registers."""
    return _pad(cin) * _pad(cout) <= MAX_PARAM_ELEMENTS


def _config(cin_pad: int, cout_pad: int, voxels: int, *, backward: bool,
            fp64: bool) -> tuple[int, int]:  # fmt: skip
    """(BLOCK_V, warps): the widest (C_PAD, BLOCK_V) tile at *_TILE_ELEMENTS; 8 warps forward, 4
    backward up to a 64 x 64 weight (32 x 32 in fp64), 8 beyond. Compiled for sm_90a (Triton
    3.9): no spills at 16 to 128 channels in fp16 / bf16 / fp32, up to 64 in fp64 (the checking
    dtype). Under the interpreter the biggest tile (it pays per operation)."""
    if INTERPRET:
        return max(16, min(256, triton.next_power_of_2(voxels))), 4
    elements = BWD_TILE_ELEMENTS if backward else FWD_TILE_ELEMENTS
    block_v = max(16, min(128, elements // max(cin_pad, cout_pad)))
    if not backward:
        return block_v, 8
    return block_v, 4 if cin_pad * cout_pad * (4 if fp64 else 1) <= 64 * 64 else 8


def _check_input(name: str, t: torch.Tensor) -> None:
    if t.dim() < 3:
        raise ValueError(f"{name} expects (B, C, *spatial), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the kernels take float16/32/64, bfloat16")


def _check_weight(name: str, w: torch.Tensor, cin: int) -> int:
    """Cout of a (Cout, cin) weight; a clear error for any other shape or an unsupported size."""
    if w.dim() != 2 or w.shape[1] != cin:
        raise ValueError(f"{name}: for {cin} input channels expects a 2-D weight (Cout, {cin}) "
                         f"(a conv weight: .flatten(1)), got {tuple(w.shape)}")  # fmt: skip
    cout = w.shape[0]
    if not supported(cin, cout):
        raise ValueError(f"{name}: Cin={cin}, Cout={cout} is beyond the fused kernel "
                         f"(CIN_PAD * COUT_PAD > {MAX_PARAM_ELEMENTS})")  # fmt: skip
    return cout


def _check_grad(name: str, grad: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(grad.shape) != shape:
        raise ValueError(f"{name}: the output gradient has shape {tuple(grad.shape)}, the output "
                         f"{shape}")  # fmt: skip


def _check_norm_proj(x, ln_w, ln_b, w) -> tuple[int, int, int]:
    """(C, Cout, S) of a norm_proj call."""
    _check_input("norm_proj: x", x)
    c = x.shape[1]
    if ln_w.shape != (c,) or ln_b.shape != (c,):
        raise ValueError(f"norm_proj: for C={c} expects norm weight and bias ({c},), got "
                         f"{tuple(ln_w.shape)} and {tuple(ln_b.shape)}")  # fmt: skip
    cout = _check_weight("norm_proj", w, c)
    s = math.prod(x.shape[2:])
    check_offsets(max(c, cout), s)
    return c, cout, s


def _check_proj_residual(z, w, p: float) -> tuple[int, int, int]:
    """(Cin, Cout, S) of a proj_residual call."""
    _check_input("proj_residual: z", z)
    cin = z.shape[1]
    cout = _check_weight("proj_residual", w, cin)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"proj_residual: dropout rate p must be in [0, 1), got {p}")
    s = math.prod(z.shape[2:])
    check_offsets(max(cin, cout), s)
    return cin, cout, s


def _launch_args(x, cin: int, cout: int, s: int, *, backward: bool, dot: torch.dtype | None):
    """(programs, (tiles per item, tiles), constexprs) of a launch over x's batch and voxels."""
    cin_pad, cout_pad = _pad(cin), _pad(cout)
    block_v, warps = _config(cin_pad, cout_pad, s, backward=backward,
                             fp64=x.dtype == torch.float64)  # fmt: skip
    per, tiles = n_tiles(x.shape[0], s, block_v)
    programs = persistent_programs(tiles, x.device)
    meta = dict(CI_PAD=cin_pad, CO_PAD=cout_pad, BLOCK_V=block_v, ACC=acc_dtype(x.dtype),
                DOT=dot_dtype(dot or matmul_dtype(x)), num_warps=warps)  # fmt: skip
    return programs, (per, tiles), meta


# ----------------------------------------------------------------------------------------------
# norm_proj: z = W LN(x)


@triton.jit
def _norm_proj_fwd_kernel(x_ptr, lnw_ptr, lnb_ptr, w_ptr, z_ptr,
                          CI, CO, S, tiles_per_item, tiles, eps,
                          CI_PAD: tl.constexpr, CO_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
                          ACC: tl.constexpr, DOT: tl.constexpr):  # fmt: skip
    lnw, lnb = load_vector(lnw_ptr, CI, CI_PAD, ACC), load_vector(lnb_ptr, CI, CI_PAD, ACC)
    w = load_weight(w_ptr, CO, CI, CO_PAD, CI_PAD, ACC, DOT)  # (CO_PAD, CI_PAD)
    for t in range(tl.program_id(0), tiles, tl.num_programs(0)):
        b, c, v, mask, offs = tile_coords(t, tiles_per_item, CI, S, CI_PAD, BLOCK_V)
        _, _, _, zmask, zoffs = tile_coords(t, tiles_per_item, CO, S, CO_PAD, BLOCK_V)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)  # (CI_PAD, BLOCK_V)
        xhat, rstd = layer_norm_tile(x, mask, CI, eps)
        n = tl.where(mask, xhat * lnw[:, None] + lnb[:, None], 0.0)
        z = tl.dot(w, to_dot(n, DOT, ACC), out_dtype=ACC)  # (CO_PAD, BLOCK_V)
        tl.store(z_ptr + zoffs, z.to(z_ptr.dtype.element_ty), mask=zmask)


@triton.jit
def _norm_proj_bwd_kernel(dz_ptr, x_ptr, lnw_ptr, lnb_ptr, w_ptr, dx_ptr, ws_ptr, res_ptr,
                          CI, CO, S, tiles_per_item, tiles, eps,
                          CI_PAD: tl.constexpr, CO_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
                          ACC: tl.constexpr, DOT: tl.constexpr, RES: tl.constexpr):  # fmt: skip
    c = tl.arange(0, CI_PAD)
    o = tl.arange(0, CO_PAD)
    cm, om = c < CI, o < CO
    lnw, lnb = load_vector(lnw_ptr, CI, CI_PAD, ACC), load_vector(lnb_ptr, CI, CI_PAD, ACC)
    wt = tl.trans(load_weight(w_ptr, CO, CI, CO_PAD, CI_PAD, ACC, DOT))  # (CI_PAD, CO_PAD)
    dw = tl.zeros((CO_PAD, CI_PAD), ACC)
    dlnw = tl.zeros((CI_PAD,), ACC)
    dlnb = tl.zeros((CI_PAD,), ACC)
    for t in range(tl.program_id(0), tiles, tl.num_programs(0)):
        b, c, v, mask, offs = tile_coords(t, tiles_per_item, CI, S, CI_PAD, BLOCK_V)
        _, _, _, zmask, zoffs = tile_coords(t, tiles_per_item, CO, S, CO_PAD, BLOCK_V)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)  # (CI_PAD, BLOCK_V)
        xhat, rstd = layer_norm_tile(x, mask, CI, eps)
        n = to_dot(tl.where(mask, xhat * lnw[:, None] + lnb[:, None], 0.0), DOT, ACC)
        dz = to_dot(tl.load(dz_ptr + zoffs, mask=zmask, other=0.0), DOT, ACC)  # (CO_PAD, BLOCK_V)
        dw += tl.dot(dz, tl.trans(n), out_dtype=ACC)  # (CO_PAD, CI_PAD)
        dn = tl.dot(wt, dz, out_dtype=ACC)  # (CI_PAD, BLOCK_V)
        dlnw += tl.sum(dn * xhat, axis=1)
        dlnb += tl.sum(dn, axis=1)
        dx = layer_norm_tile_backward(dn, xhat, lnw, rstd, CI)
        if RES:  # x's other gradient (a residual's), added here instead of in another pass
            dx += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    # this program's row of partial sums: dW (CO, CI), dlnw, dlnb (CI)
    row = ws_ptr + tl.program_id(0).to(tl.int64) * (CO * CI + 2 * CI)
    tl.store(row + o[:, None] * CI + c[None, :], dw, mask=om[:, None] & cm[None, :])
    tl.store(row + CO * CI + c, dlnw, mask=cm)
    tl.store(row + CO * CI + CI + c, dlnb, mask=cm)


def norm_proj_forward(x, ln_w, ln_b, eps: float, w, *, dot: torch.dtype | None = None,
                      wrap: bool = False) -> torch.Tensor:  # fmt: skip
    """``z`` (B, Cout, *spatial), x's dtype: the 1x1 conv ``w`` (Cout, C) of x's LayerNorm over
    its channels (weight ``ln_w``, bias ``ln_b``, ``eps``); ``dot``: the matrix product's operand
    dtype (default :func:`~fastnmf.kernels._glue.matmul_dtype`)."""
    c, cout, s = _check_norm_proj(x, ln_w, ln_b, w)
    x = x.contiguous()
    z = torch.empty((x.shape[0], cout, *x.shape[2:]), device=x.device, dtype=x.dtype)
    programs, (per, tiles), meta = _launch_args(x, c, cout, s, backward=False, dot=dot)
    launch(_norm_proj_fwd_kernel, wrap=wrap)[(programs,)](
        x, ln_w, ln_b, w.contiguous(), z, c, cout, s, per, tiles, float(eps), **meta)
    return z


def norm_proj_backward(dz, x, ln_w, ln_b, eps: float, w, *, dres=None,
                       dot: torch.dtype | None = None, wrap: bool = False):  # fmt: skip
    """``(dx, d ln_w, d ln_b, dW)`` of :func:`norm_proj_forward` given ``dz`` (same dot);
    ``dres`` (like x): a gradient of x from elsewhere (a residual's), added into dx."""
    c, cout, s = _check_norm_proj(x, ln_w, ln_b, w)
    _check_grad("norm_proj", dz, (x.shape[0], cout, *x.shape[2:]))
    if dres is not None:
        _check_grad("norm_proj (dres)", dres, tuple(x.shape))
    x, dz = x.contiguous(), dz.contiguous()
    programs, (per, tiles), meta = _launch_args(x, c, cout, s, backward=True, dot=dot)
    dx = torch.empty_like(x)
    acc = compute_dtype(x.dtype)
    ws = torch.empty(programs, cout * c + 2 * c, device=x.device, dtype=acc)  # partial sums
    res = dx if dres is None else dres.contiguous()  # dx: a placeholder pointer, never read
    launch(_norm_proj_bwd_kernel, wrap=wrap)[(programs,)](
        dz, x, ln_w, ln_b, w.contiguous(), dx, ws, res, c, cout, s, per, tiles, float(eps),
        RES=dres is not None, **meta)  # fmt: skip
    # each gradient its own sum over the programs' rows (a fixed order), not a view of another
    dw, dlnw, dlnb = (part.sum(0) for part in ws.split([cout * c, c, c], dim=1))
    return dx, dlnw.to(ln_w.dtype), dlnb.to(ln_b.dtype), dw.view(cout, c).to(w.dtype)


def norm_proj_workspace_bytes(shape: tuple[int, ...], out_channels: int, dtype: torch.dtype,
                              programs: int) -> int:  # fmt: skip
    """Bytes :func:`norm_proj_backward` moves besides its inputs and outputs (x of ``shape``):
    ``programs`` rows of partial sums written by the kernel and read by their reduction."""
    c = shape[1]
    row = out_channels * c + 2 * c
    return 2 * programs * row * torch.empty((), dtype=compute_dtype(dtype)).element_size()


# ----------------------------------------------------------------------------------------------
# proj_residual: out = x + drop(W z + b)


@triton.jit
def _proj_residual_fwd_kernel(z_ptr, x_ptr, w_ptr, bias_ptr, out_ptr,
                              CI, CO, S, tiles_per_item, tiles, p, seed,
                              CI_PAD: tl.constexpr, CO_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
                              ACC: tl.constexpr, DOT: tl.constexpr,
                              DROP: tl.constexpr):  # fmt: skip
    w = load_weight(w_ptr, CO, CI, CO_PAD, CI_PAD, ACC, DOT)  # (CO_PAD, CI_PAD)
    bias = load_vector(bias_ptr, CO, CO_PAD, ACC)
    for t in range(tl.program_id(0), tiles, tl.num_programs(0)):
        _, _, _, zmask, zoffs = tile_coords(t, tiles_per_item, CI, S, CI_PAD, BLOCK_V)
        b, o, v, mask, offs = tile_coords(t, tiles_per_item, CO, S, CO_PAD, BLOCK_V)
        z = to_dot(tl.load(z_ptr + zoffs, mask=zmask, other=0.0), DOT, ACC)  # (CI_PAD, BLOCK_V)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)  # (CO_PAD, BLOCK_V)
        h = tl.dot(w, z, out_dtype=ACC) + bias[:, None]
        out = x + h * dropout_scale(seed, b, 0, o, v, S, p, N_MASKS, DROP)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _proj_residual_bwd_kernel(dout_ptr, z_ptr, w_ptr, dz_ptr, ws_ptr,
                              CI, CO, S, tiles_per_item, tiles, p, seed,
                              CI_PAD: tl.constexpr, CO_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
                              ACC: tl.constexpr, DOT: tl.constexpr,
                              DROP: tl.constexpr):  # fmt: skip
    i = tl.arange(0, CI_PAD)
    o = tl.arange(0, CO_PAD)
    im, om = i < CI, o < CO
    wt = tl.trans(load_weight(w_ptr, CO, CI, CO_PAD, CI_PAD, ACC, DOT))  # (CI_PAD, CO_PAD)
    dw = tl.zeros((CO_PAD, CI_PAD), ACC)
    db = tl.zeros((CO_PAD,), ACC)
    for t in range(tl.program_id(0), tiles, tl.num_programs(0)):
        _, _, _, zmask, zoffs = tile_coords(t, tiles_per_item, CI, S, CI_PAD, BLOCK_V)
        b, o, v, mask, offs = tile_coords(t, tiles_per_item, CO, S, CO_PAD, BLOCK_V)
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(ACC)  # (CO_PAD, BLOCK_V)
        ds = dout * dropout_scale(seed, b, 0, o, v, S, p, N_MASKS, DROP)
        db += tl.sum(ds, axis=1)
        do = to_dot(ds, DOT, ACC)
        z = to_dot(tl.load(z_ptr + zoffs, mask=zmask, other=0.0), DOT, ACC)  # (CI_PAD, BLOCK_V)
        dw += tl.dot(do, tl.trans(z), out_dtype=ACC)  # (CO_PAD, CI_PAD)
        dz = tl.dot(wt, do, out_dtype=ACC)  # (CI_PAD, BLOCK_V)
        tl.store(dz_ptr + zoffs, dz.to(dz_ptr.dtype.element_ty), mask=zmask)
    # this program's row of partial sums: dW (CO, CI), db (CO)
    row = ws_ptr + tl.program_id(0).to(tl.int64) * (CO * CI + CO)
    tl.store(row + o[:, None] * CI + i[None, :], dw, mask=om[:, None] & im[None, :])
    tl.store(row + CO * CI + o, db, mask=om)


def proj_residual_forward(z, x, w, b, p: float, seed: int, *, dot: torch.dtype | None = None,
                          wrap: bool = False) -> torch.Tensor:  # fmt: skip
    """``out = x + drop(w z + b)`` (like x: (B, Cout, *spatial)); z: (B, Cin, *spatial), w:
    (Cout, Cin), b: (Cout,); ``p``: the dropout's rate, ``seed``: its Philox seed
    (:func:`fastnmf.kernels._glue.dropout_seed`), ``dot``: the matrix product's operand dtype
    (default :func:`~fastnmf.kernels._glue.matmul_dtype`)."""
    cin, cout, s = _check_proj_residual(z, w, p)
    if tuple(x.shape) != (z.shape[0], cout, *z.shape[2:]) or b.shape != (cout,):
        raise ValueError(f"proj_residual: for z {tuple(z.shape)} and W {tuple(w.shape)} expects "
                         f"x {(z.shape[0], cout, *z.shape[2:])} and b ({cout},), got "
                         f"{tuple(x.shape)} and {tuple(b.shape)}")  # fmt: skip
    z, x = z.contiguous(), x.contiguous()
    out = torch.empty_like(x)
    programs, (per, tiles), meta = _launch_args(z, cin, cout, s, backward=False, dot=dot)
    launch(_proj_residual_fwd_kernel, wrap=wrap)[(programs,)](
        z, x, w.contiguous(), b, out, cin, cout, s, per, tiles, float(p), int(seed), DROP=p > 0,
        **meta)  # fmt: skip
    return out


def proj_residual_backward(dout, z, w, p: float, seed: int, *, dot: torch.dtype | None = None,
                           wrap: bool = False):  # fmt: skip
    """``(dz, dW, db)`` of :func:`proj_residual_forward` (same p, seed and dot) given ``dout``;
    the residual's gradient dx is ``dout`` itself."""
    cin, cout, s = _check_proj_residual(z, w, p)
    _check_grad("proj_residual", dout, (z.shape[0], cout, *z.shape[2:]))
    z, dout = z.contiguous(), dout.contiguous()
    programs, (per, tiles), meta = _launch_args(z, cin, cout, s, backward=True, dot=dot)
    dz = torch.empty_like(z)
    acc = compute_dtype(z.dtype)
    ws = torch.empty(programs, cout * cin + cout, device=z.device, dtype=acc)  # partial sums
    launch(_proj_residual_bwd_kernel, wrap=wrap)[(programs,)](
        dout, z, w.contiguous(), dz, ws, cin, cout, s, per, tiles, float(p), int(seed),
        DROP=p > 0, **meta)  # fmt: skip
    # each gradient its own sum over the programs' rows (a fixed order), not a view of another
    dw, db = (part.sum(0) for part in ws.split([cout * cin, cout], dim=1))
    return dz, dw.view(cout, cin).to(w.dtype), db.to(w.dtype)


def proj_residual_workspace_bytes(shape: tuple[int, ...], out_channels: int, dtype: torch.dtype,
                                  programs: int) -> int:  # fmt: skip
    """Bytes :func:`proj_residual_backward` moves besides its inputs and outputs (z of
    ``shape``): ``programs`` rows of partial sums written by the kernel and read by their
    reduction."""
    row = out_channels * shape[1] + out_channels
    return 2 * programs * row * torch.empty((), dtype=compute_dtype(dtype)).element_size()
