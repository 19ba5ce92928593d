"""The third window design's pipeline (kernels/window_nmf3.py, kernels/_window3_bwd.py): the
plane schedule, the tickets and the choice of waits shared by its forward and backward persistent
kernels (the waits themselves: kernels/_window3_waits.py; where their part statistics live, and
the solves' part sums: kernels/_window3_slots.py).

Per batch*head the work is a list of stages (pass, plane), each cut into chunks of WPP windows
(tickets): ``parts(0), parts(1), solve(1), parts(2), solve(2), apply(1), ..., solve(0),
apply(n-1), apply(0)`` (:func:`_schedule`). A program takes tickets in increasing order from a
counter (the flag buffer's first int32) and waits (acquire, one thread a count, the result shared
through shared memory: ``ld.global.gpu.acquire`` in the PTX, before Triton 3.7 the counts of all
the planes a stage needs at once, ``_wait_stage``; with ``TUNING["thread_waits"]`` every thread
reads the counts with acquire loads of its own, no barrier) until the stages its stage needs have
all their chunks counted; a chunk is counted after a barrier (every thread's stores first) with a
release (``red.global.gpu.release.add``). A program waits only for tickets taken before its own,
whose programs are running, so no grid size or residency deadlocks; under the interpreter program
0 takes every ticket in order and no wait ever spins.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import TRITON_VERSION
from ._fastdiv import MAGIC_3, _fdivmod, magics

__all__ = ["TUNING", "TILE_KEYS", "PASSES", "Pipeline", "fused_plan", "merge_on", "ring_regions",
           "head_group", "last_use", "run_pairs", "skewed", "thread_waits", "wait_offsets", "wpp",
           "xg0_joined"]

PASSES = ("parts", "solve", "apply")
# The persistent launch: programs per SM, warps per program, windows per ticket (None: the
# defaults below; warps and programs from the sm_90a compiles of the static report, 4 windows a
# ticket so that the tickets in flight hold little of L2: fastnmf/profile/static/pipeline_dram.py),
# the SM count where the device is not a GPU (the static suite's stub driver sets it to its
# target's; None elsewhere: two programs), whether neighbours' parts are merged, and whether the
# forward's parts pass takes a ticket's windows as one tile (kernels/_window3_tile.py, where
# ``tile_plan`` allows; None: ``_TILE``), and whether the backward's output pass does
# (kernels/_window3_bwd_tile.py, where ``bwd_tile_plan`` allows; None: ``_BWD_TILE``) and its
# parts pass (kernels/_window3_bwd_parts_tile.py, ``bwd_parts_plan``; ``_BWD_PARTS_TILE``), and
# the forward's output pass (kernels/_window3_out_tile.py, ``out_tile_plan``; ``_OUT_TILE``), and
# a cap on the registers a thread (ptxas ``.maxnreg``; None: the untiled forward's is its share
# of the register file, the others none: ``Pipeline.launch``), whether the waits read their
# counts in every thread (None: ``_THREAD_WAITS``), whether a stage reads the counts of all its
# planes at once (None: ``_COUNT_WAITS``), whether the ticket tile's X g0 takes one
# product for all its shifts (None: ``xg0_joined``), whether the backward parts tile does
# (None: kernels/_window3_bwd_parts_tile.py's ``_JOINED``), and whether the forward's / the
# backward's output-pass run tile gives a thread two runs of one sub-box (None: ``_RUN_PAIRS`` /
# ``_BWD_RUN_PAIRS``), whether the stages run in the skewed order (None: ``_SKEW``), and how many
# batch*heads take their stages side by side (an int, "auto", or None: ``_GROUP``), and whether
# the output passes mark their last reads and their stores to be evicted from L2 first (None:
# ``_LAST_USE``)
TUNING: dict = {"programs_per_sm": None, "warps": None, "wpp": None, "ring": None, "sms": None,
                "merge": None, "tile": None, "bwd_tile": None, "bwd_parts_tile": None,
                "out_tile": None, "maxnreg": None, "thread_waits": None, "count_waits": None,
                "xg0_joined": None,
                "bwd_parts_joined": None, "run_pairs": None, "bwd_run_pairs": None,
                "skew": None, "group": None, "last_use": None}
_PROGRAMS_PER_SM = 1
# The fewest rows (shifted windows) a solve takes, forward and backward, so that each row's K and
# S (E^2 entries, E = 8), loaded as rows (``_load_square_batch``), lie in one warp: 2 entries a
# thread at 16 warps ([None, 4]'s 8 rows leave one, and a matrix spans 2 warps); rows past the
# shifts are masked
_SOLVE_ROWS = 16
# the persistent kernels' magic-number arguments (``Pipeline.magic``; kernels/_fastdiv.py), not
# specialised: no value recompiles a kernel
_MAGIC_ARGS = ("MSPB", "MCPP", "MHEADS", "MNPL1", "MW2", "MGCPP")
_WARPS = 16
# an SM's 32-bit registers over the 32 lanes of a warp (sm_80 and sm_90: 65,536), and the most
# ptxas gives a thread
_LANE_REGISTERS = 65536 // 32
_MAX_REGISTERS = 255
_WPP = 4
# The forward's part statistics of planes 1.. live in a ring of this many plane regions (plane 0,
# read again by the last solve, has its own): each region is rewritten while it is still in L2,
# so the dead statistics are not written back to DRAM once per plane (pipeline_dram.py)
_RING = 3
# Whether the forward's parts pass merges the parts of a ticket's neighbouring windows that lie in
# the same shifted window (kernels/_window3_parts.py; where ``merge_on``): 3 of 8 part statistics
# of a shift splitting axis 2 fewer written and read (bf16 [None, 2, 4, 6] forward 2.14x -> 1.95x
# the ideal bytes), no spills at 16 warps (sm_90a, Triton 3.9 and 3.6: kernels/DESIGNS.md); the
# GPU run times it against the unmerged forward (bench/time_designs.py)
_MERGE = True
# The four tiles below: the ticket tile (kernels/_window3_tile.py: the forward's parts pass on a
# ticket's windows as one tile), the backward's output pass (_window3_bwd_tile.py) and parts pass
# (_window3_bwd_parts_tile.py) and the forward's output pass (_window3_out_tile.py) on a ticket's
# windows as tiles, each where its plan allows. On by default since the H200 timed them
# (bench/results/h200_2026-12-04/, 2x32x128^3, Triton 3.6): with [None, 2, 4, 6] design 3 with all
# four is the fastest variant of every design (fp32 4.42 ms forward, 8.43 ms forward + backward;
# bf16 4.50 / 8.37); with [None, 4] the design-3 variants all trail design 2, which the default
# design choice takes there (kernels/__init__.py). Their static counts:
# bench/results/static_designs/tiles.md, kernels/DESIGNS.md. The forward output tile was on
# only before Triton 3.7 until the merged parts' row shift became a scan (_window3_tile_store.
# _prev_row): with it Triton 3.9's [None, 2, 4, 6] forward spilled 72 B (sm_90a, fp32 and bf16),
# now nothing, as with Triton 3.6 (three tiles, its replacement there, timed fp32 4.52 / 8.64
# ms, bf16 4.96 / 8.63 on the H200: 2-10 % slower than four).
TILE_KEYS = ("tile", "bwd_tile", "bwd_parts_tile", "out_tile")  # the four tiles' TUNING keys
_TILE = True
_BWD_TILE = True
_BWD_PARTS_TILE = True
_OUT_TILE = True
# Whether every thread of a program reads a stage's count itself (``ld.global.acquire.gpu``, PTX
# inline assembly: ``_acquire_each``) instead of one thread's atomic whose result the others
# take through shared memory (2 CTA barriers a read; a wait reads once where its count is met, and
# the compiled wait has two reads, before and in its spin loop: 4 barrier sites). Off until a GPU
# has run it (``TUNING["thread_waits"]``; the interpreter always takes the atomic: it runs no
# inline assembly, and its programs run one after another, so no wait there ever spins)
_THREAD_WAITS = False
# Whether (without thread waits) a stage that needs more than one plane reads all their counts at
# once, one thread a count, and spins on their least (``_wait_stage``): one round trip to L2
# and one CTA barrier a stage where one plane after another took a round trip and 1-2 barriers
# each. A ticket, sm_90a, 16 warps, four tiles, Triton 3.6 (``sass_loops --ticket``): BraTS fp32
# forward 4,146 -> 4,168 instructions, 62 -> 50 CTA barriers, backward 4,795 -> 4,755, 38 -> 30,
# no spill. With Triton 3.9 its ptxas then keeps the loads' memory descriptor in ordinary
# registers in the called passes (R2UR before each load: 3,914 -> 5,303 instructions a ticket
# forward, and 16 B of spills in the backward), so it is on only before Triton 3.7
# (``TUNING["count_waits"]`` overrides)
_COUNT_WAITS = TRITON_VERSION < (3, 7)
# Whether the ticket tile's X g0 (kernels/_window3_tile.py, ``_tile_xg0_joined``; 2 or 4 shifts)
# takes every shift's sub-box sums side by side along one product's contraction, one operand
# staged through shared memory instead of one a shift. The third design does with 4 shifts,
# where its parts tile is then a call of its own (window_nmf3._parts_tile_call: inlined, the
# kernel's ticket values spilled, 16-24 B): sm_90a, fp32 [None, 2, 4, 6], a ticket's forward,
# Triton 3.6 4,379 -> 4,146 instructions, 78 -> 62 CTA barriers (bf16 4,483 -> 4,242, 78 -> 62),
# Triton 3.9 3,932 -> 3,914 and 78 -> 64, no spill. Not with [None, 4] (2,464 -> 2,609
# instructions, 58 -> 54 barriers: the GPU weighs it), nor in the second
# design (its parts kernel: the knob only)
_XG0_JOINED_SHIFTS = (4,)
# Whether the output passes' run tiles (the forward's, kernels/_window3_out_tile.py; the
# backward's, _window3_bwd_tile.py) give each thread the runs at q1 and q1 + 1 of one sub-box
# (``run_tile_geometry``'s R1 = 2), which lie in the same part of every shift: their u (and
# h-bar and S) loaded once for both. sm_90a, 16 warps, a ticket, [None, 2, 4, 6]: forward fp32
# 4,375 -> 4,227 instructions with Triton 3.6, no spill (bf16 4,489 -> 4,323; Triton 3.9 fp32
# 4,105 -> 3,937); backward fp32 4,731 -> 4,410 but 24 B of spills (bf16 16 B; Triton 3.9 8 B),
# so the backward's is off until a GPU weighs them ([None, 4]: 3,417 -> 3,291, no spill)
_RUN_PAIRS = True
_BWD_RUN_PAIRS = False
# Whether a batch*head's stages run in the skewed order (:func:`_schedule`): each plane's applies
# one triple later, after the next plane's parts, so that no stage directly follows a stage it
# waits for. In the plain order solve(p) follows parts(p) and apply(p - 1) follows solve(p): with
# a stage's chunks (64 tickets at 2 x 32 x 128^3) fewer than the programs in flight (132), half
# the programs wait at any time; fastnmf/profile/static/schedule_waits.py models it: at 128^3,
# 16 planes, 132 programs, the programs wait 30-38 % of the time in the plain order, 11-23 %
# skewed (phase durations 1 : 0.2-1 : 0.4-1), about the 40 % of stall cycles the H200 showed at
# CTA barriers, where the waiting warps are. The cost: x (and dy) of a plane wait 7 stages in L2
# for their second read instead of 5 (pipeline_dram: fp32 BraTS backward 1.11x -> 1.69x DRAM at
# 60 MB without ``_LAST_USE``'s marks; with them 1.08x -> 1.11x; bf16 unchanged). Off until a GPU
# weighs it ("design 3, four tiles, skewed schedule")
_SKEW = False
# How many batch*heads take each stage side by side (:func:`head_group`; 1: one batch*head after
# another). A stage of a small volume has few chunks (2 x 64 x 64^3: 16; 32^3: 4) against 132
# programs, so head by head nearly every ticket waits for the stage before it: the model
# (schedule_waits.py) has the launch at 1.9-2.9x its wait-free time at 64^3-16^3, and at 1.0-1.3x
# with the batch*heads' stages side by side up to ``_SLOT_TICKETS`` tickets a stage (64: the
# tickets a stage at 128^3, whose L2 footprint the DRAM model fits). Side by side the
# forward's ring of part statistics is one for each head of a group, the groups in turn (DRAM
# estimate, fp32 BraTS forward at 2 x 64 x 64^3 with ``_LAST_USE``'s marks: 1.04x head by head,
# 1.05x four side by side, 1.12x with the ring off as it was at first). Off until a GPU weighs it
# ("design 3, four tiles, heads side by side" at 2 x 64 x 64^3)
_GROUP = 1
_SLOT_TICKETS = 64
# Whether the output passes mark their last reads of x (and dy) and their stores of y (dx) to
# leave L2 first: evict-first (PTX ``.cs``, cache streaming, on the stores, and on the loads from
# Triton 3.7; before it, whose loads take no ``.cs``, the loads' ``eviction_policy`` with an L2
# evict_first policy: ``L2::cache_hint``), so that what no stage of the launch reads again goes
# before what a stage will (x and dy between their parts pass and their output pass, the
# statistics between the stages). The DRAM model (pipeline_dram.py, which follows this) at
# 2 x 32 x 128^3, forward / backward over the ideal: with an H100's 50 MB of L2 BraTS fp32
# 1.10 / 1.67 -> 1.04 / 1.11, [None, 4] 1.06 / 1.62 -> 1.02 / 1.06; with the H200's 60 MB
# 1.09 / 1.11 -> 1.04 / 1.08; bf16 1.14 / 1.18 -> 1.08 / 1.13 at either. No value changes;
# ``TUNING["last_use"] = False``: no hint ("design 3, four tiles, no L2 hints" in
# bench/time_designs.py)
_LAST_USE = True


def run_pairs(backward: bool) -> bool:
    """Whether the forward's (the backward's) output-pass run tile takes two runs a thread where
    the sub-boxes allow (``TUNING["run_pairs"]``, ``["bwd_run_pairs"]``; None: ``_RUN_PAIRS``,
    ``_BWD_RUN_PAIRS``)."""
    on = TUNING["bwd_run_pairs" if backward else "run_pairs"]
    if on is None:
        return _BWD_RUN_PAIRS if backward else _RUN_PAIRS
    return bool(on)


def head_group(bh: int, cpp: int, want: int | str | None = None) -> int:
    """Batch*heads that take their stages side by side (``want``, else ``TUNING["group"]``,
    else ``_GROUP``): a divisor of ``bh`` (the largest not above an int asked for); "auto": the
    largest whose stages hold at most ``_SLOT_TICKETS`` tickets together (cpp chunks a stage
    each)."""
    if want is None:
        want = _GROUP if TUNING["group"] is None else TUNING["group"]
    if want == "auto":
        want = max(1, _SLOT_TICKETS // max(cpp, 1))
    if not isinstance(want, int) or want < 1:
        raise ValueError(f"_window3_sched.TUNING['group'] is {want!r}; valid: None, 'auto' or "
                         "an int >= 1")  # fmt: skip
    return max(g for g in range(1, min(want, bh) + 1) if bh % g == 0)


def skewed() -> bool:
    """Whether the stages run in the skewed order (``TUNING["skew"]``; None: ``_SKEW``)."""
    return _SKEW if TUNING["skew"] is None else bool(TUNING["skew"])


def last_use() -> int:
    """How the output passes mark their last reads and their stores (``TUNING["last_use"]``;
    None: ``_LAST_USE``): 0 not at all, else evict-first: 2 ``.cs`` loads (Triton 3.7 on), 1
    loads with an L2 evict_first policy (before); the stores ``.cs`` either way."""
    on = _LAST_USE if TUNING["last_use"] is None else bool(TUNING["last_use"])
    return 0 if not on else 2 if TRITON_VERSION >= (3, 7) else 1


def wpp() -> int:
    """Windows per ticket (a chunk of a plane)."""
    return TUNING["wpp"] or _WPP


def xg0_joined(nshift: int | None = None) -> bool:
    """Whether the ticket tile's X g0 is one product for all its shifts: ``TUNING["xg0_joined"]``
    where set, else for the third design's ``nshift`` shifts (``_XG0_JOINED_SHIFTS``; None, the
    second design's tile: no)."""
    if TUNING["xg0_joined"] is not None:
        return bool(TUNING["xg0_joined"])
    return nshift in _XG0_JOINED_SHIFTS


