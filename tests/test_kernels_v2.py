"""The second design of the rank-one window kernels (kernels/window_nmf2.py) against the float64
reference and against the first design.

Selected with ``window_nmf.TUNING["design"] = 2``; without a GPU the kernels run under
TRITON_INTERPRET=1 (conftest.py), so the shapes are small.
"""

import importlib

import pytest
import torch
import triton.language as tl
from conftest import DEVICES, rel_err
from kernel_helpers import (
    check_low_precision,
    fp32_against_reference,
    nmf_inputs,
    run_grad,
    spy_on,
)

import fastnmf
from fastnmf.profile.static.counter import interpreting

wn = importlib.import_module("fastnmf.kernels.window_nmf")
wn2 = importlib.import_module("fastnmf.kernels.window_nmf2")


@pytest.fixture
def design2(monkeypatch):
    monkeypatch.setitem(wn.TUNING, "design", 2)


CASES = [
    # shape, head_dim, patch, shifts, solver, iters, zero_windows, zero_g0
    ((1, 4, 8, 8, 8), 4, 4, [None, 2], "hals", 5, True, False),  # swin 3D, degenerate
    ((1, 8, 8, 16, 8), 8, 8, [None, 4], "hals", 5, False, False),  # P = 8, C = E, non-cubic
    ((2, 8, 8, 8, 8), 8, 8, [None, 2, 4, 6], "mu", 2, False, True),  # BraTS shifts, MU masks
    ((1, 12, 8, 8, 8), 6, 4, None, "hals", 5, False, False),  # local, E = 6
    ((2, 4, 8, 12), 4, 4, [None, 2], "hals", 5, True, False),  # swin 2D, batch 2
    ((1, 4, 8, 8, 4), 4, (4, 2, 4), [None, (1, 1, 2)], "hals", 3, False, False),  # anisotropic
    ((1, 4, 12, 12), 4, (6, 3), [None, (3, 1), (7, 5)], "mu", 5, False, False),  # P not 2^k,
]  # shifts beyond P


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,head_dim,patch,shifts,solver,iters,zero,zero_g0", CASES)
def test_design2_fp32_matches_reference(gen, design2, device, shape, head_dim, patch, shifts,
                                        solver, iters, zero, zero_g0):  # fmt: skip
    x, v0, dy = nmf_inputs(gen, shape, patch, zero_windows=zero, zero_g0=zero_g0)
    kw = dict(head_dim=head_dim, patch_size=patch, shifts=shifts, solver=solver, iters=iters)
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, **kw)
    assert rel_err(dx, dx_ref) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,patch,shifts,solver",
    [((1, 8, 8, 8, 8), 8, [None, 2, 4, 6], "hals"), ((1, 4, 8, 12), (4, 2), [None, 2], "mu")],
)
def test_design2_matches_design1(gen, monkeypatch, device, shape, patch, shifts, solver):
    x, v0, dy = nmf_inputs(gen, shape, patch, zero_windows=True)
    kw = dict(head_dim=4, patch_size=patch, shifts=shifts, solver=solver)
    one = run_grad("triton", x, v0, dy, torch.float64, device, **kw)
    monkeypatch.setitem(wn.TUNING, "design", 2)
    two = run_grad("triton", x, v0, dy, torch.float64, device, **kw)
    assert rel_err(two[0], one[0]) <= 1e-12 and rel_err(two[1], one[1]) <= 1e-12
    assert two[0].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_design2_low_precision(gen, design2, device, dtype):
    """Within 2x the reference's own error at that dtype, plus an atol."""
    x, v0, dy = nmf_inputs(gen, (1, 4, 8, 8, 8), 4)
    check_low_precision(x, v0, dy, dtype, device, head_dim=4, patch_size=4, shifts=[None, 2])


