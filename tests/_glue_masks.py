"""The fused glue kernels' dropout masks read back (a test-only Triton kernel calling the
kernels' own ``dropout_scale``), for PyTorch references of the fused ops."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastnmf.kernels._glue import N_MASKS, dropout_scale


@triton.jit
def _mask_kernel(out_ptr, seed, p, S, K: tl.constexpr, C_PAD: tl.constexpr, BV: tl.constexpr):
    b = tl.program_id(0)
    c = tl.arange(0, C_PAD)
    v = tl.arange(0, BV)
    m = dropout_scale(seed, b, K, c, v, S, p, N_MASKS, True)
    tl.store(out_ptr + b * C_PAD * BV + c[:, None] * BV + v[None, :], m)


def kernel_masks(batch: int, channels: int, voxels: int, k: int, p: float, seed: int):
    """(B, C, S) float32 scale factors of mask ``k``: 1 / (1 - p) where kept, 0 where dropped."""
    c_pad, bv = triton.next_power_of_2(channels), triton.next_power_of_2(voxels)
    out = torch.empty(batch, c_pad, bv)
    _mask_kernel[(batch,)](out, seed, p, voxels, K=k, C_PAD=c_pad, BV=bv)
    return out[:, :channels, :voxels]