def thread_waits() -> bool:
    """Whether the waits read their counts in every thread (``_THREAD_WAITS``)."""
    return _THREAD_WAITS if TUNING["thread_waits"] is None else bool(TUNING["thread_waits"])


def count_waits() -> bool:
    """Whether a stage reads the counts of all the planes it needs at once (``_COUNT_WAITS``)."""
    return _COUNT_WAITS if TUNING["count_waits"] is None else bool(TUNING["count_waits"])


def wait_mode() -> int:
    """The kernels' TWAIT: 1 every thread reads each count (:func:`thread_waits`), 2 one thread
    a count, all of a stage's at once (:func:`count_waits`), 0 one thread a count, plane after
    plane."""
    return 1 if thread_waits() else (2 if count_waits() else 0)


@triton.jit
def _stage(i, npl, SKEW: tl.constexpr = False):
    """Stage i of one batch*head's schedule as (pass, plane): :func:`_schedule` computed, no
    table (nothing to copy to the device). npl >= 2: stages 0-2 are parts(0), parts(1),
    solve(1); then triples parts(p), solve(p), apply(p - 1) for p >= 2; the last three solve(0),
    apply(npl - 1), apply(0). npl = 1: parts, solve, apply of plane 0. SKEW (npl >= 4; the same
    order below): stages 3-4 parts(2), solve(2); triples parts(p), apply(p - 2), solve(p) for
    3 <= p < npl; apply(npl - 2); the same last three."""
    if SKEW:
        triple, k = _fdivmod(tl.maximum(i - 5, 0), 3, MAGIC_3)  # place in a triple (i >= 5)
        phase = tl.where(k == 1, 2, tl.where(k == 2, 1, 0))
        plane = tl.where(k == 1, triple + 1, triple + 3)
        phase = tl.where(i == 3 * npl - 4, 2, phase)
        plane = tl.where(i == 3 * npl - 4, npl - 2, plane)
        early = i < 5  # parts(0), parts(1), solve(1), parts(2), solve(2)
        phase = tl.where(early, tl.where((i == 2) | (i == 4), 1, 0), phase)
        plane = tl.where(early, tl.where(i == 0, 0, tl.where(i < 3, 1, 2)), plane)
        pphase, pplane = _stage_plain(i, npl)
        phase = tl.where(npl < 4, pphase, phase)  # the orders agree there (and i < 5 is early)
        plane = tl.where(npl < 4, pplane, plane)
    else:
        phase, plane = _stage_plain(i, npl)
    tail = i - (3 * npl - 3)  # 0, 1, 2: the last three stages
    phase = tl.where(tail >= 0, tl.where(tail == 0, 1, 2), phase)
    plane = tl.where(tail >= 0, tl.where(tail == 1, npl - 1, 0), plane)
    phase = tl.where(npl == 1, i, phase)
    plane = tl.where(npl == 1, 0, plane)
    return phase, plane