@pytest.mark.parametrize("device", DEVICES)
def test_design2_zero_input(gen, design2, device):
    """All windows zero after ReLU: zero output and gradient, never NaN."""
    x = -torch.rand(1, 4, 8, 8, 8, generator=gen, dtype=torch.float64)
    v0 = torch.rand(64, 1, generator=gen, dtype=torch.float64)
    dy = torch.randn(1, 4, 8, 8, 8, generator=gen, dtype=torch.float64)
    y, dx = run_grad("triton", x, v0, dy, torch.float32, device, head_dim=4, patch_size=4,
                 shifts=[None, 2])  # fmt: skip
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("device", DEVICES)
def test_design2_register_cap_reaches_every_launch(gen, design2, monkeypatch, device):
    """``TUNING["maxnreg"]`` (ptxas's register cap) goes with every launch of the second design
    and changes no result (the interpreter ignores it; compiled at 64: 32 resident warps an SM)."""
    common = importlib.import_module("fastnmf.kernels._window2_common")
    geo = common._Geometry2(torch.zeros(1, 8, 8, 8, 8), 4, (4, 4, 4), [None, (2, 2, 2)])
    assert geo.launch("parts") == {"num_warps": 8} and geo.launch("solve") == {"num_warps": 1}
    monkeypatch.setitem(common.TUNING, "maxnreg", 64)
    for name, warps in (("parts", 8), ("apply", 8), ("parts_bwd", 8), ("apply_bwd", 16),
                        ("solve", 1)):  # fmt: skip
        assert geo.launch(name) == {"num_warps": warps, "maxnreg": 64}, name
    x, v0, dy = nmf_inputs(gen, (1, 4, 8, 8, 8), 4)
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, head_dim=4, patch_size=4,
                                        shifts=[None, 2])  # fmt: skip
    assert rel_err(dx, dx_ref) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_design2_three_launches_and_deterministic(gen, design2, monkeypatch, device):
    """Forward and backward: the three kernels of the second design each, once each; bitwise
    the same twice."""
    bwd2 = importlib.import_module("fastnmf.kernels._window2_bwd")
    launched = []
    spy_on(monkeypatch, wn2, ("_parts_kernel", "_solve_kernel", "_apply_kernel"), launched)
    spy_on(monkeypatch, bwd2, ("_parts_bwd_kernel", "_solve_bwd_kernel", "_apply_bwd_kernel2"),
           launched)  # fmt: skip
    spy_on(monkeypatch, wn, ("_stats_fwd_kernel", "_apply_fwd_kernel", "_apply_fwd_tile_kernel"),
           launched)  # fmt: skip
    x, v0, dy = nmf_inputs(gen, (1, 4, 8, 8, 8), 4)
    kw = dict(head_dim=4, patch_size=4, shifts=[None, 2])
    y1, dx1 = run_grad("triton", x, v0, dy, torch.float32, device, **kw)
    assert launched == ["_parts_kernel", "_solve_kernel", "_apply_kernel", "_parts_bwd_kernel",
                        "_solve_bwd_kernel", "_apply_bwd_kernel2"]  # fmt: skip
    y2, dx2 = run_grad("triton", x, v0, dy, torch.float32, device, **kw)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)


def test_windows_per_program_keep_the_launch_wide():
    """Up to 16 windows a program, fewer where 16 would leave under 1024 programs: at
    2 x 32 x 128^3 16 (2048 programs), at 64^3 4 (1024; 16 gave 256), at 16^3 one (64);
    ``TUNING["wpp"]`` wins."""
    common = importlib.import_module("fastnmf.kernels._window2_common")

    def geo(*shape):
        return common._Geometry2(torch.empty(shape, device="meta"), 8, (8, 8, 8), [None, 4])

    cases = {(2, 32, 128, 128, 128): (16, 2048), (2, 32, 64, 64, 64): (4, 1024),
             (2, 64, 64, 64, 64): (8, 1024), (2, 32, 16, 16, 16): (1, 64)}  # fmt: skip
    for shape, (wpp, programs) in cases.items():
        g = geo(*shape)
        assert (g.wpp, g.grid[0] * g.grid[1]) == (wpp, programs), shape
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(common.TUNING, "wpp", 2)
        assert geo(2, 32, 128, 128, 128).wpp == 2


def test_geometry_is_built_once_per_sizes_shifts_and_tuning(monkeypatch):
    """``geometry`` (what every design 2 / 3 call starts from) hands the same geometry to calls
    of the same shape, head dim, window and shifts, and a new one when any of them or the
    design's TUNING differs; its launch arguments are computed once."""
    common = importlib.import_module("fastnmf.kernels._window2_common")
    monkeypatch.setattr(common, "_GEOMETRIES", {})
    x, same = torch.empty(2, 8, 16, 16, 16, device="meta"), torch.empty(2, 8, 16, 16, 16)
    geo = common.geometry(x, 4, (8, 8, 8), [None, (4, 4, 4)])
    assert common.geometry(same, 4, (8, 8, 8), [None, (4, 4, 4)]) is geo
    assert geo.magic() is geo.magic() and geo.block() is geo.block()
    assert geo.magic(heads=False) == {k: v for k, v in geo.magic().items() if "HEADS" not in k}
    others = [common.geometry(torch.empty(2, 8, 16, 16, 32), 4, (8, 8, 8), [None, (4, 4, 4)]),
              common.geometry(x, 8, (8, 8, 8), [None, (4, 4, 4)]),
              common.geometry(x, 4, (4, 4, 4), [None, (4, 4, 4)]),
              common.geometry(x, 4, (8, 8, 8), [None, (2, 2, 2)])]  # fmt: skip
    monkeypatch.setitem(common.TUNING, "wpp", 2)
    others.append(common.geometry(x, 4, (8, 8, 8), [None, (4, 4, 4)]))
    assert all(g is not geo for g in others) and others[-1].wpp == 2 != geo.wpp
    assert len({id(g) for g in others}) == len(others)


