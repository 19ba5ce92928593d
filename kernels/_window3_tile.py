"""The third design's forward parts pass on a whole ticket at once (kernels/window_nmf3.py).

The per-window parts pass (``_parts_window``, ``_parts_window_merged``) holds one window
(E, 8, 8, 8) over 16 warps: 8 values a thread, the channel axis over 4 warps, so each Gram row it
takes out of x is a reduction across warps and each product's sub-box sums cross lanes and warps
(``bench/results/static_designs/instructions.md``: 1333-2252 warp instructions a window). Here
the tile is the ticket's WPP windows, (BLOCK_E, WPP, BP0, BP1, BP2), in two halves of the
channels: with 4 windows of 8^3 voxels a thread holds all the channels of a half for 4 voxels
along axis 2 (Triton's blocked layout puts the warps on the windows and coarse bits of the axes,
never inside a sub-box of [None, 4]: ``_tile_axes``), so the
Gram's channel pairs are choices of registers (``_gram_unit``: 2H + 1 products of H channel pairs
each hold the upper triangle, none twice), a sub-box's sum along axis 2 is in the thread, and the
products' sub-box sums meet the part matrix ``member`` in one ``tl.dot`` per product (the
cross-warp sums go through the dot's shared-memory operand). With 2-voxel sub-boxes along axes 0
and 2 ([None, 2, 4, 6]) a thread holds a run of 2 voxels along axis 2 and its axis-0 pair too
(``_pair_axes``), so a sub-box's sums along those two axes are in the thread.

Sub-boxes (``tile_plan``): the coarsest that every shift's cuts allow; where there are more than
16, the dot contracts the sub-boxes of axes 1 and 2 (16 of them) and the axis-0 sub-boxes stay
rows of the product, summed after it into the two halves of every shift along axis 0 (``ROWS0``),
so ``member`` stays (16, 4 * NSB) (its dot operand is 16 registers a thread; the whole sub-box
matrix, 64 for [None, 2, 4, 6], spilled). Those rows lie where that sum needs no other warp
(``_rows0_low``): ordered (channel, window, sub-box) they spanned two warps, and the sums cost
36 of a ticket's 148 CTA barriers forward, 48 of 163 backward (sm_90a, Triton 3.6, fp32,
[None, 2, 4, 6]). With MERGE (kernels/_window3_parts.py, ``merge_on``),
window j's high parts along axis 2 are added to window j + 1's low parts, taken from the row
above by a scan along the window axis (``_prev_row``), and not stored (the stores:
kernels/_window3_tile_store.py). g0 under each shift is
read once a ticket (from L1 / L2; held in registers through the ticket loop it spilled): the
static suite's byte count takes the forward's g0 as read once a program (``traffic.PER_PROGRAM``,
the per-window pass's way), so with the tile on it counts a little less than is asked (about
0.01x of the ideal at 2 x 32 x 128^3, measured with g0 counted per ticket).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from ._common import TRITON_VERSION, _shift_of
from ._window2_common import _part_member, _part_member_by, _tri, _window_origin
from ._window3_sched import _TILE, TUNING, xg0_joined
from ._window3_slots import _part_slot
from ._window3_tile_store import _rows0_low, _tile_parts_write

__all__ = ["tile_geometry", "tile_plan", "tile_subboxes"]

# Whether the tile's X g0 comes after its Gram (XG0F false) without axis 0's sub-boxes as rows
# (no ROWS0: [None, 4]); with ROWS0 ([None, 2, 4, 6]) it always comes first. The order each
# compiler allocates without spilling (sm_90a, 16 warps, fp32 and bf16,
# bench/results/static_designs/tiles.md): X g0 first, Triton 3.9 spilled 16 B with [None, 4]
# (two values of the prologue); last, 112 B with [None, 2, 4, 6] and Triton 3.6 8 B with
# [None, 4]; 1-2 % apart in instructions either way
_XG0_LAST_FLAT = TRITON_VERSION >= (3, 7)


@triton.jit
def _tile_axes(C: tl.constexpr, W: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr,
               NRUN: tl.constexpr, V: tl.constexpr, EAX: tl.constexpr):  # fmt: skip
    """Broadcastable 6-d indices of a tile's loads: channel, window, axis 0, axis 1, run (its
    first voxel along axis 2) and voxel in the run, or with EAX != 0 (Triton 3.6, whose load
    layout gives lanes to the tied axes first to last) axis 0, axis 1, window, run, channel,
    voxel, in the order :func:`_ch_first` undoes. There the lanes go to axis 0 and the low bits
    of axis 1, the warps to axis 1's high bit, the windows and the runs: with sub-boxes of up to
    2 x 4 along axes 0 and 1 ([None, 4]: 2 x 4 x 4) a sub-box's sums stay in a warp. Axes
    (window, axis 0, axis 1, ...) put the warps on axis 1's low bits, and those sums crossed
    warps (sm_90a, Triton 3.6, fp32 [None, 4], a ticket's forward: 2,634 -> 2,350 instructions,
    101 -> 80 CTA barriers)."""
    g = tl.arange(0, V)[None, None, None, None, None, :]
    if EAX != 0:
        c = tl.arange(0, C)[None, None, None, None, :, None]
        q0 = tl.arange(0, BP0)[:, None, None, None, None, None]
        q1 = tl.arange(0, BP1)[None, :, None, None, None, None]
        j = tl.arange(0, W)[None, None, :, None, None, None]
        r = (tl.arange(0, NRUN) * V)[None, None, None, :, None, None]
    else:
        c = tl.arange(0, C)[:, None, None, None, None, None]
        j = tl.arange(0, W)[None, :, None, None, None, None]
        q0 = tl.arange(0, BP0)[None, None, :, None, None, None]
        q1 = tl.arange(0, BP1)[None, None, None, :, None, None]
        r = (tl.arange(0, NRUN) * V)[None, None, None, None, :, None]
    return c, j, q0, q1, r, g


@triton.jit
def _ch_first(t, EAX: tl.constexpr):
    """A tile loaded as (channel, window, axis 0, axis 1, runs, voxel), or with EAX != 0 as
    (axis 0, axis 1, window, runs, channel, voxel), as (channel, window, axis 0, axis 1, runs,
    voxel)."""
    if EAX != 0:
        return tl.permute(t, (4, 2, 0, 1, 3, 5))  # relabels the layout's axes: no data moves
    else:
        return t


@triton.jit
def _pair_axes(C: tl.constexpr, W: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr,
               NRUN: tl.constexpr, V: tl.constexpr, EAX: tl.constexpr):  # fmt: skip
    """7-d indices as :func:`_tile_axes`'s with axis 0 as (pair, its voxel a): channel, a,
    window, pair, axis 1, run, voxel (EAX != 0: window, pair, axis 1, run, channel, a, voxel), so
    that a thread holds both voxels of an axis-0 pair as it holds the channels."""
    g = tl.arange(0, V)[None, None, None, None, None, None, :]
    if EAX != 0:
        j = tl.arange(0, W)[:, None, None, None, None, None, None]
        b0 = tl.arange(0, BP0 // 2)[None, :, None, None, None, None, None]
        q1 = tl.arange(0, BP1)[None, None, :, None, None, None, None]
        r = (tl.arange(0, NRUN) * V)[None, None, None, :, None, None, None]
        c = tl.arange(0, C)[None, None, None, None, :, None, None]
        a = tl.arange(0, 2)[None, None, None, None, None, :, None]
    else:
        c = tl.arange(0, C)[:, None, None, None, None, None, None]
        a = tl.arange(0, 2)[None, :, None, None, None, None, None]
        j = tl.arange(0, W)[None, None, :, None, None, None, None]
        b0 = tl.arange(0, BP0 // 2)[None, None, None, :, None, None, None]
        q1 = tl.arange(0, BP1)[None, None, None, None, :, None, None]
        r = (tl.arange(0, NRUN) * V)[None, None, None, None, None, :, None]
    return c, j, 2 * b0 + a, q1, r, g


@triton.jit
def _pair_tile(t, EAX: tl.constexpr):
    """A tile loaded on :func:`_pair_axes` as (channel, window, axis 0, axis 1, axis 2)."""
    if EAX != 0:
        t = tl.permute(t, (4, 0, 1, 5, 2, 3, 6))
    else:
        t = tl.permute(t, (0, 2, 3, 1, 4, 5, 6))
    return tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2] * t.shape[3], t.shape[4],
                          t.shape[5] * t.shape[6]))


@triton.jit
def _as_tile(t, C: tl.constexpr, W: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr,
             BP2: tl.constexpr, EAX: tl.constexpr, PAIR: tl.constexpr):  # fmt: skip
    """A tile loaded on :func:`_tile_axes` (or :func:`_pair_axes` with PAIR) as (C, W, BP0, BP1,
    BP2)."""
    if PAIR:
        return _pair_tile(t, EAX)
    else:
        return tl.reshape(_ch_first(t, EAX), (C, W, BP0, BP1, BP2))


@triton.jit
def _tile_sums(z, BLOCK_E: tl.constexpr, W: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr,
               BP2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
               BA0R: tl.constexpr, A0L: tl.constexpr):  # fmt: skip
    """z (BLOCK_E, W, BP0, BP1, BP2) summed over sub-boxes of D0 x D1 x D2 voxels, as the rows
    and columns (the other sub-boxes) of a product: rows (channel, window), or with BA0R > 1
    axis 0's sub-boxes a0 = a0h A0L + a0l as rows too, (a0h, channel, window, a0l)
    (:func:`_rows0_low`)."""
    BA0: tl.constexpr = BP0 // D0
    BA1: tl.constexpr = BP1 // D1
    BA2: tl.constexpr = BP2 // D2
    z = tl.reshape(z, (BLOCK_E, W, BA0, D0, BA1, D1, BA2, D2))
    z = tl.sum(tl.sum(tl.sum(z, axis=7), axis=5), axis=3)
    if BA0R > 1:
        z = tl.reshape(z, (BLOCK_E, W, BA0R // A0L, A0L, BA1 * BA2))
        z = tl.permute(z, (2, 0, 1, 3, 4))
    return tl.reshape(z, (BLOCK_E * W * BA0R, (BA0 // BA0R) * BA1 * BA2))


@triton.jit
def _tile_dot(z, member, BLOCK_E: tl.constexpr, W: tl.constexpr, BP0: tl.constexpr,
              BP1: tl.constexpr, BP2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
              D2: tl.constexpr, ROWS0: tl.constexpr):  # fmt: skip
    """The sub-box sums of the per-voxel products z (BLOCK_E, W, BP0, BP1, BP2) times the part
    matrix: rows (channel, window; with ROWS0 the axis-0 sub-boxes around them, ``_tile_sums``),
    columns of ``_part_member``."""
    BA0R: tl.constexpr = BP0 // D0 if ROWS0 else 1
    A0L: tl.constexpr = _rows0_low(BA0R, member.shape[1])
    return tl.dot(_tile_sums(z, BLOCK_E, W, BP0, BP1, BP2, D0, D1, D2, BA0R, A0L), member,
                  input_precision="ieee")  # fmt: skip


@triton.jit
def _tile_dot2(za, zb, member, H: tl.constexpr, W: tl.constexpr, BP0: tl.constexpr,
               BP1: tl.constexpr, BP2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
               D2: tl.constexpr, ROWS0: tl.constexpr):  # fmt: skip
    """The products of za and zb (H channels each) stacked (``_stack_rows``: za's rows, then
    zb's). Without ROWS0 as one ``tl.dot`` of both (their channels joined first: 7 % fewer
    instructions in the tile with [None, 4], one operand staged, not two); with ROWS0, whose
    products have BP0 / D0 times the rows, as two (one spilled 172-240 B: sm_90a, 16 warps)."""
    if ROWS0:
        return _stack_rows(_tile_dot(za, member, H, W, BP0, BP1, BP2, D0, D1, D2, ROWS0),
                           _tile_dot(zb, member, H, W, BP0, BP1, BP2, D0, D1, D2, ROWS0))
    else:
        return _tile_dot(_ch_merge(za, zb, _log2(H)), member, 2 * H, W, BP0, BP1, BP2, D0, D1,
                         D2, ROWS0)  # fmt: skip


@triton.jit
def _shift_columns(t, k, NB: tl.constexpr):
    """A product t of :func:`_tile_dot` with only shift k's columns (column c is shift c // NB's),
    the others 0: summed over the shifts (each shift's product of its own x g0), every column is
    exactly its shift's (the other terms are exact zeros), and one split and one store serve all
    shifts instead of one each."""
    return tl.where(tl.arange(0, t.shape[1])[None, :] // NB == k, t, 0.0)


@triton.jit
def _stack_rows(a, b):
    """Products a and b (R, NC) as one (2R, NC): a's rows, then b's."""
    return tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), (2 * a.shape[0], a.shape[1]))


@triton.constexpr_function
def _log2(n):
    """log2 of a power of two n (a constexpr)."""
    return int(n).bit_length() - 1


@triton.constexpr_function
def _pow2(b):
    """2 ** b (a constexpr)."""
    return 1 << int(b)


@triton.jit
def _ch_split(t, b: tl.constexpr):
    """A tile t (H, W, BP0, BP1, BP2), its channels in the thread, as (its channels whose bit b is
    0, those whose bit b is 1), each (H / 2, W, BP0, BP1, BP2) in order: registers renamed."""
    H: tl.constexpr = t.shape[0]
    u = tl.reshape(t, (H // _pow2(b + 1), 2, _pow2(b), t.shape[1], t.shape[2], t.shape[3],
                       t.shape[4]))  # fmt: skip
    lo, hi = tl.split(tl.permute(u, (0, 2, 3, 4, 5, 6, 1)))
    shape: tl.constexpr = (H // 2, t.shape[1], t.shape[2], t.shape[3], t.shape[4])
    return tl.reshape(lo, shape), tl.reshape(hi, shape)


@triton.jit
def _ch_merge(lo, hi, b: tl.constexpr):
    """The inverse of :func:`_ch_split`: lo's channels where bit b is 0, hi's where it is 1."""
    H: tl.constexpr = 2 * lo.shape[0]
    shape: tl.constexpr = (H // _pow2(b + 1), _pow2(b), lo.shape[1], lo.shape[2], lo.shape[3],
                           lo.shape[4])  # fmt: skip
    u = tl.join(tl.reshape(lo, shape), tl.reshape(hi, shape))
    u = tl.permute(u, (0, 6, 1, 2, 3, 4, 5))
    return tl.reshape(u, (H, lo.shape[1], lo.shape[2], lo.shape[3], lo.shape[4]))


@triton.jit
def _ch_xor(t, m: tl.constexpr):
    """t with channel c holding t's channel c ^ m."""
    for b in tl.static_range(_log2(t.shape[0])):
        if (m >> b) % 2 == 1:
            lo, hi = _ch_split(t, b)
            t = _ch_merge(hi, lo, b)
    return t


@triton.jit
def _gram_unit(xa, xb, d: tl.constexpr):
    """Factors (F, G) of Gram unit d (1 <= d < 2H) of the channels x = (xa, xb), each (H, W, BP0,
    BP1, BP2): F * G holds, for every unordered pair {c, c ^ d} of x's 2H channels, one product
    x_c x_(c ^ d) (:func:`_unit_channels`). Unit d = 0 is x's squares, (xa, xa) and (xb, xb):
    2H + 1 units of H products hold the 2H (2H + 1) / 2 of the Gram's upper triangle, none twice."""
    H: tl.constexpr = xa.shape[0]
    if d >= H:  # pairs across the halves: xa's channel c with xb's c ^ (d - H)
        return xa, _ch_xor(xb, d - H)
    else:  # pairs within each half, c below c ^ d: bit hb of d's highest set bit 0 in c
        hb: tl.constexpr = _log2(d)
        al, ah = _ch_split(xa, hb)
        bl, bh = _ch_split(xb, hb)
        top: tl.constexpr = _log2(H) - 1
        return _ch_merge(al, bl, top), _ch_xor(_ch_merge(ah, bh, top), d - _pow2(hb))


@triton.jit
def _unit_channels(s, d: tl.constexpr, H: tl.constexpr):
    """The channels (c, c') of x (c < c') whose product is slot s of Gram unit d (>= 1) of
    :func:`_gram_unit`."""
    if d >= H:
        return s, H + (s ^ (d - H))
    else:
        hb: tl.constexpr = _log2(d)
        half = s // (H // 2)
        i = s % (H // 2)
        c = half * H + (i >> hb) * _pow2(hb + 1) + i % _pow2(hb)
        return c, c ^ d


@triton.jit
def _tile_parts_store(z, member, ptr, stride, row, row_ok, slot, j, KSEL,
                      SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, P0: tl.constexpr,
                      BLOCK_E: tl.constexpr, W: tl.constexpr, BP0: tl.constexpr,
                      BP1: tl.constexpr, BP2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                      D2: tl.constexpr, ROWS0: tl.constexpr, NC: tl.constexpr,
                      MERGE: tl.constexpr):  # fmt: skip
    """One product's part sums computed (:func:`_tile_dot`) and stored."""
    t = _tile_dot(z, member, BLOCK_E, W, BP0, BP1, BP2, D0, D1, D2, ROWS0)
    _tile_parts_write(t, ptr, stride, row, row_ok, slot, j, KSEL, SHIFTS, NSHIFT, P0, BLOCK_E, W,
                      BP0, D0, ROWS0, NC, MERGE, 1)  # fmt: skip


@triton.jit
def _parts_tile(
    x_base, g0_ptr, first, plane, bh, kpart_ptr, hpart_ptr, NWIN, NPLANE, NPL,
    E: tl.constexpr, NVOX, S1, S2, NW1, NW2, MW2, W0, SHIFTS: tl.constexpr,
    NSHIFT: tl.constexpr,
    W: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, BP0: tl.constexpr,
    BP1: tl.constexpr, BP2: tl.constexpr, BLOCK_E: tl.constexpr, NSB: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, ROWS0: tl.constexpr,
    RING: tl.constexpr, MERGE: tl.constexpr, EAX: tl.constexpr, XG0F: tl.constexpr,
    XG0J: tl.constexpr, GROUP: tl.constexpr = 1,
):  # fmt: skip
    """The parts pass of one ticket (windows first .. first + W - 1 of a plane) as one tile:
    every shift's part sums of X X^T (upper triangle) and X g0 (g0 under shift k read at the
    rolled positions), stored at the part slots of ``_part_slot``. The channels in two halves
    (H = BLOCK_E / 2 each): a product's rows are half as many (the dot's operand 32 registers a
    thread, not 64). The Gram in 2H + 1 units of H channel pairs (``_gram_unit``; as Gram rows
    it took 3H products, at E = 8 a quarter of their values below the diagonal, thrown away).
    Products are split, merged and stored two at a time (two Gram units, X g0's two halves:
    ``_tile_dot2``), which halves the stores' share of the instructions."""
    H: tl.constexpr = max(BLOCK_E // 2, 1)
    # 6-d indices (.., BP2 / V, V): x's runs along axis 2 are V long, so a thread holds V voxels
    # along axis 2 (16 bytes in fp32, 8 in bf16) and the layout's warps never go to the channels,
    # whatever the dtype (5-d, bf16 runs of 8 would put them there; which axes they take:
    # ``_tile_axes``).
    # The channel axis where Triton's load layout gives it lanes last (EAX, ``_E_AXIS`` of
    # kernels/_window3_bwd_tile.py: ties in contiguity go to the last axis first in Triton 3.9, to
    # the first in 3.6): first in 3.9, fifth in 3.6, so that a thread holds all the channels of its
    # voxels (3.6 with the channels first put them across lanes: sm_90a, fp32, the tile issued
    # 741 / 1578 instructions a window for [None, 4] / [None, 2, 4, 6], 549 / 1295 this way)
    # With PAIR (ROWS0 and 2-voxel sub-boxes along axes 0 and 2: [None, 2, 4, 6]) a thread holds
    # a sub-box's axis-0 pair too (``_pair_axes``) in runs of 2 along axis 2 (8 bytes in fp32),
    # so two of a sub-box's three sums are in the thread (about 12 % fewer instructions)
    PAIR: tl.constexpr = ROWS0 and D0 == 2 and D2 % 2 == 0
    V: tl.constexpr = 2 if PAIR else (4 if BP2 % 4 == 0 else BP2)
    if PAIR:
        c6, j5, q0, q1, r2, g6 = _pair_axes(H, W, BP0, BP1, BP2 // V, V, EAX)
    else:
        c6, j5, q0, q1, r2, g6 = _tile_axes(H, W, BP0, BP1, BP2 // V, V, EAX)
    q2 = r2 + g6
    inside = (q0 < P0) & (q1 < P1) & (q2 < P2)
    w0, w1, w2 = _window_origin(plane * NPLANE + first + j5, NW1, NW2, MW2, W0)
    voxel = ((w0 * P0 + q0) * S1 + w1 * P1 + q1) * S2 + w2 * P2 + q2
    ok = inside & (first + j5 < NPLANE)
    xa = tl.load(x_base + c6 * NVOX + voxel, mask=ok & (c6 < E), other=0)
    xa = tl.maximum(_as_tile(xa, H, W, BP0, BP1, BP2, EAX, PAIR).to(tl.float32), 0)
    xb = tl.load(x_base + (c6 + H) * NVOX + voxel, mask=ok & (c6 + H < E), other=0)
    xb = tl.maximum(_as_tile(xb, H, W, BP0, BP1, BP2, EAX, PAIR).to(tl.float32), 0)
    BA0K: tl.constexpr = 1 if ROWS0 else BP0 // D0
    NB: tl.constexpr = 4 if ROWS0 else 8
    NC: tl.constexpr = NB * NSB
    # built per ticket: a member kept from the kernel's start would hold 16 registers a thread
    # through the solve and output passes too (plane >= 0 always; the compiler cannot know)
    live = (plane >= 0).to(tl.int32)
    member = _part_member(SHIFTS, NSHIFT, P0, P1, P2, BA0K, BP1 // D1, BP2 // D2, D0, D1, D2, NC,
                          NB, tl.float32, live != 0)  # fmt: skip
    JOIN: tl.constexpr = XG0J and (NSHIFT == 2 or NSHIFT == 4)
    if JOIN:  # X g0's part matrix: every shift's side by side (``_tile_xg0_joined``)
        mg = _part_member_by(SHIFTS, NSHIFT, P0, P1, P2, BA0K, BP1 // D1, BP2 // D2, D0, D1, D2, NC,
                             NB, tl.float32, live != 0, NSHIFT)  # fmt: skip
    else:
        mg = member
    rs = tl.arange(0, 2 * H * W)[:, None]  # the rows of two products stacked (_stack_rows)
    e2 = rs // W  # the channel of a row of (xa, xb)'s products stacked
    j2 = rs % W
    slot2 = _part_slot(bh, plane, first + j2, NWIN, NPLANE, NPL, NSHIFT, RING, GROUP)
    ok2 = (first + j2 < NPLANE) & (e2 < E)
    if XG0F:  # X g0 first (``tile_plan``)
        _tile_xg0(xa, xb, g0_ptr, mg, hpart_ptr, e2, ok2, slot2, j2, q0, q1, q2, j5, inside,
                  E, SHIFTS, NSHIFT, P0, P1, P2, H, W, BP0, BP1, BP2, D0, D1, D2, ROWS0, NC, NB,
                  MERGE, EAX, PAIR, JOIN)  # fmt: skip
    # The Gram's upper triangle in 2H + 1 units of H products (``_gram_unit``), two stored at
    # once: the squares, then units d = 1 .. 2H - 1 (the last stacked on itself)
    okw = first + j2 < NPLANE
    t2 = _tile_dot2(xa * xa, xb * xb, member, H, W, BP0, BP1, BP2, D0, D1, D2, ROWS0)
    _tile_parts_write(t2, kpart_ptr, E * E, _tri(e2, e2, E), ok2, slot2, j2, -1, SHIFTS, NSHIFT,
                      P0, 2 * H, W, BP0, D0, ROWS0, NC, MERGE, 2)  # fmt: skip
    for d in tl.static_range(1, 2 * H - 1, 2):
        fa, ga = _gram_unit(xa, xb, d)
        fb, gb = _gram_unit(xa, xb, d + 1)
        t2 = _tile_dot2(fa * ga, fb * gb, member, H, W, BP0, BP1, BP2, D0, D1, D2, ROWS0)
        ca, da = _unit_channels(e2 % H, d, H)
        cb, db = _unit_channels(e2 % H, d + 1, H)
        c, c2 = tl.where(e2 < H, ca, cb), tl.where(e2 < H, da, db)
        _tile_parts_write(t2, kpart_ptr, E * E, _tri(c, c2, E), okw & (c2 < E), slot2, j2, -1,
                          SHIFTS, NSHIFT, P0, 2 * H, W, BP0, D0, ROWS0, NC, MERGE, 2)  # fmt: skip
    f, g = _gram_unit(xa, xb, 2 * H - 1)
    t = _tile_dot(f * g, member, H, W, BP0, BP1, BP2, D0, D1, D2, ROWS0)
    c, c2 = _unit_channels(e2 % H, 2 * H - 1, H)  # stacked on itself, the copy's rows masked
    _tile_parts_write(_stack_rows(t, t), kpart_ptr, E * E, _tri(c, c2, E),
                      okw & (e2 < H) & (c2 < E), slot2, j2, -1, SHIFTS, NSHIFT, P0, 2 * H, W,
                      BP0, D0, ROWS0, NC, MERGE, 2)  # fmt: skip
    if not XG0F:
        _tile_xg0(xa, xb, g0_ptr, mg, hpart_ptr, e2, ok2, slot2, j2, q0, q1, q2, j5, inside,
                  E, SHIFTS, NSHIFT, P0, P1, P2, H, W, BP0, BP1, BP2, D0, D1, D2, ROWS0, NC, NB,
                  MERGE, EAX, PAIR, JOIN)  # fmt: skip


@triton.jit
def _tile_xg0(xa, xb, g0_ptr, member, hpart_ptr, e2, ok2, slot2, j2, q0, q1, q2, j5, inside,
              E: tl.constexpr, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, P0: tl.constexpr,
              P1: tl.constexpr, P2: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
              BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr, D0: tl.constexpr,
              D1: tl.constexpr, D2: tl.constexpr, ROWS0: tl.constexpr, NC: tl.constexpr,
              NB: tl.constexpr, MERGE: tl.constexpr, EAX: tl.constexpr, PAIR: tl.constexpr,
              JOIN: tl.constexpr):  # fmt: skip
    """X g0 of a ticket's tile under every shift (g0 under shift k read at the rolled positions),
    both channel halves' rows in one product (``_tile_dot2``), stored once, not once a shift:
    with JOIN one product for all the shifts (``_tile_xg0_joined``; member then
    ``_part_member_by``'s), else each shift's product summed into one of every shift's columns
    (``_shift_columns``)."""
    if JOIN:
        acc = _tile_xg0_joined(xa, xb, g0_ptr, member, q0, q1, q2, j5, inside, SHIFTS, NSHIFT, P0,
                               P1, P2, H, W, BP0, BP1, BP2, D0, D1, D2, ROWS0, NC, EAX, PAIR)
    else:
        BA0R: tl.constexpr = BP0 // D0 if ROWS0 else 1  # the product's rows: (H, W, BA0R)
        acc = tl.zeros((2 * H * W * BA0R, NC), tl.float32)  # both halves' rows (``_tile_dot2``)
        # a loop: g0's addresses made per shift; not software-pipelined (pipelined, the first
        # loads' addresses were computed before the ticket loop and spilled, 32-40 B)
        for k in tl.range(0, NSHIFT, num_stages=1):
            g = _xg0_g(g0_ptr, k, q0, q1, q2, j5, inside, SHIFTS, NSHIFT, P0, P1, P2, W, BP0, BP1,
                       BP2, EAX, PAIR)  # fmt: skip
            acc += _shift_columns(_tile_dot2(xa * g, xb * g, member, H, W, BP0, BP1, BP2, D0, D1,
                                             D2, ROWS0), k, NB)  # fmt: skip
    _tile_parts_write(acc, hpart_ptr, E, e2, ok2, slot2, j2, -1, SHIFTS, NSHIFT, P0, 2 * H, W,
                      BP0, D0, ROWS0, NC, MERGE, 2)  # fmt: skip


@triton.jit
def _xg0_g(g0_ptr, k, q0, q1, q2, j5, inside, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr,
           P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, W: tl.constexpr,
           BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr, EAX: tl.constexpr,
           PAIR: tl.constexpr):  # fmt: skip
    """g0 under shift k at the tile's voxels (where each lies under k), (1, W, BP0, BP1, BP2)."""
    p0 = q0 + _shift_of(k, SHIFTS, NSHIFT, 0)
    p1 = q1 + _shift_of(k, SHIFTS, NSHIFT, 1)
    p2 = q2 + _shift_of(k, SHIFTS, NSHIFT, 2)
    rolled = (tl.where(p0 >= P0, p0 - P0, p0) * P1 + tl.where(p1 >= P1, p1 - P1, p1)) * P2
    rolled += tl.where(p2 >= P2, p2 - P2, p2) + j5 * 0
    g = tl.load(g0_ptr + rolled, mask=inside & (j5 >= 0), other=0)
    return _as_tile(g, 1, W, BP0, BP1, BP2, EAX, PAIR).to(tl.float32)


@triton.jit
def _xg0_rows(xa, xb, g, H: tl.constexpr, W: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr,
              BP2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
              ROWS0: tl.constexpr, NC: tl.constexpr):  # fmt: skip
    """The sub-box sums of x g under one shift as a product's rows (:func:`_tile_dot2`'s): with
    ROWS0 xa's and xb's, else both halves' channels in one (returned twice)."""
    if ROWS0:
        BA0R: tl.constexpr = BP0 // D0
        A0L: tl.constexpr = _rows0_low(BA0R, NC)
        return (_tile_sums(xa * g, H, W, BP0, BP1, BP2, D0, D1, D2, BA0R, A0L),
                _tile_sums(xb * g, H, W, BP0, BP1, BP2, D0, D1, D2, BA0R, A0L))
    else:
        s = _tile_sums(_ch_merge(xa * g, xb * g, _log2(H)), 2 * H, W, BP0, BP1, BP2, D0, D1, D2,
                       1, 1)  # fmt: skip
        return s, s


@triton.jit
def _join_k(a0, a1):
    """Two (R, K) operands as one (R, 2 K): column 2 n + s is a_s's column n."""
    return tl.reshape(tl.join(a0, a1), (a0.shape[0], 2 * a0.shape[1]))


@triton.jit
def _join_k4(a0, a1, a2, a3):
    """Four (R, K) operands as one (R, 4 K): column 4 n + s is a_s's column n (joined as
    (a0, a2) with (a1, a3): column 4 n + 2 i + j is a_(2 i + j)'s n), the rows of
    ``_part_member_by``'s part matrix of 4 shifts."""
    return _join_k(_join_k(a0, a2), _join_k(a1, a3))


@triton.jit
def _tile_xg0_joined(xa, xb, g0_ptr, member, q0, q1, q2, j5, inside, SHIFTS: tl.constexpr,
                     NSHIFT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                     H: tl.constexpr, W: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr,
                     BP2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                     ROWS0: tl.constexpr, NC: tl.constexpr, EAX: tl.constexpr,
                     PAIR: tl.constexpr):  # fmt: skip
    """X g0's part sums under 2 or 4 shifts as one product (two with ROWS0, one a channel half):
    the shifts' sub-box sums side by side along the contraction (column n NSHIFT + s: sub-box n
    under shift s), against member = ``_part_member_by``'s (row n NSHIFT + s: sub-box n, shift
    s's columns only). One operand staged for the dot, not one a shift: the terms a shift's
    column takes from the other shifts' rows are exact zeros."""
    a0, b0 = _xg0_rows(xa, xb, _xg0_g(g0_ptr, 0, q0, q1, q2, j5, inside, SHIFTS, NSHIFT, P0, P1,
                                      P2, W, BP0, BP1, BP2, EAX, PAIR),
                       H, W, BP0, BP1, BP2, D0, D1, D2, ROWS0, NC)  # fmt: skip
    a1, b1 = _xg0_rows(xa, xb, _xg0_g(g0_ptr, 1, q0, q1, q2, j5, inside, SHIFTS, NSHIFT, P0, P1,
                                      P2, W, BP0, BP1, BP2, EAX, PAIR),
                       H, W, BP0, BP1, BP2, D0, D1, D2, ROWS0, NC)  # fmt: skip
    if NSHIFT == 4:
        a2, b2 = _xg0_rows(xa, xb, _xg0_g(g0_ptr, 2, q0, q1, q2, j5, inside, SHIFTS, NSHIFT, P0,
                                          P1, P2, W, BP0, BP1, BP2, EAX, PAIR),
                           H, W, BP0, BP1, BP2, D0, D1, D2, ROWS0, NC)  # fmt: skip
        a3, b3 = _xg0_rows(xa, xb, _xg0_g(g0_ptr, 3, q0, q1, q2, j5, inside, SHIFTS, NSHIFT, P0,
                                          P1, P2, W, BP0, BP1, BP2, EAX, PAIR),
                           H, W, BP0, BP1, BP2, D0, D1, D2, ROWS0, NC)  # fmt: skip
        ka = _join_k4(a0, a1, a2, a3)
        kb = _join_k4(b0, b1, b2, b3)
    else:
        ka = _join_k(a0, a1)
        kb = _join_k(b0, b1)
    acc = tl.dot(ka, member, input_precision="ieee")
    if ROWS0:
        acc = _stack_rows(acc, tl.dot(kb, member, input_precision="ieee"))
    return acc


def tile_plan(geo, dot: dict, wpp: int, warps: int) -> dict:
    """The constexprs of the ticket-tile parts pass: TILE (whether it runs: ``TUNING["tile"]``
    and :func:`tile_geometry`'s conditions), the sub-box TD0-TD2, ROWS0 (module docstring) and
    XG0F (``_XG0_LAST_FLAT``) and XG0J (``_window3_sched.xg0_joined`` for this design's
    shifts)."""
    fits, plan = tile_geometry(geo, dot, wpp, warps)
    on = _TILE if TUNING["tile"] is None else bool(TUNING["tile"])
    return {"TILE": on and fits, **plan, "XG0J": xg0_joined(geo.nshift)}


def tile_geometry(geo, dot: dict, wpp: int, warps: int) -> tuple[bool, dict]:
    """(fits, dict(TD0, TD1, TD2, ROWS0, XG0F, XG0J)) of a tile of ``wpp`` windows at ``warps``
    warps (this design's and the second's, kernels/window_nmf2.py). fits: the matrix form of the
    parts (``dot``), a power-of-two WPP, at most 32 of the tile's values a thread and 16 to 32
    sub-boxes in the dot (else the per-window pass runs)."""
    sub, rows0, k = tile_subboxes(geo, dot)
    tile_values = geo.block_e * wpp * math.prod(geo.bp) // (32 * warps)
    fits = dot["DOT"] and wpp & (wpp - 1) == 0 and tile_values <= 32 and 16 <= k <= 32
    return fits, dict(TD0=sub[0], TD1=sub[1], TD2=sub[2], ROWS0=rows0,
                      XG0F=rows0 or not _XG0_LAST_FLAT, XG0J=xg0_joined())  # fmt: skip


def tile_subboxes(geo, dot: dict) -> tuple[list[int], bool, int]:
    """The sub-box of a tile's products (module docstring), whether axis 0's sub-boxes are rows
    of the product (ROWS0), and the sub-boxes the dot contracts."""
    sub = [dot["D0"], dot["D1"], dot["D2"]]
    rows0 = False
    if math.prod(b // g for b, g in zip(geo.bp, geo.sub, strict=True)) > 16:
        sub, rows0 = list(geo.sub), True  # axis 0's sub-boxes as rows, axes 1 and 2 in the dot
        while (geo.bp[1] // sub[1]) * (geo.bp[2] // sub[2]) < 16 and max(sub[1:]) > 1:
            sub[1 if sub[1] >= sub[2] else 2] //= 2
    k = math.prod(b // g for b, g in zip(geo.bp[1 if rows0 else 0:], sub[1 if rows0 else 0:],
                                         strict=True))  # fmt: skip
    return sub, rows0, k