@triton.jit
def _stage_plain(i, npl):
    """:func:`_stage`'s plain order before its last three stages."""
    triple, k = _fdivmod(tl.maximum(i - 3, 0), 3, MAGIC_3)  # place in a triple (i >= 3)
    phase = k
    plane = tl.where(k == 2, triple + 1, triple + 2)
    phase = tl.where(i < 3, tl.where(i == 2, 1, 0), phase)
    plane = tl.where(i < 3, tl.where(i == 0, 0, 1), plane)
    return phase, plane


@triton.jit
def _take(t, SPB, CPP, flag_ptr, NPL, HEADS, C, E: tl.constexpr, NVOX, MSPB, MCPP, MHEADS,
          SKEW: tl.constexpr = False, GROUP: tl.constexpr = 1, MGCPP=0):  # fmt: skip
    """Ticket t as (bh, pass, plane, chunk of the stage, the int64 offset of the head's first
    element, the batch*head's flag counts). SPB: tickets a batch*head (its stages x CPP chunks a
    stage); the counts follow the ticket counter at flag_ptr. M*: the divisors' magic numbers
    (kernels/_fastdiv.py, :meth:`Pipeline.magic`; MSPB of GROUP x SPB, MGCPP of GROUP x CPP).
    SKEW: the skewed order (:func:`_stage`). GROUP: batch*heads side by side (each stage's
    chunks of GROUP batch*heads one after another, then the next stage: :func:`head_group`)."""
    if GROUP == 1:
        bh, r = _fdivmod(t, SPB, MSPB)
        stage, chunk = _fdivmod(r, CPP, MCPP)
    else:
        group, r = _fdivmod(t, SPB * GROUP, MSPB)
        stage, r = _fdivmod(r, CPP * GROUP, MGCPP)
        b, chunk = _fdivmod(r, CPP, MCPP)
        bh = group * GROUP + b
    phase, plane = _stage(stage, NPL, SKEW)
    batch, head = _fdivmod(bh, HEADS, MHEADS)
    offset = (batch * C + head * E).to(tl.int64) * NVOX
    return bh, phase, plane, chunk, offset, flag_ptr + 1 + bh * 3 * NPL


