"""Backward of the second window design (kernels/window_nmf2.py): statistics from one read.

Per shifted window (first design's docstring, fastnmf/closed_form.py), with dY_s = dY / n_shifts:

    dP = dY_s X^T,  then back through the power steps: S = K̄ + K̄^T and h̄ (E^2 + E floats),
    dX = u (u^T dY_s) + S X + h̄ g0^T (per shift, summed), times ReLU'(x).

Both statistics the power-step backward needs, K = X X^T and dP, are sums over the voxels of the
window, so like K in the forward they split into parts: an unshifted window W meets at most 8
shifted windows per shift, and

    K_s(omega) = sum_parts X_b X_b^T,   dP_s(omega) = (1 / n_shifts) sum_parts dY_b X_b^T.

Three launches:

1. ``_parts_bwd_kernel``, per (batch*head, WPP unshifted windows): reads x and dy once, forms
   row i of x x^T and of dy x^T for every voxel and split-sums them into every shift's parts;
2. ``_solve_bwd_kernel``, per (batch*head, shifted window): sums the parts of each shift and runs
   ``_power_steps_backward`` from the saved iterates; writes S and h̄ in the first design's layout;
3. ``_apply_bwd_kernel2``, per (batch*head, WPP unshifted windows): reads x and dy a second time
   and sums the three terms of dX over the shifts, each part's (u, S, h̄) loaded once per window
   and shift (S x column by column: S[:, c] x_c).

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

from ._common import _power_steps_backward, acc_dtype
from ._window2_common import (
    _block_coords,
    _Geometry2,
    _pick,
    _shifted_g_all,
    _store_parts,
    _window_offsets,
    _window_origin,
)


@triton.jit
def _parts_bwd_kernel(
    x_ptr, dy_ptr, g0_ptr, rowmask_ptr, kpart_ptr, ppart_ptr,
    C, E, HEADS, NWIN, NVOX, S1, S2, NW1, NW2,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, WPP: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    offset = ((bh // HEADS) * C + (bh % HEADS) * E).to(tl.int64) * NVOX
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    e4 = e[:, None, None, None]
    rowmask = tl.load(rowmask_ptr + e, mask=emask, other=0).to(ACC)
    g_all = tl.zeros((NSB, BP0, BP1, BP2), dtype=ACC)
    if MU:  # g0 under every shift, once per program
        g_all = _shifted_g_all(g0_ptr, SHIFTS, NSHIFT, NSB, P0, P1, P2, BP0, BP1, BP2).to(ACC)
    for j in range(0, WPP):
        w = tl.program_id(0) * WPP + j
        if w < NWIN:
            w0, w1, w2 = _window_origin(w, NW1, NW2)
            ptrs, mask = _window_offsets(offset, e, emask, w0, w1, w2, NVOX, S1, S2,
                                         P0, P1, P2, BP0, BP1, BP2)  # fmt: skip
            x = tl.load(x_ptr + ptrs, mask=mask, other=0).to(ACC)
            x = tl.maximum(x, 0) * rowmask[:, None, None, None]  # (BLOCK_E, BP0, BP1, BP2)
            dy = tl.load(dy_ptr + ptrs, mask=mask, other=0).to(ACC)
            slot = (bh * NWIN + w) * (NSHIFT * 8)
            for i in tl.static_range(BLOCK_E):
                xi = tl.sum(tl.where(e4 == i, x, 0), axis=0)[None, :, :, :]  # row i of X
                dyi = tl.sum(tl.where(e4 == i, dy, 0), axis=0)[None, :, :, :]  # row i of dY
                row_ok = emask & (tl.full((BLOCK_E,), i, tl.int32) < E)
                for k in tl.static_range(NSHIFT):
                    xs = x
                    xsi = xi
                    if MU:
                        g = _pick(g_all, k, NSB)
                        xs = tl.where(g > 0, x, 0)
                        xsi = tl.where(g > 0, xi, 0)
                    part = (slot + k * 8) * E * E + i * E
                    _store_parts(xs * xsi, kpart_ptr + part, E * E, e, row_ok,
                                 SHIFTS[k][0], SHIFTS[k][1], SHIFTS[k][2],
                                 P0, P1, P2, BP0, BP1, BP2)  # fmt: skip
                    _store_parts(xs * dyi, ppart_ptr + part, E * E, e, row_ok,
                                 SHIFTS[k][0], SHIFTS[k][1], SHIFTS[k][2],
                                 P0, P1, P2, BP0, BP1, BP2)  # fmt: skip


@triton.jit
def _solve_bwd_kernel(
    kpart_ptr, ppart_ptr, hats_ptr, norms_ptr, sym_ptr, hbar_ptr,
    E, NWIN, ITERS, NW0, NW1, NW2,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, BLOCK_E: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    om = tl.program_id(0)  # a shifted window
    bh = tl.program_id(1)
    o0, o1, o2 = _window_origin(om, NW1, NW2)
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    ee = e[:, None] * E + e[None, :]
    emask2 = emask[:, None] & emask[None, :]
    for k in tl.static_range(NSHIFT):
        k_mat = tl.zeros((BLOCK_E, BLOCK_E), dtype=ACC)
        dp = tl.zeros((BLOCK_E, BLOCK_E), dtype=ACC)
        for b2 in tl.static_range(2 if SHIFTS[k][2] else 1):
            w2 = (o2 - b2 - SHIFTS[k][5] + 2 * NW2) % NW2
            for b1 in tl.static_range(2 if SHIFTS[k][1] else 1):
                w1 = (o1 - b1 - SHIFTS[k][4] + 2 * NW1) % NW1
                for b0 in tl.static_range(2 if SHIFTS[k][0] else 1):
                    w0 = (o0 - b0 - SHIFTS[k][3] + 2 * NW0) % NW0
                    w = (w0 * NW1 + w1) * NW2 + w2  # the unshifted window holding this part
                    slot = (bh * NWIN + w) * (NSHIFT * 8) + k * 8 + (b0 * 2 + b1) * 2 + b2
                    k_mat += tl.load(kpart_ptr + slot * E * E + ee, mask=emask2, other=0)
                    dp += tl.load(ppart_ptr + slot * E * E + ee, mask=emask2, other=0)
        dp = dp / NSHIFT  # rows: dY_s = dY / n_shifts
        prog = (bh * NSHIFT + k) * NWIN + om
        sym, hbar = _power_steps_backward(k_mat, dp, hats_ptr + prog * ITERS * E,
                                          norms_ptr + prog * ITERS, e, emask, E, ITERS, BLOCK_E,
                                          ACC)  # fmt: skip
        tl.store(sym_ptr + prog * E * E + ee, sym, mask=emask2)
        tl.store(hbar_ptr + prog * E + e, hbar, mask=emask)


@triton.jit
def _apply_bwd_kernel2(
    x_ptr, dy_ptr, dx_ptr, g0_ptr, rowmask_ptr, hats_ptr, sym_ptr, hbar_ptr,
    C, E, HEADS, NWIN, NVOX, ITERS, S1, S2, NW0, NW1, NW2,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, WPP: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """dX = sum_s [u (u^T dY_s) + S x + h̄ g0_s^T] times ReLU'(x), per unshifted window, each
    part's (u, S, h̄) those of the shifted window it lies in (S applied column by column)."""
    bh = tl.program_id(1)
    offset = ((bh // HEADS) * C + (bh % HEADS) * E).to(tl.int64) * NVOX
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    e4 = e[:, None, None, None]
    rowmask = tl.load(rowmask_ptr + e, mask=emask, other=0).to(ACC)
    g_all = _shifted_g_all(g0_ptr, SHIFTS, NSHIFT, NSB, P0, P1, P2, BP0, BP1, BP2).to(ACC)
    q0, q1, q2 = _block_coords(BP0, BP1, BP2)
    for j in range(0, WPP):
        w = tl.program_id(0) * WPP + j
        if w < NWIN:
            w0, w1, w2 = _window_origin(w, NW1, NW2)
            ptrs, mask = _window_offsets(offset, e, emask, w0, w1, w2, NVOX, S1, S2,
                                         P0, P1, P2, BP0, BP1, BP2)  # fmt: skip
            x_raw = tl.load(x_ptr + ptrs, mask=mask, other=0).to(ACC)
            x = tl.maximum(x_raw, 0) * rowmask[:, None, None, None]  # (BLOCK_E, BP0, BP1, BP2)
            dy = tl.load(dy_ptr + ptrs, mask=mask, other=0).to(ACC) / NSHIFT
            dx = tl.zeros((BLOCK_E, BP0, BP1, BP2), dtype=ACC)
            for k in tl.static_range(NSHIFT):
                g = _pick(g_all, k, NSB)
                uu = tl.zeros((BLOCK_E, BP0, BP1, BP2), dtype=ACC)  # u of each voxel's window
                hh = tl.zeros((BLOCK_E, BP0, BP1, BP2), dtype=ACC)  # h̄ likewise
                for b2 in tl.static_range(2 if SHIFTS[k][2] else 1):
                    m2 = (q2 >= P2 - SHIFTS[k][2]).to(tl.int32) == b2
                    o2 = (w2 + b2 + SHIFTS[k][5]) % NW2
                    for b1 in tl.static_range(2 if SHIFTS[k][1] else 1):
                        m1 = (q1 >= P1 - SHIFTS[k][1]).to(tl.int32) == b1
                        o1 = (w1 + b1 + SHIFTS[k][4]) % NW1
                        for b0 in tl.static_range(2 if SHIFTS[k][0] else 1):
                            m = ((q0 >= P0 - SHIFTS[k][0]).to(tl.int32) == b0) & m1 & m2
                            o0 = (w0 + b0 + SHIFTS[k][3]) % NW0
                            prog = (bh * NSHIFT + k) * NWIN + (o0 * NW1 + o1) * NW2 + o2
                            u = tl.load(hats_ptr + (prog * ITERS + ITERS - 1) * E + e,
                                        mask=emask, other=0)  # fmt: skip
                            hb = tl.load(hbar_ptr + prog * E + e, mask=emask, other=0)
                            uu = tl.where(m, u[:, None, None, None], uu)
                            hh = tl.where(m, hb[:, None, None, None], hh)
                cu = tl.sum(uu * dy, axis=0)[None, :, :, :]  # u^T dY_s per voxel
                t = uu * cu + hh * g
                for c in tl.static_range(BLOCK_E):  # S x = sum_c S[:, c] x_c, S per part
                    scol = tl.zeros((BLOCK_E, BP0, BP1, BP2), dtype=ACC)
                    for b2 in tl.static_range(2 if SHIFTS[k][2] else 1):
                        m2 = (q2 >= P2 - SHIFTS[k][2]).to(tl.int32) == b2
                        o2 = (w2 + b2 + SHIFTS[k][5]) % NW2
                        for b1 in tl.static_range(2 if SHIFTS[k][1] else 1):
                            m1 = (q1 >= P1 - SHIFTS[k][1]).to(tl.int32) == b1
                            o1 = (w1 + b1 + SHIFTS[k][4]) % NW1
                            for b0 in tl.static_range(2 if SHIFTS[k][0] else 1):
                                m = ((q0 >= P0 - SHIFTS[k][0]).to(tl.int32) == b0) & m1 & m2
                                o0 = (w0 + b0 + SHIFTS[k][3]) % NW0
                                prog = (bh * NSHIFT + k) * NWIN + (o0 * NW1 + o1) * NW2 + o2
                                col = tl.load(sym_ptr + prog * E * E + e * E + c,
                                              mask=emask & (tl.full((BLOCK_E,), c, tl.int32) < E),
                                              other=0)  # fmt: skip
                                scol = tl.where(m, col[:, None, None, None], scol)
                    t += scol * tl.sum(tl.where(e4 == c, x, 0), axis=0)[None, :, :, :]
                if MU:
                    t = tl.where(g > 0, t, 0)
                dx += t
            dx = tl.where(x_raw > 0, dx * rowmask[:, None, None, None], 0)
            tl.store(dx_ptr + ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def backward2(x, g0, rowmask, hats, norms, dy, geo: _Geometry2, iters: int,
              mu: bool) -> torch.Tensor:  # fmt: skip
    """dL/dx of the second design from the saved iterates (three launches)."""
    dev = x.device
    f32 = hats.dtype
    acc = acc_dtype(x.dtype)
    slots = geo.bh * geo.nwin * geo.nshift * 8
    kpart = torch.empty(slots, geo.E, geo.E, dtype=f32, device=dev)  # unused slots stay unread
    ppart = torch.empty(slots, geo.E, geo.E, dtype=f32, device=dev)
    progs = hats.shape[0]
    sym = torch.empty(progs, geo.E, geo.E, dtype=f32, device=dev)
    hbar = torch.empty(progs, geo.E, dtype=f32, device=dev)
    _parts_bwd_kernel[(triton.cdiv(geo.nwin, geo.wpp), geo.bh)](
        x, dy, g0, rowmask, kpart, ppart,
        geo.channels, geo.E, geo.heads, geo.nwin, geo.nvox, geo.S[1], geo.S[2], *geo.NW[1:],
        **geo.consts(), **geo.block(), MU=mu, ACC=acc, num_warps=geo.warps,
    )  # fmt: skip
    _solve_bwd_kernel[(geo.nwin, geo.bh)](
        kpart, ppart, hats, norms, sym, hbar, geo.E, geo.nwin, iters, *geo.NW,
        SHIFTS=geo.shifts, NSHIFT=geo.nshift, BLOCK_E=geo.block_e, ACC=acc, num_warps=1,
    )  # fmt: skip
    dx = torch.empty_like(x)
    _apply_bwd_kernel2[(triton.cdiv(geo.nwin, geo.wpp), geo.bh)](
        x, dy, dx, g0, rowmask, hats, sym, hbar,
        geo.channels, geo.E, geo.heads, geo.nwin, geo.nvox, iters, geo.S[1], geo.S[2], *geo.NW,
        **geo.consts(), **geo.block(), MU=mu, ACC=acc, num_warps=geo.warps,
    )  # fmt: skip
    return dx
