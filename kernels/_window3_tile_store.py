"""The part sums of the forward's ticket tile split and stored (kernels/_window3_tile.py).

A product of the tile (``_tile_dot``: rows (channel, window), with ROWS0 axis 0's sub-boxes
around them; columns the parts of ``_part_member``) becomes each shift's part sums: with ROWS0 the
two halves along axis 0 summed within a warp (``_tile_halves``), both joined so that one layout
conversion serves them (``_tile_store``), and with MERGE a window's high parts along axis 2 added
to the next window's low parts (``_prev_row``) and not stored.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import _shift_of

__all__: list[str] = []


@triton.constexpr_function
def _rows0_low(ba0, nc):
    """How many of axis 0's BA0 sub-boxes are the low bits of a ROWS0 product's rows
    (:func:`_tile_sums`): as many as the lanes a column of the (R, NC) product spans in the
    layout Triton gives a dot's result (32 / NC lanes a warp along the rows, then the warps, then
    a thread's registers), so that the rest, the high bits, fall on registers past the warps and
    :func:`_tile_halves` sums within a warp (shuffles), not across warps (shared memory and CTA
    barriers)."""
    return max(1, min(int(ba0), 32 // int(nc)))


@triton.jit
def _tile_halves(t, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, P0: tl.constexpr,
                 BLOCK_E: tl.constexpr, W: tl.constexpr, BP0: tl.constexpr, D0: tl.constexpr,
                 ROWS0: tl.constexpr, NC: tl.constexpr, STACK: tl.constexpr):  # fmt: skip
    """A product t of :func:`_tile_dot` (STACK of them stacked, ``_stack_rows``) as (low, high)
    (BLOCK_E W, NC): with ROWS0 the halves along axis 0 of each column's shift (b0 = 0, 1),
    else the columns hold b0 and high is low."""
    BA0: tl.constexpr = BP0 // D0
    if ROWS0:
        A0L: tl.constexpr = _rows0_low(BA0, NC)
        Q: tl.constexpr = BLOCK_E * W // STACK
        t = tl.reshape(t, (STACK, BA0 // A0L, Q, A0L, NC))
        a0 = (tl.arange(0, BA0 // A0L)[None, :, None, None, None] * A0L
              + tl.arange(0, A0L)[None, None, None, :, None]) * D0  # fmt: skip
        cut = P0 - _shift_of(tl.arange(0, NC)[None, None, None, None, :] // 4, SHIFTS, NSHIFT, 0)
        lo = tl.sum(tl.sum(tl.where(a0 < cut, t, 0), axis=3), axis=1)
        hi = tl.sum(tl.sum(tl.where(a0 >= cut, t, 0), axis=3), axis=1)
        return tl.reshape(lo, (BLOCK_E * W, NC)), tl.reshape(hi, (BLOCK_E * W, NC))
    else:
        return t, t


@triton.jit
def _last_two(fa, pa, va, fb, pb, vb):
    """The combine of :func:`_prev_row`'s scan: a run's (has two, second-to-last, last) values
    from its two halves' (associative: the last two values of a concatenation)."""
    return fa | 1, tl.where(fb != 0, pb, va), vb


