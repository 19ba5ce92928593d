"""Why the window kernels are slow, kernel by kernel, from Nsight Compute (issue 16).

    python3 bench/ncu_designs.py cases                   # the case keys (the GPU phase's list)
    python3 bench/ncu_designs.py run --case d2-s4-fp32   # under ncu (bench/gpu_session.sh ncu)
    python3 bench/ncu_designs.py summarize DIR --out DIR/summary.md     # anywhere, no GPU

Timings say how far a variant is from issue 16's targets, not why: the H200's one Nsight
Compute run (bench/results/h200_2026-12-04/ncu_four_tiles_fwd.txt) found design 3's forward
bound by latency (36.7 cycles between a warp's instructions, 40 % of them at CTA barriers, 16
warps an SM) where the static suite had predicted an issue bound. This script gives every
kernel of the code's choices that account in one GPU call.

``run``: one case (:data:`CASES`: a variant of bench/time_designs.py, its shift set and dtype)
at 2 x 32 x 128^3 (``--shape``), E = P = 8, T = 5: forward with grad + backward twice outside
the profiled range (the first call compiles), then once between cudaProfilerStart and Stop, so
that ``ncu --profile-from-start off`` profiles exactly the kernels of one training call. Off a
GPU (the tests, under ``TRITON_INTERPRET=1``) the same calls run unprofiled.

``summarize``: per case (``DIR/<case>.details.txt``, ncu's ``--page details`` text, and where
there is one ``DIR/<case>.raw.csv``, ``--page raw --csv``) and kernel: grid and block, registers,
duration, achieved warps an SM, cycles between a warp's instructions, the throughputs (SM,
L1/TEX, L2, DRAM; % of peak) and the stall reasons that cost the most (cycles per issued
instruction from the raw metrics, else the rule texts of the details page), and the memory
tables' rules on shared-memory bank conflicts and uncoalesced accesses where ncu printed any.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

# (variant of bench/time_designs.py, shift set, dtype), in the order the GPU phase profiles them:
# the code's choice for each shift set (design 2 for [None, 4], design 3 with four tiles for
# [None, 2, 4, 6]) in fp32, design 3 with [None, 4] (on the H200 it held a floor there that the
# BraTS shifts did not: bench/results/h200_2026-12-04/static_vs_time.md), the choices in bf16,
# then the latency candidates of design 3 (two programs of 8 warps an SM: kernels/DESIGNS.md)
# and design 2 on design 3's tiles
CASES = {
    "d2-s4-fp32": ("design 2", "[None, 4]", "fp32"),
    "d3-s246-fp32": ("design 3, four tiles", "[None, 2, 4, 6]", "fp32"),
    "d3-s4-fp32": ("design 3, four tiles", "[None, 4]", "fp32"),
    "d2-s4-bf16": ("design 2", "[None, 4]", "bf16"),
    "d3-s246-bf16": ("design 3, four tiles", "[None, 2, 4, 6]", "bf16"),
    "d3-2prog-s246-fp32": ("design 3, 8 warps, 2 programs/SM", "[None, 2, 4, 6]", "fp32"),
    "d2-tiles-s4-fp32": ("design 2, four tiles", "[None, 4]", "fp32"),
}

# the details page's metrics the summary shows: (column, metric name, unit)
DETAILS = (
    ("ms", "Duration", "ms"),
    ("regs", "Registers Per Thread", "register/thread"),
    ("warps/SM", "Achieved Active Warps Per SM", "warp"),
    ("cycles/issue", "Warp Cycles Per Issued Instruction", "cycle"),
    ("no eligible %", "No Eligible", "%"),  # cycles a scheduler had no warp ready to issue
    ("SM %", "Compute (SM) Throughput", "%"),
    ("L1/TEX %", "L1/TEX Cache Throughput", "%"),
    ("L2 %", "L2 Cache Throughput", "%"),
    ("DRAM %", "DRAM Throughput", "%"),
)
# ncu prints durations in the unit that suits them: to ms
_TIME_UNITS = {"ms": 1.0, "msecond": 1.0, "us": 1e-3, "usecond": 1e-3, "ns": 1e-6,
               "nsecond": 1e-6, "s": 1e3, "second": 1e3}  # fmt: skip
# a kernel's header line: its name (a demangled one may hold spaces and parentheses), grid, block
_KERNEL = re.compile(r"^  (\S.*?) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\), Context")
_METRIC = re.compile(r"^ {4}(\S.*?\S) {2,}(?:(\S+) +)?(-?[\d,]+(?:\.\d+)?)\s*$")
_STALL_RULE = re.compile(r"spends ([\d.]+) cycles being stalled (.+?)\. .*?This stall type "
                         r"represents about ([\d.]+)% of the total", re.S)  # fmt: skip
# the raw metrics of the stall reasons, by family in the order preferred: the warp states'
# cycles per issued instruction, else the source counters' samples (the reasons' shares)
_RAW_STALLS = (re.compile(r"issue_stalled_([a-z_]+?)_per_issue_active\.ratio$"),
               re.compile(r"^smsp__pcsamp_warps_issue_stalled_([a-z_]+)$"))  # fmt: skip
# the memory tables' rules on access patterns (wording of ncu's MemoryWorkloadAnalysis_Tables)
_BANK_RULE = re.compile(r"([\d.]+) ?- ?way bank conflicts? across all ([\d,]+) shared "
                        r"(load|store) requests", re.I)  # fmt: skip
_UNCOALESCED_RULE = re.compile(r"uncoalesced (global|shared) accesses resulting in a total of "
                               r"([\d,]+) excessive (?:sectors|wavefronts) \(([\d.]+)% of the "
                               r"total", re.I)  # fmt: skip


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse_details(text: str) -> list[dict]:
    """The kernels of an ``ncu --page details`` text, in launch order: name, grid, block, the
    metrics (name -> [(unit, value)], every section's) and the stall rules (what a warp waits
    for, cycles per instruction, % of the cycles between two instructions)."""
    kernels, current, prose = [], None, []
    for line in text.splitlines():
        m = _KERNEL.match(line)
        if m:
            current = dict(name=m[1], grid=tuple(int(v) for v in m.group(2, 3, 4)),
                           block=tuple(int(v) for v in m.group(5, 6, 7)), metrics={})
            prose = []
            kernels.append((current, prose))
            continue
        if current is None:
            continue
        m = _METRIC.match(line)
        if m:
            current["metrics"].setdefault(m[1], []).append((m[2] or "", _number(m[3])))
        elif line.startswith("    ") and not set(line.strip()) <= set("- "):
            prose.append(line.strip())  # the rules' text, wrapped over lines
    for kernel, lines in kernels:
        text = re.sub(r"\s+", " ", " ".join(lines))
        kernel.update(stalls=_stall_rules(text), access=_access_rules(text))
    return [kernel for kernel, _ in kernels]


def _stall_rules(prose: str) -> list[tuple[str, float, float]]:
    """(what the warps wait for, cycles, % of the cycles between two instructions) of each stall
    rule in a kernel's details text (the rules ncu prints for the stalls that cost the most)."""
    rules = []
    for m in _STALL_RULE.finditer(prose):
        what = re.sub(r"^(waiting (for |on )?|on )", "", m[2]).split(" (")[0]
        rules.append((what, float(m[1]), float(m[3])))
    return rules


