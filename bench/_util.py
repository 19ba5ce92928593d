"""Shared helpers of the benchmark suites: timing, memory, bandwidth, environment, and
:func:`bench_case`, which runs one layer or model case of a :class:`Suite`.

The timing and memory helpers live in :mod:`fastnmf.profile` (which ``fastnmf profile`` uses
too); they are re-exported here for the suites.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import pytest
import torch

from fastnmf import profile as P
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


@dataclasses.dataclass(frozen=True)
class Suite:
    """How a suite of :mod:`fastnmf.profile` cases is benchmarked: ``prepare(case, device)``,
    ``row(case)`` (its columns), ``group(case, row)`` (pytest-benchmark's group), rounds on a GPU
    (2 on the CPU), the name of the work rate in ``extra_info``, and whether peak memory is
    absolute (models) or above what was allocated before (layers)."""

    prepare: Callable
    row: Callable
    group: Callable
    cuda_rounds: int
    rate_key: str
    absolute_peak: bool = False


def bench_case(benchmark, case, *, suite: Suite, device: torch.device) -> dict:
    """Prepare, time and record one case of ``suite``.

    Skips with the reason when the case cannot run here; else stores the case, its row, the
    figures (the work rate under ``suite.rate_key``) and the environment in ``extra_info``, and
    returns the figures."""
    reason = None
    try:
        prep = suite.prepare(case, device)
    except P.Unsupported as why:
        reason = str(why)  # skip outside the handler: its traceback would keep GPU memory
    if reason is not None:
        pytest.skip(reason)
    row = suite.row(case)
    benchmark.group = suite.group(case, row)
    rounds = suite.cuda_rounds if device.type == "cuda" else 2
    benchmark.pedantic(prep.run, rounds=rounds, warmup_rounds=1, iterations=1)
    median_s = timed_median_s(benchmark, prep.run, device)
    peak = P.peak_bytes(prep.run, device, absolute=suite.absolute_peak)
    figures = P.figures(prep, median_s * 1e3, device, peak)
    assert figures["median_ms"] > 0 and figures["per_s"] > 0
    benchmark.extra_info.update(dataclasses.asdict(case))
    benchmark.extra_info.update(row, **{suite.rate_key: figures.pop("per_s")}, **figures)
    benchmark.extra_info.update(env_info(device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return figures
