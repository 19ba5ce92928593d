"""The third design's skewed stage order and batch*heads side by side (kernels/_window3_sched.py,
``TUNING["skew"]``, ``["group"]``) and the model of its programs' waits
(fastnmf/profile/static/schedule_waits.py), and the output passes' evict-first marks
(``TUNING["last_use"]``). The orders' needs and the kernels' decoding of both orders:
tests/test_kernels_v3.py."""

from __future__ import annotations

import importlib

import pytest
from conftest import DEVICES, rel_err
from kernel_helpers import fp32_against_reference, nmf_inputs

from fastnmf.profile.static.schedule_waits import BENCH, DURATIONS, SHAPES, schedule_waits, table

sched = importlib.import_module("fastnmf.kernels._window3_sched")
wn3 = importlib.import_module("fastnmf.kernels.window_nmf3")
bwd3 = importlib.import_module("fastnmf.kernels._window3_bwd")
TRITON_VERSION = importlib.import_module("fastnmf.kernels._common").TRITON_VERSION


class _Spy:
    """Stands in for a persistent kernel: records each launch's constexprs ``keys``, then
    launches it."""

    def __init__(self, kernel, seen, keys):
        self.kernel, self.seen, self.keys = kernel, seen, keys

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.seen.append(tuple(kwargs[k] for k in self.keys))
            return self.kernel[grid](*args, **kwargs)

        return run


def _spy(monkeypatch, *keys):
    seen = []
    for module, name in ((wn3, "_fused_kernel"), (bwd3, "_fused_bwd_kernel")):
        monkeypatch.setattr(module, name, _Spy(getattr(module, name), seen, keys))
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,patch,shifts,tuning,key,want", [
    ((1, 8, 40, 8, 8), 8, [None, 2, 4, 6], {"skew": True}, "SKEW", True),  # 5 planes, BraTS
    ((2, 8, 16, 8, 8), 4, [None, 2], {"skew": True}, "SKEW", True),  # 4 planes, 2 batch*heads
    ((2, 8, 16, 8, 8), 4, [None, 2], {"group": 2}, "GROUP", 2),  # 4 batch*heads, two by two
    ((1, 16, 40, 8, 8), 8, [None, 2, 4, 6], {"group": "auto", "skew": True}, "GROUP", 4),  # all
    ((3, 8, 8, 8, 8), 4, [None, 2], {"group": 4}, "GROUP", 3),  # 6 batch*heads: 4 no divisor
    ((1, 8, 40, 8, 8), 8, [None, 2, 4, 6], {"last_use": False}, "LAST", 0),  # no L2 hints
], ids=["skewed-brats", "skewed", "side-by-side", "auto-skewed-brats", "side-by-side-3-of-6",
        "no-l2-hints"])
def test_design3_orders_match_reference(gen, design3, monkeypatch, device, shape, patch, shifts,
                                        tuning, key, want):  # fmt: skip
    """Forward and backward in the skewed order and with batch*heads side by side (GROUP: the
    tickets of each stage of GROUP batch*heads, then the next stage; the forward's ring of part
    statistics one for each head of a group) against the float64 oracle; both persistent kernels
    get the order (SKEW, GROUP), the forward its ring (RING 3; the backward none). Under the
    interpreter the programs run one after another and a wait on a stage not yet done is an
    error: a ticket decoded wrong fails so, or leaves windows unwritten (wrong results), and a
    ring region taken by two heads at once leaves wrong statistics."""
    for name, value in tuning.items():
        monkeypatch.setitem(sched.TUNING, name, value)
    seen = _spy(monkeypatch, key, "RING")
    x, v0, dy = nmf_inputs(gen, shape, patch, zero_windows=True)
    kw = dict(head_dim=4, patch_size=patch, shifts=shifts, solver="hals", iters=5)
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, **kw)
    assert rel_err(dx, dx_ref) <= 1e-4
    assert seen == [(want, 3), (want, 0)]


