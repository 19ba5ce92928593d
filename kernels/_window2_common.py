"""Shared by the second design's forward (window_nmf2.py) and backward (_window2_bwd.py): the
device helpers that place an unshifted window as an (E, P0, P1, P2) block and split-sum it into
the parts of every shift, and the host geometry with the compile-time shift constants (the
window passes' loops over their windows: _window2_loop.py)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastnmf.layout import padded_shift_table

from ._common import WindowSizes, _row_mask, _shift_of, shared_geometry
from ._fastdiv import _fdiv, _fdivmod, magics


@triton.jit
def _block_coords(BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr):
    """Local voxel coordinates of a window block as broadcastable (1, BP0, 1, 1) etc."""
    q0 = tl.arange(0, BP0)[None, :, None, None]
    q1 = tl.arange(0, BP1)[None, None, :, None]
    q2 = tl.arange(0, BP2)[None, None, None, :]
    return q0, q1, q2


@triton.jit
def _window_origin(w, NW1, NW2, MW2, W0):
    """Grid coordinates of flat window w, given the magic number MW2 of NW2 (kernels/_fastdiv.py)
    and w's coordinate W0 along axis 0 (the second design: ``_fdiv(w, MW12)``, MW12 the magic
    number of NW1 NW2; the third: the window's plane where the planes lie along axis 0, else 0:
    :func:`_plane_w0`): no division."""
    q, w2 = _fdivmod(w, NW2, MW2)
    w1 = q - W0 * NW1
    return W0, w1, w2


@triton.jit
def _plane_w0(plane, NW0):
    """The coordinate along axis 0 of every window of plane ``plane`` (the third design's planes
    lie along the first axis with more than one window): the plane itself, or 0 where NW0 = 1."""
    return tl.where(NW0 > 1, plane, 0)


@triton.jit
def _window_offsets(e, emask, w0, w1, w2, nvox, S1, S2,
                 P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                 BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr):  # fmt: skip
    """(BLOCK_E, BP0, BP1, BP2) int32 element offsets (from the head's first element; E * nvox
    < 2^31, checked by the launcher) and mask of unshifted window (w0, w1, w2)."""
    q0, q1, q2 = _block_coords(BP0, BP1, BP2)
    v = ((w0 * P0 + q0) * S1 + w1 * P1 + q1) * S2 + w2 * P2 + q2
    mask = emask[:, None, None, None] & (q0 < P0) & (q1 < P1) & (q2 < P2)
    return e[:, None, None, None] * nvox + v, mask


@triton.jit
def _shifted_g_all(g0_ptr, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, NSB: tl.constexpr,
                   P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                   BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
                   ACC: tl.constexpr, LOAD: tl.constexpr):  # fmt: skip
    """(NSB, BP0, BP1, BP2) in ACC: for every shift k, g0 at the position each voxel of a window
    has under shift k (0 on the padding); loaded once per program, picked by :func:`_pick`.
    Zeros without LOAD (passes that need g0 only for MU)."""
    g = tl.zeros((NSB, BP0, BP1, BP2), dtype=ACC)
    if LOAD:
        q0, q1, q2 = _block_coords(BP0, BP1, BP2)
        s4 = tl.arange(0, NSB)[:, None, None, None]
        sh0 = tl.zeros((NSB, 1, 1, 1), dtype=tl.int32)
        sh1 = tl.zeros((NSB, 1, 1, 1), dtype=tl.int32)
        sh2 = tl.zeros((NSB, 1, 1, 1), dtype=tl.int32)
        for k in tl.static_range(NSHIFT):
            sh0 = tl.where(s4 == k, SHIFTS[k][0], sh0)
            sh1 = tl.where(s4 == k, SHIFTS[k][1], sh1)
            sh2 = tl.where(s4 == k, SHIFTS[k][2], sh2)
        p0 = q0 + sh0
        p1 = q1 + sh1
        p2 = q2 + sh2
        p0 = tl.where(p0 >= P0, p0 - P0, p0)
        p1 = tl.where(p1 >= P1, p1 - P1, p1)
        p2 = tl.where(p2 >= P2, p2 - P2, p2)
        m = (s4 < NSHIFT) & (q0 < P0) & (q1 < P1) & (q2 < P2)
        g = tl.load(g0_ptr + (p0 * P1 + p1) * P2 + p2, mask=m, other=0).to(ACC)
    return g


@triton.jit
def _lanes_rowmask_g(rowmask_ptr, g0_ptr, E: tl.constexpr, SHIFTS: tl.constexpr,
                     NSHIFT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                     BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
                     BLOCK_E: tl.constexpr, NSB: tl.constexpr, ACC: tl.constexpr,
                     NEED_G: tl.constexpr):  # fmt: skip
    """What the third design's window passes share: the E lanes, their mask, the row mask and
    g0 under every shift (``_shifted_g_all``; only if NEED_G)."""
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    rowmask = _row_mask(rowmask_ptr, e, emask, ACC)
    g_all = _shifted_g_all(g0_ptr, SHIFTS, NSHIFT, NSB, P0, P1, P2, BP0, BP1, BP2, ACC, NEED_G)
    return e, emask, rowmask, g_all


@triton.jit
def _pick(g_all, k: tl.constexpr, NSB: tl.constexpr):
    """Shift k's (1, BP0, BP1, BP2) slice of :func:`_shifted_g_all`."""
    s4 = tl.arange(0, NSB)[:, None, None, None]
    return tl.sum(tl.where(s4 == k, g_all, 0), axis=0)[None, :, :, :]


