"""Static traffic (issue 14): the interpreter's byte counter, the analytic model, the L2 replay."""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from fastnmf.profile.static import l2, traffic
from fastnmf.profile.static.cases import StaticCase
from fastnmf.profile.static.counter import counting, gpu_geometry, interpreting
from fastnmf.profile.static.traffic_model import ModelUnsupported, model_launches

needs_interpreter = pytest.mark.skipif(
    not interpreting(), reason="the counter runs the kernels under TRITON_INTERPRET=1"
)


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    v = tl.load(x_ptr + i * STRIDE, mask=mask)
    tl.store(y_ptr + i, v, mask=mask)


@needs_interpreter
@pytest.mark.parametrize("stride", [1, 8])
def test_counter_counts_a_copy_kernel(stride):
    """Bytes, unique bytes and sectors of a kernel whose accesses are known by hand."""
    n, block = 1000, 128  # 8 programs, the last one 104 lanes
    x = torch.randn(n * stride)
    y = torch.empty(n)
    with counting() as call:
        _copy_kernel[(triton.cdiv(n, block),)](x, y, n, STRIDE=stride, BLOCK=block)
    (launch,) = call.launches
    assert torch.equal(y, x[::stride])
    assert launch.grid == (8, 1, 1)
    xs, ys = launch.args["x_ptr"], launch.args["y_ptr"]
    assert (xs["bytes_loaded"], xs["bytes_stored"], xs["unique_bytes"]) == (4 * n, 0, 4 * n)
    assert (ys["bytes_loaded"], ys["bytes_stored"], ys["unique_bytes"]) == (0, 4 * n, 4 * n)
    # contiguous: 128 floats = 16 sectors per full program, 104 floats = 13 sectors;
    # stride 8 floats = 32 bytes: one sector per lane
    assert ys["sectors"] == 7 * 16 + 13
    assert xs["sectors"] == (7 * 16 + 13 if stride == 1 else n)
    assert launch.prog.tolist() == sorted(launch.prog.tolist())  # trace in GPU program order
    assert call.host_device_copies == 0


@needs_interpreter
def test_counter_refuses_an_access_past_a_tensor():
    """An active lane past the end of its tensor (here a mask that admits 8 elements too many)
    is an error naming the kernel, the argument and the bytes, not a count: the counter doubles
    as a bounds check of the kernels it runs (a GPU would read another buffer, or fault)."""
    n, block = 1000, 128
    x, y = torch.randn(n - 8), torch.empty(n)
    with pytest.raises(RuntimeError, match=r"_copy_kernel: .*(past the end of x_ptr \(bytes "
                                           r"3996\.\.4000 of 3968|spans the tensor arguments "
                                           r"x_ptr and y_ptr)"):  # (y may lie just past x)
        with counting():
            _copy_kernel[(triton.cdiv(n, block),)](x, y, n, STRIDE=1, BLOCK=block)


@triton.jit
def _two_lanes_kernel(x_ptr, y_ptr, far):
    lane = tl.arange(0, 2)
    v = tl.load(x_ptr + lane * far)  # lane 1 "far" elements past x's first
    tl.store(y_ptr + lane, v)


@needs_interpreter
def test_counter_refuses_an_access_into_another_tensor():
    """A lane that lands inside another tensor argument (an offset gone wrong) is refused too:
    each tl.load and tl.store has one base pointer, so its lanes lie in one tensor."""
    x, y = torch.randn(64), torch.zeros(2)
    far = (y.data_ptr() - x.data_ptr()) // 4  # y's first element, as an offset from x
    with pytest.raises(RuntimeError, match="_two_lanes_kernel: one access spans the tensor "
                                           "arguments (x_ptr and y_ptr|y_ptr and x_ptr)"):
        with counting():
            _two_lanes_kernel[(1,)](x, y, far)
    with counting():  # both lanes inside x: counted
        _two_lanes_kernel[(1,)](x, y, 63)
    assert y.tolist() == [x[0].item(), x[63].item()]


