"""bench/time_designs.py's reference row, bitwise repeats and shortlist, and bench/with_variant.py
(what a GPU session runs after the designs' timing): no kernel runs here."""

import importlib
import json
import sys

import pytest
import torch
from conftest import load_bench

sched = importlib.import_module("fastnmf.kernels._window3_sched")
wn = importlib.import_module("fastnmf.kernels.window_nmf")  # the package exports the function


def _fake_times(mod, monkeypatch, times):
    """``_run`` replaced: (fwd ms, fwd+bwd ms) a design (0: the reference), None: it fails."""

    def fake_run(design, tuning, x, v0, dy, shifts, device, repeats, warmup, timed=True,
                 layer=None):
        if times[design] is None:
            raise RuntimeError("no kernel")
        fwd, fwdbwd = times[design]
        split = {"_parts_kernel": {"ms": fwd / 2, "launches": 1.0},
                 "_solve_kernel": {"ms": fwd / 4, "launches": 2.0}}  # fmt: skip
        return dict(fwd_ms=fwd, fwdbwd_ms=fwdbwd, y=x, dx=x, bitwise_repeat=design != 2,
                    kernels={"fwd": split, "fwdbwd": {}})  # fmt: skip

    monkeypatch.setattr(mod, "_run", fake_run)
    monkeypatch.setattr(mod, "copy_bw", lambda device: 1.0)  # GB/s


