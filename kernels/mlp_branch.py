"""The Factorizer block's MLP branch with its residual, one pass forward and one backward.

``y = x + drop2(W2 drop1(GELU(W1 LN(x) + b1)) + b2)`` per voxel of a channels-first (B, C, S)
tensor (LN over the C channels with weight / bias; W1: (H, C), W2: (C, H): the block's norm2,
fc1, GELU, drop1, fc2, drop2 and residual add). Tiles, persistent programs, dropout masks and
precision follow :mod:`fastnmf.kernels._glue`.

Forward: x read once, y written once; nothing else (LN's statistics, the hidden tensor and the
masks stay in registers; autograd keeps x and the seed). Backward, per tile, with
``n = LN(x)``, ``h = W1 n + b1``, ``g = s1 GELU(h)`` (s1, s2: the masks' scale factors) recomputed
from x:

- ``do = s2 dy``; ``dW2 += do g^T``, ``db2 += sum do``;
- ``dh = s1 GELU'(h) (W2^T do)``; ``dW1 += dh n^T``, ``db1 += sum dh``;
- ``dn = W1^T dh``; ``dlnw += sum dn xhat``, ``dlnb += sum dn``;
- ``dx = dy + LN'(dn)`` (the residual's gradient plus LayerNorm's backward).

x and dy read once, dx written once; the parameter gradients are summed per program in
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
    gelu,
    gelu_grad,
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

__all__ = ["mlp_forward", "mlp_backward", "supported", "backward_workspace_bytes"]

MAX_PARAM_ELEMENTS = 16384  # 2 * H_PAD * C_PAD: the backward's dW1 + dW2 held in registers


def _pads(c: int, h: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(c)), max(16, triton.next_power_of_2(h))


# before Hopper (sm_80) the backward spills at 2 * 64 * 128 (220-836 B at C = 64, ptxas of
# Triton 3.9, the static suite's glue section): there the branch takes C <= 32 (ratio 2)
MAX_PARAM_ELEMENTS_PRE_HOPPER = 4096


def supported(channels: int, hidden: int, capability: int = 90) -> bool:
    """Whether the kernels take this branch on a GPU of compute ``capability`` (90: sm_90a): the
    weight gradients fit in a program's registers without spilling."""
    c_pad, h_pad = _pads(channels, hidden)
    limit = MAX_PARAM_ELEMENTS if capability >= 90 else MAX_PARAM_ELEMENTS_PRE_HOPPER
    return 2 * c_pad * h_pad <= limit


# the (H_PAD, BLOCK_V) hidden tile's elements and the warps, per pass (chosen for zero spills
# at sm_90a, see supported())
TUNING = {"fwd_elems": 2048, "fwd_warps": 4, "bwd_elems": 1024, "bwd_warps": 8}


