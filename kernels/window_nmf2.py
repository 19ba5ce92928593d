"""Rank-one window NMF, second design: every shift's statistics from one read of x.

Same interface and result as :mod:`.window_nmf` (the default with two shifted windowings, e.g.
[None, 4]: ``fastnmf.kernels.window_design``; or ``window_nmf.TUNING["design"] = 2``).

Idea (DESIGN.md §6 (a)). Shift s rolls voxel v to r = v + s; its window is r // P, its position
r mod P. Take an *unshifted* window W (grid coordinates w, local voxel q, 0 <= q < P per axis) and
write s_d = Q_d P_d + s'_d (0 <= s'_d < P_d). Along axis d the voxels with q_d < P_d - s'_d land
in shifted window w_d + Q_d, the others in w_d + Q_d + 1; their position is (q_d + s'_d) mod P_d.
So under every shift W splits into at most 2^3 boxes ("parts", b in {0, 1}^3; one part along an
axis with s'_d = 0), and each part lies inside one shifted window. The statistics of a shifted
window are the sums over the (at most 8) parts that fall into it:

    K_s(omega) = sum_parts X_b X_b^T,   h_s(omega) = sum_parts X_b g0_s,b

where g0_s,b is g0 read at the part's positions under shift s. One read of x gives every shift's
parts. The parts of every shift are unions of *sub-boxes* of G_0 x G_1 x G_2 voxels (G_d the
largest power of two dividing P_d and every s'_d: 2 for [None, 2, 4, 6], 4 for [None, 4] with
P = 8), so per-voxel products are summed once into sub-boxes and only those small sums are split
per shift. Three launches per call:

1. ``_parts_kernel``, one program per (batch*head, WPP unshifted windows): loads a window as an
   (E, P0, P1, P2) block (P and the shifts are compile-time constants: no integer division per
   voxel, contiguous rows; the window's grid coordinates and the program's head from magic
   numbers, kernels/_fastdiv.py: no division by a run-time value either), forms each Gram row
   x_i * x (a runtime loop over i), sums it into sub-boxes and splits those into every shift's
   parts (fp32 HALS: by products with a 0/1 membership matrix, ``_parts_dot``, which splits the
   sub-box sums of x_e g0_s the same way; else by masked sums): K's upper triangle (K is
   symmetric: E (E + 1) / 2 of the E^2 floats written) and E floats of X g0 per part;
2. ``_solve_kernel``, one program per (batch*head, shifted window): for every shift sums its
   parts from the neighbouring unshifted windows, runs the T - 1 normalised power steps
   (``_power_steps``) and writes u (and, for the backward, the iterates in the layout of the first
   design and K's upper triangle);
3. ``_apply_kernel``, one program per (batch*head, WPP unshifted windows): reads x again and
   writes y = mean_s u_s,b (u_s,b^T x) with u_s,b the vector of the shifted window each part lies
   in, spread to the window's sub-boxes (``_shift_vectors``).

WPP (``_window2_common.windows_per_program``): up to 16 windows a program, one after another,
fewer where 16 would leave a window pass under 1024 programs (small volumes: 16^3 takes one window
a program); which program takes a window changes no value.

MU with zero entries of g0: those columns are dropped, and which columns that are depends on the
shift, so with ``MU`` the Gram rows are masked per shift before the sub-box sums.

Backward (kernels/_window2_bwd.py, derivation there): the same split, cheaper. The power-step
backward needs dP = dY_s X^T only through (dP + dP^T) u, an E-vector that is a sum over the
window's voxels (u known from the forward), and K, saved by the forward; so one read of x and dy
gives E floats per part, a tiny launch runs the power-step backward per shifted window, and an
output pass per unshifted window sums u (u^T dY_s) + (K̄ + K̄^T) X + h̄ g0_s^T over the shifts.
Three launches each way; nothing is copied host -> device (the shifts are compile-time constants).

Traffic (bytes asked / ideal, counted under the interpreter at 1x8x16^3, E = P = 8;
``fastnmf.profile.static.counter``), forward and forward + backward: fp32 1.65x / 1.76x
([None, 4]) and 1.87x / 1.92x ([None, 2, 4, 6]); bf16 1.80x / 1.91x and 2.24x / 2.25x (the
per-part statistics and tables are fp32, so bf16 pays relatively twice for them). First design,
fp32: 2.17x / 2.40x and 3.69x / 4.87x.

Compiled for sm_90a (Triton 3.9, ptxas 13, 2x32x128^3, E = P = 8; the static suite's kernel
report): no kernel spills, fp32 or bf16, with either shift set; the window passes (8 warps, the
backward apply 16) at 64-128 registers, 16-32 resident warps per SM; the one-warp solves at
64-72 registers, 28-32 warps. A window's (E, P0, P1, P2) block lives in registers, which keeps
the window passes at 16 resident warps with the four shifts.

No atomics: every output element is written by one program in a fixed order, so results are
bitwise deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    _power_steps,
    acc_dtype,
    compute_dtype,
    launch,
    window_inputs,
)
from ._fastdiv import _fdiv
from ._window2_bwd import backward2
from ._window2_common import (
    _TILE_WARPS,
    MAGIC_PASS,
    MAGIC_SOLVE,
    TUNING,
    _Geometry2,
    _part_member,
    _pick,
    _shift_of,
    _shift_vectors,
    _shifted_g_all,
    _solve_rows,
    _store_parts,
    _subboxes,
    _sum_parts,
    _to_sub,
    _tri,
    geometry,
)
from ._window2_loop import (
    _load_window,
    _next_raw,
    _pass_rows,
    _relu_rows,
    _tile_w0,
    _window_of,
)
from ._window3_bwd_tile import _E_AXIS, run_tile_geometry
from ._window3_out_tile import _apply_fwd_subtile
from ._window3_tile import _parts_tile, tile_geometry

__all__ = ["TUNING", "WindowNMF2", "window_nmf2"]


@triton.jit(do_not_specialize=MAGIC_PASS)
def _parts_kernel(
    x_ptr, g0_ptr, rowmask_ptr, kpart_ptr, hpart_ptr,
    C, E: tl.constexpr, HEADS, NWIN, NVOX, S1, S2, NW1, NW2, MW12, MW2, MHEADS,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, WPP: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, NPB: tl.constexpr, OPTS: tl.constexpr,
):  # fmt: skip
    """Per unshifted window: every shift's part sums of X g0_s and of X X^T (upper triangle),
    each Gram row reduced to sub-boxes once and then split per shift (MU: per shift). With DOT
    (fp32, no MU), the Gram rows' sums over sub-boxes of D0 x D1 x D2 voxels, and those of
    x_e g0_s, are collected in (16, sub-boxes) matrices and split into every shift's parts by
    products with the 0/1 membership matrix (``_membership``, ``_parts_dot``): FMAs with 1 and 0
    add exactly, and no lane shuffles. OPTS: the variant's switches (:func:`parts_opts`)."""
    STAGES: tl.constexpr = OPTS[0]
    PREFETCH: tl.constexpr = OPTS[1]
    TILE: tl.constexpr = OPTS[2]
    TW: tl.constexpr = OPTS[3]
    TD0: tl.constexpr = OPTS[4]
    TD1: tl.constexpr = OPTS[5]
    TD2: tl.constexpr = OPTS[6]
    ROWS0: tl.constexpr = OPTS[7]
    EAX: tl.constexpr = OPTS[8]
    XG0F: tl.constexpr = OPTS[9]
    XG0J: tl.constexpr = OPTS[10]
    bh, offset, e, emask, rowmask = _pass_rows(rowmask_ptr, C, E, HEADS, MHEADS, NVOX, BLOCK_E,
                                               ACC)  # fmt: skip
    x_base = x_ptr + offset  # the head's first element
    if TILE:  # TW windows at a time as one tile (the third design's, kernels/_window3_tile.py)
        for t in tl.range(0, WPP // TW, num_stages=1):  # (as the third design runs them)
            first = tl.program_id(0) * WPP + t * TW  # its windows share their axis-0 coordinate
            # (plane 0 of NWIN windows, no ring, parts not merged: the slots of this design)
            _parts_tile(x_base, g0_ptr, first, first * 0, bh, kpart_ptr, hpart_ptr, NWIN, NWIN,
                        1, E, NVOX, S1, S2, NW1, NW2, MW2, _tile_w0(first, NWIN, MW12), SHIFTS,
                        NSHIFT, TW, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, NSB, TD0, TD1, TD2, ROWS0,
                        0, False, EAX, XG0F, XG0J)  # fmt: skip
    else:
        # g0 under every shift, once per program
        g_all = _shifted_g_all(g0_ptr, SHIFTS, NSHIFT, NSB, P0, P1, P2, BP0, BP1, BP2, ACC, True)
        member = 0
        exists = 0
        if DOT:
            member, exists = _membership(SHIFTS, NSHIFT, P0, P1, P2, BP0 // D0, BP1 // D1,
                                         BP2 // D2, D0, D1, D2, NPB, ACC)  # fmt: skip
        pre = 0  # PREFETCH: the window of the loop's next step, loaded a step ahead
        if PREFETCH:
            pre = _next_raw(x_base, e, emask, 0, NWIN, WPP, NVOX, S1, S2, NW1, NW2, MW12, MW2,
                            P0, P1, P2, BP0, BP1, BP2)  # fmt: skip
        for j in tl.range(0, WPP, num_stages=STAGES):
            w, run = _window_of(j, NWIN, WPP, STAGES)
            cur = pre
            if PREFETCH:
                pre = _next_raw(x_base, e, emask, j + 1, NWIN, WPP, NVOX, S1, S2, NW1, NW2, MW12,
                                MW2, P0, P1, P2, BP0, BP1, BP2)  # fmt: skip
            if run:
                _parts_window(x_base, rowmask, e, emask, w, (bh * NWIN + w) * (NSHIFT * 8),
                              g_all, member, exists, kpart_ptr, hpart_ptr, E, NVOX, S1, S2, NW1,
                              NW2, SHIFTS, NSHIFT, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, NSB, G0,
                              G1, G2, MU, ACC, DOT, D0, D1, D2, NPB, MW2, _fdiv(w, MW12),
                              PREFETCH, cur)  # fmt: skip


@triton.jit
def _parts_window(
    x_base, rowmask, e, emask, w, slot, g_all, member, exists, kpart_ptr, hpart_ptr,
    E: tl.constexpr, NVOX, S1, S2, NW1, NW2,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, NPB: tl.constexpr, MW2, W0,
    PRE: tl.constexpr, pre,
):  # fmt: skip
    """The parts pass on unshifted window w (x_base: the head's first element): every shift's
    part sums of X g0_s and of X X^T's upper triangle (see :func:`_parts_kernel`), stored at part
    slots slot + k * 8 + b (MW2, W0: ``_window_origin``; PRE: the window already loaded, pre)."""
    e4 = e[:, None, None, None]
    if PRE:
        x = _relu_rows(pre, rowmask, ACC)
    else:
        _, _, _, _, _, x = _load_window(x_base, rowmask, e, emask, w, NVOX, S1, S2, NW1, NW2,
                                        P0, P1, P2, BP0, BP1, BP2, ACC, MW2, W0)  # fmt: skip
    if DOT:  # X g0_s and the Gram rows split by products with ``member``
        _parts_dot(x, g_all, member, exists, kpart_ptr, hpart_ptr, slot, E, NSHIFT, BLOCK_E,
                   BP0, BP1, BP2, D0, D1, D2, NPB, ACC)  # fmt: skip
    else:
        for k in tl.static_range(NSHIFT):
            g = _pick(g_all, k, NSB)
            xs = x
            if MU:
                xs = tl.where(g > 0, x, 0)
            _store_parts(_subboxes(xs * g, BLOCK_E, BP0, BP1, BP2, G0, G1, G2),
                         hpart_ptr + (slot + k * 8) * E, E, e, emask,
                         SHIFTS[k][0], SHIFTS[k][1], SHIFTS[k][2], P0, P1, P2,
                         BP0 // G0, BP1 // G1, BP2 // G2, G0, G1, G2)  # fmt: skip
        for i in range(0, E):  # Gram row i, columns j >= i (K is symmetric)
            xi = tl.sum(tl.where(e4 == i, x, 0), axis=0)[None, :, :, :]  # row i of X
            upper = emask & (e >= i)
            for k in tl.static_range(NSHIFT):
                z = x * xi
                if MU:  # the dropped columns depend on the shift
                    z = tl.where(_pick(g_all, k, NSB) > 0, z, 0)
                _store_parts(_subboxes(z, BLOCK_E, BP0, BP1, BP2, G0, G1, G2),
                             kpart_ptr + (slot + k * 8) * E * E + _tri(i, 0, E),
                             E * E, e, upper, SHIFTS[k][0], SHIFTS[k][1],
                             SHIFTS[k][2], P0, P1, P2, BP0 // G0, BP1 // G1, BP2 // G2,
                             G0, G1, G2)  # fmt: skip


@triton.jit
def _membership(SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, P0: tl.constexpr,
                P1: tl.constexpr, P2: tl.constexpr, BA0: tl.constexpr, BA1: tl.constexpr,
                BA2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                NPB: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """(BA0 BA1 BA2, NPB) 0/1: sub-box n (of D0 x D1 x D2 voxels, flat) lies in part b of shift k
    (column k * 8 + b; ``_part_member``); columns of parts a shift does not have, and padding,
    are 0. Also (1, NPB): which columns are parts."""
    p = tl.arange(0, NPB)[None, :]
    kk = p // 8
    exists = ((kk < NSHIFT) & (((p // 4) % 2 == 0) | (_shift_of(kk, SHIFTS, NSHIFT, 0) > 0))
              & (((p // 2) % 2 == 0) | (_shift_of(kk, SHIFTS, NSHIFT, 1) > 0))
              & ((p % 2 == 0) | (_shift_of(kk, SHIFTS, NSHIFT, 2) > 0)))  # fmt: skip
    member = _part_member(SHIFTS, NSHIFT, P0, P1, P2, BA0, BA1, BA2, D0, D1, D2, NPB, 8, ACC,
                          True)  # fmt: skip
    return member, exists


@triton.jit
def _parts_dot(x, g_all, member, exists, kpart_ptr, hpart_ptr, slot, E: tl.constexpr,
               NSHIFT: tl.constexpr, BLOCK_E: tl.constexpr, BP0: tl.constexpr,
               BP1: tl.constexpr, BP2: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
               D2: tl.constexpr, NPB: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Every shift's part sums of X X^T (upper triangle) and of X g0_s for one window x
    (BLOCK_E, BP0, BP1, BP2), RC rows a product (:func:`_rows_dot`): first the Gram rows, then
    the rows (shift k, lane e) of x_e g0_k (``g_all``: g0 under every shift), of which row (k, e)
    keeps only shift k's columns k * 8 + b; stored for the parts that exist (``exists``)."""
    RC: tl.constexpr = max(16 // BLOCK_E, 1)  # rows per product: at least 16 rows of A
    NG: tl.constexpr = (E + RC - 1) // RC  # products of Gram rows
    p = tl.arange(0, NPB)[None, :]
    for c in range(0, NG + (NSHIFT + RC - 1) // RC):
        gram = c < NG
        i0 = tl.where(gram, c, c - NG) * RC
        parts, ri, rj = _rows_dot(x, g_all, gram, member, i0, RC, BLOCK_E, BP0, BP1, BP2, D0,
                                  D1, D2, ACC)  # fmt: skip
        is_k = (ri * 0 + c) < NG  # (under the interpreter, & with a 0-d mask is int32)
        ok = (rj < E) & exists
        tl.store(kpart_ptr + (slot + p) * E * E + _tri(ri, rj, E), parts,
                 mask=ok & is_k & (ri < E) & (rj >= ri))  # fmt: skip
        tl.store(hpart_ptr + (slot + p) * E + rj, parts,
                 mask=ok & (is_k == 0) & (p // 8 == ri) & (ri < NSHIFT))  # fmt: skip


@triton.jit
def _rows_dot(x, g_all, gram, member, i0, RC: tl.constexpr, BLOCK_E: tl.constexpr,
              BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr, D0: tl.constexpr,
              D1: tl.constexpr, D2: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """x times its rows i0 .. i0 + RC - 1 (``gram``: Gram rows) or times g0 under shifts i0 ..
    i0 + RC - 1 (rows of ``g_all``), split into every part: (parts (RC BLOCK_E, NPB), each row's
    Gram row or shift and lane of x (RC BLOCK_E, 1)): the products' sub-box sums times
    ``member``."""
    NSUB: tl.constexpr = (BP0 // D0) * (BP1 // D1) * (BP2 // D2)
    e4 = tl.arange(0, BLOCK_E)[:, None, None, None]
    s4 = tl.arange(0, g_all.shape[0])[:, None, None, None]
    ii = tl.arange(0, RC)[:, None, None]
    r = tl.arange(0, RC * BLOCK_E)[:, None]
    sub = tl.zeros((RC, BLOCK_E, NSUB), dtype=ACC)  # (row i0 + ii, lane, sub-box)
    for di in tl.static_range(RC):
        if gram:
            xi = tl.sum(tl.where(e4 == i0 + di, x, 0), axis=0)[None, :, :, :]  # row of X
        else:
            xi = tl.sum(tl.where(s4 == i0 + di, g_all, 0), axis=0)[None, :, :, :]  # g0 shifted
        z = _subboxes(x * xi, BLOCK_E, BP0, BP1, BP2, D0, D1, D2)  # (E, BA0, BA1, BA2)
        sub = tl.where(ii == di, tl.reshape(z, (BLOCK_E, NSUB))[None, :, :], sub)
    parts = tl.dot(tl.reshape(sub, (RC * BLOCK_E, NSUB)), member,
                   input_precision="ieee")  # (RC E, NPB)  # fmt: skip
    return parts, i0 + r // BLOCK_E, r % BLOCK_E


@triton.jit(do_not_specialize=MAGIC_SOLVE)
def _solve_kernel(
    kpart_ptr, hpart_ptr, u_ptr, hats_ptr, norms_ptr, kmat_ptr,
    E: tl.constexpr, NWIN, ITERS, NW0, NW1, NW2, MW12, MW2,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, BLOCK_E: tl.constexpr, SAVE: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    om, bh, o0, o1, o2, e, emask = _solve_rows(NW1, NW2, MW12, MW2, E, BLOCK_E)  # a shifted om
    emask2 = emask[:, None] & emask[None, :]
    for k in tl.static_range(NSHIFT):
        k_mat, h = _sum_parts(hpart_ptr, kpart_ptr, e, emask, bh, o0, o1, o2, NWIN, NW0, NW1,
                              NW2, k, SHIFTS, NSHIFT, E, BLOCK_E, ACC, True)  # fmt: skip
        prog = (bh * NSHIFT + k) * NWIN + om
        if SAVE:  # K for the backward (packed upper triangle)
            tl.store(kmat_ptr + prog * E * E + _tri(e[:, None], e[None, :], E), k_mat,
                     mask=emask2 & (e[None, :] >= e[:, None]))  # fmt: skip
        a_hat = _power_steps(k_mat, h, hats_ptr + prog * ITERS * E, norms_ptr + prog * ITERS, e,
                             emask, E, ITERS, SAVE)  # fmt: skip
        tl.store(u_ptr + prog * E + e, a_hat, mask=emask)


@triton.jit(do_not_specialize=MAGIC_PASS)
def _apply_kernel(
    x_ptr, y_ptr, g0_ptr, rowmask_ptr, u_ptr,
    C, E: tl.constexpr, HEADS, NWIN, NVOX, S1, S2, NW0, NW1, NW2, MW12, MW2, MHEADS,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, WPP: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, OPTS: tl.constexpr,
):  # fmt: skip
    """OPTS: the variant's switches (:func:`apply_opts`); OTILE: WT windows at a time as one run
    tile (the third design's forward output tile, kernels/_window3_out_tile.py)."""
    STAGES: tl.constexpr = OPTS[0]
    OTILE: tl.constexpr = OPTS[1]
    R2: tl.constexpr = OPTS[2]
    WT: tl.constexpr = OPTS[3]
    EAX: tl.constexpr = OPTS[4]
    R1: tl.constexpr = OPTS[5]
    bh, offset, e, emask, rowmask = _pass_rows(rowmask_ptr, C, E, HEADS, MHEADS, NVOX, BLOCK_E,
                                               ACC)  # fmt: skip
    x_base, y_base = x_ptr + offset, y_ptr + offset  # the head's first element
    if OTILE:
        for t in tl.range(0, WPP // WT, num_stages=1):  # (as the third design runs them)
            first = tl.program_id(0) * WPP + t * WT  # its windows share their axis-0 coordinate
            _apply_fwd_subtile(x_base, y_base, first, first * 0, NWIN, bh, u_ptr, E, NWIN, NVOX,
                               S1, S2, NW0, NW1, NW2, MW2, _tile_w0(first, NWIN, MW12), SHIFTS,
                               NSHIFT, WT, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, R1, R2,
                               EAX)  # fmt: skip
    else:
        # MU: g0 under every shift, once per program
        g_all = _shifted_g_all(g0_ptr, SHIFTS, NSHIFT, NSB, P0, P1, P2, BP0, BP1, BP2, ACC, MU)
        for j in tl.range(0, WPP, num_stages=STAGES):
            w, run = _window_of(j, NWIN, WPP, STAGES)
            if run:
                _apply_window(x_base, y_base, rowmask, e, emask, w, bh, g_all, u_ptr, E, NWIN,
                              NVOX, S1, S2, NW0, NW1, NW2, SHIFTS, NSHIFT, P0, P1, P2, BP0, BP1,
                              BP2, BLOCK_E, NSB, G0, G1, G2, MU, ACC, False, MW2,
                              _fdiv(w, MW12))  # fmt: skip


@triton.jit
def _apply_window(
    x_base, y_base, rowmask, e, emask, w, bh, g_all, u_ptr,
    E: tl.constexpr, NWIN, NVOX, S1, S2, NW0, NW1, NW2,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, CG: tl.constexpr, MW2, W0,
):  # fmt: skip
    """The output pass on unshifted window w of head bh: y = mean_s u_s,b (u_s,b^T x) (see
    :func:`_apply_kernel`; CG: load u past L1, ``.cg``; MW2, W0: ``_window_origin``)."""
    w0, w1, w2, offs, mask, x = _load_window(x_base, rowmask, e, emask, w, NVOX, S1, S2,
                                             NW1, NW2, P0, P1, P2, BP0, BP1, BP2,
                                             ACC, MW2, W0)  # fmt: skip
    x7 = _to_sub(x, BLOCK_E, BP0, BP1, BP2, G0, G1, G2)  # (E, A0, G0, A1, G1, A2, G2)
    y = tl.zeros((BLOCK_E, BP0 // G0, G0, BP1 // G1, G1, BP2 // G2, G2), dtype=ACC)
    for k in tl.static_range(NSHIFT):
        uu = _shift_vectors(u_ptr, E, e, emask, bh, w0, w1, w2, NWIN, NW0, NW1, NW2, k,
                         SHIFTS, NSHIFT, P0, P1, P2, BP0 // G0, BP1 // G1, BP2 // G2,
                         G0, G1, G2, CG=CG)  # u of each sub-box's shifted window  # fmt: skip
        xs = x7
        if MU:
            g = _to_sub(_pick(g_all, k, NSB), 1, BP0, BP1, BP2, G0, G1, G2)
            xs = tl.where(g > 0, x7, 0)
        y += uu * tl.sum(uu * xs, axis=0)[None]  # u (u^T x(v))
    y = tl.reshape(y, (BLOCK_E, BP0, BP1, BP2)) / NSHIFT
    tl.store(y_base + offs, y.to(y_base.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _forward(x, g0, rowmask, geo: _Geometry2, iters: int, mu: bool, save: bool, *,
             wrap: bool = False):  # fmt: skip
    """(y, hats, norms, kmat); ``wrap``: launches through :func:`launch` (inside the triton op,
    fastnmf/window_op.py)."""
    f32 = compute_dtype(x.dtype)
    acc = acc_dtype(x.dtype)
    dev = x.device
    kpart = torch.empty(geo.slots, geo.E, geo.E, dtype=f32, device=dev)  # unused slots: unread
    hpart = torch.empty(geo.slots, geo.E, dtype=f32, device=dev)
    u = torch.empty(geo.progs, geo.E, dtype=f32, device=dev)
    hats = torch.empty(geo.progs, iters, geo.E, dtype=f32, device=dev) if save else u
    norms = torch.empty(geo.progs, iters, dtype=f32, device=dev) if save else u
    kmat = torch.empty(geo.progs, geo.E, geo.E, dtype=f32, device=dev) if save else u  # upper half
    y = torch.empty_like(x)
    launch(_parts_kernel, wrap=wrap)[geo.grid](
        x, g0, rowmask, kpart, hpart,
        geo.channels, geo.E, geo.heads, geo.nwin, geo.nvox, geo.S[1], geo.S[2], *geo.NW[1:],
        **geo.magic(), **geo.consts(), **geo.block(), MU=mu, ACC=acc, **geo.dot(acc, mu),
        OPTS=parts_opts(geo, acc, mu), **geo.launch("parts"),
    )  # fmt: skip
    launch(_solve_kernel, wrap=wrap)[(geo.nwin, geo.bh)](
        kpart, hpart, u, hats, norms, kmat, geo.E, geo.nwin, iters, *geo.NW,
        **geo.magic(heads=False), SHIFTS=geo.shifts, NSHIFT=geo.nshift, BLOCK_E=geo.block_e,
        SAVE=save, ACC=acc, **geo.launch("solve"),
    )  # fmt: skip
    launch(_apply_kernel, wrap=wrap)[geo.grid](
        x, y, g0, rowmask, u,
        geo.channels, geo.E, geo.heads, geo.nwin, geo.nvox, geo.S[1], geo.S[2], *geo.NW,
        **geo.magic(), **geo.consts(), **geo.block(), MU=mu, ACC=acc,
        OPTS=apply_opts(geo, mu, x.dtype), **geo.launch("apply"),
    )  # fmt: skip
    if not save:
        hats = norms = kmat = None
    return y, hats, norms, kmat


def apply_opts(geo: _Geometry2, mu: bool, dtype: torch.dtype) -> tuple:
    """The forward apply's switches as one constexpr: STAGES and :func:`out_tile`'s OTILE, R2,
    WT, EAX, R1, in that order; built once per geometry."""
    def make():
        t = out_tile(geo, mu, dtype)
        return (geo.stages("apply"), t["OTILE"], t["R2"], t["WT"], t["EAX"], t["R1"])

    return geo._once(("apply_opts", mu, dtype), make)


def out_tile(geo: _Geometry2, mu: bool, dtype: torch.dtype) -> dict:
    """The forward apply's tile constexprs (``TUNING["out_tile"]``): OTILE, whether it takes WT
    windows at a time as one run tile (``_window3_out_tile._apply_fwd_subtile``: each thread a
    run of voxels with all its channels, nothing across lanes; the WT windows side by side along
    the last axis, so that bf16's 32-byte sectors, two windows wide, are read and written by one
    access, not two), where :func:`.run_tile_geometry` allows at the pass's warps
    (``_TILE_WARPS`` with the tile) and a tile's windows share their axis-0 coordinate; R2, WT,
    EAX."""
    return geo._once(("out_tile", mu, dtype), lambda: _out_tile_plan(geo, mu, dtype))


def _out_tile_plan(geo: _Geometry2, mu: bool, dtype: torch.dtype) -> dict:
    fits, plan = run_tile_geometry(geo, mu, dtype, geo.wpp, geo.launch("apply")["num_warps"],
                                     False)  # fmt: skip
    return dict(OTILE=bool(TUNING["out_tile"]) and fits and geo.tiles_fit(plan["WT"]), **plan)


def parts_opts(geo: _Geometry2, acc, mu: bool) -> tuple:
    """The forward parts pass's switches as one constexpr (each launch argument costs host time
    a call in Triton's launch path): STAGES, PREFETCH and :func:`parts_tile`'s TILE, TW,
    TD0-TD2, ROWS0, EAX, XG0F, XG0J, in that order; built once per geometry."""
    def make():
        t = parts_tile(geo, acc, mu)
        return (geo.stages("parts"), geo.prefetch("parts"), t["TILE"], t["TW"], t["TD0"],
                t["TD1"], t["TD2"], t["ROWS0"], t["EAX"], t["XG0F"], t["XG0J"])  # fmt: skip

    return geo._once(("parts_opts", acc, mu), make)


def parts_tile(geo: _Geometry2, acc, mu: bool) -> dict:
    """The forward parts pass's tile constexprs (``TUNING["parts_tile"]``): TILE, whether the
    pass takes TW windows at a time as one tile (``_window3_tile._parts_tile``: about a third of
    the per-window pass's instructions in the third design, bench/results/static_designs/
    tiles.md); TW (4, or WPP where fewer), the tile's sub-box TD0-TD2, ROWS0, EAX, XG0F and XG0J
    (:func:`.tile_geometry`'s). The tile runs where :func:`.tile_geometry` allows at
    ``_TILE_WARPS`` warps and a tile's windows share their axis-0 coordinate (NW1 NW2 a multiple
    of TW)."""
    return geo._once(("tile", acc, mu), lambda: _parts_tile_plan(geo, geo.dot(acc, mu)))


def _parts_tile_plan(geo: _Geometry2, dot: dict) -> dict:
    tw = min(4, geo.wpp)
    fits, plan = tile_geometry(geo, dot, tw, _TILE_WARPS)
    use = bool(TUNING["parts_tile"]) and fits and geo.tiles_fit(tw)
    return dict(TILE=use, TW=tw, EAX=_E_AXIS, **plan)


class WindowNMF2(torch.autograd.Function):
    """Rank-one matricized NMF over windows, second design; see the module docstring."""

    @staticmethod
    def forward(ctx, x, g0, rowmask, head_dim, patch, shifts, iters, mu):
        geo = geometry(x, head_dim, patch, shifts)
        y, hats, norms, kmat = _forward(x, g0, rowmask, geo, iters, mu,
                                        save=ctx.needs_input_grad[0])  # fmt: skip
        ctx.save_for_backward(x, g0, rowmask, hats, norms, kmat)
        ctx.geo, ctx.args = geo, (head_dim, patch, shifts, iters, mu)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g0, rowmask, hats, norms, kmat = ctx.saved_tensors
        head_dim, patch, shifts, iters, mu = ctx.args
        dx = backward2(x, g0, rowmask, hats, norms, kmat, dy.contiguous(), ctx.geo, iters, mu)
        return dx, None, None, None, None, None, None, None


def window_nmf2(x, v0, *, head_dim, patch_size, shifts, u0=None, iters=5, solver="hals"):
    """Rank-one matricized NMF over (shifted) windows, second design (same interface as
    :func:`.window_nmf.window_nmf`; arguments assumed validated by :func:`fastnmf.matricized_nmf`).
    """
    g0, rowmask, mu = window_inputs(x, v0, u0, head_dim=head_dim, solver=solver)
    return WindowNMF2.apply(x, g0, rowmask, head_dim, tuple(patch_size), shifts, iters, mu)