def test_rows_keep_and_print_the_kernel_split(tmp_path, monkeypatch, capsys):
    """Each row's per-kernel split (``_run``'s "kernels": on a GPU ``kernel_ms`` of its forward
    and forward + backward) goes into the JSON and is printed under the row, its sum first; an
    empty split (off CUDA) prints nothing."""
    mod = load_bench("time_designs")
    _fake_times(mod, monkeypatch, {1: (0.4, 0.8), 2: (0.2, 0.5)})
    out = tmp_path / "designs.json"
    mod.main(["--shape", "1", "8", "8", "8", "8", "--dtypes", "fp32", "--shifts", "[None, 4]",
              "--variants", "design 1", "design 2", "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert rows[1]["kernels"]["fwd"]["_solve_kernel"] == {"ms": 0.05, "launches": 2.0}
    printed = capsys.readouterr().out.splitlines()
    i = next(i for i, line in enumerate(printed) if "design 2" in line)
    assert printed[i + 1] == ("    fwd    kernels 0.150 ms: _parts_kernel 0.100 x1, "
                              "_solve_kernel 0.050 x2")  # fmt: skip
    assert "fwdbwd" not in "\n".join(printed)


def test_reference_row_and_speedup_against_the_target(tmp_path, monkeypatch):
    """The reference is timed like a variant but never named the fastest (here its forward is
    the fastest); the fastest variant's forward + backward over the reference's, against the 10x
    target, and each row's bitwise repeat recorded."""
    mod = load_bench("time_designs")
    _fake_times(mod, monkeypatch, {1: (0.1, 0.4), 2: (0.2, 0.5), 3: (0.04, 0.3), 0: (0.03, 2.4)})
    out = tmp_path / "designs.json"
    rc = mod.main(["--shape", "1", "8", "8", "8", "8", "--dtypes", "fp32", "--shifts",
                   "[None, 4]", "--variants", "design 1", "design 2", "design 3", "reference",
                   "--out", str(out)])  # fmt: skip
    doc = json.loads(out.read_text())
    assert rc == 0 and [r["bitwise_repeat"] for r in doc["rows"]] == [True, False, True, True]
    assert doc["best"][0].startswith("fp32 [None, 4] fwd: fastest 'design 3', 0.040 ms")
    assert doc["best"][2] == ("fp32 [None, 4] fwd+bwd: fastest 'design 3' 8.0x the reference "
                              "(2.400 ms; target 10x: missed by 1.25x)")  # fmt: skip
    _fake_times(mod, monkeypatch, {1: (0.1, 0.4), 3: (0.04, 0.2), 0: (0.09, 2.4)})
    mod.main(["--shape", "1", "8", "8", "8", "8", "--dtypes", "fp32", "--shifts", "[None, 4]",
              "--variants", "design 1", "design 3", "reference", "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["best"][2].endswith("12.0x the reference (2.400 ms; "
                                                           "target 10x: met)")  # fmt: skip


def test_shortlist_and_compile_commands(capsys):
    """``--shortlist`` selects SHORTLIST (the reference last) and excludes ``--variants``; the
    reference has no kernel, so no compile command."""
    mod = load_bench("time_designs")
    args = mod._parser().parse_args(["--variants", "reference", "design 3", "design 1"])
    # variant by variant in the order given, each in every dtype and shift set: a run cut short
    # (or a compile budget run out) keeps the first variants of every case
    groups = [(d, s) for d in mod.DTYPES for s in mod.DEFAULT_SHIFTS]
    assert [c[:3] for c in mod._cases(args)] == [
        (d, s, v) for v in ("reference", "design 3", "design 1") for d, s in groups]
    cmds = mod._compile_commands(args)
    assert [cmd[-1] for cmd in cmds] == ["design 3"] * 4 + ["design 1"] * 4
    names = [v[0] for v in mod.VARIANTS]
    assert set(mod.SHORTLIST) <= set(names) and len(set(mod.SHORTLIST)) == len(mod.SHORTLIST)
    assert mod.SHORTLIST[0] == "design 1" and mod.SHORTLIST[-1] == mod.REFERENCE
    with pytest.raises(SystemExit) as exc:
        mod.main(["--shortlist", "--variants", "design 1"])
    assert exc.value.code == 2 and "--shortlist and --variants" in capsys.readouterr().err


def _designs_json(path, rows):
    path.write_text(json.dumps(dict(rows=rows)))
    return str(path)


def test_best_variant_is_the_fastest_forward_backward_of_its_case(tmp_path):
    wv = load_bench("with_variant")
    row = dict(dtype="fp32", shifts="[None, 4]")
    rows = [dict(row, variant="design 1", fwdbwd_ms=3.0),
            dict(row, variant="design 3, four tiles", fwdbwd_ms=1.0),
            dict(row, variant="design 3", error="RuntimeError: no kernel"),
            dict(row, variant="reference", fwdbwd_ms=0.5),  # never chosen
            dict(row, variant="design 2", fwdbwd_ms=0.7, dtype="bf16"),
            dict(row, variant="design 3", fwdbwd_ms=0.6, shifts="[None, 2, 4, 6]")]  # fmt: skip
    path = _designs_json(tmp_path / "d.json", rows)
    assert wv.best_variant(path) == "design 3, four tiles"
    assert wv.best_variant(path, "bf16") == "design 2"
    assert wv.best_variant(path, shifts="[None, 2, 4, 6]") == "design 3"
    assert wv.best_variant(path, "fp16") is None


def test_the_command_runs_with_the_variant_set_then_restored(tmp_path, monkeypatch):
    """The script runs in this process as ``__main__`` with the variant's design and TUNING set,
    and both are back to the code's defaults afterwards; its exit status is the command's."""
    wv = load_bench("with_variant")
    seen = tmp_path / "seen.json"
    script = tmp_path / "show.py"
    script.write_text(
        "import importlib, json, sys\n"
        "s = importlib.import_module('fastnmf.kernels._window3_sched')\n"
        "w = importlib.import_module('fastnmf.kernels.window_nmf')\n"
        f"json.dump([w.TUNING['design'], s.TUNING['tile'], s.TUNING['out_tile'], sys.argv[1:]], "
        f"open({str(seen)!r}, 'w'))\n"
        "sys.exit(3)\n"
    )
    before = (wn.TUNING["design"], dict(sched.TUNING))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as exc:
        wv.main(["--variant", "design 3, four tiles", "--", str(script), "a", "b"])
    assert exc.value.code == 3
    assert json.loads(seen.read_text()) == [3, True, True, ["a", "b"]]
    assert (wn.TUNING["design"], dict(sched.TUNING)) == before
    row = dict(dtype="fp32", shifts="[None, 4]", variant="design 2", fwdbwd_ms=1.0)
    path = _designs_json(tmp_path / "d.json", [row])
    with pytest.raises(SystemExit):
        wv.main(["--best", path, "--", str(script)])
    assert json.loads(seen.read_text())[:2] == [2, None]
    with pytest.raises(SystemExit):  # nothing timed: the code's defaults
        wv.main(["--best", path, "--dtype", "bf16", "--", str(script)])
    assert json.loads(seen.read_text())[:2] == [before[0], before[1]["tile"]]


def test_each_design_variant_sets_its_own_tuning_then_restores_it():
    """A design 2 variant sets ``_window2_common.TUNING`` (design 3's stays as it was), a design 3
    variant ``_window3_sched.TUNING``; both are restored; a key the design's TUNING lacks is an
    error that names it, not a setting silently ignored."""
    mod = load_bench("time_designs")
    common2 = importlib.import_module("fastnmf.kernels._window2_common")
    before = (dict(common2.TUNING), dict(sched.TUNING), wn.TUNING["design"])
    variants = {name: (design, tuning) for name, design, tuning in mod.VARIANTS}
    with mod._tuned(*variants["design 2, 16 warps"]):
        assert (wn.TUNING["design"], common2.TUNING["warps"]) == (2, 16)
        assert sched.TUNING == before[1]
    with mod._tuned(*variants["design 3, 8 warps"]):
        assert (wn.TUNING["design"], sched.TUNING["warps"]) == (3, 8)
        assert common2.TUNING == before[0]
    # 32 resident warps an SM: every design 2 launch at 16 warps (the solves one) and capped at 64
    x = torch.empty(1, 8, 16, 16, 16, device="meta")
    with mod._tuned(*variants["design 2, 16 warps, 64 registers"]):
        geo2 = common2._Geometry2(x, 8, (8, 8, 8), [None, 4])
        opts = {name: geo2.launch(name) for name in ("parts", "solve", "apply", "apply_bwd")}
    assert opts["solve"] == {"num_warps": 1, "maxnreg": 64}
    assert all(opts[n] == {"num_warps": 16, "maxnreg": 64} for n in ("parts", "apply", "apply_bwd"))
    assert "maxnreg" not in common2._Geometry2(x, 8, (8, 8, 8), [None, 4]).launch("parts")
    assert (dict(common2.TUNING), dict(sched.TUNING), wn.TUNING["design"]) == before
    # a design 1 variant: window_nmf.TUNING, which the stats launches read
    geo = wn._Geometry(x, 8, (8, 8, 8), [None])
    assert "maxnreg" not in wn._stats_launch(geo)
    with mod._tuned(*variants["design 1, stats at 128 registers"]):
        assert wn.TUNING["design"] == 1 and wn._stats_launch(geo)["maxnreg"] == 128
        assert (common2.TUNING, sched.TUNING) == before[:2]
    with mod._tuned(*variants["design 1, chunks of 64"]):
        assert wn.TUNING["chunk"] == 64
    assert (wn.TUNING["chunk"], wn.TUNING["stats_maxnreg"], wn.TUNING["design"]) == (
        None, None, before[2])  # fmt: skip
    with pytest.raises(ValueError, match="tile"):
        with mod._tuned(2, {"tile": True}):
            pass


def test_gpu_session_names_only_variants_that_exist():
    """Each variant that bench/gpu_session.sh passes to ``time_designs.py --variants`` is one of
    VARIANTS (a misspelt name would cost a GPU lease its phase: argparse refuses it there)."""
    import re
    import shlex
    from pathlib import Path

    mod = load_bench("time_designs")
    script = (Path(__file__).resolve().parents[1] / "bench/gpu_session.sh").read_text()
    words = shlex.split(script.replace("\\\n", " "), comments=True)
    starts = [i for i, w in enumerate(words) if w == "--variants"]
    assert starts, "gpu_session.sh no longer passes --variants: update this test"
    names = {v[0] for v in mod.VARIANTS}
    for i in starts:
        given = []
        for w in words[i + 1:]:
            if w.startswith("--") or re.fullmatch(r"[;|&]+", w):
                break
            given.append(w)
        assert given and set(given) <= names, sorted(set(given) - names)
