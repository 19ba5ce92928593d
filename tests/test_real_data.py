"""Real data as a user brings it (issue 18): anisotropic, LPS / LAS, odd sizes, tiny lesions.

Lesion-centred crops, best-model ties, schedules longer than the run, affine-checked evaluation,
overlays through the lesion, progress lines, and the triton-on-CPU error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_config
from realistic import CASES, REGION, make_dataset, volume

from fastnmf import data as fdata
from fastnmf.config import TrainConfig, resolve
from fastnmf.evaluate import evaluate
from fastnmf.logs import Progress
from fastnmf.overlay import lesion_slices, overlay_png
from fastnmf.train import is_better, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("real") / "TinyLesions")


def _cli(*args: str) -> int:
    from fastnmf.cli import main

    return main(list(args))


# ----------------------------------------------------------------------------------------------
# 1. lesion-centred crops


def _hits(ds, *, crop: str, pos_ratio: float, n: int = 12) -> list[bool]:
    tf = fdata.train_transforms(
        ds.info, crop_size=16, crop=crop, pos_ratio=pos_ratio, augment=False
    )
    hits = []
    for g in range(n):
        tf.set_random_state(seed=g)
        out = tf(ds.cases[0])
        out = out[0] if isinstance(out, list) else out
        assert tuple(out["label"].shape) == (1, 16, 16, 16)
        hits.append(bool(out["label"].sum() > 0))
    return hits


def test_posneg_crops_hit_a_tiny_lesion(dataset):
    ds = fdata.open_dataset(dataset)
    lesion = int(np.prod(CASES[0][4]))
    assert ds.info.regions == (REGION,) and lesion == 18  # 18 voxels in 45 x 37 x 21
    assert all(_hits(ds, crop="posneg", pos_ratio=1.0))
    random = _hits(ds, crop="random", pos_ratio=0.0)
    assert sum(random) < len(random)  # uniform patches miss it (the Dice 0)


def test_non_demo_data_defaults_to_posneg(dataset):
    notes: list[str] = []
    cfg = resolve("demo", data=str(dataset), notes=notes)
    assert cfg.crop == "posneg" and cfg.pos_ratio == pytest.approx(1 / 3)
    assert any("posneg" in n for n in notes)
    assert resolve("demo", data=str(dataset), crop="random").crop == "random"
    assert resolve("demo").crop == "random"  # the demo keeps the paper's uniform patches
    with pytest.raises(ValueError, match="pos_ratio"):
        resolve("demo", data=str(dataset), pos_ratio=1.5)
    with pytest.raises(ValueError, match="pos_ratio applies to crop='posneg' only"):
        resolve("demo", data=str(dataset), crop="random", pos_ratio=0.5)


# ----------------------------------------------------------------------------------------------
# 2. best model


def test_tie_goes_to_the_lower_validation_loss():
    best = {"step": 2, "dice": 0.0, "loss": 1.5, "scores": {"mean": 0.0, "loss": 1.5}}
    assert is_better({"mean": 0.0, "loss": 1.2}, best)  # same Dice, lower loss: better
    assert not is_better({"mean": 0.0, "loss": 1.8}, best)  # same Dice, higher loss: worse
    assert is_better({"mean": 0.1, "loss": 9.0}, best)  # higher Dice wins whatever the loss
    assert not is_better({"mean": -0.1, "loss": 0.1}, best)
    assert is_better({"mean": 0.0, "loss": 5.0}, {"dice": -1.0, "scores": None})


def _tiny(dataset: Path, **kw) -> TrainConfig:
    base = dict(data=str(dataset), n_folds=3, crop_size=16, kernel="torch", steps=6, val_every=2)
    return tiny_config(**{**base, **kw})


def test_best_checkpoint_on_a_dice_tie_and_progress_lines(dataset, tmp_path, monkeypatch, capsys):
    """Dice stays 0 at steps 2, 4, 6 (a lesion not yet found); the loss is lowest at step 4:
    best.pt must be step 4, not the first step. Output (not a terminal) keeps one thing a line."""
    import fastnmf.train as T

    losses = iter([2.0, 1.0, 0.5, 0.8])  # steps 0 (baseline), 2, 4, 6

    def scripted(*args, **kw):
        return {REGION: 0.0, "mean": 0.0, "loss": next(losses)}

    monkeypatch.setattr(T, "validate", scripted)
    out = tmp_path / "run"
    result = train(_tiny(dataset), out=out, progress=True, verbose=True)
    assert result.best["step"] == 4 and result.best["loss"] == 0.5
    assert torch.load(out / "best.pt", weights_only=True)["step"] == 4
    text = capsys.readouterr()
    assert "\r" not in text.out + text.err
    lines = text.out.splitlines()
    assert sum(ln.startswith("step ") and "validation" in ln for ln in lines) == 4
    assert any(ln.startswith("train: step 6/6") for ln in lines)


def test_progress_prints_whole_lines(capsys):
    p = Progress(total=3, initial=0, enabled=True, tty=False, every_s=0.0)
    for _ in range(3):
        p.update(loss=0.5, lr=1e-3)
    p.close()
    out = capsys.readouterr().out
    assert [ln.split(",")[0] for ln in out.splitlines()] == [
        f"train: step {s}/3 ({round(100 * s / 3)} %)" for s in (1, 2, 3)
    ]


# ----------------------------------------------------------------------------------------------
# 3. schedules


def test_schedule_longer_than_the_run_is_scaled_or_refused(dataset, tmp_path):
    notes: list[str] = []
    cfg = resolve("demo", steps=20, notes=notes)
    assert cfg.warmup == 2 and cfg.val_every == 20  # 30 of 300 steps -> 2 of 20
    assert any("warm-up scaled" in n for n in notes)
    with pytest.raises(ValueError, match=r"warmup \(30 steps\) is longer than the run"):
        resolve("demo", steps=20, warmup=30)
    assert resolve("demo", steps=20, warmup=20).warmup == 20
    # config shows what applies: no demo settings for other data, no pos_ratio for random crops
    cfg = _tiny(dataset)
    assert "demo" not in cfg.applicable() and "pos_ratio" in cfg.applicable()
    cfg.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "demo" not in saved and TrainConfig.from_dict(saved) == cfg
    assert [ln.split()[0] for ln in cfg.summary().splitlines()] == list(cfg.applicable())
    demo = resolve("demo")
    assert demo.applicable()["demo"]["n_cases"] == 16 and "pos_ratio" not in demo.applicable()


# ----------------------------------------------------------------------------------------------
# 4. evaluate checks the grid


def _predictions(dataset: Path, out: Path, *, shift_mm: float = 0.0, noise: float = 0.0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(CASES)):
        lab = nib.load(str(dataset / "labelsTr" / f"case_{i:03d}.nii.gz"))
        aff = lab.affine.copy()
        aff[0, 3] += shift_mm
        aff[:3, :3] *= 1 + noise
        img = nib.Nifti1Image(np.asarray(lab.dataobj).astype(np.uint8), aff)
        nib.save(img, str(out / f"case_{i:03d}.nii.gz"))
    return out


def test_evaluate_refuses_a_shifted_prediction(dataset, tmp_path):
    ds = fdata.open_dataset(dataset)
    shifted = _predictions(dataset, tmp_path / "shifted", shift_mm=1.0)
    with pytest.raises(fdata.DataError, match=r"case_000\.nii\.gz.*shifted by \(\+1,"):
        evaluate(shifted, ds.cases, ds.info)
    assert not (shifted / "metrics.csv").exists()
    rows, summary = evaluate(shifted, ds.cases, ds.info, ignore_affine=True)
    assert summary[f"dice_{REGION}"]["mean"] == 1.0  # same voxels: a perfect score, as asked
    noisy = _predictions(dataset, tmp_path / "noisy", noise=1e-7)  # float32 round-off
    assert len(evaluate(noisy, ds.cases, ds.info)[0]) == len(CASES)


def test_check_grid_names_a_label_that_disagrees_with_its_image(tmp_path):
    from fastnmf.evaluate import check_grid

    image, label, aff = volume(1)  # LAS
    moved = aff.copy()
    moved[2, 3] += 2.5
    pred = nib.Nifti1Image(label, aff)  # as fastnmf infer writes it: the image's grid
    check_grid("p.nii.gz", pred, "l.nii.gz", nib.Nifti1Image(label, aff), image_affine=aff)
    with pytest.raises(fdata.DataError, match=r"shifted by \(\+0, \+0, -2\.5\) mm.*its image's"):
        check_grid("p.nii.gz", pred, "l.nii.gz", nib.Nifti1Image(label, moved), image_affine=aff)
    with pytest.raises(fdata.DataError, match=r"shape \(39, 44, 16\) != shape \(39, 44, 17\)"):
        check_grid("p.nii.gz", nib.Nifti1Image(label[..., :16], aff), "l.nii.gz",
                   nib.Nifti1Image(label, aff), ignore_affine=True)  # fmt: skip


def test_cli_evaluate_affine_error_and_override(dataset, tmp_path, capsys):
    shifted = _predictions(dataset, tmp_path / "p", shift_mm=1.0)
    args = ("evaluate", "--pred", str(shifted), "--data", str(dataset), "--cases", "all")
    assert _cli(*args) == 2
    err = capsys.readouterr().err
    assert "case_000.nii.gz" in err and "shifted by (+1" in err and "--ignore-affine" in err
    assert "Traceback" not in err
    assert _cli(*args, "--ignore-affine") == 0


# ----------------------------------------------------------------------------------------------
# 5. overlays


def test_overlay_slices_through_the_lesion_with_spacing(tmp_path):
    image, label, aff = volume(0)
    spacing = CASES[0][1]
    slices = lesion_slices(label)
    for axis, idx in enumerate(slices):
        assert np.take(label, idx, axis=axis).any()  # the picture's slice shows the lesion
    centre = [n // 2 for n in label.shape]
    assert not all(np.take(label, c, axis=a).any() for a, c in enumerate(centre))
    assert lesion_slices(np.zeros_like(label)) == tuple(centre)
    regions = label[None].astype(np.float32)
    fig = overlay_png(image, regions, tmp_path / "o.png", names=(REGION,), title="case_000",
                      spacing=spacing, truth=regions, return_figure=True)  # fmt: skip
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [f"axis {a}, slice {i}" for a, i in enumerate(slices)]
    assert axes[0].get_aspect() == pytest.approx(spacing[2] / spacing[1])  # 6.5 / 0.9
    assert axes[2].get_aspect() == pytest.approx(spacing[1] / spacing[0])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [f"predicted {REGION}", f"true {REGION} (outline)"]
    title = fig._suptitle.get_text()
    assert title.startswith(f"case_000: {REGION}: prediction and truth") and "WT" not in title
    fig = overlay_png(image, regions, tmp_path / "n.png", names=(REGION,), title="x",
                      spacing=spacing, return_figure=True)  # fmt: skip
    text = fig._suptitle.get_text() + " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "truth" not in text and "true" not in text
    assert (tmp_path / "o.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------
# 7. triton on CPU without the interpreter


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_triton_on_cpu_without_interpreter_names_the_ways_out():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, fastnmf\n"
        "fastnmf.nmf(torch.rand(2, 4, 8), torch.rand(8, 1), kernel='triton')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "kernel='torch'" in r.stderr and "TRITON_INTERPRET=1" in r.stderr
    assert "before importing fastnmf" in r.stderr
    assert "RuntimeError: kernel='triton' got CPU tensors" in r.stderr
