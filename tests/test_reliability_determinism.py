"""Determinism: two training runs of N steps give bitwise-identical weights.

``fastnmf.determinism.set_deterministic`` (library) and ``TrainConfig.deterministic`` /
``fastnmf train --deterministic`` (pipeline). CPU here; the same test runs on CUDA in a GPU
session.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_OPTIONS, TINY_RUN, assert_same_training_state, tiny_config

from fastnmf.determinism import restore, set_deterministic
from fastnmf.infer import load_checkpoint
from fastnmf.train import train

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def restored():
    """Undo the global settings after each test (the suite runs in one process)."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
    if before[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = before[4]


def test_set_deterministic_seeds_and_flags(restored):
    state = set_deterministic(123)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    set_deterministic(123)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    restore(state)
    assert torch.are_deterministic_algorithms_enabled() == state.algorithms
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        set_deterministic(-1)


def _cfg(device):
    model = {**TINY_MODEL_OPTIONS, "dropout": 0.1}
    return tiny_config(**TINY_RUN, model_options=model, steps=3, warmup=1, val_every=3,
                       val_cases=1, device=device, deterministic=True)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_two_deterministic_runs_are_bitwise_equal(demo_cache, tmp_path, device, restored):
    cfg = _cfg(device)
    for name in ("a", "b"):
        torch.manual_seed(len(name) * 7 + ord(name))  # a different global state before each run
        train(cfg, out=tmp_path / name, progress=False, verbose=False)
        assert torch.are_deterministic_algorithms_enabled()  # the run switched it on
    a = load_checkpoint(tmp_path / "a" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == 3 and a["config"]["deterministic"] is True
    assert_same_training_state(a, b)


def test_cli_flag_reaches_the_config():
    from fastnmf.cli import build_parser

    args = build_parser().parse_args(["train", "--deterministic"])
    assert args.deterministic is True
    assert build_parser().parse_args(["train"]).deterministic is False
