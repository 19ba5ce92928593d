"""The training / inference / evaluation pipeline on a tiny demo set (4 cases of 32³)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    TINY_MODEL_OPTIONS,
    TINY_RUN,
    TINY_TRAIN_ARGS,
    assert_same_training_state,
    tiny_config,
)

from fastnmf import data as fdata
from fastnmf.config import TrainConfig
from fastnmf.evaluate import case_metrics, compare, evaluate
from fastnmf.infer import cases_for, infer, load_checkpoint, model_from_checkpoint
from fastnmf.train import DeepSupervisionLoss, TrainingDiverged, train, warmup_cosine


def tiny(**kw) -> TrainConfig:
    """The tiny demo run of these tests: 4 steps, dropout (exercises the RNG state on resume)."""
    model = {**TINY_MODEL_OPTIONS, "dropout": 0.1}
    base = dict(**TINY_RUN, model_options=model, steps=4, warmup=1, val_every=2)
    return tiny_config(**{**base, **kw})


@pytest.fixture(scope="module")
def run(demo_cache, tmp_path_factory):
    """A finished 4-step run with the final inference + evaluation."""
    out = tmp_path_factory.mktemp("run")
    result = train(tiny(evaluate=True), out=out, progress=False, verbose=False)
    return out, result


# ----------------------------------------------------------------------------------------------
# training


def test_few_step_training_writes_everything(run):
    out, result = run
    assert result.finished and result.step == 4
    for name in ("config.json", "last.pt", "best.pt", "train.csv", "val.csv"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    val = (out / "val.csv").read_text().splitlines()
    assert val[0] == "step,ET,TC,WT,mean,loss"
    assert [r.split(",")[0] for r in val[1:]] == ["0", "2", "4"]
    cfg = TrainConfig.load(out / "config.json")
    assert cfg.steps == 4 and cfg.model_options["widths"] == [8, 16, 32]
    ckpt = load_checkpoint(out / "last.pt")  # weights_only=True
    assert ckpt["step"] == 4 and ckpt["config"] == cfg.to_dict()
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "best", "baseline"} <= set(ckpt)
    assert set(result.baseline) == {"ET", "TC", "WT", "mean", "loss"}
    # final evaluation of the validation fold
    assert (out / "predictions" / "metrics.csv").is_file()
    summary = json.loads((out / "predictions" / "summary.json").read_text())
    assert {"dice_WT", "hd95_WT"} <= set(summary)


def test_checkpoints_are_atomic_and_safe(run):
    out, _ = run
    assert not list(out.glob(".*tmp*"))
    torch.load(out / "best.pt", weights_only=True)


def test_resume_is_exact(demo_cache, tmp_path):
    cfg = tiny()
    a = train(cfg, out=tmp_path / "a", progress=False, verbose=False)
    b = train(cfg, out=tmp_path / "b", stop_at=2, progress=False, verbose=False)
    assert a.step == 4 and b.step == 2 and not b.finished
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 2
    b = train(
        cfg, out=tmp_path / "b", resume=tmp_path / "b" / "last.pt", progress=False, verbose=False
    )
    assert b.step == 4
    ca = load_checkpoint(tmp_path / "a" / "last.pt")
    cb = load_checkpoint(tmp_path / "b" / "last.pt")
    assert_same_training_state(ca, cb)
    assert ca["scheduler"] == cb["scheduler"]
    assert torch.equal(ca["rng"][0]["torch"], cb["rng"][0]["torch"])


def test_run_of_the_previous_release_resumes_and_infers(demo_cache, tmp_path, capsys):
    """A checkpoint whose config says ``patch`` and whose data info says ``patch_size`` (the old
    names of the crop size) resumes through the CLI, and its model loads, with a warning."""
    train(tiny(steps=2, evaluate=False), out=tmp_path, stop_at=1, progress=False, verbose=False)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    ckpt["config"]["patch"] = ckpt["config"].pop("crop_size")
    ckpt["info"]["patch_size"] = default_crop = ckpt["info"].pop("crop_size")
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.warns(DeprecationWarning, match="'patch' is now 'crop_size'"):
        model, cfg, info, _ = model_from_checkpoint(tmp_path / "last.pt")
    assert cfg.crop_size == 16 and info.crop_size == tuple(default_crop)
    assert tuple(model.spatial_size) == (16, 16, 16)
    with pytest.warns(DeprecationWarning):
        rc = _cli("train", "--resume", f"--out={tmp_path}", "--no-progress", "--workers=0")
    assert rc == 0, capsys.readouterr().err
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_resume_rejects_changed_config(demo_cache, tmp_path):
    cfg = tiny(steps=2)
    train(cfg, out=tmp_path, stop_at=1, progress=False, verbose=False)
    with pytest.raises(ValueError, match="lr"):
        train(tiny(steps=2, lr=0.5), out=tmp_path, resume=tmp_path / "last.pt", verbose=False)


def test_nan_loss_stops_and_keeps_last_good_state(demo_cache, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = DeepSupervisionLoss.forward

    def flaky(self, outputs, label):
        calls["n"] += 1
        loss = forward(self, outputs, label)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(DeepSupervisionLoss, "forward", flaky)
    with pytest.raises(TrainingDiverged, match="step 3"):
        train(tiny(val_every=10), out=tmp_path, progress=False, verbose=False)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_loss_and_schedule():
    f = warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    loss = DeepSupervisionLoss(weights=[1, 0.5, 0.25])
    label = (torch.rand(2, 3, 16, 16, 16) > 0.5).float()
    good = [(label * 20 - 10)[:, :, :: 2**k, :: 2**k, :: 2**k] for k in range(3)]
    bad = [-g for g in good]
    assert loss(good, label) < 0.05 < 1.0 < loss(bad, label)


@pytest.mark.slow
def test_ddp_two_processes_gloo(demo_cache, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fastnmf",
        "train",
        *TINY_TRAIN_ARGS,
        "--steps=2",
        "--val-every=2",
        "--workers=0",
        "--device=cpu",
        "--no-eval",
        "--no-progress",
        f"--out={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("step 2 validation Dice") == 1  # rank 0 logs only
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])


# ----------------------------------------------------------------------------------------------
# inference


def test_inference_writes_nifti_with_input_affine(run, tmp_path):
    out, _ = run
    cfg = TrainConfig.load(out / "config.json")
    cases, info = cases_for("demo", cfg=cfg, select="val")
    written = infer(out / "best.pt", cases, tmp_path, device="cpu", iters=3, skip=[0])
    assert [w["id"] for w in written] == [c["id"] for c in cases]
    for w, c in zip(written, cases, strict=True):
        pred, src = nib.load(w["prediction"]), nib.load(c["image"][0])
        np.testing.assert_array_equal(pred.affine, src.affine)
        assert pred.shape == src.shape[:3]
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}
        assert Path(w["png"]).stat().st_size > 1000


def test_inference_any_volume_size(run, tmp_path):
    out, _ = run
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 2.0, 2.5, 1.0])
    affine[:3, 3] = [-10, 5, 3]
    vol = rng.normal(100, 20, (21, 13, 30, 4)).astype(np.float32)  # smaller than 16 on one axis
    path = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), str(path))
    cases, _ = cases_for(str(path))
    (w,) = infer(out / "best.pt", cases, tmp_path / "pred", device="cpu", png=False)
    pred = nib.load(w["prediction"])
    assert pred.shape == (21, 13, 30)
    np.testing.assert_array_equal(pred.affine, affine)


def test_model_from_checkpoint_and_components(run, tmp_path):
    from fastnmf.components import save_components

    out, _ = run
    model, cfg, info, _ = model_from_checkpoint(out / "best.pt", device="cpu")
    assert not model.training and info.regions == ("ET", "TC", "WT")
    cases, _ = cases_for("demo", cfg=cfg, select="val")
    files = save_components(out / "best.pt", cases[0], tmp_path, block=1, device="cpu")
    maps = nib.load(files["nifti"])
    heads = 16 // 4  # block 1: width 16, head_dim 4, rank 1
    assert maps.shape == (16, 16, 16, heads) and np.asarray(maps.dataobj).min() >= 0
    assert files["png"].is_file()


# ----------------------------------------------------------------------------------------------
# metrics


def _cube(shape, lo, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, a + size) for a in lo)] = True
    return m


def test_dice_and_hd95_on_hand_made_masks():
    shape = (24, 24, 24)
    a = _cube(shape, (4, 4, 4), 10)
    b = _cube(shape, (7, 4, 4), 10)  # shifted by 3 voxels along x: overlap 7/10
    m = case_metrics(a[None], b[None], names=("X",))
    assert m["dice_X"] == pytest.approx(0.7)
    assert m["hd95_X"] == pytest.approx(3.0)
    m = case_metrics(a[None], b[None], names=("X",), spacing=(2.0, 1.0, 1.0))
    assert m["hd95_X"] == pytest.approx(6.0)
    empty = np.zeros((1, *shape), bool)
    both = case_metrics(empty, empty, names=("X",))
    assert both == {"dice_X": 1.0, "hd95_X": 0.0}
    one = case_metrics(a[None], empty, names=("X",))
    assert one["dice_X"] == 0.0 and math.isnan(one["hd95_X"])
    same = case_metrics(np.stack([a, b]), np.stack([a, b]), names=("A", "B"))
    assert same == {"dice_A": 1.0, "dice_B": 1.0, "hd95_A": 0.0, "hd95_B": 0.0}


def test_evaluate_folder(demo_cache, tmp_path):
    ds = fdata.open_dataset("demo", n_cases=4, size=32)
    for c in ds.cases:  # perfect predictions: the labels themselves
        lab = nib.load(c["label"])
        nib.save(lab, str(tmp_path / f"{c['id']}.nii.gz"))
    rows, summary = evaluate(tmp_path, ds.cases, ds.info)
    assert len(rows) == 4 and summary["dice_WT"]["mean"] == 1.0
    assert summary["hd95_WT"]["mean"] == 0.0
    assert (tmp_path / "metrics.csv").is_file()


def test_compare_paired_wilcoxon(tmp_path):
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(1)
    x = rng.uniform(0.6, 0.9, 12)
    y = x - rng.uniform(0.01, 0.05, 12)
    a = [{"id": f"c{i}", "dice_WT": float(v)} for i, v in enumerate(x)]
    b = [{"id": f"c{i}", "dice_WT": float(v)} for i, v in enumerate(y)][::-1]  # order free
    (row,) = compare(a, b)
    assert row["n"] == 12 and row["p"] == pytest.approx(wilcoxon(x, y).pvalue)
    assert row["p"] < 0.001 and row["median_diff"] > 0


# ----------------------------------------------------------------------------------------------
# CLI and bad input


def _cli(*args):
    from fastnmf.cli import main

    return main(list(args))


def test_cli_train_missing_data(capsys, tmp_path):
    rc = _cli("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and "Traceback" not in err


def _generic(
    root: Path,
    n: int = 2,
    *,
    label_value: int = 1,
    corrupt: bool = False,
    channels: int = 1,
    label_shape=(16, 16, 16),
) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        img = np.random.default_rng(i).normal(size=(16, 16, 16, channels)).astype(np.float32)
        lab = np.zeros(label_shape, np.uint8)
        lab[4:8, 4:8, 4:8] = label_value
        nib.save(
            nib.Nifti1Image(img if channels > 1 else img[..., 0], np.eye(4)),
            str(root / "imagesTr" / f"case{i}.nii.gz"),
        )
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labelsTr" / f"case{i}.nii.gz"))
    if corrupt:
        p = root / "imagesTr" / "case1.nii.gz"
        p.write_bytes(p.read_bytes()[:100])
    return root


@pytest.mark.parametrize(
    "kind, expect",
    [
        ("label", "label values [7]"),
        ("corrupt", "case1.nii.gz"),
        ("shape", "does not match image shape"),
    ],
)
def test_cli_train_bad_data(capsys, tmp_path, kind, expect):
    root = _generic(
        tmp_path / "d",
        label_value=7 if kind == "label" else 1,
        corrupt=kind == "corrupt",
        label_shape=(16, 16, 12) if kind == "shape" else (16, 16, 16),
    )
    rc = _cli(
        "train",
        "--preset",
        "brats",
        "--data",
        str(root),
        "--folds",
        "2",
        "--crop-size",
        "16",
        "--model",
        "nnunet",
        "--model-opt",
        "widths=[8,16]",
        "--model-opt",
        "deep_supervision=1",
        "--steps",
        "1",
        "--workers",
        "0",
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expect in err and "Traceback" not in err


def test_cli_wrong_channel_count(capsys, demo_cache, tmp_path):
    ds = fdata.open_dataset("demo", n_cases=4, size=32)
    img = nib.load(ds.cases[0]["image"][0])
    two = nib.Nifti1Image(np.asarray(img.dataobj)[..., :2], img.affine)
    path = tmp_path / "two.nii.gz"
    nib.save(two, str(path))
    # a checkpoint of a 4-channel model
    out = tmp_path / "run"
    train(tiny(steps=1, val_every=1), out=out, progress=False, verbose=False)
    rc = _cli("infer", "--checkpoint", str(out), "--data", str(path), "--out", str(tmp_path / "p"))
    err = capsys.readouterr().err
    assert rc == 2 and "two.nii.gz" in err and "channel" in err and "Traceback" not in err


def test_cli_corrupt_checkpoint(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    rc = _cli("infer", "--checkpoint", str(bad))
    err = capsys.readouterr().err
    assert rc == 2 and "bad.pt" in err and "Traceback" not in err


def test_cli_unknown_option_values(capsys):
    rc = _cli("train", "--model", "transformerzz", "--out", "/tmp/never")
    err = capsys.readouterr().err
    assert rc == 2 and "available models" in err and "swin_factorizer" in err


def test_cli_infer_evaluate_compare_components(run, capsys, tmp_path):
    out, _ = run
    assert (
        _cli("infer", "--checkpoint", str(out), "--out", str(tmp_path / "p"), "--iters", "2") == 0
    )
    assert _cli("evaluate", "--pred", str(tmp_path / "p"), "--checkpoint", str(out)) == 0
    text = capsys.readouterr().out
    assert "dice_WT" in text and "hd95_WT" in text
    assert _cli("compare", str(tmp_path / "p"), str(out / "predictions")) == 0
    assert "Wilcoxon" in capsys.readouterr().out
    rc = _cli("components", "--checkpoint", str(out), "--block", "0", "--out", str(tmp_path / "c"))
    assert rc == 0 and list((tmp_path / "c").glob("*.png"))
    rc = _cli("components", "--checkpoint", str(out), "--block", "99")
    assert rc == 2 and "out of range" in capsys.readouterr().err


TINY_ARGS = [*TINY_TRAIN_ARGS, "--workers=0", "--device=cpu", "--no-progress"]


def test_cli_train_main_job_summary_bf16_and_resume(demo_cache, capsys, tmp_path):
    out = tmp_path / "r"
    args = ["train", *TINY_ARGS, "--steps=2", "--val-every=1", "--amp=bf16", f"--out={out}"]
    assert _cli(*args, "--stop-at=1") == 0
    text = capsys.readouterr().out
    assert "continue with: fastnmf train --resume" in text
    assert '"bf16"' in text  # the resolved config is printed
    assert _cli(*args) == 2  # the run exists: refuse to overwrite
    assert "--resume" in capsys.readouterr().err
    assert _cli("train", "--resume", f"--out={out}", "--no-progress") == 0
    text = capsys.readouterr().out
    assert "2/2 steps" in text
    assert "untrained model (step 0), validation WT Dice:" in text
    assert "trained model (best, step" in text and "saved predictions scored" in text
    assert len(list((out / "predictions").glob("*.nii.gz"))) == 1
    assert _cli("train", "--resume", f"--out={out}", "--lr=0.5") == 2
    assert "differs in lr" in capsys.readouterr().err
