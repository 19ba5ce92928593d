"""The third window design's part slots (kernels/window_nmf3.py, kernels/_window3_bwd.py): where
the forward's part statistics live (every window's slots, or the ring of plane regions that planes
1.. of all heads take in turn: ``_ring_region``), the batched loads and stores of the solves'
E x E matrices, and the solves' rows and part sums, every shift's at once. The schedule that
orders their writers and readers is kernels/_window3_sched.py's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import _shift_of
from ._fastdiv import _fdivmod
from ._window2_common import _tri, _window_origin, _wrap_sub


@triton.jit
def _load_upper_batch(ptr, slot, m3, i3, j3, E: tl.constexpr):
    """The packed upper triangles at ptr + slot * E^2 as (NB, BLOCK_E, BLOCK_E), zero below the
    diagonal (:func:`_symmetric` makes them whole)."""
    return tl.load(ptr + slot[:, None, None] * (E * E) + _tri(i3, j3, E), mask=m3 & (j3 >= i3),
                   other=0, cache_modifier=".cg")  # fmt: skip


@triton.jit
def _symmetric(up, i3, j3):
    """The symmetric matrices whose upper triangles are up (the diagonal exactly: 2d - d)."""
    return up + tl.permute(up, (0, 2, 1)) - tl.where(i3 == j3, up, 0)


@triton.jit
def _flat_square(BLOCK_E: tl.constexpr):
    """The entries (i, j) of a (BLOCK_E, BLOCK_E) matrix, row by row, as one axis (1, BLOCK_E^2)."""
    f = tl.arange(0, BLOCK_E * BLOCK_E)[None, :]
    return f // BLOCK_E, f % BLOCK_E


@triton.jit
def _load_square_batch(ptr, slot, ok, E: tl.constexpr, BLOCK_E: tl.constexpr):
    """(NB, BLOCK_E, BLOCK_E) matrices stored whole (E x E, row by row) at ptr + slot * E^2,
    loaded as (NB, BLOCK_E^2) rows: the addresses run along the last axis, so Triton's load
    layout puts a matrix in one warp (lanes and registers), the slots on the warps, and every
    sum along either matrix axis stays in the warp (loaded as (NB, E, E), a matrix axis went
    across warps: sm_90a, Triton 3.6)."""
    i, j = _flat_square(BLOCK_E)
    m = tl.load(ptr + slot[:, None] * (E * E) + i * E + j,
                mask=ok[:, None] & (i < E) & (j < E), other=0, cache_modifier=".cg")  # fmt: skip
    return tl.reshape(m, (slot.shape[0], BLOCK_E, BLOCK_E))


@triton.jit
def _store_square_batch(ptr, slot, m, ok, E: tl.constexpr):
    """m (NB, BLOCK_E, BLOCK_E) stored whole at ptr + slot * E^2 for the rows ok, as
    :func:`_load_square_batch` loads it (as (NB, BLOCK_E^2) rows)."""
    BLOCK_E: tl.constexpr = m.shape[1]
    i, j = _flat_square(BLOCK_E)
    tl.store(ptr + slot[:, None] * (E * E) + i * E + j,
             tl.reshape(m, (m.shape[0], BLOCK_E * BLOCK_E)),
             mask=ok[:, None] & (i < E) & (j < E))  # fmt: skip


@triton.jit
def _ring_region(bh, plane, NPL, RING: tl.constexpr, GROUP: tl.constexpr = 1):
    """The region of the forward's part-statistics ring that holds plane ``plane`` of head bh:
    planes p >= 1 of all heads in ticket order take regions 0 .. RING - 1 in turn (the global
    plane count g = bh (NPL - 1) + p - 1, region g % RING: the next head's planes rewrite the
    ring while it is in L2, so it is written back to DRAM once a call, not once a head); plane 0,
    read again by the head's last solve, takes region RING + bh % 2. With GROUP batch*heads side
    by side (``_window3_sched.head_group``) each of a group's heads b = bh % GROUP has a ring of
    its own, the groups taking the place of the heads: region r of the group's count becomes
    r GROUP + b."""
    h = bh if GROUP == 1 else bh // GROUP  # the head's (group's) count
    g = h * (NPL - 1) + plane - 1
    region = tl.where(plane == 0, RING + h % 2, g % RING)
    if GROUP > 1:
        region = region * GROUP + bh % GROUP
    return region


@triton.jit
def _ring_previous(bh, plane, NPL, RING: tl.constexpr, MNPL1, GROUP: tl.constexpr = 1):
    """(head, plane) whose statistics the region of (bh, plane) held before (the same region's
    last writer in ticket order; :func:`_ring_region`), and whether there is one. MNPL1: the
    magic number of max(NPL - 1, 1) (a count g < 0 has no previous writer: clamped, unused).
    With GROUP: the group's previous writer, the same head b = bh % GROUP of it."""
    h = bh if GROUP == 1 else bh // GROUP  # the head's (group's) count
    g = h * (NPL - 1) + plane - 1 - RING  # the plane count RING planes before
    npl1 = tl.maximum(NPL - 1, 1)
    q, rem = _fdivmod(tl.maximum(g, 0), npl1, MNPL1)
    prev = tl.where(plane == 0, h - 2, q)
    if GROUP > 1:
        prev = prev * GROUP + bh % GROUP
    prev_plane = tl.where(plane == 0, 0, 1 + rem)
    return prev, prev_plane, tl.where(plane == 0, h >= 2, g >= 0)


