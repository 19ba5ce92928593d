"""bench/ncu_designs.py: the GPU phase's Nsight Compute cases run, and its reports read back.

The details page read here is the one Nsight Compute printed on the H200
(bench/results/h200_2026-12-04/ncu_four_tiles_fwd.txt); the raw CSV is written in the layout
ncu exports (a header row of metric names, a row of units, a row a kernel).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_bench

from fastnmf.profile.static.counter import interpreting

nd = load_bench("ncu_designs")
H200_DETAILS = ROOT / "bench/results/h200_2026-12-04/ncu_four_tiles_fwd.txt"

RAW = """==PROF== Connected to process 9 (/usr/bin/python3.12)
"ID","Process ID","Process Name","Host Name","Kernel Name","Block Size","Grid Size","gpu__time_duration.sum","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","smsp__average_warps_issue_stalled_barrier_per_warp_active.pct"
"","","","","","","","msecond","inst","inst","inst","inst","%"
"0","9","python3.12","127.0.0.1","_fused_kernel","(512, 1, 1)","(132, 1, 1)","5.10","14.82","1,203.5","2.40","n/a","40.4"
"""  # noqa: E501


def test_reads_the_details_page_the_h200_printed():
    (k,) = nd.parse_details(H200_DETAILS.read_text())
    assert k["name"] == "_fused_kernel"
    assert (k["grid"], k["block"]) == ((132, 1, 1), (512, 1, 1))
    expect = {"ms": 5.10, "regs": 128, "warps/SM": 15.99, "cycles/issue": 36.69,
              "SM %": 10.89, "L1/TEX %": 48.12, "L2 %": 8.19, "DRAM %": 4.63}  # fmt: skip
    got = {col: nd.metric(k, name, unit) for col, name, unit in nd.DETAILS}
    assert {c: got[c] for c in expect} == pytest.approx(expect)
    # a metric of two sections, each in its own unit: the speed of light's %, not the GB/s
    assert nd.metric(k, "Memory Throughput", "%") == pytest.approx(48.12)
    assert nd.metric(k, "Memory Throughput", "Gbyte/s") == pytest.approx(222.96)
    assert nd.metric(k, "Elapsed Cycles", "cycle") == 10_099_889  # thousands separators
    assert k["stalls"] == [("sibling warps at a CTA barrier", 14.8, 40.4)]


def test_a_duration_in_microseconds_reads_as_milliseconds():
    text = ("  _apply_kernel (2048, 8, 1)x(256, 1, 1), Context 1, Stream 7, Device 0, CC 9.0\n"
            "    Section: GPU Speed Of Light Throughput\n"
            "    Duration                         us       812.35\n")  # fmt: skip
    (k,) = nd.parse_details(text)
    assert (k["grid"], k["block"]) == ((2048, 8, 1), (256, 1, 1))
    assert nd.metric(k, "Duration", "ms") == pytest.approx(0.81235)
    assert nd.metric(k, "Registers Per Thread", "register/thread") is None


def test_memory_table_rules_read_across_wrapped_lines():
    """The two rule texts in the wording of ncu's memory tables, wrapped as ncu wraps them."""
    text = ("  _apply_bwd_kernel2 (256, 8, 1)x(512, 1, 1), Context 1, Stream 7, Device 0, CC 9.0\n"
            "    OPT   The memory access pattern for shared loads might not be optimal and causes\n"
            "          on average a 4.3 - way bank conflict across all 1,310,720 shared load\n"
            "          requests.\n"
            "    OPT   Uncoalesced Global Accesses: This kernel has uncoalesced global accesses\n"
            "          resulting in a total of 52,428,800 excessive sectors (38% of the total\n"
            "          137,887,744 sectors).\n")  # fmt: skip
    (k,) = nd.parse_details(text)
    assert k["access"] == ["shared loads 4.3-way", "uncoalesced global 38 %"]
    (plain,) = nd.parse_details(H200_DETAILS.read_text())
    assert plain["access"] == []  # that run collected no memory tables