def _access_rules(prose: str) -> list[str]:
    """Short forms of the memory tables' rules on bank conflicts and uncoalesced accesses."""
    out = [f"shared {m[3]}s {m[1]}-way" for m in _BANK_RULE.finditer(prose)]
    out += [f"uncoalesced {m[1]} {m[3]} %" for m in _UNCOALESCED_RULE.finditer(prose)]
    return list(dict.fromkeys(out))


def metric(kernel: dict, name: str, unit: str) -> float | None:
    """A details metric in ``unit`` (durations converted to it from ncu's choice), or None."""
    for u, value in kernel["metrics"].get(name, []):
        if u == unit:
            return value
        if unit == "ms" and u in _TIME_UNITS:
            return value * _TIME_UNITS[u]
    return None


def parse_raw(text: str) -> list[dict]:
    """The kernels of an ``ncu --page raw --csv`` export (a header row of metric names, a row
    of units, a row a kernel; lines before the header are ncu's own): name -> value strings."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), None)
    if start is None:
        return []
    rows = list(csv.reader(lines[start:]))
    header = rows[0]
    return [dict(zip(header, row, strict=False)) for row in rows[2:] if len(row) == len(header)]


def raw_stalls(row: dict, top: int = 3) -> list[tuple[str, float]]:
    """The ``top`` stall reasons of a raw row, largest first: cycles per issued instruction
    where the row has them, else the samples of each reason (the first family of
    :data:`_RAW_STALLS` with a readable value)."""
    for family in _RAW_STALLS:
        out = []
        for name, value in row.items():
            m = family.search(name)
            if m and not m[1].endswith("not_issued"):
                try:
                    out.append((m[1], _number(value)))
                except ValueError:
                    continue
        if out:
            return sorted(out, key=lambda kv: -kv[1])[:top]
    return []


def pair_raw(kernels: list[dict], raws: list[dict]) -> list[dict | None]:
    """Each details kernel's raw row: the next row, in launch order, whose "Kernel Name" is the
    kernel's (a kernel the raw export lacks, or one the details page lost, shifts no other);
    without names in the export, the row of the same place."""
    if not any("Kernel Name" in r for r in raws):
        return [raws[i] if i < len(raws) else None for i in range(len(kernels))]
    out, j = [], 0
    for k in kernels:
        nxt = next((i for i in range(j, len(raws))
                    if raws[i].get("Kernel Name", "").strip() == k["name"]), None)  # fmt: skip
        out.append(None if nxt is None else raws[nxt])
        j = j if nxt is None else nxt + 1
    return out


def _stall_text(kernel: dict, raw: dict | None) -> str:
    if raw:
        stalls = raw_stalls(raw)
        if stalls:
            return ", ".join(f"{what} {cycles:.1f}" for what, cycles in stalls)
    return ", ".join(f"{what}: {cycles:.1f} ({share:.0f} %)"
                     for what, cycles, share in kernel["stalls"]) or "-"  # fmt: skip


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def summarize(folder: Path) -> str:
    """The markdown table of every case in ``folder`` (module docstring)."""
    cols = [c for c, _, _ in DETAILS]
    lines = ["| case | kernel | grid x block | " + " | ".join(cols)
             + " | top stalls | access rules |",
             "|---|---|---|" + "---:|" * len(cols) + "---|---|"]  # fmt: skip
    totals = []
    details = sorted(folder.glob("*.details.txt"))
    if not details:
        raise SystemExit(f"ncu_designs.py: no <case>.details.txt in {folder}")
    for path in details:
        case = path.name[: -len(".details.txt")]
        kernels = parse_details(path.read_text(errors="replace"))
        raw_path = folder / f"{case}.raw.csv"
        raws = parse_raw(raw_path.read_text(errors="replace")) if raw_path.exists() else []
        if not kernels:
            lines.append(f"| {case} | (no kernel in the details page) |||" + "|" * (len(cols) + 1))
            continue
        for k, raw in zip(kernels, pair_raw(kernels, raws), strict=True):
            geo = f"{k['grid'][0]}x{k['grid'][1]}x{k['grid'][2]} x {k['block'][0]}"
            vals = " | ".join(_fmt(metric(k, name, unit)) for _, name, unit in DETAILS)
            access = ", ".join(k["access"]) or "-"
            lines.append(f"| {case} | {k['name']} | {geo} | {vals} | {_stall_text(k, raw)} "
                         f"| {access} |")  # fmt: skip
        ms = [metric(k, "Duration", "ms") or 0.0 for k in kernels]
        totals.append(f"- {case}: {len(kernels)} kernels, {sum(ms):.3f} ms together")
    return "\n".join(lines + ["", "Kernel time a case (ncu's replays, clocks not locked):", ""]
                     + totals) + "\n"  # fmt: skip


def run_case(key: str, shape) -> list[str]:
    """One training call of a case, profiled on a GPU (module docstring); returns the case's
    description (ncu names the kernels it launched)."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from time_designs import SHIFTS, VARIANTS, _inputs, _layer, _tuned

    variant, sname, dname = CASES[key]
    design, tuning = {name: (d, t) for name, d, t in VARIANTS}[variant]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, v0, dy = _inputs(shape, dname, dev)
    with _tuned(design, tuning):

        def call():
            xg = x.detach().requires_grad_()
            (g,) = torch.autograd.grad(_layer(xg, v0, SHIFTS[sname]), xg, dy)
            return g

        for _ in range(2):  # the first compiles
            call()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.profiler.start()
        g = call()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.profiler.stop()
    if not torch.isfinite(g.float()).all():
        raise SystemExit(f"ncu_designs.py: case {key}: the gradient is not finite")
    return [f"case {key}: {variant}, shifts {sname}, {dname}, shape {list(shape)}, on {dev}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cases", help="print the case keys, one a line")
    r = sub.add_parser("run", help="one case's training call, profiled (under ncu)")
    r.add_argument("--case", required=True, choices=list(CASES))
    r.add_argument("--shape", type=int, nargs=5, default=[2, 32, 128, 128, 128],
                   metavar=("B", "C", "D", "H", "W"))  # fmt: skip
    s = sub.add_parser("summarize", help="the table of DIR's <case>.details.txt / .raw.csv")
    s.add_argument("folder", type=Path)
    s.add_argument("--out", type=Path, help="markdown file (default: print)")
    args = ap.parse_args(argv)
    if args.cmd == "cases":
        print("\n".join(CASES))
    elif args.cmd == "run":
        print("\n".join(run_case(args.case, args.shape)), flush=True)
    else:
        if not args.folder.is_dir():
            ap.error(f"{args.folder} is not a folder")
        table = summarize(args.folder)
        if args.out:
            args.out.write_text(table)
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
