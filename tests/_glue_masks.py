"""Test helpers of the fused glue kernels: their dropout masks read back (a test-only Triton
kernel calling the kernels' own ``dropout_scale``), for PyTorch references of the fused ops, and
a launch recorder."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastnmf.kernels._glue import N_MASKS, dropout_scale

_BLOCK_V = 1024  # voxels per program at most (the interpreter pays per program)


@triton.jit
def _mask_kernel(out_ptr, seed, p, C, S, K: tl.constexpr, C_PAD: tl.constexpr,
                 BV: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    c = tl.arange(0, C_PAD)
    v = tl.program_id(1) * BV + tl.arange(0, BV)
    m = dropout_scale(seed, b, K, c, v, S, p, N_MASKS, True)
    inside = (c < C)[:, None] & (v < S)[None, :]
    tl.store(out_ptr + b * C * S + c[:, None] * S + v[None, :], m, mask=inside)


def kernel_masks(batch: int, channels: int, voxels: int, k: int, p: float, seed: int, *,
                 device="cpu") -> torch.Tensor:  # fmt: skip
    """(B, C, S) float32 scale factors of mask ``k``: 1 / (1 - p) where kept, 0 where dropped
    (contiguous, on ``device``)."""
    if not 0 <= k < N_MASKS.value:
        raise ValueError(f"mask index k must be in [0, {N_MASKS.value}), got {k}")
    out = torch.empty(batch, channels, voxels, device=device)  # (B, C, S)
    bv = min(_BLOCK_V, triton.next_power_of_2(voxels))
    _mask_kernel[(batch, triton.cdiv(voxels, bv))](
        out, int(seed), float(p), channels, voxels, K=k, C_PAD=triton.next_power_of_2(channels),
        BV=bv)  # fmt: skip
    return out


class LaunchCapture:
    """Stands in for a kernel: records the grid and arguments of its launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.calls.append((grid, args))
            return self.kernel[grid](*args, **kw)

        return run