@triton.jit
def _wrap_add(w, b, q, nw):
    """(w + b + q) mod nw for 0 <= w, q < nw and b in {0, 1}: one conditional subtraction."""
    o = w + b + q
    return tl.where(o >= nw, o - nw, o)


@triton.jit
def _wrap_sub(w, b, q, nw):
    """(w - b - q) mod nw for 0 <= w < nw, 0 <= b + q <= nw: one conditional addition (the
    shifts' whole-window offsets q are reduced modulo the grid)."""
    o = w - b - q
    return tl.where(o < 0, o + nw, o)


@triton.jit
def _shift_vectors(ptr, STRIDE, e, emask, bh, w0, w1, w2, NWIN, NW0, NW1, NW2,
                   k: tl.constexpr, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr,
                   P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                   BA0: tl.constexpr, BA1: tl.constexpr, BA2: tl.constexpr,
                   G0: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr,
                   CG: tl.constexpr = False, SELECT: tl.constexpr = False):  # fmt: skip
    """(BLOCK_E, BA0, 1, BA1, 1, BA2, 1): for every sub-box of unshifted window (w0, w1, w2), the
    E-vector at ptr + prog * STRIDE + e of the shifted window (shift k, prog = (bh * NSHIFT + k)
    * NWIN + window) that the sub-box lies in; broadcast over the voxels of a window reshaped to
    (BLOCK_E, BA0, G0, BA1, G1, BA2, G2).

    Where a window has at most 8 sub-boxes, a gather: each sub-box loads its
    part's vector itself (fewer registers: a thread loads only its own sub-boxes' vectors, from
    L1; with more sub-boxes, more bytes asked: one E-vector per sub-box instead of per part).
    Else one load of the (E, 2, 2, 2) table of the shift's parts (b0, b1, b2), then spread to the
    sub-boxes axis by axis (sums of one term and a zero: exact). With SELECT (any sub-box count),
    one (BLOCK_E, 1, ...) load per part of the shift (as few bytes as the table: each thread
    loads its row's element) and a select per sub-box: no spread across threads, fewer registers
    than the table's spread and fewer bytes than the gather. With CG the loads bypass L1
    (``.cg``: where the vectors were written by other programs of the same launch)."""
    if SELECT:
        a0 = tl.arange(0, BA0)[None, :, None, None, None, None, None] * G0
        a1 = tl.arange(0, BA1)[None, None, None, :, None, None, None] * G1
        a2 = tl.arange(0, BA2)[None, None, None, None, None, :, None] * G2
        in0 = (a0 >= P0 - SHIFTS[k][0]).to(tl.int32)  # the part along each axis (0 or 1)
        in1 = (a1 >= P1 - SHIFTS[k][1]).to(tl.int32)
        in2 = (a2 >= P2 - SHIFTS[k][2]).to(tl.int32)
        inside = (a0 < P0) & (a1 < P1) & (a2 < P2)  # padding sub-boxes stay 0
        e7 = e[:, None, None, None, None, None, None]
        m7 = emask[:, None, None, None, None, None, None]
        vec = tl.zeros((e7.shape[0], BA0, 1, BA1, 1, BA2, 1), dtype=ptr.dtype.element_ty)
        for b0 in tl.static_range(2 if SHIFTS[k][0] else 1):
            o0 = _wrap_add(w0, b0, SHIFTS[k][3], NW0)
            for b1 in tl.static_range(2 if SHIFTS[k][1] else 1):
                o1 = _wrap_add(w1, b1, SHIFTS[k][4], NW1)
                for b2 in tl.static_range(2 if SHIFTS[k][2] else 1):
                    o2 = _wrap_add(w2, b2, SHIFTS[k][5], NW2)
                    prog = (bh * NSHIFT + k) * NWIN + (o0 * NW1 + o1) * NW2 + o2
                    if CG:
                        v = tl.load(ptr + prog * STRIDE + e7, mask=m7, other=0,
                                    cache_modifier=".cg")  # fmt: skip
                    else:
                        v = tl.load(ptr + prog * STRIDE + e7, mask=m7, other=0)
                    vec = tl.where(inside & (in0 == b0) & (in1 == b1) & (in2 == b2), v, vec)
    elif BA0 * BA1 * BA2 <= 8:
        a0 = tl.arange(0, BA0)[None, :, None, None, None, None, None] * G0
        a1 = tl.arange(0, BA1)[None, None, None, :, None, None, None] * G1
        a2 = tl.arange(0, BA2)[None, None, None, None, None, :, None] * G2
        o0 = _wrap_add(w0, (a0 >= P0 - SHIFTS[k][0]).to(tl.int32), SHIFTS[k][3], NW0)
        o1 = _wrap_add(w1, (a1 >= P1 - SHIFTS[k][1]).to(tl.int32), SHIFTS[k][4], NW1)
        o2 = _wrap_add(w2, (a2 >= P2 - SHIFTS[k][2]).to(tl.int32), SHIFTS[k][5], NW2)
        prog = (bh * NSHIFT + k) * NWIN + (o0 * NW1 + o1) * NW2 + o2
        inside = (a0 < P0) & (a1 < P1) & (a2 < P2)  # padding sub-boxes load nothing
        e7 = e[:, None, None, None, None, None, None]
        mask = emask[:, None, None, None, None, None, None] & inside
        if CG:
            vec = tl.load(ptr + prog * STRIDE + e7, mask=mask, other=0, cache_modifier=".cg")
        else:
            vec = tl.load(ptr + prog * STRIDE + e7, mask=mask, other=0)
    else:
        b0 = tl.arange(0, 2)[None, :, None, None]
        b1 = tl.arange(0, 2)[None, None, :, None]
        b2 = tl.arange(0, 2)[None, None, None, :]
        o0 = _wrap_add(w0, b0, SHIFTS[k][3], NW0)
        o1 = _wrap_add(w1, b1, SHIFTS[k][4], NW1)
        o2 = _wrap_add(w2, b2, SHIFTS[k][5], NW2)
        prog = (bh * NSHIFT + k) * NWIN + (o0 * NW1 + o1) * NW2 + o2
        # part 1 along axis d exists only where the shift splits the axis (s'_d > 0)
        exists = ((b0 <= (1 if SHIFTS[k][0] else 0)) & (b1 <= (1 if SHIFTS[k][1] else 0))
                  & (b2 <= (1 if SHIFTS[k][2] else 0)))  # fmt: skip
        tmask = emask[:, None, None, None] & exists
        if CG:
            t = tl.load(ptr + prog * STRIDE + e[:, None, None, None], mask=tmask, other=0,
                        cache_modifier=".cg")  # (E, 2, 2, 2)  # fmt: skip
        else:
            t = tl.load(ptr + prog * STRIDE + e[:, None, None, None], mask=tmask, other=0)
        a2 = tl.arange(0, BA2)[None, None, None, None, :] * G2
        m2 = (a2 >= P2 - SHIFTS[k][2]).to(tl.int32) == b2[:, :, :, :, None]  # (1, 1, 1, 2, BA2)
        t = tl.sum(tl.where(m2, t[:, :, :, :, None], 0), axis=3)  # (E, 2, 2, BA2)
        a1 = tl.arange(0, BA1)[None, None, None, :, None] * G1
        m1 = (a1 >= P1 - SHIFTS[k][1]).to(tl.int32) == b1[:, :, :, :, None]  # (1, 1, 2, BA1, 1)
        t = tl.sum(tl.where(m1, t[:, :, :, None, :], 0), axis=2)  # (E, 2, BA1, BA2)
        a0 = tl.arange(0, BA0)[None, None, :, None, None] * G0
        m0 = (a0 >= P0 - SHIFTS[k][0]).to(tl.int32) == b0[:, :, :, :, None]  # (1, 2, BA0, 1, 1)
        t = tl.sum(tl.where(m0, t[:, :, None, :, :], 0), axis=1)  # (E, BA0, BA1, BA2)
        vec = t[:, :, None, :, None, :, None]
    return vec