@pytest.mark.parametrize("device", DEVICES)
def test_design2_results_do_not_depend_on_windows_per_program(gen, design2, monkeypatch, device):
    """y and dx bitwise the same with 1, 5 and 16 windows a program (12 windows a head: 5 leaves
    a last program with 2, 16 one program with 4 idle window slots), with the pipelined
    passes' loop (``TUNING["stages"]``), where a program past the last window runs it again, and
    with the other two passes loading each next window a step ahead (``TUNING["prefetch"]``)."""
    common = importlib.import_module("fastnmf.kernels._window2_common")
    x, v0, dy = nmf_inputs(gen, (2, 8, 8, 8, 12), 4, zero_windows=True)
    kw = dict(head_dim=4, patch_size=4, shifts=[None, 2], solver="hals")
    runs = []
    for wpp, stages, prefetch in ((1, None, False), (5, None, False), (16, None, False),
                                  (5, 2, False), (16, 3, False), (5, None, True), (16, 2, True)):
        monkeypatch.setitem(common.TUNING, "wpp", wpp)
        monkeypatch.setitem(common.TUNING, "stages", stages)
        monkeypatch.setitem(common.TUNING, "prefetch", prefetch)
        runs.append(run_grad("triton", x, v0, dy, torch.float32, device, **kw))
    assert runs[0][1].abs().sum() > 0
    for y, dx in runs[1:]:
        assert torch.equal(y, runs[0][0]) and torch.equal(dx, runs[0][1])


TILE_KEYS = ("parts_tile", "apply_tile", "parts_bwd_tile", "out_tile")  # design 2's four tiles


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,shifts,wpp,tiled", [
    ((1, 8, 16, 16, 16), [None, 4], 4, True),  # 4 windows a tile, 2 programs
    ((2, 8, 8, 16, 16), [None, 2, 4, 6], 2, True),  # axis 0's sub-boxes as rows (ROWS0)
    ((1, 8, 8, 24, 8), [None, 4], 4, False),  # NW1 NW2 = 3: a tile would span two axis-0 rows
])  # fmt: skip
def test_design2_tiles_match_reference(gen, design2, monkeypatch, device, shape, shifts, wpp,
                                      tiled):  # fmt: skip
    """``TUNING["parts_tile"]``, ``["apply_tile"]``, ``["parts_bwd_tile"]`` and
    ``["out_tile"]``: the forward parts pass on the third design's ticket tile, the backward
    apply on its run tile, the backward parts pass on its tile and the forward apply on its
    forward output tile (2 windows each; the last one 4 with two runs a thread where a ticket
    has 4), where a tile's windows share their axis-0 coordinate (else the per-window passes),
    against the float64 oracle at the fp32 tolerances."""
    common = importlib.import_module("fastnmf.kernels._window2_common")
    w2b = importlib.import_module("fastnmf.kernels._window2_bwd")
    for key in TILE_KEYS:
        monkeypatch.setitem(common.TUNING, key, True)
    monkeypatch.setitem(common.TUNING, "wpp", wpp)
    x, v0, dy = nmf_inputs(gen, shape, 8)
    geo = common.geometry(x.float(), 8, (8, 8, 8), shifts)
    plan = wn2.parts_tile(geo, tl.float32, False)
    assert (plan["TILE"], plan["TW"], geo.launch("parts")["num_warps"]) == (tiled, wpp, 16)
    bplan = w2b.apply_tile(geo, False, torch.float32, 5)
    assert (bplan["BTILE"], bplan["WT"]) == (tiled, 2)
    assert bplan["USTRIDE"] == (5 * 8 if tiled else 8)
    pplan = w2b.parts_bwd_tile(geo, False, torch.float32, 5)
    assert (pplan["PTILE"], pplan["PWT"], pplan["USTRIDE"]) == (tiled, 2, 5 * 8 if tiled else 8)
    assert geo.launch("parts_bwd")["num_warps"] == 16
    oplan = wn2.out_tile(geo, False, torch.float32)  # two runs a thread where 4 windows allow
    assert (oplan["OTILE"], oplan["WT"], geo.launch("apply")["num_warps"]) == (tiled, wpp, 16)
    assert oplan["R1"] == (2 if wpp == 4 else 1)
    kw = dict(head_dim=8, patch_size=8, shifts=shifts, solver="hals", iters=5)
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, **kw)
    assert rel_err(dx, dx_ref) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_design2_tiles_low_precision(gen, design2, monkeypatch, device):
    """The four tiles with bf16 in and out (fp32 accumulation), within twice the oracle's own
    bf16 error: the tiles' loads convert, their stores round, as the per-window passes do."""
    common = importlib.import_module("fastnmf.kernels._window2_common")
    for key in TILE_KEYS:
        monkeypatch.setitem(common.TUNING, key, True)
    monkeypatch.setitem(common.TUNING, "wpp", 4)
    x, v0, dy = nmf_inputs(gen, (1, 8, 16, 16, 16), 8)
    geo = common.geometry(x.to(torch.bfloat16), 8, (8, 8, 8), [None, 4])
    assert wn2.out_tile(geo, False, torch.bfloat16)["OTILE"]
    check_low_precision(x, v0, dy, torch.bfloat16, device, head_dim=8, patch_size=8,
                        shifts=[None, 4], solver="hals", iters=5)  # fmt: skip


