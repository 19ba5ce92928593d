"""The static kernel report (issue 14): every Triton kernel of the NMF layer compiles for sm_90a
without spilling, the report's rows hold what they say, and ``fastnmf profile --suite static``
writes static.json / static.md.

The kernels are compiled once per test session (a compiling subprocess: this process runs
Triton's interpreter), at the benchmark shape 2x32x128^3 fp32 on meta tensors.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton
from conftest import PTX_MISSING as _MISSING
from conftest import needs_ptxas

from fastnmf.cli import main
from fastnmf.profile.static import ptx_tools
from fastnmf.profile.static.cases import coverage_cases
from fastnmf.profile.static.kernel_report import LAUNCH_FIELDS, kernel_report
from fastnmf.profile.static.suite import run_static

TRITON_VERSION = importlib.import_module("fastnmf.kernels._common").TRITON_VERSION

KERNEL_MODULES = ("window_nmf", "window_nmf_rank", "global_nmf", "_global_apply", "global_nmf_rank",
                  "window_nmf2", "_window2_bwd", "window_nmf3", "_window3_bwd")

# Kernels that spill today (sm_90a, Triton 3.9, ptxas 13.4), measured by this report: a strict
# xfail, so the test fails as soon as one stops spilling (remove it here then) and any other kernel
# that starts spilling fails at once.
KNOWN_SPILLS = {
    ("fastnmf.kernels.window_nmf", "_apply_bwd_kernel"):
        "per-voxel backward (tiles under 4 voxels, e.g. shift 3; BLOCK_V 128, 4 warps): 255 "
        "registers, 8 B + 8 B",
    ("fastnmf.kernels.window_nmf_rank", "_window_bwd_kernel"):
        "rank-2 window backward (4 warps): 255 registers, 76-416 B by shifts and dtype",
}  # fmt: skip
# With Triton 3.6 (the GPU machine's; it runs ptxas 12.8 without --regAllocOptLevel=2), the kernels
# that spill there besides: none today (design 2's forward parts pass spilled 12 B + 12 B until its
# grid coordinates came from magic numbers)
KNOWN_SPILLS_TRITON36: dict[tuple[str, str], str] = {}
if triton.__version__.split(".")[:2] == ["3", "6"]:
    KNOWN_SPILLS = {**KNOWN_SPILLS, **KNOWN_SPILLS_TRITON36}


def _launched_kernels() -> list[tuple[str, str]]:
    """Every ``*_kernel`` / ``*_kernel2`` Triton function the kernel modules define (not those
    they import): (module, name)."""
    found = []
    for short in KERNEL_MODULES:
        module = importlib.import_module(f"fastnmf.kernels.{short}")
        for name, obj in vars(module).items():
            if (re.search(r"_kernel\d?$", name) and hasattr(obj, "fn")  # jit or interpreted
                    and obj.fn.__module__ == module.__name__):  # fmt: skip
                found.append((module.__name__, name))
    return found


KERNELS = _launched_kernels()


@pytest.fixture(scope="module")
def report():
    if _MISSING:
        pytest.skip("; ".join(_MISSING))
    return kernel_report(coverage_cases(), targets=("sm_90a",))


def _spill_param(module: str, name: str):
    reason = KNOWN_SPILLS.get((module, name))
    marks = [pytest.mark.xfail(strict=True, reason=f"spills today: {reason}")] if reason else []
    return pytest.param(module, name, marks=marks, id=f"{module.rsplit('.', 1)[1]}.{name}")


@needs_ptxas
@pytest.mark.parametrize(("module", "name"), [_spill_param(m, n) for m, n in KERNELS])
def test_every_kernel_compiles_for_sm90a_without_spills(report, module, name):
    rows = [r for r in report["launches"] if r["module"] == module and r["kernel"] == name]
    assert rows, f"{module}.{name} was never launched by the coverage cases"
    for r in rows:
        assert r["target"] == "sm_90a" and r["regs"] > 0
        assert r["spill_bytes"] == 0, (
            f"{name} ({r['case']}, {r['pass']} #{r['launch_index']}, {r['warps']} warps, "
            f"{r['constexprs']}) spills {r['spill_store_bytes']} B stores + "
            f"{r['spill_load_bytes']} B loads at {r['regs']} registers"
        )


# The second and third window designs' kernels (issue 16: no integer division in their loops)
DIVISION_FREE = (("window_nmf2", "_parts_kernel"), ("window_nmf2", "_solve_kernel"),
                 ("window_nmf2", "_apply_kernel"), ("_window2_bwd", "_parts_bwd_kernel"),
                 ("_window2_bwd", "_solve_bwd_kernel"), ("_window2_bwd", "_apply_bwd_kernel2"),
                 ("window_nmf3", "_fused_kernel"),
                 ("_window3_bwd", "_fused_bwd_kernel"))  # fmt: skip


@needs_ptxas
@pytest.mark.parametrize(("module", "name"), DIVISION_FREE, ids=[n for _, n in DIVISION_FREE])
def test_window_designs_2_and_3_divide_by_no_run_time_value(report, module, name):
    """Issue 16: no integer division in the second and third designs' loops. Their run-time
    divisors (grid, heads; plane and ticket sizes) come as magic numbers (kernels/_fastdiv.py):
    no division sequence in the SASS (``I2F.RP``) and no div/rem in the PTX, in every case the
    coverage suite compiles."""
    rows = [r for r in report["launches"]
            if r["module"] == f"fastnmf.kernels.{module}" and r["kernel"] == name]  # fmt: skip
    assert rows, f"{module}.{name} was never launched by the coverage cases"
    for r in rows:
        assert (r["int_div_seqs"], r["ptx_int_div"]) == (0, 0), (
            f"{name} ({r['case']}, {r['pass']}, {r['constexprs']}): {r['int_div_seqs']} division "
            f"sequences in the SASS, {r['ptx_int_div']} div/rem in the PTX"
        )


@needs_ptxas
def test_no_shared_memory_is_held_across_a_non_inlined_call(report):
    """No kernel that calls non-inlined functions writes shared memory before its loop (what it
    wrote would sit there through every call, and Triton 3.6 lets a non-inlined callee overwrite
    it: kernels/window_nmf3.py), in every case the coverage suite compiles. Under Triton 3.6
    this failed for design 3's untiled BraTS forward before its part matrix was made per
    ticket."""
    calling = [r for r in report["launches"] if r["calls"]]
    assert calling, "no coverage case compiles a kernel with a non-inlined call"
    for r in calling:
        assert r["ptx_smem_held_across_calls"] == 0, (
            f"{r['kernel']} ({r['case']}, {r['pass']}, {r['constexprs']}): "
            f"{r['ptx_smem_held_across_calls']} shared-memory writes before its loop"
        )


# CTA barrier sites (SASS ``BAR``) in design 3's fused kernels with their tiles, sm_90a, the
# compiler CI runs (Triton 3.9; 3.6 compiles fewer): the stall the H200's ncu found. BraTS shifts:
# 112 forward / 150 backward before the axis-0 sub-box rows of the tiles' products were ordered so
# that their halves sum within a warp (kernels/_window3_tile.py, ``_rows0_low``: 88 / 118), and
# both halves of a product reached the stores' layout by one conversion (``_tile_store``): 76 /
# 102. Since the backward solve takes K as rows of E^2 in one warp and keeps its vectors in both
# forms (kernels/_window3_bwd.py), and the forward saves K whole: forward 76 -> 70, backward
# 102 -> 100; `[None, 4]` 64 and 86 -> 68. Since the forward solve loads K back as those rows for
# its power steps (kernels/_window3_power.py): forward 70 -> 68, `[None, 4]` 64 -> 58; and the
# backward's ū goes into both forms the same way: backward 100 -> 97, `[None, 4]` 68 -> 65.
# Since the BraTS forward's X g0 is one product (its parts tile a call of its own,
# window_nmf3._parts_tile_call): forward 68 -> 66. A ceiling, so a change that brings any back
# fails here
BARRIER_CEILING = {("_fused_kernel", "[None, 2, 4, 6]"): 66,
                   ("_fused_bwd_kernel", "[None, 2, 4, 6]"): 97,
                   ("_fused_kernel", "[None, 4]"): 58,
                   ("_fused_bwd_kernel", "[None, 4]"): 65}  # fmt: skip


@needs_ptxas
def test_design3_tiles_keep_their_cta_barriers_down(report):
    for (kernel, shifts), ceiling in BARRIER_CEILING.items():
        rows = [r for r in report["launches"]
                if r["kernel"] == kernel and r["target"] == "sm_90a" and shifts in r["case"]
                and r["case"].endswith("-d3")]  # fmt: skip
        assert rows, f"no tiled design-3 case launches {kernel} with shifts {shifts}"
        for r in rows:
            assert r["barriers"] <= ceiling, (
                f"{kernel} ({r['case']}, {r['pass']}): {r['barriers']} CTA barrier sites, "
                f"ceiling {ceiling}")


@needs_ptxas
def test_design3_output_passes_mark_their_last_reads_and_stores_evict_first(report):
    """The tiled design 3's output passes load x (and dy) for the last time and store y (dx)
    evict-first (``_window3_sched.last_use``: ``.cs``, or an L1::evict_first + L2 policy before
    Triton 3.7), so that L2 keeps what a later stage reads (pipeline_dram.py); no other kernel
    marks anything, design 3 whose output passes are design 2's included (untiled, and the
    isles preset's windows, too small for a tile)."""
    fused = {"_fused_kernel": "OTILE", "_fused_bwd_kernel": "BTILE"}  # the output pass's tile
    seen = set()
    for r in report["launches"]:
        loads, stores = r["ptx_ld_evict_first"], r["ptx_st_evict_first"]
        if r["kernel"] in fused and r["constexprs"].get(fused[r["kernel"]]):
            # forward: x loads and y stores; backward: x and dy loads, dx stores
            inputs = 1 if r["kernel"] == "_fused_kernel" else 2
            assert stores > 0 and loads >= inputs * stores, (r["case"], loads, stores)
            seen.add((r["kernel"], r["case"]))
        else:
            assert (loads, stores) == (0, 0), (r["kernel"], r["case"], loads, stores)
    assert len(seen) == 4  # [None, 4] and [None, 2, 4, 6], forward and backward