@triton.jit
def _part_slot(bh, plane, i, NWIN, NPLANE, NPL, NSHIFT: tl.constexpr, RING: tl.constexpr,
               GROUP: tl.constexpr = 1):  # fmt: skip
    """First part slot of unshifted window i of plane ``plane`` of head bh (window w = plane
    NPLANE + i): (bh * NWIN + w) * 8 * NSHIFT; with RING, its plane's ring region
    (:func:`_ring_region`, GROUP heads side by side) times the windows of a plane."""
    if RING == 0:
        slot = (bh * NWIN + plane * NPLANE + i) * (NSHIFT * 8)
    else:
        region = _ring_region(bh, plane, NPL, RING, GROUP)
        slot = (region * NPLANE + i) * (NSHIFT * 8)
    return slot


@triton.jit
def _part_slot_at(bh, w0, w1, w2, NWIN, NW0, NW1, NW2, NPLANE, NPL, NSHIFT: tl.constexpr,
                  RING: tl.constexpr, PAX: tl.constexpr, GROUP: tl.constexpr = 1):  # fmt: skip
    """:func:`_part_slot` of the window at grid coordinates (w0, w1, w2): its plane is its
    coordinate along the pipelining axis PAX (:func:`fused_plan`), no division. PAX a constexpr:
    a part's ring region then depends on that coordinate alone, computed once for the parts
    that share it (sm_90a, Triton 3.9, fp32 [None, 2, 4, 6]: the forward solve 160 instructions
    a ticket fewer than with the axis chosen at run time)."""
    w = (w0 * NW1 + w1) * NW2 + w2
    if RING == 0:
        slot = (bh * NWIN + w) * (NSHIFT * 8)
    else:
        plane = w0 if PAX == 0 else (w1 if PAX == 1 else w2)
        region = _ring_region(bh, plane, NPL, RING, GROUP)
        slot = (region * NPLANE + (w - plane * NPLANE)) * (NSHIFT * 8)
    return slot


@triton.jit
def _merges_next(i, WPP: tl.constexpr):
    """Whether the forward's parts pass adds the high parts along axis 2 (b2 = 1) of window i to
    the low parts of window i + 1 and stores them in i + 1's slots (kernels/_window3_parts.py):
    where merging is on (:func:`merge_on`) the tickets are whole chunks of rows along axis 2, so
    i + 1 is i's neighbour there unless i is its ticket's last (i: the window's place in its plane
    or its coordinate along axis 2, the same modulo WPP)."""
    return i % WPP != WPP - 1


@triton.jit
def _solve_rows(first, plane, NPLANE, NB: tl.constexpr, NSB: tl.constexpr,
                NSHIFT: tl.constexpr):  # fmt: skip
    """The rows of a ticket's solves, every shift's at once: row r is shift k = r // NB of the
    ticket's window r % NB; (k, om: the window in the head, ok: whether both exist), (NSB NB,)."""
    r = tl.arange(0, NSB * NB)
    k = r // NB
    i = first + r % NB
    return k, plane * NPLANE + i, (i < NPLANE) & (k < NSHIFT)


