"""The window designs' variants that bench/time_designs.py times, and how one is put in place.

``VARIANTS``: (name, window design, that design's TUNING); ``SHORTLIST``: the GPU session's
``designs`` step, in priority order; ``_tuned``: a variant's design and TUNING for the length of a
``with`` block. bench/time_designs.py, ncu_designs.py and with_variant.py take them from here
(through time_designs.py).
"""

from __future__ import annotations

import contextlib
import importlib

import torch

REFERENCE = "reference"  # the variant that runs kernel="reference" (design 0: no window design)
# the shift sets; "[None]" (local windows, not timed by default: design 1 runs them until timed);
# "[None, 1, 2, 3]" the isles preset's (models/registry.py: with --head-dim 4 --window 4)
SHIFTS = {"[None, 4]": [None, 4], "[None, 2, 4, 6]": [None, 2, 4, 6], "[None]": [None],
          "[None, 1, 2, 3]": [None, 1, 2, 3]}
DEFAULT_SHIFTS = ["[None, 4]", "[None, 2, 4, 6]"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _tiles(tile=False, bwd_tile=False, bwd_parts_tile=False, out_tile=False) -> dict:
    """Design 3's four tiles (``_window3_sched.TILE_KEYS``), each on or off whatever the code's
    default."""
    keys = importlib.import_module("fastnmf.kernels._window3_sched").TILE_KEYS
    return dict(zip(keys, (tile, bwd_tile, bwd_parts_tile, out_tile), strict=True))


# the module whose TUNING a variant of a design sets
_TUNING_MODULE = {1: "window_nmf", 2: "_window2_common", 3: "_window3_sched"}

# (name, window design: None the code's choice (kernels.window_design), 0 the reference; the
# design's TUNING, ``_TUNING_MODULE``). Design 3's variants run on its defaults (since the first
# GPU timing: all four tiles) except what they name.
VARIANTS = [
    ("design 1", 1, {}),
    # its stats kernels at 16 one-warp programs an SM (uncapped, the forward takes 150 registers
    # fp32, 202 bf16 since P is compile-time: 12 / 8 programs)
    ("design 1, stats at 128 registers", 1, {"stats_maxnreg": 128}),
    ("design 1, chunks of 64", 1, {"chunk": 64}),  # half the voxels a stats program holds
    ("design 2", 2, {}),
    ("design 3", 3, {}),
    # design 2 with 16 warps a program in every pass (8 by default; the backward apply 16): its
    # parts passes at 64 registers, 32 resident warps an SM (sm_90a; bench/results/
    # static_designs_triton36/design2_warps.md)
    ("design 2, 16 warps", 2, {"warps": 16}),
    # the same with ptxas's cap at 64 registers: with Triton 3.6 (the GPU machine's) all six
    # kernels at 32 resident warps an SM without a spill, fp32 and bf16, `[None, 4]` (Triton 3.9
    # spills 136-184 B in the backward apply, 32 B in the forward solve; static_designs_triton36/
    # design2_occupancy.md)
    ("design 2, 16 warps, 64 registers", 2, {"warps": 16, "maxnreg": 64}),
    ("design 2, 4 warps", 2, {"warps": 4}),
    # design 2 with its window passes' loop over their windows pipelined by Triton in 3 stages
    # (the next windows' x, dy and u copied to shared memory while a window is computed; on the
    # H200 design 3 waited on memory latency with few warps an SM; `_window2_common.TUNING`). At
    # 2 stages Triton keeps one buffer: each window's copies are issued after the window before
    # is computed and waited for at once (PTX: `cp.async.wait_group 0` in the loop, Triton 3.6
    # and 3.9), so nothing overlaps; kept to compare
    ("design 2, 2 stages", 2, {"stages": 2}),
    ("design 2, 3 stages", 2, {"stages": 3}),
    # the other two passes (a loop inside their window loop, which Triton does not pipeline)
    # load the next window's x (and dy) into registers before computing this one
    ("design 2, prefetch", 2, {"prefetch": True}),
    ("design 2, 2 stages, prefetch", 2, {"stages": 2, "prefetch": True}),
    ("design 2, 3 stages, prefetch", 2, {"stages": 3, "prefetch": True}),
    # the forward parts pass on the third design's ticket tile (4 windows at a time, 16 warps)
    ("design 2, parts tile", 2, {"parts_tile": True}),
    # and the backward apply on the third design's run tile (2 windows at a time, 16 warps); with
    # the other two passes pipelined (the tiled two do not prefetch)
    ("design 2, two tiles", 2, {"parts_tile": True, "apply_tile": True}),
    ("design 2, two tiles, 2 stages", 2, {"parts_tile": True, "apply_tile": True, "stages": 2}),
    # and the backward parts pass on the third design's tile too (2 windows, 16 warps); with the
    # forward apply pipelined
    ("design 2, three tiles", 2, {"parts_tile": True, "apply_tile": True, "parts_bwd_tile": True}),
    ("design 2, three tiles, 2 stages", 2,
     {"parts_tile": True, "apply_tile": True, "parts_bwd_tile": True, "stages": 2}),
    # and the forward apply on the third design's forward output tile (2 windows, 16 warps):
    # every pass a tile, each bf16 sector (two windows wide) read or written by one access
    ("design 2, four tiles", 2,
     {"parts_tile": True, "apply_tile": True, "parts_bwd_tile": True, "out_tile": True}),
    ("default", None, {}),  # the design the code picks for the shift set
    ("design 3, untiled", 3, _tiles()),  # the per-window passes
    ("design 3, ticket tile", 3, _tiles(tile=True)),  # kernels/_window3_tile.py
    ("design 3, output-pass tile", 3, _tiles(bwd_tile=True)),  # kernels/_window3_bwd_tile.py
    ("design 3, forward output tile", 3, _tiles(out_tile=True)),  # kernels/_window3_out_tile.py
    ("design 3, backward parts tile", 3, _tiles(bwd_parts_tile=True)),  # _bwd_parts_tile.py
    ("design 3, three tiles", 3, _tiles(tile=True, bwd_tile=True, bwd_parts_tile=True)),
    ("design 3, four tiles", 3, _tiles(True, True, True, True)),
    ("design 3, 8 warps", 3, {"warps": 8}),
    ("design 3, untiled, 8 warps", 3, {**_tiles(), "warps": 8}),
    ("design 3, 16 windows a ticket", 3, {"wpp": 16}),
    ("design 3, 8 warps, 2 programs/SM", 3, {"warps": 8, "programs_per_sm": 2}),
    # the same with 2 windows a ticket: a thread's tiles as at the default, so all four tiles run
    # (at 4 windows the ticket tile does not fit 8 warps and the parts pass goes window by
    # window); two programs an SM, each with its own barriers and waits. A window's warp
    # instructions (a ticket's x warps / windows) against the default's, Triton 3.6 fp32: BraTS
    # forward 16.9k / 16.6k, backward 21.6k / 19.2k; [None, 4] 10.2k / 9.9k and 14.2k / 14.2k;
    # no spill (kernels/DESIGNS.md)
    ("design 3, 8 warps, 2 windows a ticket, 2 programs/SM", 3,
     {"warps": 8, "wpp": 2, "programs_per_sm": 2}),
    # the H200's ncu: 40 % of the stalls at CTA barriers of 16 warps; 4 programs of 4 warps an SM
    # (128 registers) keep 16 warps resident with barriers a quarter as wide
    ("design 3, 4 warps, 4 programs/SM", 3, {"warps": 4, "programs_per_sm": 4}),
    # 32 resident warps an SM (64 registers a thread; spills 0.5-1.5 KB a thread: sm_90a, 3.9)
    ("design 3, 64 registers, 2 programs/SM", 3, {"maxnreg": 64, "programs_per_sm": 2}),
    # 32 resident warps an SM with a thread's data as at the default (16 warps, 4 windows a
    # ticket): half / a quarter of the warps with half / a quarter of the windows a ticket, at
    # the 64 registers that 4 / 8 programs an SM leave a thread
    ("design 3, 8 warps, 2 windows a ticket, 4 programs/SM", 3,
     {"warps": 8, "wpp": 2, "programs_per_sm": 4}),
    ("design 3, 4 warps, 1 window a ticket, 8 programs/SM", 3,
     {"warps": 4, "wpp": 1, "programs_per_sm": 8}),
    # the same, one program an SM: the registers ptxas takes when nothing caps them
    ("design 3, 8 warps, 2 windows a ticket, uncapped", 3, {"warps": 8, "wpp": 2, "maxnreg": 255}),
    ("design 3, 4 warps, 1 window a ticket, uncapped", 3, {"warps": 4, "wpp": 1, "maxnreg": 255}),
    ("design 3, parts unmerged", 3, {"merge": False}),  # the default merges (fewer bytes)
    ("design 3, untiled, parts unmerged", 3, {**_tiles(), "merge": False}),
    # merging neighbours' parts: since it shifts rows by a scan (no layout conversion) it costs
    # the forward no CTA barrier and 34 / 118 of a ticket's 2,634 / 4,729 instructions
    # ([None, 4] / [None, 2, 4, 6], Triton 3.6 fp32, `sass_loops --ticket`); unmerged, 3 of
    # every 8 parts of a shift that splits axis 2 are written and read again
    ("design 3, four tiles, parts unmerged", 3, {**_tiles(True, True, True, True), "merge": False}),
    # the waits read their counts in every thread (an acquire load each), not one thread's atomic
    # shared through shared memory: a ticket's CTA barriers 100 -> 76 forward, 99 -> 83 backward
    # (BraTS, Triton 3.6 fp32, `sass_loops --ticket`); off by default until timed here
    ("design 3, four tiles, thread waits", 3,
     {**_tiles(True, True, True, True), "thread_waits": True}),
    # the stages in the skewed order (parts(p), apply(p - 2), solve(p)): no stage right after
    # one it waits for. The model of the programs' waits
    # (fastnmf/profile/static/schedule_waits.py, 2 x 32 x 128^3, 132 programs) has them waiting
    # 30-38 % of the time in the plain order, 11-23 % skewed; the H200's ncu run showed 40 % of
    # the stall cycles at CTA barriers, where the waiting warps are. Cost: fp32 DRAM estimate
    # 1.06x -> 1.08x forward + backward with BraTS at 60 MB (1.10x -> 1.45x before the output
    # passes' evict-first marks; bf16 unchanged); +14-35 instructions a ticket, no spill
    ("design 3, four tiles, skewed schedule", 3, {**_tiles(True, True, True, True), "skew": True}),
    # batch*heads side by side ("auto": up to 64 tickets a stage; at 2 x 32 x 128^3 one, so the
    # default): for smaller volumes, whose stages have few chunks (2 x 64 x 64^3: 16), where the
    # waits model has head by head at 1.9-2.2x its wait-free time and four side by side at
    # 1.4-1.5x (skewed too: 1.1-1.3x); each head of a group its own ring of part statistics
    # (DRAM estimate 1.06x fp32 BraTS forward + backward at 64^3 as head by head; 1.18x with the
    # ring off, before the output passes' evict-first marks). bench/gpu_session.sh's schedule
    # phase times them there
    ("design 3, four tiles, heads side by side", 3,
     {**_tiles(True, True, True, True), "group": "auto"}),
    ("design 3, four tiles, heads side by side, skewed", 3,
     {**_tiles(True, True, True, True), "group": "auto", "skew": True}),
    # the output passes' last reads of x and dy and their stores of y and dx without the
    # evict-first marks (the default since 2026-12-06, untimed: kernels/_window3_sched._LAST_USE).
    # The DRAM model: at an H100's 50 MB, BraTS fp32 forward + backward 1.44x -> 1.08x with them;
    # at the H200's 60 MB 1.10x -> 1.06x. Cost: none with Triton 3.9; with 3.6, whose loads take
    # an L2 policy register, +80 backward instructions a ticket of ~4,800, no spill
    ("design 3, four tiles, no L2 hints", 3, {**_tiles(True, True, True, True),
                                              "last_use": False}),  # fmt: skip
    # a stage's waits plane by plane (as timed on the H200 in 2026-12-04), not all its planes'
    # counts at once (the default before Triton 3.7 since 2026-12-06: a ticket's CTA barriers
    # 62 -> 50 forward, 38 -> 30 backward with BraTS, 58 -> 46 and 50 -> 42 with [None, 4],
    # Triton 3.6 fp32, `sass_loops --ticket`; one round trip to L2 a stage, not one a plane)
    ("design 3, four tiles, plane-by-plane waits", 3,
     {**_tiles(True, True, True, True), "count_waits": False}),
    # 2 windows a ticket: half the bytes in flight, twice the chunks a stage (fewer programs
    # waiting, by the waits model). It was the DRAM model's only fit for the fp32 backward in an
    # H100's 50 MB L2 (1.67x -> 1.11x with BraTS) until the output passes' evict-first marks
    # (the default since 2026-12-06: 1.11x at 4 windows a ticket); 28 % / 52 % more backward /
    # forward instructions a window (Triton 3.6; kernels/DESIGNS.md)
    ("design 3, four tiles, 2 windows a ticket", 3, {**_tiles(True, True, True, True), "wpp": 2}),
    # the ticket tile's X g0 as one product for all the shifts (one operand staged, not one a
    # shift): the default with the BraTS shifts since 2026-12-05 (evening); with [None, 4] a
    # ticket's forward 2,464 -> 2,609 instructions, 58 -> 54 CTA barriers (Triton 3.6 fp32)
    ("design 3, four tiles, X g0 joined", 3,
     {**_tiles(True, True, True, True), "xg0_joined": True}),
    # the default before 2026-12-05 (evening) with the BraTS shifts: X g0 a product a shift, the
    # parts tile inlined (4,379 instructions and 78 CTA barriers a ticket forward against 4,146
    # and 62 joined, Triton 3.6 fp32)
    ("design 3, four tiles, X g0 a product a shift", 3,
     {**_tiles(True, True, True, True), "xg0_joined": False}),
    # the backward parts tile a product a shift (as timed on the H200 in 2026-12-04), not one
    # for all the shifts (the default before Triton 3.7: a ticket's backward 99 -> 75 CTA
    # barriers, 5,140 -> 4,731 instructions with BraTS, Triton 3.6 fp32, no spill)
    ("design 3, four tiles, backward parts a shift at a time", 3,
     {**_tiles(True, True, True, True), "bwd_parts_joined": False}),
    # the output passes' run tiles with a run a thread (the forward's before 2026-12-05), or two
    # runs of one sub-box a thread in the backward's too (their vectors loaded once for both):
    # a ticket's forward 4,375 -> 4,227 instructions with two (the default), backward 4,731 ->
    # 4,410 but 24 B of spills (BraTS, Triton 3.6 fp32)
    ("design 3, four tiles, a run a thread", 3, {**_tiles(True, True, True, True),
                                                 "run_pairs": False}),  # fmt: skip
    ("design 3, four tiles, backward run pairs", 3, {**_tiles(True, True, True, True),
                                                     "bwd_run_pairs": True}),  # fmt: skip
    # the float64-checked oracle's kernel (issue 16: the fastest variant >= 10x faster)
    (REFERENCE, 0, {}),
]

# what a short GPU lease times (``--shortlist``), in priority order (the timing's: ``_cases``):
# design 1 (the baseline every row is compared with), design 3 with four tiles and design 2 (the
# code's choices with the GPU machine's Triton 3.6: design 3 with four tiles for [None, 2, 4, 6],
# design 2 for [None, 4], so "default" is not timed again), design 3 without its L2 hints (the
# default marks the output passes' last reads and stores evict-first), in the skewed stage order
# (the model of its programs' waits: 30-38 % of their time waiting in the plain order, 11-23 %
# skewed), then the knobs that static counts favour and only a GPU can weigh: design 3 with 2
# programs of 8 warps an SM (the first candidate,
# kernels/DESIGNS.md), at 2 windows a ticket (all four tiles, no spill) and at 4 (the parts pass
# window by window; with Triton 3.6 32 B of spills in the fp32 BraTS forward, none elsewhere:
# bench/results/static_designs_triton36/shortlist_2026-12-06.md), with its waits in every thread
# (fewer CTA barriers) and plane by plane (the default before 2026-12-06), its backward output
# pass two runs a thread (7 % fewer instructions, 8-24 B of spills), 2 windows a ticket (half
# the bytes in flight, twice the chunks a stage), its X g0 one product for all the shifts and a
# product a shift (the default has the one with BraTS, the other with [None, 4]); design 2 with its
# passes on design 3's tiles (four and three), with 16 warps and 32 resident warps an SM, with its
# next windows' loads in flight (two passes pipelined, and all four); design 3 with its parts
# unmerged (fewer instructions, more bytes), untiled, with its backward parts a product a shift and
# its output passes a run a thread (the defaults before 2026-12-05), with 8 warps; and the
# reference last (issue 16's 10x)
SHORTLIST = ("design 1", "design 3, four tiles", "design 3, four tiles, no L2 hints",
             "design 3, four tiles, skewed schedule",
             "design 2",
             "design 3, 8 warps, 2 windows a ticket, 2 programs/SM",
             "design 3, 8 warps, 2 programs/SM", "design 3, four tiles, thread waits",
             "design 3, four tiles, plane-by-plane waits",
             "design 3, four tiles, backward run pairs",
             "design 3, four tiles, 2 windows a ticket",
             "design 3, four tiles, X g0 joined", "design 3, four tiles, X g0 a product a shift",
             "design 2, four tiles", "design 2, three tiles", "design 2, 16 warps, 64 registers",
             "design 2, 3 stages", "design 2, 3 stages, prefetch",
             "design 3, four tiles, parts unmerged", "design 3, untiled",
             "design 3, four tiles, backward parts a shift at a time",
             "design 3, four tiles, a run a thread", "design 3, 8 warps", REFERENCE)  # fmt: skip


@contextlib.contextmanager
def _tuned(design: int, tuning: dict):
    """The window design and its TUNING (design 2's ``_window2_common.TUNING``, design 3's
    ``_window3_sched.TUNING``) of a variant, restored afterwards."""
    wn = importlib.import_module("fastnmf.kernels.window_nmf")
    module = _TUNING_MODULE.get(design, "_window3_sched")
    table = importlib.import_module(f"fastnmf.kernels.{module}").TUNING
    unknown = set(tuning) - set(table)
    if unknown:
        raise ValueError(f"design {design}'s TUNING has no {sorted(unknown)}")
    saved, saved_table = wn.TUNING["design"], dict(table)
    wn.TUNING["design"] = saved if design == 0 else design  # 0: the reference, no design
    table.update(tuning)
    try:
        yield
    finally:
        wn.TUNING["design"] = saved
        table.clear()
        table.update(saved_table)
