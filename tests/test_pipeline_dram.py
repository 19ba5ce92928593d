"""The DRAM model of the third window design's persistent launches
(fastnmf/profile/static/pipeline_dram.py): its blocks carry the bytes the interpreter's counter
counts for the same launch, and its L2 behaves as an LRU (a large cache reads x once, none at all
twice)."""

import dataclasses
import math

import pytest
from fastnmf.kernels._window3_sched import TUNING

from fastnmf.profile.static import counter, pipeline_dram, traffic
from fastnmf.profile.static.cases import StaticCase

# 1 x 8 x 24 x 8 x 8, E = P = 8: three planes (the main schedule), one head
CASES = [
    StaticCase("window", 1, 8, (24, 8, 8), "fp32", (None, 4), design=3),
    StaticCase("window", 1, 8, (24, 8, 8), "bf16", (None, 2, 4, 6), design=3),
]
# one plane of a row of 4 windows along axis 2 (one ticket: 3 merges a plane when merging)
MERGED = StaticCase("window", 1, 8, (16, 8, 32), "fp32", (None, 4), design=3)
# the model's block -> the kernel arguments it stands for
VOLUME = {"fwd": {"x": ("x_ptr", "load"), "y": ("y_ptr", "store")},
          "bwd": {"x": ("x_ptr", "load"), "dy": ("dy_ptr", "load"), "dx": ("dx_ptr", "store")}}
PARTS = {"fwd": ("kpart_ptr", "hpart_ptr"), "bwd": ("gpart_ptr",)}
# the solves' outputs: u, h and K (for the backward) forward; S and h̄ backward
SOLVE = {"fwd": ("u_ptr", "hsave_ptr", "kmat_ptr"), "bwd": ("sym_ptr", "hbar_ptr")}


def _model_bytes(case, pass_):
    """Bytes per block name over the whole schedule: (loaded, stored)."""
    loaded, stored = {}, {}
    for ticket in pipeline_dram.ticket_blocks(case, pass_):
        for (name, *_), nbytes, store, _ in ticket:
            side = stored if store else loaded
            side[name] = side.get(name, 0) + nbytes
    return loaded, stored


_COUNTS: dict = {}


def _counted(case, merge=None):
    """counter.count_call(case) with TUNING["merge"] = merge, once per test module (each count
    runs the interpreter)."""
    if (case, merge) not in _COUNTS:
        saved = TUNING["merge"]
        TUNING["merge"] = merge
        try:
            _COUNTS[case, merge] = counter.count_call(case)
        finally:
            TUNING["merge"] = saved
    return _COUNTS[case, merge]


def _fused(counts, pass_):
    (launch,) = [la for la in counts[pass_].launches if la.kernel.startswith("_fused")]
    return launch


@pytest.mark.parametrize(("case", "merge"), [(c, None) for c in CASES] + [(MERGED, True)],
                         ids=lambda v: v.id if isinstance(v, StaticCase) else f"merge={v}")
def test_blocks_carry_the_counted_bytes(monkeypatch, case, merge):
    """x, dy read twice, y / dx written once, the part statistics and the solves' outputs
    written once: the model's blocks equal the counter's bytes for the persistent launch, tensor
    by tensor (also with neighbours' parts merged)."""
    monkeypatch.setitem(TUNING, "merge", merge)
    counts = _counted(case, merge)
    for pass_ in ("fwd", "bwd"):
        launch = _fused(counts, pass_)
        loaded, stored = _model_bytes(case, pass_)
        for block, (arg, side) in VOLUME[pass_].items():
            got = launch.args[arg]["bytes_loaded" if side == "load" else "bytes_stored"]
            want = loaded.get(block, 0) if side == "load" else stored.get(block, 0)
            assert got == want, (pass_, block, got, want)
        assert stored["parts"] == sum(launch.args[a]["bytes_stored"] for a in PARTS[pass_])
        solve = sum(launch.args[a]["bytes_stored"] for a in SOLVE[pass_])
        if pass_ == "bwd":  # ū goes through h̄'s slots first (_solve_bwd_batch): one block
            assert launch.args["hbar_ptr"]["bytes_stored"] == 2 * launch.args["hbar_ptr"][
                "unique_bytes"]
            solve -= launch.args["hbar_ptr"]["unique_bytes"]
        assert stored["solve"] == solve


