"""The third design of the rank-one window kernels (kernels/window_nmf3.py, _window3_bwd.py,
_window3_sched.py): the second design's passes in one persistent launch each way, pipelined plane
by plane.

Selected with ``window_nmf.TUNING["design"] = 3``. Under TRITON_INTERPRET=1 programs run one
after another, so program 0 takes every ticket in order and the waits return at once: these tests
check the results, the schedule (against needs computed here by rolling coordinates, not with
the module's own rule) and the launches; the waits between concurrent programs need a GPU.
"""

import importlib

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICES, rel_err
from kernel_helpers import (
    check_low_precision,
    fp32_against_reference,
    nmf_inputs,
    run_grad,
    spy_on,
    training_forward,
)

import fastnmf

wn = importlib.import_module("fastnmf.kernels.window_nmf")
wn2 = importlib.import_module("fastnmf.kernels.window_nmf2")
wn3 = importlib.import_module("fastnmf.kernels.window_nmf3")
bwd3 = importlib.import_module("fastnmf.kernels._window3_bwd")
sched = importlib.import_module("fastnmf.kernels._window3_sched")
waits = importlib.import_module("fastnmf.kernels._window3_waits")
INTERPRET = importlib.import_module("fastnmf.kernels._common").INTERPRET
slots = importlib.import_module("fastnmf.kernels._window3_slots")
common = importlib.import_module("fastnmf.kernels._window2_common")
magic = importlib.import_module("fastnmf.kernels._fastdiv").magic
design_for = importlib.import_module("fastnmf.kernels").design_for
_stage = sched._stage
_ring_region = slots._ring_region
_ring_previous = slots._ring_previous


CASES = [
    # shape, head_dim, patch, shifts, solver, iters, zero_windows, zero_g0
    ((1, 8, 16, 8, 8), 4, 4, [None, 2], "hals", 5, True, False),  # 4 planes: the main schedule
    ((1, 8, 24, 8, 8), 8, 8, [None, 2, 4, 6], "mu", 2, False, True),  # BraTS shifts, MU masks
    ((2, 4, 8, 12), 4, 4, [None, 2], "hals", 5, True, False),  # 2D: planes along axis 1
    ((1, 12, 8, 8, 8), 6, 4, None, "hals", 5, False, False),  # local, E = 6
    ((1, 4, 12, 12), 4, (6, 3), [None, (3, 1), (7, 5)], "mu", 5, False, False),  # Q = 1 along
    # the planes' axis, P not 2^k; one window along axes 0 and 1: planes along axis 2 (PAX = 2)
    ((1, 4, 8, 8, 24), 4, 8, [None, 4], "hals", 5, True, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,head_dim,patch,shifts,solver,iters,zero,zero_g0", CASES)
def test_design3_fp32_matches_reference(gen, design3, device, shape, head_dim, patch, shifts,
                                        solver, iters, zero, zero_g0):  # fmt: skip
    x, v0, dy = nmf_inputs(gen, shape, patch, zero_windows=zero, zero_g0=zero_g0)
    kw = dict(head_dim=head_dim, patch_size=patch, shifts=shifts, solver=solver, iters=iters)
    geo = common._Geometry2(x, head_dim, patch if isinstance(patch, tuple) else (patch,) *
                            (x.dim() - 2), shifts)  # fmt: skip
    assert sched.fused_plan(tuple(geo.NW), geo.shifts) is not None  # the fused path runs
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, **kw)
    assert rel_err(dx, dx_ref) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=["brats-mu", "none4-hals"])
def test_design3_two_windows_a_ticket_matches_reference(gen, design3, monkeypatch, device, case):
    """2 windows a ticket (``TUNING["wpp"] = 2``: half the bytes in flight, the variant that an
    H100's L2 may want; bench/time_designs.py times it) computes what 4 do."""
    shape, head_dim, patch, shifts, solver, iters, zero, zero_g0 = case
    monkeypatch.setitem(sched.TUNING, "wpp", 2)
    seen = []
    for module, name in ((wn3, "_fused_kernel"), (bwd3, "_fused_bwd_kernel")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, _WppSpy(real, seen))
    x, v0, dy = nmf_inputs(gen, shape, patch, zero_windows=zero, zero_g0=zero_g0)
    kw = dict(head_dim=head_dim, patch_size=patch, shifts=shifts, solver=solver, iters=iters)
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, **kw)
    assert rel_err(dx, dx_ref) <= 1e-4
    assert seen == [2, 2]  # both persistent kernels ran, at 2 windows a ticket