def _schedule(npl: int, skew: bool = False) -> list[tuple[int, int]]:
    """The stages (pass index into PASSES, plane) of one batch*head, in ticket order. Plain:
    triples parts(p), solve(p), apply(p - 1). Skewed (``_SKEW``; from 4 planes, the same order
    below): parts(p), apply(p - 2), solve(p), so that every stage comes at least two stages after
    the last stage it waits for, then apply(npl - 2). Both end with solve(0), apply(npl - 1),
    apply(0) (the stages that wait on plane npl - 1 or 0 across the wrap)."""
    order = []
    for p in range(npl):
        order.append((0, p))
        if skew and npl >= 4 and 1 <= p - 2 <= npl - 2:
            order.append((2, p - 2))
        if p >= 1:
            order.append((1, p))
        if not (skew and npl >= 4) and p >= 2:
            order.append((2, p - 1))
    if skew and npl >= 4:
        order.append((2, npl - 2))
    order.append((1, 0))
    if npl >= 2:
        order.append((2, npl - 1))
    order.append((2, 0))
    return order


@functools.lru_cache(maxsize=64)
def _skewed_schedule(npl: int) -> tuple:
    """:func:`_schedule` skewed, as the plans hold it (once per plane count: a call's host path
    compares its plan's order with it)."""
    return tuple(_schedule(npl, True))


