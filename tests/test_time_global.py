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
    settings are restored after each."""
    mod = load_bench("time_global")
    before = dict(gn.TUNING)
    steps = {}
    for name, settings in mod.VARIANTS:
        with mod._tuning(settings):
            plan = _plan()
            steps[name] = (plan.block_v, plan.sub, plan.pair)
        assert gn.TUNING == before
    assert steps == {"steps, two a trip (default)": (256, 32, 2),
                     "steps, one a trip": (256, 32, 1),
                     "a chunk in one step": (256, 256, 1)}  # fmt: skip
    with mod._tuning({"sub": 0}):  # E = 16: a chunk of 64 columns, capped there
        assert (_plan(16).block_v, _plan(16).sub) == (64, 64)
    assert (_plan(4).sub, _plan(4).pair) == (128, 1)  # E = 4: a step's loads are 16 B already


def test_a_step_that_does_not_divide_the_chunk_is_refused(monkeypatch):
    monkeypatch.setitem(gn.TUNING, "sub", 48)
    with pytest.raises(ValueError, match="does not divide the chunk of 256"):
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
    assert all(r["y_diff"] == r["dx_diff"] == 0.0 for r in rows)  # here every variant is one step
    assert "a chunk in one step" in capsys.readouterr().out
