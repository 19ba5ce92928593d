"""Kernel report: every Triton kernel the NMF layer launches, compiled for sm_90a / sm_80 with the
launch configuration a GPU would use at the benchmark shapes.

Per launch (numbered 0, 1, ... within its call, forward and backward separately): grid, warps,
registers, spill bytes, shared memory, resident warps per SM, and from the SASS the global
load/store instructions by width, SHFL and integer-division sequences. Per call: the launches,
host->device copies and the other PyTorch ops that would launch device kernels.

The kernels are captured by running the real launchers (``fastnmf.matricized_nmf(...,
kernel="triton")``, forward and backward) on meta tensors under the stub driver
(:mod:`.capture`, :mod:`.driver`); that needs a process that compiles rather than interprets, so
where this process runs Triton's interpreter (tests set ``TRITON_INTERPRET=1``)
:func:`kernel_report` starts ``python -m fastnmf.profile.static.kernel_report`` without it.
Compiled kernels are cached by Triton (on disk) and their ptxas / SASS figures per process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from .cases import StaticCase, benchmark_cases, case_from_json, case_to_json
from .driver import TARGETS, check_target
from .ptx_tools import missing_tools, occupancy, ptx_counts, ptxas_info, sass_counts

__all__ = ["kernel_rows", "kernel_report", "DEFAULT_TARGETS", "LAUNCH_FIELDS"]

DEFAULT_TARGETS = ("sm_90a", "sm_80")
# the fields of every launch row (the SASS/PTX counts follow them)
LAUNCH_FIELDS = (
    "case", "kernel", "mode", "shifts", "dtype", "rank", "shape", "pass", "launch_index",
    "target", "forward_mode", "grid", "programs", "warps", "stages", "constexprs", "regs",
    "spill_bytes", "spill_store_bytes", "spill_load_bytes", "stack_bytes", "smem_bytes",
    "blocks_per_sm", "resident_warps_per_sm", "occupancy_limited_by", "waves",
)  # fmt: skip


def kernel_rows(cases=None, *, targets=DEFAULT_TARGETS) -> list[dict]:
    """One row per Triton launch of each case (default: every benchmark case) and target."""
    return kernel_report(cases, targets=targets)["launches"]


def kernel_report(cases=None, *, targets=DEFAULT_TARGETS) -> dict:
    """{"launches": per-launch rows, "calls": per-call rows} for ``cases`` and ``targets``."""
    cases = benchmark_cases() if cases is None else list(cases)
    targets = tuple(targets)
    for target in targets:
        check_target(target)
    problems = missing_tools(targets)
    if problems:
        raise FileNotFoundError("; ".join(problems))
    if _compiling_here():
        return _report(cases, targets)
    return _report_in_subprocess(cases, targets)


def _compiling_here() -> bool:
    """True where this process compiles Triton kernels with the GPU's launch geometry."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    window = sys.modules.get("fastnmf.kernels.window_nmf")
    return window is None or not window.INTERPRET


def _report(cases, targets) -> dict:
    from .capture import capture_case

    launches, calls = [], []
    for target in targets:
        for case in cases:
            for record in capture_case(case, target=target).values():
                calls.append(_call_row(case, target, record))
                for index, launch in enumerate(record.launches):
                    launches.append(_launch_row(case, target, record, index, launch))
    return {"launches": launches, "calls": calls}


def _case_fields(case: StaticCase) -> dict:
    return {
        "case": case.id, "mode": case.mode, "shifts": case.shift_name, "dtype": case.dtype,
        "rank": case.rank, "shape": list(case.shape),
    }  # fmt: skip


def _launch_row(case: StaticCase, target: str, record, index: int, launch) -> dict:
    compiled = launch.compiled
    meta = compiled.metadata
    ptx = compiled.asm["ptx"]
    info = ptxas_info(ptx, target, fp_fusion=meta.enable_fp_fusion, ptx_options=meta.ptx_options)
    smem = launch.shared + info["static_smem_bytes"]
    occ = occupancy(regs=info["regs"], warps=launch.num_warps, smem=smem, target=target)
    per_wave = occ["blocks_per_sm"] * TARGETS[target][1]
    row = {
        **_case_fields(case), "kernel": launch.kernel, "pass": record.pass_,
        "launch_index": index, "target": target, "forward_mode": record.forward_mode,
        "grid": list(launch.grid), "programs": launch.programs, "warps": launch.num_warps,
        "stages": launch.num_stages, "constexprs": launch.constexprs, "regs": info["regs"],
        "spill_bytes": info["spill_store_bytes"] + info["spill_load_bytes"],
        "spill_store_bytes": info["spill_store_bytes"],
        "spill_load_bytes": info["spill_load_bytes"], "stack_bytes": info["stack_bytes"],
        "smem_bytes": smem, "blocks_per_sm": occ["blocks_per_sm"],
        "resident_warps_per_sm": occ["resident_warps_per_sm"],
        "occupancy_limited_by": occ["limited_by"],
        "waves": round(launch.programs / per_wave, 3) if per_wave else None,
    }  # fmt: skip
    row.update(sass_counts(compiled.asm["cubin"]))
    row.update(ptx_counts(ptx))
    row.update(module=launch.module, args=launch.args, ptxas=info["ptxas_version"])
    return row


def _call_row(case: StaticCase, target: str, record) -> dict:
    copies = record.host_device_copies
    return {
        **_case_fields(case), "pass": record.pass_, "target": target,
        "forward_mode": record.forward_mode, "launches": len(record.launches),
        "kernels": [launch.kernel for launch in record.launches],
        "host_device_copies": len(copies),
        "host_device_copy_bytes": sum(c["bytes"] for c in copies),
        "host_device_copy_detail": copies,
        "torch_ops": sum(record.torch_ops.values()),
        "torch_op_detail": dict(sorted(record.torch_ops.items())),
        "unsupported": record.unsupported,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------
# A compiling process of its own (where this one interprets)
# ------------------------------------------------------------------------------------------------


def _report_in_subprocess(cases, targets) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        request = os.path.join(tmp, "request.json")
        out = os.path.join(tmp, "report.json")
        with open(request, "w") as f:
            json.dump({"cases": [case_to_json(c) for c in cases], "targets": targets}, f)
        cmd = [sys.executable, "-m", "fastnmf.profile.static.kernel_report", "--request", request,
               "--out", out]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(
                f"the kernel report's compiling process failed ({done.returncode}):\n"
                f"{done.stderr[-6000:]}"
            )
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="kernel report in a compiling process (internal)")
    parser.add_argument("--request", required=True, help="JSON: {cases: [...], targets: [...]}")
    parser.add_argument("--out", required=True, help="where to write the report JSON")
    args = parser.parse_args(argv)
    with open(args.request) as f:
        request = json.load(f)
    cases = [case_from_json(c) for c in request["cases"]]
    report = _report(cases, tuple(request["targets"]))  # never another subprocess
    with open(args.out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
