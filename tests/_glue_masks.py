"""The fused glue kernels' dropout masks, as the kernels draw them (tests only).

A tiny Triton kernel calls :func:`fastnmf.kernels._glue.dropout_scale` for every (b, ch, v) of
mask ``k`` so that a PyTorch reference can apply exactly the kernels' masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastnmf.kernels._glue import N_MASKS, dropout_scale

_N = tl.constexpr(N_MASKS)  # a constexpr whatever N_MASKS is (the kernel reads it)
_BLOCK_V = 1024  # voxels per program (the interpreter pays per program, not per element)


@triton.jit
def _mask_kernel(out_ptr, seed, p, C, S, K: tl.constexpr, C_PAD: tl.constexpr,
                 BLOCK_V: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    c = tl.arange(0, C_PAD)
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    scale = dropout_scale(seed, b, K, c, v, S, p, _N, True)
    mask = (c < C)[:, None] & (v < S)[None, :]
    tl.store(out_ptr + b * C * S + c[:, None] * S + v[None, :], scale, mask=mask)


def dropout_masks(batch: int, channels: int, voxels: int, k: int, p: float, seed: int, *,
                  device="cpu") -> torch.Tensor:  # fmt: skip
    """(batch, channels, voxels) float32: mask ``k``'s scale factor (``1 / (1 - p)`` where kept,
    0 where dropped) of a glue kernel call with rate ``p`` and ``seed``."""
    if not 0 <= k < _N.value:
        raise ValueError(f"mask index k must be in [0, {_N.value}), got {k}")
    out = torch.empty(batch, channels, voxels, device=device, dtype=torch.float32)
    block_v = min(_BLOCK_V, triton.next_power_of_2(voxels))
    grid = (batch, triton.cdiv(voxels, block_v))
    _mask_kernel[grid](out, int(seed), float(p), channels, voxels, K=k,
                       C_PAD=triton.next_power_of_2(channels), BLOCK_V=block_v)  # fmt: skip
    return out
