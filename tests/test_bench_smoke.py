"""The benchmark suites run (once, untimed, at their smallest CPU shapes) so they cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]


def _child_env() -> dict:
    """The environment of a child pytest: without PYTEST_ADDOPTS, and not taken for a
    pytest-xdist worker when this test runs in one (pytest-benchmark turns itself off there)."""
    return {k: v for k, v in os.environ.items()
            if k != "PYTEST_ADDOPTS" and not k.startswith("PYTEST_XDIST")}  # fmt: skip


@pytest.mark.parametrize(
    "target,select",
    [
        ("bench/bench_nmf.py", "1x128x8 and not compiled"),
        ("bench/bench_nmf.py", "global_iters and T20"),
        ("bench/bench_nmf_torch.py", "32 and 5 and swin"),
        # every mixer at 8^3, forward + backward (CPU: SDPA flash; the CUDA backends skip)
        ("bench/bench_layers.py", "s8 and fwdbwd"),
        # a Factorizer and a CNN training step, Factorizer sliding-window inference
        (
            "bench/bench_models.py",
            "(train and (swin_factorizer-torch or nnunet)) or (infer and global_factorizer-torch)",
        ),
    ],
)
def test_bench_suite_runs(target, select):
    env = _child_env()
    env["OMP_NUM_THREADS"] = "1"  # untimed: one thread is steady on a busy machine
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", target, "--benchmark-disable", "-q", "-k", select,
         "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def _collect(*args):
    """Test ids that ``pytest ARGS --collect-only`` collects from the repository root."""
    env = _child_env()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode in (0, 5), proc.stdout[-3000:] + proc.stderr[-3000:]  # 5: none
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_pytest_benchmark_only_at_the_root_collects_every_suite():
    # tests/ left out only to keep this quick: testpaths holds it too
    ids = _collect("--benchmark-only", "--ignore=tests")
    files = {i.split("::")[0] for i in ids if i.startswith("bench/bench_")}
    assert files == {f"bench/{p.name}" for p in (ROOT / "bench").glob("bench_*.py")}


def _bench_conftest():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "bench" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    path = list(sys.path)
    try:
        spec.loader.exec_module(mod)  # it puts bench/ on sys.path, for the suites' helpers
    finally:
        sys.path[:] = path
    return mod


@pytest.mark.parametrize(
    "args,benchmark_only,collected",
    [
        ([], False, False),  # a plain `pytest`: the suites run only through the smoke test above
        (["-q"], True, True),  # `pytest --benchmark-only`
        (["bench"], False, True),  # `pytest bench [--benchmark-only]`
        (["bench/bench_nmf.py::test_nmf_layer", "-k", "swin"], False, True),  # a file named
        (["tests", "."], False, False),  # the root is not "naming bench/"
    ],
)
def test_bench_conftest_collects_the_suites_only_when_asked(args, benchmark_only, collected):
    from types import SimpleNamespace

    config = SimpleNamespace(
        rootpath=ROOT,
        invocation_params=SimpleNamespace(args=tuple(args), dir=ROOT),
        getoption=lambda name, default=None: (
            benchmark_only if name == "benchmark_only" else default
        ),
    )
    hook = _bench_conftest().pytest_ignore_collect
    assert hook(ROOT / "bench" / "bench_nmf.py", config) is (None if collected else True)
    assert hook(ROOT / "bench" / "tune_window.py", config) is None  # other files: pytest decides


def _determinism_module():
    import importlib.util

    path = ROOT / "bench" / "check_determinism.py"
    spec = importlib.util.spec_from_file_location("check_determinism", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_check_determinism_passes_on_a_deterministic_kernel(tmp_path):
    out = tmp_path / "det.json"
    proc = subprocess.run(
        [sys.executable, "bench/check_determinism.py", "--kernel", "torch", "--device", "cpu",
         "--size", "8", "--channels", "16", "--batch", "1", "--runs", "3", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    report = json.loads(out.read_text())
    assert report["kernel"] == "torch" and len(report["cases"]) == 6  # 3 modes x fp32, bf16
    assert all(c["forward_bitwise_equal"] and c["backward_bitwise_equal"] for c in report["cases"])
    assert report["environment"]["torch"] == __import__("torch").__version__


def test_check_determinism_catches_a_nondeterministic_kernel(monkeypatch, tmp_path):
    """A layer whose output drifts from run to run is reported (and the exit status is 1)."""
    import torch

    mod = _determinism_module()
    real = mod.fastnmf.matricized_nmf

    def noisy(x, v0, **kw):
        y = real(x, v0, **kw)
        return y + 1e-3 * torch.rand((), dtype=y.dtype) * x  # a different sum order each run

    monkeypatch.setattr(mod.fastnmf, "matricized_nmf", noisy)
    r = mod.check_case("torch", torch.device("cpu"), (1, 16, 8), torch.float32, "swin", runs=3)
    assert not r["forward_bitwise_equal"] and r["max_abs_diff_forward"] > 0
    assert not r["backward_bitwise_equal"] and r["max_abs_diff_backward"] > 0
    status = mod.main(["--kernel", "torch", "--device", "cpu", "--size", "8", "--channels", "16",
                       "--batch", "1", "--runs", "2", "--modes", "local", "--dtypes", "fp32",
                       "--out", str(tmp_path / "d.json")])  # fmt: skip
    assert status == 1


@pytest.mark.parametrize(
    "args,problem",
    [(["--runs", "1"], "--runs must be at least 2"), (["--size", "12"], "multiple of the 8^3")],
)
def test_check_determinism_bad_arguments(capsys, args, problem):
    with pytest.raises(SystemExit) as exc:
        _determinism_module().main(args)
    assert exc.value.code == 2 and problem in capsys.readouterr().err


def test_time_designs_runs(tmp_path):
    """bench/time_designs.py (issue 16's GPU measurement) at a tiny shape under the interpreter:
    every requested variant gets a row with times and a difference to design 1 near fp32
    rounding (2 planes: the persistent design's schedule runs)."""
    import json

    mod = load_bench("time_designs")
    out = tmp_path / "designs.json"
    rc = mod.main(["--shape", "1", "8", "16", "8", "8", "--repeats", "1", "--warmup", "0",
                   "--dtypes", "fp32",
                   "--shifts", "[None, 4]", "--variants", "design 1", "design 3",
                   "design 3, ticket tile", "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    names = ["design 1", "design 3", "design 3, ticket tile"]
    assert rc == 0 and [r["variant"] for r in rows] == names
    assert all(r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 for r in rows)
    assert rows[0]["dx_rel_diff_vs_design1"] == 0
    assert all(r["dx_rel_diff_vs_design1"] < 1e-5 for r in rows[1:])


def test_time_designs_times_the_isles_presets_layer(tmp_path, capsys):
    """``--head-dim 4 --window 4 --shifts "[None, 1, 2, 3]"``: the isles preset's layer (E = P
    = 4, sub-boxes of one voxel) runs under the interpreter with the design the code picks (a
    head of 8 channels or a window of 8 would not fit the shape: the run would fail); the
    compiling processes get the same layer; a shape the layer cannot take is refused before
    anything runs. (tests/test_window_fuzz.py checks this layer's values against the oracle.)"""
    import json

    mod = load_bench("time_designs")
    out = tmp_path / "isles.json"
    isles = ["--head-dim", "4", "--window", "4", "--shifts", "[None, 1, 2, 3]"]
    rc = mod.main(["--shape", "1", "4", "8", "4", "4", *isles, "--repeats", "1", "--warmup",
                   "0", "--dtypes", "fp32", "--variants", "default",
                   "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and [r["variant"] for r in rows] == ["default"], rows
    assert rows[0]["fwd_ms"] > 0 and rows[0]["fwdbwd_ms"] > 0
    args = mod._parser().parse_args(["--shape", "1", "8", "8", "12", "8", *isles])
    for cmd in mod._compile_commands(args):
        sub = mod._parser().parse_args(cmd[2:])
        assert (sub.head_dim, sub.window, sub.shifts) == (4, 4, ["[None, 1, 2, 3]"])
    with pytest.raises(SystemExit) as exc:
        mod.main(["--shape", "1", "4", "8", "4", "4", "--window", "8"])
    assert exc.value.code == 2
    assert "D, H, W of --window 8" in capsys.readouterr().err


def test_time_designs_static_compiles_each_variant_with_its_settings(tmp_path):
    """``--static`` (no GPU): each case's launches compiled for sm_90a with its variant's
    settings. The register-capped variant's fused kernels at 64 registers and 32 resident warps
    an SM, the default's above 64 at 16. Under pytest the interpreter is on, so the static suite
    would compile in a process of its own that the variants' TUNING does not reach: the script
    runs again without it, and the cap must still arrive."""
    import json

    from fastnmf.profile.static import ptx_tools

    if ptx_tools.missing_tools(["sm_90a"]):
        pytest.skip("; ".join(ptx_tools.missing_tools(["sm_90a"])))
    mod = load_bench("time_designs")
    out = tmp_path / "static.json"
    capped = "design 3, 64 registers, 2 programs/SM"
    rc = mod.main(["--static", "--shape", "1", "8", "16", "16", "16", "--dtypes", "fp32",
                   "--shifts", "[None, 4]", "--variants", "design 3", capped,
                   "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    by = {(r["variant"], r["pass"]): r for r in rows}
    assert rc == 0 and len(rows) == 4 and len(by) == 4
    for pass_, kernel in (("fwd", "_fused_kernel"), ("bwd", "_fused_bwd_kernel")):
        default, low = by["design 3", pass_], by[capped, pass_]
        assert default["kernel"] == low["kernel"] == kernel
        assert default["regs"] > 64 and default["resident_warps_per_sm"] == 16
        assert low["regs"] <= 64 and low["resident_warps_per_sm"] == 32


def test_time_designs_static_design2_stages_pipeline_two_passes(tmp_path):
    """``"design 2, 3 stages"`` compiled for sm_90a: the two window passes Triton can pipeline
    (forward apply, backward parts) copy their next windows into shared memory without waiting
    (LDGSTS: cp.async), with copies in flight while a window is computed (a loop's
    ``cp.async.wait_group`` leaves some), and hold more of it; the other two (a loop inside theirs)
    compile as at
    the default, which has no such copy anywhere; with ``"design 2, prefetch"`` the other two
    hold the next window in registers; the tiles take other code. At the benchmark shape (meta
    tensors): a program takes 16 windows there (at 16^3 one: no loop to pipeline)."""
    import json

    from fastnmf.profile.static import ptx_tools

    if ptx_tools.missing_tools(["sm_90a"]):
        pytest.skip("; ".join(ptx_tools.missing_tools(["sm_90a"])))
    mod = load_bench("time_designs")
    out = tmp_path / "static.json"
    rc = mod.main(["--static", "--shape", "2", "32", "128", "128", "128", "--dtypes", "fp32",
                   "--shifts", "[None, 4]", "--variants", "design 2", "design 2, 3 stages",
                   "design 2, prefetch", "design 2, parts tile", "design 2, four tiles",
                   "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    by = {(r["variant"], r["kernel"]): r for r in rows}
    assert rc == 0 and len(rows) == 30 and len(by) == 30
    assert all(r["async_copies"] == 0 for r in rows if r["variant"] == "design 2")
    for kernel in ("_apply_kernel", "_parts_bwd_kernel"):
        default, piped = by["design 2", kernel], by["design 2, 3 stages", kernel]
        assert piped["async_copies"] > 0 and piped["smem_bytes"] > default["smem_bytes"]
        assert piped["ptx_async_wait_in_loop"] >= 1 and default["ptx_async_wait_in_loop"] == -1
    for kernel in ("_parts_kernel", "_solve_kernel", "_apply_bwd_kernel2", "_solve_bwd_kernel"):
        default, piped = by["design 2", kernel], by["design 2, 3 stages", kernel]
        assert piped["async_copies"] == 0
        assert (piped["regs"], piped["smem_bytes"]) == (default["regs"], default["smem_bytes"])
    # "design 2, prefetch": those two hold the next window's x (and dy) in registers across
    # their loop, without spilling; the pipelined two compile as at the default
    for kernel in ("_parts_kernel", "_apply_bwd_kernel2"):
        default, pre = by["design 2", kernel], by["design 2, prefetch", kernel]
        assert pre["regs"] > default["regs"] and pre["spill_bytes"] == 0
    for kernel in ("_apply_kernel", "_parts_bwd_kernel"):
        assert by["design 2, prefetch", kernel]["regs"] == by["design 2", kernel]["regs"]
    # "design 2, parts tile": the forward parts pass at 16 warps on the ticket tile (other
    # code), without spilling; the other five as at the default
    tile = by["design 2, parts tile", "_parts_kernel"]
    assert (tile["warps"], tile["spill_bytes"]) == (16, 0)
    assert tile["sass_instructions"] != by["design 2", "_parts_kernel"]["sass_instructions"]
    for kernel in ("_solve_kernel", "_apply_kernel", "_parts_bwd_kernel", "_apply_bwd_kernel2"):
        assert by["design 2, parts tile", kernel]["regs"] == by["design 2", kernel]["regs"]
    # "design 2, four tiles": the backward apply on the run tile too: no CTA barrier (a thread
    # holds its runs' channels; the per-window pass reduces across warps), no spill; the
    # backward parts pass on its tile at 16 warps, not pipelined (no async copy), no spill; the
    # forward apply on the forward output tile at 16 warps, no CTA barrier, no spill
    tile = by["design 2, four tiles", "_apply_bwd_kernel2"]
    assert (tile["barriers"], tile["spill_bytes"]) == (0, 0)
    assert by["design 2", "_apply_bwd_kernel2"]["barriers"] > 0
    tile = by["design 2, four tiles", "_parts_bwd_kernel"]
    assert (tile["warps"], tile["spill_bytes"], tile["async_copies"]) == (16, 0, 0)
    tile = by["design 2, four tiles", "_apply_kernel"]
    assert (tile["warps"], tile["barriers"], tile["spill_bytes"]) == (16, 0, 0)
    assert by["design 2", "_apply_kernel"]["warps"] == 8


def test_time_designs_keeps_what_it_measured_when_cut_short(tmp_path, monkeypatch):
    """The GPU session stops a step at its time limit: the JSON is written after every row, so
    a run stopped during the second variant still holds the first (``_run`` replaced: no
    kernel runs here)."""
    import json

    mod = load_bench("time_designs")
    calls = []

    def fake_run(design, tuning, x, v0, dy, shifts, device, repeats, warmup, timed=True,
                 layer=None):
        calls.append(design)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a timeout's signal would end the run with
        return dict(fwd_ms=1.0, fwdbwd_ms=3.0, y=x, dx=x)

    monkeypatch.setattr(mod, "_run", fake_run)
    monkeypatch.setattr(mod, "copy_bw", lambda device: 1000.0)
    out = tmp_path / "designs.json"
    with pytest.raises(KeyboardInterrupt):
        mod.main(["--shape", "1", "8", "8", "8", "8", "--dtypes", "fp32", "--shifts", "[None, 4]",
                  "--variants", "design 1", "design 3", "--out", str(out)])  # fmt: skip
    doc = json.loads(out.read_text())
    assert [r["variant"] for r in doc["rows"]] == ["design 1"] and doc["rows"][0]["fwd_ms"] == 1.0
    assert [line.split(":")[0] for line in doc["best"]] == ["fp32 [None, 4] fwd",
                                                            "fp32 [None, 4] fwd+bwd"]  # fmt: skip
    assert all("fastest 'design 1'" in line for line in doc["best"])


def test_time_designs_names_the_fastest_variant_against_the_targets(tmp_path, monkeypatch,
                                                                     capsys):  # fmt: skip
    """At the end the fastest variant of each dtype and shift set, forward and forward+backward,
    against issue 16's targets (60 % / 45 % of copy bandwidth), printed and in the JSON; a
    variant that failed is left out (``_run`` replaced: no kernel runs here)."""
    import json

    mod = load_bench("time_designs")
    times = {1: (0.1, 0.4), 2: None, 3: (0.04, 0.3)}  # ms; design 2 fails

    def fake_run(design, tuning, x, v0, dy, shifts, device, repeats, warmup, timed=True,
                 layer=None):
        if times[design] is None:
            raise RuntimeError("no kernel")
        return dict(fwd_ms=times[design][0], fwdbwd_ms=times[design][1], y=x, dx=x)

    monkeypatch.setattr(mod, "_run", fake_run)
    monkeypatch.setattr(mod, "copy_bw", lambda device: 1.0)  # GB/s
    out = tmp_path / "designs.json"
    rc = mod.main(["--shape", "1", "8", "8", "8", "8", "--dtypes", "fp32", "--shifts",
                   "[None, 4]", "--variants", "design 1", "design 2", "design 3",
                   "--out", str(out)])  # fmt: skip
    # 4096 fp32 values: forward 2 x 16384 B, ideally 0.0328 ms at 1 GB/s; fwd+bwd 5 x 16384 B
    best = json.loads(out.read_text())["best"]
    assert rc == 1 and best == [
        "fp32 [None, 4] fwd: fastest 'design 3', 0.040 ms = 81.9 % of copy bandwidth "
        "(target 60 %: met)",
        "fp32 [None, 4] fwd+bwd: fastest 'design 3', 0.300 ms = 27.3 % of copy bandwidth "
        "(target 45 %: missed by 1.65x)",
    ]
    assert best[1] in capsys.readouterr().out


def test_time_designs_compiles_every_case_first_within_a_budget(tmp_path, capsys):
    """On a GPU the cases' kernels are compiled by several processes before the timing: one
    ``--compile-only`` command a case, in the timing's order, each selecting exactly that case;
    the processes run at once, a failing one is reported, and one still running at the budget
    is killed (stand-in commands here: no kernel compiles on a CPU)."""
    import sys
    import time

    mod = load_bench("time_designs")
    args = mod._parser().parse_args(["--shape", "1", "8", "16", "8", "8", "--variants",
                                     "design 1", "design 3", "--compile-budget", "4"])  # fmt: skip
    cases = [c[:3] for c in mod._cases(args)]
    cmds = mod._compile_commands(args)
    assert len(cases) == 8 and len(cmds) == 8  # 2 dtypes x 2 shift sets x 2 variants
    for case, cmd in zip(cases, cmds, strict=True):
        assert cmd[1] == str(ROOT / "bench/time_designs.py") and "--compile-only" in cmd
        sub = mod._parser().parse_args(cmd[2:])
        assert [c[:3] for c in mod._cases(sub)] == [case] and sub.shape == [1, 8, 16, 8, 8]
    py = sys.executable
    stand_ins = [[py, "-c", "import time; time.sleep(2)"]] * 3 + [
        [py, "-c", "import sys; sys.exit('no kernel')"],
        [py, "-c", "import time; time.sleep(60)"],
    ]
    t0 = time.monotonic()
    assert mod._compile_first(args, 5, stand_ins) == 3
    assert time.monotonic() - t0 < 30  # the 60-s one was killed; the three 2-s ones ran at once
    # (one after another the third would have met the 4-s budget)
    err = capsys.readouterr().err
    assert "exit 1: no kernel" in err and "killed at the budget" in err


def test_host_overhead_times_each_pass_without_a_gpu(tmp_path):
    """bench/host_overhead.py: the Triton path's host time a call, its kernels compiled for sm_90a
    by the stub driver and launched into nothing (no GPU); a row per pass, in microseconds. Under
    pytest the interpreter is on: the script runs again without it. Its context puts back what
    it replaced; a kernel's launcher is built once (as a GPU loads its module once)."""
    import importlib
    import json
    from types import SimpleNamespace

    import fastnmf.kernels as kernels
    from triton.compiler.compiler import CompiledKernel

    from fastnmf.profile.static import ptx_tools
    from fastnmf.profile.static.driver import StubDriver

    if ptx_tools.missing_tools(["sm_90a"]):
        pytest.skip("; ".join(ptx_tools.missing_tools(["sm_90a"])))
    mod = load_bench("host_overhead")
    saved = (kernels._interpreter_check, StubDriver.record, CompiledKernel._init_handles)
    with mod._host_only():
        now = (kernels._interpreter_check, StubDriver.record, CompiledKernel._init_handles)
        assert all(a is not b for a, b in zip(now, saved, strict=True))
        # a kernel's launcher built once, as a GPU loads its module once: with a launcher
        # already there, Triton's _init_handles (which reads .module) is not entered
        CompiledKernel._init_handles(SimpleNamespace(_run=object()))
    assert (kernels._interpreter_check, StubDriver.record, CompiledKernel._init_handles) == saved
    users = [importlib.import_module(f"fastnmf.kernels.{m}") for m in ("window_nmf",
                                                                       "_window2_common")]
    with mod._geometry_cache(False):  # --ab: the geometries built every call, then put back
        assert all(m.shared_geometry is not kernels._common.shared_geometry for m in users)
    assert all(m.shared_geometry is kernels._common.shared_geometry for m in users)
    out = tmp_path / "host.json"
    rc = mod.main(["--shifts", "[None]", "--calls", "2", "--repeats", "1", "--ab",
                   "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0 and [(r["shifts"], r["pass_"]) for r in rows] == [("[None]", "fwd"),
                                                                      ("[None]", "fwd+bwd")]
    assert all(0 < r["host_us"] < 1e6 and 0 < r["host_us_uncached"] < 1e6 for r in rows)


def test_host_overhead_splits_a_call_into_host_pipelined_synced_and_kernel_time():
    """bench/host_overhead.py --cuda's split of a call (a GPU's small-shape time), on a stand-in
    call of 2 ms of host time on the CPU device (where synchronising does nothing and no kernel
    runs); off a GPU --cuda refuses with a clear error."""
    import time

    import torch

    mod = load_bench("host_overhead")
    r = mod.device_split(lambda: time.sleep(0.002), torch.device("cpu"), calls=3, repeats=2)
    assert r["kernel_us"] == 0 and r["kernels"] == {}
    for key in ("host_us", "pipelined_us", "synced_us"):
        assert 2000 <= r[key] < 20000, (key, r)
    assert r["host_us"] <= r["pipelined_us"]  # the calls' own time, within the round's
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--cuda: no CUDA device"):
            mod.main(["--cuda", "--shifts", "[None, 4]"])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
def test_check_bounds_runs_a_variant_and_fails_on_an_out_of_bounds_access(tmp_path, monkeypatch):
    """bench/check_bounds.py: a variant at a ragged shape under the counter, a JSON row, exit 0;
    exit 1 with the error in the row when the counter refuses an access."""
    import json

    from fastnmf.profile.static import counter

    mod = load_bench("check_bounds")
    out = tmp_path / "bounds.json"
    args = ["--variants", "design 2, four tiles", "--shapes", "8x16x24", "--shifts", "[None, 4]",
            "--out", str(out)]  # fmt: skip
    assert mod.main(args) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["variant"], row["ok"], row["error"]) == ("design 2, four tiles", True, None)

    def refuse(case):
        raise counter.OutOfBounds("_apply_kernel: an access falls before every tensor argument")

    monkeypatch.setattr(counter, "count_call", refuse)
    assert mod.main(args) == 1
    (row,) = json.loads(out.read_text())["rows"]
    assert not row["ok"] and row["error"].startswith("OutOfBounds: _apply_kernel")