# the constexprs that say which tiles a launch runs, and their windows a tile
_TILE_KEYS = ("WPP", "TILE", "OTILE", "WT", "BTILE", "PTILE", "PWT")


@pytest.mark.parametrize("device", DEVICES)
def test_design3_eight_warps_two_windows_run_every_tile(gen, design3, monkeypatch, device):
    """8 warps at 2 windows a ticket (bench/time_designs.py's "design 3, 8 warps, 2 windows a
    ticket, 2 programs/SM"): a thread holds what it holds at the default (16 warps, 4 windows),
    so all four tiles run, the output passes and the backward parts in tiles of 2 / 1 / 1
    windows (at 4 windows the ticket tile would hold 64 values a thread and 8 warps would not
    take it); the output and gradient match the oracle (HALS, the BraTS shifts)."""
    monkeypatch.setitem(sched.TUNING, "warps", 8)
    monkeypatch.setitem(sched.TUNING, "wpp", 2)
    monkeypatch.setitem(sched.TUNING, "programs_per_sm", 2)
    for key in ("tile", "out_tile", "bwd_tile", "bwd_parts_tile"):
        monkeypatch.setitem(sched.TUNING, key, True)
    seen = []
    for module, name in ((wn3, "_fused_kernel"), (bwd3, "_fused_bwd_kernel")):
        monkeypatch.setattr(module, name, _WppSpy(getattr(module, name), seen, _TILE_KEYS))
    x, v0, dy = nmf_inputs(gen, (1, 8, 16, 8, 32), 8, zero_windows=True)
    kw = dict(head_dim=8, patch_size=8, shifts=[None, 2, 4, 6], solver="hals", iters=5)
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, **kw)
    assert rel_err(dx, dx_ref) <= 1e-4
    assert seen == [dict(WPP=2, TILE=True, OTILE=True, WT=2),
                    dict(WPP=2, BTILE=True, WT=1, PTILE=True, PWT=1)]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count_waits", [False, True], ids=["plane-by-plane", "counts-at-once"])
def test_design3_waits_either_way_match_reference(gen, design3, monkeypatch, device, count_waits):
    """The stages' waits plane by plane or on all their planes' counts at once
    (``TUNING["count_waits"]``; the default before Triton 3.7): the kernels take TWAIT 0 / 2 and
    compute the oracle's output and gradient (the BraTS shifts: every stage waits on 2 planes)."""
    monkeypatch.setitem(sched.TUNING, "count_waits", count_waits)
    seen = []
    for module, name in ((wn3, "_fused_kernel"), (bwd3, "_fused_bwd_kernel")):
        monkeypatch.setattr(module, name, _WppSpy(getattr(module, name), seen, ("TWAIT", "NOFF")))
    x, v0, dy = nmf_inputs(gen, (1, 4, 24, 8, 16), 8)
    kw = dict(head_dim=4, patch_size=8, shifts=[None, 2, 4, 6], solver="hals", iters=5)
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, **kw)
    assert rel_err(dx, dx_ref) <= 1e-4
    assert seen == [dict(TWAIT=2 if count_waits else 0, NOFF=2)] * 2


class _WppSpy:
    """Stands in for a persistent kernel: records the WPP of each launch (or its constexprs among
    ``keys``), then launches it."""

    def __init__(self, kernel, seen, keys=None):
        self.kernel, self.seen, self.keys = kernel, seen, keys

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if self.keys:  # the launch's constexprs among ``keys``
                self.seen.append({k: kwargs[k] for k in self.keys if k in kwargs})
            else:
                self.seen.append(kwargs["WPP"])
            return self.kernel[grid](*args, **kwargs)

        return run


