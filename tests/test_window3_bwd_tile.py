"""The third design's backward output pass on a whole ticket at once
(kernels/_window3_bwd_tile.py): which cases take it (``bwd_tile_plan``), and its gradient against
the float64 oracle and against the per-window output pass, under the interpreter (CPU) or on a
GPU."""

import importlib

import pytest
import torch
from conftest import DEVICES, rel_err
from kernel_helpers import (
    check_low_precision,
    design3_pipeline,
    fp32_against_reference,
    nmf_inputs,
    run_grad,
)

sched = importlib.import_module("fastnmf.kernels._window3_sched")
btile = importlib.import_module("fastnmf.kernels._window3_bwd_tile")


def _plan(shape, head_dim, patch, shifts, mu=False, dtype=torch.float32):
    """``bwd_tile_plan`` as the backward's launcher computes it."""
    geo, pipe = design3_pipeline(shape, head_dim, patch, shifts, dtype)
    return btile.bwd_tile_plan(geo, mu, dtype, pipe.wpp, pipe.warps())


def _tile(plan):
    """(BTILE, R2, WT) of a plan."""
    return plan["BTILE"], plan["R2"], plan["WT"]


@pytest.fixture(params=[False, True], ids=["runs", "run-pairs"])
def pairs(request, monkeypatch):
    """The backward tile with a run a thread, then two (``TUNING["bwd_run_pairs"]``)."""
    monkeypatch.setitem(sched.TUNING, "bwd_run_pairs", request.param)
    return request.param


def test_bwd_tile_plan_takes_the_static_suites_shapes(monkeypatch):
    """8^3 windows, E = 8, tickets of 4 at 16 warps: runs of 2 voxels (the sub-boxes of
    [None, 2, 4, 6] are 2 wide; at most 2 with [None, 4]), tiles of 2 windows (a run a thread);
    6^3 windows with an odd shift: runs of one voxel, a window a tile; MU, an odd E, float64,
    windows of 4^3 (fewer runs than threads) or TUNING["bwd_tile"] = False take the per-window
    pass."""
    shape = (1, 8, 16, 8, 32)
    monkeypatch.setitem(sched.TUNING, "bwd_tile", True)
    assert _tile(_plan(shape, 8, 8, [None, 2, 4, 6])) == (True, 2, 2)
    assert _tile(_plan(shape, 8, 8, [None, 4])) == (True, 2, 2)
    assert _tile(_plan((1, 6, 12, 12, 18), 6, 6, [None, 3])) == (True, 1, 1)
    assert not _plan(shape, 8, 8, [None, 4], mu=True)["BTILE"]
    assert not _plan((1, 5, 16, 8, 32), 5, 8, [None, 4])["BTILE"]
    assert not _plan(shape, 8, 8, [None, 4], dtype=torch.float64)["BTILE"]
    assert not _plan(shape, 8, 4, [None, 2])["BTILE"]
    monkeypatch.setitem(sched.TUNING, "bwd_tile", False)
    assert not _plan(shape, 8, 8, [None, 4])["BTILE"]
    monkeypatch.setitem(sched.TUNING, "bwd_tile", None)  # the default
    assert _plan(shape, 8, 8, [None, 4])["BTILE"] == sched._BWD_TILE
    assert _plan(shape, 8, 8, [None, 4])["R1"] == (2 if sched._BWD_RUN_PAIRS else 1)


def test_bwd_tile_plan_run_pairs(monkeypatch):
    """With TUNING["bwd_run_pairs"] two runs a thread (q1 and q1 + 1 of one sub-box), tiles of 4
    windows, where the sub-boxes along axis 1 are even and each thread still gets two runs;
    otherwise a run a thread (the forward's output tile follows TUNING["run_pairs"] instead)."""
    shape = (1, 8, 16, 8, 32)
    monkeypatch.setitem(sched.TUNING, "bwd_tile", True)
    monkeypatch.setitem(sched.TUNING, "bwd_run_pairs", True)
    monkeypatch.setitem(sched.TUNING, "run_pairs", False)
    plan = _plan(shape, 8, 8, [None, 2, 4, 6])
    assert (plan["R1"], *_tile(plan)) == (2, True, 2, 4)
    assert _plan((1, 6, 12, 12, 18), 6, 6, [None, 3])["R1"] == 1
    monkeypatch.setitem(sched.TUNING, "wpp", 2)
    assert _plan(shape, 8, 8, [None, 2, 4, 6])["R1"] == 1


TILE_CASES = [
    # shape, head_dim, patch, shifts, R2: 8^3 windows with the BraTS shifts (runs of 2), two
    # heads with [None, 4]; rows of 3 windows (a ticket's fourth masked) and E = 6 (channels past
    # E masked) with one shift per axis; 6^3 windows padded to 8^3 with an odd shift (runs of one
    # voxel)
    ((1, 4, 16, 8, 32), 4, 8, [None, 2, 4, 6], 2),
    ((1, 8, 16, 8, 32), 4, 8, [None, 4], 2),
    ((1, 6, 16, 8, 24), 6, 8, [None, (4, 2, 6)], 2),
    ((1, 4, 12, 6, 24), 4, 6, [None, 3], 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,head_dim,patch,shifts,r2", TILE_CASES)
def test_bwd_tile_matches_reference(gen, design3, monkeypatch, pairs, device, shape, head_dim,
                                    patch, shifts, r2):  # fmt: skip
    """The tile's gradient (a run a thread, or two where the sub-boxes allow) against the float64
    oracle; in the first case also the per-window pass's, and the two not bit for bit the same
    (the tile ran)."""
    monkeypatch.setitem(sched.TUNING, "bwd_tile", True)
    plan = _plan(shape, head_dim, patch, shifts)
    assert plan["BTILE"] and plan["R2"] == r2 and plan["R1"] == (2 if pairs and r2 == 2 else 1)
    x, v0, dy = nmf_inputs(gen, shape, patch, zero_windows=True)
    kw = dict(head_dim=head_dim, patch_size=patch, shifts=shifts, solver="hals")
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, **kw)
    assert rel_err(dx, dx_ref) <= 1e-4
    if shape != TILE_CASES[0][0]:
        return
    monkeypatch.setitem(sched.TUNING, "bwd_tile", False)
    dx_window = run_grad("triton", x, v0, dy, torch.float32, device, **kw)[1]
    assert rel_err(dx_window, dx_ref) <= 1e-4 and not torch.equal(dx, dx_window)


@pytest.mark.parametrize("device", DEVICES)
def test_bwd_tile_low_precision(gen, design3, monkeypatch, pairs, device):
    """bf16 x and dy through the tile (runs of 2 voxels, 4-byte loads; one or two a thread):
    within 2x the reference's own error at bf16, plus an atol (``check_low_precision``)."""
    shape, shifts = (1, 4, 16, 8, 32), [None, 2, 4, 6]
    monkeypatch.setitem(sched.TUNING, "bwd_tile", True)
    assert _plan(shape, 4, 8, shifts, dtype=torch.bfloat16)["BTILE"]
    x, v0, dy = nmf_inputs(gen, shape, 8)
    check_low_precision(x, v0, dy, torch.bfloat16, device, head_dim=4, patch_size=8,
                        shifts=shifts)  # fmt: skip