@triton.jit
def _sum_parts_rows(vpart_ptr, kpart_ptr, bh, om, ok, k, NWIN, NW0, NW1, NW2, NPLANE, NPL,
                    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, SPLITS: tl.constexpr,
                    E: tl.constexpr,
                    NR: tl.constexpr, BLOCK_E: tl.constexpr, ACC: tl.constexpr,
                    WITH_K: tl.constexpr, RING: tl.constexpr, MERGE: tl.constexpr,
                    WPP: tl.constexpr, MW2, W0, PAX: tl.constexpr,
                    GROUP: tl.constexpr = 1):  # fmt: skip
    """``_sum_parts`` of the second design for the rows (k, om, ok) (NR,) of :func:`_solve_rows`,
    every shift's at once: (K (NR, BLOCK_E, BLOCK_E), vector (NR, BLOCK_E)) summed over the
    parts b of each row (along the axes some shift splits: SPLITS), a part read only where the
    row's shift splits the axes b crosses; the part slots of :func:`_part_slot_at`. With MERGE,
    a high part along axis 2 that the parts pass merged into its neighbour's low part
    (:func:`_merges_next`; axis 2 place w2) is not read. The rows' window coordinates come from
    ``_window_origin`` with MW2 (NW2's magic number) and W0 (the coordinate along axis 0); PAX
    the pipelining axis and GROUP the heads side by side (:func:`_part_slot_at`).
    Computing every shift's rows at once keeps a program's 512 threads on 8-16 matrices, not 4
    per shift: sm_90a, Triton 3.9, fp32, the forward's solve issues 686 + 3 x 37 / 771 + 3 x 63
    instructions a ticket for [None, 4] / [None, 2, 4, 6], where the solve shift by shift issued
    about 1480 / 2090 (commit a516163: bench/results/static_designs/instructions.md); with the
    pipelining axis a constexpr (PAX), 446 + 3 x 37 / 537 + 3 x 63 (commit df3d9af, all four
    tiles: bench/results/static_designs/tiles.md)."""
    e = tl.arange(0, BLOCK_E)
    i3 = e[None, :, None]
    j3 = e[None, None, :]
    m3 = ok[:, None, None] & (i3 < E) & (j3 < E)
    m2 = ok[:, None] & (e[None, :] < E)
    o0, o1, o2 = _window_origin(om, NW1, NW2, MW2, W0)
    k_up = tl.zeros((NR, BLOCK_E, BLOCK_E), dtype=ACC)
    vec = tl.zeros((NR, BLOCK_E), dtype=ACC)
    for b2 in tl.static_range(2 if SPLITS[2] else 1):
        w2 = _wrap_sub(o2, b2, _shift_of(k, SHIFTS, NSHIFT, 5), NW2)
        for b1 in tl.static_range(2 if SPLITS[1] else 1):
            w1 = _wrap_sub(o1, b1, _shift_of(k, SHIFTS, NSHIFT, 4), NW1)
            for b0 in tl.static_range(2 if SPLITS[0] else 1):
                w0 = _wrap_sub(o0, b0, _shift_of(k, SHIFTS, NSHIFT, 3), NW0)
                # the unshifted window (w0, w1, w2) holds part b
                slot = (_part_slot_at(bh, w0, w1, w2, NWIN, NW0, NW1, NW2, NPLANE, NPL, NSHIFT,
                                      RING, PAX, GROUP)
                        + k * 8 + (b0 * 2 + b1) * 2 + b2)  # fmt: skip
                read = ok
                if b0 == 1:
                    read = read & (_shift_of(k, SHIFTS, NSHIFT, 0) != 0)
                if b1 == 1:
                    read = read & (_shift_of(k, SHIFTS, NSHIFT, 1) != 0)
                if b2 == 1:
                    read = read & (_shift_of(k, SHIFTS, NSHIFT, 2) != 0)
                    if MERGE:
                        read = read & (_merges_next(w2, WPP).to(tl.int32) == 0)
                if WITH_K:  # the upper triangles summed, made whole once (the same values)
                    k_up += _load_upper_batch(kpart_ptr, slot, m3 & read[:, None, None], i3, j3,
                                              E)  # fmt: skip
                vec += tl.load(vpart_ptr + slot[:, None] * E + e[None, :],
                               mask=m2 & read[:, None], other=0, cache_modifier=".cg")
    return _symmetric(k_up, i3, j3), vec
