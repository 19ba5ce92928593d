"""The report of a profile run: table.csv, table.md, meta.json and plots."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path

from .layer_suite import PASSES

COLUMNS = [
    "suite", "id", "subject", "impl", "scope", "shape", "size", "channels", "batch", "dtype",
    "task", "status", "median_ms", "per_s", "peak_bytes", "saved_bytes", "input_bytes",
    "gb_per_s", "pct_copy_bandwidth", "params", "gflops", "device", "reason",
]  # fmt: skip


def _fmt(v, digits: int = 3) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _mib(v) -> str:
    return "" if v is None or v == "" else f"{v / 2**20:.1f}"


def _md_table(header: list[str], left: int, rows: list[dict], cells) -> list[str]:
    """A markdown table: ``header`` columns (the first ``left`` descriptive ones left-aligned,
    the measured ones right-aligned, the status last), one line per row with the cells of
    ``cells(row, ok)`` and the row's status."""
    align = ["---"] * left + ["---:"] * (len(header) - left - 1) + ["---"]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        ok = r["status"] == "ok"
        status = r["status"] if ok else r["status"] + ": " + r["reason"]
        out.append("| " + " | ".join([*cells(r, ok), status]) + " |")
    return out


def _layer_md(rows: list[dict]) -> list[str]:
    header = ["mixer", "impl", "scope", "shape", "dtype", "pass", "median ms", "Mvoxel/s"]
    header += ["peak MiB", "saved MiB", "% copy BW", "status"]

    def cells(r, ok):
        return [
            r["subject"], r["impl"], r["scope"], r["shape"], r["dtype"],
            "fwd+bwd" if r["task"] == "fwdbwd" else r["task"],
            _fmt(r.get("median_ms")) if ok else "", _fmt(r["per_s"] / 1e6) if ok else "",
            _mib(r.get("peak_bytes")), _mib(r.get("saved_bytes")),
            _fmt(r.get("pct_copy_bandwidth")),
        ]  # fmt: skip

    return _md_table(header, 6, rows, cells)


def _model_md(rows: list[dict]) -> list[str]:
    header = ["model", "kernel", "task", "shape", "dtype", "time ms", "samples/s", "peak MiB"]
    header += ["params M", "GFLOPs", "status"]

    def cells(r, ok):
        return [
            r["subject"], r["impl"] + (" + checkpointing" if r.get("checkpoint") else "")
            + (f" + compile ({r['compile']})" if r.get("compile", "none") != "none" else ""),
            r["task"], r["shape"], r["dtype"],
            _fmt(r.get("median_ms")) if ok else "", _fmt(r.get("per_s")) if ok else "",
            _mib(r.get("peak_bytes")), _fmt(r["params"] / 1e6, 4) if r.get("params") else "",
            _fmt(r.get("gflops"), 4),
        ]  # fmt: skip

    return _md_table(header, 5, rows, cells)


