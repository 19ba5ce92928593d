"""``fastnmf profile --suite static``: the kernel report, traffic and training-step account, written
to ``static.json`` and ``static.md``. Runs without a GPU; times nothing.

Parts:

- ``kernels`` (:mod:`.kernel_report`): every Triton launch compiled for each target;
- ``traffic`` (:mod:`.traffic`): bytes, sectors and a DRAM estimate of the same launches, joined
  to the kernel rows on (case, pass, launch_index);
- ``steps`` (:mod:`.step_account`): one training step of each model of the registry.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import subprocess
from pathlib import Path

from .cases import DESIGNS, PASSES, StaticCase, benchmark_cases, ideal_bytes
from .driver import TARGETS, check_target
from .report_md import static_markdown

__all__ = ["PARTS", "run_static", "static_cases"]

PARTS = ("kernels", "traffic", "steps")
# traffic fields summed per call (absent when the traffic part did not run)
TRAFFIC_FIELDS = ("bytes_loaded", "bytes_stored", "unique_bytes", "sectors", "dram_estimate_bytes")
_SUMMED = ("programs", "spill_bytes") + TRAFFIC_FIELDS


def static_cases(*, quick: bool = False, only=(), designs=("auto",)) -> list[StaticCase]:
    """The suite's cases: every benchmark case, or (quick) rank one fp32 at 2x32x128^3; each
    rank-one window case once per window design of ``designs`` (1, 2, 3: the kernels of
    kernels/window_nmf.py, window_nmf2.py, window_nmf3.py; "auto", the default: the design the
    layer runs for the case's shifts, ``fastnmf.kernels.window_design``), a case two of them
    give once; ``only`` keeps the cases whose id contains every given text."""
    bad = [d for d in designs if d not in DESIGNS and d != "auto"]
    if bad or not designs:
        raise ValueError(f"designs must be a non-empty subset of {DESIGNS} and 'auto', got "
                         f"{list(designs)}")  # fmt: skip
    cases = benchmark_cases(ranks=(1,), dtypes=("fp32",)) if quick else benchmark_cases()
    if quick:
        cases = [c for c in cases if c.shape == cases[0].shape]
    chosen = []
    for c in cases:
        if not (c.mode == "window" and c.rank == 1):
            chosen.append(c)  # one design only
            continue
        for d in designs:
            design = _window_design(c.shifts) if d == "auto" else d
            chosen.append(dataclasses.replace(c, design=design))
    cases = list({c.id: c for c in chosen}.values())  # in order, each case once
    cases = [c for c in cases if all(text in c.id for text in only)]
    if not cases:
        raise ValueError(f"no static case id contains all of {list(only)}")
    return cases


def _window_design(shifts) -> int:
    """The design the layer runs for ``shifts`` (the kernels' own rule)."""
    from fastnmf.kernels import window_design

    return window_design(shifts)


def _check_parts(parts) -> tuple[str, ...]:
    parts = tuple(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts}")
    return parts


def run_static(*, targets=("sm_90a", "sm_80"), out, parts=PARTS, quick: bool = False,
               only=(), designs=("auto",), cases=None, progress=None) -> dict:  # fmt: skip
    """Run the static suite for ``targets`` and write ``out/static.json`` and ``out/static.md``.

    Args:
        targets: GPU targets ("sm_90a", "sm_80") the kernels are compiled for.
        out: output folder (created; the two files are overwritten).
        parts: any of "kernels", "traffic", "steps" ("kernels" of a whole report, neither
            ``only`` nor ``cases`` given, also compiles the fused glue kernels: ``doc["glue"]``).
        quick: fewer cases (rank one, fp32, 2x32x128^3).
        only: keep the cases whose id contains every given text.
        designs: window designs of the rank-one window cases (see :func:`static_cases`).
        cases: explicit list of :class:`StaticCase` (overrides ``quick`` and ``only``).
        progress: callable taking a line of text (None: silent).

    Returns:
        The JSON document written (meta, launches, calls, steps, notes).
    """
    targets = tuple(targets)
    for target in targets:
        check_target(target)
    parts = _check_parts(parts)
    whole = cases is None and not only  # a whole report, not a selection of NMF cases
    cases = list(cases) if cases is not None else static_cases(quick=quick, only=only,
                                                               designs=designs)  # fmt: skip
    say = progress or (lambda line: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": _meta(targets, parts, quick, cases), "launches": [], "calls": [], "steps": [],
           "notes": []}  # fmt: skip
    launches, kernel_calls = [], []
    if "kernels" in parts:
        from .kernel_report import kernel_report

        say(f"kernels: {len(cases)} case(s) x {len(targets)} target(s), compiling ...")
        report = kernel_report(cases, targets=targets)
        launches, kernel_calls = report["launches"], report["calls"]
        if whole:
            from .glue_report import glue_report

            say("kernels: the fused glue kernels, compiling ...")
            doc["glue"] = glue_report(targets)
    traffic_calls = []
    if "traffic" in parts:
        say("traffic: counting bytes ...")
        launches, traffic_calls = _with_traffic(cases, targets, launches, doc["notes"])
        from .pipeline_dram import smaller_l2_notes

        doc["notes"] += smaller_l2_notes(cases, targets)
    doc["launches"] = launches
    doc["calls"] = _call_rows(cases, targets, launches, kernel_calls, traffic_calls)
    if "steps" in parts:
        say("steps: accounting training steps ...")
        from . import step_account

        doc["steps"] = step_account.account_steps(quick=quick)
    _write(doc, out, parts, traffic_calls)
    say(f"written to {out}/: static.json, static.md")
    return doc


def _with_traffic(cases, targets, launches, notes) -> tuple[list[dict], list[dict]]:
    """Join the traffic part's per-launch rows onto the kernel rows (or use them alone)."""
    from . import traffic

    joined, calls = [], []
    kernel_rows = {(r["target"], r["case"], r["pass"], r["launch_index"]): r for r in launches}
    for target in targets:
        rows = []
        for resident, group in _by_occupancy(cases, target, launches):
            rows += traffic.launch_rows(group, target=target, resident=resident)
        calls += [dict(c, target=target) for c in traffic.call_rows(rows)]
        triton_index: dict = {}  # the kernel report numbers Triton launches only
        for t in rows:
            case = t.get("case", t.get("case_id"))
            k = None
            if t.get("kind", "triton") != "torch":
                i = triton_index[case, t["pass"]] = triton_index.get((case, t["pass"]), -1) + 1
                key = (target, case, t["pass"], i)
                k = kernel_rows.pop(key, None)
            if k is not None and t.get("kernel") not in (None, k["kernel"]):
                notes.append(f"{key}: kernel report launched {k['kernel']}, traffic counted "
                             f"{t['kernel']}; rows kept apart")  # fmt: skip
                joined.append(k)
                k = None
            if k is not None and t.get("grid") is not None and list(t["grid"]) != list(k["grid"]):
                notes.append(f"{key}: grid {k['grid']} compiled, {t['grid']} counted")
            merged = dict(k or {}, **{f: v for f, v in t.items() if k is None or f not in k})
            merged.update(case=case, target=target)
            joined.append(merged)
    joined += kernel_rows.values()  # kernel launches the traffic part did not count
    if launches and kernel_rows:
        notes.append(f"{len(kernel_rows)} compiled launch(es) have no traffic row")
    return joined, calls


def _by_occupancy(cases, target, launches) -> list[tuple[dict, list[StaticCase]]]:
    """Cases grouped by the resident programs per SM of their kernels (from the kernel report),
    which set the wave order of the traffic part's DRAM estimate; without kernel rows the
    traffic part's own defaults apply (resident None)."""
    groups: dict = {}
    for case in cases:
        resident = {r["kernel"]: max(1, r["resident_warps_per_sm"] // r["warps"])
                    for r in launches if r["target"] == target and r["case"] == case.id
                    and r.get("resident_warps_per_sm")}  # fmt: skip
        key = tuple(sorted(resident.items()))
        groups.setdefault(key, []).append(case)
    return [(dict(key) or None, group) for key, group in groups.items()]


def _call_rows(cases, targets, launches, kernel_calls, traffic_calls) -> list[dict]:
    """Per call (fwd, bwd) and fwd+bwd: launch sums, copies, torch ops and the ideal bytes."""
    by_key: dict = {}
    for row in launches:
        by_key.setdefault((row["target"], row["case"], row["pass"]), []).append(row)
    extra = {(c["target"], c["case"], c["pass"]): c for c in kernel_calls}
    for c in traffic_calls:
        key = (c["target"], c.get("case", c.get("case_id")), c["pass"])
        extra.setdefault(key, {}).update({k: v for k, v in c.items() if k not in extra[key]})
    rows = []
    for target in targets:
        for case in cases:
            per_pass = [_one_call(case, target, p, by_key, extra) for p in PASSES]
            rows += per_pass
            rows.append(_sum_calls(case, target, per_pass))
    return rows


def _one_call(case: StaticCase, target: str, pass_: str, by_key, extra) -> dict:
    launches = by_key.get((target, case.id, pass_), [])
    info = extra.get((target, case.id, pass_), {})
    row = {"case": case.id, "target": target, "pass": pass_, "mode": case.mode,
           "shifts": case.shift_name, "dtype": case.dtype, "rank": case.rank,
           "ideal_bytes": ideal_bytes(case, pass_)}  # fmt: skip
    row.update({k: v for k, v in info.items() if k not in row})
    row["launches"] = info.get("launches", len(launches))
    for field in _SUMMED:
        values = [r[field] for r in launches if r.get(field) is not None]
        if values:
            row[field] = sum(values)
    return row


def _sum_calls(case: StaticCase, target: str, calls: list[dict]) -> dict:
    row = {k: calls[0][k] for k in ("case", "target", "mode", "shifts", "dtype", "rank")}
    row["pass"] = "fwd+bwd"
    for field in ("ideal_bytes", "launches", "host_device_copies", "host_device_copy_bytes",
                  "torch_ops", *_SUMMED):  # fmt: skip
        values = [c[field] for c in calls if isinstance(c.get(field), (int, float))]
        if values:
            row[field] = sum(values)
    unsupported = [f"{c['pass']}: {c['unsupported']}" for c in calls if c.get("unsupported")]
    row["unsupported"] = "; ".join(unsupported) or None
    return row


def _meta(targets, parts, quick, cases) -> dict:
    import torch
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None  # fmt: skip
    except OSError:
        commit = None
    return {
        "suite": "static", "targets": list(targets), "parts": list(parts), "quick": quick,
        "cases": [c.id for c in cases],
        "sm_count": {t: TARGETS[t][1] for t in targets},
        "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "commit": commit,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def _write(doc: dict, out: Path, parts, traffic_calls) -> None:
    lines = static_markdown(doc)
    if doc.get("glue"):
        from .glue_report import glue_markdown

        lines += ["", *glue_markdown(doc["glue"])]
    if "traffic" in parts:
        from . import traffic

        lines += ["", *traffic.markdown(traffic_calls)]
    if "steps" in parts:
        from . import step_account

        lines += ["", *step_account.steps_markdown(doc["steps"])]
    (out / "static.json").write_text(_json_rows(doc))
    (out / "static.md").write_text("\n".join(lines) + "\n")


def _json_rows(doc: dict) -> str:
    """JSON with one line per row of each list (readable, diffable, a third of indent=1)."""
    parts = []
    for key, value in doc.items():
        if isinstance(value, list):
            rows = ",\n  ".join(json.dumps(row, default=str) for row in value)
            text = f"[\n  {rows}\n ]" if value else "[]"
        else:
            text = json.dumps(value, default=str)
        parts.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"
