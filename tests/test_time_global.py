"""bench/time_global.py (the global reduction's steps against a chunk in one step, for a GPU):
its variants set what they name, and it runs end to end at a tiny shape (here on the CPU, under
the interpreter, where every variant is one step: nothing is timed for real)."""

import importlib
import json

import pytest
import torch
from conftest import load_bench

from fastnmf.profile.static.counter import gpu_geometry, interpreting

gn = importlib.import_module("fastnmf.kernels.global_nmf")


def _plan(e: int = 8):
    x = torch.empty(2, 4 * e, 16, 16, 16, device="meta")
    with gpu_geometry():  # the GPU's launch geometry (the interpreter's: one step of 1024)
        return gn._Plan(x, e, (16, 16, 16), None, False)


def test_variants_set_the_steps_they_name():
    """The default takes 32 columns a step of the 256 a chunk (E = 8), two steps a trip of the
    reduction's loop; "one a trip" one step a trip; "a chunk in one step" the whole chunk. The
    backward's output pass: 512 columns a program, each thread all the rows of 4 (the default),
    of 2, or the chunk's 256 with the rows across threads. The settings are restored after
    each."""
    mod = load_bench("time_global")
    before = dict(gn.TUNING)
    steps = {}
    for name, settings in mod.VARIANTS:
        with mod._tuning(settings):
            plan = _plan()
            steps[name] = (plan.block_v, plan.sub, plan.pair, plan.rows_in_thread, plan.apply_v)
        assert gn.TUNING == before
    assert steps == {"steps, two a trip (default)": (256, 32, 2, True, 512),
                     "steps, one a trip": (256, 32, 1, True, 512),
                     "a chunk in one step": (256, 256, 1, True, 512),
                     "backward pass, rows across threads": (256, 32, 2, False, 256),
                     "backward pass, 2 columns a thread": (256, 32, 2, True, 256)}  # fmt: skip
    with mod._tuning({"sub": 0}):  # E = 16: a chunk of 64 columns, capped there
        assert (_plan(16).block_v, _plan(16).sub) == (64, 64)
    assert (_plan(4).sub, _plan(4).pair) == (128, 1)  # E = 4: a step's loads are 16 B already


def test_a_step_that_does_not_divide_the_chunk_is_refused(monkeypatch):
    monkeypatch.setitem(gn.TUNING, "sub", 48)
    with pytest.raises(ValueError, match="does not divide the chunk of 256"):
        _plan()


def test_columns_a_thread_other_than_a_power_of_two_up_to_8_are_refused(monkeypatch):
    monkeypatch.setitem(gn.TUNING, "apply_vec", 3)
    with pytest.raises(ValueError, match=r"apply_vec'\] = 3: 1, 2, 4 or 8 columns"):
        _plan()


@pytest.mark.skipif(not interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")
def test_runs_end_to_end_at_a_tiny_shape(tmp_path, capsys):
    mod = load_bench("time_global")
    out = tmp_path / "global.json"
    assert mod.main(["--shape", "1", "8", "8", "8", "4", "--dtypes", "fp32", "--repeats", "1",
                     "--device", "cpu", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == [name for name, _ in mod.VARIANTS]
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["bitwise_repeat"] for r in rows)
    assert all(r["y_diff"] == 0.0 for r in rows)  # here every variant's reduction is one step
    # the backward's output pass sums in another order in its other forms: fp32 rounding
    apply = {"backward pass, rows across threads", "backward pass, 2 columns a thread"}
    assert all(r["dx_diff"] == 0.0 for r in rows if r["variant"] not in apply)
    assert all(0.0 <= r["dx_diff"] <= 1e-6 for r in rows if r["variant"] in apply), rows
    assert "a chunk in one step" in capsys.readouterr().out
