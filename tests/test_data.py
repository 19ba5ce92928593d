"""fastnmf.data: demo generator, layout readers, bad-input errors, folds, MONAI pipelines."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fastnmf import data
from fastnmf.data import DataError, MissingFileError

DEMO = {"n_cases": 3, "size": 24}  # ~8 mm voxels: tiny and fast


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return data.make_demo(**DEMO, seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


def _read(path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _save(arr: np.ndarray, path: Path, spacing: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([spacing] * 3 + [1.0])), path)
    return path


def _blob_case(rng, shape=(12, 10, 8), channels=4, values=(0, 1, 2, 3)):
    image = rng.uniform(1, 100, shape + (channels,)).astype(np.float32)
    image[:2] = 0  # some background for the foreground crop
    label = np.zeros(shape, np.uint8)
    for v in values[1:]:  # nested shells: 1 outermost
        label[3 : shape[0] - 1 - v, 2 : shape[1] - v, 2 : shape[2] - v] = v
    return image, label


# ------------------------------------------------------------------------------------------
# demo data


def test_demo_layout_and_loader(demo_dir):
    obj = json.loads((demo_dir / "dataset.json").read_text())
    spec = obj["fastnmf_demo"]
    assert spec == {
        "version": data.demo.DEMO_VERSION,
        **DEMO,
        "seed": 0,
        "template": spec["template"],
    }
    assert spec["template"].startswith("nilearn-")
    ds = data.open_dataset(demo_dir)
    assert ds.kind == "demo" and len(ds) == DEMO["n_cases"]
    assert ds.info.in_channels == 4 and ds.info.regions == ("ET", "TC", "WT")
    image, label, affine = data.read_case(ds.cases[0], ds.info)
    assert image.shape == (4, 24, 24, 24) and label.shape == (24, 24, 24)
    assert np.allclose(np.diag(affine)[:3], np.diag(affine)[0]) and affine[0, 0] > 5  # ~8 mm


def test_demo_labels_nested_and_present(demo_dir):
    info = data.dataset_info("demo")
    for case in data.load_datalist(demo_dir):
        _, label, _ = data.read_case(case, info)
        assert set(np.unique(label)) <= {0, 1, 2, 3} and (label == 3).any()
        et, tc, wt = data.labels_to_regions(label, info).astype(bool)
        assert et.any() and (tc & ~wt).sum() == 0 and (et & ~tc).sum() == 0
        assert (tc & ~et).any() or (wt & ~tc).any()  # the regions are not all the same
        back = data.regions_to_labels(np.stack([et, tc, wt]), info)
        assert np.array_equal(back, label)


def test_demo_deterministic_from_seed(tmp_path, demo_dir):
    again = data.make_demo(**DEMO, seed=0, cache_dir=tmp_path / "a")
    other = data.make_demo(**DEMO, seed=1, cache_dir=tmp_path / "a")
    for sub in ("imagesTr", "labelsTr"):
        for f in sorted((demo_dir / sub).iterdir()):
            a, b = _read(f), _read(again / sub / f.name)
            assert a.dtype == b.dtype and np.array_equal(a, b)  # bitwise
            assert not np.array_equal(a, _read(other / sub / f.name))
    # case i does not depend on n_cases; in-memory generation matches the files
    c = data.generate_case(1, size=24, seed=0)
    assert np.array_equal(
        np.moveaxis(c["image"], 0, -1), _read(demo_dir / "imagesTr/demo_001.nii.gz")
    )
    assert np.array_equal(c["label"], _read(demo_dir / "labelsTr/demo_001.nii.gz"))


def test_demo_looks_like_a_brain():
    c = data.generate_case(0, size=32, seed=3)
    image, label, mask = c["image"].astype(np.float64), c["label"], c["mask"]
    assert 0.1 < mask.mean() < 0.6  # the grid covers the brain with a margin
    assert (image[:, ~mask] == 0).all() and (image[:, mask] > 0).all()  # skull-stripped
    assert mask[label > 0].all()  # tumour inside the brain
    healthy = mask & (label == 0)
    rel = {  # mean of each label region relative to healthy brain, per channel
        v: image[:, label == v].mean(1) / np.median(image[:, healthy], axis=1) for v in (1, 2, 3)
    }
    flair, t1, t1gd, t2 = range(4)
    assert rel[1][flair] > 1.1 and rel[1][t2] > 1.1  # oedema bright on FLAIR and T2
    assert rel[3][t1gd] > 1.2 * rel[3][t1]  # enhancing rim enhances with gadolinium
    assert rel[2][t1] < 0.8 and rel[2][t2] > 1.1  # necrosis dark on T1, bright on T2
    x = image[:, healthy]
    corr = np.corrcoef(x)
    assert np.abs(corr[np.triu_indices(4, 1)]).max() < 0.98  # four distinct contrasts
    assert corr[t1, t2] < 0.5  # T1 and T2 contrasts of healthy tissue differ (CSF, WM)


def test_demo_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTNMF_CACHE", str(tmp_path / "env"))
    assert data.cache_root() == tmp_path / "env"
    folder = data.make_demo(n_cases=2, size=20, seed=5)
    assert folder.parent == tmp_path / "env"
    stamp = (folder / "dataset.json").stat().st_mtime_ns
    assert data.make_demo(n_cases=2, size=20, seed=5) == folder  # cached: not regenerated
    assert (folder / "dataset.json").stat().st_mtime_ns == stamp
    assert data.make_demo(n_cases=3, size=20, seed=5) != folder  # another spec, another set
    # an incomplete cached set (e.g. a file deleted) is regenerated
    (folder / "labelsTr/demo_001.nii.gz").unlink()
    assert data.make_demo(n_cases=2, size=20, seed=5) == folder
    assert (folder / "labelsTr/demo_001.nii.gz").is_file()
    assert not [p for p in (tmp_path / "env").iterdir() if p.name.startswith(".")]  # no temps
    assert data.open_dataset("demo", n_cases=2, size=20, seed=5).root == folder


def test_demo_generation_is_atomic(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.demo.json, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        data.make_demo(n_cases=1, size=20, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


# ------------------------------------------------------------------------------------------
# layouts


def _write_msd(root: Path, rng, n=3, channels=4, label_values=(0, 1, 2, 3)) -> Path:
    training = []
    for i in range(n):
        image, label = _blob_case(rng, channels=channels, values=label_values)
        _save(image, root / f"imagesTr/BRATS_{i:03d}.nii.gz")
        _save(label, root / f"labelsTr/BRATS_{i:03d}.nii.gz")
        training.append(
            {
                "image": f"./imagesTr/BRATS_{i:03d}.nii.gz",
                "label": f"./labelsTr/BRATS_{i:03d}.nii.gz",
            }
        )
    (root / "imagesTr/._BRATS_000.nii.gz").write_bytes(b"\0" * 10)  # macOS junk, as in the tar
    meta = {
        "name": "BRATS",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {
            "0": "background",
            "1": "edema",
            "2": "non-enhancing tumor",
            "3": "enhancing tumour",
        },
        "training": training,
        "test": ["./imagesTs/BRATS_900.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _write_isles(root: Path, rng, n=2, shape=(16, 14, 12)) -> Path:
    for i in range(1, n + 1):
        sub, ses = f"sub-strokecase{i:04d}", "ses-0001"
        base = root / "rawdata" / sub / ses
        _save(rng.uniform(1, 9, shape).astype(np.float32), base / f"dwi/{sub}_{ses}_dwi.nii.gz")
        _save(rng.uniform(1, 9, shape).astype(np.float32), base / f"dwi/{sub}_{ses}_adc.nii.gz")
        _save(
            rng.uniform(1, 9, (8, 8, 6)).astype(np.float32), base / f"anat/{sub}_{ses}_FLAIR.nii.gz"
        )
        mask = np.zeros(shape, np.uint8)
        mask[4:9, 5:9, 3:7] = 1
        _save(mask, root / "derivatives" / sub / ses / f"{sub}_{ses}_msk.nii.gz")
    return root


def test_msd_loader(tmp_path):
    root = _write_msd(tmp_path / "Task01_BrainTumour", np.random.default_rng(0))
    assert data.detect_kind(root) == "brats"
    ds = data.open_dataset(root)
    assert ds.kind == "brats" and [c["id"] for c in ds.cases] == [
        "BRATS_000",
        "BRATS_001",
        "BRATS_002",
    ]
    assert all(len(c["image"]) == 1 and Path(c["image"][0]).is_absolute() for c in ds.cases)
    s = data.val_transforms(ds.info)(ds.cases[0])
    image, label = data.read_case(ds.cases[0], ds.info)[:2]
    assert s["image"].shape == (4, 12, 10, 8) and s["label"].shape == (3, 12, 10, 8)
    # MSD labels: ET = 3, TC = 2 | 3, WT = 1 | 2 | 3 — in that channel order
    lab = torch.as_tensor(label)
    assert torch.equal(s["label"][0].bool(), lab == 3)
    assert torch.equal(s["label"][1].bool(), (lab == 2) | (lab == 3))
    assert torch.equal(s["label"][2].bool(), lab > 0)
    # z-scored over non-zero voxels, per channel
    nz = torch.as_tensor(image[0] != 0)
    assert (
        abs(float(s["image"][0][nz].mean())) < 1e-4
        and abs(float(s["image"][0][nz].std()) - 1) < 1e-2
    )
    # a case whose image is a plain path, as MONAI datalists often have
    plain = {"image": ds.cases[0]["image"][0], "label": ds.cases[0]["label"]}
    assert torch.equal(data.val_transforms("brats")(plain)["image"], s["image"])
    # the dataset.json alone works as a datalist too
    assert data.load_datalist(root / "dataset.json") == ds.cases


def test_isles_loader(tmp_path):
    root = _write_isles(tmp_path / "ISLES-2022", np.random.default_rng(1))
    assert data.detect_kind(root) == "isles"
    ds = data.open_dataset(root)
    assert ds.info.in_channels == 2 and ds.info.channel_names == ("DWI", "ADC")
    c = ds.cases[0]
    assert c["id"] == "sub-strokecase0001_ses-0001"
    assert c["image"][0].endswith("_dwi.nii.gz") and c["image"][1].endswith("_adc.nii.gz")
    assert c["label"].endswith("_msk.nii.gz") and "FLAIR" not in " ".join(c["image"])
    s = data.val_transforms(ds.info)(c)
    assert s["image"].shape == (2, 16, 14, 12) and s["label"].shape == (1, 16, 14, 12)
    assert s["label"].sum() == 5 * 4 * 4
    r = data.val_transforms(ds.info, resample=True)(c)  # paper: ISLES at 2 mm
    assert r["image"].shape[1:] == r["label"].shape[1:]
    assert all(abs(n - s / 2) <= 1 for n, s in zip(r["image"].shape[1:], (16, 14, 12), strict=True))
    assert torch.allclose(r["image"].pixdim.float(), torch.tensor([2.0, 2.0, 2.0]))
    t = data.train_transforms(ds.info, crop_size=4, seed=0)(c)
    assert t["image"].shape == (2, 4, 4, 4) and set(t["label"].unique().tolist()) <= {0.0, 1.0}


def test_generic_folder_and_json(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "generic"
    for cid in ("a", "b"):  # nnU-Net style: one file per channel
        image, label = _blob_case(rng, channels=2, values=(0, 1))
        _save(image[..., 0], root / f"imagesTr/{cid}_0000.nii.gz")
        _save(image[..., 1], root / f"imagesTr/{cid}_0001.nii.gz")
        _save(label, root / f"labelsTr/{cid}.nii.gz")
    assert data.detect_kind(root) == "generic"
    ds = data.open_dataset(root)
    assert ds.info.in_channels == 2 and ds.info.out_channels == 1
    assert [len(c["image"]) for c in ds.cases] == [2, 2]
    s = data.train_transforms(ds.info, crop_size=(6, 6, 4), seed=1)(ds.cases[1])
    assert s["image"].shape == (2, 6, 6, 4) and s["label"].shape == (1, 6, 6, 4)

    # single-file cases whose ids end in digits; an image without label is an error
    single = tmp_path / "single"
    for cid in ("case_0001", "case_0002"):
        image, label = _blob_case(rng, channels=1, values=(0, 1))
        _save(image, single / f"images/{cid}.nii.gz")
        _save(label, single / f"labels/{cid}.nii.gz")
    ds = data.open_dataset(single)
    assert [c["id"] for c in ds.cases] == ["case_0001", "case_0002"] and ds.info.in_channels == 1
    extra = _save(image, single / "images/case_0003.nii.gz")
    e = _raises_naming(extra, lambda: data.open_dataset(single))
    assert "case_0003.nii.gz" in str(e).split("looked for")[1]
    (root / "imagesTr/a_0000.nii.gz").unlink()
    _raises_naming(root / "imagesTr/a_0000.nii.gz", lambda: data.open_dataset(root))

    # a decathlon-style JSON datalist elsewhere, relative paths, multi-class labels
    image, label = _blob_case(rng, channels=1, values=(0, 1, 2))
    _save(image[..., 0], tmp_path / "lists/img/x.nii.gz")
    _save(label, tmp_path / "lists/lab/x.nii.gz")
    meta = {
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "training": [{"image": "img/x.nii.gz", "label": "lab/x.nii.gz"}],
    }
    (tmp_path / "lists/list.json").write_text(json.dumps(meta))
    ds = data.open_dataset(tmp_path / "lists/list.json")
    assert ds.kind == "generic" and ds.info.regions == ("liver", "tumour")
    s = data.val_transforms(ds.info)(ds.cases[0])
    assert s["label"].shape == (2,) + label.shape
    assert torch.equal(s["label"][1].bool(), torch.as_tensor(label == 2))


def test_demo_train_pipeline(demo_dir):
    ds = data.open_dataset(demo_dir)
    tr = data.train_transforms(ds.info, crop_size=16, seed=0)
    a = tr(ds.cases[0])
    assert a["image"].shape == (4, 16, 16, 16) and a["label"].shape == (3, 16, 16, 16)
    assert a["image"].dtype == torch.float32 and torch.isfinite(a["image"]).all()
    et, tc, wt = a["label"].bool()
    assert not (et & ~tc).any() and not (tc & ~wt).any()  # nesting survives augmentation
    b = data.train_transforms(ds.info, crop_size=16, seed=0)(ds.cases[0])
    assert torch.equal(a["image"], b["image"])  # seeded pipelines repeat
    p = data.train_transforms(ds.info, crop_size=16, crop="posneg", seed=0)(ds.cases[0])
    assert isinstance(p, list) and p[0]["image"].shape == (4, 16, 16, 16)


# ------------------------------------------------------------------------------------------
# bad input: every error names the file


def _raises_naming(path, fn, exc=DataError):
    with pytest.raises(exc) as info:
        fn()
    assert str(path) in str(info.value), str(info.value)
    return info.value


def test_missing_files(tmp_path):
    root = _write_msd(tmp_path / "msd", np.random.default_rng(3))
    gone = root / "labelsTr/BRATS_001.nii.gz"
    gone.unlink()
    e = _raises_naming(gone, lambda: data.open_dataset(root), MissingFileError)
    assert isinstance(e, FileNotFoundError)
    _raises_naming(tmp_path / "nowhere", lambda: data.open_dataset(tmp_path / "nowhere"))
    isles = _write_isles(tmp_path / "isles", np.random.default_rng(3))
    adc = next((isles / "rawdata/sub-strokecase0002/ses-0001/dwi").glob("*_adc.nii.gz"))
    adc.unlink()
    _raises_naming(adc.parent, lambda: data.open_dataset(isles), MissingFileError)
    empty = tmp_path / "empty"
    empty.mkdir()
    _raises_naming(empty, lambda: data.open_dataset(empty))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    _raises_naming(bad_json, lambda: data.open_dataset(bad_json))
    # a file vanishing after listing is caught when the case is loaded
    ds = data.open_dataset(_write_msd(tmp_path / "msd2", np.random.default_rng(3)))
    img = Path(ds.cases[2]["image"][0])
    img.unlink()
    _raises_naming(img, lambda: data.val_transforms(ds.info)(ds.cases[2]), MissingFileError)


def test_wrong_channel_count(tmp_path):
    root = _write_msd(tmp_path / "msd", np.random.default_rng(4), channels=3)
    e = _raises_naming(root / "imagesTr/BRATS_000.nii.gz", lambda: data.open_dataset(root))
    assert "3 channel" in str(e) and "needs 4" in str(e)


def test_label_values_outside_set(tmp_path):
    # BraTS 2018-2022 labels (ET = 4) in an MSD layout are rejected, not silently mis-converted
    root = _write_msd(tmp_path / "msd", np.random.default_rng(5), label_values=(0, 1, 2, 4))
    ds = data.open_dataset(root)  # header checks pass
    lab = root / "labelsTr/BRATS_000.nii.gz"
    e = _raises_naming(lab, lambda: data.val_transforms(ds.info)(ds.cases[0]))
    assert "[4]" in str(e)
    _raises_naming(lab, lambda: data.train_transforms(ds.info, crop_size=4)(ds.cases[0]))


def test_shape_mismatch(tmp_path):
    root = _write_msd(tmp_path / "msd", np.random.default_rng(6))
    lab = root / "labelsTr/BRATS_001.nii.gz"
    _save(np.zeros((12, 10, 9), np.uint8), lab)
    e = _raises_naming(lab, lambda: data.open_dataset(root))
    assert "(12, 10, 9)" in str(e)
    # between channel files of one case
    rng = np.random.default_rng(6)
    g = tmp_path / "generic"
    _save(rng.uniform(1, 2, (8, 8, 8)).astype(np.float32), g / "images/c_0000.nii.gz")
    bad = _save(rng.uniform(1, 2, (8, 8, 7)).astype(np.float32), g / "images/c_0001.nii.gz")
    _save(np.zeros((8, 8, 8), np.uint8), g / "labels/c.nii.gz")
    _raises_naming(bad, lambda: data.open_dataset(g))


def test_corrupt_nifti(tmp_path):
    root = _write_msd(tmp_path / "msd", np.random.default_rng(7))
    garbage = root / "imagesTr/BRATS_000.nii.gz"
    garbage.write_bytes(b"this is not a nifti file" * 10)
    _raises_naming(garbage, lambda: data.open_dataset(root))
    # a truncated file: the header reads, the data does not
    root = _write_msd(tmp_path / "msd2", np.random.default_rng(7))
    trunc = root / "imagesTr/BRATS_002.nii.gz"
    raw = gzip.decompress(trunc.read_bytes())
    trunc.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    ds = data.open_dataset(root)
    _raises_naming(trunc, lambda: data.val_transforms(ds.info)(ds.cases[2]))
    nan = root / "imagesTr/BRATS_001.nii.gz"
    image, _ = _blob_case(np.random.default_rng(0))
    image[5, 5, 5, 1] = np.nan
    _save(image, nan)
    _raises_naming(nan, lambda: data.val_transforms(ds.info)(ds.cases[1]))


def test_unknown_options():
    with pytest.raises(ValueError, match="valid kinds: demo, brats, isles, generic"):
        data.dataset_info("brain")
    with pytest.raises(ValueError, match="valid: random, posneg"):
        data.train_transforms("demo", crop="centre")


# ------------------------------------------------------------------------------------------
# cross-validation folds


def test_folds_and_split():
    cases = [{"id": f"c{i:02d}", "image": [f"/x/c{i:02d}.nii.gz"], "label": "l"} for i in range(23)]
    parts = data.folds(cases, 5, 0)
    assert sorted(len(p) for p in parts) == [4, 4, 5, 5, 5]
    ids = [c["id"] for p in parts for c in p]
    assert sorted(ids) == [c["id"] for c in cases]  # a partition
    shuffled = list(reversed(cases))
    assert [[c["id"] for c in p] for p in data.folds(shuffled, n_folds=5, seed=0)] == [
        [c["id"] for c in p] for p in parts
    ]  # independent of input order
    assert data.folds(cases, 5, 1) != parts  # the seed matters
    for k in range(5):
        train, val = data.split(cases, k)
        assert val == parts[k] and len(train) + len(val) == 23
        assert not {c["id"] for c in train} & {c["id"] for c in val}
    with pytest.raises(ValueError, match="fold must be in 0..4"):
        data.split(cases, 5)
    with pytest.raises(ValueError, match="cannot split 3"):
        data.folds(cases[:3], 5)


def test_nilearn_templates_offline(monkeypatch):
    """The MNI152 maps ship inside nilearn: loading them must not touch the network."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("NILEARN_DATA", os.devnull + "-nonexistent")
    data.demo._template.cache_clear()
    data.demo._smoothed_template.cache_clear()
    c = data.generate_case(0, size=16, seed=0)
    assert c["image"].shape == (4, 16, 16, 16)