@needs_interpreter
@pytest.mark.parametrize("design,shifts,rank", [
    (2, (None, 4), 1), (2, (None, 2, 4, 6), 1), (3, (None, 4), 1), (3, (None, 2, 4, 6), 1),
    (1, (None,), 1), (1, (None, 4), 1), (1, (None, 4), 2)])  # fmt: skip
def test_window_designs_stay_inside_their_tensors_at_a_ragged_shape(design, shifts, rank):
    """The window designs (their defaults; design 1 local windows' default, and the rank-two
    kernels) forward and backward under the counter's bounds check at a shape whose windows fill
    no power of two: 1 x 16 (two heads) x 8 x 16 x 24, 6 windows a head, design 2 at 4 windows a
    program (its second program runs past the last window)."""
    from fastnmf.profile.static.counter import count_call

    case = StaticCase("window", 1, 16, (8, 16, 24), "fp32", shifts, design=design, rank=rank,
                      wpp=4 if design == 2 else None)  # fmt: skip
    calls = count_call(case)
    assert set(calls) == {"fwd", "bwd"}
    x = [launch.args["x_ptr"] for launch in calls["fwd"].launches if "x_ptr" in launch.args]
    assert x and sum(a["unique_bytes"] for a in x) >= 4 * math.prod(case.shape)


def test_counter_counts_a_host_to_device_copy():
    """A tensor made from host data is a copy host->device on a GPU (aten.lift_fresh): counted,
    so that the kernels' zero copies per call (above, and per case below) mean something."""
    with counting() as call:
        torch.tensor([1, 2, 3], dtype=torch.int32)
        torch.zeros(3)  # a fill, not a copy
    assert call.host_device_copies == 1


