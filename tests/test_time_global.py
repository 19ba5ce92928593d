"""bench/time_global.py (the global reduction's steps against its one-step form, for a GPU):
its variants set what they name, and it runs end to end at a tiny shape (here on the CPU, under
the interpreter, where both variants are one step: nothing is timed for real)."""

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
    """The default takes 32 columns a step of the 256 a chunk (E = 8); the "one step" variant the
    whole chunk, as before 2026-12-06; the setting is restored after each."""
    mod = load_bench("time_global")
    subs = {}
    for name, value in mod.VARIANTS:
        with mod._sub(value):
            plan = _plan()
            subs[name] = (plan.block_v, plan.sub)
    assert subs == {"steps (default)": (256, 32), "one step (before 2026-12-06)": (256, 256)}
    assert gn.TUNING["sub"] is None
    with mod._sub(0):  # E = 16: a chunk of 64 columns, capped there
        assert (_plan(16).block_v, _plan(16).sub) == (64, 64)


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
    assert rows[1]["y_diff"] == rows[1]["dx_diff"] == 0.0  # here both variants are one step
    assert "one step" in capsys.readouterr().out
