"""Shared parts of the fused "glue" kernels around the NMF layers (issue 17: the Factorizer
block's LayerNorms, pointwise convolutions, GELU, dropouts and residual adds in one pass each).

Conventions every glue kernel follows:

- **Layout.** Activations are channels-first (B, C, S), S = prod(spatial), contiguous. A tile is
  (C_PAD, BLOCK_V): every channel (padded to a power of two, the pad rows masked to 0) of
  BLOCK_V consecutive voxels of one batch item, the voxel axis contiguous (coalesced rows).
- **Persistent programs.** A launch has :func:`persistent_programs` programs; program ``pid``
  takes tiles ``pid, pid + programs, ...`` (:func:`tile_coords`). Parameter gradients are summed
  in registers over a program's tiles and written once per program as one row of a
  (programs, ...) partial-sum workspace, reduced afterwards in a fixed order (``sum(0)``): no
  atomics, bitwise deterministic.
- **Dropout.** Masks are never stored: element (b, ch, v) of mask ``k`` of a call keeps its value
  iff ``tl.rand(seed + N_MASKS * b + k, ch * S + v) >= p`` (Philox, counter-based), scaled by
  ``1 / (1 - p)``, so the backward regenerates the forward's masks from ``seed`` alone. ``seed`` is
  drawn from torch's default (CPU) generator per call (:func:`dropout_seed`): ``torch.manual_seed``
  makes a run repeatable. The masks differ from ``nn.Dropout``'s draws (same distribution).
  Offsets are int32: :func:`check_offsets` rejects ``C * S >= 2**31``.
- **Precision.** LayerNorm statistics, GELU and every accumulation in ``ACC`` (fp32; fp64 for fp64
  input). Matrix products (``tl.dot``) take operands in the ``DOT`` dtype: the input's dtype, or
  autocast's (bf16 / fp16) when autocast is on; fp32 operands run as TF32 on a GPU, as cuDNN's
  convolutions do by default (``torch.backends.cudnn.allow_tf32``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET

__all__ = ["N_MASKS", "dropout_seed", "check_offsets", "persistent_programs", "matmul_dtype",
           "dot_dtype"]

# dropout masks a call may draw per batch item: seed + N_MASKS * b + k, k < N_MASKS
N_MASKS = tl.constexpr(4)
PROGRAMS_PER_SM = 2  # persistent programs per SM on a GPU
_INTERPRET_PROGRAMS = 3  # under the CPU interpreter (programs run one after another)
# The interpreter's tl.dot reads bf16 operands as raw bits (Triton 3.9: values off by 1e10) and
# its fp32 -> bf16 cast truncates (a GPU rounds to nearest even): there operands are rounded to
# the DOT dtype by :func:`to_dot` (to nearest even) and kept in ACC, so the products are a GPU's
_WIDEN = tl.constexpr(INTERPRET)
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


def dropout_seed() -> int:
    """A fresh Philox seed from torch's default generator (room left for the per-item seeds)."""
    return int(torch.randint(0, 2**30, ()).item())


def check_offsets(channels: int, voxels: int) -> None:
    """The dropout offsets ``ch * S + v`` must fit in int32."""
    if channels * voxels >= 2**31:
        raise ValueError(
            f"fused glue kernels: {channels} channels x {voxels} voxels per item exceed the int32 "
            "dropout offsets (2**31); use a smaller patch"
        )


def persistent_programs(n_tiles: int, device: torch.device) -> int:
    """Programs of a persistent launch: ``PROGRAMS_PER_SM`` per SM on a GPU (a few under the
    interpreter), never more than the tiles."""
    if device.type == "cuda" and not INTERPRET:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_tiles, PROGRAMS_PER_SM * sms))
    return max(1, min(n_tiles, _INTERPRET_PROGRAMS))


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The matrix products' operand dtype for input x: autocast's dtype when autocast is on for
    x's device, else x's (decided by the caller in forward and kept for backward, which runs
    outside autocast)."""
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def dot_dtype(dtype: torch.dtype):
    """The ``DOT`` constexpr for operand dtype ``dtype``."""
    return {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}[dtype]  # fmt: skip


def n_tiles(batch: int, voxels: int, block_v: int) -> tuple[int, int]:
    """(tiles per batch item, tiles in all)."""
    per = math.ceil(voxels / block_v)
    return per, batch * per


# ----------------------------------------------------------------------------------------------
# Device side (inlined into the kernels)


@triton.jit
def tile_coords(t, tiles_per_item, C, S, C_PAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Tile ``t``: batch item ``b``, channel indices ``c`` (C_PAD,), voxel indices ``v``
    (BLOCK_V,), the (C_PAD, BLOCK_V) mask and offsets into (B, C, S)."""
    b = t // tiles_per_item
    c = tl.arange(0, C_PAD)
    v = (t - b * tiles_per_item) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = (c < C)[:, None] & (v < S)[None, :]
    offs = b.to(tl.int64) * C * S + c[:, None].to(tl.int64) * S + v[None, :]
    return b, c, v, mask, offs