def test_raw_export_gives_the_costliest_stalls_first():
    (row,) = nd.parse_raw(RAW)
    assert row["Kernel Name"] == "_fused_kernel"
    # per issued instruction only (not the per-warp %), unreadable values skipped
    assert nd.raw_stalls(row) == [("long_scoreboard", 1203.5), ("barrier", 14.82),
                                  ("mio_throttle", 2.40)]  # fmt: skip
    assert nd.raw_stalls(row, top=1) == [("long_scoreboard", 1203.5)]
    assert nd.parse_raw("==ERROR== Failed to initialize the profiler\n") == []
    # without the warp states' ratios, the source counters' samples (not-issued ones left out)
    sampled = {"smsp__pcsamp_warps_issue_stalled_barrier": "9,120",
               "smsp__pcsamp_warps_issue_stalled_barrier_not_issued": "99,999",
               "smsp__pcsamp_warps_issue_stalled_wait": "310"}  # fmt: skip
    assert nd.raw_stalls(sampled) == [("barrier", 9120.0), ("wait", 310.0)]


def test_summary_has_a_row_a_kernel_with_the_raw_stalls(tmp_path: Path):
    shutil.copy(H200_DETAILS, tmp_path / "d3-s4-fp32.details.txt")
    shutil.copy(H200_DETAILS, tmp_path / "plain.details.txt")
    (tmp_path / "d3-s4-fp32.raw.csv").write_text(RAW)
    table = nd.summarize(tmp_path)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()
            if "_fused_kernel" in line}  # fmt: skip
    assert set(rows) == {"d3-s4-fp32", "plain"}
    cells = [c.strip() for c in rows["d3-s4-fp32"].strip("|").split("|")]
    assert cells[:6] == ["d3-s4-fp32", "_fused_kernel", "132x1x1 x 512", "5.1", "128", "16"]
    assert cells[-2:] == ["long_scoreboard 1203.5, barrier 14.8, mio_throttle 2.4", "-"]
    # no raw export: the details page's stall rules
    assert rows["plain"].endswith("| sibling warps at a CTA barrier: 14.8 (40 %) | - |")
    assert "- plain: 1 kernels, 5.100 ms together" in table


def test_a_torch_kernel_before_ours_keeps_the_raw_rows_paired():
    """A fill kernel with a demangled name (spaces, parentheses) launched before the fused
    kernel is a kernel of its own in the details page, and the raw rows pair by name: the
    fused kernel's stalls are its own, also when the raw export lacks the fill."""
    text = ("  void at::native::fill<float>(int, float) (8, 1, 1)x(128, 1, 1), Context 1, "
            "Stream 7, Device 0, CC 9.0\n"
            "    Duration                         us         2.30\n"
            "  _fused_kernel (132, 1, 1)x(512, 1, 1), Context 1, Stream 7, Device 0, CC 9.0\n"
            "    Duration                         ms         5.10\n")  # fmt: skip
    fill, fused = nd.parse_details(text)
    assert fill["name"] == "void at::native::fill<float>(int, float)" and fill["grid"] == (8, 1, 1)
    assert nd.metric(fused, "Duration", "ms") == pytest.approx(5.10)
    (row,) = nd.parse_raw(RAW)  # _fused_kernel's row alone
    assert nd.pair_raw([fill, fused], [row]) == [None, row]
    other = dict(row, **{"Kernel Name": fill["name"]})
    assert nd.pair_raw([fill, fused], [other, row]) == [other, row]
    nameless = [{"x": "1"}, {"x": "2"}]  # no names: by place
    assert nd.pair_raw([fill, fused], nameless) == nameless


def test_summary_refuses_a_folder_without_details(tmp_path: Path):
    with pytest.raises(SystemExit, match="no <case>.details.txt"):
        nd.summarize(tmp_path)


def test_every_case_is_a_variant_and_shift_set_time_designs_knows():
    td = load_bench("time_designs")
    names = {v[0] for v in td.VARIANTS}
    for variant, shifts, dtype in nd.CASES.values():
        assert variant in names and shifts in td.SHIFTS and dtype in td.DTYPES


@pytest.mark.skipif(torch.cuda.is_available() or not interpreting(),
                    reason="runs the case on the CPU under TRITON_INTERPRET=1")  # fmt: skip
def test_a_case_runs_its_training_call_off_a_gpu(capsys):
    assert nd.main(["run", "--case", "d2-s4-fp32", "--shape", "1", "8", "8", "8", "16"]) == 0
    assert "case d2-s4-fp32: design 2, shifts [None, 4], fp32" in capsys.readouterr().out
