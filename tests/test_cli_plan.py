"""``fastnmf plan``, ``fastnmf train --compile / --gpu-memory`` and the model suite's compile."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TRAIN_ARGS

from fastnmf.cli import main
from fastnmf.plan import plan

TINY_ARGS = [*TINY_TRAIN_ARGS, "--workers=0", "--device=cpu", "--no-progress"]


def test_cli_plan_prints_the_planners_choice(capsys):
    args = dict(model="nnunet", preset="brats", gpu_memory="0.9GB", amp="bf16", crop=48)
    expected = plan(**args)
    rc = main(["plan", "--model=nnunet", "--preset=brats", "--gpu-memory=0.9GB", "--amp",
               "--crop=48"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert (expected.batch, expected.crop) == (1, 48)  # batch 2 does not fit 0.9 GB - 15 %
    assert f"plan: {expected.summary()}" in out
    assert f"--batch-size {expected.batch} --crop-size {expected.crop} --amp bf16" in out
    # every candidate asked is listed with its predicted peak
    for t in expected.tried:
        line = f"crop {t['crop']}^3, batch {t['batch']}, checkpointing off: "
        assert f"{line}{t['predicted_peak_bytes'] / 1e9:.2f} GB" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model=swin_factorizer", "--gpu-memory=24 parsecs"], "unknown memory unit 'parsecs'"),
        (["--model=swin_factorizer", "--gpu-memory=GB"], "gpu memory must be a size"),
        (["--model=transunet", "--gpu-memory=24GB"], "available models: factorizer"),
        (["--model=nnunet", "--preset=lits", "--gpu-memory=24GB"], "valid presets: brats, isles"),
        (["--model=nnunet", "--gpu-memory=1MB", "--crop=32"], "smallest predicted peak was"),
    ],
)
def test_cli_plan_bad_input_is_one_line(capsys, args, message):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastnmf plan: error: ") and message in err
    assert "Traceback" not in err


def test_cli_train_rejects_bad_memory_and_backend(capsys, tmp_path):
    rc = main(["train", *TINY_ARGS, "--gpu-memory=8 parsecs", f"--out={tmp_path / 'r'}"])
    assert rc == 2 and "unknown memory unit 'parsecs'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--compile=turbo"])
    assert "invalid choice: 'turbo'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_train_compiled_and_planned_checkpoint_infers(demo_cache, capsys, tmp_path):
    """A 1-step run under torch.compile (aot_eager) with a memory plan: config.json holds the
    plan the planner makes for this model, the checkpoint holds the plain model's parameter
    names (no ``_orig_mod.``) and ``fastnmf infer`` segments with it."""
    out = tmp_path / "run"
    # head_dim 8: the NMF traffic model covers it analytically (E = 4 is counted by running the
    # kernels under the interpreter: slow)
    rc = main(["train", *TINY_ARGS, "--model-opt=head_dim=8", "--steps=1", "--val-every=1",
               "--val-cases=1", "--no-eval", "--compile=aot_eager", "--gpu-memory=8GB",
               f"--out={out}"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["compile"] == "aot_eager" and cfg["gpu_memory"] == "8GB"
    opts = {**cfg["model_options"], "in_channels": 4, "out_channels": 3}
    expected = plan(model="swin_factorizer", preset="brats", gpu_memory="8GB", amp="none",
                    max_batch=2, crop=16, model_options=opts)  # fmt: skip
    assert cfg["plan"]["predicted_peak_bytes"] == expected.predicted_peak_bytes
    assert (cfg["batch_size"], cfg["crop_size"], cfg["model_options"]["checkpoint"]) == (
        expected.batch, expected.crop, expected.checkpoint)  # fmt: skip
    assert f"memory plan for 8GB: {expected.summary()}" in text
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["plan"] == cfg["plan"]
    assert not [k for k in ckpt["model"] if "_orig_mod" in k]
    rc = main(["infer", f"--checkpoint={out}", "--no-png", "--device=cpu",
               f"--out={tmp_path / 'pred'}"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 1


def test_model_suite_compiled_case():
    from fastnmf.profile.model_suite import model_cases, run_model_case

    with pytest.raises(ValueError, match="valid: inductor, aot_eager, eager"):
        model_cases("cpu", models=["swin_factorizer"], compile="turbo")
    (case,) = model_cases("cpu", models=["swin_factorizer"], kernels=["torch"], tasks=["train"],
                          compile="aot_eager")  # fmt: skip
    assert case.id.startswith("swin_factorizer-torch-compile_aot_eager-train")
    from torch._dynamo.utils import counters

    counters.clear()
    row = run_model_case(case, "cpu", repeats=1, warmup=0)
    assert counters["stats"]["unique_graphs"] >= 1  # the model was compiled
    assert row["status"] == "ok" and row["compile"] == "aot_eager", row.get("reason")
    assert row["median_ms"] > 0


def test_check_peak_writes_measured_beside_predicted(tmp_path, monkeypatch):
    """On CUDA the end of training compares the measured peak with the plan's prediction (here
    the CUDA calls are stood in for: no GPU)."""
    import dataclasses

    from fastnmf.config import resolve
    from fastnmf.plan import check_peak

    cfg = resolve("demo", gpu_memory="8GB")
    assert check_peak(cfg, torch.device("cuda"), tmp_path) is None  # no plan made yet
    cfg = dataclasses.replace(cfg, plan={"predicted_peak_bytes": 3_000_000_000})
    assert check_peak(cfg, torch.device("cpu"), tmp_path) is None  # no GPU, nothing measured
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2_500_000_000)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in GPU")
    line = check_peak(cfg, torch.device("cuda"), tmp_path)
    assert "measured 2.50 GB" in line and "predicted 3.00 GB (+20%)" in line
    doc = json.loads((tmp_path / "memory.json").read_text())
    assert doc["measured_peak_bytes"] == 2_500_000_000 and doc["error"] == pytest.approx(0.2)


@pytest.mark.parametrize("nbytes, text", [(20_077_783_988, "20.08 GB"), (1e8, "0.10 GB"),
                                          (9_589_204, "9.6 MB"), (870_000, "0.9 MB")])  # fmt: skip
def test_format_size(nbytes, text):
    from fastnmf.plan import format_size

    assert format_size(nbytes) == text
