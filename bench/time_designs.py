"""Time the rank-one window kernel designs side by side (issue 16's deciding measurement).

    python3 bench/time_designs.py --out designs.json            # on a GPU: 2x32x128^3
    python3 bench/time_designs.py --shape 1 8 16 16 16 --repeats 1   # anywhere (interpreter:
        # slow, over 15 minutes for the fp32 half on 2 CPU cores; --dtypes / --shifts /
        # --variants pick a part)
    python3 bench/time_designs.py --static      # no GPU: each case compiled for sm_90a, its
        # launches' registers, spills and resident warps (the static report beside the timing)
    python3 bench/time_designs.py --head-dim 4 --window 4 --shifts "[None, 1, 2, 3]" \
        --shape 2 32 64 64 64                   # the isles preset's layer (E = P = 4)

For each dtype (fp32, bf16), shift set ([None, 4], [None, 2, 4, 6]) and variant (design 1, 2, 3, and
design 3 with other ``_window3_sched.TUNING`` settings: warps 8, 16 windows a ticket, 2 programs per
SM, 2 programs of 16 warps at 64 registers (32 resident warps an SM), neighbours' parts not merged,
the forward's parts or output pass, the backward's output or parts pass on a ticket's tiles, or
several), the layer's forward and forward+backward (``fastnmf.matricized_nmf``, kernel "triton", E =
P = 8 unless --head-dim / --window say, T = 5) are timed (median of CUDA events), as % of the
device's copy bandwidth for the ideal bytes (forward: read x + write y; backward: + read dy, write
dx) and as a ratio to the first variant (design 1), variant by variant in the order given
(``_cases``: a run cut short keeps the first variants of every case); every variant's output and
gradient are compared with its (max relative difference), and on a GPU each kernel's time and
launches a call (``torch.profiler``: where a variant's time goes, printed under its row). A variant
that fails is recorded with its error and the others go on. Writes one JSON document (rewritten
after every row, so a run stopped by the GPU session's time limit keeps what it measured) and prints
a table (flushed row by row), then the fastest variant of each dtype and shift set against issue
16's targets (forward 60 %, forward+backward 45 % of copy bandwidth: met, or missed by how much;
"best" in the JSON, kept up to date row by row); nothing here gates anything.

On a GPU the cases' kernels are first compiled by ``--jobs`` processes at once (``--compile-only``
each; Triton compiles one kernel at a time in a process, tens of seconds for a fused kernel, and
the cases would otherwise take most of the GPU session's step compiling); they share Triton's
on-disk cache, and the timing starts when they are done or after ``--compile-budget`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import fastnmf
from fastnmf.profile.timing import copy_bw, environment, kernel_ms, median_ms, pick_device

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


def _layer(x, v0, shifts, kernel="triton", head_dim: int = 8, window: int = 8):
    return fastnmf.matricized_nmf(x, v0, head_dim=head_dim, window=window, shifts=shifts,
                                  iters=5, kernel=kernel, check=False)  # fmt: skip


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


def _run(design: int, tuning: dict, x, v0, dy, shifts, device, repeats: int,
         warmup: int, timed: bool = True, layer: dict | None = None) -> dict:  # fmt: skip
    """One variant's calls; ``layer``: the layer's head_dim and window (default 8, 8)."""
    kernel = "reference" if design == 0 else "triton"
    layer = layer or {}
    with _tuned(design, tuning):
        xg = x.detach().requires_grad_()

        def fwd():
            with torch.no_grad():
                return _layer(x, v0, shifts, kernel, **layer)

        def fwdbwd():
            (g,) = torch.autograd.grad(_layer(xg, v0, shifts, kernel, **layer), xg, dy)
            return g

        y, g = fwd(), fwdbwd()  # the first calls compile
        if not timed:
            return dict(y=y, dx=g)
        r = dict(fwd_ms=median_ms(fwd, device, repeats, warmup),
                 fwdbwd_ms=median_ms(fwdbwd, device, repeats, warmup), y=y, dx=g)
        # after the timed calls, once more: bitwise what the first calls gave?
        r["bitwise_repeat"] = bool(torch.equal(fwd(), y) and torch.equal(fwdbwd(), g))
        # where the time goes: each kernel's ms and launches a call (GPU only; {} elsewhere),
        # forward + backward only (its forward kernels are the forward's, storing what the
        # backward reads): one profiler session a row, for the GPU session's time limit
        r["kernels"] = {"fwdbwd": kernel_ms(fwdbwd, device, calls=2)}
        return r


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=5, default=[2, 32, 128, 128, 128],
                    metavar=("B", "C", "D", "H", "W"))  # fmt: skip
    ap.add_argument("--head-dim", type=int, default=8,
                    help="E, channels a head (the isles preset: 4); C must be a multiple")
    ap.add_argument("--window", type=int, default=8,
                    help="P, the window's side (the isles preset: 4); the sides' divisor")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed calls before the timed ones (after the first, compiling call)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    ap.add_argument("--shifts", nargs="+", choices=list(SHIFTS), default=DEFAULT_SHIFTS)
    ap.add_argument("--variants", nargs="+", choices=[v[0] for v in VARIANTS],
                    default=[v[0] for v in VARIANTS], help="the first one is the baseline")
    ap.add_argument("--shortlist", action="store_true",
                    help="the variants a short GPU lease times (SHORTLIST; not with --variants)")
    ap.add_argument("--out", help="JSON file")
    ap.add_argument("--jobs", type=int, default=None,
                    help="processes that compile the cases' kernels before the timing (default: "
                         "the CPU cores, at most 8, on a GPU; 1, none, elsewhere)")  # fmt: skip
    ap.add_argument("--compile-budget", type=float, default=240,
                    help="seconds the --jobs processes may take (then the timing starts)")
    ap.add_argument("--compile-only", action="store_true",
                    help="only the first (compiling) calls: what each --jobs process runs")
    ap.add_argument("--static", action="store_true",
                    help="no GPU needed: compile every case for sm_90a (the static suite's stub "
                         "driver) and print each launch's registers, spills and resident warps "
                         "(a markdown table; --out: JSON), times nothing")  # fmt: skip
    return ap


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    _, channels, *spatial = args.shape
    if channels % args.head_dim or any(side % args.window for side in spatial):
        ap.error(f"--shape {' '.join(map(str, args.shape))}: C must be a multiple of --head-dim "
                 f"{args.head_dim} and D, H, W of --window {args.window}")  # fmt: skip
    if args.shortlist:
        if args.variants != ap.get_default("variants"):
            ap.error("--shortlist and --variants: give one")
        args.variants = list(SHORTLIST)
    if args.static:
        return _static(args, sys.argv[1:] if argv is None else list(argv))
    device = pick_device("auto")
    if args.compile_only:
        for dname, sname, _, design, tuning in _cases(args):
            x, v0, dy = _inputs(args.shape, dname, device, args.window)
            _run(design, tuning, x, v0, dy, SHIFTS[sname], device, 0, 0, timed=False,
                 layer=_layer_args(args))  # fmt: skip
        return 0
    jobs = args.jobs or (min(8, os.cpu_count() or 1) if device.type == "cuda" else 1)
    if jobs > 1:
        _compile_first(args, jobs)
    bw = copy_bw(device)
    rows, inputs, base = [], {}, {}
    for dname, sname, name, design, tuning in _cases(args):
        if dname not in inputs:  # made once a dtype (the cases alternate dtypes)
            inputs[dname] = _inputs(args.shape, dname, device, args.window)
        x, v0, dy = inputs[dname]
        nbytes = x.numel() * x.element_size()
        row = dict(dtype=dname, shifts=sname, variant=name)
        try:
            r = _run(design, tuning, x, v0, dy, SHIFTS[sname], device, args.repeats, args.warmup,
                     layer=_layer_args(args))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - recorded, the other variants go on
            rows.append(dict(row, error=f"{type(e).__name__}: {e}"))
            print(f"{dname} {sname} {name}: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)  # fmt: skip
            _write(args.out, device, args.shape, bw, rows, _best_lines(rows))
            continue
        b = base.setdefault((dname, sname), r)  # the first variant that ran
        row.update(
            fwd_ms=r["fwd_ms"], fwdbwd_ms=r["fwdbwd_ms"],
            fwd_pct_copy_bw=100 * 2 * nbytes / (r["fwd_ms"] * 1e-3) / 1e9 / bw,
            fwdbwd_pct_copy_bw=100 * 5 * nbytes / (r["fwdbwd_ms"] * 1e-3) / 1e9 / bw,
            fwd_vs_design1=r["fwd_ms"] / b["fwd_ms"],
            fwdbwd_vs_design1=r["fwdbwd_ms"] / b["fwdbwd_ms"],
            y_rel_diff_vs_design1=_rel(r["y"], b["y"]),
            dx_rel_diff_vs_design1=_rel(r["dx"], b["dx"]),
            bitwise_repeat=r.get("bitwise_repeat"), kernels=r.get("kernels", {}),
        )  # fmt: skip
        rows.append(row)
        print(f"{dname:5} {sname:16} {name:34} fwd {row['fwd_ms']:8.3f} ms "
              f"({row['fwd_pct_copy_bw']:5.1f} %)  fwd+bwd {row['fwdbwd_ms']:8.3f} ms "
              f"({row['fwdbwd_pct_copy_bw']:5.1f} %)  dx diff "
              f"{row['dx_rel_diff_vs_design1']:.1e}  bitwise {row['bitwise_repeat']}",
              flush=True)  # fmt: skip
        for line in kernel_lines(row["kernels"]):
            print(line, flush=True)
        _write(args.out, device, args.shape, bw, rows, _best_lines(rows))
    best = _best_lines(rows)
    _write(args.out, device, args.shape, bw, rows, best)
    for line in best:
        print(line, flush=True)
    return 1 if any("error" in r for r in rows) else 0


# issue 16's targets: % of the device's copy bandwidth for the ideal bytes (forward,
# forward + backward)
TARGETS = {"fwd": 60.0, "fwdbwd": 45.0}
# and the fastest forward + backward at least this many times the reference kernel's speed
REFERENCE_SPEEDUP = 10.0


def kernel_lines(kernels: dict, top: int = 6) -> list[str]:
    """A row's per-kernel split (``kernel_ms``, by pass: forward + backward) as indented
    lines: the ``top`` kernels by time, "name ms xlaunches" (a call's), and their sum."""
    lines = []
    for pass_, split in kernels.items():
        if not split:
            continue
        total = sum(k["ms"] for k in split.values())
        parts = [f"{name[:40]} {k['ms']:.3f} x{k['launches']:g}"
                 for name, k in list(split.items())[:top]]  # fmt: skip
        lines.append(f"    {pass_:6} kernels {total:.3f} ms: " + ", ".join(parts))
    return lines


def fastest(rows, pass_: str = "fwdbwd") -> dict | None:
    """The timed window variant (no error, not the reference) with the shortest ``pass_`` time
    among ``rows`` (one dtype and shift set), or None."""
    timed = [r for r in rows if "error" not in r and r["variant"] != REFERENCE]
    return min(timed, key=lambda r: r[f"{pass_}_ms"]) if timed else None


def _best_lines(rows) -> list[str]:
    """Per dtype and shift set, the fastest variant forward and forward+backward against issue 16's
    targets (met, or missed by how much)."""
    lines = []
    for key in dict.fromkeys((r["dtype"], r["shifts"]) for r in rows):
        group = [r for r in rows if (r["dtype"], r["shifts"]) == key]
        ref = [r for r in group if r["variant"] == REFERENCE and "error" not in r]
        for pass_, goal in TARGETS.items():
            best = fastest(group, pass_)
            if best is None:
                lines.append(f"{key[0]} {key[1]} {pass_.replace('bwd', '+bwd')}: nothing timed")
                continue
            pct = best[f"{pass_}_pct_copy_bw"]
            how = "met" if pct >= goal else f"missed by {goal / pct:.2f}x"
            lines.append(f"{key[0]} {key[1]} {pass_.replace('bwd', '+bwd')}: fastest "
                         f"{best['variant']!r}, "
                         f"{best[f'{pass_}_ms']:.3f} ms = {pct:.1f} % of copy bandwidth "
                         f"(target {goal:.0f} %: {how})")  # fmt: skip
        best = fastest(group)
        if best is not None and ref:
            speedup = ref[0]["fwdbwd_ms"] / best["fwdbwd_ms"]
            how = "met" if speedup >= REFERENCE_SPEEDUP else \
                f"missed by {REFERENCE_SPEEDUP / speedup:.2f}x"
            lines.append(f"{key[0]} {key[1]} fwd+bwd: fastest {best['variant']!r} "
                         f"{speedup:.1f}x the reference ({ref[0]['fwdbwd_ms']:.3f} ms; target "
                         f"{REFERENCE_SPEEDUP:.0f}x: {how})")  # fmt: skip
    return lines


STATIC_FIELDS = ("pass", "kernel", "warps", "regs", "spill_bytes", "resident_warps_per_sm",
                 "smem_bytes", "sass_instructions", "barriers", "async_copies",
                 "ptx_async_wait_in_loop", "ptx_smem_held_across_calls")  # fmt: skip


def _static(args, argv: list[str]) -> int:
    """Every case's launches compiled for sm_90a with its variant's settings, no GPU (what the
    timing will run, beside it: a variant that spills or fails to compile shows before a GPU
    session spends time on it). Returns 1 if a case failed to compile. Under the interpreter
    (``TRITON_INTERPRET=1``) the static suite compiles in a process of its own, which the
    variants' TUNING would not reach: this script then runs again without it."""
    from fastnmf.profile.static import kernel_report as kr
    from fastnmf.profile.static.cases import StaticCase

    if not kr._compiling_here():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env,
                              check=False).returncode  # fmt: skip
    batch, channels, *spatial = args.shape
    rows, failed = [], False
    print("| dtype | shifts | variant | " + " | ".join(STATIC_FIELDS) + " |")
    print("|---" * (3 + len(STATIC_FIELDS)) + "|", flush=True)
    for dname, sname, name, design, tuning in _cases(args):
        if design == 0:  # the reference: no Triton kernel
            continue
        if design is None:  # the code's choice for the shift set
            design = importlib.import_module("fastnmf.kernels").window_design(SHIFTS[sname])
        case = StaticCase("window", batch, channels, tuple(spatial), dtype=dname,
                          head_dim=args.head_dim, window=args.window, iters=5,
                          shifts=tuple(SHIFTS[sname]), design=design)  # fmt: skip
        row = dict(dtype=dname, shifts=sname, variant=name)
        try:
            with _tuned(design, tuning):
                launches = kr.kernel_report([case], targets=("sm_90a",))["launches"]
        except Exception as e:  # noqa: BLE001 - recorded, the other variants go on
            failed = True
            rows.append(dict(row, error=f"{type(e).__name__}: {e}"))
            print(f"| {dname} | {sname} | {name} | error: {type(e).__name__}: {e} |", flush=True)
            continue
        for launch in launches:
            rows.append(dict(row, **{f: launch[f] for f in STATIC_FIELDS}))
            print(f"| {dname} | {sname} | {name} | "
                  + " | ".join(str(launch[f]) for f in STATIC_FIELDS) + " |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(target="sm_90a", shape=args.shape, rows=rows), f, indent=1)
    return 1 if failed else 0


def _layer_args(args) -> dict:
    """The layer's head_dim and window (``_layer``) from the command line."""
    return dict(head_dim=args.head_dim, window=args.window)


def _inputs(shape, dname, device, window: int = 8):
    """x, v0, dy of a dtype (the same seed for every dtype); v0 one entry a window voxel."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(device, DTYPES[dname])
    dy = torch.randn(*shape, generator=gen).to(device, DTYPES[dname])
    v0 = torch.rand(window**3, 1, generator=gen).to(device, DTYPES[dname])
    return x, v0, dy


def _cases(args):
    """(dtype, shift set, variant, design, TUNING) in the timing's order: variant by variant in
    ``args.variants``' order (SHORTLIST's: by priority), each in every dtype and shift set, so
    that a run the GPU session's time limit cuts short (and a compile budget that runs out) has
    the first variants of every case, not every variant of the first case (before 2026-12-06:
    dtype, then shifts, then variant, and a shortlist of 20 variants at 120 s of compile budget
    would have compiled about the first case's alone)."""
    known = {name: (design, tuning) for name, design, tuning in VARIANTS}
    for name in dict.fromkeys(args.variants):
        design, tuning = known[name]
        for dname in args.dtypes:
            for sname in args.shifts:
                yield dname, sname, name, design, tuning


def _compile_commands(args) -> list[list[str]]:
    """One ``--compile-only`` command a case, in the timing's order."""
    base = [sys.executable, os.path.abspath(__file__), "--compile-only", "--shape",
            *map(str, args.shape), "--head-dim", str(args.head_dim), "--window",
            str(args.window)]  # fmt: skip
    return [[*base, "--dtypes", d, "--shifts", s, "--variants", v]
            for d, s, v, design, _ in _cases(args) if design != 0]  # fmt: skip


def _compile_first(args, jobs: int, cmds=None) -> int:
    """Compile every case's kernels in ``jobs`` processes at once, before the timing: Triton
    compiles one kernel at a time in a process (tens of seconds each for the fused kernels), and
    the processes share its on-disk cache, so the timing loads what they compiled. Processes
    still running after ``args.compile_budget`` seconds are killed (the timing then compiles what
    they did not: nothing else may use the GPU while it times). A case that fails or is killed
    is only reported: the timing records its error. Returns the number of cases compiled."""
    deadline = time.monotonic() + args.compile_budget
    cmds = _compile_commands(args) if cmds is None else cmds

    def one(cmd):
        left = deadline - time.monotonic()
        if left <= 0:
            return "not started"
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            err = p.communicate(timeout=left)[1]
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            return "killed at the budget"
        return None if p.returncode == 0 else f"exit {p.returncode}: {err.strip()[-300:]}"

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(one, cmds))
    for cmd, why in zip(cmds, results, strict=True):
        if why:
            print(f"compile {' '.join(cmd[-6:])}: {why}", file=sys.stderr, flush=True)
    done = sum(why is None for why in results)
    print(f"compiled {done} of {len(cmds)} cases in {jobs} processes: "
          f"{time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
    return done


def _write(out, device, shape, bw, rows, best) -> None:
    """The JSON document so far, with the fastest variants so far against the targets
    (``best``): written after every row, so a run cut short by the GPU session's time limit
    keeps what it measured."""
    if out:
        doc = dict(environment=environment(device), shape=shape, copy_bw_gbs=bw, rows=rows,
                   best=best)  # fmt: skip
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