def _needs(stage: tuple[int, int], npl: int, splits: list[bool], offsets: list[int]):
    """The (pass, plane) stages a stage needs: solve(p) the parts of the planes holding its
    shifted windows' parts, apply(p) the solves of the shifted windows its windows lie in."""
    phase, p = stage
    if phase == 0:
        return set()
    sign = -1 if phase == 1 else 1
    return {
        (phase - 1, (p + sign * (b + q)) % npl)
        for split, q in zip(splits, offsets, strict=True)
        for b in ((0, 1) if split else (0,))
    }


def fused_plan(nw: tuple[int, int, int], shifts: tuple, skew: bool | None = None) -> tuple | None:
    """(pipelining axis, schedule) for a window grid nw and the shift constants of
    :class:`_Geometry2`, or None where the schedule would wait on a later stage (a shift with a
    whole-window offset along the axis): then the second design runs instead. skew: the skewed
    order (None: :func:`skewed`)."""
    return _fused_plan(nw, shifts, skewed() if skew is None else bool(skew))


@functools.lru_cache(maxsize=64)
def _fused_plan(nw: tuple[int, int, int], shifts: tuple, skew: bool) -> tuple | None:
    ax = next((d for d in range(3) if nw[d] > 1), 0)
    npl = nw[ax]
    order = _schedule(npl, skew)
    splits = [s[ax] > 0 for s in shifts]
    offsets = [s[3 + ax] for s in shifts]
    done = set()
    for stage in order:
        if not _needs(stage, npl, splits, offsets) <= done:
            return None
        done.add(stage)
    return ax, tuple(order)


