"""``fastnmf profile`` and :mod:`fastnmf.profile`: the cases compare what they say they compare,
and the report (table.md, table.csv, PNG plots) is written on the CPU at tiny shapes."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import load_bench

from fastnmf import profile as P
from fastnmf.cli import main


@pytest.fixture(scope="module")
def bench_targets():
    """bench/targets.py: the issue targets live with the benchmarks, not in the library."""
    return load_bench("targets")


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()  # ``fastnmf profile`` on a CPU sets one thread
    yield
    torch.set_num_threads(threads)


def test_windows_round_trip_and_content():
    x = torch.randn(2, 12, 8, 16, 24)  # (B, C, D, H, W), E = 4, P = 8
    w = P.to_windows(x, 4, 8)  # (B nW, H, P^3, E)
    assert w.shape == (2 * 1 * 2 * 3, 3, 512, 4)
    assert torch.equal(P.from_windows(w, x.shape, 4, 8), x)
    # window (b=1, d=0, h=1, w=2), head 2 = channels 8..11 of that block
    block = x[1, 8:12, 0:8, 8:16, 16:24].reshape(4, -1).T  # (P^3, E)
    assert torch.equal(w[1 * 6 + 0 * 6 + 1 * 3 + 2, 2], block)


def test_window_sdpa_core_is_attention_per_window():
    x = torch.randn(1, 8, 8, 8, 16, dtype=torch.float64)
    y = P.WindowSDPA(8, head_dim=4, window=8, backend="math").double()(x)
    for sl in (slice(0, 8), slice(8, 16)):
        for h in range(2):
            t = x[0, 4 * h : 4 * h + 4, :, :, sl].reshape(4, -1).T  # (N, E), q = k = v
            ref = torch.softmax(t @ t.T / 2.0, dim=-1) @ t  # scale 1 / sqrt(E)
            got = y[0, 4 * h : 4 * h + 4, :, :, sl].reshape(4, -1).T
            torch.testing.assert_close(got, ref)
    g = P.WindowSDPA(8, head_dim=4, window=None, backend="math").double()(x)
    t = x[0, :4].reshape(4, -1).T
    torch.testing.assert_close(g[0, :4].reshape(4, -1).T, F.softmax(t @ t.T / 2, -1) @ t)


def test_every_mixer_maps_bcs_to_bcs():
    for mixer in P.MIXERS:
        impl = "math" if P.MIXERS[mixer][1] == P.SDPA_BACKENDS else P.MIXERS[mixer][1][-1]
        if impl == "compiled-reference":
            impl = "reference"
        case = P.LayerCase(mixer, impl, 1, 16, 8, "fp32", "fwdbwd")
        module = P.build_mixer(case, torch.device("cpu"))
        x = torch.randn(case.shape, requires_grad=True)
        y = module(x)
        assert y.shape == x.shape, mixer
        y.square().sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, mixer


def test_unsupported_cases_say_why():
    cpu = torch.device("cpu")
    row = P.run_layer_case(P.LayerCase("nmf-swin", "triton", 1, 32, 8, "fp32", "fwd"), cpu)
    assert row["status"] == "unsupported" and "CUDA" in row["reason"]
    big = P.LayerCase("sdpa-global", "math", 1, 32, 64, "fp32", "fwdbwd")
    with pytest.raises(P.Unsupported, match="GiB"):
        P.prepare_layer(big, cpu)
    row = P.run_model_case(P.model_cases(cpu, models=["nnunet"], dtypes=["bf16"])[0], cpu)
    assert row["status"] == "unsupported" and "CUDA" in row["reason"]


def test_model_case_with_checkpointing_runs_and_is_marked(tmp_path):
    cpu = torch.device("cpu")
    rows = {}
    for ckpt in (False, True):
        (case,) = P.model_cases(cpu, models=["swin_factorizer"], kernels=["torch"],
                                tasks=["train"], checkpoint=ckpt)  # fmt: skip
        assert case.checkpoint is ckpt and ("-ckpt-" in case.id) is ckpt
        net = P.build_model(case)
        assert all(b.checkpoint is ckpt for b in net.blocks)
        rows[ckpt] = P.run_model_case(case, cpu, repeats=1)
        assert rows[ckpt]["status"] == "ok" and rows[ckpt]["checkpoint"] is ckpt
    table = P.write_report(list(rows.values()), tmp_path, P.environment(cpu))
    md = next(p for p in table if p.name == "table.md").read_text()
    assert md.count("torch + checkpointing") == 1
    (base,) = P.model_cases(cpu, models=["nnunet"], tasks=["train"], checkpoint=True)
    assert not base.checkpoint  # baselines run as they are


def test_targets_report_met_and_missed(bench_targets, tmp_path):
    def row(subject, impl, ms, mem, task="fwdbwd", suite="layer", **kw):
        return dict(
            suite=suite,
            subject=subject,
            impl=impl,
            shape="2x32x64^3",
            dtype="bf16",
            task=task,
            status="ok",
            median_ms=ms,
            peak_bytes=mem,
            per_s=1000 / ms,
            **kw,
        )

    rows = [
        row("nmf-swin", "triton", 2.0, 100),
        row("sdpa-window", "flash", 3.0, 50),
        row("swin_factorizer", "triton", 100.0, 7e9, task="train", suite="model"),
        row("swin_factorizer", "reference", 400.0, 3e10, task="train", suite="model"),
        row("nnunet", "-", 150.0, 9e9, task="train", suite="model"),
    ]
    lines = bench_targets.targets(rows)
    text = "\n".join(lines)
    assert "NMF 1.50x as fast: met" in text and "missed by 2.00x" in text  # memory 100 vs 50
    assert "4.00x the throughput of reference (target >= 3x: met)" in text
    assert "peak 7.00 GB (target <= 8 GB: met)" in text
    assert "vs nnunet" in text and "(faster)" in text and "(leaner)" in text
    # the library's report embeds them only when given the function
    env = {k: "-" for k in ("device", "torch", "triton", "cuda", "fastnmf", "commit", "time")}
    for with_targets in (False, True):
        out = tmp_path / str(with_targets)
        P.write_report([], out, env, targets=(lambda _rows: lines) if with_targets else None)
        md = (out / "table.md").read_text()
        assert ("## Targets" in md) == with_targets and ("NMF 1.50x" in md) == with_targets


def test_profile_cli_writes_table_and_plots(tmp_path, capsys, bench_targets):
    out = tmp_path / "prof"
    args = ["profile", "--device", "cpu", "--out", str(out), "--quiet"]
    args += "--sizes 8 16 --repeats 1 --threads 1 --models swin_factorizer nnunet".split()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"written to {out}/" in printed and "bench/targets.py" in printed
    for name in (
        "table.md",
        "table.csv",
        "meta.json",
        "layer_time.png",
        "layer_memory.png",
        "nmf_bandwidth.png",
        "model_throughput.png",
    ):
        assert (out / name).stat().st_size > 0, name
    with open(out / "table.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == P.COLUMNS
        rows = list(reader)
    cpu = torch.device("cpu")
    expected = [c.id for c in P.layer_cases(cpu, sizes=[8, 16])]
    expected += [c.id for c in P.model_cases(cpu, models=["swin_factorizer", "nnunet"])]
    assert [r["id"] for r in rows] == expected
    ok = [r for r in rows if r["status"] == "ok"]
    # on a CPU only the CUDA-only SDPA backends and oversized global attention may be missing
    assert len(ok) >= len(rows) - 4
    for r in rows:
        assert r["status"] in ("ok", "unsupported"), (r["id"], r["reason"])
        if r["status"] != "ok":
            assert r["reason"], r["id"]
            continue
        for key in ("median_ms", "per_s"):
            v = float(r[key])
            assert math.isfinite(v) and v > 0, (r["id"], key)
        if r["suite"] == "layer" and r["task"] == "fwdbwd":
            assert int(r["saved_bytes"]) > 0, r["id"]
        if r["suite"] == "layer" and r["subject"].startswith("nmf-") and r["scope"] == "core":
            assert 0 < float(r["pct_copy_bandwidth"]) < 1000, r["id"]
        if r["suite"] == "model":
            assert int(r["params"]) > 0 and float(r["gflops"]) > 0, r["id"]
    subjects = {(r["subject"], r["impl"]) for r in ok}
    for want in [
        ("nmf-swin", "torch"),
        ("nmf-global", "reference"),
        ("sdpa-window", "flash"),
        ("monai-window", "eager"),
        ("favor", "torch"),
        ("nmf-swin-layer", "torch"),
        ("swin_factorizer", "torch"),
        ("nnunet", "-"),
    ]:
        assert want in subjects, want
    meta = json.loads((out / "meta.json").read_text())["environment"]
    assert meta["torch"] == torch.__version__ and meta["device"].startswith("cpu")
    md = (out / "table.md").read_text()
    assert "## Layer suite" in md and "## Model suite" in md and "## Targets" not in md
    assert meta["device"] in md
    assert bench_targets.main([str(out / "meta.json")]) == 0
    assert "swin NMF (torch) vs sdpa-window flash" in capsys.readouterr().out


def test_profile_cli_bad_input(capsys):
    assert main(["profile", "--device", "cpu", "--mixers", "bogus"]) == 2
    assert "unknown mixer 'bogus'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["profile", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_per_call_splits_a_profile_by_name():
    """``timing.per_call`` (what ``kernel_ms`` makes of a GPU profile) on a real CPU profile: an op
    run 3 times a call over 2 calls counts 3 launches a call and its time over 2; the largest
    time first; ``kernel_ms`` off CUDA has nothing to split."""
    from fastnmf.profile.timing import kernel_ms, per_call

    a = torch.randn(128, 128)

    def call():
        for _ in range(3):
            torch.mm(a, a)
        torch.relu(a)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            call()
    averages = prof.key_averages()
    split = per_call(averages, 2, "self_cpu_time_total")
    assert split["aten::mm"]["launches"] == 3 and split["aten::relu"]["launches"] == 1
    mm_total = next(ev.self_cpu_time_total for ev in averages if ev.key == "aten::mm")
    assert split["aten::mm"]["ms"] == pytest.approx(mm_total / 2 / 1e3, abs=1e-4)
    times = [v["ms"] for v in split.values()]
    assert times == sorted(times, reverse=True) and all(t > 0 for t in times)
    assert kernel_ms(call, torch.device("cpu")) == {}