def _slope(xs, ys) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def _plot_layers(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # the resolution series: the most common channel count among the rows (C = 32)
    chans = [r["channels"] for r in rows]
    if not chans:
        return written
    c0 = max(set(chans), key=chans.count)
    series = [r for r in rows if r["channels"] == c0 and r["status"] == "ok"]
    dtypes = sorted({r["dtype"] for r in series})
    passes = [p for p in PASSES if any(r["task"] == p for r in series)]

    def lines(metric, ax, keep=lambda r: True):
        keys = sorted({(r["subject"], r["impl"]) for r in series if keep(r)})
        colors = plt.get_cmap("tab20").colors
        for i, (subject, impl) in enumerate(keys):
            pts = sorted(
                (r["size"] ** 3 * r["batch"], r[metric])
                for r in series
                if (r["subject"], r["impl"]) == (subject, impl) and keep(r) and r.get(metric)
            )
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            k = _slope(xs, ys)
            label = f"{subject} {impl}" + (f" (slope {k:.2f})" if k is not None else "")
            style = "-" if subject.startswith("nmf") else "--"
            ax.plot(xs, ys, style, marker="o", ms=3, label=label, color=colors[i % 20])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("voxels (B x S^3)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)

    for metric, name, ylabel in (
        ("median_ms", "layer_time.png", "median time (ms)"),
        (
            "peak_bytes" if any(r.get("peak_bytes") for r in series) else "saved_bytes",
            "layer_memory.png",
            None,
        ),
    ):
        cols = passes if metric == "median_ms" else ["fwdbwd"]
        if metric == "saved_bytes":
            ylabel = "memory kept for backward (bytes)"
        elif metric == "peak_bytes":
            ylabel = "peak memory above input (bytes)"
        fig, axes = plt.subplots(
            len(dtypes), len(cols), figsize=(7 * len(cols), 5 * len(dtypes)), squeeze=False
        )
        for i, dt in enumerate(dtypes):
            for j, p in enumerate(cols):
                ax = axes[i][j]
                lines(metric, ax, lambda r, dt=dt, p=p: r["dtype"] == dt and r["task"] == p)
                ax.set_title(f"C={c0}, {dt}, {'fwd+bwd' if p == 'fwdbwd' else p}")
                ax.set_ylabel(ylabel)
        fig.suptitle(f"context mixers vs resolution ({rows[0]['device']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    bw = [r for r in rows if r["status"] == "ok" and r.get("pct_copy_bandwidth") is not None]
    if bw:
        fig, axes = plt.subplots(1, len(passes), figsize=(7 * len(passes), 5), squeeze=False)
        for j, p in enumerate(passes):
            ax = axes[0][j]
            keys = sorted({(r["subject"], r["impl"], r["dtype"]) for r in bw if r["task"] == p})
            for subject, impl, dt in keys:
                pts = sorted(
                    (r["batch"] * r["channels"] * r["size"] ** 3, r["pct_copy_bandwidth"])
                    for r in bw
                    if (r["subject"], r["impl"], r["dtype"], r["task"]) == (subject, impl, dt, p)
                )
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", ms=3, label=f"{subject} {impl} {dt}")
            ax.set_xscale("log")
            ax.set_xlabel("input elements (B x C x S^3)")
            ax.set_ylabel("% of device copy bandwidth")
            ax.set_title(f"NMF core, {'fwd+bwd' if p == 'fwdbwd' else p}")
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "nmf_bandwidth.png", dpi=110)
        plt.close(fig)
        written.append(out / "nmf_bandwidth.png")
    return written


def _plot_models(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    written = []
    metrics = [("per_s", "model_throughput.png", "samples/s (train: patches, infer: volumes)")]
    if any(r.get("peak_bytes") for r in ok):
        metrics.append(("peak_bytes", "model_memory.png", "peak memory (GiB)"))
    groups = sorted({(r["task"], r["dtype"]) for r in ok}, key=lambda g: (g[0] != "train", g))
    for metric, name, xlabel in metrics:
        fig, axes = plt.subplots(
            1, len(groups), figsize=(6 * len(groups), 0.35 * len(ok) + 2.5), squeeze=False
        )
        for j, (task, dt) in enumerate(groups):
            ax = axes[0][j]
            sel = [r for r in ok if (r["task"], r["dtype"]) == (task, dt) and r.get(metric)]
            labels = [r["subject"] + ("" if r["impl"] == "-" else f" ({r['impl']})") for r in sel]
            vals = [r[metric] / (2**30 if metric == "peak_bytes" else 1) for r in sel]
            colors = [
                "tab:blue" if r["subject"].endswith("factorizer") else "tab:gray" for r in sel
            ]
            ax.barh(range(len(sel)), vals, color=colors)
            ax.set_yticks(range(len(sel)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(xlabel)
            ax.set_title(f"{task} {sel[0]['shape'] if sel else ''} {dt}", fontsize=9)
            ax.grid(True, axis="x", alpha=0.3)
        fig.suptitle(f"models ({rows[0]['device']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


def write_report(
    rows: list[dict],
    out: str | Path,
    env: dict,
    *,
    targets: Callable[[list[dict]], list[str]] | None = None,
) -> list[Path]:
    """table.csv, table.md, meta.json and the PNG plots under ``out``; returns the paths.

    ``targets``: a function of the rows giving markdown lines (e.g. ``bench/targets.py``'s
    issue targets) for a "Targets" section; None leaves the section out.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    (out / "meta.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    md = [
        "# fastnmf profile",
        "",
        f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}; fastnmf {env['fastnmf']} at commit {env['commit']}"
        + (" (with local changes)" if env.get("dirty") else "")
        + f"; {env['time']}",
        "",
    ]
    layer = [r for r in rows if r["suite"] == "layer"]
    model = [r for r in rows if r["suite"] == "model"]
    if layer:
        md += [
            "## Layer suite",
            "",
            "Context mixers at equal input (B, C, *S), head dim E = 8, window 8^3; scope core = "
            "the mixing core alone (NMF: ReLU + matricize + rank-one NMF, T = 5 + dematricize; "
            "SDPA: q = k = v = windowed heads), layer = with the projections. peak = above the "
            "memory allocated before the call; saved = memory kept for backward.",
            "",
            *_layer_md(layer),
            "",
        ]
    if model:
        md += [
            "## Model suite",
            "",
            "train = forward + deep-supervision BCE + backward + AdamW step; infer = sliding "
            "window (50 % overlap, gaussian) over one volume. peak = absolute. FLOPs: forward "
            "at batch 1, NMF as the literal loop.",
            "",
            *_model_md(model),
            "",
        ]
    tg = targets(rows) if targets is not None else []
    if tg:
        md += ["## Targets", "", *tg, ""]
    (out / "table.md").write_text("\n".join(md))
    written = [out / "table.md", out / "table.csv", out / "meta.json"]
    if layer:
        written += _plot_layers(layer, out)
    if model:
        written += _plot_models(model, out)
    return written
