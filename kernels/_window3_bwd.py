"""Backward of the third window design (kernels/window_nmf3.py): the second design's three
backward passes (kernels/_window2_bwd.py: parts of ū from one read of x and dy, the power-step
backward per shifted window, the output pass dX) in one persistent launch on the same plane
schedule (kernels/_window3_sched.py), so that the output pass reads x and dy from L2.

The needs are the forward's: the backward solve of a shifted window sums the ū parts of the
unshifted windows holding its parts, and the output pass of a window takes S and h̄ of the shifted
windows it lies in. u, K and h come from the forward (an earlier launch); the power iterates are
recomputed from K and h, so the forward saves E^2 + 2 E floats per shifted window (K whole, so
that it loads as rows of E^2 that lie in one warp: ``_load_square_batch``) instead of the second
design's (T + 1) E + T + E (E + 1) / 2. The solves run a ticket's WPP shifted windows under every
shift at once (:func:`_solve_bwd_batch`, the loop of ``_steps_backward``), with T compile-time:
up to ``_HELD_ITERS`` steps the iterates are computed once and held (T - 1 products with K, not
T (T - 1) / 2 recomputing them before each step back). Every vector is kept as rows and as
columns, each form from the other's by a product with K, and S is summed from both outer products
of a step (:func:`_steps_back`): nothing changes layout, and with K's rows in one warp no sum
crosses warps (sm_90a, Triton 3.6, fp32 [None, 2, 4, 6], a ticket's backward: 75 -> 41 CTA
barriers, 4,731 -> 4,795 instructions; [None, 4] 79 -> 53; the vectors moved between the forms'
layouts through shared memory before).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TRITON_VERSION, acc_dtype, launch
from ._window2_bwd import _apply_bwd_window, _parts_bwd_window
from ._window2_common import _Geometry2, _lanes_rowmask_g, _plane_w0
from ._window3_bwd_parts_tile import _parts_bwd_tile, bwd_parts_plan
from ._window3_bwd_tile import _apply_tile, bwd_tile_plan
from ._window3_power import _iterate_both_to, _kdot, _load_both, _next_both, _normed
from ._window3_sched import _MAGIC_ARGS, Pipeline, _take
from ._window3_slots import _load_square_batch, _solve_rows, _store_square_batch, _sum_parts_rows
from ._window3_waits import _count_done, _wait

__all__ = ["backward3"]

# Up to this many power steps (T, compile-time in the backward) the solve computes the iterates
# once and holds them (T - 1 products of K and a vector, not T (T - 1) / 2 recomputing them): a
# thread holds about 4 values an iterate (its rows, columns and norm; sm_90a, 16 warps, 16 rows)
_HELD_ITERS = tl.constexpr(8)
# Triton before 3.7 (3.6: the GPU machine's; its ptxas 12.8) compiles the one-shift backward at 64
# registers and spills (sm_90a, 16 warps, [None]: fp32 48 B, bf16 0-24 B); at the register cap of
# a thread's share (128) nothing. With more shifts, or with Triton 3.9, the cap spills more (3.6
# [None, 2, 4, 6]: 88 B fp32, 140 B bf16; 3.9: 24-144 B): bench/results/static_designs/
_CAP_ONE_SHIFT = TRITON_VERSION < (3, 7)
# Triton from 3.7 (ptxas 13) gives the backward of windows smaller than its program (fewer
# values E P^d than threads: the isles preset's E = P = 4) 64 registers unasked and spills (sm_90a,
# 16 warps, [None, 1, 2, 3]: 56 B fp32 and bf16); at the cap, 122 registers, none, and 3,168
# instructions against 3,224. Capped, E = 2, P = 4 and 2D E = 4, P = 8 do not spill either and
# issue fewer too. Triton 3.6's ptxas spills there capped (E = 2, P = 4: 24 / 56 B), not uncapped.
_CAP_SMALL_WINDOWS = TRITON_VERSION >= (3, 7)


def share_cap(geo: _Geometry2, pipe: Pipeline) -> bool:
    """Whether the backward launches at ptxas's register cap of a thread's share
    (``Pipeline.launch``): with one shift and a Triton before 3.7 (``_CAP_ONE_SHIFT``), or with
    windows of fewer values than the program has threads (``Pipeline.small_windows``) and a
    Triton from 3.7 (``_CAP_SMALL_WINDOWS``)."""
    return ((_CAP_ONE_SHIFT and geo.nshift == 1)
            or (_CAP_SMALL_WINDOWS and pipe.small_windows(geo)))  # fmt: skip


@triton.jit(noinline=True)
def _solve_chunk(gpart_ptr, kmat_ptr, hsave_ptr, sym_ptr, hbar_ptr, bh, first, plane, NPLANE,
                 flags, flag_ptr, NPL, E: tl.constexpr, NWIN, ITERS: tl.constexpr, NW0, NW1, NW2,
                 MW2, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, SPLITS: tl.constexpr,
                 NB: tl.constexpr, NSBP: tl.constexpr, BLOCK_E: tl.constexpr,
                 ACC: tl.constexpr):  # fmt: skip
    """The backward solves of one ticket (WPP shifted windows of a plane from ``first``, NSBP
    shift rows each: ``Pipeline.solve_shifts``);
    counts the chunk done and returns the next ticket (as the other passes: ``_fused_bwd_kernel``
    says why)."""
    W0 = _plane_w0(plane, NW0)  # the windows' coordinate along axis 0
    _solve_bwd_batch(gpart_ptr, kmat_ptr, hsave_ptr, sym_ptr, hbar_ptr, bh, first, plane,
                     NPLANE, E, NWIN, ITERS, NW0, NW1, NW2, MW2, W0, SHIFTS, NSHIFT, SPLITS,
                     NB, NSBP, BLOCK_E, ACC)  # fmt: skip
    _count_done(flags, 1, plane, NPL)
    return tl.atomic_add(flag_ptr, 1)  # the next ticket


@triton.jit
def _back(a_hat, norm, grad, AX: tl.constexpr):
    """ā of one power step back, the gradient through â = a / ||a||, for rows (AX = 2) or
    columns (AX = 1)."""
    radial = tl.expand_dims(tl.sum(a_hat * grad, axis=AX), AX)
    return tl.where(norm > 0, (grad - a_hat * radial) / tl.where(norm > 0, norm, 1), 0)


@triton.jit
def _step_both(k_mat, row, col, nr, nc, g_row, g_col):
    """One step back in both forms: ā_t as rows and columns from â_t and the gradient, and the
    next gradient K ā_t in both forms."""
    b_row = _back(row, nr, g_row, 2)
    b_col = _back(col, nc, g_col, 1)
    return b_row, b_col, _kdot(k_mat, b_col, 1), _kdot(k_mat, b_row, 2)


@triton.jit
def _steps_back(k_mat, h_row, h_col, g_row, g_col, ITERS: tl.constexpr):
    """S = K̄ + K̄^T (NB, E, E) and h̄ (rows) back through the T power steps from ū (as rows
    g_row and columns g_col):
    every vector as rows (NB, 1, E) and as columns (NB, E, 1), and S summed as each step's
    outer product â_{t-1} ā_t^T and its transpose, so nothing is transposed or moved between
    the two forms' layouts. Up to ``_HELD_ITERS`` steps the iterates are computed once and held,
    else recomputed before each step back (:func:`_iterate_both_to`): the same operations, so
    the same values."""
    sym = tl.zeros(k_mat.shape, dtype=k_mat.dtype)
    if ITERS <= _HELD_ITERS:
        row, nr = _normed(h_row, 2)
        col, nc = _normed(h_col, 1)
        rows = (row,)
        cols = (col,)
        nrs = (nr,)
        ncs = (nc,)
        for _s in tl.static_range(1, ITERS):
            row, col, nr, nc = _next_both(k_mat, row, col)
            rows = rows + (row,)
            cols = cols + (col,)
            nrs = nrs + (nr,)
            ncs = ncs + (nc,)
        for i in tl.static_range(ITERS):  # the steps t = T - 1 - i
            b_row, b_col, g_row, g_col = _step_both(k_mat, rows[ITERS - 1 - i],
                                                    cols[ITERS - 1 - i], nrs[ITERS - 1 - i],
                                                    ncs[ITERS - 1 - i], g_row, g_col)  # fmt: skip
            if i < ITERS - 1:  # none at t = 0
                sym += cols[ITERS - 2 - i] * b_row + b_col * rows[ITERS - 2 - i]
    else:
        b_row = g_row
        for i in range(0, ITERS):
            t = ITERS - 1 - i
            prev_row, prev_col, row, col, nr, nc = _iterate_both_to(k_mat, h_row, h_col, t)
            b_row, b_col, g_row, g_col = _step_both(k_mat, row, col, nr, nc, g_row, g_col)
            sym += tl.where(t > 0, prev_col * b_row + b_col * prev_row, 0.0)  # none at t = 0
    return sym, b_row  # h̄ = ā_1


@triton.jit
def _solve_bwd_batch(gpart_ptr, kmat_ptr, hsave_ptr, sym_ptr, hbar_ptr, bh, first, plane,
                     NPLANE, E: tl.constexpr, NWIN, ITERS: tl.constexpr, NW0, NW1, NW2, MW2,
                     W0, SHIFTS: tl.constexpr,
                     NSHIFT: tl.constexpr, SPLITS: tl.constexpr, NB: tl.constexpr,
                     NSB: tl.constexpr,
                     BLOCK_E: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """The second design's backward solve (``_solve_bwd_kernel``) for a ticket's NB shifted
    windows from ``first`` under every shift at once (the rows of ``_solve_rows``): ū from its
    parts, then back through the power steps with the saved K and the iterates recomputed from K
    and h (:func:`_steps_back`): S = K̄ + K̄^T and h̄. K is loaded and S stored as rows of E^2
    (``_load_square_batch``), which keeps every matrix in one warp: no sum crosses warps."""
    e = tl.arange(0, BLOCK_E)
    j3 = e[None, None, :]
    k, om, ok = _solve_rows(first, plane, NPLANE, NB, NSB, NSHIFT)
    ok3 = ok[:, None, None]
    # ū, its parts flat (no ring: the plane size and count, NB and 1 here, are unused)
    _, grad = _sum_parts_rows(gpart_ptr, gpart_ptr, bh, om, ok, k, NWIN, NW0, NW1, NW2, NB, 1,
                              SHIFTS, NSHIFT, SPLITS, E, NSB * NB, BLOCK_E, ACC, False,
                              0, False, 1, MW2, W0, 0)  # fmt: skip
    prog = (bh * NSHIFT + k) * NWIN + om
    prog3 = prog[:, None, None]
    k_mat = _load_square_batch(kmat_ptr, prog, ok, E, BLOCK_E)
    h_row, h_col = _load_both(hsave_ptr, prog, ok, E, BLOCK_E)
    # ū through h̄'s slots into both forms' layouts (summed from the parts it lies across warps,
    # and its two forms were layout conversions): a barrier after the stores, and one before h̄
    # overwrites what other threads loaded; a ticket's backward, sm_90a, fp32: 3 CTA barriers
    # fewer (Triton 3.6: 41 -> 38 [None, 2, 4, 6], 53 -> 50 [None, 4]; 3.9: 98 -> 95, 66 -> 63),
    # as many instructions
    tl.store(hbar_ptr + prog[:, None] * E + e[None, :], grad, mask=ok[:, None] & (e[None, :] < E))
    tl.debug_barrier()
    g_row, g_col = _load_both(hbar_ptr, prog, ok, E, BLOCK_E)
    sym, hbar = _steps_back(k_mat, h_row, h_col, g_row, g_col, ITERS)
    _store_square_batch(sym_ptr, prog, sym, ok, E)
    tl.debug_barrier()
    tl.store(hbar_ptr + prog3 * E + j3, hbar, mask=ok3 & (j3 < E))


@triton.jit(noinline=True)
def _apply_chunk(x_ptr, dy_ptr, dx_ptr, rowmask_ptr, g0_ptr, first, plane, NPLANE, bh, u_ptr,
                 sym_ptr, hbar_ptr, flags, flag_ptr, NPL, E: tl.constexpr, NWIN, NVOX, ITERS,
                 S1, S2, NW0, NW1, NW2, MW2,
                 SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, WPP: tl.constexpr,
                 P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                 BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
                 BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
                 G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, BTILE: tl.constexpr,
                 R1: tl.constexpr, R2: tl.constexpr, WT: tl.constexpr,
                 EAX: tl.constexpr, LAST: tl.constexpr):  # fmt: skip
    """The output passes of one ticket (the windows of a plane from ``first``): as one tile
    (BTILE, kernels/_window3_bwd_tile.py) or window by window, g0 under every shift loaded once
    a ticket (from L1: 2 KB a shift in fp32)."""
    W0 = _plane_w0(plane, NW0)  # the windows' coordinate along axis 0
    if BTILE:
        _apply_tile(x_ptr, dy_ptr, dx_ptr, g0_ptr, first, plane, NPLANE, bh, u_ptr, sym_ptr,
                    hbar_ptr, E, NWIN, NVOX, S1, S2, NW0, NW1, NW2, MW2, W0, SHIFTS, NSHIFT,
                    WPP, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, R1, R2, WT, EAX, LAST)  # fmt: skip
    else:
        e, emask, rowmask, g_all = _lanes_rowmask_g(rowmask_ptr, g0_ptr, E, SHIFTS, NSHIFT, P0,
                                                    P1, P2, BP0, BP1, BP2, BLOCK_E, NSB, ACC,
                                                    True)  # fmt: skip
        for j in range(0, WPP):
            if first + j < NPLANE:
                w = plane * NPLANE + first + j
                # w < NWIN always holds, but the compiler cannot tell: bh, g0 and NW2's magic
                # number pass through a select on it, so what depends on them is computed per
                # window, not hoisted out of this loop (Triton 3.6, sm_90a, bf16 [None, 2, 4, 6]:
                # 72 spill bytes with bh and g0 hoisted, 24 B with the magic number's halves)
                ok = w < NWIN
                _apply_bwd_window(x_ptr, dy_ptr, dx_ptr, rowmask, e, emask, w,
                                  tl.where(ok, bh, 0), tl.where(ok, g_all, 0.0), u_ptr, sym_ptr,
                                  hbar_ptr, E, NWIN, NVOX, ITERS, S1, S2, NW0, NW1, NW2, SHIFTS,
                                  NSHIFT, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, NSB, G0, G1, G2, MU,
                                  ACC, True, tl.where(ok, MW2, 0),
                                  _plane_w0(tl.where(ok, plane, 0), NW0))  # CG  # fmt: skip
    _count_done(flags, 2, plane, NPL)
    return tl.atomic_add(flag_ptr, 1)  # the next ticket


@triton.jit(noinline=True)
def _parts_chunk(x_ptr, dy_ptr, rowmask_ptr, g0_ptr, first, plane, NPLANE, bh, u_ptr,
                 gpart_ptr, flags, flag_ptr, NPL, E: tl.constexpr, NWIN, NVOX, ITERS, S1, S2,
                 NW0, NW1, NW2, MW2,
                 SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, WPP: tl.constexpr,
                 P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                 BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
                 BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
                 G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, PTILE: tl.constexpr,
                 PD0: tl.constexpr, PD1: tl.constexpr, PD2: tl.constexpr, PROWS0: tl.constexpr,
                 PWT: tl.constexpr, EAX: tl.constexpr, PJOIN: tl.constexpr):  # fmt: skip
    """The backward parts passes of one ticket: as tiles (PTILE,
    kernels/_window3_bwd_parts_tile.py) or window by window (g0 under every shift only with
    MU)."""
    W0 = _plane_w0(plane, NW0)  # the windows' coordinate along axis 0
    if PTILE:
        _parts_bwd_tile(x_ptr, dy_ptr, first, plane, NPLANE, bh, u_ptr, gpart_ptr, E, NWIN, NVOX,
                        S1, S2, NW0, NW1, NW2, MW2, W0, SHIFTS, NSHIFT, WPP, P0, P1, P2, BP0,
                        BP1, BP2, BLOCK_E, NSB, PD0, PD1, PD2, PROWS0, PWT, EAX,
                        PJOIN)  # fmt: skip
    else:
        e, emask, rowmask, g_all = _lanes_rowmask_g(rowmask_ptr, g0_ptr, E, SHIFTS, NSHIFT, P0,
                                                    P1, P2, BP0, BP1, BP2, BLOCK_E, NSB, ACC,
                                                    MU)  # fmt: skip
        for j in range(0, WPP):
            if first + j < NPLANE:
                _parts_bwd_window(x_ptr, dy_ptr, rowmask, e, emask,
                                  plane * NPLANE + first + j, bh, g_all, u_ptr, gpart_ptr,
                                  E, NWIN, NVOX, ITERS, S1, S2, NW0, NW1, NW2, SHIFTS, NSHIFT,
                                  P0, P1, P2, BP0, BP1, BP2, BLOCK_E, NSB, G0, G1, G2, MU,
                                  ACC, MW2, W0)  # fmt: skip
    _count_done(flags, 0, plane, NPL)
    return tl.atomic_add(flag_ptr, 1)  # the next ticket


@triton.jit(do_not_specialize=_MAGIC_ARGS)
def _fused_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, g0_ptr, rowmask_ptr, u_ptr, hsave_ptr, kmat_ptr, gpart_ptr,
    sym_ptr, hbar_ptr, flag_ptr, NTICKET, SPB, CPP, NPLANE, NPL,
    C, E: tl.constexpr, HEADS, NWIN, NVOX, ITERS: tl.constexpr, S1, S2, NW0, NW1, NW2,
    MSPB, MCPP, MHEADS, MNPL1, MW2, MGCPP,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, WPP: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, RING: tl.constexpr,
    OFFS: tl.constexpr, NOFF: tl.constexpr, NSBP: tl.constexpr,
    TWAIT: tl.constexpr, SKEW: tl.constexpr, GROUP: tl.constexpr, LAST: tl.constexpr,
    SPLITS: tl.constexpr, BTILE: tl.constexpr,
    R1: tl.constexpr, R2: tl.constexpr, WT: tl.constexpr, EAX: tl.constexpr, PTILE: tl.constexpr,
    PD0: tl.constexpr, PD1: tl.constexpr, PD2: tl.constexpr, PROWS0: tl.constexpr,
    PWT: tl.constexpr, PJOIN: tl.constexpr,
):  # fmt: skip
    """Persistent, like the forward's ``_fused_kernel``: the backward parts, solves and output
    passes of every (batch*head, plane, chunk) in ticket order (RING is 0: the ū parts, E floats
    each, stay flat). Each pass is a function that is not inlined (``noinline``): inlined, the
    compiler hoists every pass's loop-invariant index tensors out of the ticket loop, where they
    hold registers through the other passes too (sm_90a, 16 warps, 128 registers: 8-44 spill
    bytes with [None] and [None, 4]); called, each pass has the registers to itself. Each pass
    also counts its chunk done and takes the next ticket (the counter is flag_ptr itself), so
    nothing but the ticket lives across a call (Triton 3.6 saved the counter's address and the
    tickets-per-head product around the calls: 16-64 spill bytes with [None]). M*: the magic
    numbers of the run-time divisors (``Pipeline.magic``): no division."""
    t = tl.atomic_add(flag_ptr, 1)  # the ticket counter
    while t < NTICKET:
        bh, phase, plane, chunk, offset, flags = _take(t, SPB, CPP, flag_ptr, NPL, HEADS, C, E,
                                                       NVOX, MSPB, MCPP, MHEADS,
                                                       SKEW, GROUP, MGCPP)  # fmt: skip
        first = chunk * WPP  # in the plane
        if phase == 0:
            t = _parts_chunk(x_ptr + offset, dy_ptr + offset, rowmask_ptr, g0_ptr, first, plane,
                             NPLANE, bh, u_ptr, gpart_ptr, flags, flag_ptr, NPL, E, NWIN, NVOX, 1,
                             S1, S2, NW0, NW1, NW2, MW2, SHIFTS, NSHIFT, WPP, P0, P1, P2,
                             BP0, BP1, BP2, BLOCK_E, NSB, G0, G1, G2, MU, ACC, PTILE, PD0, PD1,
                             PD2, PROWS0, PWT, EAX, PJOIN)  # fmt: skip
        elif phase == 1:
            _wait(flags, NPL, plane, 1, CPP, OFFS, NOFF, TWAIT)
            t = _solve_chunk(gpart_ptr, kmat_ptr, hsave_ptr, sym_ptr, hbar_ptr, bh, first,
                             plane, NPLANE, flags, flag_ptr, NPL, E, NWIN, ITERS, NW0, NW1, NW2,
                             MW2, SHIFTS, NSHIFT, SPLITS, WPP, NSBP, BLOCK_E,
                             ACC)  # fmt: skip
        else:
            _wait(flags, NPL, plane, 2, CPP, OFFS, NOFF, TWAIT)
            t = _apply_chunk(x_ptr + offset, dy_ptr + offset, dx_ptr + offset, rowmask_ptr,
                             g0_ptr, first, plane, NPLANE, bh, u_ptr, sym_ptr, hbar_ptr, flags,
                             flag_ptr, NPL, E, NWIN, NVOX, 1, S1, S2, NW0, NW1, NW2, MW2,
                             SHIFTS, NSHIFT, WPP, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, NSB, G0, G1,
                             G2, MU, ACC, BTILE, R1, R2, WT, EAX, LAST)  # fmt: skip


def backward3(x, g0, rowmask, u, h, kmat, dy, geo: _Geometry2, plan, iters: int, mu: bool, *,
              wrap: bool = False) -> torch.Tensor:  # fmt: skip
    """dL/dx of the third design from the forward's u, h and K (one persistent launch; the
    window bodies take u as the last of 1 iterate; ``wrap`` as in
    ``window_nmf3._fused_forward``)."""
    dev = x.device
    f32 = u.dtype
    gpart = torch.empty(geo.slots, geo.E, dtype=f32, device=dev)  # unused slots stay unread
    sym = torch.empty(geo.progs, geo.E, geo.E, dtype=f32, device=dev)
    hbar = torch.empty(geo.progs, geo.E, dtype=f32, device=dev)
    pipe = Pipeline(geo, plan, dev)
    dx = torch.empty_like(x)
    launch(_fused_bwd_kernel, wrap=wrap)[pipe.grid](
        x, dy, dx, g0, rowmask, u, h, kmat, gpart, sym, hbar, *pipe.args(),
        geo.channels, geo.E, geo.heads, geo.nwin, geo.nvox, iters, geo.S[1], geo.S[2], *geo.NW,
        **pipe.magic(geo), **geo.consts(), **pipe.block(geo), MU=mu, ACC=acc_dtype(x.dtype),
        **bwd_tile_plan(geo, mu, x.dtype, pipe.wpp, pipe.warps()),
        **bwd_parts_plan(geo, mu, x.dtype, pipe.wpp, pipe.warps()),
        **pipe.launch(share_cap=share_cap(geo, pipe)),
    )  # fmt: skip
    return dx

