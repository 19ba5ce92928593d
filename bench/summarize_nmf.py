"""Turn bench_nmf.py's pytest-benchmark JSON into a results file and a table with issue 8's targets.

    python bench/summarize_nmf.py runs/gpu/nmf/*.json runs/gpu/compiled/*.json \\
        --json bench/results/nmf_h200.json --md bench/results/nmf_h200.md

Targets (the shifted-window layer at --shape, fp32, E=8, P=8, R=1, T=5, kernel --kernel):
forward >= 80 % of the device's copy bandwidth, forward+backward >= 60 %; forward+backward
>= 10x kernel="reference" and >= 3x torch.compile(reference); memory kept for backward <= 1.1x the
input; and the global path's time independent of T (here: the T=20 median within 10 % of T=1).
A target whose figures are missing is reported as "not measured", never as met.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PASSES = ("fwd", "bwd", "fwd+bwd")


def load(paths):
    """Rows (case fields + figures) of bench_nmf.py JSON files and the first one's environment."""
    rows, env = [], None
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"summarize_nmf: error: cannot read {path}: {e}") from None
        for b in data.get("benchmarks", []):
            p, info = b.get("params", {}), b.get("extra_info", {})
            median_ms = b["stats"]["median"] * 1e3
            if env is None:
                env = {k: info.get(k) for k in ("device", "torch", "triton", "cuda", "commit")}
            if b["name"].startswith("test_global_iters"):
                rows.append(dict(suite="global-iters", kernel=p["kernel"], iters=p["iters"],
                                 pass_=p["pass_"], shape=b["group"].split()[1],
                                 median_ms=median_ms))  # fmt: skip
                continue
            mode, shape, dtype, pass_ = b["group"].split()
            rows.append(dict(
                suite="layer", kernel=p["kernel"], mode=mode, shape=shape, dtype=dtype,
                pass_=pass_, median_ms=median_ms, gb_per_s=info.get("gb_per_s"),
                pct_copy_bandwidth=info.get("pct_copy_bandwidth"),
                copy_bandwidth_gb_per_s=info.get("copy_bandwidth_gb_per_s"),
                saved_over_input=info.get("saved_over_input"), peak_bytes=info.get("peak_bytes"),
            ))  # fmt: skip
    if not rows:
        raise SystemExit("summarize_nmf: error: no bench_nmf.py benchmarks in " + ", ".join(paths))
    seen, unique = set(), []  # a case timed in two files: the first file's figure counts
    for r in rows:
        key = tuple(sorted((k, v) for k, v in r.items() if k != "median_ms" and not k.startswith(
            ("gb_", "pct_", "copy_", "saved_", "peak_"))))  # fmt: skip
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique, env or {}


def _find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _check(name, value, target, higher_is_better, fmt):
    if value is None:
        return dict(target=name, status="not measured")
    met = value >= target if higher_is_better else value <= target
    if met:
        margin = value / target if higher_is_better else target / value if value else float("inf")
        how = f"met ({margin:.2f}x the target)"
    else:
        miss = target / value if higher_is_better and value else value / target
        how = f"missed by {miss:.2f}x" if value else "missed"
    return dict(target=name, value=value, goal=target, status=how, text=fmt.format(value))


def targets(rows, shape, kernel):
    """Issue 8's layer targets, each as {target, value, goal, status, text}."""
    sel = dict(suite="layer", mode="swin", shape=shape, dtype="float32")
    fwd = _find(rows, kernel=kernel, pass_="fwd", **sel)
    fb = _find(rows, kernel=kernel, pass_="fwd+bwd", **sel)
    ref = _find(rows, kernel="reference", pass_="fwd+bwd", **sel)
    comp = _find(rows, kernel="compiled-reference", pass_="fwd+bwd", **sel)
    out = [
        _check(f"swin {shape} fp32 forward >= 80 % of copy bandwidth",
               fwd and fwd["pct_copy_bandwidth"], 80, True, "{:.1f} %"),
        _check(f"swin {shape} fp32 forward+backward >= 60 % of copy bandwidth",
               fb and fb["pct_copy_bandwidth"], 60, True, "{:.1f} %"),
        _check(f"swin {shape} fp32 forward+backward >= 10x reference",
               fb and ref and ref["median_ms"] / fb["median_ms"], 10, True, "{:.2f}x"),
        _check(f"swin {shape} fp32 forward+backward >= 3x torch.compile(reference)",
               fb and comp and comp["median_ms"] / fb["median_ms"], 3, True, "{:.2f}x"),
        _check(f"swin {shape} fp32 memory kept for backward <= 1.1x the input",
               fb and fb["saved_over_input"], 1.1, False, "{:.3f}x the input"),
    ]  # fmt: skip
    for pass_ in ("fwd", "fwd+bwd"):
        t1 = _find(rows, suite="global-iters", kernel=kernel, iters=1, pass_=pass_)
        t20 = _find(rows, suite="global-iters", kernel=kernel, iters=20, pass_=pass_)
        ratio = t1 and t20 and t20["median_ms"] / t1["median_ms"]
        out.append(_check(f"global {pass_}: time independent of T (T=20 within 1.1x of T=1)",
                          ratio, 1.1, False, "T=20 takes {:.3f}x the time of T=1"))  # fmt: skip
    return out


