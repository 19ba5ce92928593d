"""The fused glue kernels compile for sm_90a without spilling (a compiling subprocess: this
process runs Triton's interpreter), at the BraTS step's widths, fp32 / bf16 autocast / bf16."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastnmf.profile.static import ptx_tools
from fastnmf.profile.static.glue_report import GLUE_CASES

_MISSING = ptx_tools.missing_tools(["sm_90a"])


@pytest.mark.skipif(bool(_MISSING), reason="; ".join(_MISSING) or "tools present")
def test_glue_kernels_compile_for_sm90a_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastnmf.profile.static.glue_report", "--target", "sm_90a"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout)
    kernels = {r["kernel"].rsplit(".", 1)[1] for r in rows}
    assert kernels == {"_fwd_kernel", "_bwd_kernel"}
    assert len(rows) == 2 * len(GLUE_CASES)
    spilling = [r for r in rows if r["spill_bytes"]]
    assert not spilling, spilling
    assert all(r["regs"] <= 255 and r["resident_warps_per_sm"] >= r["warps"] for r in rows)
