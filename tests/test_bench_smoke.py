"""The benchmark suites run (once, untimed, at their smallest CPU shapes) so they cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "target,select",
    [
        ("bench/bench_nmf.py", "1x128x8 and not compiled"),
        ("bench/bench_nmf_torch.py", "32 and 5 and swin"),
        # every mixer at 8^3, forward + backward (CPU: SDPA flash; the CUDA backends skip)
        ("bench/bench_layers.py", "s8 and fwdbwd"),
        # a Factorizer and a CNN training step, Factorizer sliding-window inference
        (
            "bench/bench_models.py",
            "(train and (swin_factorizer-torch or nnunet)) or (infer and global_factorizer-torch)",
        ),
    ],
)
def test_bench_suite_runs(target, select):
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    env["OMP_NUM_THREADS"] = "1"  # untimed: one thread is steady on a busy machine
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", target, "--benchmark-disable", "-q", "-k", select,
         "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
