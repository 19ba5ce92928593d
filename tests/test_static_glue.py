"""The fused glue kernels (the MLP branch, the context branch's projections, the decoder's skip
adapter) compile for sm_90a without spilling (a compiling subprocess: this process runs Triton's
interpreter), at the BraTS step's widths, fp32 / bf16 autocast / bf16."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import needs_ptxas

from fastnmf.profile.static.glue_report import GLUE_CASES


@needs_ptxas
def test_glue_kernels_compile_for_sm90a_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastnmf.profile.static.glue_report", "--target", "sm_90a"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout)
    kernels = {".".join(r["kernel"].rsplit(".", 2)[1:]) for r in rows}  # module.kernel
    assert kernels == {
        "mlp_branch._fwd_kernel", "mlp_branch._bwd_kernel", "proj_glue._norm_proj_fwd_kernel",
        "proj_glue._norm_proj_bwd_kernel", "proj_glue._proj_residual_fwd_kernel",
        "proj_glue._proj_residual_bwd_kernel", "pair_proj._fwd_kernel", "pair_proj._bwd_kernel"}
    assert len(GLUE_CASES) == 3 * (2 + 3 + 3 + 2)  # 3 dtypes x the widths of the four ops
    # a forward and a backward per case; norm_proj's backward also with dres (RES)
    assert len(rows) == 2 * len(GLUE_CASES) + sum(op == "norm_proj" for op, *_ in GLUE_CASES)
    assert sum(r["res"] for r in rows) == 9
    spilling = [r for r in rows if r["spill_bytes"]]
    assert not spilling, spilling
    assert all(r["regs"] <= 255 and r["resident_warps_per_sm"] >= r["warps"] for r in rows)


def test_glue_markdown_rows():
    from fastnmf.profile.static.glue_report import glue_markdown

    row = {"target": "sm_90a", "kernel": "fastnmf.kernels.proj_glue._norm_proj_bwd_kernel",
           "channels": 32, "width": 32, "dtype": "float32", "autocast": None, "warps": 4,
           "block_v": 32, "regs": 202, "spill_bytes": 0, "resident_warps_per_sm": 8, "res": True}
    lines = glue_markdown([row])
    assert lines[0].startswith("## Fused glue kernels")
    assert lines[-1] == ("| sm_90a | proj_glue._norm_proj_bwd_kernel (dres) | 32 | 32 | float32 | "
                         "- | 4 | 32 | 202 | 0 | 8 |")  # fmt: skip


def test_whole_static_report_lists_the_glue_kernels(tmp_path, monkeypatch):
    """A whole report (no case selection) adds the glue kernels' rows and section; a selection
    of NMF cases does not (the kernel compiles stubbed out here)."""
    from fastnmf.profile.static import glue_report as glue_module
    from fastnmf.profile.static import kernel_report as kr_module
    from fastnmf.profile.static.suite import run_static

    row = {"target": "sm_90a", "kernel": "fastnmf.kernels.mlp_branch._fwd_kernel", "channels": 32,
           "width": 64, "dtype": "float32", "autocast": None, "warps": 4, "block_v": 32,
           "regs": 168, "spill_bytes": 0, "resident_warps_per_sm": 12, "res": False}
    monkeypatch.setattr(kr_module, "kernel_report", lambda cases, targets: {"launches": [],
                                                                            "calls": []})
    monkeypatch.setattr(glue_module, "glue_report", lambda targets: [row])
    doc = run_static(targets=("sm_90a",), out=tmp_path / "whole", parts=("kernels",))
    assert doc["glue"] == [row]
    assert "## Fused glue kernels" in (tmp_path / "whole" / "static.md").read_text()
    part = run_static(targets=("sm_90a",), out=tmp_path / "part", parts=("kernels",),
                      only=("window-[None, 4]-fp32-r1-2x32",))  # fmt: skip
    assert "glue" not in part
