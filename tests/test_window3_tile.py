"""The third design's forward parts pass on a whole ticket at once (kernels/_window3_tile.py):
which cases take it (``tile_plan``), and its results against the float64 oracle and against the
per-window parts pass, under the interpreter (CPU) or on a GPU."""

import importlib

import pytest
import torch
import triton.language as tl
from conftest import DEVICES, rel_err
from kernel_helpers import (
    check_low_precision,
    design3_pipeline,
    nmf_inputs,
    run_grad,
    training_forward,
)

sched = importlib.import_module("fastnmf.kernels._window3_sched")
tile = importlib.import_module("fastnmf.kernels._window3_tile")
bwd_tile = importlib.import_module("fastnmf.kernels._window3_bwd_tile")
nmf3 = importlib.import_module("fastnmf.kernels.window_nmf3")


@pytest.fixture
def tile_on(monkeypatch):
    """The tile on (``_window3_sched._TILE``: off by default while it spills)."""
    monkeypatch.setitem(sched.TUNING, "tile", True)


def _plan(shape, head_dim, patch, shifts, mu=False):
    """(tile_plan, merges) of the forward as the launcher computes them."""
    geo, pipe = design3_pipeline(shape, head_dim, patch, shifts, ring=True)
    dot = geo.dot(tl.float32, mu)
    return tile.tile_plan(geo, dot, pipe.wpp, pipe.warps()), pipe.merges(dot["DOT"])


def test_tile_plan_takes_the_static_suites_shapes(tile_on, monkeypatch):
    """8^3 windows, E = 8, tickets of 4: [None, 2, 4, 6] has 64 sub-boxes of 2^3 (axis 0's in the
    rows, ROWS0), [None, 4] 16 in the dot; MU (no matrix form), more than 32 values a thread
    (E = 16) or TUNING["tile"] = False take the per-window pass."""
    brats, merges = _plan((1, 8, 16, 8, 32), 8, 8, [None, 2, 4, 6])
    assert brats == dict(TILE=True, TD0=2, TD1=2, TD2=2, ROWS0=True) and merges
    four, _ = _plan((1, 8, 16, 8, 32), 8, 8, [None, 4])
    assert four == dict(TILE=True, TD0=2, TD1=4, TD2=4, ROWS0=False)
    assert not _plan((1, 8, 16, 8, 32), 8, 8, [None, 2, 4, 6], mu=True)[0]["TILE"]
    assert not _plan((1, 16, 16, 8, 32), 16, 8, [None, 4])[0]["TILE"]
    monkeypatch.setitem(sched.TUNING, "tile", False)
    assert not _plan((1, 8, 16, 8, 32), 8, 8, [None, 4])[0]["TILE"]
    monkeypatch.setitem(sched.TUNING, "tile", None)  # the default
    assert _plan((1, 8, 16, 8, 32), 8, 8, [None, 4])[0]["TILE"] == sched._TILE


TILE_CASES = [
    # shape, head_dim, shifts, ROWS0, merges: 8^3 windows with the BraTS shifts (axis 0's
    # sub-boxes as rows), rows of 4 windows along axis 2 (merged); rows of 3 (a ticket of 3
    # windows, the fourth masked; no merge), E = 6 (channels past E in the high half masked)
    ((1, 4, 16, 8, 32), 4, [None, 2, 4, 6], True, True),
    ((1, 4, 16, 8, 24), 4, [None, 2, 4, 6], True, False),
    ((1, 6, 16, 8, 32), 6, [None, (4, 2, 6)], True, True),
    # [None, 4]: the sub-boxes of axes 0-2 all in the dot (no ROWS0), merged along axis 2
    ((1, 8, 16, 8, 32), 8, [None, 4], False, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eax", [0, 1])
@pytest.mark.parametrize("shape,head_dim,shifts,rows0,merges", TILE_CASES)
def test_tile_parts_match_reference(gen, design3, tile_on, monkeypatch, device, eax, shape,
                                    head_dim, shifts, rows0, merges):  # fmt: skip
    """The tile's forward (and the backward from its saved K and h) against the float64 oracle;
    the per-window pass's forward too (E = 6 with merging: the per-window merged pass once added
    the last X g0 carry twice where E < BLOCK_E). That the tile ran: under the interpreter its
    calls are counted; compiled, with ROWS0 its sums differ from the per-window pass's in the last
    bits (with [None, 4] they come out bit for bit the same). With x loaded channels first
    (EAX = 0, Triton 3.9's way) and channels fifth (EAX = 1, 3.6's: ``_E_AXIS``), whichever
    Triton runs the test."""
    monkeypatch.setattr(bwd_tile, "_E_AXIS", eax)
    plan, merged = _plan(shape, head_dim, 8, shifts)
    assert plan["TILE"] and plan["ROWS0"] == rows0 and merged == merges
    calls = []
    if device == "cpu":  # the interpreter calls the tile as Python: count the calls
        real = nmf3._parts_tile
        monkeypatch.setattr(nmf3, "_parts_tile", lambda *a: calls.append(1) or real(*a))
    x, v0, dy = nmf_inputs(gen, shape, 8, zero_windows=True)
    kw = dict(head_dim=head_dim, patch_size=8, shifts=shifts, solver="hals")
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    y_tile, dx = run_grad("triton", x, v0, dy, torch.float32, device, **kw)
    assert rel_err(y_tile, y_ref) <= 1e-5 and rel_err(dx, dx_ref) <= 1e-4
    assert calls or device != "cpu", "the tile did not run"
    monkeypatch.setitem(sched.TUNING, "tile", False)
    y_window = training_forward(x, v0, device, **kw)
    assert rel_err(y_window, y_ref) <= 1e-5
    assert device == "cpu" or not rows0 or not torch.equal(y_tile, y_window)


@pytest.mark.parametrize("device", DEVICES)
def test_tile_low_precision(gen, design3, tile_on, device):
    """bf16 x through the tile (its loads: runs of 4 voxels, 8 bytes): within 2x the reference's
    own error at bf16, plus an atol (``check_low_precision``)."""
    shape, shifts = (1, 4, 16, 8, 32), [None, 2, 4, 6]
    assert _plan(shape, 4, 8, shifts)[0]["TILE"]
    x, v0, dy = nmf_inputs(gen, shape, 8)
    check_low_precision(x, v0, dy, torch.bfloat16, device, head_dim=4, patch_size=8,
                        shifts=shifts)  # fmt: skip
