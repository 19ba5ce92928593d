"""Backward of the second window design (kernels/window_nmf2.py): statistics from one read.

Per shifted window (first design's docstring, fastnmf/closed_form.py), with dY_s = dY / n_shifts:

    dP = dY_s X^T,  then back through the power steps: S = K̄ + K̄^T and h̄ (E^2 + E floats),
    dX = u (u^T dY_s) + S X + h̄ g0^T (per shift, summed), times ReLU'(x).

The power-step backward needs K = X X^T, saved by the forward's solve (upper triangle), and dP
only through ū = (dP + dP^T) u = dY_s (X^T u) + X (dY_s^T u): an E-vector that is a sum over
the voxels of the window, with u known from the forward. So like h in the forward it splits into
parts: an unshifted window W meets at most 8 shifted windows per shift, and

    ū_s(omega) = sum_parts sum_{v in b} [dY_s(v) (u^T x(v)) + x(v) (u^T dY_s(v))],

u the vector of omega (E floats per part, no Gram matrix in the backward). Three launches:

1. ``_parts_bwd_kernel``, per (batch*head, WPP unshifted windows): reads x and dy once and
   split-sums the per-voxel terms of ū into every shift's parts (through sub-boxes);
2. ``_solve_bwd_kernel``, per (batch*head, shifted window): sums the parts of each shift and runs
   the power-step backward (``_steps_backward``, kernels/_common.py) from ū, the saved K and
   iterates; writes S and h̄ in the first design's layout;
3. ``_apply_bwd_kernel2``, per (batch*head, WPP unshifted windows): reads x and dy a second time
   and sums the three terms of dX over the shifts, each part's (u, S, h̄) spread to the window's
   sub-boxes; S x column by column (S[:, c] x_c, S symmetric so column c is row c), with HALS
   (no per-shift column masks) once for the sum of the shifts' S.

Derivation of the power-step backward (``_power_steps_backward``, kernels/_common.py): with
â_1 = h / ||h||, â_t = K â_{t-1} / ||K â_{t-1}||, u = â_T and P = u u^T, the loss reaches u
through dP: ū = (dP + dP^T) u. Back through a normalisation a_hat = a / ||a||:
ā = (ū - â (â^T ū)) / ||a||; through a_t = K â_{t-1}: K̄ += ā_t â_{t-1}^T, ū_{t-1} = K^T ā_t
= K ā_t (K symmetric); at t = 1, h̄ = ā_1. K = X X^T and h = X g0 give
dX = (K̄ + K̄^T) X + h̄ g0^T, and Y = P X adds P^T dY_s = u (u^T dY_s); per shift, the rows
of dX are gathered back to the unshifted voxels (each part to its own window), summed over the
shifts and multiplied by ReLU'(x) (and the MU row and column masks).

With MU and zero entries of g0 the dropped columns depend on the shift, so x is masked per shift
before the split sums (as in the forward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _steps_backward, acc_dtype, launch
from ._fastdiv import _fdiv
from ._window2_common import (
    MAGIC_PASS,
    MAGIC_SOLVE,
    TUNING,
    _Geometry2,
    _load_sym,
    _pick,
    _shift_vectors,
    _shifted_g_all,
    _solve_rows,
    _store_parts,
    _sum_parts,
    _to_sub,
    _window_offsets,
    _window_origin,
)
from ._window2_loop import (
    _load_window,
    _next_raw,
    _pass_rows,
    _relu_rows,
    _tile_w0,
    _window_of,
)
from ._window3_bwd_parts_tile import _parts_bwd_subtile, bwd_parts_geometry
from ._window3_bwd_tile import _E_AXIS, _apply_subtile, run_tile_geometry


@triton.jit
def _load_window_dy(x_base, dy_base, rowmask, e, emask, w, NVOX, S1, S2, NW1, NW2,
                    NSHIFT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
                    BLOCK_E: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr,
                    ACC: tl.constexpr, MW2, W0, PRE: tl.constexpr = False, pre_x=0,
                    pre_dy=0):  # fmt: skip
    """:func:`_load_window` of x, and dY_s = dy / n_shifts at the same offsets; x and dY_s also
    as sub-box views (BLOCK_E, BP0 // G0, G0, BP1 // G1, G1, BP2 // G2, G2). PRE: x and dy
    already loaded (pre_x, pre_dy: ``_next_raw``)."""
    if PRE:
        w0, w1, w2 = _window_origin(w, NW1, NW2, MW2, W0)
        offs, mask = _window_offsets(e, emask, w0, w1, w2, NVOX, S1, S2, P0, P1, P2, BP0, BP1,
                                     BP2)  # fmt: skip
        x = _relu_rows(pre_x, rowmask, ACC)
        dy = pre_dy
    else:
        w0, w1, w2, offs, mask, x = _load_window(x_base, rowmask, e, emask, w, NVOX, S1, S2, NW1,
                                                 NW2, P0, P1, P2, BP0, BP1, BP2, ACC, MW2,
                                                 W0)  # fmt: skip
        dy = tl.load(dy_base + offs, mask=mask, other=0)
    dy = dy.to(ACC) / NSHIFT  # dY_s
    x7 = _to_sub(x, BLOCK_E, BP0, BP1, BP2, G0, G1, G2)  # (E, A0, G0, A1, G1, A2, G2)
    dy7 = _to_sub(dy, BLOCK_E, BP0, BP1, BP2, G0, G1, G2)
    return w0, w1, w2, offs, mask, x, x7, dy7


@triton.jit(do_not_specialize=MAGIC_PASS)
def _parts_bwd_kernel(
    x_ptr, dy_ptr, g0_ptr, rowmask_ptr, hats_ptr, gpart_ptr,
    C, E: tl.constexpr, HEADS, NWIN, NVOX, ITERS, S1, S2, NW0, NW1, NW2, MW12, MW2, MHEADS,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, WPP: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, OPTS: tl.constexpr,
):  # fmt: skip
    """Per unshifted window: every shift's part sums of dY_s (X_s^T u) + X_s (dY_s^T u), u the
    vector of the shifted window each part lies in (X_s: x with MU's dropped columns). PTILE:
    PWT windows at a time as one tile (the third design's, kernels/_window3_bwd_parts_tile.py).
    OPTS: the variant's switches (:func:`parts_bwd_opts`)."""
    STAGES: tl.constexpr = OPTS[0]
    PTILE: tl.constexpr = OPTS[1]
    PD0: tl.constexpr = OPTS[2]
    PD1: tl.constexpr = OPTS[3]
    PD2: tl.constexpr = OPTS[4]
    PROWS0: tl.constexpr = OPTS[5]
    PWT: tl.constexpr = OPTS[6]
    EAX: tl.constexpr = OPTS[7]
    USTRIDE: tl.constexpr = OPTS[8]
    PJOIN: tl.constexpr = OPTS[9]
    bh, offset, e, emask, rowmask = _pass_rows(rowmask_ptr, C, E, HEADS, MHEADS, NVOX, BLOCK_E,
                                               ACC)  # fmt: skip
    if PTILE:
        for t in tl.range(0, WPP // PWT, num_stages=1):  # (as the third design runs them)
            first = tl.program_id(0) * WPP + t * PWT  # its windows share their axis-0 coordinate
            # (plane 0 of NWIN windows; u the last saved iterate, USTRIDE = T E apart)
            _parts_bwd_subtile(x_ptr + offset, dy_ptr + offset, first, first * 0, NWIN, bh,
                               hats_ptr + (USTRIDE - E), gpart_ptr, E, NWIN, NVOX, S1, S2, NW0,
                               NW1, NW2, MW2, _tile_w0(first, NWIN, MW12), SHIFTS, NSHIFT, PWT,
                               P0, P1, P2, BP0, BP1, BP2, BLOCK_E, NSB, PD0, PD1, PD2, PROWS0,
                               EAX, USTRIDE, PJOIN)  # fmt: skip
    else:
        # MU: g0 under every shift, once per program
        g_all = _shifted_g_all(g0_ptr, SHIFTS, NSHIFT, NSB, P0, P1, P2, BP0, BP1, BP2, ACC, MU)
        for j in tl.range(0, WPP, num_stages=STAGES):
            w, run = _window_of(j, NWIN, WPP, STAGES)
            if run:
                _parts_bwd_window(x_ptr + offset, dy_ptr + offset, rowmask, e, emask, w, bh,
                                  g_all, hats_ptr, gpart_ptr, E, NWIN, NVOX, ITERS, S1, S2, NW0,
                                  NW1, NW2, SHIFTS, NSHIFT, P0, P1, P2, BP0, BP1, BP2, BLOCK_E,
                                  NSB, G0, G1, G2, MU, ACC, MW2, _fdiv(w, MW12))  # fmt: skip


@triton.jit
def _parts_bwd_window(
    x_base, dy_base, rowmask, e, emask, w, bh, g_all, hats_ptr, gpart_ptr,
    E: tl.constexpr, NWIN, NVOX, ITERS, S1, S2, NW0, NW1, NW2,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, MW2, W0,
):  # fmt: skip
    """The backward parts pass on unshifted window w of head bh (see :func:`_parts_bwd_kernel`;
    MW2, W0: ``_window_origin``)."""
    w0, w1, w2, _, _, _, x7, dy7 = _load_window_dy(
        x_base, dy_base, rowmask, e, emask, w, NVOX, S1, S2, NW1, NW2,
        NSHIFT, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, G0, G1, G2, ACC, MW2, W0)  # fmt: skip
    slot = (bh * NWIN + w) * (NSHIFT * 8)
    for k in tl.static_range(NSHIFT):
        uu = _shift_vectors(hats_ptr + (ITERS - 1) * E, ITERS * E, e, emask, bh, w0, w1, w2,
                         NWIN, NW0, NW1, NW2, k, SHIFTS, NSHIFT, P0, P1, P2,
                         BP0 // G0, BP1 // G1, BP2 // G2, G0, G1, G2)  # fmt: skip
        xs = x7
        if MU:
            xs = tl.where(_to_sub(_pick(g_all, k, NSB), 1, BP0, BP1, BP2, G0, G1, G2) > 0,
                          x7, 0)  # fmt: skip
        cx = tl.sum(uu * xs, axis=0)[None]  # u^T x(v)
        cdy = tl.sum(uu * dy7, axis=0)[None]  # u^T dY_s(v)
        z = tl.sum(tl.sum(tl.sum(dy7 * cx + xs * cdy, axis=6), axis=4), axis=2)
        _store_parts(z, gpart_ptr + (slot + k * 8) * E, E, e, emask,
                     SHIFTS[k][0], SHIFTS[k][1], SHIFTS[k][2], P0, P1, P2,
                     BP0 // G0, BP1 // G1, BP2 // G2, G0, G1, G2)  # fmt: skip


@triton.jit(do_not_specialize=MAGIC_SOLVE)
def _solve_bwd_kernel(
    gpart_ptr, kmat_ptr, hats_ptr, norms_ptr, sym_ptr, hbar_ptr,
    E: tl.constexpr, NWIN, ITERS, NW0, NW1, NW2, MW12, MW2,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, BLOCK_E: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    om, bh, o0, o1, o2, e, emask = _solve_rows(NW1, NW2, MW12, MW2, E, BLOCK_E)  # a shifted om
    ee = e[:, None] * E + e[None, :]
    emask2 = emask[:, None] & emask[None, :]
    for k in tl.static_range(NSHIFT):
        _, grad = _sum_parts(gpart_ptr, gpart_ptr, e, emask, bh, o0, o1, o2, NWIN, NW0, NW1, NW2,
                             k, SHIFTS, NSHIFT, E, BLOCK_E, ACC, False)  # ū; no K  # fmt: skip
        prog = (bh * NSHIFT + k) * NWIN + om
        k_mat = _load_sym(kmat_ptr + prog * E * E, e, emask, E)
        sym, hbar = _steps_backward(k_mat, grad, hats_ptr + prog * ITERS * E,
                                    norms_ptr + prog * ITERS, e, emask, E, ITERS, BLOCK_E,
                                    ACC)  # fmt: skip
        tl.store(sym_ptr + prog * E * E + ee, sym, mask=emask2)
        tl.store(hbar_ptr + prog * E + e, hbar, mask=emask)


@triton.jit(do_not_specialize=MAGIC_PASS)
def _apply_bwd_kernel2(
    x_ptr, dy_ptr, dx_ptr, g0_ptr, rowmask_ptr, hats_ptr, sym_ptr, hbar_ptr,
    C, E: tl.constexpr, HEADS, NWIN, NVOX, ITERS, S1, S2, NW0, NW1, NW2, MW12, MW2, MHEADS,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, WPP: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, OPTS: tl.constexpr,
):  # fmt: skip
    """dX = sum_s [u (u^T dY_s) + S x + h̄ g0_s^T] times ReLU'(x), per unshifted window, each
    part's (u, S, h̄) those of the shifted window it lies in (S x column by column: S[:, c] x_c,
    the columns in a loop). PREFETCH: the next window's x and dy loaded a step ahead. OPTS: the
    variant's switches (:func:`apply_bwd_opts`)."""
    STAGES: tl.constexpr = OPTS[0]
    PREFETCH: tl.constexpr = OPTS[1]
    BTILE: tl.constexpr = OPTS[2]
    R2: tl.constexpr = OPTS[3]
    WT: tl.constexpr = OPTS[4]
    EAX: tl.constexpr = OPTS[5]
    USTRIDE: tl.constexpr = OPTS[6]
    R1: tl.constexpr = OPTS[7]
    bh, offset, e, emask, rowmask = _pass_rows(rowmask_ptr, C, E, HEADS, MHEADS, NVOX, BLOCK_E,
                                               ACC)  # fmt: skip
    if BTILE:  # WT windows at a time as one run tile (the third design's: _window3_bwd_tile.py)
        for t in tl.range(0, WPP // WT, num_stages=1):  # (as the third design runs them)
            first = tl.program_id(0) * WPP + t * WT  # its windows share their axis-0 coordinate
            # (plane 0 of NWIN windows; u the last saved iterate, USTRIDE = T E apart)
            _apply_subtile(x_ptr + offset, dy_ptr + offset, dx_ptr + offset, g0_ptr, first,
                           first * 0, NWIN, bh, hats_ptr + (USTRIDE - E), sym_ptr, hbar_ptr, E,
                           NWIN, NVOX, S1, S2, NW0, NW1, NW2, MW2, _tile_w0(first, NWIN, MW12),
                           SHIFTS, NSHIFT, WT, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, R1, R2, EAX,
                           USTRIDE)  # fmt: skip
    else:
        _apply_bwd_windows(x_ptr, dy_ptr, dx_ptr, g0_ptr, hats_ptr, sym_ptr, hbar_ptr, offset, bh,
                           e, emask, rowmask, E, NWIN, NVOX, ITERS, S1, S2, NW0, NW1, NW2, MW12,
                           MW2, SHIFTS, NSHIFT, WPP, STAGES, P0, P1, P2, BP0, BP1, BP2, BLOCK_E,
                           NSB, G0, G1, G2, MU, ACC, PREFETCH)  # fmt: skip


@triton.jit
def _apply_bwd_windows(
    x_ptr, dy_ptr, dx_ptr, g0_ptr, hats_ptr, sym_ptr, hbar_ptr, offset, bh, e, emask, rowmask,
    E: tl.constexpr, NWIN, NVOX, ITERS, S1, S2, NW0, NW1, NW2, MW12, MW2,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, WPP: tl.constexpr, STAGES: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """The backward apply's loop over its WPP windows, one window at a time
    (:func:`_apply_bwd_window`)."""
    g_all = _shifted_g_all(g0_ptr, SHIFTS, NSHIFT, NSB, P0, P1, P2, BP0, BP1, BP2, ACC, True)
    pre_x = 0
    pre_dy = 0
    if PREFETCH:
        pre_x, pre_dy = _next_pair(x_ptr + offset, dy_ptr + offset, e, emask, 0, NWIN, WPP,
                                   NVOX, S1, S2, NW1, NW2, MW12, MW2, P0, P1, P2, BP0, BP1,
                                   BP2)  # fmt: skip
    for j in tl.range(0, WPP, num_stages=STAGES):
        w, run = _window_of(j, NWIN, WPP, STAGES)
        cur_x = pre_x
        cur_dy = pre_dy
        if PREFETCH:
            pre_x, pre_dy = _next_pair(x_ptr + offset, dy_ptr + offset, e, emask, j + 1, NWIN,
                                       WPP, NVOX, S1, S2, NW1, NW2, MW12, MW2, P0, P1, P2, BP0,
                                       BP1, BP2)  # fmt: skip
        if run:
            _apply_bwd_window(x_ptr + offset, dy_ptr + offset, dx_ptr + offset, rowmask, e,
                              emask, w, bh, g_all, hats_ptr, sym_ptr, hbar_ptr, E, NWIN, NVOX,
                              ITERS, S1, S2, NW0, NW1, NW2, SHIFTS, NSHIFT, P0, P1, P2, BP0, BP1,
                              BP2, BLOCK_E, NSB, G0, G1, G2, MU, ACC, False, MW2,
                              _fdiv(w, MW12), PREFETCH, cur_x, cur_dy)  # fmt: skip


@triton.jit
def _next_pair(x_base, dy_base, e, emask, j, NWIN, WPP: tl.constexpr, NVOX, S1, S2, NW1, NW2,
               MW12, MW2, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
               BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr):  # fmt: skip
    """:func:`_next_raw` of x and of dy."""
    x = _next_raw(x_base, e, emask, j, NWIN, WPP, NVOX, S1, S2, NW1, NW2, MW12, MW2, P0, P1, P2,
                  BP0, BP1, BP2)  # fmt: skip
    dy = _next_raw(dy_base, e, emask, j, NWIN, WPP, NVOX, S1, S2, NW1, NW2, MW12, MW2, P0, P1,
                   P2, BP0, BP1, BP2)  # fmt: skip
    return x, dy


@triton.jit
def _apply_bwd_window(
    x_base, dy_base, dx_base, rowmask, e, emask, w, bh, g_all, hats_ptr, sym_ptr, hbar_ptr,
    E: tl.constexpr, NWIN, NVOX, ITERS, S1, S2, NW0, NW1, NW2,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, CG: tl.constexpr, MW2, W0,
    PRE: tl.constexpr = False, pre_x=0, pre_dy=0,
):  # fmt: skip
    """The backward output pass on unshifted window w of head bh (see
    :func:`_apply_bwd_kernel2`; CG: load S and h̄ past L1, ``.cg``; MW2, W0:
    ``_window_origin``; PRE: x and dy already loaded, pre_x and pre_dy)."""
    e7 = e[:, None, None, None, None, None, None]
    w0, w1, w2, offs, mask, x, x7, dy7 = _load_window_dy(
        x_base, dy_base, rowmask, e, emask, w, NVOX, S1, S2, NW1, NW2,
        NSHIFT, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, G0, G1, G2, ACC, MW2, W0,
        PRE, pre_x, pre_dy)  # fmt: skip
    dx = tl.zeros((BLOCK_E, BP0 // G0, G0, BP1 // G1, G1, BP2 // G2, G2), dtype=ACC)
    for k in tl.static_range(NSHIFT):
        g = _to_sub(_pick(g_all, k, NSB), 1, BP0, BP1, BP2, G0, G1, G2)
        uu = _shift_vectors(hats_ptr + (ITERS - 1) * E, ITERS * E, e, emask, bh, w0, w1, w2,
                            NWIN, NW0, NW1, NW2, k, SHIFTS, NSHIFT, P0, P1, P2,
                            BP0 // G0, BP1 // G1, BP2 // G2, G0, G1, G2,
                            SELECT=True)  # fmt: skip
        t = uu * tl.sum(uu * dy7, axis=0)[None]  # u (u^T dY_s)
        t += g * _shift_vectors(hbar_ptr, E, e, emask, bh, w0, w1, w2, NWIN, NW0, NW1,
                                NW2, k, SHIFTS, NSHIFT, P0, P1, P2, BP0 // G0,
                                BP1 // G1, BP2 // G2, G0, G1, G2,
                                CG=CG, SELECT=True)  # h̄ g0_s^T  # fmt: skip
        if MU:  # the dropped columns depend on the shift: S x per shift
            for c in range(0, E):  # S[:, c] x_c; S symmetric: column c = row c
                scol = _shift_vectors(sym_ptr + c * E, E * E, e, emask, bh, w0, w1, w2,
                                     NWIN, NW0, NW1, NW2, k, SHIFTS, NSHIFT, P0, P1, P2,
                                     BP0 // G0, BP1 // G1, BP2 // G2, G0, G1,
                                     G2, CG=CG)  # fmt: skip
                t += scol * tl.sum(tl.where(e7 == c, x7, 0), axis=0)[None]
            t = tl.where(g > 0, t, 0)
        dx += t
    if not MU:  # x is the same under every shift: (sum_s S_s) x, column by column
        for c in range(0, E):
            scol = tl.zeros((BLOCK_E, BP0 // G0, 1, BP1 // G1, 1, BP2 // G2, 1), ACC)
            for k in tl.static_range(NSHIFT):
                scol += _shift_vectors(sym_ptr + c * E, E * E, e, emask, bh, w0, w1, w2,
                                      NWIN, NW0, NW1, NW2, k, SHIFTS, NSHIFT, P0, P1, P2,
                                      BP0 // G0, BP1 // G1, BP2 // G2, G0, G1,
                                      G2, CG=CG)  # fmt: skip
            dx += scol * tl.sum(tl.where(e7 == c, x7, 0), axis=0)[None]
    # ReLU'(x) and the MU row mask (0/1): x > 0 exactly where both are nonzero
    dx = tl.where(x > 0, tl.reshape(dx, (BLOCK_E, BP0, BP1, BP2)), 0)
    tl.store(dx_base + offs, dx.to(dx_base.dtype.element_ty), mask=mask)


def parts_bwd_opts(geo: _Geometry2, mu: bool, dtype: torch.dtype, iters: int) -> tuple:
    """The backward parts pass's switches as one constexpr (each launch argument costs host
    time a call): STAGES and :func:`parts_bwd_tile`'s PTILE, PD0-PD2, PROWS0, PWT, EAX, USTRIDE,
    PJOIN, in that order."""
    def make():
        t = parts_bwd_tile(geo, mu, dtype, iters)
        return (geo.stages("parts_bwd"), t["PTILE"], t["PD0"], t["PD1"], t["PD2"], t["PROWS0"],
                t["PWT"], t["EAX"], t["USTRIDE"], t["PJOIN"])  # fmt: skip

    return geo._once(("parts_bwd_opts", mu, dtype, iters), make)


def apply_bwd_opts(geo: _Geometry2, mu: bool, dtype: torch.dtype, iters: int) -> tuple:
    """The backward apply's switches as one constexpr: STAGES, PREFETCH and :func:`apply_tile`'s
    BTILE, R2, WT, EAX, USTRIDE, R1, in that order."""
    def make():
        t = apply_tile(geo, mu, dtype, iters)
        return (geo.stages("apply_bwd"), geo.prefetch("apply_bwd"), t["BTILE"], t["R2"],
                t["WT"], t["EAX"], t["USTRIDE"], t["R1"])  # fmt: skip

    return geo._once(("apply_bwd_opts", mu, dtype, iters), make)


def parts_bwd_tile(geo: _Geometry2, mu: bool, dtype: torch.dtype, iters: int) -> dict:
    """The backward parts pass's tile constexprs (``TUNING["parts_bwd_tile"]``): PTILE, whether
    it takes PWT windows at a time as one tile (the third design's backward parts tile), where
    :func:`.bwd_parts_geometry` allows at the pass's warps and a tile's windows share their
    axis-0 coordinate; PD0-PD2, PROWS0, PWT, EAX; USTRIDE = T E (u: the last saved iterate).
    Built once per geometry and arguments."""
    return geo._once(("parts_bwd_tile", mu, dtype, iters),
                     lambda: _parts_bwd_tile_plan(geo, mu, dtype, iters))  # fmt: skip


def _parts_bwd_tile_plan(geo: _Geometry2, mu: bool, dtype: torch.dtype, iters: int) -> dict:
    warps = geo.launch("parts_bwd")["num_warps"]
    fits, plan = bwd_parts_geometry(geo, mu, dtype, geo.wpp, warps)
    use = bool(TUNING["parts_bwd_tile"]) and fits and geo.tiles_fit(plan["PWT"])
    return dict(PTILE=use, **plan, EAX=_E_AXIS, USTRIDE=iters * geo.E if use else geo.E)


def apply_tile(geo: _Geometry2, mu: bool, dtype: torch.dtype, iters: int) -> dict:
    """The backward apply's tile constexprs (``TUNING["apply_tile"]``): BTILE, whether it takes
    WT windows at a time as one run tile (the third design's output-pass tile: about a third of
    the per-window pass's instructions there, bench/results/static_designs/tiles.md), where
    :func:`.run_tile_geometry` allows at the pass's warps and a tile's windows share their
    axis-0 coordinate; R2, WT, EAX; USTRIDE = T E (u is the last iterate the forward saved).
    Built once per geometry and arguments."""
    return geo._once(("apply_tile", mu, dtype, iters),
                     lambda: _apply_tile_plan(geo, mu, dtype, iters))  # fmt: skip


def _apply_tile_plan(geo: _Geometry2, mu: bool, dtype: torch.dtype, iters: int) -> dict:
    fits, plan = run_tile_geometry(geo, mu, dtype, geo.wpp, geo.launch("apply_bwd")["num_warps"],
                                     True)  # fmt: skip
    use = bool(TUNING["apply_tile"]) and fits and geo.tiles_fit(plan["WT"])
    return dict(BTILE=use, **plan, USTRIDE=iters * geo.E if use else geo.E)


def backward2(x, g0, rowmask, hats, norms, kmat, dy, geo: _Geometry2, iters: int, mu: bool, *,
              wrap: bool = False) -> torch.Tensor:  # fmt: skip
    """dL/dx of the second design from the saved iterates and K (three launches; ``wrap`` as in
    ``window_nmf2._forward``)."""
    dev = x.device
    f32 = hats.dtype
    acc = acc_dtype(x.dtype)
    gpart = torch.empty(geo.slots, geo.E, dtype=f32, device=dev)  # unused slots stay unread
    sym = torch.empty(geo.progs, geo.E, geo.E, dtype=f32, device=dev)
    hbar = torch.empty(geo.progs, geo.E, dtype=f32, device=dev)
    launch(_parts_bwd_kernel, wrap=wrap)[geo.grid](
        x, dy, g0, rowmask, hats, gpart,
        geo.channels, geo.E, geo.heads, geo.nwin, geo.nvox, iters, geo.S[1], geo.S[2], *geo.NW,
        **geo.magic(), **geo.consts(), **geo.block(), MU=mu, ACC=acc,
        OPTS=parts_bwd_opts(geo, mu, x.dtype, iters), **geo.launch("parts_bwd"),
    )  # fmt: skip
    launch(_solve_bwd_kernel, wrap=wrap)[(geo.nwin, geo.bh)](
        gpart, kmat, hats, norms, sym, hbar, geo.E, geo.nwin, iters, *geo.NW,
        **geo.magic(heads=False), SHIFTS=geo.shifts, NSHIFT=geo.nshift, BLOCK_E=geo.block_e,
        ACC=acc, **geo.launch("solve"),
    )  # fmt: skip
    dx = torch.empty_like(x)
    launch(_apply_bwd_kernel2, wrap=wrap)[geo.grid](
        x, dy, dx, g0, rowmask, hats, sym, hbar,
        geo.channels, geo.E, geo.heads, geo.nwin, geo.nvox, iters, geo.S[1], geo.S[2], *geo.NW,
        **geo.magic(), **geo.consts(), **geo.block(), MU=mu, ACC=acc,
        OPTS=apply_bwd_opts(geo, mu, x.dtype, iters), **geo.launch("apply_bwd"),
    )  # fmt: skip
    return dx
