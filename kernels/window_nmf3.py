"""Rank-one window NMF, third design: the second design's three passes in one persistent launch,
pipelined plane by plane so that the output pass reads x from L2, not DRAM.

Same interface and result as :mod:`.window_nmf` (the default with three or more shifted
windowings, e.g. [None, 2, 4, 6]: ``fastnmf.kernels.window_design``; or
``window_nmf.TUNING["design"] = 3``). DESIGN.md §6 (b).

The second design (kernels/window_nmf2.py) reads x twice: once for every shift's part statistics,
once for the output, and x (537 MB at 2x32x128^3 fp32) is far larger than L2, so the second read
comes from DRAM. Here the volume is walked along the *pipelining axis* A (the first axis with more
than one window; axis 0 in 3D): a *plane* is the windows with the same grid coordinate along A
(contiguous in window order). Per batch*head the work is a list of *stages*, each a pass over one
plane, cut into chunks of WPP windows (tickets):

    parts(0), parts(1), solve(1), parts(2), solve(2), apply(1), ..., parts(n-1), solve(n-1),
    apply(n-2), then solve(0), apply(n-1), apply(0)

(``_schedule``). With every shift's whole-window offset along A zero (Q_A = 0: shifts smaller
than the window along A, true of [None, 4] and [None, 2, 4, 6] with P = 8), a shifted window of
plane p holds parts of planes p and p - 1 (cyclically), and an unshifted window of plane p lies
in shifted windows of planes p and p + 1; so solve(p) needs parts(p), parts(p - 1), apply(p)
needs solve(p), solve(p + 1), and each stage's needs come earlier in the list (checked on the
host; other shifts fall back to the second design). apply(p) runs about one plane after parts(p)
read the same x: with the chunks in flight, a few MB apart (4 MB per plane per head at 128^2 x 8
voxels x E = 8 fp32), well inside an H200's 60 MB L2. Only plane 0's output pass, deferred to the
end (its shifted windows wrap around to plane n - 1), reads x from DRAM again: 1/n of x.

Ordering (kernels/_window3_sched.py): programs take tickets in increasing order from a counter
(``tl.atomic_add`` on a flag, never on a value); a stage waits (acquire) until the stages it needs
have all their chunks counted (release after a barrier). Every value is still written by one
program in a fixed order, so results are bitwise deterministic; data written by other programs of
the launch (part statistics, u) is loaded with ``.cg`` (L2, not a possibly stale L1 line).

Two launches per call each way (the flag buffer's zero fill and the kernel); the backward
(kernels/_window3_bwd.py) runs the second design's backward passes on the same schedule. The solves
run a ticket's WPP shifted windows under every shift at once ((NSB WPP, E, E) tiles:
``_solve_rows``) so that a program's warps are busy in that pass too. The forward's part statistics
of planes 1.. of all heads live in one ring of 3 plane regions, plane 0's in one of two (alternate
heads) (``_ring_region``, ``_part_slot``; a parts stage first waits for the solves that read what
its region held, maybe another head's: ``_ring_previous``), so the dead statistics are rewritten in
L2 instead of being written back to DRAM once per plane or once per head. For the backward the
solve saves K and h (not the T iterates and norms: the backward recomputes them), and u. The
solve stores K and h (saved, or in scratch rows of its program where nothing is saved) and loads
them back as rows that keep each matrix in one warp for its power steps, the backward's
recomputing steps (kernels/_window3_power.py): the same operations on the same layouts.

Static figures (sm_90a, 2x32x128^3, E = P = 8, T = 5; kernels/DESIGNS.md): 16 warps,
one program per SM; forward 103-128 registers (ptxas's cap at a thread's share:
``Pipeline.launch``), backward 88-120 (its passes are not inlined: kernels/_window3_bwd.py), no
spills with [None], [None, 4], [None, 2, 4, 6] in fp32 or bf16 (Triton 3.9 and 3.6); no
division by a run-time value (the divisors' magic numbers: kernels/_fastdiv.py); 4 windows a
ticket, so that
the tickets in flight hold about 25 MB of L2 (16 would hold about 100 MB:
fastnmf/profile/static/pipeline_dram.py).
Timed on an H200 (bench/results/h200_2026-12-04/): with [None, 2, 4, 6] the fastest design, with
[None, 4] slower than design 2; far below the static suite's issue-rate bound (Nsight Compute: a
warp issues once every ~37 cycles, 40 % of the stalls at CTA barriers, 16 warps an SM). Knobs
(``TUNING`` in _window3_sched.py): windows per ticket, warps, programs per SM, ring, a register
cap (``maxnreg``), ``merge`` (the parts of neighbouring windows of a ticket merged,
kernels/_window3_parts.py, on where ``merge_on``) and four tiles, each where its plan allows and
on by default since that timing: ``tile`` (the forward's parts pass on a whole ticket at once,
kernels/_window3_tile.py), ``bwd_tile`` (the backward's output pass, kernels/_window3_bwd_tile.py;
its lanes ask 4-12x the ideal bytes), ``bwd_parts_tile`` (the backward's parts pass on tiles of
2 windows, kernels/_window3_bwd_parts_tile.py) and ``out_tile`` (the forward's output pass on
tiles of 2 windows, kernels/_window3_out_tile.py; with Triton 3.9 the fused forward spilled 72 B
with it and the BraTS shifts until the merged parts' row shift became a scan: on with every Triton
since). A non-inlined function (``noinline``) must not
be called while the kernel holds shared memory: Triton 3.6 gives such a callee shared memory from
offset 0 whatever its caller holds (triton-lang/triton#11267), so values made once before the
ticket loop that Triton may keep in shared memory (a ``tl.dot`` operand) are made per ticket
(``_member_matrix``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, compute_dtype, launch, window_inputs
from ._window2_common import _Geometry2, _lanes_rowmask_g, _plane_w0, geometry
from ._window3_bwd import backward3
from ._window3_out_tile import _apply_fwd_tile, out_tile_plan
from ._window3_parts import _parts_chunk_merged
from ._window3_power import _power_u
from ._window3_sched import _MAGIC_ARGS, Pipeline, _take, fused_plan
from ._window3_slots import _part_slot, _ring_previous, _solve_rows, _sum_parts_rows
from ._window3_tile import _parts_tile, tile_plan
from ._window3_waits import _count_done, _wait
from .window_nmf2 import WindowNMF2, _apply_window, _membership, _parts_window

__all__ = ["window_nmf3", "fused_plan"]


@triton.jit(noinline=True)
def _solve_batch(kpart_ptr, hpart_ptr, u_ptr, hsave_ptr, kmat_ptr, bh, first, plane,
                 E: tl.constexpr, NWIN, ITERS, NW0, NW1, NW2, MW2, NPLANE, NPL,
                 SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, SPLITS: tl.constexpr,
                 NB: tl.constexpr, NSB: tl.constexpr, NSBP: tl.constexpr,
                 BLOCK_E: tl.constexpr, SAVE: tl.constexpr, ACC: tl.constexpr,
                 RING: tl.constexpr, MERGE: tl.constexpr, PAX: tl.constexpr,
                 GROUP: tl.constexpr):  # fmt: skip
    """The second design's solve (``_solve_kernel``) for a ticket's NB shifted windows from
    ``first`` under every shift at once (the rows of :func:`_solve_rows`): the part sums, the
    power steps, u. K (whole, row by row) and h are stored (with SAVE in the windows' slots, for
    the backward, which recomputes the iterates from them; else in this program's scratch rows:
    :func:`_k_slot`) and loaded back as rows of E^2 for the power steps
    (``_window3_power._power_u``, NSBP shift rows): summed from the parts, K lies across warps,
    and the steps' sums and layout changes went through shared memory (sm_90a, Triton 3.6, a
    ticket's forward: [None, 2, 4, 6] fp32 100 -> 78 CTA barriers, 4,250 -> 4,379 instructions;
    [None, 4] 80 -> 58). With MERGE the parts pass merged neighbours' parts. Not inlined:
    inlined, values of the kernel's prologue it uses were hoisted out of the ticket loop and
    spilled (sm_90a, Triton 3.9, fp32 [None, 2, 4, 6]: 40 B)."""
    W0 = _plane_w0(plane, NW0)  # the windows' coordinate along axis 0
    e = tl.arange(0, BLOCK_E)
    k, om, ok = _solve_rows(first, plane, NPLANE, NB, NSB, NSHIFT)
    k_mat, h = _sum_parts_rows(hpart_ptr, kpart_ptr, bh, om, ok, k, NWIN, NW0, NW1, NW2, NPLANE,
                               NPL, SHIFTS, NSHIFT, SPLITS, E, NSB * NB, BLOCK_E, ACC, True, RING,
                               MERGE, NB, MW2, W0, PAX, GROUP)  # fmt: skip
    slot = _k_slot((bh * NSHIFT + k) * NWIN + om, NSBP * NB, SAVE)
    e3 = e[None, :, None] * E + e[None, None, :]  # stored in the sums' layout, row by row
    tl.store(kmat_ptr + slot[:, None, None] * (E * E) + e3, k_mat,
             mask=ok[:, None, None] & (e[None, :, None] < E) & (e[None, None, :] < E))
    tl.store(hsave_ptr + slot[:, None] * E + e[None, :], h, mask=ok[:, None] & (e[None, :] < E))
    tl.debug_barrier()  # every thread's stores before any thread's loads: one CTA barrier
    k, om, ok = _solve_rows(first, plane, NPLANE, NB, NSBP, NSHIFT)
    prog = (bh * NSHIFT + k) * NWIN + om
    u = _power_u(kmat_ptr, hsave_ptr, _k_slot(prog, NSBP * NB, SAVE), ok, ITERS, E, BLOCK_E)
    j3 = e[None, None, :]
    tl.store(u_ptr + prog[:, None, None] * E + j3, u, mask=ok[:, None, None] & (j3 < E))


@triton.jit
def _k_slot(prog, NR: tl.constexpr, SAVE: tl.constexpr):
    """Where the solve rows of the shifted windows ``prog`` keep K and h: the windows' own slots
    (SAVE: the backward's), else this program's NR scratch rows (row r of :func:`_solve_rows` at
    r, so that rows of either count find the same slots)."""
    if SAVE:
        return prog
    else:
        return tl.program_id(0) * NR + tl.arange(0, prog.shape[0])


@triton.jit(noinline=True)
def _apply_chunk_fwd(x_base, y_base, rowmask_ptr, g0_ptr, first, plane, NPLANE, bh, u_ptr,
                     E: tl.constexpr, NWIN, NVOX, S1, S2, NW0, NW1, NW2, MW2,
                     SHIFTS: tl.constexpr,
                     NSHIFT: tl.constexpr, WPP: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr,
                     P2: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
                     BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr,
                     G1: tl.constexpr, G2: tl.constexpr, MU: tl.constexpr,
                     ACC: tl.constexpr):  # fmt: skip
    """The output pass of one ticket with the ticket tile and axis 0's sub-boxes as rows (TILE,
    ROWS0: [None, 2, 4, 6]): a function the compiler does not inline, its lanes and g0 under
    every shift loaded per ticket (from L1), so that nothing of it lives through the tile's parts
    pass (sm_90a, 16 warps: the fused forward's 56 B fp32 / 40 B bf16 of spills with Triton 3.9
    go, 80 B -> 40 B with 3.6). Elsewhere the hoisted, inlined pass stays: called, it spilled 8 B
    in the per-window forward and 24 B with the tile and [None, 4] (3.9, fp32), none inlined."""
    W0 = _plane_w0(plane, NW0)  # the windows' coordinate along axis 0
    e, emask, rowmask, g_all = _lanes_rowmask_g(rowmask_ptr, g0_ptr, E, SHIFTS, NSHIFT, P0, P1,
                                                P2, BP0, BP1, BP2, BLOCK_E, NSB, ACC, True)
    for j in range(0, WPP):
        if first + j < NPLANE:
            _apply_window(x_base, y_base, rowmask, e, emask, plane * NPLANE + first + j, bh,
                          g_all, u_ptr, E, NWIN, NVOX, S1, S2, NW0, NW1, NW2, SHIFTS, NSHIFT, P0,
                          P1, P2, BP0, BP1, BP2, BLOCK_E, NSB, G0, G1, G2, MU, ACC,
                          True, MW2, W0)  # CG  # fmt: skip


@triton.jit
def _member_matrix(SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, P0: tl.constexpr,
                   P1: tl.constexpr, P2: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr,
                   BP2: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, D0: tl.constexpr,
                   D1: tl.constexpr, D2: tl.constexpr, NPB: tl.constexpr):  # fmt: skip
    """The per-window parts pass's 0/1 part matrix (``_membership``; 0 without DOT), made in
    the ticket that uses it, not once before the ticket loop: held across the loop, Triton 3.6
    kept it in shared memory, where the solve's non-inlined ``_solve_batch`` wrote its own
    scratch over it (non-inlined callees use shared memory from offset 0, whatever the caller
    holds: triton-lang/triton#11267), and every ticket after a program's first solve used a
    corrupted matrix (bench/results/h200_2026-12-04/README.md)."""
    member = 0
    exists = 0
    if DOT:
        member, exists = _membership(SHIFTS, NSHIFT, P0, P1, P2, BP0 // D0, BP1 // D1,
                                     BP2 // D2, D0, D1, D2, NPB, ACC)  # fmt: skip
    return member, exists


@triton.jit(noinline=True)
def _parts_tile_call(
    x_base, g0_ptr, first, plane, bh, kpart_ptr, hpart_ptr, NWIN, NPLANE, NPL,
    E: tl.constexpr, NVOX, S1, S2, NW0, NW1, NW2, MW2, SHIFTS: tl.constexpr,
    NSHIFT: tl.constexpr, W: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr,
    P2: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    D2: tl.constexpr, ROWS0: tl.constexpr, RING: tl.constexpr, MERGE: tl.constexpr,
    EAX: tl.constexpr, XG0F: tl.constexpr, XG0J: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """The parts pass of one ticket as one tile (``_parts_tile``), not inlined: with X g0
    joined (XG0J), whose product holds every shift's sums, the kernel inlining it held its
    ticket values through the tile and spilled them (sm_90a, Triton 3.6, fp32 [None, 2, 4, 6]:
    16 B); called, the tile has the registers to itself. Without XG0J the tile stays inlined:
    nothing spills there, and the call would cost instructions."""
    _parts_tile(x_base, g0_ptr, first, plane, bh, kpart_ptr, hpart_ptr, NWIN, NPLANE, NPL, E,
                NVOX, S1, S2, NW1, NW2, MW2, _plane_w0(plane, NW0), SHIFTS, NSHIFT, W, P0, P1,
                P2, BP0, BP1, BP2, BLOCK_E, NSB, D0, D1, D2, ROWS0, RING, MERGE, EAX, XG0F,
                XG0J, GROUP)  # fmt: skip


@triton.jit(do_not_specialize=_MAGIC_ARGS)
def _fused_kernel(
    x_ptr, y_ptr, g0_ptr, rowmask_ptr, kpart_ptr, hpart_ptr, u_ptr, hsave_ptr, kmat_ptr,
    flag_ptr, NTICKET, SPB, CPP, NPLANE, NPL,
    C, E: tl.constexpr, HEADS, NWIN, NVOX, ITERS, S1, S2, NW0, NW1, NW2,
    MSPB, MCPP, MHEADS, MNPL1, MW2, MGCPP,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, WPP: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, NPB: tl.constexpr,
    SAVE: tl.constexpr, RING: tl.constexpr, OFFS: tl.constexpr, NOFF: tl.constexpr,
    NSBP: tl.constexpr, TWAIT: tl.constexpr, SKEW: tl.constexpr, GROUP: tl.constexpr,
    LAST: tl.constexpr,
    SPLITS: tl.constexpr,
    PAX: tl.constexpr,
    MERGE: tl.constexpr, TILE: tl.constexpr, TD0: tl.constexpr, TD1: tl.constexpr,
    TD2: tl.constexpr, ROWS0: tl.constexpr, XG0F: tl.constexpr, XG0J: tl.constexpr,
    OTILE: tl.constexpr,
    R1: tl.constexpr, R2: tl.constexpr, WT: tl.constexpr, EAX: tl.constexpr,
):  # fmt: skip
    """Persistent: take tickets (batch*head, stage, chunk) in order until none is left; wait for
    what the stage needs, run its chunk of WPP windows, count the chunk done. With RING, a parts
    stage first waits for the solves that read the ring region it is about to overwrite. M*: the
    magic numbers of the run-time divisors (``Pipeline.magic``): no division. PAX: the pipelining
    axis (``fused_plan``)."""
    e, emask, rowmask, g_all = _lanes_rowmask_g(rowmask_ptr, g0_ptr, E, SHIFTS, NSHIFT, P0, P1,
                                                P2, BP0, BP1, BP2, BLOCK_E, NSB, ACC, True)
    t = tl.atomic_add(flag_ptr, 1)  # the ticket counter
    while t < NTICKET:
        bh, phase, plane, chunk, offset, flags = _take(t, SPB, CPP, flag_ptr, NPL, HEADS, C, E,
                                                       NVOX, MSPB, MCPP, MHEADS,
                                                       SKEW, GROUP, MGCPP)  # fmt: skip
        first = chunk * WPP  # in the plane
        if phase == 0:
            if RING > 0:  # the solves that read what its region held first (maybe another head's)
                prev_bh, prev_plane, held = _ring_previous(bh, plane, NPL, RING, MNPL1, GROUP)
                if held:
                    _wait(flag_ptr + 1 + prev_bh * 3 * NPL, NPL, prev_plane, 2, CPP,
                          OFFS, NOFF, TWAIT)  # counts after the ticket counter
            if TILE and XG0J:  # the ticket's windows as one tile, a call (``_parts_tile_call``)
                _parts_tile_call(x_ptr + offset, g0_ptr, first, plane, bh, kpart_ptr, hpart_ptr,
                                 NWIN, NPLANE, NPL, E, NVOX, S1, S2, NW0, NW1, NW2, MW2, SHIFTS,
                                 NSHIFT, WPP, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, NSB, TD0, TD1,
                                 TD2, ROWS0, RING, MERGE, EAX, XG0F, XG0J, GROUP)  # fmt: skip
            elif TILE:  # the ticket's windows as one tile (kernels/_window3_tile.py)
                _parts_tile(x_ptr + offset, g0_ptr, first, plane, bh, kpart_ptr,
                            hpart_ptr, NWIN, NPLANE, NPL, E, NVOX, S1, S2, NW1, NW2, MW2,
                            _plane_w0(plane, NW0), SHIFTS, NSHIFT, WPP, P0, P1, P2, BP0, BP1, BP2,
                            BLOCK_E, NSB, TD0, TD1, TD2, ROWS0, RING, MERGE, EAX,
                            XG0F, XG0J, GROUP)  # fmt: skip
            elif MERGE:  # neighbours' parts merged (kernels/_window3_parts.py)
                member, exists = _member_matrix(SHIFTS, NSHIFT, P0, P1, P2, BP0, BP1, BP2, ACC,
                                                DOT, D0, D1, D2, NPB)  # fmt: skip
                _parts_chunk_merged(x_ptr + offset, rowmask, e, emask, first, plane, bh, g_all,
                                    member, exists, kpart_ptr, hpart_ptr, NWIN, NPLANE, NPL, E,
                                    NVOX, S1, S2, NW0, NW1, NW2, MW2, NSHIFT,
                                    WPP, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, NSB, ACC, D0, D1, D2,
                                    NPB, RING, GROUP)  # fmt: skip
            else:
                member, exists = _member_matrix(SHIFTS, NSHIFT, P0, P1, P2, BP0, BP1, BP2, ACC,
                                                DOT, D0, D1, D2, NPB)  # fmt: skip
                for j in range(0, WPP):
                    if first + j < NPLANE:
                        _parts_window(x_ptr + offset, rowmask, e, emask,
                                      plane * NPLANE + first + j,
                                      _part_slot(bh, plane, first + j, NWIN, NPLANE, NPL, NSHIFT,
                                                 RING, GROUP), g_all,
                                      member, exists, kpart_ptr, hpart_ptr, E, NVOX, S1, S2, NW1,
                                      NW2, SHIFTS, NSHIFT, P0, P1, P2, BP0, BP1, BP2, BLOCK_E,
                                      NSB, G0, G1, G2, MU, ACC, DOT, D0, D1, D2, NPB, MW2,
                                      _plane_w0(plane, NW0), False, 0)  # fmt: skip
        elif phase == 1:
            _wait(flags, NPL, plane, 1, CPP, OFFS, NOFF, TWAIT)
            _solve_batch(kpart_ptr, hpart_ptr, u_ptr, hsave_ptr, kmat_ptr, bh, first, plane, E,
                         NWIN, ITERS, NW0, NW1, NW2, MW2, NPLANE, NPL, SHIFTS, NSHIFT,
                         SPLITS, WPP, NSB, NSBP, BLOCK_E, SAVE, ACC, RING, MERGE, PAX,
                         GROUP)  # fmt: skip
        else:
            _wait(flags, NPL, plane, 2, CPP, OFFS, NOFF, TWAIT)
            if OTILE:  # the ticket's windows as tiles (kernels/_window3_out_tile.py)
                _apply_fwd_tile(x_ptr + offset, y_ptr + offset, first, plane, NPLANE, bh, u_ptr,
                                E, NWIN, NVOX, S1, S2, NW0, NW1, NW2, MW2, _plane_w0(plane, NW0),
                                SHIFTS, NSHIFT, WPP, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, R1, R2, WT,
                                EAX, LAST)  # fmt: skip
            elif TILE and ROWS0:  # the output pass a function of its own (``_apply_chunk_fwd``)
                _apply_chunk_fwd(x_ptr + offset, y_ptr + offset, rowmask_ptr, g0_ptr, first,
                                 plane, NPLANE, bh, u_ptr, E, NWIN, NVOX, S1, S2, NW0, NW1, NW2,
                                 MW2, SHIFTS, NSHIFT, WPP, P0, P1, P2, BP0, BP1, BP2,
                                 BLOCK_E, NSB, G0, G1, G2, MU, ACC)  # fmt: skip
            else:
                for j in range(0, WPP):
                    if first + j < NPLANE:
                        _apply_window(x_ptr + offset, y_ptr + offset, rowmask, e, emask,
                                      plane * NPLANE + first + j, bh, g_all, u_ptr, E, NWIN,
                                      NVOX, S1, S2, NW0, NW1, NW2, SHIFTS, NSHIFT, P0, P1, P2,
                                      BP0, BP1, BP2, BLOCK_E, NSB, G0, G1, G2, MU, ACC,
                                      True, MW2, _plane_w0(plane, NW0))  # CG  # fmt: skip
        _count_done(flags, phase, plane, NPL)
        t = tl.atomic_add(flag_ptr, 1)


def _fused_forward(x, g0, rowmask, geo: _Geometry2, plan, iters: int, mu: bool, save: bool, *,
                   wrap: bool = False):  # fmt: skip
    """(y, u, h, kmat); ``wrap``: launches through :func:`launch` (inside the triton op,
    fastnmf/window_op.py)."""
    f32 = compute_dtype(x.dtype)
    acc = acc_dtype(x.dtype)
    dev = x.device
    pipe = Pipeline(geo, plan, dev, ring=True)
    kpart = torch.empty(pipe.part_slots, geo.E, geo.E, dtype=f32, device=dev)  # unused: unread
    hpart = torch.empty(pipe.part_slots, geo.E, dtype=f32, device=dev)
    u = torch.empty(geo.progs, geo.E, dtype=f32, device=dev)
    # K and h: saved for the backward, else the solves' scratch rows, a program's own
    rows = geo.progs if save else pipe.grid[0] * pipe.solve_shifts(geo) * pipe.wpp
    h = torch.empty(rows, geo.E, dtype=f32, device=dev)
    kmat = torch.empty(rows, geo.E, geo.E, dtype=f32, device=dev)
    y = torch.empty_like(x)
    dot = geo.dot(acc, mu)
    tiles = {**tile_plan(geo, dot, pipe.wpp, pipe.warps()),
             **out_tile_plan(geo, mu, x.dtype, pipe.wpp, pipe.warps())}  # fmt: skip
    launch(_fused_kernel, wrap=wrap)[pipe.grid](
        x, y, g0, rowmask, kpart, hpart, u, h, kmat, *pipe.args(),
        geo.channels, geo.E, geo.heads, geo.nwin, geo.nvox, iters, geo.S[1], geo.S[2], *geo.NW,
        **pipe.magic(geo), **geo.consts(), **pipe.block(geo), MU=mu, ACC=acc, **dot, SAVE=save,
        MERGE=pipe.merges(dot["DOT"]), PAX=pipe.ax, **tiles,
        **pipe.launch(share_cap=not (tiles["TILE"] or tiles["OTILE"]) or pipe.small_windows(geo)),
    )  # fmt: skip
    if not save:
        h = kmat = None
    return y, u, h, kmat


def plane_plan(geo: _Geometry2):
    """The plane schedule of the persistent launches (:func:`fused_plan`), or None where the
    shifts do not allow it (the second design runs instead). The window counts as ints: a graph
    traced with symbolic sizes specialises on them, as on the magic numbers."""
    return fused_plan(tuple(int(n) for n in geo.NW), geo.shifts)


class WindowNMF3(torch.autograd.Function):
    """Rank-one matricized NMF over windows, third design: one persistent launch each way (the
    geometry and its plan built once by :func:`window_nmf3`)."""

    @staticmethod
    def forward(ctx, x, g0, rowmask, geo, plan, iters, mu):
        y, u, h, kmat = _fused_forward(x, g0, rowmask, geo, plan, iters, mu,
                                       save=ctx.needs_input_grad[0])  # fmt: skip
        ctx.save_for_backward(x, g0, rowmask, u, h, kmat)
        ctx.geo, ctx.plan, ctx.args = geo, plan, (iters, mu)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g0, rowmask, u, h, kmat = ctx.saved_tensors
        iters, mu = ctx.args
        dx = backward3(x, g0, rowmask, u, h, kmat, dy.contiguous(), ctx.geo, ctx.plan, iters,
                       mu)  # fmt: skip
        return dx, None, None, None, None, None, None


def window_nmf3(x, v0, *, head_dim, patch_size, shifts, u0=None, iters=5, solver="hals"):
    """Rank-one matricized NMF over (shifted) windows, third design (same interface as
    :func:`.window_nmf.window_nmf`); the second design where the shifts do not allow the plane
    schedule (:func:`fused_plan`)."""
    g0, rowmask, mu = window_inputs(x, v0, u0, head_dim=head_dim, solver=solver)
    geo = geometry(x, head_dim, tuple(patch_size), shifts)
    plan = plane_plan(geo)
    if plan is None:
        return WindowNMF2.apply(x, g0, rowmask, head_dim, tuple(patch_size), shifts, iters, mu)
    return WindowNMF3.apply(x, g0, rowmask, geo, plan, iters, mu)