def _config(h_pad: int, voxels: int, *, backward: bool) -> tuple[int, int]:
    """(BLOCK_V, warps) of a pass (:data:`TUNING`); under the interpreter the biggest tile (it
    pays per operation)."""
    if INTERPRET:
        return max(16, min(256, triton.next_power_of_2(voxels))), 4
    pass_ = "bwd" if backward else "fwd"
    block_v = max(16, min(128, TUNING[f"{pass_}_elems"] // h_pad))
    return block_v, TUNING[f"{pass_}_warps"]


def _check(x: torch.Tensor, ln_w, w1, w2) -> tuple[int, int, int, int]:
    if x.dim() < 3:
        raise ValueError(f"mlp branch expects (B, C, *spatial), got shape {tuple(x.shape)}")
    b, c = x.shape[:2]
    h = w1.shape[0]
    if ln_w.shape != (c,) or w1.shape != (h, c) or w2.shape != (c, h):
        raise ValueError(f"mlp branch: for C={c} expects norm weight ({c},), W1 (H, {c}) and W2 "
                         f"({c}, H); got {tuple(ln_w.shape)}, {tuple(w1.shape)}, "
                         f"{tuple(w2.shape)}")  # fmt: skip
    if not supported(c, h):
        raise ValueError(f"mlp branch: C={c}, H={h} is beyond the fused kernel "
                         f"(2 * C_PAD * H_PAD > {MAX_PARAM_ELEMENTS})")  # fmt: skip
    s = math.prod(x.shape[2:])
    check_offsets(max(c, h), s)
    return b, c, h, s


@triton.jit
def _fwd_kernel(x_ptr, lnw_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr,
                C, H, S, tiles_per_item, tiles, eps, p, seed,
                C_PAD: tl.constexpr, H_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
                ACC: tl.constexpr, DOT: tl.constexpr, DROP: tl.constexpr):  # fmt: skip
    k = tl.arange(0, H_PAD)
    lnw, lnb = load_vector(lnw_ptr, C, C_PAD, ACC), load_vector(lnb_ptr, C, C_PAD, ACC)
    w1 = load_weight(w1_ptr, H, C, H_PAD, C_PAD, ACC, DOT)  # (H_PAD, C_PAD)
    w2 = load_weight(w2_ptr, C, H, C_PAD, H_PAD, ACC, DOT)  # (C_PAD, H_PAD)
    b1 = load_vector(b1_ptr, H, H_PAD, ACC)
    b2 = load_vector(b2_ptr, C, C_PAD, ACC)
    for t in range(tl.program_id(0), tiles, tl.num_programs(0)):
        b, c, v, mask, offs = tile_coords(t, tiles_per_item, C, S, C_PAD, BLOCK_V)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)  # (C_PAD, BLOCK_V)
        xhat, rstd = layer_norm_tile(x, mask, C, eps)
        n = tl.where(mask, xhat * lnw[:, None] + lnb[:, None], 0.0)
        h = tl.dot(w1, to_dot(n, DOT, ACC), out_dtype=ACC) + b1[:, None]  # (H_PAD, BLOCK_V)
        g = gelu(h) * dropout_scale(seed, b, 0, k, v, S, p, N_MASKS, DROP)
        o = tl.dot(w2, to_dot(g, DOT, ACC), out_dtype=ACC) + b2[:, None]  # (C_PAD, BLOCK_V)
        y = x + o * dropout_scale(seed, b, 1, c, v, S, p, N_MASKS, DROP)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(dy_ptr, x_ptr, lnw_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, dx_ptr, ws_ptr,
                C, H, S, tiles_per_item, tiles, eps, p, seed,
                C_PAD: tl.constexpr, H_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
                ACC: tl.constexpr, DOT: tl.constexpr, DROP: tl.constexpr):  # fmt: skip
    c = tl.arange(0, C_PAD)
    k = tl.arange(0, H_PAD)
    cm, km = c < C, k < H
    lnw, lnb = load_vector(lnw_ptr, C, C_PAD, ACC), load_vector(lnb_ptr, C, C_PAD, ACC)
    w1 = load_weight(w1_ptr, H, C, H_PAD, C_PAD, ACC, DOT)  # (H_PAD, C_PAD)
    w2 = load_weight(w2_ptr, C, H, C_PAD, H_PAD, ACC, DOT)  # (C_PAD, H_PAD)
    w1t, w2t = tl.trans(w1), tl.trans(w2)  # (C_PAD, H_PAD), (H_PAD, C_PAD)
    b1 = load_vector(b1_ptr, H, H_PAD, ACC)
    dw1 = tl.zeros((H_PAD, C_PAD), ACC)
    dw2 = tl.zeros((C_PAD, H_PAD), ACC)
    db1 = tl.zeros((H_PAD,), ACC)
    db2 = tl.zeros((C_PAD,), ACC)
    dlnw = tl.zeros((C_PAD,), ACC)
    dlnb = tl.zeros((C_PAD,), ACC)
    for t in range(tl.program_id(0), tiles, tl.num_programs(0)):
        b, c, v, mask, offs = tile_coords(t, tiles_per_item, C, S, C_PAD, BLOCK_V)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)  # (C_PAD, BLOCK_V)
        xhat, rstd = layer_norm_tile(x, mask, C, eps)
        n = to_dot(tl.where(mask, xhat * lnw[:, None] + lnb[:, None], 0.0), DOT, ACC)
        h = tl.dot(w1, n, out_dtype=ACC) + b1[:, None]  # (H_PAD, BLOCK_V)
        s1 = dropout_scale(seed, b, 0, k, v, S, p, N_MASKS, DROP)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        do = to_dot(dy * dropout_scale(seed, b, 1, c, v, S, p, N_MASKS, DROP), DOT, ACC)
        dw2 += tl.dot(do, tl.trans(to_dot(gelu(h) * s1, DOT, ACC)), out_dtype=ACC)  # (C_PAD, H_PAD)
        db2 += tl.sum(do.to(ACC), axis=1)
        dh = tl.dot(w2t, do, out_dtype=ACC) * s1 * gelu_grad(h)  # (H_PAD, BLOCK_V)
        dw1 += tl.dot(to_dot(dh, DOT, ACC), tl.trans(n), out_dtype=ACC)  # (H_PAD, C_PAD)
        db1 += tl.sum(dh, axis=1)
        dn = tl.dot(w1t, to_dot(dh, DOT, ACC), out_dtype=ACC)  # (C_PAD, BLOCK_V)
        dlnw += tl.sum(dn * xhat, axis=1)
        dlnb += tl.sum(dn, axis=1)
        dx = dy + layer_norm_tile_backward(dn, xhat, lnw, rstd, C)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    # this program's row of partial sums: dW1 (H, C), dW2 (C, H), db1 (H), db2, dlnw, dlnb (C)
    row = ws_ptr + tl.program_id(0).to(tl.int64) * (2 * C * H + H + 3 * C)
    tl.store(row + k[:, None] * C + c[None, :], dw1, mask=km[:, None] & cm[None, :])
    row += C * H
    tl.store(row + c[:, None] * H + k[None, :], dw2, mask=cm[:, None] & km[None, :])
    row += C * H
    tl.store(row + k, db1, mask=km)
    tl.store(row + H + c, db2, mask=cm)
    tl.store(row + H + C + c, dlnw, mask=cm)
    tl.store(row + H + 2 * C + c, dlnb, mask=cm)