@triton.jit
def to_dot(a, DOT: tl.constexpr, ACC: tl.constexpr):
    """A matrix product's operand in the DOT dtype (under the interpreter: its value rounded to
    DOT, to nearest even, held in ACC; see ``_WIDEN``)."""
    if _WIDEN:
        if DOT == tl.bfloat16:
            bits = a.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True).to(ACC)
        else:
            return a.to(DOT).to(ACC)
    else:
        return a.to(DOT)


@triton.jit
def load_weight(w_ptr, CO, CI, CO_PAD: tl.constexpr, CI_PAD: tl.constexpr, ACC: tl.constexpr,
                DOT: tl.constexpr):  # fmt: skip
    """A row-major (CO, CI) weight as a (CO_PAD, CI_PAD) dot operand, the pad zero."""
    o = tl.arange(0, CO_PAD)
    i = tl.arange(0, CI_PAD)
    mask = (o < CO)[:, None] & (i < CI)[None, :]
    return to_dot(tl.load(w_ptr + o[:, None] * CI + i[None, :], mask=mask, other=0.0), DOT, ACC)


@triton.jit
def load_vector(ptr, N, N_PAD: tl.constexpr, ACC: tl.constexpr):
    """A (N,) parameter vector as (N_PAD,) in ACC, the pad zero."""
    i = tl.arange(0, N_PAD)
    return tl.load(ptr + i, mask=i < N, other=0.0).to(ACC)


@triton.jit
def layer_norm_tile(x, mask, C, eps):
    """LayerNorm over axis 0 of a masked (C_PAD, BLOCK_V) tile: ``(xhat, rstd)``, xhat 0 where
    masked (biased variance, ``rstd = 1 / sqrt(var + eps)``)."""
    mean = tl.sum(x, axis=0) / C
    xc = tl.where(mask, x - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
    return xc * rstd[None, :], rstd


@triton.jit
def layer_norm_tile_backward(dn, xhat, w, rstd, C):
    """dx of ``n = xhat * w + bias`` given dn = dL/dn (derivation: kernels/channel_norm.py)."""
    g = dn * w[:, None]
    c1 = tl.sum(g * xhat, axis=0) / C
    c2 = tl.sum(g, axis=0) / C
    return (g - c2[None, :] - xhat * c1[None, :]) * rstd[None, :]


@triton.jit
def gelu(h):
    """Exact GELU ``h Phi(h) = h (1 + erf(h / sqrt 2)) / 2`` (``nn.GELU()``)."""
    return 0.5 * h * (1.0 + tl.erf(h * _SQRT1_2))


@triton.jit
def gelu_grad(h):
    """d GELU / dh = Phi(h) + h phi(h)."""
    return 0.5 * (1.0 + tl.erf(h * _SQRT1_2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI


@triton.jit
def dropout_scale(seed, b, k: tl.constexpr, c, v, S, p, N: tl.constexpr, DROP: tl.constexpr):
    """The (C_PAD, BLOCK_V) factor of mask ``k``: ``1 / (1 - p)`` where kept, 0 where dropped
    (1 everywhere without DROP)."""
    if DROP:
        u = tl.rand(seed + N * b + k, c[:, None] * S + v[None, :])
        return tl.where(u >= p, 1.0 / (1.0 - p), 0.0)
    else:
        return tl.full((c.shape[0], v.shape[0]), 1.0, tl.float32)