@triton.jit
def _atomic_kernel(out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.atomic_add(out_ptr + i % 4, 1.0)  # a read-modify-write of each lane's address
    tl.atomic_cas(out_ptr + 8, 0.0, 2.0)


@needs_interpreter
def test_counter_counts_atomics_as_load_and_store():
    out = torch.zeros(16)
    with counting() as call:
        _atomic_kernel[(2,)](out, BLOCK=16)
    (launch,) = call.launches
    a = launch.args["out_ptr"]
    # per program: 16 lanes x 4 B read and written (add), 4 B read and written (cas)
    assert (a["bytes_loaded"], a["bytes_stored"]) == (2 * (64 + 4), 2 * (64 + 4))
    assert a["unique_bytes"] == 5 * 4 and a["sectors"] == 2 * 4


@triton.jit
def _grid_kernel(out_ptr):
    tl.store(out_ptr + (tl.program_id(0) + 3 * tl.program_id(1)) * 8, 1.0)  # a sector each


@needs_interpreter
def test_counter_trace_is_in_gpu_order():
    """The interpreter runs axis 0 outermost; the trace must follow a GPU's linear order."""
    out = torch.zeros(3 * 4 * 8)
    with counting() as call:
        _grid_kernel[(3, 4)](out)
    (launch,) = call.launches
    assert launch.prog.tolist() == list(range(12))
    offsets = (launch.sector & ((1 << 31) - 1)).tolist()
    assert offsets == [x + 3 * y for y in range(4) for x in range(3)]


def test_gpu_geometry_sets_and_restores_the_gpu_values():
    wn = importlib.import_module("fastnmf.kernels.window_nmf")
    before = (wn.INTERPRET, wn._MIN_TILE)
    with gpu_geometry():
        assert wn.INTERPRET is False
        assert wn._MIN_TILE == 4  # the GPU branch of `64 if INTERPRET else 4`
    assert (wn.INTERPRET, wn._MIN_TILE) == before


COVERED = [
    # rank one, window: stats fwd/bwd + tiled apply (4^3 tiles)
    StaticCase("window", 1, 8, (16, 16, 16), "fp32", (None, 4)),
    # one shift: stats kernels fused with the output pass
    StaticCase("window", 1, 16, (16, 16, 16), "bf16", (None,)),
    # an odd shift: per-voxel apply kernels (2D)
    StaticCase("window", 1, 8, (16, 16), "fp32", (None, 3)),
    # non-cubic 3D, per-axis shifts, 4x2x4 tiles
    StaticCase("window", 1, 8, (8, 16, 24), "fp32", (None, (4, 2, 4))),
    # global: reduce, iterate, apply (two matrices: the backward copies hats[..., -1, :])
    StaticCase("global", 1, 16, (16, 16, 16), "fp32", (None,), window=None),
    StaticCase("global", 1, 8, (16, 32), "bf16", (None,), window=None),
    # 16 rows: the backward's output pass with the rows across threads (the many-rows kernel)
    StaticCase("global", 1, 32, (16, 16, 16), "fp32", (None,), window=None, head_dim=16),
    # rank > 1, window: fwd, apply, bwd (per-shift dx buffer) and the PyTorch sum / where / to
    StaticCase("window", 1, 8, (16, 16), "bf16", (None, 2), rank=2),
    StaticCase("window", 1, 8, (16, 16), "fp32", (None,), rank=4),
    # rank > 1, global (forward only): T + 1 passes, the PyTorch F update, apply
    StaticCase("global", 1, 16, (16, 16), "fp32", (None,), window=None, rank=2, iters=2),
]


@needs_interpreter
def test_counts_from_the_counting_subprocess_equal_counts_in_process(monkeypatch):
    """A compiling process (the CLI's) counts in a subprocess under the interpreter and reads
    the counts back from JSON and raw arrays (no pickle): the same counts as in this process."""
    from fastnmf.profile.static import counter

    case = COVERED[7]  # 2D rank 2: cheap, and tuple shifts go through JSON
    # counter.count_call in this process, through traffic's cache: test_model_equals_counter
    # reuses this count of the same case instead of running the kernels again
    here = traffic._count([case])[0]
    monkeypatch.setattr(traffic, "_COUNTS", {})
    monkeypatch.setattr(counter, "interpreting", lambda: False)  # as in a compiling process
    there = traffic._count([case])[0]
    assert set(here) == set(there)
    for pass_ in here:
        a, b = here[pass_], there[pass_]
        assert (a.host_device_copies, a.device_host_copies) == (
            b.host_device_copies, b.device_host_copies)  # fmt: skip
        assert len(a.launches) == len(b.launches) > 0
        for x, y in zip(a.launches, b.launches, strict=True):
            assert (x.kind, x.kernel, tuple(x.grid), x.args) == (y.kind, y.kernel, y.grid, y.args)
            for name in ("prog", "sector", "store"):
                assert np.array_equal(getattr(x, name), getattr(y, name)), (x.kernel, name)


@needs_interpreter
@pytest.mark.parametrize("case", COVERED, ids=[c.id for c in COVERED])
def test_model_equals_counter(case):
    """Launch by launch, tensor by tensor: bytes loaded/stored, unique bytes, sectors, grid."""
    counts = traffic._count([case])[0]
    assert set(counts) == ({"fwd"} if case.mode == "global" and case.rank > 1 else {"fwd", "bwd"})
    for pass_, call in counts.items():
        counted = [traffic._as_model(launch) for launch in call.launches]
        model = model_launches(case, pass_)
        assert [m["kernel"] for m in model] == [c["kernel"] for c in counted]
        for m, c in zip(model, counted, strict=True):
            assert m == c, (pass_, m["kernel"])
        assert call.host_device_copies == 0  # the shift table is compile-time


def test_model_refuses_what_it_does_not_cover():
    with pytest.raises(ModelUnsupported, match="no Triton backward"):
        model_launches(StaticCase("global", 1, 8, (16, 16, 16), window=None, rank=2), "bwd")
    with pytest.raises(ModelUnsupported, match="whole sectors"):
        model_launches(StaticCase("window", 1, 8, (8, 8, 8), "bf16", (None, 4)), "fwd")
    with pytest.raises(ValueError, match="pass_"):
        model_launches(StaticCase("window", 1, 8, (16, 16, 16)), "fwdbwd")


def _naive_lru(sector, store, lines):
    """Sectored LRU by hand: (DRAM bytes read, written)."""
    cache, read, written = OrderedDict(), 0, 0
    for s, st in zip(sector.tolist(), store.tolist(), strict=True):
        line = s >> 2
        if line in cache:
            cache.move_to_end(line)
        else:
            cache[line] = {}
            if len(cache) > lines:
                written += 32 * sum(cache.popitem(last=False)[1].values())
        sectors = cache[line]
        if s & 3 not in sectors:
            sectors[s & 3] = False
            read += 0 if st else 32
        sectors[s & 3] = sectors[s & 3] or st
    return read, written + 32 * sum(sum(v.values()) for v in cache.values())


def _replay(sector, store, lines):
    launch = np.zeros(sector.size, np.int64)
    return l2.replay(sector, store, launch, intra_lines=np.array([lines]), inter_lines=lines)


def test_stack_distances_and_replay_match_a_naive_lru():
    rng = np.random.default_rng()
    keys = rng.integers(0, 60, 2000)
    stack, naive = [], []
    for k in keys.tolist():
        naive.append(len(stack) - 1 - stack.index(k) if k in stack else -1)
        if k in stack:
            stack.remove(k)
        stack.append(k)
    assert l2.stack_distances(keys).tolist() == naive
    sector = rng.integers(0, 500, 4000)
    store = rng.random(4000) < 0.3
    for lines in (3, 40, 100):
        read, written = _replay(sector, store, lines)
        assert (int(read.sum()), int(written.sum())) == _naive_lru(sector, store, lines)


def test_dram_estimate_monotone_and_fits():
    rng = np.random.default_rng()
    sector = rng.integers(0, 2000, 20000)
    store = rng.random(20000) < 0.2
    totals = [sum(int(a.sum()) for a in _replay(sector, store, lines)) for lines in
              (1, 4, 16, 64, 256, 1024)]  # fmt: skip
    assert all(a >= b for a, b in zip(totals, totals[1:], strict=False))
    # a load-only trace that fits: every distinct sector read once
    loads = np.zeros_like(store)
    read, written = _replay(sector, loads, 2000)
    assert int(read.sum()) == 32 * np.unique(sector).size and int(written.sum()) == 0


def test_design3_is_counted_with_a_tickets_row(monkeypatch):
    """The third design is counted with its last axis a ticket's row of windows (P x WPP) where
    the case's rows hold whole tickets, so its merged forward merges in the count as at the
    benchmark shape; the other designs, and rows that hold no whole ticket, at side^d."""
    from fastnmf.kernels._window3_sched import TUNING

    big = StaticCase("window", 2, 32, (128,) * 3, "bf16", (None, 2, 4, 6), design=3)
    assert traffic.counted_case(big).shape == (1, 8, 16, 16, 32)
    assert traffic.counted_case(StaticCase("window", 2, 32, (128,) * 3)).shape == (1, 8, 16, 16, 16)
    odd = StaticCase("window", 1, 8, (24, 24, 24), design=3)  # rows of 3 windows
    assert traffic.counted_case(odd).spatial == (16, 16, 16)
    monkeypatch.setitem(TUNING, "wpp", 8)
    assert traffic.counted_case(big).spatial == (16, 16, 64)


@needs_interpreter
def test_model_call_scales_a_persistent_call_as_the_rows_do():
    """A call the model does not cover (the third design: counter-scaled) has the same bytes in
    ``model_call`` (the step account's source) as in the suite's rows: the persistent kernel's
    g0 and row mask scaled by its programs, not by the volume."""
    case = StaticCase("window", 2, 32, (128,) * 3, "bf16", (None, 4), design=3)
    calls = {r["pass"]: r for r in traffic.call_rows(traffic.launch_rows([case]))}
    for pass_ in ("fwd", "bwd"):
        m = traffic.model_call(case, pass_)
        assert m["source"] == "counter-scaled"
        assert (m["bytes_loaded"], m["bytes_stored"]) == (calls[pass_]["bytes_loaded"],
                                                          calls[pass_]["bytes_stored"])  # fmt: skip


@needs_interpreter
def test_design2_reads_g0_once_per_program():
    """The second design's window passes read g0 once per program (8 windows in one program: an
    eighth of the bytes of one window a program, x the same; with HALS no row mask at all), so
    the suite counts at 16^3 with the benchmark shape's windows a program (16: one program) and
    scales those reads by the programs the benchmark shape launches (2048 at 2 x 32 x 128^3), the
    other arguments by the volume."""
    from fastnmf.profile.static.counter import count_call

    big = StaticCase("window", 2, 32, (128,) * 3, "fp32", (None, 4), design=2)
    small = traffic.counted_case(big)  # at the benchmark shape's 16 windows a program
    assert small.shape == (1, 8, 16, 16, 16) and small.wpp == 16
    counts = {wpp: {x.kernel: x for x in count_call(dataclasses.replace(small, wpp=wpp))["bwd"]
                    .launches} for wpp in (1, 16)}  # fmt: skip
    one, sixteen = counts[1]["_apply_bwd_kernel2"], counts[16]["_apply_bwd_kernel2"]
    assert (math.prod(one.grid), math.prod(sixteen.grid)) == (8, 1)
    assert "rowmask_ptr" not in one.args and "rowmask_ptr" not in sixteen.args
    assert one.args["g0_ptr"]["bytes_loaded"] == 8 * sixteen.args["g0_ptr"]["bytes_loaded"] > 0
    assert one.args["x_ptr"] == sixteen.args["x_ptr"]
    counted = [traffic._as_model(x) for x in count_call(small)["bwd"].launches]
    programs = traffic._programs(big, counted, "sm_90a")
    assert programs == dict.fromkeys(("_parts_bwd_kernel", "_apply_bwd_kernel2"), 2048)
    ratio = big.numel / small.numel
    scaled = {x["kernel"]: x for x in traffic._scaled(counted, ratio, programs)}
    for arg, a in sixteen.args.items():
        f = 2048 if arg in traffic.PER_PROGRAM["_apply_bwd_kernel2"] else ratio
        assert scaled["_apply_bwd_kernel2"]["args"][arg]["bytes_loaded"] == int(
            round(a["bytes_loaded"] * f)), arg  # fmt: skip


@needs_interpreter
def test_api_rows():
    case = StaticCase("window", 2, 16, (32, 32, 32), "fp32", (None,))
    rows = traffic.launch_rows([case], small_side=16)
    assert [(r["pass"], r["launch_index"], r["kernel"]) for r in rows] == [
        ("fwd", 0, "_stats_fwd_kernel"), ("bwd", 0, "_stats_bwd_kernel")
    ]  # fmt: skip (no fill: HALS passes no row mask, kernels/_common.row_mask)
    assert all(r["model_check"] == "equal" and r["source"] == "model" for r in rows)
    calls = {r["pass"]: r for r in traffic.call_rows(rows)}
    both = calls["fwdbwd"]
    for k in ("bytes_loaded", "bytes_stored", "sectors", "dram_estimate_bytes", "launches"):
        assert both[k] == calls["fwd"][k] + calls["bwd"][k]
    x = case.numel * 4
    # fused local windows: x read twice (the second time from cache), y written once
    assert calls["fwd"]["bytes_loaded"] > 2 * x and calls["fwd"]["ideal_bytes"] == 2 * x
    assert calls["fwd"]["host_device_copies"] == 0  # the shift table is compile-time
    assert 2 * x <= calls["fwd"]["dram_estimate_bytes"] < calls["fwd"]["sectors"] * 32
    m = traffic.model_call(case, "fwd")
    assert (m["bytes_loaded"], m["bytes_stored"]) == (calls["fwd"]["bytes_loaded"],
                                                      calls["fwd"]["bytes_stored"])  # fmt: skip
    assert len(traffic.markdown(list(calls.values()))) == 2 + 3 + 2
    with pytest.raises(ValueError, match="not a multiple of the window 8"):
        traffic.launch_rows([case], small_side=12)
    with pytest.raises(ValueError, match="valid: sm_90a, sm_80"):
        traffic.launch_rows([case], target="sm_100")


@needs_interpreter
def test_model_bytes_when_rows_are_not_whole_sectors():
    """Deep U-Net levels (S2 * itemsize < 32): the model gives bytes (no sectors), still exact."""
    case = StaticCase("window", 1, 8, (8, 8), "bf16", (None, 2), window=4)
    counts = traffic._count([case])[0]
    for pass_, call in counts.items():
        model = model_launches(case, pass_, sectors=False)
        for m, c in zip(model, call.launches, strict=True):
            for label, a in m["args"].items():
                got = c.args[label]
                assert a["sectors"] is None
                assert (a["bytes_loaded"], a["bytes_stored"], a["unique_bytes"]) == (
                    got["bytes_loaded"], got["bytes_stored"], got["unique_bytes"])  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("mode, shifts, design", [("window", (None,), 1), ("window", (None, 4), 2),
                                                  ("window", (None, 2, 4, 6), 3),
                                                  ("global", (None,), 1)])  # fmt: skip
def test_hals_calls_make_and_read_no_row_mask(mode, shifts, design):
    """HALS drops no row (kernels/_common.row_mask is None): a call fills no tensor of ones (a
    launch on a GPU) and no kernel reads a row mask; the design 2 forward is then its 3 Triton
    launches and nothing else."""
    from fastnmf.profile.static.counter import count_call

    case = StaticCase(mode, 1, 16, (16, 16, 16), "fp32", shifts, design=design)
    for pass_, call in count_call(case).items():
        ops = [x.kernel for x in call.launches if x.kind == "torch"]
        assert "aten.ones" not in ops, (pass_, ops)
        assert all("rowmask_ptr" not in x.args for x in call.launches), pass_
        if design == 2:
            assert [x.kind for x in call.launches] == ["triton"] * 3, pass_


@needs_interpreter
def test_global_path_is_three_triton_launches_each_way():
    """The global path saves the u its forward apply read (kernels/global_nmf.py), so its backward
    makes no copy of ``hats[..., -1, :]``; and its iterate kernels sum the reduction's partials,
    so no PyTorch sum runs between: 3 Triton launches forward, 3 backward, nothing else."""
    from fastnmf.profile.static.counter import count_call

    case = StaticCase("global", 1, 16, (16, 16, 16), "fp32", (None,), window=None)
    calls = count_call(case)
    assert [x.kernel for x in calls["fwd"].launches] == [
        "_reduce_kernel", "_iterate_kernel", "_apply_fwd_kernel"]  # fmt: skip
    assert [x.kernel for x in calls["bwd"].launches] == [
        "_reduce_kernel", "_iterate_bwd_kernel", "_apply_bwd_kernel"]  # fmt: skip


def test_mu_with_a_zero_row_keeps_that_row_out():
    """MU with a zero entry of u0 passes the 0/1 row mask, which the kernels read
    (kernels/_common._row_mask); without u0 there is no mask (every row kept)."""
    from fastnmf.kernels._common import row_mask

    u0 = torch.tensor([[1.0], [0.0], [2.0]])
    assert row_mask(u0, True, torch.float32, "cpu").tolist() == [1.0, 0.0, 1.0]
    assert row_mask(None, True, torch.float32, "cpu") is None
    assert row_mask(u0, False, torch.float32, "cpu") is None