@triton.jit
def _prev_row(t, W: tl.constexpr):
    """t's row r - 1 at row r (rows (channel, window): window j - 1's at window j, zeros at
    window 0), as an inclusive scan along the window axis that carries each prefix's last two
    rows. The scan stays in t's layout (the rows lie in one warp: lanes exchange values by
    shuffles); ``tl.gather`` took a layout of its own, and the store two more layout conversions
    through shared memory, two CTA barriers each (sm_90a, four tiles, a ticket's forward: Triton
    3.6 fp32 125 -> 101 barriers with [None, 4], 196 -> 148 with [None, 2, 4, 6]; Triton 3.9
    spilled 72 B with the BraTS shifts, now nothing)."""
    t3 = tl.reshape(t, (t.shape[0] // W, W, t.shape[1]))
    flag = tl.zeros(t3.shape, dtype=tl.int32)
    _, prev, _ = tl.associative_scan((flag, tl.zeros(t3.shape, dtype=t.dtype), t3), 1,
                                     _last_two)  # fmt: skip
    return tl.reshape(prev, t.shape)


@triton.jit
def _tile_store(v0, v1, ptr, stride, row, row_ok, slot, j, KSEL, SHIFTS: tl.constexpr,
                NSHIFT: tl.constexpr, W: tl.constexpr, NC: tl.constexpr, NB: tl.constexpr,
                MERGE: tl.constexpr, ROWS0: tl.constexpr):  # fmt: skip
    """Store the part sums v0 (R, NC) (columns of ``_part_member``) and with ROWS0 v1, the high
    halves along axis 0 (b = the column's + 4): joined first, so that one conversion into the
    stores' layout serves both (one through shared memory is 2 CTA barriers; split by b0 first,
    Triton converted each half on its own: 12 more barriers a ticket forward, 16
    backward, [None, 2, 4, 6], sm_90a, Triton 3.6)."""
    if ROWS0:
        u = tl.reshape(tl.join(v0, v1), (v0.shape[0], NC // 2, 2, 2))  # (row, column pair, b2, b0)
        lo, hi = tl.split(tl.permute(u, (0, 1, 3, 2)))  # b2 = 0, 1, each (row, pair, b0)
        lo0, lo1 = tl.split(lo)
        hi0, hi1 = tl.split(hi)
        _tile_store_cols(lo0, hi0, 0, ptr, stride, row, row_ok, slot, j, KSEL, SHIFTS, NSHIFT, W,
                         NC, NB, MERGE)  # fmt: skip
        _tile_store_cols(lo1, hi1, 4, ptr, stride, row, row_ok, slot, j, KSEL, SHIFTS, NSHIFT, W,
                         NC, NB, MERGE)  # fmt: skip
    else:
        lo, hi = tl.split(tl.reshape(v0, (v0.shape[0], NC // 2, 2)))  # b2 = 0, 1
        _tile_store_cols(lo, hi, 0, ptr, stride, row, row_ok, slot, j, KSEL, SHIFTS, NSHIFT, W,
                         NC, NB, MERGE)  # fmt: skip


@triton.jit
def _tile_store_cols(lo, hi, B0: tl.constexpr, ptr, stride, row, row_ok, slot, j, KSEL,
                     SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, W: tl.constexpr,
                     NC: tl.constexpr, NB: tl.constexpr, MERGE: tl.constexpr):  # fmt: skip
    """Store the part sums lo, hi (R, NC / 2) (the even and odd columns of ``_part_member``, b2 =
    0 and 1; plus B0: 4 for the high halves along axis 0 of ROWS0) at ptr + (slot + k * 8 + b) *
    stride + row, the parts that exist, of shift KSEL only if KSEL >= 0. With MERGE a high part
    along axis 2 (b2 = 1) of window j (the row's window) is added to the low part of window j + 1
    (the row below) unless j is the last."""
    c = 2 * tl.arange(0, NC // 2)[None, :]
    k = c // NB
    b = c % NB + B0
    s0 = _shift_of(k, SHIFTS, NSHIFT, 0)
    s1 = _shift_of(k, SHIFTS, NSHIFT, 1)
    s2 = _shift_of(k, SHIFTS, NSHIFT, 2)
    ok = row_ok & (k < NSHIFT) & ((b < 4) | (s0 > 0)) & ((b % 4 < 2) | (s1 > 0))
    ok = ok & ((k == KSEL) | (KSEL < 0))
    keep_hi = ok & (s2 > 0)
    if MERGE:
        prev = _prev_row(hi, W)  # row r - 1's: window j - 1's, same channel
        lo = lo + tl.where((j >= 1) & (s2 > 0), prev, 0)
        keep_hi = keep_hi & (j == W - 1)
    tl.store(ptr + (slot + k * 8 + b) * stride + row, lo, mask=ok)
    tl.store(ptr + (slot + k * 8 + b + 1) * stride + row, hi, mask=keep_hi)


@triton.jit
def _tile_parts_write(t, ptr, stride, row, row_ok, slot, j, KSEL, SHIFTS: tl.constexpr,
                      NSHIFT: tl.constexpr, P0: tl.constexpr, BLOCK_E: tl.constexpr,
                      W: tl.constexpr, BP0: tl.constexpr, D0: tl.constexpr, ROWS0: tl.constexpr,
                      NC: tl.constexpr, MERGE: tl.constexpr, STACK: tl.constexpr):  # fmt: skip
    """A product's part sums (:func:`_tile_dot`; STACK of them stacked) stored
    (``_tile_store``)."""
    lo, hi = _tile_halves(t, SHIFTS, NSHIFT, P0, BLOCK_E, W, BP0, D0, ROWS0, NC, STACK)
    NB: tl.constexpr = 4 if ROWS0 else 8
    _tile_store(lo, hi, ptr, stride, row, row_ok, slot, j, KSEL, SHIFTS, NSHIFT, W, NC, NB, MERGE,
                ROWS0)  # fmt: skip
