"""The third design's forward output pass on a ticket's windows at once
(kernels/_window3_out_tile.py): which cases take it (``out_tile_plan``), and its output against
the float64 oracle and against the per-window output pass, under the interpreter (CPU) or on a
GPU."""

import importlib

import pytest
import torch
from conftest import DEVICES, rel_err
from kernel_helpers import check_low_precision, design3_pipeline, nmf_inputs, training_forward

import fastnmf

sched = importlib.import_module("fastnmf.kernels._window3_sched")
otile = importlib.import_module("fastnmf.kernels._window3_out_tile")
nmf3 = importlib.import_module("fastnmf.kernels.window_nmf3")


def _plan(shape, head_dim, patch, shifts, mu=False, dtype=torch.float32):
    """``out_tile_plan`` as the forward's launcher computes it."""
    geo, pipe = design3_pipeline(shape, head_dim, patch, shifts, dtype)
    return otile.out_tile_plan(geo, mu, dtype, pipe.wpp, pipe.warps())


def _geometry(plan):
    """(OTILE, R1, R2, WT) of a plan."""
    return plan["OTILE"], plan["R1"], plan["R2"], plan["WT"]


def test_out_tile_plan_takes_the_static_suites_shapes(monkeypatch):
    """The run tiles' geometry: with the BraTS shifts two runs of 2 voxels a thread (q1 and
    q1 + 1, one sub-box), tiles of 4 windows; TUNING["run_pairs"] = False or tickets of 2
    windows (two runs a thread would leave threads without one): a run a thread, tiles of 2
    windows; runs of one voxel with an odd shift; MU, an odd E, float64, windows of 4^3 or
    TUNING["out_tile"] = False take the per-window pass, None the module default."""
    shape = (1, 8, 16, 8, 32)
    monkeypatch.setitem(sched.TUNING, "out_tile", True)
    monkeypatch.setitem(sched.TUNING, "run_pairs", True)
    assert _geometry(_plan(shape, 8, 8, [None, 2, 4, 6])) == (True, 2, 2, 4)
    assert _geometry(_plan((1, 6, 12, 12, 18), 6, 6, [None, 3])) == (True, 1, 1, 1)
    monkeypatch.setitem(sched.TUNING, "wpp", 2)
    assert _geometry(_plan(shape, 8, 8, [None, 2, 4, 6])) == (True, 1, 2, 2)
    monkeypatch.setitem(sched.TUNING, "wpp", None)
    monkeypatch.setitem(sched.TUNING, "run_pairs", False)
    assert _geometry(_plan(shape, 8, 8, [None, 2, 4, 6])) == (True, 1, 2, 2)
    monkeypatch.setitem(sched.TUNING, "run_pairs", None)  # the default
    assert _plan(shape, 8, 8, [None, 2, 4, 6])["R1"] == (2 if sched._RUN_PAIRS else 1)
    assert not _plan(shape, 8, 8, [None, 4], mu=True)["OTILE"]
    assert not _plan((1, 5, 16, 8, 32), 5, 8, [None, 4])["OTILE"]
    assert not _plan(shape, 8, 8, [None, 4], dtype=torch.float64)["OTILE"]
    assert not _plan(shape, 8, 4, [None, 2])["OTILE"]
    monkeypatch.setitem(sched.TUNING, "out_tile", False)
    assert not _plan(shape, 8, 8, [None, 4])["OTILE"]
    monkeypatch.setitem(sched.TUNING, "out_tile", None)  # the default
    assert _plan(shape, 8, 8, [None, 4])["OTILE"] == sched._OUT_TILE


OUT_CASES = [
    # shape, head_dim, patch, shifts, R1 and R2 with run pairs: 8^3 windows with the BraTS shifts
    # (runs of 2, each tile a call), two heads with [None, 4] (inlined); rows of 3 windows (a
    # ticket's fourth masked) and E = 6 with one shift per axis; 6^3 windows padded to 8^3 with
    # an odd shift (runs of one, no pairs)
    ((1, 4, 16, 8, 32), 4, 8, [None, 2, 4, 6], 2, 2),
    ((1, 8, 16, 8, 32), 4, 8, [None, 4], 2, 2),
    ((1, 6, 16, 8, 24), 6, 8, [None, (4, 2, 6)], 2, 2),
    ((1, 4, 12, 6, 24), 4, 6, [None, 3], 1, 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,head_dim,patch,shifts,r1,r2", OUT_CASES)
def test_out_tile_matches_reference(gen, design3, monkeypatch, device, shape, head_dim, patch,
                                    shifts, r1, r2):  # fmt: skip
    """The tile's output (training forward: K and h saved) against the float64 oracle, the
    launcher seen taking the tile with two runs a thread where the sub-boxes allow; in the first
    case also inference's (nothing saved), a run a thread and the per-window pass's. (Under the
    interpreter they agree bit for bit: all sum the channels of each shift's u^T x in order.)"""
    monkeypatch.setitem(sched.TUNING, "out_tile", True)
    monkeypatch.setitem(sched.TUNING, "run_pairs", True)
    plan = _plan(shape, head_dim, patch, shifts)
    assert plan["OTILE"] and (plan["R1"], plan["R2"]) == (r1, r2)
    taken = []
    monkeypatch.setattr(nmf3, "out_tile_plan", lambda *a: taken.append(otile.out_tile_plan(*a))
                        or taken[-1])  # fmt: skip
    x, v0, _ = nmf_inputs(gen, shape, patch, zero_windows=True)
    kw = dict(head_dim=head_dim, window=patch, shifts=shifts, solver="hals")
    y_ref = fastnmf.matricized_nmf(x, v0, kernel="reference", **kw).float()
    y = training_forward(x, v0, device, **kw)
    assert rel_err(y, y_ref) <= 1e-4 and [(p["OTILE"], p["R1"]) for p in taken] == [(True, r1)]
    if shape != OUT_CASES[0][0]:
        return
    with torch.no_grad():
        y_infer = fastnmf.matricized_nmf(x.float().to(device), v0.float().to(device),
                                         kernel="triton", **kw).cpu()  # fmt: skip
    assert torch.equal(y_infer, y)
    monkeypatch.setitem(sched.TUNING, "run_pairs", False)
    y_single = training_forward(x, v0, device, **kw)
    assert rel_err(y_single, y_ref) <= 1e-4 and taken[-1]["R1"] == 1
    monkeypatch.setitem(sched.TUNING, "out_tile", False)
    y_window = training_forward(x, v0, device, **kw)
    assert rel_err(y_window, y_ref) <= 1e-4 and not taken[-1]["OTILE"]


@pytest.mark.parametrize("device", DEVICES)
def test_out_tile_low_precision(gen, design3, monkeypatch, device):
    """bf16 x through the forward output tile, two runs a thread (and the backward's per-window
    passes): within 2x the reference's own error at bf16, plus an atol
    (``check_low_precision``)."""
    shape, shifts = (1, 4, 16, 8, 32), [None, 2, 4, 6]
    monkeypatch.setitem(sched.TUNING, "out_tile", True)
    monkeypatch.setitem(sched.TUNING, "run_pairs", True)
    assert _geometry(_plan(shape, 4, 8, shifts, dtype=torch.bfloat16))[:2] == (True, 2)
    x, v0, dy = nmf_inputs(gen, shape, 8)
    check_low_precision(x, v0, dy, torch.bfloat16, device, head_dim=4, patch_size=8,
                        shifts=shifts)  # fmt: skip
