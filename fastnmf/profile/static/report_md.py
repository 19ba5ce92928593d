"""Markdown of the static suite's kernel part: header, kernel table, launches per call, the meaning
of every column and what the figures cannot tell."""

from __future__ import annotations

import json

__all__ = ["static_markdown"]

_MEANINGS = [
    "- **target**: the GPU the kernels were compiled for: sm_90a (H100/H200, 132 SMs), sm_80 "
    "(A100, 108 SMs); compiled by Triton on this machine through a stub driver, with the launch "
    "geometry (grid, warps, block sizes) the launchers choose on a GPU.",
    "- **warps**: warps per program (block). **regs**: registers per thread, from `ptxas -v` "
    "(the ptxas Triton uses for the target, with Triton's flags). **spill B**: spill stores + "
    "spill loads in bytes per thread (0 = no local-memory traffic from register pressure). "
    "**smem B**: shared memory per program (Triton's allocation + static).",
    "- **warps/SM**: resident warps per SM of 64, as CUDA's occupancy calculator "
    "(cuda_occupancy.h) computes them from registers (64K per SM in 4 sub-partitions, "
    "allocated per warp in units of 256), warps (64), blocks (32) and shared memory (228 KB "
    "sm_90, 164 KB sm_80; 1 KB reserved per block, 128-byte units); **limited by** names the "
    "binding limit.",
    "- **LDG / STG**: global load / store instructions in the SASS by width in bits "
    "(`32:43` = 43 32-bit instructions), counted once each: a loop body counts once however "
    "often it runs. **SHFL**: warp shuffles in the SASS. **div**: 32-bit integer "
    "division sequences in the SASS (`I2F.RP` + `MUFU.RCP`: one per runtime divisor, shared by "
    "the divisions and remainders by it) / integer div + rem instructions in the PTX.",
    "- **programs**: grid size; **waves**: programs / (resident programs per SM x SMs).",
    "- **H→D**: tensors built on the host from Python data per call (a host-to-device copy on a "
    "GPU, e.g. a table made with `torch.tensor`). **torch ops**: other PyTorch ops of the call "
    "that launch a device kernel on a GPU (fills, reductions, copies, elementwise).",
]
_CANNOT_TELL = [
    "- No timing: nothing here ran on a GPU. Registers, spills and occupancy bound what a "
    "kernel can do; they do not say how fast it is.",
    "- Instruction counts are static (per instruction in the binary), not executed counts; "
    "a load in a loop of 4 iterations counts once.",
    "- Occupancy is the theoretical residency; achieved occupancy, tail effects, cache hit "
    "rates, memory-level parallelism and scheduling stalls need a profiler on a GPU.",
    "- The kernels were compiled by the Triton installed here; a GPU machine with another "
    "Triton (e.g. 3.6) or CUDA driver may compile them differently.",
    "- Meta tensors stand in for the data: the compile specialises on argument alignment "
    "(assumed 16-byte aligned, as fresh CUDA allocations are) and on integer values, not on data.",
]


def _widths(counts: dict) -> str:
    return " ".join(f"{k}:{v}" for k, v in counts.items()) or "-"


def _waves(value) -> str:
    if value is None:
        return "-"
    return "<0.01" if value < 0.01 else f"{value:.2f}"


def _kernel_table(launches: list[dict]) -> list[str]:
    """One row per distinct compiled kernel (target, kernel, specialisation, warps)."""
    groups: dict = {}
    for r in launches:
        if "regs" not in r:
            continue
        key = (r["target"], r["kernel"], r["dtype"], json.dumps(r["constexprs"], sort_keys=True),
               r["warps"])  # fmt: skip
        groups.setdefault(key, []).append(r)
    lines = [
        "| target | kernel | dtype | constexprs | warps | regs | spill B | smem B | warps/SM | "
        "limited by | LDG | STG | SHFL | div (SASS / PTX) | launches |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (target, kernel, dtype, constexprs, warps), rows in groups.items():
        r = rows[0]
        spec = ", ".join(f"{k}={v}" for k, v in json.loads(constexprs).items())
        lines.append(
            f"| {target} | {kernel} | {dtype} | {spec} | {warps} | {r['regs']} | "
            f"{r['spill_bytes']} | {r['smem_bytes']} | {r['resident_warps_per_sm']} | "
            f"{r['occupancy_limited_by']} | {_loads(r)} | "
            f"{_widths(r['stg_by_width'])} | {r['shfl']} | {r['int_div_seqs']} / "
            f"{r['ptx_int_div']} | {len(rows)} |"
        )
    return lines


def _loads(r: dict) -> str:
    """The LDG column: plain loads by width, then any cp.async copies (a pipelined loop's)."""
    copies = r.get("ldgsts_by_width")  # absent from reports made before 2026-12-06
    text = _widths(r["ldg_by_width"])
    return f"{text}; cp.async {_widths(copies)}" if copies else text


def _call_table(doc: dict) -> list[str]:
    by_call: dict = {}
    for r in doc["launches"]:
        by_call.setdefault((r["target"], r["case"], r["pass"]), []).append(r)
    lines = [
        "| target | case | pass | launches: kernel [grid] warps, waves | H→D | torch ops |",
        "|---|---|---|---|---|---|",
    ]
    for c in doc["calls"]:
        if c["pass"] == "fwd+bwd":
            continue
        rows = sorted(by_call.get((c["target"], c["case"], c["pass"]), []),
                      key=lambda r: r["launch_index"])  # fmt: skip
        if c.get("unsupported"):
            what = f"unsupported: {c['unsupported'].split(';')[0][:90]}"
        else:
            what = "; ".join(
                f"{r['launch_index']}: {r.get('kernel', '?')} {r.get('grid', '?')} "
                f"{r.get('warps', '?')}w, "
                f"{_waves(r.get('waves'))}" for r in rows
            )  # fmt: skip
        ops = c.get("torch_op_detail") or {}
        op_text = ", ".join(f"{k.removeprefix('aten.')} {v}" for k, v in ops.items()) or "-"
        lines.append(f"| {c['target']} | {c['case']} | {c['pass']} | {what} | "
                     f"{c.get('host_device_copies', '-')} | {op_text} |")  # fmt: skip
    return lines


def static_markdown(doc: dict) -> list[str]:
    """The markdown lines of the kernel part (plus header, meanings and limits)."""
    meta = doc["meta"]
    lines = [
        "# Static performance report (no GPU)",
        "",
        f"Commit {(meta.get('commit') or '?')[:10]}, Triton {meta['triton']}, torch "
        f"{meta['torch']}, created {meta['created']}; targets {', '.join(meta['targets'])}; "
        f"parts {', '.join(meta['parts'])}; {len(meta['cases'])} case(s)"
        f"{' (quick)' if meta['quick'] else ''}. Nothing in this report was timed.",
        "",
        "Cases: one call of `fastnmf.matricized_nmf(..., kernel='triton')`, forward (training "
        "forward: input requires grad; inference where no backward exists) and backward, at "
        "E = 8, P = 8, T = 5. Launches are numbered 0, 1, ... within each call.",
    ]
    if doc["launches"] and any("regs" in r for r in doc["launches"]):
        lines += ["", "## Kernels", "", "One row per distinct compiled kernel; `launches` counts "
                  "the launches of all cases that ran it.", "", *_kernel_table(doc["launches"])]
        lines += ["", "## Launches per call", "", *_call_table(doc)]
    if doc.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in doc["notes"]]]
    lines += ["", "## What the columns mean", "", *_MEANINGS]
    lines += ["", "## What these figures cannot tell", "", *_CANNOT_TELL]
    return lines