def _launch_args(x, c, h, s, *, backward: bool, dot: torch.dtype | None):
    c_pad, h_pad = _pads(c, h)
    block_v, warps = _config(h_pad, s, backward=backward)
    per, tiles = n_tiles(x.shape[0], s, block_v)
    programs = persistent_programs(tiles, x.device)
    meta = dict(C_PAD=c_pad, H_PAD=h_pad, BLOCK_V=block_v, ACC=acc_dtype(x.dtype),
                DOT=dot_dtype(dot or matmul_dtype(x)), num_warps=warps)  # fmt: skip
    return programs, (per, tiles), meta


def mlp_forward(x, ln_w, ln_b, eps: float, w1, b1, w2, b2, p: float, seed: int, *,
                dot: torch.dtype | None = None, wrap: bool = False) -> torch.Tensor:  # fmt: skip
    """``y`` (like x) of the branch with its residual; ``p``: both dropouts' rate, ``seed``:
    their Philox seed (:func:`fastnmf.kernels._glue.dropout_seed`), ``dot``: the matrix
    products' operand dtype (default :func:`~fastnmf.kernels._glue.matmul_dtype`)."""
    b, c, h, s = _check(x, ln_w, w1, w2)
    x = x.contiguous()
    y = torch.empty_like(x)
    programs, (per, tiles), meta = _launch_args(x, c, h, s, backward=False, dot=dot)
    launch(_fwd_kernel, wrap=wrap)[(programs,)](
        x, ln_w, ln_b, w1.contiguous(), b1, w2.contiguous(), b2, y, c, h, s, per, tiles,
        float(eps), float(p), int(seed), DROP=p > 0, **meta)  # fmt: skip
    return y


def mlp_backward(dy, x, ln_w, ln_b, eps: float, w1, b1, w2, p: float, seed: int, *,
                 dot: torch.dtype | None = None, wrap: bool = False):  # fmt: skip
    """``(dx, d ln_w, d ln_b, dW1, db1, dW2, db2)`` of :func:`mlp_forward` (same p, seed and
    dot)."""
    b, c, h, s = _check(x, ln_w, w1, w2)
    x, dy = x.contiguous(), dy.contiguous()
    programs, (per, tiles), meta = _launch_args(x, c, h, s, backward=True, dot=dot)
    dx = torch.empty_like(x)
    acc = compute_dtype(x.dtype)
    ws = torch.empty(programs, 2 * c * h + h + 3 * c, device=x.device, dtype=acc)  # partial sums
    launch(_bwd_kernel, wrap=wrap)[(programs,)](
        dy, x, ln_w, ln_b, w1.contiguous(), b1, w2.contiguous(), dx, ws, c, h, s, per, tiles,
        float(eps), float(p), int(seed), DROP=p > 0, **meta)  # fmt: skip
    # each gradient its own sum over the programs' rows (a fixed order), not a view of another
    dw1, dw2, db1, db2, dlnw, dlnb = (part.sum(0) for part in
                                      ws.split([c * h, c * h, h, c, c, c], dim=1))  # fmt: skip
    cast = ln_w.dtype
    return (dx, dlnw.to(cast), dlnb.to(cast), dw1.view(h, c).to(w1.dtype), db1.to(b1.dtype),
            dw2.view(c, h).to(w2.dtype), db2.to(cast))  # fmt: skip


def backward_workspace_bytes(shape: tuple[int, ...], hidden: int, dtype: torch.dtype,
                             programs: int) -> int:  # fmt: skip
    """Bytes the backward moves besides its inputs and outputs: ``programs`` rows of partial sums
    written by the kernel and read by their reduction."""
    c = shape[1]
    row = 2 * c * hidden + hidden + 3 * c
    return 2 * programs * row * torch.empty((), dtype=compute_dtype(dtype)).element_size()