def test_lru_reads_x_once_with_room_and_twice_without(monkeypatch):
    case = CASES[0]
    x = case.numel * case.itemsize
    big = pipeline_dram.pipeline_dram(case, "fwd")  # 60 MB for a 48 KB case: x read once
    assert big["read"] == x and big["written"] >= x  # y, the statistics and the saved state
    monkeypatch.setitem(pipeline_dram.TARGETS, "sm_90a", (0, 1))  # no L2 at all
    none = pipeline_dram.pipeline_dram(case, "fwd")
    assert none["read"] >= 2 * x and none["dram_bytes"] > big["dram_bytes"]


def test_evict_first_blocks_leave_before_the_others(monkeypatch):
    """Hand-computed: A read, B read (evict-first), C stored, A read again, room for two blocks.
    C evicts B, not the older A, so A hits (200 bytes read); in a plain LRU C evicts A, which is
    read again (300). C is written back once, at the end, either way."""

    def tickets(first):
        return [[(("A",), 100, False, False)], [(("B",), 100, False, first)],
                [(("C",), 100, True, False)], [(("A",), 100, False, False)]]  # fmt: skip

    room = 132 * 100 + 200  # the tickets in flight (132 SMs x the largest ticket) + 2 blocks
    got = {}
    for first in (True, False):
        monkeypatch.setattr(pipeline_dram, "ticket_blocks", lambda case, pass_, f=first: tickets(f))
        got[first] = pipeline_dram.pipeline_dram(CASES[0], "fwd", l2_bytes=room)
    assert got[True]["capacity"] == 200
    assert (got[True]["read"], got[True]["written"]) == (200, 100)
    assert (got[False]["read"], got[False]["written"]) == (300, 100)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_output_passes_last_reads_and_stores_are_evict_first(monkeypatch, case):
    """With the kernels' evict-first marks (``_window3_sched.last_use``, on by default) the
    apply tickets' x, dy, y and dx blocks are marked and no other; the estimate then reads and
    writes no more at any L2 from the tickets in flight up, and less where the room is short.
    Without them nothing is marked."""
    sizes = range(0, 600 * 1024, 8 * 1024)
    dram = {}
    for on in (True, False):
        monkeypatch.setitem(TUNING, "last_use", on)
        for pass_ in ("fwd", "bwd"):
            apply = {"y", "dx"}
            for ticket in pipeline_dram.ticket_blocks(case, pass_):
                applies = any(key[0] in apply and store for key, _, store, _ in ticket)
                for (name, *_), _, _, first in ticket:
                    assert first == (on and applies and name in {"x", "dy", "y", "dx"}), name
            inflight = pipeline_dram.pipeline_dram(case, pass_, l2_bytes=0)["inflight"]
            dram[on, pass_] = [pipeline_dram.pipeline_dram(case, pass_, l2_bytes=inflight + b)[
                "dram_bytes"] for b in sizes]  # fmt: skip
    for pass_ in ("fwd", "bwd"):
        marked, plain = dram[True, pass_], dram[False, pass_]
        assert all(m <= p for m, p in zip(marked, plain, strict=True)), pass_
        assert sum(m < p for m, p in zip(marked, plain, strict=True)) > 0, pass_


def test_benchmark_shape_estimates_use_the_tickets_in_flight():
    """At 2 x 32 x 128^3 the capacity is the L2 less the tickets in flight (132 programs), and
    a forward of the second design's size would not fit: the estimate is below 2x ideal."""
    case = StaticCase("window", 2, 32, (128,) * 3, "fp32", (None, 4), design=3)
    est = pipeline_dram.pipeline_dram(case, "fwd")
    assert 0 < est["inflight"] < est["capacity"] + est["inflight"] == 60 * 2**20
    assert 1.0 < est["dram_over_ideal"] < 2.0
    half = pipeline_dram.pipeline_dram(dataclasses.replace(case, dtype="bf16"), "fwd")
    assert half["inflight"] < est["inflight"]