def splits(shifts) -> tuple[bool, ...]:
    """Per axis, whether some shift splits it (cuts its windows into two parts)."""
    return tuple(any(s[ax] for s in shifts) for ax in range(3))


def wait_offsets(shifts, ax: int) -> tuple[int, ...]:
    """The distinct plane offsets b + Q_AX over the shifts (b = 0, and 1 where a shift splits the
    axis): a shifted window of plane o holds parts of planes o - offset, and a window of plane p
    lies in shifted windows of planes p + offset (the kernels wait on each plane once)."""
    return tuple(sorted({b + s[3 + ax] for s in shifts for b in ((0, 1) if s[ax] else (0,))}))


def ring_regions(shifts, ax: int) -> int:
    """Plane regions of the forward's part-statistics ring (0: none, one region per plane).
    Only where no shift has a whole-window offset along the axis: then a region's readers are the
    solves of its plane and the next, which come RING - 1 plane steps before the parts that
    overwrite it (and those parts wait for them)."""
    if any(s[3 + ax] for s in shifts):
        return 0
    return max(TUNING["ring"] or _RING, 2)


def _programs(device: torch.device, tickets: int) -> int:
    """The persistent grid: resident programs (SMs x programs per SM) for the SMs of
    ``TUNING["sms"]`` if set (the static suite's target; a trace for CUDA on a machine without
    one), else of the GPU; off a GPU two (under the interpreter the second finds no ticket left:
    the exit path is exercised)."""
    if TUNING["sms"]:
        sms = TUNING["sms"]
    elif device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        return min(tickets, 2)
    return min(tickets, sms * (TUNING["programs_per_sm"] or _PROGRAMS_PER_SM))


