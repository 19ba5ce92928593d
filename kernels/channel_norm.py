"""LayerNorm over the channels of a channels-first (B, C, *S) tensor, read in place: no transpose.

``y[b, :, s] = (x[b, :, s] - mean) * rstd * w + bias`` with ``mean`` / ``rstd`` over the C
channels of voxel s (biased variance, ``rstd = 1 / sqrt(var + eps)``), what ``nn.LayerNorm(C)``
computes on ``x.movedim(1, -1)`` — without moving the channel axis. x is read as (B, C, S),
S = prod(spatial), contiguous: one program takes a (C, BLOCK_S) tile of one batch item, the
voxel axis contiguous in memory (coalesced loads), reduces over the channel axis in registers and
writes y in the same layout. Forward: x read once, y written once (plus mean / rstd, B × S fp32
each, kept for backward). Backward: x and dy read once, dx written once, per-program partial
sums of dw / db (C values each) reduced afterwards in a fixed order (deterministic, no atomics).

Statistics are accumulated in fp32 (fp64 for fp64 input): bf16 / fp16 inputs are loaded and
converted, y is stored in the input's dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, compute_dtype, launch

__all__ = ["channel_norm_forward", "channel_norm_backward", "backward_workspace_bytes"]

_TILE = 4096  # elements of x per program (C_PAD x BLOCK_S): registers, not shared memory


def _blocks(c: int, s: int) -> tuple[int, int]:
    c_pad = triton.next_power_of_2(c)
    block_s = max(16, min(triton.next_power_of_2(s), _TILE // c_pad))
    return c_pad, block_s


@triton.jit
def _tile(C, S, C_PAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """This program's tile: batch item ``program_id(1)``, voxels ``program_id(0) * BLOCK_S``
    onwards, every channel. Returns the channel indices, channel / voxel / tile masks, the
    tile's offsets into (B, C, S) and the voxels' offsets into the (B, S) statistics."""
    bi = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, C_PAD)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cm = c < C
    sm = s < S
    mask = cm[:, None] & sm[None, :]
    offs = bi * C * S + c[:, None].to(tl.int64) * S + s[None, :]  # (C_PAD, BLOCK_S)
    return c, cm, sm, mask, offs, bi * S + s


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, C, S, eps,
                C_PAD: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    c, cm, sm, mask, offs, stat = _tile(C, S, C_PAD, BLOCK_S)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.sum(x, axis=0) / C  # (BLOCK_S,)
    xc = tl.where(mask, x - mean[None, :], 0.0)
    var = tl.sum(xc * xc, axis=0) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + c, mask=cm, other=0.0).to(ACC)
    b = tl.load(b_ptr + c, mask=cm, other=0.0).to(ACC)
    y = xc * rstd[None, :] * w[:, None] + b[:, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + stat, mean, mask=sm)
    tl.store(rstd_ptr + stat, rstd, mask=sm)


# Backward. Per voxel (one column of the tile), with xhat = (x - mean) * rstd and g = dy * w:
#   y = xhat * w + bias,  xhat_c = (x_c - mean) * rstd,  mean = (1/C) sum_c x_c,
#   rstd = (var + eps)^(-1/2),  var = (1/C) sum_c (x_c - mean)^2.
# d xhat_c / d x_k = rstd * (delta_ck - 1/C) - xhat_c * xhat_k * rstd / C  (the second term from
# d rstd / d x_k = -rstd^3 (x_k - mean) / C, the mean's own term in var cancelling since
# sum_c (x_c - mean) = 0). So
#   dx_k = sum_c g_c d xhat_c / d x_k
#        = rstd * (g_k - (1/C) sum_c g_c - xhat_k * (1/C) sum_c g_c xhat_c).
# Parameters: dw_c = sum over voxels (and batch) of dy_c * xhat_c, dbias_c = sum of dy_c; each
# program writes its tile's partial sums (one row of C values), summed afterwards in a fixed order.


@triton.jit
def _bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, C, S, n_s,
                C_PAD: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    c, cm, sm, mask, offs, stat = _tile(C, S, C_PAD, BLOCK_S)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + stat, mask=sm, other=0.0)
    rstd = tl.load(rstd_ptr + stat, mask=sm, other=0.0)
    w = tl.load(w_ptr + c, mask=cm, other=0.0).to(ACC)
    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    g = dy * w[:, None]
    c1 = tl.sum(g * xhat, axis=0) / C  # (BLOCK_S,)
    c2 = tl.sum(g, axis=0) / C
    dx = (g - c2[None, :] - xhat * c1[None, :]) * rstd[None, :]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    row = (tl.program_id(1) * n_s + tl.program_id(0)).to(tl.int64) * C
    tl.store(dw_ptr + row + c, tl.sum(dy * xhat, axis=1), mask=cm)
    tl.store(db_ptr + row + c, tl.sum(dy, axis=1), mask=cm)


def backward_workspace_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes the backward moves besides its inputs and outputs: the per-program partial sums of
    dw and db, written by the kernel and read by their reduction."""
    b, c, s = shape[0], shape[1], math.prod(shape[2:])
    programs = b * triton.cdiv(s, _blocks(c, s)[1])
    return 2 * 2 * programs * c * torch.empty((), dtype=compute_dtype(dtype)).element_size()