@pytest.mark.parametrize("device", DEVICES)
def test_design3_matches_design2(gen, monkeypatch, device):
    """In float64 the fused forward and backward (batched solves) give the second design's output
    and gradient."""
    x, v0, dy = nmf_inputs(gen, (1, 4, 12, 8, 8), 4, zero_windows=True)
    kw = dict(head_dim=4, patch_size=4, shifts=[None, 2, (1, 3, 2)], solver="hals")
    monkeypatch.setitem(wn.TUNING, "design", 2)
    two = run_grad("triton", x, v0, dy, torch.float64, device, **kw)
    monkeypatch.setitem(wn.TUNING, "design", 3)
    three = run_grad("triton", x, v0, dy, torch.float64, device, **kw)
    assert rel_err(three[0], two[0]) <= 1e-12 and rel_err(three[1], two[1]) <= 1e-12
    assert three[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_design3_low_precision(gen, design3, device, dtype):
    """fp16 / bf16 within 2x the reference's own error at that dtype, plus an atol."""
    x, v0, dy = nmf_inputs(gen, (1, 4, 12, 8, 8), 4)
    check_low_precision(x, v0, dy, dtype, device, head_dim=4, patch_size=4,
                        shifts=[None, 2])  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_design3_one_launch_and_deterministic(gen, design3, monkeypatch, device):
    """One persistent kernel each way (plus the flags' zero fill), none of the second design's;
    bitwise the same twice."""
    bwd2 = importlib.import_module("fastnmf.kernels._window2_bwd")
    launched = []
    spy_on(monkeypatch, wn3, ("_fused_kernel",), launched)
    spy_on(monkeypatch, bwd3, ("_fused_bwd_kernel",), launched)
    spy_on(monkeypatch, wn2, ("_parts_kernel", "_solve_kernel", "_apply_kernel"), launched)
    spy_on(monkeypatch, bwd2, ("_parts_bwd_kernel", "_solve_bwd_kernel", "_apply_bwd_kernel2"),
           launched)  # fmt: skip
    x, v0, dy = nmf_inputs(gen, (1, 4, 12, 8, 8), 4)
    kw = dict(head_dim=4, patch_size=4, shifts=[None, 2])
    y1, dx1 = run_grad("triton", x, v0, dy, torch.float32, device, **kw)
    assert launched == ["_fused_kernel", "_fused_bwd_kernel"]
    y2, dx2 = run_grad("triton", x, v0, dy, torch.float32, device, **kw)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)


