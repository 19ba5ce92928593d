"""Timing, memory and bandwidth measurement, the device and the environment of a run."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 2):
    """Median wall time of ``fn`` in ms, synchronised (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def per_call(averages, calls: int, time_attr: str) -> dict[str, dict[str, float]]:
    """``torch.profiler``'s ``key_averages()`` of ``calls`` calls as {name: {"ms": time per
    call, "launches": events per call}} (``time_attr``: the event attribute in µs, e.g.
    ``device_time_total``), largest time first; events with no time are left out."""
    rows = {}
    for ev in averages:
        us = getattr(ev, time_attr, 0) or 0
        if us > 0:
            rows[ev.key] = {"ms": round(us / calls / 1e3, 4), "launches": ev.count / calls}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["ms"]))


def kernel_ms(fn: Callable[[], object], device: torch.device, calls: int = 3):
    """Where ``fn``'s GPU time goes: each CUDA kernel's (and copy's) device time per call and
    launches per call (:func:`per_call`), from ``torch.profiler`` over ``calls`` calls after one
    untimed call; {} off CUDA (nothing to split)."""
    if device.type != "cuda":
        return {}
    fn()
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    return per_call(prof.key_averages(), calls, "device_time_total")


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Device copy bandwidth (read + write bytes per second) of a large clone, GB/s."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    ms = median_ms(lambda: x.clone(), device, repeats=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


@functools.cache
def copy_bw(device: torch.device) -> float:
    return copy_bandwidth_gbs(device, 256 * 2**20 if device.type == "cuda" else 32 * 2**20)


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd keeps for backward while running ``fn``."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def peak_bytes(fn: Callable[[], object], device: torch.device, *, absolute: bool = False):
    """Peak memory allocated while ``fn`` runs on a GPU (None on CPU); above the memory already
    allocated before the call unless ``absolute``."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = 0 if absolute else torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    """Device name, versions and the git commit: recorded with every result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    root = Path(__file__).resolve().parents[2]
    commit, dirty = os.environ.get("FASTNMF_COMMIT") or None, None  # e.g. a copy without .git
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if head:
            commit = head
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            dirty = bool(status.strip())
    from .. import __version__

    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "fastnmf": __version__,
        "commit": commit,
        "dirty": dirty,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r}; valid: auto, cpu, cuda, cuda:N")
    return dev
