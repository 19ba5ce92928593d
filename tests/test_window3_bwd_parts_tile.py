"""The third design's backward parts pass on a ticket's windows at once
(kernels/_window3_bwd_parts_tile.py): which cases take it (``bwd_parts_plan``), and its gradient
against the float64 oracle and against the per-window parts pass, under the interpreter (CPU) or
on a GPU."""

import importlib

import pytest
import torch
from conftest import DEVICES, rel_err
from kernel_helpers import (
    check_low_precision,
    count_calls,
    design3_pipeline,
    nmf_inputs,
    run_grad,
)

sched = importlib.import_module("fastnmf.kernels._window3_sched")
ptile = importlib.import_module("fastnmf.kernels._window3_bwd_parts_tile")
bwd_tile = importlib.import_module("fastnmf.kernels._window3_bwd_tile")


def _plan(shape, head_dim, patch, shifts, mu=False, dtype=torch.float32):
    """``bwd_parts_plan`` as the backward's launcher computes it."""
    geo, pipe = design3_pipeline(shape, head_dim, patch, shifts, dtype)
    return ptile.bwd_parts_plan(geo, mu, dtype, pipe.wpp, pipe.warps())


def test_bwd_parts_plan_takes_the_static_suites_shapes(monkeypatch):
    """8^3 windows, E = 8, tickets of 4 at 16 warps: tiles of 2 windows (a run of 2 voxels a
    thread); [None, 2, 4, 6]'s 64 sub-boxes of 2^3 with axis 0's as rows of the product, [None, 4]
    16 sub-boxes in the dot; MU, an odd E, float64, E = 4 with [None, 4] (8 rows: under a dot's
    16), a shift odd along axis 2 (a run would straddle two parts) or
    TUNING["bwd_parts_tile"] = False take the per-window pass."""
    shape = (1, 8, 16, 8, 32)
    monkeypatch.setitem(sched.TUNING, "bwd_parts_tile", True)
    brats = _plan(shape, 8, 8, [None, 2, 4, 6])
    assert brats == dict(PTILE=True, PD0=2, PD1=2, PD2=2, PROWS0=True, PWT=2,
                         PJOIN=ptile._JOINED)  # fmt: skip
    assert _plan(shape, 8, 8, [None, 4]) == dict(PTILE=True, PD0=2, PD1=4, PD2=4, PROWS0=False,
                                                PWT=2, PJOIN=ptile._JOINED)  # fmt: skip
    monkeypatch.setitem(sched.TUNING, "bwd_parts_joined", not ptile._JOINED)
    assert _plan(shape, 8, 8, [None, 4])["PJOIN"] == (not ptile._JOINED)
    monkeypatch.setitem(sched.TUNING, "bwd_parts_joined", None)
    monkeypatch.setitem(sched.TUNING, "warps", 8)  # joined only from 16 warps (it spilled at 8)
    assert not _plan(shape, 8, 8, [None, 2, 4, 6])["PJOIN"]
    monkeypatch.setitem(sched.TUNING, "warps", None)
    assert not _plan(shape, 8, 8, [None, 4], mu=True)["PTILE"]
    assert not _plan((1, 5, 16, 8, 32), 5, 8, [None, 4])["PTILE"]
    assert not _plan(shape, 8, 8, [None, 4], dtype=torch.float64)["PTILE"]
    assert not _plan(shape, 4, 8, [None, 4])["PTILE"]
    assert not _plan(shape, 8, 8, [None, (2, 2, 3)])["PTILE"]
    monkeypatch.setitem(sched.TUNING, "bwd_parts_tile", False)
    assert not _plan(shape, 8, 8, [None, 4])["PTILE"]
    monkeypatch.setitem(sched.TUNING, "bwd_parts_tile", None)  # the default
    assert _plan(shape, 8, 8, [None, 4])["PTILE"] == sched._BWD_PARTS_TILE


TILE_CASES = [
    # shape, head_dim, shifts, rows0: 8^3 windows with the BraTS shifts (axis 0's sub-boxes as
    # rows of the product); E = 8 with [None, 4] (16 sub-boxes in the dot); rows of 3 windows (a
    # tile's second window masked in every second tile) and E = 6 (channels past E masked)
    ((1, 4, 16, 8, 32), 4, [None, 2, 4, 6], True),
    ((1, 8, 16, 8, 16), 8, [None, 4], False),
    ((1, 6, 16, 8, 24), 6, [None, (4, 2, 6)], True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("join", [False, True])
@pytest.mark.parametrize("eax", [0, 1])
@pytest.mark.parametrize("shape,head_dim,shifts,rows0", TILE_CASES)
def test_bwd_parts_tile_matches_reference(gen, design3, monkeypatch, device, eax, join, shape,
                                          head_dim, shifts, rows0):  # fmt: skip
    """The tile's gradient against the float64 oracle; in the first case also the per-window
    pass's, and the two not bit for bit the same (the tile ran). With x, dy and u loaded
    channels first (EAX = 0, Triton 3.9's way) and channels fifth (EAX = 1, 3.6's:
    ``_E_AXIS``), whichever Triton runs the test; with the shifts' products one a shift and one
    for all (``TUNING["bwd_parts_joined"]``: under the interpreter its part matrices are
    counted)."""
    monkeypatch.setattr(bwd_tile, "_E_AXIS", eax)
    monkeypatch.setitem(sched.TUNING, "bwd_parts_tile", True)
    monkeypatch.setitem(sched.TUNING, "bwd_parts_joined", join)
    plan = _plan(shape, head_dim, 8, shifts)
    assert plan["PTILE"] and plan["PROWS0"] == rows0 and plan["PJOIN"] == join
    joins = count_calls(monkeypatch, ptile, "_part_member_by", device)
    x, v0, dy = nmf_inputs(gen, shape, 8, zero_windows=True)
    kw = dict(head_dim=head_dim, patch_size=8, shifts=shifts, solver="hals")
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    y, dx = run_grad("triton", x, v0, dy, torch.float32, device, **kw)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(dx, dx_ref) <= 1e-4
    assert device != "cpu" or bool(joins) == join, "the products were not joined as asked"
    if shape != TILE_CASES[0][0]:
        return
    monkeypatch.setitem(sched.TUNING, "bwd_parts_tile", False)
    dx_window = run_grad("triton", x, v0, dy, torch.float32, device, **kw)[1]
    assert rel_err(dx_window, dx_ref) <= 1e-4 and not torch.equal(dx, dx_window)


@pytest.mark.parametrize("device", DEVICES)
def test_bwd_parts_tile_low_precision(gen, design3, monkeypatch, device):
    """bf16 x and dy through the tile (runs of 2 voxels, 4-byte loads) and both backward tiles at
    once: within 2x the reference's own error at bf16, plus an atol (``check_low_precision``)."""
    shape, shifts = (1, 4, 16, 8, 32), [None, 2, 4, 6]
    monkeypatch.setitem(sched.TUNING, "bwd_parts_tile", True)
    monkeypatch.setitem(sched.TUNING, "bwd_tile", True)
    assert _plan(shape, 4, 8, shifts, dtype=torch.bfloat16)["PTILE"]
    x, v0, dy = nmf_inputs(gen, shape, 8)
    check_low_precision(x, v0, dy, torch.bfloat16, device, head_dim=4, patch_size=8,
                        shifts=shifts)  # fmt: skip