def test_shared_memory_held_across_calls_is_found_in_the_ptx():
    """The PTX rule on the two shapes Triton 3.6 gave design 3's forward: the part matrix stored
    (stmatrix) before the ticket loop, or only the ticket's one-thread broadcast there."""
    entry = (".func callee\n(\n);\n.visible .entry k(\n){\n"
             "\t@%p11 st.shared.b32 [ %r162 + 0 ], %r160;\n{}"
             "$L__BB0_2: // =>This Loop Header: Depth=1\n"
             "\tstmatrix.sync.aligned.m8n8.x4.shared.b16 [%r9], {%r1, %r2, %r3, %r4};\n"
             "\tcall.uni callee, ();\n}\n.func callee()\n{\n\tst.shared.b32 [%r1], %r2;\n}\n")
    held = "\tstmatrix.sync.aligned.m8n8.x4.shared.b16 [%r210], {%r1, %r2, %r3, %r4};\n"
    assert ptx_tools.smem_held_across_calls(entry.replace("{}", held, 1)) == 1
    assert ptx_tools.smem_held_across_calls(entry.replace("{}", "", 1)) == 0
    no_call = entry.replace("{}", held, 1).replace("call.uni", "// no call")
    assert ptx_tools.smem_held_across_calls(no_call) == 0
    # a block of the loop laid out before its header (LLVM marks it): not held from before it
    body = "$L__BB0_9: // %.loopexit\n\t// in Loop: Header=BB0_2 Depth=1\n" + held
    assert ptx_tools.smem_held_across_calls(entry.replace("{}", body, 1)) == 0
    after = body + "$L__BB0_21: // %._crit_edge\n" + held  # a block after it is outside again
    assert ptx_tools.smem_held_across_calls(entry.replace("{}", after, 1)) == 1


