"""The third design's forward parts pass, neighbours merged (kernels/window_nmf3.py).

A shift that splits axis 2 cuts every window into a low part (b2 = 0) and a high part (b2 = 1)
along it; the high part of window w and the low part of window w + 1 (its neighbour along axis 2)
lie in the same shifted window. Where both windows are in the same ticket (``_merges_next``), the
parts pass adds w's high parts to w + 1's low parts before storing them, and stores them once, in
w + 1's slots; the solve skips w's high slots (``_sum_parts_rows`` with MERGE). With 4 windows a
ticket that is 3 of every 8 part statistics of such a shift neither written nor read. Only the
matrix form of the Gram parts (``DOT``: fp32 accumulation, HALS) merges, and only where a ticket's
windows are always consecutive in one row along axis 2 (``merge_on``: then a window's place in its
ticket says whether it merges); the sums are the same numbers added in another order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._window2_common import _plane_w0, _tri
from ._window2_loop import _load_window
from ._window3_slots import _merges_next, _part_slot
from .window_nmf2 import _rows_dot

__all__: list[str] = []


@triton.jit
def _halves(t, R: tl.constexpr, NPB: tl.constexpr):
    """(low, high) part columns of t (R, NPB): columns 2q and 2q + 1 (b2 = 0 and 1)."""
    return tl.split(tl.reshape(t, (R, NPB // 2, 2)))


@triton.jit
def _store_merged(ptr, stride, slot, rows, row_ok, t, carry, merge, ex_lo, ex_hi,
                  R: tl.constexpr, NPB: tl.constexpr):  # fmt: skip
    """Store the part columns of t (R, NPB) at ptr + (slot + column) * stride + rows: the low
    ones plus ``carry`` (the previous window's high ones, or zeros), the high ones unless
    ``merge`` (then they are returned as the next carry; else zeros)."""
    q = tl.arange(0, NPB // 2)[None, :]
    lo, hi = _halves(t, R, NPB)
    tl.store(ptr + (slot + 2 * q) * stride + rows, lo + carry, mask=row_ok & ex_lo)
    # merge broadcast to the tile first (under the interpreter, & with a 0-d mask is int32)
    keep = (tl.zeros_like(hi).to(tl.int32) + merge.to(tl.int32)) == 0
    tl.store(ptr + (slot + 2 * q + 1) * stride + rows, hi, mask=row_ok & ex_hi & keep)
    return tl.where(merge, hi, 0.0)


@triton.jit
def _parts_window_merged(
    x_base, rowmask, e, emask, w, slot, g_all, member, exists, kpart_ptr, hpart_ptr,
    carry_k, carry_h, merge, E: tl.constexpr, NVOX, S1, S2, NW1, NW2, MW2, W0,
    NSHIFT: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr, BLOCK_E: tl.constexpr,
    ACC: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, NPB: tl.constexpr,
):  # fmt: skip
    """The second design's ``_parts_window`` (DOT, HALS) on window w with the previous window's
    high parts (carry_k (Gram row chunks, RC BLOCK_E, NPB / 2), carry_h (X g0 shift chunks,
    RC BLOCK_E, NPB / 2), the chunks of ``_parts_dot``) added to its low parts; returns this
    window's high parts if ``merge`` (w + 1 takes them), else zeros. MW2, W0: the grid's
    magic numbers (``_window_origin``)."""
    _, _, _, _, _, x = _load_window(x_base, rowmask, e, emask, w, NVOX, S1, S2, NW1, NW2,
                                    P0, P1, P2, BP0, BP1, BP2, ACC, MW2, W0)  # fmt: skip
    ex_lo, ex_hi = _halves(exists.to(tl.int32), 1, NPB)
    RC: tl.constexpr = max(16 // BLOCK_E, 1)
    NG: tl.constexpr = (E + RC - 1) // RC  # products of Gram rows, then of X g0 rows
    ck = tl.arange(0, carry_k.shape[0])[:, None, None]
    ch = tl.arange(0, carry_h.shape[0])[:, None, None]
    q = tl.arange(0, NPB // 2)[None, :]  # columns 2q, 2q + 1: shift q // 4
    new_k = tl.zeros_like(carry_k)
    new_h = tl.zeros_like(carry_h)
    for c in range(0, NG + (NSHIFT + RC - 1) // RC):
        gram = c < NG
        parts, ri, rj = _rows_dot(x, g_all, gram, member, tl.where(gram, c, c - NG) * RC, RC,
                                  BLOCK_E, BP0, BP1, BP2, D0, D1, D2, ACC)  # fmt: skip
        in_k = (ck == c) & gram  # (E < BLOCK_E: carry_k has chunks past the NG Gram products)
        in_h = ch == c - NG
        carry = (tl.sum(tl.where(in_k, carry_k, 0.0), axis=0)
                 + tl.sum(tl.where(in_h, carry_h, 0.0), axis=0))  # fmt: skip
        is_k = (ri * 0 + c) < NG
        ok_k = is_k & (ri < E) & (rj < E) & (rj >= ri)
        ok_h = (is_k == 0) & (ri < NSHIFT) & (rj < E) & (q // 4 == ri)
        hi = _store_merged(kpart_ptr, E * E, slot, _tri(ri, rj, E), ok_k, parts, carry, merge,
                           ex_lo != 0, ex_hi != 0, RC * BLOCK_E, NPB)  # fmt: skip
        _store_merged(hpart_ptr, E, slot, rj, ok_h, parts, carry, merge, ex_lo != 0, ex_hi != 0,
                      RC * BLOCK_E, NPB)  # fmt: skip
        new_k = tl.where(in_k, hi[None, :, :], new_k)
        new_h = tl.where(in_h, hi[None, :, :], new_h)
    return new_k, new_h


@triton.jit
def _no_carry(BLOCK_E: tl.constexpr, NSB: tl.constexpr, NPB: tl.constexpr, ACC: tl.constexpr):
    """Zero carries of :func:`_parts_window_merged`: (Gram row chunks, RC BLOCK_E, NPB / 2) and
    (X g0 shift chunks, RC BLOCK_E, NPB / 2)."""
    RC: tl.constexpr = max(16 // BLOCK_E, 1)
    return (tl.zeros((max(BLOCK_E // RC, 1), RC * BLOCK_E, NPB // 2), dtype=ACC),
            tl.zeros((max(NSB // RC, 1), RC * BLOCK_E, NPB // 2), dtype=ACC))


@triton.jit
def _parts_chunk_merged(
    x_base, rowmask, e, emask, first, plane, bh, g_all, member, exists, kpart_ptr, hpart_ptr,
    NWIN, NPLANE, NPL, E: tl.constexpr, NVOX, S1, S2, NW0, NW1, NW2, MW2,
    NSHIFT: tl.constexpr, WPP: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr,
    P2: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, ACC: tl.constexpr, D0: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, NPB: tl.constexpr, RING: tl.constexpr,
    GROUP: tl.constexpr = 1,
):  # fmt: skip
    """The parts pass of one ticket (the windows of a plane from ``first``), neighbours merged.
    A window's coordinate along axis 0 (``_plane_w0``) is made per window from a select the
    compiler cannot fold (w < NWIN holds), not held through the ticket: held, the fused forward
    spilled 8 B (sm_90a, Triton 3.9, [None, 2, 4, 6])."""
    carry_k, carry_h = _no_carry(BLOCK_E, NSB, NPB, ACC)
    for j in range(0, WPP):
        if first + j < NPLANE:
            w = plane * NPLANE + first + j
            carry_k, carry_h = _parts_window_merged(
                x_base, rowmask, e, emask, w,
                _part_slot(bh, plane, first + j, NWIN, NPLANE, NPL, NSHIFT, RING, GROUP),
                g_all, member, exists, kpart_ptr, hpart_ptr, carry_k, carry_h,
                _merges_next(first + j, WPP), E, NVOX, S1, S2, NW1, NW2, MW2,
                _plane_w0(tl.where(w < NWIN, plane, 0), NW0), NSHIFT,
                P0, P1, P2, BP0, BP1, BP2, BLOCK_E, ACC, D0, D1, D2, NPB)