@pytest.mark.skipif(not INTERPRET, reason="a compiled kernel's globals stay as compiled")
@pytest.mark.parametrize("iters", [1, 3])
def test_design3_backward_holds_the_recomputed_iterates(gen, design3, monkeypatch, iters):
    """Up to ``_HELD_ITERS`` power steps the backward solve computes the iterates once and holds
    them (T compile-time) instead of recomputing them before each step back: the same values,
    so dx is bitwise the recomputing solve's (``_HELD_ITERS`` 0 forces that one)."""
    x, v0, dy = nmf_inputs(gen, (1, 4, 8, 8, 8), 4)  # 2 planes of 4 windows
    geo = common._Geometry2(x, 4, (4, 4, 4), [None, 2])
    assert sched.fused_plan(tuple(geo.NW), geo.shifts) is not None  # the fused path runs
    x.requires_grad_()
    y = fastnmf.matricized_nmf(x, v0, kernel="triton", head_dim=4, window=4,
                               shifts=[None, 2], solver="hals", iters=iters)  # fmt: skip
    assert iters <= bwd3._HELD_ITERS
    (held,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    monkeypatch.setattr(bwd3, "_HELD_ITERS", tl.constexpr(0))
    (recomputed,) = torch.autograd.grad(y, x, dy)
    assert torch.equal(held, recomputed)


@pytest.mark.parametrize("shifts", [[None], [None, 4], [None, 2, 4, 6]])
@pytest.mark.parametrize("wpp", [2, 4, 16])
def test_solves_take_the_rows_that_keep_a_matrix_in_a_warp(monkeypatch, shifts, wpp):
    """Both solves take every shift of a ticket's windows (NSB) and, where those are fewer than
    ``_SOLVE_ROWS``, masked rows up to it (NSBP): K, loaded as rows of E^2, then lies in one warp;
    the forward's inference scratch holds that many rows a program."""
    monkeypatch.setitem(sched.TUNING, "wpp", wpp)
    x = torch.empty(1, 8, 16, 16, 64, device="meta")
    geo = common._Geometry2(x, 8, (8, 8, 8), shifts)
    pipe = sched.Pipeline(geo, sched.fused_plan(tuple(geo.NW), geo.shifts), x.device)
    block = pipe.block(geo)
    nsb, nsbp = block["NSB"], block["NSBP"]
    assert block["WPP"] == wpp and nsb == len(shifts)
    assert nsbp * wpp == max(nsb * wpp, sched._SOLVE_ROWS)


def test_launch_options_register_cap(monkeypatch):
    """The untiled forward's register cap is a thread's share of the register file at the
    programs per SM (Triton 3.6's ptxas otherwise gives the [None] bf16 forward 64 registers and
    spills), and every kernel's where two programs an SM must fit; the others have none;
    ``TUNING["maxnreg"]`` (bench/time_designs.py's 32-resident-warp variant) caps all."""
    x = torch.zeros(1, 8, 16, 8, 8)
    geo = common._Geometry2(x, 4, (4, 4, 4), [None, 2])
    pipe = sched.Pipeline(geo, sched.fused_plan(tuple(geo.NW), geo.shifts), x.device)
    assert pipe.launch(share_cap=True) == {"num_warps": 16, "maxnreg": 128}
    assert pipe.launch(share_cap=False) == {"num_warps": 16}
    monkeypatch.setitem(sched.TUNING, "warps", 8)
    assert pipe.launch(share_cap=True) == {"num_warps": 8, "maxnreg": 255}  # 256: ptxas's most
    monkeypatch.setitem(sched.TUNING, "programs_per_sm", 2)  # two must fit: both capped
    for share_cap in (True, False):
        assert pipe.launch(share_cap=share_cap) == {"num_warps": 8, "maxnreg": 128}
    monkeypatch.setitem(sched.TUNING, "maxnreg", 64)
    for share_cap in (True, False):
        assert pipe.launch(share_cap=share_cap) == {"num_warps": 8, "maxnreg": 64}


def test_windows_smaller_than_the_program_take_the_register_cap(monkeypatch):
    """A window of fewer values (E P^d) than the program's threads (the isles preset's E = P = 4:
    256 for 512) is "small": both fused kernels launch at the register cap there (the forward
    always, the backward with a Triton from 3.7: kernels/_window3_bwd.py), none of the E = P = 8
    layers does; the one-shift backward's cap before Triton 3.7 stays."""
    def pipe_of(e, p, shifts, spatial=(16, 16, 16)):
        x = torch.empty(1, 2 * e, *spatial, device="meta")
        geo = common._Geometry2(x, e, (p, p, p), shifts)
        return geo, sched.Pipeline(geo, sched.fused_plan(tuple(geo.NW), geo.shifts), x.device)

    isles, isles_pipe = pipe_of(4, 4, [None, 1, 2, 3])
    assert isles_pipe.small_windows(isles)  # 4 x 64 < 16 warps x 32
    assert bwd3.share_cap(isles, isles_pipe) == bwd3._CAP_SMALL_WINDOWS
    for e, p, shifts in ((8, 8, [None, 2, 4, 6]), (8, 4, [None, 1, 2, 3]), (4, 8, [None, 4])):
        geo, pipe = pipe_of(e, p, shifts)
        assert not pipe.small_windows(geo) and not bwd3.share_cap(geo, pipe), (e, p)
    geo, pipe = pipe_of(8, 8, [None])
    assert bwd3.share_cap(geo, pipe) == bwd3._CAP_ONE_SHIFT
    monkeypatch.setitem(sched.TUNING, "warps", 8)  # 256 threads: a window of 256 values is not
    assert not isles_pipe.small_windows(isles)


@pytest.mark.skipif(not INTERPRET, reason="under the interpreter programs run in turn")
@pytest.mark.parametrize("backward", [False, True])
def test_design3_schedule_error_raises_under_the_interpreter(gen, design3, monkeypatch, backward):
    """A ticket skipped (the counter starts at 1: parts(0)'s first chunk never runs) leaves a
    later stage waiting on a count that cannot grow while its program runs; under the
    interpreter that is a clear error, not a hang (forward; backward after a good forward)."""
    x, v0, dy = nmf_inputs(gen, (1, 8, 12, 8, 8), 4)
    x = x.float().requires_grad_(backward)
    kw = dict(head_dim=4, window=4, shifts=[None, 2], kernel="triton")
    y = fastnmf.matricized_nmf(x, v0.float(), **kw) if backward else None
    init = sched.Pipeline.__init__

    def skip_first_ticket(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.flags[0] = 1

    monkeypatch.setattr(sched.Pipeline, "__init__", skip_first_ticket)
    with pytest.raises(Exception, match="schedule error"):  # the interpreter wraps it
        if backward:
            y.backward(dy.float())
        else:
            fastnmf.matricized_nmf(x, v0.float(), **kw)


def test_design3_part_statistics_ring(gen, design3, monkeypatch):
    """The forward's part statistics in a ring of 2 plane regions shared by the heads (+ two for
    plane 0, alternate heads): 2 x 2 heads of 4 planes in 4 regions, and the result is still the
    oracle's."""
    monkeypatch.setitem(sched.TUNING, "ring", 2)
    x, v0, dy = nmf_inputs(gen, (2, 8, 16, 4, 4), 4)
    geo = common._Geometry2(x, 4, (4, 4, 4), [None, 2])
    pipe = sched.Pipeline(geo, sched.fused_plan(tuple(geo.NW), geo.shifts), x.device, ring=True)
    assert geo.bh == 4 and pipe.npl == 4
    assert pipe.ring == 2 and pipe.part_slots == 4 * geo.slots // 16  # 4 regions of 16 planes
    dx, dx_ref = fp32_against_reference(x, v0, dy, "cpu", head_dim=4, patch_size=4,
                                        shifts=[None, 2])  # fmt: skip
    assert rel_err(dx, dx_ref) <= 1e-4


MERGED_CASES = [
    # shape, shifts, merges: rows of 8 windows along axis 2 in tickets of 4 (merges inside a
    # ticket, none across a ticket's end or a row's); rows of 6 (a ticket would span two rows:
    # no merge, ``merge_on``); 2D (planes along axis 1: a plane is a row)
    ((1, 4, 8, 4, 32), [None, (1, 3, 6), (2, 1, 0)], True),
    ((1, 4, 8, 8, 24), [None, 2], False),
    ((1, 4, 8, 32), [None, 2, (3, 6)], True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,shifts,merges", MERGED_CASES)
def test_design3_merged_parts_match_reference(gen, design3, monkeypatch, device, shape, shifts,
                                              merges):  # fmt: skip
    """Neighbours' parts merged (``TUNING["merge"]``, the default), with shifts that split axis
    2 and one with a whole-window offset along it: the oracle's output and gradient (the
    backward from the merged forward's saved K and h), and not the unmerged bits where it merges
    (the merge ran); where it must not merge, the unmerged output bit for bit."""
    x, v0, dy = nmf_inputs(gen, shape, 4, zero_windows=True)
    kw = dict(head_dim=4, patch_size=4, shifts=shifts, solver="hals")
    monkeypatch.setitem(sched.TUNING, "merge", False)
    unmerged = training_forward(x, v0, device, **kw)
    monkeypatch.setitem(sched.TUNING, "merge", None)  # the default
    if not merges:
        assert torch.equal(training_forward(x, v0, device, **kw), unmerged)
        return
    y, dx = run_grad("triton", x, v0, dy, torch.float32, device, **kw)
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(dx, dx_ref) <= 1e-4
    assert not torch.equal(y, unmerged)


def test_merge_only_where_it_merges_by_place(monkeypatch):
    """The merged parts pass is compiled only where it merges something and a window's place in
    its ticket says whether it merges: the matrix form of the parts (dot), a shift that splits
    axis 2 (s'_2 != 0), tickets of WPP > 1 windows that are whole chunks of rows along axis 2;
    never when merging is off."""
    split = ((0, 0, 0, 0, 0, 0), (2, 2, 2, 0, 0, 0))
    along_01 = ((0, 0, 0, 0, 0, 0), (2, 1, 0, 0, 0, 1))  # axis 2: whole windows only
    monkeypatch.setitem(sched.TUNING, "merge", True)
    assert sched.merge_on(True, split, 16, 256, 4)
    assert not sched.merge_on(True, along_01, 16, 256, 4)
    assert not sched.merge_on(True, ((0, 0, 0, 0, 0, 0),), 16, 256, 4)
    assert not sched.merge_on(False, split, 16, 256, 4)
    assert not sched.merge_on(True, split, 6, 36, 4)  # a ticket would span two rows
    assert not sched.merge_on(True, split, 4, 4, 8)  # or two planes
    assert not sched.merge_on(True, split, 16, 256, 1)  # nothing to merge with
    monkeypatch.setitem(sched.TUNING, "merge", False)
    assert not sched.merge_on(True, split, 16, 256, 4)


@triton.jit
def _ring_kernel(out_ptr, NPL, BH, MNPL1, RING: tl.constexpr, N: tl.constexpr,
                 GROUP: tl.constexpr):  # fmt: skip
    i = tl.arange(0, N)  # (head, plane) = divmod(i, NPL)
    bh = i // NPL
    plane = i % NPL
    m = i < BH * NPL
    prev_bh, prev_plane, held = _ring_previous(bh, plane, NPL, RING, MNPL1, GROUP)
    tl.store(out_ptr + 4 * i, _ring_region(bh, plane, NPL, RING, GROUP), mask=m)
    tl.store(out_ptr + 4 * i + 1, held.to(tl.int32), mask=m)
    tl.store(out_ptr + 4 * i + 2, prev_bh, mask=m)
    tl.store(out_ptr + 4 * i + 3, prev_plane, mask=m)


@pytest.mark.parametrize(("npl", "heads", "ring", "group"),
                         [(1, 3, 2, 1), (2, 3, 3, 1), (3, 1, 2, 1), (5, 3, 2, 1), (5, 4, 3, 1),
                          (16, 3, 3, 1), (3, 2, 2, 2), (5, 4, 3, 2), (5, 6, 2, 3),
                          (16, 8, 3, 4)])  # fmt: skip
@pytest.mark.parametrize("skew", [False, True], ids=["plain", "skewed"])
def test_ring_regions_of_all_heads(npl, heads, ring, group, skew):
    """Walking the tickets in order (a shift that splits the planes' axis), head by head or
    ``group`` heads side by side (each stage of a group's heads, then the next stage): every
    plane's region is one of (ring + min(groups, 2)) x group; the kernels' previous occupant of a
    region is its last writer; and every solve that reads a plane's statistics comes before they
    are overwritten (the kernels wait for exactly those solves, so the order holds on a GPU
    too)."""
    n = triton.next_power_of_2(heads * npl)
    out = torch.full((4 * n,), -7, dtype=torch.int32)
    _ring_kernel[(1,)](out, npl, heads, magic(max(npl - 1, 1)), RING=ring, N=n, GROUP=group)
    rows = out[: 4 * heads * npl].view(heads, npl, 4).tolist()
    order = [(bh, st) for g in range(0, heads, group) for st in sched._schedule(npl, skew)
             for bh in range(g, g + group)]  # fmt: skip
    regions = (ring + min(heads // group, 2)) * group
    readers = {p: [] for p in range(npl)}
    for q in range(npl):  # solve(q) reads the statistics of these planes
        for _, p in sched._needs((1, q), npl, [False, True], [0, 0]):
            readers[p].append((1, q))
    last = {}
    for pos, (bh, (phase, p)) in enumerate(order):
        if phase:
            continue
        region, held, prev_bh, prev_plane = rows[bh][p]
        assert 0 <= region < regions
        assert (held == 1) == (region in last)
        if held:
            assert last[region] == (prev_bh, prev_plane)
            for st in readers[prev_plane]:  # read before the overwrite
                assert order.index((prev_bh, st)) < pos
        last[region] = (bh, p)


def test_design3_falls_back_where_the_schedule_cannot_wait(gen, design3, monkeypatch):
    """A shift with a whole-window offset along the planes' axis (5 = 4 + 1 with P = 4) makes
    solve(1) need parts(3): no fused plan, and the second design runs (same result)."""
    shifts = [None, (5, 0, 0)]
    x, v0, dy = nmf_inputs(gen, (1, 4, 16, 4, 4), 4)
    geo = common._Geometry2(x, 4, (4, 4, 4), shifts)
    assert sched.fused_plan(tuple(geo.NW), geo.shifts) is None
    # the compiled / exported op (fastnmf/window_op.py) runs the same design as this eager call
    assert design_for(x, 4, (4, 4, 4), shifts) == 2
    assert design_for(x, 4, (4, 4, 4), [None, (2, 0, 0)]) == 3
    launched = []
    spy_on(monkeypatch, wn3, ("_fused_kernel",), launched)
    spy_on(monkeypatch, wn2, ("_parts_kernel", "_solve_kernel", "_apply_kernel"), launched)
    dx, dx_ref = fp32_against_reference(x, v0, dy, "cpu", head_dim=4, patch_size=4,
                                        shifts=shifts)  # fmt: skip
    assert launched == ["_parts_kernel", "_solve_kernel", "_apply_kernel"]
    assert rel_err(dx, dx_ref) <= 1e-4


def _needs_by_rolling(size: int, patch: int, shifts: list[int]):
    """Along one axis of ``size`` voxels in windows of ``patch``, by rolling coordinates: the
    planes whose voxels a shifted plane holds (solve <- parts), and the shifted planes an unshifted
    plane's voxels land in (apply <- solve)."""
    v = np.arange(size)
    solve, apply = {}, {}
    for s in shifts:
        shifted = (v + s) % size // patch  # the shifted plane of each voxel
        for o in range(size // patch):
            solve.setdefault(o, set()).update((v[shifted == o] // patch).tolist())
        for p in range(size // patch):
            apply.setdefault(p, set()).update(shifted[v // patch == p].tolist())
    return solve, apply


@pytest.mark.parametrize("npl", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize("shifts", [[0], [0, 4], [0, 2, 4, 6], [0, 1, 7]])
@pytest.mark.parametrize("skew", [False, True], ids=["plain", "skewed"])
def test_schedule_meets_every_need(npl, shifts, skew):
    """Each (pass, plane) once; every stage after the stages it needs, and the planes the kernels
    wait on cover those needs, the needs found by rolling voxel coordinates (P = 8). In the
    skewed order a stage right after one it needs is rare (the first planes' and the wrap's
    stages: at most 4, however many planes), in the plain one every plane has one."""
    patch = 8
    consts = tuple((s % patch, 0, 0, s // patch, 0, 0) for s in shifts)
    plan = sched.fused_plan((npl, 1, 1), consts, skew)
    assert plan is not None
    ax, order = plan
    assert ax == 0 and sorted(order) == [(k, p) for k in range(3) for p in range(npl)]
    solve, apply = _needs_by_rolling(npl * patch, patch, shifts)
    position = {stage: i for i, stage in enumerate(order)}
    offsets = sched.wait_offsets(consts, ax)  # what the kernels wait on
    adjacent = 0  # stages right after a stage they need
    for p in range(npl):
        assert all(position[(0, q)] < position[(1, p)] for q in solve[p])
        assert all(position[(1, q)] < position[(2, p)] for q in apply[p])
        assert solve[p] <= {(p - o) % npl for o in offsets}
        assert apply[p] <= {(p + o) % npl for o in offsets}
        adjacent += any(position[(0, q)] == position[(1, p)] - 1 for q in solve[p])
        adjacent += any(position[(1, q)] == position[(2, p)] - 1 for q in apply[p])
    if npl >= 4 and len(shifts) > 1:
        assert adjacent <= 4 if skew else adjacent >= npl


@triton.jit
def _wait_probe(flags, npl, plane, need, BEFORE: tl.constexpr, OFFS: tl.constexpr,
                NOFF: tl.constexpr, TWAIT: tl.constexpr):  # fmt: skip
    waits._wait_stage(flags, npl, plane, BEFORE, need, OFFS, NOFF, TWAIT)


@pytest.mark.skipif(not INTERPRET, reason="a short count spins forever on a GPU")
@pytest.mark.parametrize("offsets", [(0,), (0, 1), (0, 1, 3)], ids=["one", "two", "three"])
@pytest.mark.parametrize("before", [1, 2], ids=["solve-waits-parts", "apply-waits-solves"])
@pytest.mark.parametrize("mode", [0, 2], ids=["plane-by-plane", "counts-at-once"])
def test_waits_read_the_counts_of_their_planes(offsets, before, mode):
    """A stage of plane p waits on the counts of planes p - o (solves: ``before`` 1) or p + o
    (applies: 2) mod npl, o over the offsets, and on no other: with one count short (the others
    complete) the wait finds it (under the interpreter a schedule error) exactly when its plane
    is one of those; one offset, two and three (read at once: padded to four), plane by plane
    (TWAIT 0) and all at once (2)."""
    npl, need = 5, 3
    for p in range(npl):
        want = {(p - o if before == 1 else p + o) % npl for o in offsets}
        for q in range(npl):
            flags = torch.full((2 * npl,), need, dtype=torch.int32)
            flags[(before - 1) * npl + q] = need - 1
            if q in want:
                with pytest.raises(Exception, match="schedule error"):
                    _wait_probe[(1,)](flags, npl, p, need, BEFORE=before, OFFS=offsets,
                                      NOFF=len(offsets), TWAIT=mode)  # fmt: skip
            else:
                _wait_probe[(1,)](flags, npl, p, need, BEFORE=before, OFFS=offsets,
                                  NOFF=len(offsets), TWAIT=mode)  # fmt: skip


@triton.jit
def _stages_kernel(out_ptr, NPL, N: tl.constexpr, SKEW: tl.constexpr):
    i = tl.arange(0, N)
    phase, plane = _stage(i, NPL, SKEW)
    tl.store(out_ptr + 2 * i, phase, mask=i < 3 * NPL)
    tl.store(out_ptr + 2 * i + 1, plane, mask=i < 3 * NPL)


@pytest.mark.parametrize("npl", [1, 2, 3, 4, 5, 7, 16])
@pytest.mark.parametrize("skew", [False, True], ids=["plain", "skewed"])
def test_kernels_decode_the_schedule(npl, skew):
    """The kernels compute each ticket's stage (no table copied to the device): the same list
    as the host's schedule, plain or skewed."""
    out = torch.full((2 * triton.next_power_of_2(3 * npl),), -1, dtype=torch.int32)
    _stages_kernel[(1,)](out, npl, N=triton.next_power_of_2(3 * npl), SKEW=skew)
    got = [tuple(p) for p in out[: 6 * npl].view(-1, 2).tolist()]
    assert got == sched._schedule(npl, skew)
    assert (got != sched._schedule(npl)) == (skew and npl >= 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiles", [False, True], ids=["untiled", "four tiles"])
def test_one_program_takes_every_ticket(gen, design3, monkeypatch, device, tiles):
    """One persistent program for the whole call (a program's later tickets after its first
    solve): the oracle's output and gradient, with the BraTS shifts. On the H200 the untiled
    forward failed exactly so until the parts pass's 0/1 matrix was made per ticket (held across
    the ticket loop in shared memory, it was overwritten by the non-inlined solve:
    bench/results/h200_2026-12-04/); under the interpreter program 0 takes every ticket anyway."""
    for key in sched.TILE_KEYS:
        monkeypatch.setitem(sched.TUNING, key, tiles)
    monkeypatch.setattr(sched, "_programs", lambda device, tickets: 1)
    x, v0, dy = nmf_inputs(gen, (1, 8, 32, 16, 16), 8)
    kw = dict(head_dim=8, patch_size=8, shifts=[None, 2, 4, 6], solver="hals", iters=3)
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, **kw)
    assert rel_err(dx, dx_ref) <= 1e-4


@pytest.mark.parametrize(("shifts", "design"),
                         [(None, 1), ([None], 1), ([None, 4], 2), ([None, 2, 4, 6], 3),
                          ([None, 2, 4], 3)])  # fmt: skip
def test_default_design_follows_the_shift_count(monkeypatch, shifts, design):
    """``TUNING["design"]`` None (the default): the design the H200's timing chose for the shift
    count (local windows: 1, two shifts: 2, more: 3), and the call runs that design's entry;
    a design set in TUNING wins."""
    kernels = importlib.import_module("fastnmf.kernels")
    assert wn.TUNING["design"] is None and kernels.window_design(shifts) == design
    monkeypatch.setitem(wn.TUNING, "design", 2)
    assert kernels.window_design([None, 2, 4, 6]) == 2
    monkeypatch.setitem(wn.TUNING, "design", None)
    called = []
    for d, name in ((1, "window_nmf"), (2, "window_nmf2"), (3, "window_nmf3")):
        monkeypatch.setattr(kernels, name, lambda *a, d=d, **k: called.append(d))
    x = torch.rand(1, 4, 8, 8, 8)
    fastnmf.matricized_nmf(x, torch.rand(512, 1), head_dim=4, window=8, shifts=shifts,
                           kernel="triton", check=False)  # fmt: skip
    assert called == [design]
