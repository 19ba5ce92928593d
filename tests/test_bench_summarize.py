"""bench/summarize_nmf.py: issue 8's targets from bench_nmf.py JSON (synthetic inputs test the
bookkeeping — met, missed by how much, not measured — not any device's figures)."""

import json

import pytest
from conftest import load_bench


@pytest.fixture(scope="module")
def summ():
    return load_bench("summarize_nmf")


def _bench(kernel, pass_, median_s, mode="swin", shape="2x32x128^3", **info):
    group = f"{mode} {shape} float32 {pass_}"
    return dict(name=f"test_nmf_layer[{kernel}-{pass_}]", group=group,
                params=dict(kernel=kernel, pass_=pass_, mode=mode),
                stats=dict(median=median_s),
                extra_info=dict(device="Fake GPU", torch="2.x", triton="3.x", **info))  # fmt: skip


def _iters(kernel, iters, pass_, median_s):
    return dict(name=f"test_global_iters[{kernel}-T{iters}-{pass_}]",
                group=f"global-iters 2x32x128^3 float32 {pass_} {kernel}",
                params=dict(kernel=kernel, iters=iters, pass_=pass_), stats=dict(median=median_s),
                extra_info=dict(device="Fake GPU"))  # fmt: skip


def _write(tmp_path, benchmarks, name="b.json"):
    path = tmp_path / name
    path.write_text(json.dumps(dict(benchmarks=benchmarks)))
    return str(path)


def test_targets_met_missed_and_not_measured(summ, tmp_path):
    files = [
        _write(tmp_path, [
            _bench("triton", "fwd", 0.001, pct_copy_bandwidth=90.0),
            _bench("triton", "fwd+bwd", 0.004, pct_copy_bandwidth=30.0, saved_over_input=1.0),
            _bench("reference", "fwd+bwd", 0.080),
            _iters("triton", 1, "fwd", 0.010), _iters("triton", 20, "fwd", 0.0105),
            _iters("triton", 1, "fwd+bwd", 0.010), _iters("triton", 20, "fwd+bwd", 0.030),
        ]),
    ]  # fmt: skip
    rows, env = summ.load(files)
    assert env["device"] == "Fake GPU"
    checks = {c["target"].split(": ")[0]: c for c in summ.targets(rows, "2x32x128^3", "triton")}
    by = {k.split("fp32 ")[-1]: v for k, v in checks.items()}
    assert by["forward >= 80 % of copy bandwidth"]["status"].startswith("met (1.12x")
    assert by["forward+backward >= 60 % of copy bandwidth"]["status"] == "missed by 2.00x"
    assert by["forward+backward >= 10x reference"]["status"].startswith("met (2.00x")
    assert by["forward+backward >= 3x torch.compile(reference)"]["status"] == "not measured"
    assert by["memory kept for backward <= 1.1x the input"]["status"].startswith("met")
    assert checks["global fwd"]["status"].startswith("met")
    assert checks["global fwd+bwd"]["status"] == "missed by 2.73x"


def test_cli_writes_json_and_markdown(summ, tmp_path):
    src = _write(tmp_path, [_bench("triton", "fwd", 0.002, pct_copy_bandwidth=50.0,
                                   gb_per_s=2000.0, peak_bytes=2**30),
                            _bench("torch", "fwd", 0.006)])  # fmt: skip
    out_json, out_md = tmp_path / "r/nmf.json", tmp_path / "r/nmf.md"
    assert summ.main([src, "--json", str(out_json), "--md", str(out_md)]) == 0
    data = json.loads(out_json.read_text())
    assert data["environment"]["device"] == "Fake GPU" and len(data["rows"]) == 2
    md = out_md.read_text()
    assert "missed by 1.60x" in md and "**not measured**" in md
    assert "| swin | 2x32x128^3 | float32 | fwd | torch | 6.000 |" in md and "| 3.00x |" in md
    assert "| 1024.0 |" in md  # peak MiB


def test_bad_inputs_name_the_problem(summ, tmp_path):
    with pytest.raises(SystemExit, match="cannot read .*missing.json"):
        summ.main([str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="no bench_nmf.py benchmarks"):
        summ.main([_write(tmp_path, [])])


def test_a_case_in_two_files_counts_once(summ, tmp_path):
    a = _write(tmp_path, [_bench("triton", "fwd", 0.001, pct_copy_bandwidth=90.0)], "a.json")
    b = _write(tmp_path, [_bench("triton", "fwd", 0.002, pct_copy_bandwidth=45.0)], "b.json")
    rows, _ = summ.load([a, b])
    assert len(rows) == 1 and rows[0]["median_ms"] == 1.0
