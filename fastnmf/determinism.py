"""Bitwise-reproducible runs: :func:`set_deterministic` (``fastnmf train --deterministic``).

Two runs of the same job with the same seed, on the same machine and software, give bitwise-equal
weights. On the CPU fastnmf's training is already deterministic (seeded sampling, no atomics in
the NMF kernels); on CUDA a few library choices must also be pinned, which this module does:

- seeds Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device);
- ``torch.use_deterministic_algorithms(True)``: an op without a deterministic implementation
  raises (``warn_only=False``) instead of silently varying;
- cuDNN: ``deterministic = True``, ``benchmark = False`` (no autotuned algorithm choice);
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when unset (cuBLAS needs it for reproducible GEMMs on
  CUDA >= 10.2; it must be set before the first cuBLAS call of the process, so call this early).

The fastnmf Triton kernels write every output element from one program (no atomics), so they are
deterministic without further settings.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["set_deterministic", "DeterministicState", "restore"]

CUBLAS_WORKSPACE = ":4096:8"


@dataclass
class DeterministicState:
    """What :func:`set_deterministic` changed, for :func:`restore`."""

    algorithms: bool
    warn_only: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    cublas_env: str | None


def set_deterministic(seed: int = 0, *, warn_only: bool = False) -> DeterministicState:
    """Seed every generator with ``seed`` and make torch choose deterministic algorithms.

    Args:
        seed: seeds ``random``, ``numpy.random`` and torch (all devices).
        warn_only: if True, an op without a deterministic implementation warns instead of
            raising.

    Returns:
        The previous settings (pass them to :func:`restore` to undo; the seeds are not undone).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    prev = DeterministicState(
        algorithms=torch.are_deterministic_algorithms_enabled(),
        warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn_deterministic=torch.backends.cudnn.deterministic,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        cublas_env=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    if prev.cublas_env is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return prev


def restore(state: DeterministicState) -> None:
    """Undo the algorithm settings of :func:`set_deterministic` (not the seeds)."""
    torch.use_deterministic_algorithms(state.algorithms, warn_only=state.warn_only)
    torch.backends.cudnn.deterministic = state.cudnn_deterministic
    torch.backends.cudnn.benchmark = state.cudnn_benchmark
    if state.cublas_env is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = state.cublas_env