def merge_on(dot: bool, shifts, nw2: int, nplane: int, wpp: int) -> bool:
    """Whether the forward's parts pass merges neighbours' parts (``TUNING["merge"]``; only where
    the Gram parts are a matrix product, ``dot``, a shift splits axis 2 (else there is nothing to
    merge) and a ticket's WPP > 1 windows are always consecutive in one row along axis 2: the
    windows of a row (nw2) and of a plane (nplane) multiples of WPP; then which window merges is
    a test on its place in its ticket or row, no division: the general test cost the merged
    forward 80-96 B of spills at 16 warps, sm_90a, Triton 3.9)."""
    on = _MERGE if TUNING["merge"] is None else bool(TUNING["merge"])
    whole = wpp > 1 and nw2 % wpp == 0 and nplane % wpp == 0
    return dot and on and whole and any(s[2] for s in shifts)


class Pipeline:
    """Host side of one persistent call: the zeroed flag buffer (+ the ticket counter), the grid
    and the scalar arguments of the kernels (``args()``)."""

    def __init__(self, geo, plan, device: torch.device, *, ring: bool = False):
        ax, order = plan
        self.ax = ax
        self.npl = geo.NW[ax]
        # the kernels decode the skewed order where it differs from the plain one
        self.skew = self.npl >= 4 and order == _skewed_schedule(self.npl)
        self.nplane = geo.nwin // self.npl  # windows per plane (contiguous in window order)
        self.nw2, self.shifts = geo.NW[2], geo.shifts
        self.wpp = wpp()
        self.cpp = triton.cdiv(self.nplane, self.wpp)
        self.group = head_group(geo.bh, self.cpp)
        # the ring: RING regions shared by all heads' planes 1.., and plane 0's (two: alternate
        # heads); with heads side by side, one such ring for each head of a group, the groups in
        # turn (kernels/_window3_slots._ring_region); without: every window of every head
        self.ring = ring_regions(geo.shifts, ax) if ring else 0
        groups = geo.bh // self.group
        regions = ((self.ring + min(groups, 2)) * self.group * self.nplane if self.ring
                   else geo.bh * geo.nwin)  # fmt: skip
        self.part_slots = regions * geo.nshift * 8
        self.stages = len(order)
        self.tickets = geo.bh * self.stages * self.cpp
        self.flags = torch.zeros(geo.bh * 3 * self.npl + 1, dtype=torch.int32, device=device)
        self.grid = (_programs(device, self.tickets),)

    def args(self) -> tuple:
        """flag_ptr (the ticket counter, then the batch*heads' (pass, plane) counts), NTICKET,
        SPB (tickets a batch*head), CPP, NPLANE, NPL."""
        return self.flags, self.tickets, self.stages * self.cpp, self.cpp, self.nplane, self.npl

    def magic(self, geo) -> dict:
        """The magic numbers of the kernels' run-time divisors (kernels/_fastdiv.py): tickets a
        batch*head (SPB) times the batch*heads side by side (GROUP), chunks a stage (CPP) and
        times GROUP (GCPP), heads, max(planes - 1, 1), and the grid's NW2 (``_window_origin``)."""
        return magics(SPB=self.group * self.stages * self.cpp, CPP=self.cpp, HEADS=geo.heads,
                      NPL1=max(self.npl - 1, 1), W2=geo.NW[2],
                      GCPP=self.group * self.cpp)  # fmt: skip

    def merges(self, dot: bool) -> bool:
        """Whether the forward's parts pass merges neighbours' parts (:func:`merge_on`)."""
        return merge_on(dot, self.shifts, self.nw2, self.nplane, self.wpp)

    def warps(self) -> int:
        return TUNING["warps"] or _WARPS

    def small_windows(self, geo) -> bool:
        """Whether a window holds fewer values (E P^d) than a program has threads (the isles
        preset's E = P = 4: 256 for 512): there, ptxas left to itself gives the fused kernels 64
        registers and spills (sm_90a, 16 warps, [None, 1, 2, 3]: Triton 3.9's backward 56 B,
        Triton 3.6's bf16 forward 8 B), at a thread's share none, with as many instructions or fewer
        (``launch``'s ``share_cap``; kernels/_window3_bwd.py says where the backward takes it)."""
        return geo.E * math.prod(geo.P) < 32 * self.warps()

    def launch(self, *, share_cap: bool) -> dict:
        """The launch options: warps a program and ptxas's register cap: ``TUNING["maxnreg"]`` if
        set, else a thread's share of the register file at the programs per SM where more than
        one program an SM must fit, or with ``share_cap``. At one program (16 warps: 128) the
        hardware allows no more anyway, but ptxas allocates otherwise: the forward without its
        tiles takes it (uncapped, Triton 3.6's ptxas gives the [None] bf16 forward 64 registers
        and 16 spill bytes; capped, no forward without tiles spills with Triton 3.6 or 3.9:
        sm_90a, 16 warps, the static suite's cases), and so do both passes of windows smaller
        than the program (``small_windows``); otherwise the tiled forwards and the backward do not
        (capped, they spill where uncapped they do not: Triton 3.6's ticket tile and forward
        output tile with [None, 2, 4, 6], 8 B; the 3.6 BraTS fp32 backward 96 B, the 3.9
        backward in five of six cases, 32-136 B; bench/results/static_designs/instructions.md)."""
        cap = TUNING["maxnreg"]
        programs = TUNING["programs_per_sm"] or _PROGRAMS_PER_SM
        if not cap and (share_cap or programs > 1):
            cap = min(_LANE_REGISTERS // (self.warps() * programs), _MAX_REGISTERS)
        return {"num_warps": self.warps(), **({"maxnreg": cap} if cap else {})}

    def block(self, geo) -> dict:
        """The geometry's block constants with this pipeline's windows per ticket, ring and wait
        offsets."""
        offs = wait_offsets(geo.shifts, self.ax)
        return {**geo.block(), "WPP": self.wpp, "RING": self.ring, "OFFS": offs,
                "NOFF": len(offs), "SPLITS": splits(geo.shifts),
                "NSBP": self.solve_shifts(geo), "TWAIT": wait_mode(),
                "SKEW": self.skew, "GROUP": self.group, "LAST": last_use()}  # fmt: skip

    def solve_shifts(self, geo) -> int:
        """The shift rows NSBP of a ticket's solves (WPP windows each): the shifts NSB, or more
        (masked) where NSB * WPP is under ``_SOLVE_ROWS``."""
        nsb = geo.block()["NSB"]
        return nsb if nsb * self.wpp >= _SOLVE_ROWS else _SOLVE_ROWS // self.wpp