def markdown(rows, env, checks, kernel) -> str:
    lines = [
        "# NMF layer benchmark (bench/bench_nmf.py)",
        "",
        f"Device: {env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}, "
        f"CUDA {env.get('cuda')}; commit {env.get('commit')}.",
        "",
        "## Targets (issue 8)",
        "",
    ]
    for c in checks:
        value = f": {c['text']}" if "text" in c else ""
        lines.append(f"- {c['target']}{value} — **{c['status']}**")
    lines += [
        "",
        "## Layer",
        "",
        "| mode | shape | dtype | pass | kernel | median ms | GB/s | % copy bw | kept / input "
        "| peak MiB | speed-up of " + kernel + " |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    layer = [r for r in rows if r["suite"] == "layer"]
    for r in sorted(layer, key=lambda r: (r["mode"], r["shape"], r["dtype"], r["pass_"],
                                          r["kernel"])):  # fmt: skip
        mine = _find(layer, kernel=kernel, mode=r["mode"], shape=r["shape"], dtype=r["dtype"],
                     pass_=r["pass_"])  # fmt: skip
        speed = f"{r['median_ms'] / mine['median_ms']:.2f}x" if mine and r is not mine else ""

        def f(v, spec):
            return "" if v is None else format(v, spec)

        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
        lines.append(
            f"| {r['mode']} | {r['shape']} | {r['dtype']} | {r['pass_']} | {r['kernel']} "
            f"| {r['median_ms']:.3f} | {f(r['gb_per_s'], '.1f')} "
            f"| {f(r['pct_copy_bandwidth'], '.1f')} | {f(r['saved_over_input'], '.3f')} "
            f"| {f(peak, '.1f')} | {speed} |"
        )
    iters = [r for r in rows if r["suite"] == "global-iters"]
    if iters:
        lines += ["", "## Global path against T", "", "| shape | pass | kernel | T | median ms |",
                  "| --- | --- | --- | ---: | ---: |"]  # fmt: skip
        for r in sorted(iters, key=lambda r: (r["pass_"], r["kernel"], r["iters"])):
            lines.append(f"| {r['shape']} | {r['pass_']} | {r['kernel']} | {r['iters']} "
                         f"| {r['median_ms']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="pytest-benchmark JSON files of bench_nmf.py")
    p.add_argument("--shape", default="2x32x128^3", help="the target shape (default %(default)s)")
    p.add_argument("--kernel", default="triton", help="the kernel under test (default triton)")
    p.add_argument("--json", type=Path, help="write the rows, environment and targets here")
    p.add_argument("--md", type=Path, help="write the markdown table here")
    a = p.parse_args(argv)
    rows, env = load(a.inputs)
    checks = targets(rows, a.shape, a.kernel)
    md = markdown(rows, env, checks, a.kernel)
    for path in (a.json, a.md):
        if path is not None and path.is_dir():
            p.error(f"{path} is a folder, not a file")
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(dict(environment=env, targets=checks, rows=rows), indent=1)
                          + "\n")  # fmt: skip
    if a.md is not None:
        a.md.parent.mkdir(parents=True, exist_ok=True)
        a.md.write_text(md)
    print(md if a.md is None else "\n".join(md.splitlines()[:14]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
