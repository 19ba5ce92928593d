"""Every kernel launch of ``fastnmf.kernels`` passes ``kernels._common.COMPILE_OPTIONS``: FMA
contraction on, whatever the installed Triton's default (Triton 3.9 warns that 3.10 turns it off,
and then compiles no fused multiply-add at all)."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

from conftest import needs_ptxas

_common = importlib.import_module("fastnmf.kernels._common")
KERNEL_DIR = Path(_common.__file__).parent


class _Recorder:
    """Stands in for a @triton.jit function: records each launch's grid and kwargs."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_direct_launch_adds_the_compile_options():
    kernel = _Recorder()
    _common.launch(kernel, wrap=False)[(3, 2)](1, 2.0, BLOCK=16, num_warps=4)
    assert _common.COMPILE_OPTIONS == {"enable_fp_fusion": True}
    assert kernel.calls == [((3, 2), (1, 2.0), dict(BLOCK=16, num_warps=4,
                                                   enable_fp_fusion=True))]  # fmt: skip


def _direct_launches(path: Path) -> list[str]:
    """``name[grid](...)`` calls in a module: a kernel launched without :func:`launch`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, (ast.Name, ast.Attribute))):  # fmt: skip
            found.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
    return found


def test_every_kernel_launch_goes_through_launch():
    modules = sorted(KERNEL_DIR.glob("*.py"))
    assert len(modules) > 20
    assert not [hit for path in modules for hit in _direct_launches(path)]


def test_the_check_finds_a_direct_launch(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("k[(1,)](x, BLOCK=4)\nlaunch(k, wrap=False)[(1,)](x)\nd['a'](x)\n")
    assert _direct_launches(path) == ["m.py:1 k[1,]", "m.py:3 d['a']"]


@needs_ptxas
def test_kernels_compile_with_fp_fusion_where_the_default_is_off():
    """In a compiling subprocess with TRITON_DEFAULT_FP_FUSION=0 (tests/_compile_options_check.py):
    the global path's and every window design's kernels, forward and backward, compile for sm_90a
    with the option on and FMAs in their PTX."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    script = Path(__file__).with_name("_compile_options_check.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("KERNEL ")]
    names = {name for name, *_ in rows}
    assert {"_reduce_kernel", "_fused_kernel", "_fused_bwd_kernel", "_parts_kernel",
            "_apply_bwd_kernel2", "_stats_fwd_kernel", "_stats_bwd_kernel"} <= names  # fmt: skip
    assert len(rows) >= 16
    assert all(row[1:] == ["True", "True"] for row in rows), rows
