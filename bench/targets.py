"""The issue targets (issues 6 and 8), checked on the rows of a ``fastnmf profile`` run.

They belong to the benchmarks, not to the library: ``fastnmf.profile`` measures, this file judges.

    python bench/targets.py prof/meta.json     # print the targets of a finished run

``fastnmf.profile.write_report(rows, out, env, targets=targets)`` adds them to table.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _get(rows, **match) -> dict | None:
    """The first timed (status ok) row with these values."""
    for r in rows:
        if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked on whatever rows there are (lines of markdown)."""
    out = []
    layer = [r for r in rows if r["suite"] == "layer"]
    pairs = [
        ("nmf-swin", "sdpa-window", "swin NMF"),
        ("nmf-swin-layer", "sdpa-window-layer", "swin NMF layer (projections)"),
    ]
    for nmf, sdpa, name in pairs:
        kernel = "triton" if _get(layer, subject=nmf, impl="triton") else "torch"
        for r in layer:
            if (r["subject"], r["impl"], r["task"], r["status"]) != (nmf, kernel, "fwdbwd", "ok"):
                continue
            what = f"- {name} ({kernel}) vs {sdpa} flash, {r['shape']} {r['dtype']} fwd+bwd"
            att = _get(
                layer, subject=sdpa, impl="flash", shape=r["shape"], dtype=r["dtype"], task="fwdbwd"
            )
            if att is None:
                out.append(f"{what}: no flash row (backend unavailable)")
                continue
            t = att["median_ms"] / r["median_ms"]
            line = (
                f"{what}: time {r['median_ms']:.3g} vs {att['median_ms']:.3g} ms "
                f"(NMF {t:.2f}x as fast: {'met' if t > 1 else f'missed by {1 / t:.2f}x'})"
            )
            key = "peak_bytes" if r.get("peak_bytes") is not None else "saved_bytes"
            if r.get(key) and att.get(key):
                m = att[key] / r[key]
                line += (
                    f"; {key.split('_')[0]} memory {r[key] / 2**20:.1f} vs "
                    f"{att[key] / 2**20:.1f} MiB ({'met' if m > 1 else f'missed by {1 / m:.2f}x'})"
                )
            out.append(line)
    model = [r for r in rows if r["suite"] == "model" and r["task"] == "train"]
    for dtype in ("fp32", "bf16"):
        tri = _get(model, subject="swin_factorizer", impl="triton", dtype=dtype) or _get(
            model, subject="swin_factorizer", impl="torch", dtype=dtype
        )
        if tri is None:
            continue
        k = tri["impl"] + (", checkpointed" if tri.get("checkpoint") else "")
        ref = _get(model, subject="swin_factorizer", impl="reference", dtype=dtype)
        if ref:
            x = tri["per_s"] / ref["per_s"]
            out.append(
                f"- swin Factorizer train {tri['shape']} {dtype}: {k} {x:.2f}x the "
                f"throughput of reference (target >= 3x: "
                f"{'met' if x >= 3 else f'missed by {3 / x:.2f}x'})"
            )
        if tri.get("peak_bytes"):
            gb = tri["peak_bytes"] / 1e9
            out.append(
                f"- swin Factorizer train {tri['shape']} {dtype} ({k}): peak {gb:.2f} GB "
                f"(target <= 8 GB: {'met' if gb <= 8 else f'missed by {gb - 8:.2f} GB'})"
            )
        for other in ("swin_unetr", "nnunet"):
            o = _get(model, subject=other, dtype=dtype)
            if o is None:
                continue
            line = (
                f"- swin Factorizer ({k}) vs {other}, train {tri['shape']} {dtype}: "
                f"{tri['median_ms']:.3g} vs {o['median_ms']:.3g} ms "
                f"({'faster' if tri['median_ms'] < o['median_ms'] else 'slower'})"
            )
            if tri.get("peak_bytes") and o.get("peak_bytes"):
                line += (
                    f", peak {tri['peak_bytes'] / 2**30:.2f} vs "
                    f"{o['peak_bytes'] / 2**30:.2f} GiB "
                    f"({'leaner' if tri['peak_bytes'] < o['peak_bytes'] else 'heavier'})"
                )
            out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("meta", type=Path, help="meta.json written by `fastnmf profile`")
    a = p.parse_args(argv)
    rows = json.loads(a.meta.read_text())["rows"]
    for line in targets(rows):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
