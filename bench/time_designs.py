"""Time the rank-one window kernel designs side by side (issue 16's deciding measurement).

    python3 bench/time_designs.py --out designs.json            # on a GPU: 2x32x128^3
    python3 bench/time_designs.py --shape 1 8 16 16 16 --repeats 1   # anywhere (interpreter:
        # slow, over 15 minutes for the fp32 half on 2 CPU cores; --dtypes / --shifts /
        # --variants pick a part)
    python3 bench/time_designs.py --static      # no GPU: each case compiled for sm_90a, its
        # launches' registers, spills and resident warps (the static report beside the timing)
    python3 bench/time_designs.py --head-dim 4 --window 4 --shifts "[None, 1, 2, 3]" \
        --shape 2 32 64 64 64                   # the isles preset's layer (E = P = 4)

For each dtype (fp32, bf16), shift set ([None, 4], [None, 2, 4, 6]) and variant (design 1, 2, 3, and
design 3 with other ``_window3_sched.TUNING`` settings: warps 8, 16 windows a ticket, 2 programs per
SM, 2 programs of 16 warps at 64 registers (32 resident warps an SM), neighbours' parts not merged,
the forward's parts or output pass, the backward's output or parts pass on a ticket's tiles, or
several), the layer's forward and forward+backward (``fastnmf.matricized_nmf``, kernel "triton", E =
P = 8 unless --head-dim / --window say, T = 5) are timed (median of CUDA events), as % of the
device's copy bandwidth for the ideal bytes (forward: read x + write y; backward: + read dy, write
dx) and as a ratio to the first variant (design 1), variant by variant in the order given
(``_cases``: a run cut short keeps the first variants of every case); every variant's output and
gradient are compared with its (max relative difference), and on a GPU each kernel's time and
launches a call (``torch.profiler``: where a variant's time goes, printed under its row). A variant
that fails is recorded with its error and the others go on. Writes one JSON document (rewritten
after every row, so a run stopped by the GPU session's time limit keeps what it measured) and prints
a table (flushed row by row), then the fastest variant of each dtype and shift set against issue
16's targets (forward 60 %, forward+backward 45 % of copy bandwidth: met, or missed by how much;
"best" in the JSON, kept up to date row by row); nothing here gates anything.

On a GPU the cases' kernels are first compiled by ``--jobs`` processes at once (``--compile-only``
each; Triton compiles one kernel at a time in a process, tens of seconds for a fused kernel, and
the cases would otherwise take most of the GPU session's step compiling); they share Triton's
on-disk cache, and the timing starts when they are done or after ``--compile-budget`` seconds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import fastnmf
from fastnmf.profile.timing import copy_bw, environment, kernel_ms, median_ms, pick_device

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: also when imported
from design_variants import (  # noqa: E402
    DEFAULT_SHIFTS,
    DTYPES,
    REFERENCE,
    SHIFTS,
    SHORTLIST,
    VARIANTS,
    _tuned,
)


def _layer(x, v0, shifts, kernel="triton", head_dim: int = 8, window: int = 8):
    return fastnmf.matricized_nmf(x, v0, head_dim=head_dim, window=window, shifts=shifts,
                                  iters=5, kernel=kernel, check=False)  # fmt: skip


def _run(design: int, tuning: dict, x, v0, dy, shifts, device, repeats: int,
         warmup: int, timed: bool = True, layer: dict | None = None) -> dict:  # fmt: skip
    """One variant's calls; ``layer``: the layer's head_dim and window (default 8, 8)."""
    kernel = "reference" if design == 0 else "triton"
    layer = layer or {}
    with _tuned(design, tuning):
        xg = x.detach().requires_grad_()

        def fwd():
            with torch.no_grad():
                return _layer(x, v0, shifts, kernel, **layer)

        def fwdbwd():
            (g,) = torch.autograd.grad(_layer(xg, v0, shifts, kernel, **layer), xg, dy)
            return g

        y, g = fwd(), fwdbwd()  # the first calls compile
        if not timed:
            return dict(y=y, dx=g)
        r = dict(fwd_ms=median_ms(fwd, device, repeats, warmup),
                 fwdbwd_ms=median_ms(fwdbwd, device, repeats, warmup), y=y, dx=g)
        # after the timed calls, once more: bitwise what the first calls gave?
        r["bitwise_repeat"] = bool(torch.equal(fwd(), y) and torch.equal(fwdbwd(), g))
        # where the time goes: each kernel's ms and launches a call (GPU only; {} elsewhere),
        # forward + backward only (its forward kernels are the forward's, storing what the
        # backward reads): one profiler session a row, for the GPU session's time limit
        r["kernels"] = {"fwdbwd": kernel_ms(fwdbwd, device, calls=2)}
        return r


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=5, default=[2, 32, 128, 128, 128],
                    metavar=("B", "C", "D", "H", "W"))  # fmt: skip
    ap.add_argument("--head-dim", type=int, default=8,
                    help="E, channels a head (the isles preset: 4); C must be a multiple")
    ap.add_argument("--window", type=int, default=8,
                    help="P, the window's side (the isles preset: 4); the sides' divisor")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed calls before the timed ones (after the first, compiling call)")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    ap.add_argument("--shifts", nargs="+", choices=list(SHIFTS), default=DEFAULT_SHIFTS)
    ap.add_argument("--variants", nargs="+", choices=[v[0] for v in VARIANTS],
                    default=[v[0] for v in VARIANTS], help="the first one is the baseline")
    ap.add_argument("--shortlist", action="store_true",
                    help="the variants a short GPU lease times (SHORTLIST; not with --variants)")
    ap.add_argument("--out", help="JSON file")
    ap.add_argument("--jobs", type=int, default=None,
                    help="processes that compile the cases' kernels before the timing (default: "
                         "the CPU cores, at most 8, on a GPU; 1, none, elsewhere)")  # fmt: skip
    ap.add_argument("--compile-budget", type=float, default=240,
                    help="seconds the --jobs processes may take (then the timing starts)")
    ap.add_argument("--compile-only", action="store_true",
                    help="only the first (compiling) calls: what each --jobs process runs")
    ap.add_argument("--static", action="store_true",
                    help="no GPU needed: compile every case for sm_90a (the static suite's stub "
                         "driver) and print each launch's registers, spills and resident warps "
                         "(a markdown table; --out: JSON), times nothing")  # fmt: skip
    return ap


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    _, channels, *spatial = args.shape
    if channels % args.head_dim or any(side % args.window for side in spatial):
        ap.error(f"--shape {' '.join(map(str, args.shape))}: C must be a multiple of --head-dim "
                 f"{args.head_dim} and D, H, W of --window {args.window}")  # fmt: skip
    if args.shortlist:
        if args.variants != ap.get_default("variants"):
            ap.error("--shortlist and --variants: give one")
        args.variants = list(SHORTLIST)
    if args.static:
        return _static(args, sys.argv[1:] if argv is None else list(argv))
    device = pick_device("auto")
    if args.compile_only:
        for dname, sname, _, design, tuning in _cases(args):
            x, v0, dy = _inputs(args.shape, dname, device, args.window)
            _run(design, tuning, x, v0, dy, SHIFTS[sname], device, 0, 0, timed=False,
                 layer=_layer_args(args))  # fmt: skip
        return 0
    jobs = args.jobs or (min(8, os.cpu_count() or 1) if device.type == "cuda" else 1)
    if jobs > 1:
        _compile_first(args, jobs)
    bw = copy_bw(device)
    rows, inputs, base = [], {}, {}
    for dname, sname, name, design, tuning in _cases(args):
        if dname not in inputs:  # made once a dtype (the cases alternate dtypes)
            inputs[dname] = _inputs(args.shape, dname, device, args.window)
        x, v0, dy = inputs[dname]
        nbytes = x.numel() * x.element_size()
        row = dict(dtype=dname, shifts=sname, variant=name)
        try:
            r = _run(design, tuning, x, v0, dy, SHIFTS[sname], device, args.repeats, args.warmup,
                     layer=_layer_args(args))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - recorded, the other variants go on
            rows.append(dict(row, error=f"{type(e).__name__}: {e}"))
            print(f"{dname} {sname} {name}: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)  # fmt: skip
            _write(args.out, device, args.shape, bw, rows, _best_lines(rows))
            continue
        b = base.setdefault((dname, sname), r)  # the first variant that ran
        row.update(
            fwd_ms=r["fwd_ms"], fwdbwd_ms=r["fwdbwd_ms"],
            fwd_pct_copy_bw=100 * 2 * nbytes / (r["fwd_ms"] * 1e-3) / 1e9 / bw,
            fwdbwd_pct_copy_bw=100 * 5 * nbytes / (r["fwdbwd_ms"] * 1e-3) / 1e9 / bw,
            fwd_vs_design1=r["fwd_ms"] / b["fwd_ms"],
            fwdbwd_vs_design1=r["fwdbwd_ms"] / b["fwdbwd_ms"],
            y_rel_diff_vs_design1=_rel(r["y"], b["y"]),
            dx_rel_diff_vs_design1=_rel(r["dx"], b["dx"]),
            bitwise_repeat=r.get("bitwise_repeat"), kernels=r.get("kernels", {}),
        )  # fmt: skip
        rows.append(row)
        print(f"{dname:5} {sname:16} {name:34} fwd {row['fwd_ms']:8.3f} ms "
              f"({row['fwd_pct_copy_bw']:5.1f} %)  fwd+bwd {row['fwdbwd_ms']:8.3f} ms "
              f"({row['fwdbwd_pct_copy_bw']:5.1f} %)  dx diff "
              f"{row['dx_rel_diff_vs_design1']:.1e}  bitwise {row['bitwise_repeat']}",
              flush=True)  # fmt: skip
        for line in kernel_lines(row["kernels"]):
            print(line, flush=True)
        _write(args.out, device, args.shape, bw, rows, _best_lines(rows))
    best = _best_lines(rows)
    _write(args.out, device, args.shape, bw, rows, best)
    for line in best:
        print(line, flush=True)
    return 1 if any("error" in r for r in rows) else 0


# issue 16's targets: % of the device's copy bandwidth for the ideal bytes (forward,
# forward + backward)
TARGETS = {"fwd": 60.0, "fwdbwd": 45.0}
# and the fastest forward + backward at least this many times the reference kernel's speed
REFERENCE_SPEEDUP = 10.0


def kernel_lines(kernels: dict, top: int = 6) -> list[str]:
    """A row's per-kernel split (``kernel_ms``, by pass: forward + backward) as indented
    lines: the ``top`` kernels by time, "name ms xlaunches" (a call's), and their sum."""
    lines = []
    for pass_, split in kernels.items():
        if not split:
            continue
        total = sum(k["ms"] for k in split.values())
        parts = [f"{name[:40]} {k['ms']:.3f} x{k['launches']:g}"
                 for name, k in list(split.items())[:top]]  # fmt: skip
        lines.append(f"    {pass_:6} kernels {total:.3f} ms: " + ", ".join(parts))
    return lines


def fastest(rows, pass_: str = "fwdbwd") -> dict | None:
    """The timed window variant (no error, not the reference) with the shortest ``pass_`` time
    among ``rows`` (one dtype and shift set), or None."""
    timed = [r for r in rows if "error" not in r and r["variant"] != REFERENCE]
    return min(timed, key=lambda r: r[f"{pass_}_ms"]) if timed else None


def _best_lines(rows) -> list[str]:
    """Per dtype and shift set, the fastest variant forward and forward+backward against issue 16's
    targets (met, or missed by how much)."""
    lines = []
    for key in dict.fromkeys((r["dtype"], r["shifts"]) for r in rows):
        group = [r for r in rows if (r["dtype"], r["shifts"]) == key]
        ref = [r for r in group if r["variant"] == REFERENCE and "error" not in r]
        for pass_, goal in TARGETS.items():
            best = fastest(group, pass_)
            if best is None:
                lines.append(f"{key[0]} {key[1]} {pass_.replace('bwd', '+bwd')}: nothing timed")
                continue
            pct = best[f"{pass_}_pct_copy_bw"]
            how = "met" if pct >= goal else f"missed by {goal / pct:.2f}x"
            lines.append(f"{key[0]} {key[1]} {pass_.replace('bwd', '+bwd')}: fastest "
                         f"{best['variant']!r}, "
                         f"{best[f'{pass_}_ms']:.3f} ms = {pct:.1f} % of copy bandwidth "
                         f"(target {goal:.0f} %: {how})")  # fmt: skip
        best = fastest(group)
        if best is not None and ref:
            speedup = ref[0]["fwdbwd_ms"] / best["fwdbwd_ms"]
            how = "met" if speedup >= REFERENCE_SPEEDUP else \
                f"missed by {REFERENCE_SPEEDUP / speedup:.2f}x"
            lines.append(f"{key[0]} {key[1]} fwd+bwd: fastest {best['variant']!r} "
                         f"{speedup:.1f}x the reference ({ref[0]['fwdbwd_ms']:.3f} ms; target "
                         f"{REFERENCE_SPEEDUP:.0f}x: {how})")  # fmt: skip
    return lines


STATIC_FIELDS = ("pass", "kernel", "warps", "regs", "spill_bytes", "resident_warps_per_sm",
                 "smem_bytes", "sass_instructions", "barriers", "async_copies",
                 "ptx_async_wait_in_loop", "ptx_smem_held_across_calls")  # fmt: skip


def _static(args, argv: list[str]) -> int:
    """Every case's launches compiled for sm_90a with its variant's settings, no GPU (what the
    timing will run, beside it: a variant that spills or fails to compile shows before a GPU
    session spends time on it). Returns 1 if a case failed to compile. Under the interpreter
    (``TRITON_INTERPRET=1``) the static suite compiles in a process of its own, which the
    variants' TUNING would not reach: this script then runs again without it."""
    from fastnmf.profile.static import kernel_report as kr
    from fastnmf.profile.static.cases import StaticCase

    if not kr._compiling_here():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env,
                              check=False).returncode  # fmt: skip
    batch, channels, *spatial = args.shape
    rows, failed = [], False
    print("| dtype | shifts | variant | " + " | ".join(STATIC_FIELDS) + " |")
    print("|---" * (3 + len(STATIC_FIELDS)) + "|", flush=True)
    for dname, sname, name, design, tuning in _cases(args):
        if design == 0:  # the reference: no Triton kernel
            continue
        if design is None:  # the code's choice for the shift set
            design = importlib.import_module("fastnmf.kernels").window_design(SHIFTS[sname])
        case = StaticCase("window", batch, channels, tuple(spatial), dtype=dname,
                          head_dim=args.head_dim, window=args.window, iters=5,
                          shifts=tuple(SHIFTS[sname]), design=design)  # fmt: skip
        row = dict(dtype=dname, shifts=sname, variant=name)
        try:
            with _tuned(design, tuning):
                launches = kr.kernel_report([case], targets=("sm_90a",))["launches"]
        except Exception as e:  # noqa: BLE001 - recorded, the other variants go on
            failed = True
            rows.append(dict(row, error=f"{type(e).__name__}: {e}"))
            print(f"| {dname} | {sname} | {name} | error: {type(e).__name__}: {e} |", flush=True)
            continue
        for launch in launches:
            rows.append(dict(row, **{f: launch[f] for f in STATIC_FIELDS}))
            print(f"| {dname} | {sname} | {name} | "
                  + " | ".join(str(launch[f]) for f in STATIC_FIELDS) + " |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(target="sm_90a", shape=args.shape, rows=rows), f, indent=1)
    return 1 if failed else 0


def _layer_args(args) -> dict:
    """The layer's head_dim and window (``_layer``) from the command line."""
    return dict(head_dim=args.head_dim, window=args.window)


def _inputs(shape, dname, device, window: int = 8):
    """x, v0, dy of a dtype (the same seed for every dtype); v0 one entry a window voxel."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(device, DTYPES[dname])
    dy = torch.randn(*shape, generator=gen).to(device, DTYPES[dname])
    v0 = torch.rand(window**3, 1, generator=gen).to(device, DTYPES[dname])
    return x, v0, dy


def _cases(args):
    """(dtype, shift set, variant, design, TUNING) in the timing's order: variant by variant in
    ``args.variants``' order (SHORTLIST's: by priority), each in every dtype and shift set, so
    that a run the GPU session's time limit cuts short (and a compile budget that runs out) has
    the first variants of every case, not every variant of the first case (before 2026-12-06:
    dtype, then shifts, then variant, and a shortlist of 20 variants at 120 s of compile budget
    would have compiled about the first case's alone)."""
    known = {name: (design, tuning) for name, design, tuning in VARIANTS}
    for name in dict.fromkeys(args.variants):
        design, tuning = known[name]
        for dname in args.dtypes:
            for sname in args.shifts:
                yield dname, sname, name, design, tuning


def _compile_commands(args) -> list[list[str]]:
    """One ``--compile-only`` command a case, in the timing's order."""
    base = [sys.executable, os.path.abspath(__file__), "--compile-only", "--shape",
            *map(str, args.shape), "--head-dim", str(args.head_dim), "--window",
            str(args.window)]  # fmt: skip
    return [[*base, "--dtypes", d, "--shifts", s, "--variants", v]
            for d, s, v, design, _ in _cases(args) if design != 0]  # fmt: skip


def _compile_first(args, jobs: int, cmds=None) -> int:
    """Compile every case's kernels in ``jobs`` processes at once, before the timing: Triton
    compiles one kernel at a time in a process (tens of seconds each for the fused kernels), and
    the processes share its on-disk cache, so the timing loads what they compiled. Processes
    still running after ``args.compile_budget`` seconds are killed (the timing then compiles what
    they did not: nothing else may use the GPU while it times). A case that fails or is killed
    is only reported: the timing records its error. Returns the number of cases compiled."""
    deadline = time.monotonic() + args.compile_budget
    cmds = _compile_commands(args) if cmds is None else cmds

    def one(cmd):
        left = deadline - time.monotonic()
        if left <= 0:
            return "not started"
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            err = p.communicate(timeout=left)[1]
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            return "killed at the budget"
        return None if p.returncode == 0 else f"exit {p.returncode}: {err.strip()[-300:]}"

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(one, cmds))
    for cmd, why in zip(cmds, results, strict=True):
        if why:
            print(f"compile {' '.join(cmd[-6:])}: {why}", file=sys.stderr, flush=True)
    done = sum(why is None for why in results)
    print(f"compiled {done} of {len(cmds)} cases in {jobs} processes: "
          f"{time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
    return done


def _write(out, device, shape, bw, rows, best) -> None:
    """The JSON document so far, with the fastest variants so far against the targets
    (``best``): written after every row, so a run cut short by the GPU session's time limit
    keeps what it measured."""
    if out:
        doc = dict(environment=environment(device), shape=shape, copy_bw_gbs=bw, rows=rows,
                   best=best)  # fmt: skip
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