def test_forward_reads_g0_once_per_program(monkeypatch):
    """The untiled forward's g0 is read once per program (one program: half the bytes of two, x
    the same; with HALS no row mask at all), so the suite scales it by the target's programs at
    the benchmark shape, the other arguments by the volume. (The ticket tile also reads g0 once a
    ticket, from L1: more than the scaled bytes, none of it from DRAM.)"""
    case = CASES[0]
    monkeypatch.setitem(TUNING, "tile", False)
    two = _fused(counter.count_call(case), "fwd")
    monkeypatch.setitem(TUNING, "sms", 1)  # the grid: one program
    one = _fused(counter.count_call(case), "fwd")
    assert (math.prod(one.grid), math.prod(two.grid)) == (1, 2)
    per_program = traffic.PER_PROGRAM["_fused_kernel"]
    assert "rowmask_ptr" not in two.args and "rowmask_ptr" not in one.args
    assert two.args["g0_ptr"]["bytes_loaded"] == 2 * one.args["g0_ptr"]["bytes_loaded"] > 0
    assert two.args["x_ptr"] == one.args["x_ptr"]
    counted = [dict(kind=two.kind, kernel=two.kernel, grid=two.grid, args=two.args)]
    (big,) = traffic._scaled(counted, 1000.0, programs={"_fused_kernel": 132})
    for arg, a in two.args.items():
        f = 66 if arg in per_program else 1000
        assert big["args"][arg]["bytes_loaded"] == f * a["bytes_loaded"], arg


def test_persistent_programs_are_the_targets_sms_or_the_tickets():
    big = StaticCase("window", 2, 32, (128,) * 3, "bf16", (None, 2, 4, 6), design=3)
    assert pipeline_dram.persistent_programs(big) == 132
    assert pipeline_dram.persistent_programs(big, "sm_80") == 108
    tiny = CASES[0]  # fewer tickets than SMs
    assert pipeline_dram.persistent_programs(tiny) == len(pipeline_dram.ticket_blocks(tiny, "fwd"))


def test_merged_parts_are_fewer_statistics_written_and_read():
    """With neighbours' parts merged, each of the 3 merges of a plane's ticket drops the 4 high
    parts of shift 4 (K triangle + X g0, fp32): written once and read once fewer; x and y alike."""
    on, off = _fused(_counted(MERGED, True), "fwd"), _fused(_counted(MERGED, False), "fwd")
    planes, e = 2, 8
    fewer = planes * 3 * 4 * (e * (e + 1) // 2 + e) * 4
    for side in ("bytes_stored", "bytes_loaded"):
        got = sum(off.args[a][side] - on.args[a][side] for a in ("kpart_ptr", "hpart_ptr"))
        assert got == fewer, side
    assert on.args["x_ptr"] == off.args["x_ptr"] and on.args["y_ptr"] == off.args["y_ptr"]


def test_smaller_l2_notes_give_the_third_designs_estimates_at_an_h100s_l2(monkeypatch):
    """The report notes each third-design case's persistent DRAM estimate with the smaller L2 of
    the target's GPUs (l2.SMALLER_L2: an H100's 50 MB for sm_90a), the same figures as
    pipeline_dram with that capacity; none for a target without one or another design. The
    override itself: the target's own L2 gives the default estimate, no L2 reads x twice."""
    case = CASES[0]
    default = pipeline_dram.pipeline_dram(case, "bwd")
    own = pipeline_dram.pipeline_dram(case, "bwd", l2_bytes=pipeline_dram.TARGETS["sm_90a"][0])
    assert own == default
    assert pipeline_dram.pipeline_dram(case, "bwd", l2_bytes=0)["read"] > default["read"]
    monkeypatch.setitem(pipeline_dram.SMALLER_L2, "sm_90a", ("a GPU", 0))  # no L2 at all
    other = dataclasses.replace(case, design=2)
    notes = pipeline_dram.smaller_l2_notes([case, other], ("sm_90a", "sm_80"))
    assert len(notes) == 1 and notes[0].startswith(f"sm_90a, {case.id}:")
    est = {p: pipeline_dram.pipeline_dram(case, p, l2_bytes=0)["dram_over_ideal"]
           for p in ("fwd", "bwd")}  # fmt: skip
    assert f"forward {est['fwd']:.2f}x, backward {est['bwd']:.2f}x" in notes[0]
    assert "a GPU's 0 MB L2 (the table: 60 MB)" in notes[0]
