"""Running a whole suite (layer or model) case by case."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .layer_suite import layer_cases, layer_row, run_layer_case
from .model_suite import model_cases, model_row, run_model_case
from .runner import row_base
from .timing import pick_device


def run_suite(
    suite: str,
    device=None,
    *,
    repeats: int | None = None,
    only: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
    keep_going: bool = True,
    **case_options,
) -> list[dict]:
    """Run every case of ``suite`` ("layer" | "model") whose id contains all of ``only``.

    A case that cannot run here gives a row with status ``unsupported``; one that fails with
    ``keep_going`` a row with status ``error`` (both with the reason)."""
    dev = pick_device(device)
    if suite == "layer":
        cases, runner = layer_cases(dev, **case_options), run_layer_case
        reps = repeats or (10 if dev.type == "cuda" else 2)
    elif suite == "model":
        cases, runner = model_cases(dev, **case_options), run_model_case
        reps = repeats or (5 if dev.type == "cuda" else 2)
        case_options.setdefault("tiny", None)
    else:
        raise ValueError(f"unknown suite {suite!r}; valid: layer, model")
    cases = [c for c in cases if all(o in c.id for o in only)]
    rows = []
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        try:
            row = runner(case, dev, repeats=reps)
        except Exception as err:  # one broken case must not lose a long GPU run: a row says why
            if not keep_going:
                raise
            base = row_base(suite, case.id, dev)
            info = layer_row(case) if suite == "layer" else model_row(case)
            msg = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            row = base | info | {"status": "error", "reason": msg}
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        if progress:
            what = f"{row['median_ms']:.2f} ms" if row["status"] == "ok" else row["reason"]
            progress(f"[{i + 1}/{len(cases)}] {case.id}: {what} ({time.perf_counter() - t0:.1f} s)")
    return rows
