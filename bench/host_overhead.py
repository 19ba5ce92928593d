"""Host time of one layer call on the Triton path, without a GPU: what bounds small volumes.

    python bench/host_overhead.py                    # a markdown table, microseconds a call
    python bench/host_overhead.py --out host.json
    python bench/host_overhead.py --ab               # and with the geometries built every call
    python3 bench/host_overhead.py --cuda --dtype fp32 bf16 --shifts "[None, 4]" \
        --shapes 2x32x16^3 2x32x32^3                 # on a GPU: where a small call's time goes

On the H200 the window layer took 0.33 ms forward and 1.15 ms forward + backward at 2 x 32 x 16^3
(fp32, `[None, 4]`, bench/results/h200_2026-12-04/layer/), where its kernels move 1 MB: the host,
not the GPU, sets the time there. This script measures that host time on any machine: the kernels
are compiled for sm_90a by the static suite's stub driver (fastnmf/profile/static/driver.py) and
their launches go through Triton's whole launch path to a launcher that runs nothing; CPU tensors
stand in for CUDA ones (allocation, views, autograd as on a GPU, minus CUDA's own launch cost, a
few microseconds an op). The few PyTorch ops between the launches (fills, the global path's sums)
do compute here, on the CPU, at a cost that grows with the volume where a GPU's would not: small
shapes (the default, 2 x 32 x 16^3) are the fair measure. Each case: the median over --repeats
rounds of --calls calls, after a warm-up (the first call compiles). Timed, so figures vary with
the machine and its load; nothing here gates CI.

With ``--cuda`` (a GPU, real launches, CUDA tensors) each case gets four figures a call, the
split of what the H200's layer suite measured at small shapes (0.33 ms forward and 1.15 ms
forward + backward at 2 x 32 x 16^3 against about 0.1 / 0.25 ms of host time here): host_us, the
host's time until the call returns (launches queued, nothing waited for); pipelined_us, calls
back to back with one synchronisation at the end (the host's time if it is the bound, else the
GPU's); synced_us, a call and a synchronisation, as the layer suite times it (CUDA events around
both); kernel_us, the GPU time of its kernels (``torch.profiler``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SHIFTS = {"[None, 4]": [None, 4], "[None, 2, 4, 6]": [None, 2, 4, 6], "[None]": None,
          "global": "global"}  # fmt: skip
SHAPES = {"2x32x16^3": (2, 32, 16, 16, 16), "2x32x32^3": (2, 32, 32, 32, 32),
          "2x32x128^3": (2, 32, 128, 128, 128)}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shifts", nargs="+", choices=list(SHIFTS), default=list(SHIFTS))
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["2x32x16^3"])
    ap.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    ap.add_argument("--calls", type=int, default=50, help="calls a timed round")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (the median is kept)")
    ap.add_argument("--ab", action="store_true",
                    help="also time each case with the window geometries built every call "
                         "(kernels._common.shared_geometry off), in alternating rounds")
    ap.add_argument("--cuda", action="store_true",
                    help="on a GPU: real launches; host, pipelined, synced and kernel time a "
                         "call (module docstring)")  # fmt: skip
    ap.add_argument("--out", help="JSON file")
    return ap


@contextlib.contextmanager
def _geometry_cache(on: bool):
    """The window geometries built once per shape (the code's way) or, with ``on`` False, every
    call (as before 2026-12-04): the modules that call ``shared_geometry`` get a builder."""
    import importlib

    modules = [importlib.import_module(f"fastnmf.kernels.{m}")
               for m in ("window_nmf", "_window2_common")]  # fmt: skip
    saved = [m.shared_geometry for m in modules]
    if not on:
        for m in modules:
            m.shared_geometry = lambda cache, build, x, head_dim, patch, shifts, *key: build(
                x, head_dim, patch, shifts)  # fmt: skip
    try:
        yield
    finally:
        for m, f in zip(modules, saved, strict=True):
            m.shared_geometry = f


@contextlib.contextmanager
def _host_only():
    """The stub driver for sm_90a, recording nothing, and CPU tensors accepted by the Triton path
    (kernels._interpreter_check refuses them without the interpreter, rightly: here nothing
    runs)."""
    import fastnmf.kernels as kernels
    from triton.compiler.compiler import CompiledKernel

    from fastnmf.profile.static.capture import persistent_grid
    from fastnmf.profile.static.driver import StubDriver, stub_driver

    saved_check, saved_record = kernels._interpreter_check, StubDriver.record
    saved_init = CompiledKernel._init_handles

    def init_once(self):
        # A GPU loads a kernel's module at its first launch, and _init_handles returns at once
        # after that; the stub loads no module (None), so Triton >= 3.7's launch path, which
        # calls _init_handles at every launch (launch_metadata), would build a launcher every
        # time: 7-10 us a launch that no GPU run spends
        if self._run is None:
            saved_init(self)

    kernels._interpreter_check = lambda x: None
    StubDriver.record = lambda self, recorder, grid, args: None
    CompiledKernel._init_handles = init_once
    try:
        with stub_driver("sm_90a"), persistent_grid("sm_90a"):
            yield
    finally:
        kernels._interpreter_check, StubDriver.record = saved_check, saved_record
        CompiledKernel._init_handles = saved_init


def _calls(shape, dtype, shifts, device="cpu"):
    import fastnmf

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    x = torch.rand(shape, dtype=dt, device=device).requires_grad_()
    kw = dict(head_dim=8, iters=5, kernel="triton", check=False)
    if shifts == "global":
        v0 = torch.rand(int(torch.tensor(shape[2:]).prod()), 1, device=device)
    else:
        kw.update(window=8, shifts=shifts)
        v0 = torch.rand(8 ** (len(shape) - 2), 1, device=device)

    def fwd():
        with torch.no_grad():
            return fastnmf.matricized_nmf(x, v0, **kw)

    def fwd_bwd():
        y = fastnmf.matricized_nmf(x, v0, **kw)
        return torch.autograd.grad(y, x, torch.empty_like(y))

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _median_us(fn, calls: int, repeats: int) -> float:
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(rounds)


def device_split(fn, device: torch.device, calls: int, repeats: int) -> dict:
    """``--cuda``'s four figures a call of ``fn`` in microseconds (module docstring): medians of
    ``repeats`` rounds of ``calls`` calls; on a CPU device the synchronisations do nothing and
    kernel_us is 0."""
    from fastnmf.profile.timing import kernel_ms, sync

    host, piped, synced = [], [], []
    for _ in range(repeats):
        sync(device)
        t_host = 0.0
        t0 = time.perf_counter()
        for _ in range(calls):
            t1 = time.perf_counter()
            fn()
            t_host += time.perf_counter() - t1
        sync(device)
        piped.append((time.perf_counter() - t0) / calls * 1e6)
        host.append(t_host / calls * 1e6)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
            sync(device)
        synced.append((time.perf_counter() - t0) / calls * 1e6)
    kernels = kernel_ms(fn, device, calls=calls)
    kernel_us = sum(k["ms"] for k in kernels.values()) * 1e3
    return dict(host_us=round(statistics.median(host), 1),
                pipelined_us=round(statistics.median(piped), 1),
                synced_us=round(statistics.median(synced), 1), kernel_us=round(kernel_us, 1),
                kernels=kernels)  # fmt: skip


def _cuda_main(args) -> int:
    """``--cuda``: the four figures a call for every shift set, shape, dtype and pass."""
    dev = torch.device("cuda")
    rows = []
    print("| shifts | shape | dtype | pass | host us | pipelined us | synced us | kernel us |\n"
          "|---|---|---|---|---:|---:|---:|---:|", flush=True)  # fmt: skip
    for sname in args.shifts:
        for shape_name in args.shapes:
            for dname in args.dtype:
                calls = _calls(SHAPES[shape_name], dname, SHIFTS[sname], dev)
                for pass_, fn in calls.items():
                    fn()  # compiles
                    fn()
                    r = device_split(fn, dev, args.calls, args.repeats)
                    rows.append(dict(shifts=sname, shape=shape_name, dtype=dname, pass_=pass_,
                                     **r))  # fmt: skip
                    print(f"| {sname} | {shape_name} | {dname} | {pass_} | {r['host_us']:.0f} | "
                          f"{r['pipelined_us']:.0f} | {r['synced_us']:.0f} | "
                          f"{r['kernel_us']:.0f} |", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, torch=torch.__version__,
                           device=torch.cuda.get_device_name(dev)), f, indent=1)  # fmt: skip
    return 0


def _timed(fn, args) -> dict:
    """host_us (and with --ab host_us_uncached): medians of --repeats rounds, the two settings
    alternating round by round so that a drift of the machine's speed hits both alike."""
    if not args.ab:
        return dict(host_us=round(_median_us(fn, args.calls, args.repeats), 1))
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for on in (False, True):
            with _geometry_cache(on):
                times[on].append(_median_us(fn, args.calls, 1))
    return dict(host_us=round(statistics.median(times[True]), 1),
                host_us_uncached=round(statistics.median(times[False]), 1))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("host_overhead.py --cuda: no CUDA device here (the default mode "
                         "measures the host's part without one)")  # fmt: skip
    if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels must compile, not interpret
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env,
                              check=False).returncode  # fmt: skip
    if args.cuda:
        return _cuda_main(args)
    torch.set_num_threads(1)
    rows = []
    ab = " | geometry every call |" if args.ab else " |"
    print(f"| shifts | shape | dtype | pass | host us a call{ab}\n|---|---|---|---|---:|"
          + ("---:|" if args.ab else ""), flush=True)  # fmt: skip
    with _host_only():
        for sname in args.shifts:
            for shape_name in args.shapes:
                for dname in args.dtype:
                    for pass_, fn in _calls(SHAPES[shape_name], dname, SHIFTS[sname]).items():
                        fn()  # compiles
                        fn()
                        row = dict(shifts=sname, shape=shape_name, dtype=dname, pass_=pass_,
                                   **_timed(fn, args))  # fmt: skip
                        rows.append(row)
                        extra = f" | {row['host_us_uncached']:.0f}" if args.ab else ""
                        print(f"| {sname} | {shape_name} | {dname} | {pass_} | "
                              f"{row['host_us']:.0f}{extra} |", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, torch=torch.__version__), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
