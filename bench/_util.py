"""Shared helpers of the benchmark suites: timing, memory, bandwidth."""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
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


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Device copy bandwidth (read + write bytes per second) of a large clone, GB/s."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    ms = median_ms(lambda: x.clone(), device, repeats=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def saved_bytes(fn) -> int:
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


def peak_bytes(fn, device: torch.device) -> int | None:
    """Peak memory allocated during ``fn`` on a GPU (None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base