def test_last_use_rule(monkeypatch):
    """The output passes' evict-first marks (``last_use``): on by default, ``.cs`` loads (2)
    from Triton 3.7, an L2 evict_first policy (1) before; 0 with ``TUNING["last_use"] = False``;
    the persistent kernels get it as LAST."""
    assert sched.last_use() == (2 if TRITON_VERSION >= (3, 7) else 1)
    monkeypatch.setitem(sched.TUNING, "last_use", False)
    assert sched.last_use() == 0
    monkeypatch.setitem(sched.TUNING, "last_use", True)
    assert sched.last_use() > 0


def test_head_group_rule(monkeypatch):
    """A divisor of the batch*heads: the largest not above the int asked for; "auto" the largest
    whose stages hold at most _SLOT_TICKETS (64) tickets; None: one (the default)."""
    assert sched.head_group(8, 64) == 1
    monkeypatch.setitem(sched.TUNING, "group", "auto")
    assert [sched.head_group(bh, cpp) for bh, cpp in ((8, 64), (16, 16), (32, 4), (64, 1),
                                                      (7, 16), (12, 16))] == [1, 4, 16, 64, 1, 4]
    monkeypatch.setitem(sched.TUNING, "group", 4)
    assert sched.head_group(6, 1) == 3 and sched.head_group(2, 1) == 2
    assert sched.head_group(16, 16, "auto") == 4  # asked for: TUNING not read
    monkeypatch.setitem(sched.TUNING, "group", 0)
    with pytest.raises(ValueError, match="TUNING\\['group'\\]"):
        sched.head_group(4, 1)


def test_schedule_waits_by_hand():
    """One plane, 3 chunks a stage, 2 programs, a parts ticket twice a solve's or an apply's:
    the parts end at 4 (two chunks at once, then one), the first solve waits 2 for them, the
    solves end at 6, the first apply waits 1; done at 8 where the work spread evenly takes 6."""
    r = schedule_waits(1, 1, 3, 2, (2.0, 1.0, 1.0))
    assert r["makespan"] == 8.0 and r["even"] == 6.0
    assert r["wait_share"] == pytest.approx(3 / (2 * 8))


def test_heads_side_by_side_wait_less_at_small_volumes():
    """At 2 x 64 x 64^3 (8 planes, 16 batch*heads, 16 chunks a stage) head by head the programs
    wait most of the time; four side by side (64 tickets a stage, ``"auto"``) far less."""
    small = dict(npl=8, bh=16, cpp=16, programs=BENCH["programs"])
    one = schedule_waits(**small, durations=DURATIONS[0], jitter=0.2)
    four = schedule_waits(**small, durations=DURATIONS[0], jitter=0.2, group=4)
    assert one["wait_share"] > 0.4 and four["slowdown"] < one["slowdown"] - 0.4


def test_one_program_never_waits():
    """One program takes the tickets in order, and every stage's needs come before it."""
    for skew in (False, True):
        r = schedule_waits(BENCH["npl"], 2, 8, 1, DURATIONS[0], skew=skew)
        assert r["wait_share"] == 0.0 and r["slowdown"] == pytest.approx(1.0)


@pytest.mark.parametrize("durations", DURATIONS)
def test_skewed_order_waits_less_at_the_benchmark_shape(durations):
    """At 2 x 32 x 128^3 (16 planes, 64 chunks a stage, 132 programs) the plain order keeps the
    programs waiting a quarter to two fifths of the time; the skewed one waits less."""
    plain = schedule_waits(**BENCH, durations=durations, jitter=0.2)
    skewed = schedule_waits(**BENCH, durations=durations, skew=True, jitter=0.2)
    assert 0.25 <= plain["wait_share"] <= 0.45
    assert skewed["wait_share"] < plain["wait_share"] - 0.1
    assert skewed["slowdown"] < plain["slowdown"]


def test_table_has_every_shape_and_order():
    """The command's table: a row per shape and durations; the "auto" group of each shape
    (128^3: 1, so its side-by-side columns repeat the plain and skewed ones)."""
    rows = table().splitlines()[2:]
    assert len(rows) == len(SHAPES) * len(DURATIONS)
    assert [r.split("|")[6].strip().split("(")[-1] for r in rows[:: len(DURATIONS)]] == [
        "1)", "4)", "16)", "64)"]
    first = [c.strip() for c in rows[0].split("|")]
    assert first[4] == first[6].rsplit(" (", 1)[0] and first[5] == first[7]
