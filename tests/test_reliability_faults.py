"""Faults: a real ``fastnmf train`` process killed with SIGKILL mid-step and mid-checkpoint-write.

The checkpoint on disk must always load (``weights_only=True``), ``--resume`` must continue from
the last complete one, and the resumed run must end with the same weights, optimiser state and
RNG state as an uninterrupted run (bitwise). Every run is a subprocess with the same environment
(one thread), so the uninterrupted reference is comparable bit for bit.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN_ARGS

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")

STEPS = 6
ARGS = [
    *TINY_TRAIN_ARGS,
    "--model-opt=dropout=0.1",  # the RNG state must survive the kill too
    "--workers=0",
    "--device=cpu",
    "--val-cases=1",
    "--no-progress",
    f"--steps={STEPS}",
    "--warmup=1",
    "--val-every=2",
    "--lr=1e-3",
    "--no-eval",
]


@pytest.fixture(scope="module")
def env(demo_cache):
    cache = demo_cache
    e = {**os.environ, "FASTNMF_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    e.pop("FASTNMF_TEST_SLOW_SAVE", None)
    return e


def _start(out: Path, env: dict, *extra: str, slow_save: float | None = None) -> subprocess.Popen:
    e = dict(env)
    if slow_save is not None:
        e["FASTNMF_TEST_SLOW_SAVE"] = str(slow_save)
    cmd = [sys.executable, "-m", "fastnmf", "train", *ARGS, f"--out={out}", *extra]
    return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(p: subprocess.Popen, timeout: float = 120) -> str:
    text, _ = p.communicate(timeout=timeout)
    text = text.decode(errors="replace")
    assert p.returncode == 0, text[-3000:]
    return text


def _kill_when(p: subprocess.Popen, ready, timeout: float = 90) -> None:
    """SIGKILL ``p`` as soon as ``ready()`` is true (polled every 10 ms)."""
    end = time.monotonic() + timeout
    while not ready():
        if p.poll() is not None:
            out = p.stdout.read().decode(errors="replace")
            pytest.fail(f"the run ended (rc {p.returncode}) before the kill point:\n{out[-3000:]}")
        if time.monotonic() > end:
            p.kill()
            pytest.fail("timed out waiting for the kill point")
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    p.stdout.close()
    assert p.returncode == -signal.SIGKILL


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            other = b["optimizer"]["state"][k][name]
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(other)), (k, name)
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def _steps(path: Path) -> list[int]:
    rows = list(csv.reader(path.read_text().splitlines()))[1:]
    return [int(r[0]) for r in rows]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """An uninterrupted run (started here, awaited by the first test that needs it)."""
    out = tmp_path_factory.mktemp("reference")
    return out, _start(out, env)


def _reference_state(reference) -> dict:
    out, p = reference
    if p.returncode is None:
        _finish(p)
    return _load(out / "last.pt")


def test_sigkill_mid_step_then_resume_matches_uninterrupted(env, reference, tmp_path):
    out = tmp_path / "run"
    p = _start(out, env)  # runs beside the reference (2 cores)
    _kill_when(p, lambda: (out / "last.pt").exists())  # at once after the first checkpoint
    ckpt = _load(out / "last.pt")  # the checkpoint on disk is complete
    assert ckpt["step"] == 2
    text = _finish(_start(out, env, "--resume"))
    assert f"{STEPS}/{STEPS} steps" in text
    _assert_same_state(_load(out / "last.pt"), _reference_state(reference))
    assert _steps(out / "val.csv") == [0, 2, 4, 6]  # no step logged twice


def test_sigkill_mid_checkpoint_write_keeps_previous_checkpoint(env, reference, tmp_path):
    out = tmp_path / "run"
    # each checkpoint write pauses 1 s between the temporary file and the rename (test hook)
    p = _start(out, env, slow_save=1.0)

    def writing_second_last_pt():
        return (out / "last.pt").exists() and any(out.glob(".last.pt.tmp-*"))

    _kill_when(p, writing_second_last_pt)
    (tmp,) = out.glob(".last.pt.tmp-*")  # the interrupted write left its temporary file
    ckpt = _load(out / "last.pt")  # ... and the previous checkpoint intact
    assert ckpt["step"] == 2
    _load(out / "best.pt")
    assert _steps(out / "val.csv")[-1] == 4  # logged before the interrupted write
    text = _finish(_start(out, env, "--resume"))
    assert f"{STEPS}/{STEPS} steps" in text
    _assert_same_state(_load(out / "last.pt"), _reference_state(reference))
    assert _steps(out / "val.csv") == [0, 2, 4, 6]  # the re-run step 4 replaced the stale row


def test_resume_without_a_complete_checkpoint_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.tmp-123").write_bytes(b"PK\x03\x04 half a zip")  # a killed first write
    from fastnmf.cli import main

    rc = main(["train", "--resume", f"--out={out}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "last.pt: checkpoint not found" in err and "Traceback" not in err
    (out / "last.pt").write_bytes((out / ".last.pt.tmp-123").read_bytes())  # truncated copy
    assert main(["train", "--resume", f"--out={out}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "last.pt: cannot read checkpoint" in err and "Traceback" not in err
