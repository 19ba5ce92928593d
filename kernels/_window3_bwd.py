"""Backward of the third window design (kernels/window_nmf3.py): the second design's three
backward passes (kernels/_window2_bwd.py: parts of ū from one read of x and dy, the power-step
backward per shifted window, the output pass dX) in one persistent launch on the same plane
schedule (kernels/_window3_sched.py), so that the output pass reads x and dy from L2.

The needs are the forward's: the backward solve of a shifted window sums the ū parts of the
unshifted windows holding its parts, and the output pass of a window takes S and h̄ of the shifted
windows it lies in. u, K and h come from the forward (an earlier launch); the power iterates are
recomputed from K and h, so the forward saves E (E + 1) / 2 + 2 E floats per shifted window
instead of the second design's (T + 1) E + T + E (E + 1) / 2. The solves run a ticket's WPP
shifted windows under every shift at once (:func:`_solve_bwd_batch`, the loop of
``_steps_backward``), with T compile-time: up to ``_HELD_ITERS`` steps the iterates are computed
once and held (T - 1 products with K, not T (T - 1) / 2 recomputing them before each step back;
sm_90a, fp32 [None, 2, 4, 6], T = 5: 722 warp instructions a ticket with Triton 3.9, 832 with
3.6, where the recomputing solve issued 1,008 / 1,194), and no sum in them crosses warps (Triton
3.6 spilled such sums' last values: the BraTS backward's solve 8 B).
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
from ._window3_sched import (
    _MAGIC_ARGS,
    Pipeline,
    _count_done,
    _load_sym_batch,
    _solve_rows,
    _sum_parts_rows,
    _take,
    _wait_stage,
)

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


def share_cap(nshift: int) -> bool:
    """Whether the backward launches at ptxas's register cap of a thread's share
    (``Pipeline.launch``): only with one shift and a Triton before 3.7 (``_CAP_ONE_SHIFT``)."""
    return _CAP_ONE_SHIFT and nshift == 1


@triton.jit(noinline=True)
def _solve_chunk(gpart_ptr, kmat_ptr, hsave_ptr, sym_ptr, hbar_ptr, bh, first, plane, NPLANE,
                 flags, flag_ptr, NPL, E: tl.constexpr, NWIN, ITERS: tl.constexpr, NW0, NW1, NW2,
                 MW2, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, SPLITS: tl.constexpr,
                 NB: tl.constexpr, NSB: tl.constexpr, BLOCK_E: tl.constexpr,
                 ACC: tl.constexpr):  # fmt: skip
    """The backward solves of one ticket (WPP shifted windows of a plane from ``first``);
    counts the chunk done and returns the next ticket (as the other passes: ``_fused_bwd_kernel``
    says why)."""
    W0 = _plane_w0(plane, NW0)  # the windows' coordinate along axis 0
    _solve_bwd_batch(gpart_ptr, kmat_ptr, hsave_ptr, sym_ptr, hbar_ptr, bh, first, plane,
                     NPLANE, E, NWIN, ITERS, NW0, NW1, NW2, MW2, W0, SHIFTS, NSHIFT, SPLITS,
                     NB, NSB, BLOCK_E, ACC)  # fmt: skip
    _count_done(flags, 1, plane, NPL)
    return tl.atomic_add(flag_ptr, 1)  # the next ticket


@triton.jit
def _first_iterate(h_row, h_col):
    """â_0 = h / ||h|| as rows (NB, 1, E) and columns (NB, E, 1), and ||h|| (NB, 1, 1)."""
    norm = tl.sqrt(tl.sum(h_row * h_row, axis=2))[:, :, None]
    safe = tl.where(norm > 0, norm, 1)
    return tl.where(norm > 0, h_row / safe, 0), tl.where(norm > 0, h_col / safe, 0), norm


@triton.jit
def _next_iterate(k_mat, row):
    """â_s = K â_{s-1} / ||K â_{s-1}|| from â_{s-1}'s rows: rows, columns, norm. The product sums
    along the last axis (within a warp) and gives the columns; the rows are them moved once; the
    norm sums the rows along their last axis (within a warp too): no sum across warps (Triton
    3.6's ptxas spills the predicated shared-memory read that ends one)."""
    col = tl.sum(k_mat * row, axis=2)
    row = col[:, None, :]
    norm = tl.sqrt(tl.sum(row * row, axis=2))[:, :, None]
    safe = tl.where(norm > 0, norm, 1)
    return tl.where(norm > 0, row / safe, 0), tl.where(norm > 0, col[:, :, None] / safe, 0), norm


@triton.jit
def _iterate_to(k_mat, h_row, h_col, t):
    """The forward's power iterates recomputed from K (NB, E, E) and h: â_{t-1} as columns (zeros
    at t = 0), â_t as rows and ||a_t||."""
    row, col, norm = _first_iterate(h_row, h_col)
    prev = tl.zeros_like(col)
    for _s in range(0, t):
        prev = col
        row, col, norm = _next_iterate(k_mat, row)
    return prev, row, norm


@triton.jit
def _step_back(a_hat, norm, grad):
    """ā of one power step back: the gradient through â = a / ||a|| (rows (NB, 1, E))."""
    radial = tl.sum(a_hat * grad, axis=2)[:, :, None]
    return tl.where(norm > 0, (grad - a_hat * radial) / tl.where(norm > 0, norm, 1), 0)


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
    and h, once and held up to ``_HELD_ITERS`` steps (T - 1 E x E products), else before each
    step back (:func:`_iterate_to`: T (T - 1) / 2): S = K̄ + K̄^T and h̄. The vectors are rows
    (NB, 1, E), the iterates also columns (NB, E, 1), and K̄ is summed transposed (â_{t-1} ā^T:
    the same S), so that no sum crosses warps."""
    e = tl.arange(0, BLOCK_E)
    i3 = e[None, :, None]
    j3 = e[None, None, :]
    k, om, ok = _solve_rows(first, plane, NPLANE, NB, NSB, NSHIFT)
    ok3 = ok[:, None, None]
    m3 = ok3 & (i3 < E) & (j3 < E)
    # ū, its parts flat (no ring: the plane size and count, NB and 1 here, are unused)
    _, grad = _sum_parts_rows(gpart_ptr, gpart_ptr, bh, om, ok, k, NWIN, NW0, NW1, NW2, NB, 1,
                              SHIFTS, NSHIFT, SPLITS, E, NSB * NB, BLOCK_E, ACC, False,
                              0, False, 1, MW2, W0, 0)  # fmt: skip
    grad = grad[:, None, :]
    prog = (bh * NSHIFT + k) * NWIN + om
    prog3 = prog[:, None, None]
    k_mat = _load_sym_batch(kmat_ptr, prog, m3, i3, j3, E)
    h_row = tl.load(hsave_ptr + prog3 * E + j3, mask=ok3 & (j3 < E), other=0)
    h_col = tl.load(hsave_ptr + prog3 * E + i3, mask=ok3 & (i3 < E), other=0)
    kbar_t = tl.zeros((NSB * NB, BLOCK_E, BLOCK_E), dtype=ACC)
    hbar = tl.zeros((NSB * NB, 1, BLOCK_E), dtype=ACC)
    if ITERS <= _HELD_ITERS:  # the iterates computed once and held (the same values)
        row, col, norm = _first_iterate(h_row, h_col)
        rows = (row,)
        cols = (col,)
        norms = (norm,)
        for _s in tl.static_range(1, ITERS):
            row, col, norm = _next_iterate(k_mat, row)
            rows = rows + (row,)
            cols = cols + (col,)
            norms = norms + (norm,)
        for i in tl.static_range(ITERS):  # the steps t = T - 1 - i
            a_bar = _step_back(rows[ITERS - 1 - i], norms[ITERS - 1 - i], grad)
            if i < ITERS - 1:  # none at t = 0
                kbar_t += cols[ITERS - 2 - i] * a_bar
            hbar = a_bar  # the last pass (t = 0) leaves h̄ = ā_1
            grad = tl.sum(k_mat * a_bar, axis=2)[:, None, :]  # K ā (K symmetric)
    else:
        for i in range(0, ITERS):
            t = ITERS - 1 - i
            prev, a_hat, norm = _iterate_to(k_mat, h_row, h_col, t)
            a_bar = _step_back(a_hat, norm, grad)
            kbar_t += tl.where(t > 0, prev * a_bar, 0.0)  # none at t = 0
            hbar = a_bar
            grad = tl.sum(k_mat * a_bar, axis=2)[:, None, :]
    tl.store(sym_ptr + prog3 * (E * E) + i3 * E + j3,
             kbar_t + tl.permute(kbar_t, (0, 2, 1)), mask=m3)  # fmt: skip
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
                 EAX: tl.constexpr):  # fmt: skip
    """The output passes of one ticket (the windows of a plane from ``first``): as one tile
    (BTILE, kernels/_window3_bwd_tile.py) or window by window, g0 under every shift loaded once
    a ticket (from L1: 2 KB a shift in fp32)."""
    W0 = _plane_w0(plane, NW0)  # the windows' coordinate along axis 0
    if BTILE:
        _apply_tile(x_ptr, dy_ptr, dx_ptr, g0_ptr, first, plane, NPLANE, bh, u_ptr, sym_ptr,
                    hbar_ptr, E, NWIN, NVOX, S1, S2, NW0, NW1, NW2, MW2, W0, SHIFTS, NSHIFT,
                    WPP, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, R1, R2, WT, EAX)  # fmt: skip
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
    MSPB, MCPP, MHEADS, MNPL1, MW2,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, WPP: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, RING: tl.constexpr,
    OFFS: tl.constexpr, NOFF: tl.constexpr,
    TWAIT: tl.constexpr, SPLITS: tl.constexpr, BTILE: tl.constexpr,
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
        bh, phase, plane, chunk, offset, flags = _take(t, SPB, CPP, flag_ptr, NPL, HEADS, C,
                                                       E, NVOX, MSPB, MCPP, MHEADS)  # fmt: skip
        first = chunk * WPP  # in the plane
        if phase == 0:
            t = _parts_chunk(x_ptr + offset, dy_ptr + offset, rowmask_ptr, g0_ptr, first, plane,
                             NPLANE, bh, u_ptr, gpart_ptr, flags, flag_ptr, NPL, E, NWIN, NVOX, 1,
                             S1, S2, NW0, NW1, NW2, MW2, SHIFTS, NSHIFT, WPP, P0, P1, P2,
                             BP0, BP1, BP2, BLOCK_E, NSB, G0, G1, G2, MU, ACC, PTILE, PD0, PD1,
                             PD2, PROWS0, PWT, EAX, PJOIN)  # fmt: skip
        elif phase == 1:
            _wait_stage(flags, NPL, plane, 1, CPP, OFFS, NOFF, TWAIT)
            t = _solve_chunk(gpart_ptr, kmat_ptr, hsave_ptr, sym_ptr, hbar_ptr, bh, first,
                             plane, NPLANE, flags, flag_ptr, NPL, E, NWIN, ITERS, NW0, NW1, NW2,
                             MW2, SHIFTS, NSHIFT, SPLITS, WPP, NSB, BLOCK_E,
                             ACC)  # fmt: skip
        else:
            _wait_stage(flags, NPL, plane, 2, CPP, OFFS, NOFF, TWAIT)
            t = _apply_chunk(x_ptr + offset, dy_ptr + offset, dx_ptr + offset, rowmask_ptr,
                             g0_ptr, first, plane, NPLANE, bh, u_ptr, sym_ptr, hbar_ptr, flags,
                             flag_ptr, NPL, E, NWIN, NVOX, 1, S1, S2, NW0, NW1, NW2, MW2,
                             SHIFTS, NSHIFT, WPP, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, NSB, G0, G1,
                             G2, MU, ACC, BTILE, R1, R2, WT, EAX)  # fmt: skip


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
        **pipe.launch(share_cap=share_cap(geo.nshift)),
    )  # fmt: skip
    return dx

