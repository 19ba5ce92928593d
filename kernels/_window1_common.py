"""Device functions of the first window design's kernels (kernels/window_nmf.py): what a stats
program works on, the Gram product, ReLU'd loads, the tiles of the output passes and their
window under a roll, and the backward's masked store of dX."""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    _head_block,
    _load_shift,
    _row_mask,
    _window_and_shift,
    _wrap_above,
)


@triton.jit
def _stats_program(SHIFTS: tl.constexpr, C, E, HEADS, NSHIFT: tl.constexpr, S0, S1, S2, NW1, NW2,
                   BLOCK_E: tl.constexpr):  # fmt: skip
    """What a stats program (window w, shift s, head bh) works on.

    The shifts of one window are neighbouring programs: they read overlapping voxels at about
    the same time, so the second read of a voxel tends to come from L2, not from memory.
    """
    s = tl.program_id(0) % NSHIFT
    w = tl.program_id(0) // NSHIFT
    bh = tl.program_id(1)
    nvox = S0 * S1 * S2
    offset, e, emask = _head_block(bh, C, E, HEADS, nvox, BLOCK_E)
    w0, w1, w2, s0, s1, s2 = _window_and_shift(w, s, SHIFTS, NSHIFT, NW1, NW2)
    return s, w, bh, nvox, offset, e, emask, w0, w1, w2, s0, s1, s2


@triton.jit
def _store_dx(dx_ptr, ptrs, mask, dx, x_raw, rowmask):
    """Store dX times ReLU'(x) and the MU row mask."""
    dx = tl.where(x_raw > 0, dx * rowmask[:, None], 0)
    tl.store(dx_ptr + ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gram(a, b, DOT: tl.constexpr, ACC: tl.constexpr):
    """a b^T of two (BLOCK_E, CHUNK) tiles, in ACC.

    DOT=False: broadcast-multiply-and-sum. DOT=True: ``tl.dot`` (needs BLOCK_E >= 16) in IEEE
    fp32 (not TF32: the products stay exact). 16-bit tiles are widened first: Triton's
    interpreter computes 16-bit ``tl.dot`` wrongly, so that path could not be tested without a
    GPU.
    """
    a = a.to(ACC)
    b = b.to(ACC)
    if DOT:
        return tl.dot(a, tl.trans(b), input_precision="ieee", out_dtype=ACC)
    else:
        return tl.sum(a[:, None, :] * b[None, :, :], axis=2)


@triton.jit
def _load_relu(x_ptr, rowmask_ptr, ptrs, mask, e, emask, ACC: tl.constexpr):
    """x at ``ptrs`` (in ACC), the MU row mask, and ReLU(x) times the row mask."""
    x_raw = tl.load(x_ptr + ptrs, mask=mask, other=0).to(ACC)
    rowmask = _row_mask(rowmask_ptr, e, emask, ACC)
    return x_raw, rowmask, tl.maximum(x_raw, 0) * rowmask[:, None]


@triton.jit
def _tile_setup(x_ptr, rowmask_ptr, C, E, HEADS, S0, S1, S2, H0, H1, H2, NT1, NT2,
                BLOCK_E: tl.constexpr, HB: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Tile t = program_id(0) of the (H0, H1, H2) tiling of head bh = program_id(1): bh, the
    tile's origin, each lane's offsets in it, the (BLOCK_E, HB) element offsets and mask of its
    block of the input, and :func:`_load_relu` of that block (x, the row mask, ReLU(x) masked).
    """
    t = tl.program_id(0)
    bh = tl.program_id(1)
    t2 = t % NT2
    t1 = (t // NT2) % NT1
    t0 = t // (NT1 * NT2)
    q = tl.arange(0, HB)
    q2 = q % H2
    q1 = (q // H2) % H1
    q0 = q // (H1 * H2)
    qmask = q < H0 * H1 * H2
    o0 = t0 * H0
    o1 = t1 * H1
    o2 = t2 * H2
    v = ((o0 + q0) * S1 + o1 + q1) * S2 + o2 + q2
    nvox = S0 * S1 * S2
    offset = ((bh // HEADS) * C + (bh % HEADS) * E).to(tl.int64) * nvox
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    mask = emask[:, None] & qmask[None, :]
    ptrs = offset + e[:, None] * nvox + v[None, :]
    x_raw, rowmask, x = _load_relu(x_ptr, rowmask_ptr, ptrs, mask, e, emask, ACC)
    return bh, o0, o1, o2, q0, q1, q2, qmask, e, emask, mask, ptrs, x_raw, rowmask, x


@triton.jit
def _tile_window(s, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, o0, o1, o2, q0, q1, q2, S0, S1, S2,
                 P0, P1, P2, NW1, NW2):  # fmt: skip
    """Window of a whole tile under shift s (one index) and each lane's position in it.

    The tile lies inside one rolled window, so position = (rolled origin mod P) + lane offset.
    """
    s0, s1, s2 = _load_shift(s, SHIFTS, NSHIFT)
    r0 = _wrap_above(o0 + s0, S0)
    r1 = _wrap_above(o1 + s1, S1)
    r2 = _wrap_above(o2 + s2, S2)
    w = ((r0 // P0) * NW1 + r1 // P1) * NW2 + r2 // P2
    p = ((r0 % P0 + q0) * P1 + r1 % P1 + q1) * P2 + r2 % P2 + q2
    return w, p