def test_sass_counts_count_cta_barriers():
    """BAR.SYNC and its variants count as CTA barriers (what the H200's ncu found design 3
    stalled on); warp-level syncs and other opcodes do not. Copies into shared memory that do
    not wait (LDGSTS, TMA's UTMALDG; not their fence LDGDEPBAR) count as async copies."""
    ops = ["BAR.SYNC.DEFER_BLOCKING", "LDG.E.128", "BAR.SYNC", "WARPSYNC", "SHFL.BFLY",
           "BAR.RED.POPC", "LDGSTS.E.BYPASS.LTC128B.128", "UTMALDG.3D", "LDGDEPBAR"]
    counts = ptx_tools._count_sass(ops)
    assert counts["barriers"] == 3 and counts["async_copies"] == 2
    assert counts["shfl"] == 1 and counts["ldg_by_width"] == {"128": 1}


@needs_ptxas
def test_report_rows_hold_the_launch_configuration(report):
    launches, calls = report["launches"], report["calls"]
    assert len(KERNELS) >= 10 and {(r["module"], r["kernel"]) for r in launches} == set(KERNELS)
    per_call: dict = {}
    for r in launches:
        assert set(LAUNCH_FIELDS) <= set(r), set(LAUNCH_FIELDS) - set(r)
        assert r["programs"] == math.prod(r["grid"]) > 0
        assert r["warps"] <= r["resident_warps_per_sm"] <= 64, r
        # every kernel reads (plain loads or a pipelined loop's cp.async copies) and writes
        assert (r["ldg_by_width"] or r["ldgsts_by_width"]) and r["stg_by_width"], r
        per_call.setdefault((r["case"], r["pass"]), []).append(r["launch_index"])
    assert all(sorted(ix) == list(range(len(ix))) for ix in per_call.values())
    # the GPU's geometry, not the interpreter's: 2x32x128^3, E = 8, P = 8 -> 4096 windows per
    # head, 8 = batch x heads; shifts [None, 2, 4, 6] leave 2^3 tiles, which a GPU runs as tiles
    # of 8 voxels (the interpreter would take the per-voxel kernel with 1024-voxel blocks)
    swin4 = {(r["pass"], r["launch_index"]): r for r in launches
             if r["case"] == "window-[None, 2, 4, 6]-fp32-r1-2x32x128x128x128"}  # fmt: skip
    assert swin4["fwd", 0]["kernel"] == "_stats_fwd_kernel"
    assert swin4["fwd", 0]["grid"] == [4096 * 4, 8, 1] and swin4["fwd", 0]["warps"] == 1
    assert swin4["fwd", 1]["kernel"] == "_apply_fwd_tile_kernel"
    assert swin4["fwd", 1]["grid"] == [128**3 // 8, 8, 1]
    assert swin4["fwd", 1]["constexprs"]["HB"] == 8
    # no host->device copy per call in any path (every design, global, rank 2): the shift
    # tables are compile-time constants, nothing else is built from host data
    by_call = {(c["case"], c["pass"]): c for c in calls}
    assert len(calls) == 2 * len(coverage_cases())  # every case, forward and backward
    assert [(c["case"], c["pass"]) for c in calls if c["host_device_copies"]] == []
    assert all(c["host_device_copy_bytes"] == 0 for c in calls)
    assert by_call["window-[None, 2, 4, 6]-fp32-r1-2x32x128x128x128", "bwd"]["launches"] == 2
    glob2 = by_call["global-global-fp32-r2-2x32x128x128x128", "bwd"]
    assert glob2["launches"] == 0 and "NotImplementedError" in glob2["unsupported"]
    # global rank 2, inference: one pass for G_0, one per iteration (T = 5), the output pass; the
    # F updates between them run as PyTorch ops (each a device kernel on a GPU)
    glob2 = by_call["global-global-fp32-r2-2x32x128x128x128", "fwd"]
    assert glob2["forward_mode"] == "inference"
    assert glob2["kernels"] == ["_pass_kernel"] * 6 + ["_apply_kernel"]
    # per iteration: the HALS sweep's one product per rank column (fastnmf.loop.hals_sweep, R = 2)
    # and F^T F, each a batched matmul
    assert glob2["torch_ops"] >= 5 and glob2["torch_op_detail"]["aten.bmm"] == 5 * (2 + 1)


def test_occupancy_arithmetic():
    # registers per warp rounded up to 256, in 4 sub-partitions of 16K: 112 x 32 = 3584 ->
    # 16384 // 3584 = 4 warps per sub-partition -> 16 warps (not 65536 // 3584 = 18)
    assert ptx_tools.occupancy(regs=112, warps=1, smem=512, target="sm_90a") == {
        "blocks_per_sm": 16, "resident_warps_per_sm": 16, "limited_by": "registers"}  # fmt: skip
    # 168 x 32 = 5376 -> 3 per sub-partition -> 12; 96 x 32 = 3072 -> 5 -> 20 warps = 5 blocks of 4
    assert ptx_tools.occupancy(regs=168, warps=1, smem=0, target="sm_90a")["blocks_per_sm"] == 12
    assert ptx_tools.occupancy(regs=96, warps=4, smem=0, target="sm_90a")["blocks_per_sm"] == 5
    # 46 x 32 = 1472 -> 1536 per warp -> 40 warps, but at most 32 blocks of one warp
    occ = ptx_tools.occupancy(regs=46, warps=1, smem=0, target="sm_90a")
    assert occ["resident_warps_per_sm"] == 32 and occ["limited_by"] == "blocks"
    # 255 registers -> 8192 per warp: 8 warps fill the 64K registers a block may hold, 16 cannot
    assert ptx_tools.occupancy(regs=255, warps=8, smem=0, target="sm_90a")["blocks_per_sm"] == 1
    assert ptx_tools.occupancy(regs=255, warps=16, smem=0, target="sm_90a")["blocks_per_sm"] == 0
    # 100 KB of shared memory per block: 2 blocks on sm_90 (228 KB), 1 on sm_80 (164 KB)
    assert ptx_tools.occupancy(regs=32, warps=4, smem=100 * 1024, target="sm_90a")[
        "blocks_per_sm"] == 2  # fmt: skip
    assert ptx_tools.occupancy(regs=32, warps=4, smem=100 * 1024, target="sm_80")[
        "blocks_per_sm"] == 1  # fmt: skip
    with pytest.raises(ValueError, match="sm_80"):
        ptx_tools.occupancy(regs=32, warps=4, smem=0, target="sm_70")


@needs_ptxas
def test_stub_driver_compiles_records_and_restores():
    """In a compiling subprocess (tests/_stub_driver_check.py says why): the stub driver compiles
    for its target, records the launch and restores the driver it replaced."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("_stub_driver_check.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().endswith("stub driver: ok")


def test_missing_ptxas_is_a_clear_error(monkeypatch):
    class Gone:
        @property
        def path(self):
            raise RuntimeError("Cannot find ptxas-blackwell")

    monkeypatch.setattr(ptx_tools, "_tool", lambda binary: (Gone(), f"/nowhere/bin/{binary}"))
    with pytest.raises(FileNotFoundError, match="/nowhere/bin/ptxas-blackwell"):
        ptx_tools.tool_path("ptxas-blackwell")
    missing = ptx_tools.missing_tools(["sm_90a"])
    name = ptx_tools._ptxas_name(90)  # which one depends on the Triton version
    assert len(missing) == 2 and any(f"/nowhere/bin/{name}" in m for m in missing)


@pytest.mark.parametrize("blackwell_from", [90, 100])
def test_ptxas_is_the_one_triton_runs(monkeypatch, blackwell_from):
    """The report compiles with the ptxas the installed Triton would run for the target: Triton
    3.9 takes ptxas-blackwell from sm_90 on, Triton 3.6 (the GPU machine's) only from sm_100."""
    import triton
    from triton.backends.nvidia import compiler

    nv = triton.knobs.nvidia
    monkeypatch.setattr(compiler, "get_ptxas",
                        lambda arch: nv.ptxas_blackwell if arch >= blackwell_from else nv.ptxas)
    assert ptx_tools._ptxas_name(90) == ("ptxas-blackwell" if blackwell_from == 90 else "ptxas")
    assert ptx_tools._ptxas_name(80) == "ptxas"
    assert ptx_tools._ptxas_name(100) == "ptxas-blackwell"


@needs_ptxas  # the report checks for the binary before Triton runs it
def test_ptxas_runs_as_triton_runs_it(monkeypatch):
    """ptxas -v is Triton's own ``make_cubin`` for the target (its ptxas and its flags: Triton 3.9
    adds --regAllocOptLevel=2, Triton 3.6 does not), its log read; the log knob is restored."""
    import uuid

    import triton
    from triton.backends.nvidia.compiler import CUDABackend

    seen = []

    def make_cubin(self, src, metadata, opt, capability):
        seen.append((src, opt.enable_fp_fusion, opt.ptx_options, capability))
        assert triton.knobs.nvidia.dump_ptxas_log
        print("ptxas info    : Function properties for k\n"
              "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
              "ptxas info    : Used 77 registers, used 1 barriers")  # fmt: skip
        return b""

    monkeypatch.setattr(CUDABackend, "make_cubin", make_cubin)
    monkeypatch.setattr(ptx_tools, "_disk_cached", lambda *a, compute: compute())
    ptx = f"// {uuid.uuid4()}"  # not in the in-memory cache
    info = ptx_tools.ptxas_info(ptx, "sm_90a", fp_fusion=False, ptx_options="--opt-level 3")
    assert (info["regs"], info["spill_store_bytes"], info["stack_bytes"]) == (77, 4, 8)
    assert seen == [(ptx, False, "--opt-level 3", 90)]
    assert not triton.knobs.nvidia.dump_ptxas_log


@needs_ptxas
def test_cli_static_suite_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "static"
    args = ["profile", "--suite", "static", "--target", "sm_90a", "--parts", "kernels",
            "--only", "window-[None, 4]-fp32-r1-2x32", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    doc = json.loads((out / "static.json").read_text())
    # by default the design the layer runs: two shifts, the second design's three passes each way
    assert doc["meta"]["cases"] == ["window-[None, 4]-fp32-r1-2x32x128x128x128-d2"]
    kernels = [(r["pass"], r["launch_index"], r["kernel"]) for r in doc["launches"]]
    assert kernels == [("fwd", 0, "_parts_kernel"), ("fwd", 1, "_solve_kernel"),
                       ("fwd", 2, "_apply_kernel"), ("bwd", 0, "_parts_bwd_kernel"),
                       ("bwd", 1, "_solve_bwd_kernel"), ("bwd", 2, "_apply_bwd_kernel2")]
    both = [c for c in doc["calls"] if c["pass"] == "fwd+bwd"]
    assert len(both) == 1 and both[0]["launches"] == 6
    assert both[0]["ideal_bytes"] == 5 * 2 * 32 * 128**3 * 4  # x, y; x, dy, dx
    md = (out / "static.md").read_text()
    assert "## Kernels" in md and "_apply_bwd_kernel2" in md
    assert "What these figures cannot tell" in md
    assert "kernels that spill" in capsys.readouterr().out


def test_designs_option_takes_auto_and_the_design_numbers(capsys):
    from fastnmf.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["profile", "--suite", "static", "--designs", "auto", "1", "3"])
    assert args.designs == ["auto", 1, 3]
    assert parser.parse_args(["profile", "--suite", "static"]).designs == ["auto"]
    with pytest.raises(SystemExit):
        parser.parse_args(["profile", "--suite", "static", "--designs", "4"])
    assert "invalid design '4'" in capsys.readouterr().err


def test_static_suite_bad_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="kernels"):
        run_static(targets=("sm_90a",), out=tmp_path, parts=("bogus",))
    with pytest.raises(ValueError, match="sm_80"):
        run_static(targets=("sm_75",), out=tmp_path, parts=("kernels",))
    args = ["profile", "--suite", "static", "--only", "no-such-case", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "no static case id contains" in capsys.readouterr().err
    with pytest.raises(ValueError, match="designs must be"):
        run_static(targets=("sm_90a",), out=tmp_path, parts=("kernels",), designs=(4,))


def test_static_cases_per_design():
    """Each rank-one window case once per design; rank two and global cases only once. By
    default ("auto") each rank-one window case has the design the layer runs for its shifts
    (two shifts: 2, the BraTS four: 3, local windows: 1), and a case two choices give is there
    once."""
    from fastnmf.profile.static.suite import static_cases

    one, three = static_cases(designs=(1,)), static_cases(designs=(1, 3))
    windows = [c for c in one if c.mode == "window" and c.rank == 1]
    assert windows and len(three) == len(one) + len(windows)
    assert {c.design for c in three} == {1, 3} and {c.design for c in one} == {1}
    assert all(c.mode == "window" and c.rank == 1 for c in three if c.design == 3)
    auto = static_cases()
    assert len(auto) == len(one)
    by_shifts = {c.shift_name: c.design for c in auto if c.mode == "window" and c.rank == 1}
    assert by_shifts == {"[None, 4]": 2, "[None, 2, 4, 6]": 3, "[None]": 1}
    assert all(c.design == 1 for c in auto if c.rank == 2 or c.mode == "global")
    assert len(static_cases(designs=("auto", 2))) == len(one) + len(windows) - len(windows) // 3


@needs_ptxas
def test_suite_joins_traffic_rows_on_case_pass_and_launch_index(report, tmp_path, monkeypatch):
    """The traffic part (another module) is stood in for by rows derived from the kernel rows;
    what is tested is the join and the per-call sums of the suite."""
    import sys
    import types

    from fastnmf.profile import static as static_pkg
    from fastnmf.profile.static import kernel_report as kr_module
    from fastnmf.profile.static.cases import ideal_bytes

    cases = [c for c in coverage_cases()
             if c.id.startswith("window-[None, 4]-fp32-r1") and c.design == 1]  # fmt: skip

    def launch_rows(cases_, *, target, resident=None):
        assert resident and all(n >= 1 for n in resident.values())  # from the kernel rows
        rows = [r for r in report["launches"] if r["case"] in {c.id for c in cases_}]
        # the traffic part numbers every launch, PyTorch ops too (a fill before the forward's
        # first kernel, as an MU launcher's row mask); the kernel report numbers Triton's only
        torch_op = {"case": cases_[0].id, "pass": "fwd", "launch_index": 0, "kind": "torch",
                    "kernel": "aten.ones", "bytes_loaded": 0, "bytes_stored": 32}
        shift = {"fwd": 1, "bwd": 0}
        return [torch_op] + [
            {"case": r["case"], "pass": r["pass"], "kind": "triton",
             "launch_index": r["launch_index"] + shift[r["pass"]],
             "kernel": r["kernel"] if r["launch_index"] == 0 else "_other_kernel",
             "bytes_loaded": 1000 + r["launch_index"], "bytes_stored": 10}
            for r in rows]  # fmt: skip

    fake = types.SimpleNamespace(launch_rows=launch_rows, call_rows=lambda rows: [],
                                 markdown=lambda calls: ["## Traffic (stand-in)"])  # fmt: skip
    monkeypatch.setitem(sys.modules, "fastnmf.profile.static.traffic", fake)
    monkeypatch.setattr(static_pkg, "traffic", fake, raising=False)
    monkeypatch.setattr(kr_module, "kernel_report", lambda cases_, targets: {
        "launches": [r for r in report["launches"] if r["case"] == cases[0].id],
        "calls": [c for c in report["calls"] if c["case"] == cases[0].id]})  # fmt: skip
    doc = run_static(targets=("sm_90a",), out=tmp_path, parts=("kernels", "traffic"), cases=cases)
    kernels = [r for r in doc["launches"] if r.get("kind") != "torch"]
    joined = {(r["pass"], r["launch_index"]): r for r in kernels}
    # launch 0 of each call: one row with the kernel report's and the traffic part's fields
    for pass_ in ("fwd", "bwd"):
        assert joined[pass_, 0]["regs"] > 0 and joined[pass_, 0]["bytes_loaded"] == 1000
    # launch 1 counted under another kernel name: kept apart and noted, never merged
    assert sum(r.get("kernel") == "_other_kernel" for r in doc["launches"]) == 2
    assert sum(r.get("regs", 0) > 0 and r["launch_index"] == 1 for r in doc["launches"]) == 2
    # the PyTorch op is its own row, never joined onto a kernel's
    assert [r["kernel"] for r in doc["launches"] if r.get("kind") == "torch"] == ["aten.ones"]
    assert sum("rows kept apart" in n for n in doc["notes"]) == 2
    calls = {c["pass"]: c for c in doc["calls"]}
    assert calls["fwd"]["bytes_loaded"] == 1000 + 1001 and calls["fwd"]["bytes_stored"] == 20 + 32
    assert calls["fwd+bwd"]["bytes_loaded"] == 2 * 2001
    assert calls["fwd+bwd"]["ideal_bytes"] == ideal_bytes(cases[0], "fwd") + ideal_bytes(
        cases[0], "bwd")  # fmt: skip
    assert "## Traffic (stand-in)" in (tmp_path / "static.md").read_text()


def test_ptxas_log_with_non_inlined_functions_sums_their_spills():
    """A callee's spills count: ``ptxas -v`` reports each non-inlined function on its own."""
    log = """ptxas info    : Compiling entry function '_fused_bwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _fused_bwd_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 124 registers, used 1 barriers
ptxas info    : Function properties for fastnmf_$_kernels_$__window3_bwd_$__apply_chunk__Pfp32
    48 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Function properties for fastnmf_$_kernels_$__window3_bwd_$__solve_chunk__Pfp32
    16 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
"""
    info = ptx_tools._parse_ptxas(log)
    assert (info["regs"], info["spill_store_bytes"], info["spill_load_bytes"]) == (124, 16, 12)
    assert info["stack_bytes"] == 48


def test_global_reduction_copies_overlap_its_sums():
    """The global reduction's loop (kernels/global_nmf.py, ``_STAGES`` = 3) copies its next trip's
    columns into shared memory while a trip is summed: its loop's ``cp.async.wait_group`` leaves
    copies in flight, forward and backward (sm_90a, fp32 2 x 32 x 128^3). With 2 stages Triton
    keeps one buffer and waits for every copy at each trip, so nothing overlaps (PTX: a wait
    leaving 0 in flight), which is why the default is 3."""
    from fastnmf.profile.static.cases import StaticCase
    from fastnmf.profile.static.kernel_report import kernel_rows

    if ptx_tools.missing_tools(["sm_90a"]):
        pytest.skip("; ".join(ptx_tools.missing_tools(["sm_90a"])))
    case = StaticCase("global", 2, 32, (128, 128, 128), "fp32", (None,), window=None)
    rows = [r for r in kernel_rows([case], targets=("sm_90a",)) if r["kernel"] == "_reduce_kernel"]
    assert len(rows) == 2  # forward and backward
    assert all(r["async_copies"] > 0 and r["ptx_async_wait_in_loop"] >= 1 for r in rows), rows


# (dtype, the width of x's and dY's loads in bits, how many loads that wide at least): fp32 x and
# dY 8 rows each 16 bytes at a time, and S's 8 rows (32 bytes each) 16 bytes at a time too; bf16
# x and dY 8 bytes at a time (4 columns)
@pytest.mark.parametrize("dtype,x_load_bits,loads", [("fp32", 128, 32), ("bf16", 64, 16)])
def test_global_backward_apply_keeps_each_columns_rows_in_a_thread(dtype, x_load_bits, loads):
    """The global backward's output pass at E = 8 (kernels/_global_apply.py, ``_apply_bwd_kernel``):
    each thread holds all 8 rows of its 4 adjacent columns, so u^T dY and S x are sums in the
    thread: no CTA barrier, no shuffle, no shared memory, x and dY loaded 4 columns at a time
    (fp32 16 bytes, bf16 8), no spill, and more resident warps an SM than the 16 of the kernel
    with the rows across threads (128 registers, 21 barriers a chunk, sm_90a, Triton 3.9)."""
    from fastnmf.profile.static.cases import StaticCase
    from fastnmf.profile.static.kernel_report import kernel_rows

    if ptx_tools.missing_tools(["sm_90a"]):
        pytest.skip("; ".join(ptx_tools.missing_tools(["sm_90a"])))
    case = StaticCase("global", 2, 32, (128, 128, 128), dtype, (None,), window=None)
    rows = kernel_rows([case], targets=("sm_90a",))
    rows = [r for r in rows if r["kernel"] == "_apply_bwd_kernel"]
    assert len(rows) == 1, rows
    (r,) = rows
    assert (r["barriers"], r["shfl"], r["smem_bytes"], r["spill_bytes"]) == (0, 0, 0, 0), r
    assert r["ldg_by_width"].get(str(x_load_bits), 0) >= loads, r["ldg_by_width"]
    assert r["resident_warps_per_sm"] >= 24, r