def _check(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() < 3:
        raise ValueError(f"channel_norm expects (B, C, *spatial), got shape {tuple(x.shape)}")
    b, c = x.shape[:2]
    if weight.shape != (c,):
        raise ValueError(f"weight must have shape ({c},) for C={c}, got {tuple(weight.shape)}")
    return b, c, math.prod(x.shape[2:])


def channel_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                         *, wrap: bool = False):  # fmt: skip
    """``(y, mean, rstd)``: y like x; mean / rstd (B, S) in the accumulation dtype. ``wrap``:
    launch through ``torch.library.wrap_triton`` (inside the triton_op; :func:`launch`)."""
    b, c, s = _check(x, weight)
    x = x.contiguous()  # (B, C, *S); a no-op for the model's tensors
    acc = compute_dtype(x.dtype)
    y = torch.empty_like(x)
    mean = torch.empty(b, s, device=x.device, dtype=acc)  # (B, S)
    rstd = torch.empty(b, s, device=x.device, dtype=acc)  # (B, S)
    c_pad, block_s = _blocks(c, s)
    grid = (triton.cdiv(s, block_s), b)
    launch(_fwd_kernel, wrap=wrap)[grid](x, weight, bias, y, mean, rstd, c, s, float(eps),
                                         C_PAD=c_pad, BLOCK_S=block_s,
                                         ACC=acc_dtype(x.dtype))  # fmt: skip
    return y, mean, rstd


def channel_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                          mean: torch.Tensor, rstd: torch.Tensor, *,
                          wrap: bool = False):  # fmt: skip
    """``(dx, dweight, dbias)`` of :func:`channel_norm_forward` (derivation above the kernel);
    ``wrap`` as there."""
    b, c, s = _check(x, weight)
    x, dy = x.contiguous(), dy.contiguous()
    acc = compute_dtype(x.dtype)
    c_pad, block_s = _blocks(c, s)
    n_s = triton.cdiv(s, block_s)
    dx = torch.empty_like(x)
    dw = torch.empty(b * n_s, c, device=x.device, dtype=acc)  # (programs, C) partial sums
    db = torch.empty(b * n_s, c, device=x.device, dtype=acc)  # (programs, C)
    launch(_bwd_kernel, wrap=wrap)[(n_s, b)](dy, x, weight, mean, rstd, dx, dw, db, c, s, n_s,
                                             C_PAD=c_pad, BLOCK_S=block_s,
                                             ACC=acc_dtype(x.dtype))  # fmt: skip
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)