@pytest.mark.skipif(not interpreting(), reason="the byte counter runs under TRITON_INTERPRET=1")
def test_design2_tiles_stay_inside_their_tensors(design2, monkeypatch):
    """The four tiles where a program's windows run past the head's last one (12 windows, 8 a
    program: the second program's last tiles hold none): every active lane stays inside its
    tensor (the byte counter refuses any other access). The tiles take such windows as the
    head's last (values masked); their axis-0 coordinate must be that window's too, or the
    vectors u, S, h-bar of a shifted window past the head are read (results still right)."""
    from fastnmf.profile.static.cases import StaticCase
    from fastnmf.profile.static.counter import count_call

    common = importlib.import_module("fastnmf.kernels._window2_common")
    w2b = importlib.import_module("fastnmf.kernels._window2_bwd")
    for key in TILE_KEYS:
        monkeypatch.setitem(common.TUNING, key, True)
    case = StaticCase("window", 1, 8, (24, 16, 16), "fp32", (None, 4), design=2, wpp=8)
    monkeypatch.setitem(common.TUNING, "wpp", 8)
    geo = common.geometry(torch.empty(case.shape), 8, (8, 8, 8), [None, 4])
    assert (geo.nwin, geo.grid) == (12, (2, 1))
    assert wn2.parts_tile(geo, tl.float32, False)["TILE"]
    assert w2b.apply_tile(geo, False, torch.float32, 5)["BTILE"]
    assert w2b.parts_bwd_tile(geo, False, torch.float32, 5)["PTILE"]
    assert wn2.out_tile(geo, False, torch.float32)["OTILE"]
    calls = count_call(case)
    assert [x.kernel for x in calls["bwd"].launches if x.kind == "triton"] == [
        "_parts_bwd_kernel", "_solve_bwd_kernel", "_apply_bwd_kernel2"]


def test_unknown_design_rejected(monkeypatch):
    monkeypatch.setitem(wn.TUNING, "design", 4)
    x = torch.rand(1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"valid options: None \(by the shift count\), 1, 2, 3"):
        fastnmf.matricized_nmf(x, torch.rand(4, 1), head_dim=4, window=2, shifts=None,
                               kernel="triton")  # fmt: skip


def test_design2_rejects_head_offsets_beyond_int32():
    """The second design's in-head offsets are int32: E x voxels >= 2^31 is a clear error (meta
    tensors: nothing is allocated)."""
    common = importlib.import_module("fastnmf.kernels._window2_common")
    x = torch.empty(1, 8, 1024, 1024, 256, device="meta")  # 8 x 2^28 = 2^31
    with pytest.raises(ValueError, match="2\\^31"):
        common._Geometry2(x, 8, (8, 8, 8), [None, 4])
    common._Geometry2(x[:, :, :, :, :128], 8, (8, 8, 8), [None, 4])  # 2^30: accepted
