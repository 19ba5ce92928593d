"""Shared helpers of the benchmark suites: timing, memory, bandwidth, environment.

The timing and memory helpers live in :mod:`fastnmf.profile` (which ``fastnmf profile`` uses
too); they are re-exported here for the suites.
"""

from __future__ import annotations

import functools

import torch

from fastnmf.profile import (  # noqa: F401  (re-exported)
    copy_bandwidth_gbs,
    environment,
    median_ms,
    peak_bytes,
    saved_bytes,
    sync,
)


@functools.cache
def env_info(device: torch.device) -> dict:
    """Device name, torch/triton versions and the git commit, for every benchmark's extra_info."""
    env = environment(device)
    return {k: env[k] for k in ("device", "torch", "triton", "cuda", "commit", "dirty")}


def timed_median_s(benchmark, run, device: torch.device) -> float:
    """pytest-benchmark's median in seconds; under ``--benchmark-disable`` (no stats) one
    synchronised repetition so that the figures are still computed (and tested)."""
    if benchmark.stats is None:
        return median_ms(run, device, repeats=1, warmup=0) / 1e3
    return benchmark.stats.stats.median