@triton.jit
def _to_sub(z, BLOCK_E: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
            G0: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr):  # fmt: skip
    """(BLOCK_E, BP0, BP1, BP2) -> (BLOCK_E, BP0 // G0, G0, BP1 // G1, G1, BP2 // G2, G2)."""
    return tl.reshape(z, (BLOCK_E, BP0 // G0, G0, BP1 // G1, G1, BP2 // G2, G2))


@triton.jit
def _subboxes(z, BLOCK_E: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
              G0: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr):  # fmt: skip
    """(BLOCK_E, BP0 // G0, BP1 // G1, BP2 // G2): sums of z (BLOCK_E, BP0, BP1, BP2) over the
    sub-boxes of G0 x G1 x G2 voxels. Every shift's parts are unions of sub-boxes (G_d divides P_d
    and every in-window shift s'_d), so the per-voxel products are reduced once for all shifts."""
    z = tl.reshape(z, (BLOCK_E, BP0 // G0, G0, BP1 // G1, G1, BP2 // G2, G2))
    return tl.sum(tl.sum(tl.sum(z, axis=6), axis=4), axis=2)


@triton.jit
def _store_parts(z, dst, stride, e, emask, SH0: tl.constexpr, SH1: tl.constexpr,
                 SH2: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                 BA0: tl.constexpr, BA1: tl.constexpr, BA2: tl.constexpr,
                 G0: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr):  # fmt: skip
    """Split sums of the sub-box sums z (BLOCK_E, BA0, BA1, BA2) over the parts of one shift,
    part b stored at dst + b * stride (b = (b0 * 2 + b1) * 2 + b2); axis by axis, the big axis
    first. Sub-box a_d lies in part 1 along axis d when a_d G_d >= P_d - s'_d."""
    r0 = tl.arange(0, BA0)[None, :]
    r1 = tl.arange(0, BA1)[None, None, :]
    r2 = tl.arange(0, BA2)[None, None, None, :]
    for b2 in tl.static_range(2 if SH2 % P2 else 1):
        z2 = tl.sum(tl.where((r2 * G2 >= P2 - SH2 % P2).to(tl.int32) == b2, z, 0), axis=3)
        for b1 in tl.static_range(2 if SH1 % P1 else 1):
            z1 = tl.sum(tl.where((r1 * G1 >= P1 - SH1 % P1).to(tl.int32) == b1, z2, 0), axis=2)
            for b0 in tl.static_range(2 if SH0 % P0 else 1):
                z0 = tl.sum(tl.where((r0 * G0 >= P0 - SH0 % P0).to(tl.int32) == b0, z1, 0),
                            axis=1)  # fmt: skip
                tl.store(dst + ((b0 * 2 + b1) * 2 + b2) * stride + e, z0, mask=emask)


@triton.jit
def _part_member(SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, P0: tl.constexpr,
                 P1: tl.constexpr, P2: tl.constexpr, BA0: tl.constexpr, BA1: tl.constexpr,
                 BA2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                 NC: tl.constexpr, NB: tl.constexpr, DT: tl.constexpr, live):  # fmt: skip
    """(BA0 BA1 BA2, NC) 0/1 in DT: sub-box n (of D0 x D1 x D2 voxels, flat) lies in part column
    c; NB columns a shift: 8 (c = k * 8 + b, b = (b0 * 2 + b1) * 2 + b2) or 4 (c = k * 4 + b1 * 2
    + b2, axis 0 not split: BA0 = 1). Parts a shift does not have, padding and shifts past NSHIFT
    are 0; ``live``: a true scalar ANDed in (the caller's way to keep it out of a loop's start)."""
    return _part_member_by(SHIFTS, NSHIFT, P0, P1, P2, BA0, BA1, BA2, D0, D1, D2, NC, NB, DT, live,
                           1)  # fmt: skip


@triton.jit
def _part_member_by(SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, P0: tl.constexpr,
                    P1: tl.constexpr, P2: tl.constexpr, BA0: tl.constexpr, BA1: tl.constexpr,
                    BA2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                    NC: tl.constexpr, NB: tl.constexpr, DT: tl.constexpr, live,
                    NS: tl.constexpr):  # fmt: skip
    """:func:`_part_member` with each sub-box's row NS times (NS > 1: row n NS + s holds only
    shift s's columns), the part matrix of NS shifts' products side by side."""
    r = tl.arange(0, BA0 * BA1 * BA2 * NS)[:, None]
    n = r // NS
    a0 = (n // (BA1 * BA2)) * D0  # first voxel of the sub-box per axis (powers of two: shifts)
    a1 = ((n // BA2) % BA1) * D1
    a2 = (n % BA2) * D2
    c = tl.arange(0, NC)[None, :]
    k = c // NB
    b = c % NB
    m = (((a0 >= P0 - _shift_of(k, SHIFTS, NSHIFT, 0)).to(tl.int32) == (b // 4) % 2)
         & ((a1 >= P1 - _shift_of(k, SHIFTS, NSHIFT, 1)).to(tl.int32) == (b // 2) % 2)
         & ((a2 >= P2 - _shift_of(k, SHIFTS, NSHIFT, 2)).to(tl.int32) == b % 2))  # fmt: skip
    m = m & ((k == r % NS) | (NS == 1))
    return (m & (a0 < P0) & (a1 < P1) & (a2 < P2) & (k < NSHIFT) & live).to(DT)


@triton.jit
def _tri(i, j, E):
    """Position of (i, j), i <= j, in the upper triangle of an E x E matrix packed row by row
    (E (E + 1) / 2 floats: whole 32-byte sectors, not one partial sector per row)."""
    return i * E - (i * (i - 1)) // 2 + (j - i)


@triton.jit
def _load_sym(ptr, e, emask, E):
    """(BLOCK_E, BLOCK_E) symmetric matrix from its packed upper triangle at ptr (:func:`_tri`)."""
    i = e[:, None]
    j = e[None, :]
    upper = tl.load(ptr + _tri(i, j, E), mask=emask[:, None] & emask[None, :] & (j >= i),
                    other=0)  # fmt: skip
    return upper + tl.trans(upper) - tl.where(i == j, upper, 0)


@triton.jit
def _solve_rows(NW1, NW2, MW12, MW2, E: tl.constexpr, BLOCK_E: tl.constexpr):
    """Set-up of a solve (program axis 0: a shifted window, axis 1: batch * head): om, bh, the
    window's grid coordinates (o0, o1, o2), the rows e (BLOCK_E,) and their mask."""
    om = tl.program_id(0)
    bh = tl.program_id(1)
    o0, o1, o2 = _window_origin(om, NW1, NW2, MW2, _fdiv(om, MW12))
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    return om, bh, o0, o1, o2, e, emask


@triton.jit
def _sum_parts(vpart_ptr, kpart_ptr, e, emask, bh, o0, o1, o2, NWIN, NW0, NW1, NW2,
               k: tl.constexpr, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, E: tl.constexpr,
               BLOCK_E: tl.constexpr, ACC: tl.constexpr, WITH_K: tl.constexpr):  # fmt: skip
    """Sums over the parts of shifted window (o0, o1, o2) under shift k (in the order b2, b1, b0;
    slot = (bh * NWIN + w) * NSHIFT * 8 + k * 8 + b, w the unshifted window holding part b) of
    the E-vectors at vpart_ptr + slot * E and, with WITH_K, of the packed upper triangles at
    kpart_ptr + slot * E * E (:func:`_load_sym`; else K stays 0): (K, vector), one loop."""
    k_mat = tl.zeros((BLOCK_E, BLOCK_E), dtype=ACC)
    vec = tl.zeros((BLOCK_E,), dtype=ACC)
    for b2 in tl.static_range(2 if SHIFTS[k][2] else 1):
        w2 = _wrap_sub(o2, b2, SHIFTS[k][5], NW2)
        for b1 in tl.static_range(2 if SHIFTS[k][1] else 1):
            w1 = _wrap_sub(o1, b1, SHIFTS[k][4], NW1)
            for b0 in tl.static_range(2 if SHIFTS[k][0] else 1):
                w0 = _wrap_sub(o0, b0, SHIFTS[k][3], NW0)
                w = (w0 * NW1 + w1) * NW2 + w2  # the unshifted window holding this part
                slot = (bh * NWIN + w) * (NSHIFT * 8) + k * 8 + (b0 * 2 + b1) * 2 + b2
                if WITH_K:
                    k_mat += _load_sym(kpart_ptr + slot * E * E, e, emask, E)
                vec += tl.load(vpart_ptr + slot * E + e, mask=emask, other=0)
    return k_mat, vec


# The kernels' magic-number arguments (``_Geometry2.magic``), left unspecialised so that no grid
# size recompiles: the solves take the first two, the window passes all three.
MAGIC_SOLVE = ("MW12", "MW2")
MAGIC_PASS = (*MAGIC_SOLVE, "MHEADS")

# Read by the launchers at each call (the variants bench/time_designs.py times; all off by
# default). wpp: unshifted windows a program of the window passes (None: up to 16, as many as
# leave the launch at least _MIN_PROGRAMS programs, :func:`windows_per_program`); warps: warps a
# window pass (None: ``_WARPS``); maxnreg: ptxas's register cap on every launch (None: none; at
# 64, 32 resident warps an SM, with Triton 3.9 the parts passes and the backward output pass
# spill in most cases, up to 672 B a thread, and the forward solve 32-40 B,
# bench/results/static_designs/instructions.md; with Triton 3.6 none with [None, 4] at 16 warps,
# bench/results/static_designs_triton36/design2_occupancy.md); stages: the window passes' loop over
# their WPP windows pipelined by Triton in this many stages (``tl.range(num_stages=...)``: the next
# windows' x, dy and u loaded into shared memory while this one is computed; None: not pipelined;
# the passes ``_PIPELINED``); prefetch: the other two passes load the next window's x (and dy)
# into registers before computing this one (``_window2_loop._next_raw``); parts_tile: the
# forward parts pass takes 4 windows at a time as one tile, at ``_TILE_WARPS`` warps
# (``window_nmf2.parts_tile``); apply_tile, parts_bwd_tile: the backward apply and parts pass
# take their windows a tile at a time (``_window2_bwd.apply_tile``, ``parts_bwd_tile``; the
# latter at ``_TILE_WARPS`` warps; a tile past the head's last window: ``_window2_loop._tile_w0``);
# out_tile: the forward apply too (``window_nmf2.out_tile``, at ``_TILE_WARPS`` warps)
TUNING: dict = {"wpp": None, "warps": None, "maxnreg": None, "stages": None, "prefetch": False,
                "parts_tile": False, "apply_tile": False, "parts_bwd_tile": False,
                "out_tile": False}  # fmt: skip
_TILE_WARPS = 16  # the tile's values spread over 16 warps: 32 a thread (kernels/_window3_tile.py)
_MAX_WPP = 16  # g0's rolled copies, loaded once a program, then cost 0.5 KB a window
# Programs a window pass keeps at least, where the windows allow: about 3 waves of 8-warp
# programs at 2-3 an SM on a 132-SM GPU. At 2x32x128^3 16 windows a program give 2048; at
# 2x32x64^3 16 would give 256 programs (2 an SM, each through 16 windows one after another)
# and 4 give 1024; at 16^3 a program takes one window.
_MIN_PROGRAMS = 1024


def windows_per_program(nwin: int, bh: int) -> int:
    """Unshifted windows a program of the window passes takes (``WPP``): ``TUNING["wpp"]`` if
    set, else the largest power of two up to ``_MAX_WPP`` that leaves ``_MIN_PROGRAMS`` programs
    for nwin windows in each of bh heads (1 where none does). Which program takes a window
    changes no value: each window's parts are stored in its own slots."""
    if TUNING["wpp"]:
        return TUNING["wpp"]
    wpp = _MAX_WPP
    while wpp > 1 and triton.cdiv(nwin, wpp) * bh < _MIN_PROGRAMS:
        wpp //= 2
    return wpp


# The window passes whose loop over their windows Triton pipelines (``TUNING["stages"]``): it
# pipelines only innermost loops, and the forward parts pass (its products, ``_parts_dot``) and
# the backward apply (its columns of S) hold a loop inside theirs. Unrolled, those two took 146 /
# 112 registers instead of 97 / 96 (sm_90a, Triton 3.9, fp32 [None, 4]): half the resident warps.
_PIPELINED = ("apply", "parts_bwd")
_WARPS = {"parts": 8, "apply": 8, "parts_bwd": 8, "apply_bwd": 16}


def _pow2_part(n: int) -> int:
    """The largest power of two dividing n (n > 0)."""
    return n & -n


def _subbox_sizes(shifts, patch3) -> tuple[int, ...]:
    """Per axis, G_d: the largest power of two dividing P_d and every in-window shift s'_d, so
    that every shift's parts are unions of sub-boxes of G_0 x G_1 x G_2 voxels."""
    return tuple(
        _pow2_part(math.gcd(patch3[d], *(s[d] for s in shifts))) for d in range(3)
    )


def _shift_constants(shifts, spatial, patch3) -> tuple[tuple[int, ...], ...]:
    """Each shift as (s'0, s'1, s'2, Q0, Q1, Q2): s mod S = Q P + s' per axis (compile-time: ints,
    so a graph traced with symbolic sizes specialises on them)."""
    rows = padded_shift_table(shifts, spatial)  # 3D, reduced mod S
    return tuple(
        tuple(int(r[d] % patch3[d]) for d in range(3))
        + tuple(int(r[d] // patch3[d]) for d in range(3))
        for r in rows
    )


class _Geometry2(WindowSizes):
    """WindowSizes plus the compile-time constants of the second design's kernels (immutable once
    built: :func:`geometry` hands one out to every call of the same sizes; its launch arguments
    are computed once each)."""

    def __init__(self, x: torch.Tensor, head_dim: int, patch, shifts):
        super().__init__(x, head_dim, patch)
        self._memo: dict = {}
        self.bp = tuple(triton.next_power_of_2(p) for p in self.P)
        self.shifts = _shift_constants(shifts, tuple(x.shape[2:]), self.P)
        self.nshift = len(self.shifts)
        self.sub = _subbox_sizes(self.shifts, self.P)
        # warps per program of each window pass, chosen from the sm_90a compiles (issue 16's
        # report): 8, and 16 for the backward apply (twice the resident warps of 8)
        self.warps = {name: TUNING["warps"] or n for name, n in _WARPS.items()}
        self.bh = self.batch * self.heads
        self.wpp = windows_per_program(self.nwin, self.bh)
        self.slots = self.bh * self.nwin * self.nshift * 8  # per-part statistics (8 per shift)
        self.progs = self.bh * self.nshift * self.nwin  # shifted windows: the solves' outputs
        self.grid = (triton.cdiv(self.nwin, self.wpp), self.bh)  # the window passes
        if self.E * self.nvox >= 2**31:  # the kernels' in-head offsets are int32
            raise ValueError(
                f"head_dim x voxels = {self.E} x {self.nvox} is at least 2^31; the second window "
                "design takes fewer (use window_nmf.TUNING['design'] = 1)"
            )

    def launch(self, name: str) -> dict:
        """Launch options of pass ``name`` (a ``_WARPS`` name, or "solve": one warp): warps and,
        with ``TUNING["maxnreg"]``, ptxas's register cap."""
        cap = TUNING["maxnreg"]
        warps = self.warps.get(name, 1)
        tiled = {"parts": TUNING["parts_tile"], "parts_bwd": TUNING["parts_bwd_tile"],
                 "apply": TUNING["out_tile"]}
        if tiled.get(name) and not TUNING["warps"]:
            warps = _TILE_WARPS
        return {"num_warps": warps, **({"maxnreg": cap} if cap else {})}

    def stages(self, name: str):
        """STAGES of window pass ``name``: ``TUNING["stages"]`` for the passes Triton pipelines
        (``_PIPELINED``), else None (their loop as it was, with its branch)."""
        return TUNING["stages"] if name in _PIPELINED else None

    def prefetch(self, name: str) -> bool:
        """PREFETCH of window pass ``name``: ``TUNING["prefetch"]`` for the two passes Triton
        does not pipeline (a loop inside their window loop), else False."""
        return bool(TUNING["prefetch"]) and name not in _PIPELINED

    def tiles_fit(self, n: int) -> bool:
        """Whether every tile of n consecutive windows (the first a multiple of n) lies in one
        plane of the first axis (NW1 NW2 a multiple of n): the tiles of design 3 that design 2
        runs (``TUNING["parts_tile"]`` and kin) take one axis-0 coordinate for all their windows."""
        return self.NW[1] * self.NW[2] % n == 0

    def _once(self, key, make) -> dict:
        """``make()``, computed at the first call with ``key`` (the launch arguments below are
        pure functions of the sizes; the callers only unpack them)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def consts(self) -> dict:
        return self._once("consts", lambda: dict(SHIFTS=self.shifts, NSHIFT=self.nshift,
                                                 P0=self.P[0], P1=self.P[1], P2=self.P[2]))

    def magic(self, heads: bool = True) -> dict:
        """The magic numbers of the kernels' run-time divisors (kernels/_fastdiv.py): NW1 NW2 and
        NW2 (``_window_origin``), with ``heads`` the heads (``_window2_loop._pass_rows``; not the
        solves)."""
        divisors = dict(W12=self.NW[1] * self.NW[2], W2=self.NW[2])
        return self._once(("magic", heads), lambda: magics(
            **divisors, **(dict(HEADS=self.heads) if heads else {})))  # fmt: skip

    def dot(self, acc, mu: bool) -> dict:
        """The forward parts pass's matrix split of the Gram and X g0 (``_parts_dot``): fp32, HALS,
        and tiles a GPU's tl.dot takes (E^2 and the sub-box count at least 16: sub-boxes halved,
        the largest axis first, until there are 16)."""
        return self._once(("dot", acc, mu), lambda: self._dot(acc, mu))

    def _dot(self, acc, mu: bool) -> dict:
        sub = list(self.sub)
        while math.prod(b // g for b, g in zip(self.bp, sub, strict=True)) < 16 and max(sub) > 1:
            sub[sub.index(max(sub))] //= 2
        nsub = math.prod(b // g for b, g in zip(self.bp, sub, strict=True))
        use = acc == tl.float32 and not mu and nsub >= 16 and self.block_e**2 >= 16
        return dict(DOT=use, D0=sub[0], D1=sub[1], D2=sub[2],
                    NPB=max(16, triton.next_power_of_2(8 * self.nshift)))  # fmt: skip

    def block(self) -> dict:
        return self._once("block", lambda: dict(
            WPP=self.wpp, BP0=self.bp[0], BP1=self.bp[1], BP2=self.bp[2], BLOCK_E=self.block_e,
            NSB=triton.next_power_of_2(self.nshift), G0=self.sub[0], G1=self.sub[1],
            G2=self.sub[2]))  # fmt: skip


_GEOMETRIES: dict = {}  # :func:`geometry`'s


def geometry(x: torch.Tensor, head_dim: int, patch, shifts) -> _Geometry2:
    """``_Geometry2(x, head_dim, patch, shifts)``, built once for each shape, head dim, window,
    shift list and ``TUNING`` (:func:`shared_geometry`)."""
    return shared_geometry(_GEOMETRIES, _Geometry2, x, head_dim, patch, shifts,
                           tuple(TUNING.items()))  # fmt: skip
