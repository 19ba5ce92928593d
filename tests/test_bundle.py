"""``fastnmf export``: a MONAI bundle whose output equals ``fastnmf infer``'s (issue 18)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle.utils import DEPRECATED_ID_MAPPING
from realistic import make_dataset

from fastnmf import data as fdata
from fastnmf.config import resolve
from fastnmf.infer import build_model, cases_for, infer, info_to_dict

TINY_MODEL = {"widths": [8, 16, 32], "head_dim": 4, "window": 4, "deep_supervision": 2}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint of an untrained tiny model (random weights: a mixed prediction, not all 0),
    its bundle (via the CLI), and a folder with two input volumes (LPS 45x37x21, LAS 39x44x17)."""
    from fastnmf.cli import main

    root = tmp_path_factory.mktemp("bundle")
    ds = fdata.open_dataset(make_dataset(root / "data", n=2))
    cfg = resolve("demo", data=str(ds.root), crop_size=16, n_folds=2, kernel="torch", device="cpu",
                  model_options=TINY_MODEL)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, ds.info)
    ckpt = root / "run" / "best.pt"
    ckpt.parent.mkdir()
    state = {"config": cfg.to_dict(), "info": info_to_dict(ds.info), "model": model.state_dict()}
    torch.save({**state, "step": 0, "best": None}, ckpt)
    assert main(["export", "--checkpoint", str(ckpt.parent), "--bundle", str(root / "b")]) == 0
    inputs = root / "in"
    inputs.mkdir()
    for c in ds.cases:
        shutil.copy(c["image"][0], inputs / Path(c["image"][0]).name)
    return ckpt, root / "b", inputs, cfg


def test_bundle_layout_and_metadata(exported):
    _, bundle, _, cfg = exported
    for f in ("configs/metadata.json", "configs/inference.json", "models/model.pt",
              "models/model.pt2", "docs/README.md", "LICENSE"):  # fmt: skip
        assert (bundle / f).is_file(), f
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    # the mandatory keys of the MONAI bundle specification (docs/source/mb_specification.rst)
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "task",
                "description", "authors", "copyright", "network_data_format"):  # fmt: skip
        assert meta[key], key
    spec = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
            "is_patch_data", "channel_def")  # fmt: skip
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert set(spec) <= set(image) and set(spec) - {"modality"} <= set(pred)
    assert pred["channel_def"] == {"0": "lesion"} and image["spatial_shape"] == [16] * 3
    # no name MONAI takes as deprecated: it would replace the required packages' list on parsing
    assert not set(meta) & set(DEPRECATED_ID_MAPPING)
    assert {"fastnmf", "nibabel", "fire"} <= set(meta["required_packages_version"])
    inference = json.loads((bundle / "configs/inference.json").read_text())
    assert inference["network_def"]["_target_"] == "fastnmf.bundle.network"
    weights = torch.load(bundle / "models/model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())


def test_bundle_network_in_out_is_verified(exported):
    from monai.bundle import verify_net_in_out

    _, bundle, _, _ = exported
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs/metadata.json"),
        config_file=str(bundle / "configs/inference.json"),
        device="cpu",
    )
    with pytest.raises(ValueError, match="output channel number"):  # it does check something
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(bundle / "configs/metadata.json"),
            config_file=str(bundle / "configs/inference.json"),
            device="cpu",
            **{"_meta_#network_data_format#outputs#pred#num_channels": 2},
        )


def test_bundle_metadata_against_monai_schema(exported, tmp_path):
    """MONAI's verify_metadata needs jsonschema and downloads the schema named in metadata.json;
    offline, a local copy of it can be given as FASTNMF_MONAI_SCHEMA. Skipped without either."""
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    _, bundle, _, _ = exported
    schema = tmp_path / "schema.json"
    if os.environ.get("FASTNMF_MONAI_SCHEMA"):  # verify_metadata keeps an existing file
        shutil.copy(os.environ["FASTNMF_MONAI_SCHEMA"], schema)
    meta = bundle / "configs/metadata.json"
    try:
        verify_metadata(meta_file=str(meta), filepath=str(schema))
    except (OSError, RuntimeError) as e:  # download failed
        if not schema.is_file():
            pytest.skip(f"schema not downloadable here: {e}")
        raise
    broken = json.loads(meta.read_text())
    del broken["copyright"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="'copyright' is a required property"):
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(schema))


def _same(a: Path, b: Path) -> None:
    x, y = nib.load(str(a)), nib.load(str(b))
    assert x.shape == y.shape and np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj))
    assert np.array_equal(x.affine, y.affine) and x.get_data_dtype() == y.get_data_dtype()


def test_bundle_output_equals_fastnmf_infer(exported, tmp_path):
    from monai.bundle import run

    ckpt, bundle, inputs, cfg = exported
    run(config_file=str(bundle / "configs/inference.json"), dataset_dir=str(inputs),
        output_dir=str(tmp_path / "bundle_out"))  # fmt: skip
    files = sorted(inputs.iterdir())
    assert len(files) == 2
    for f in files:
        cases, _ = cases_for(str(f), cfg=cfg)
        infer(ckpt, cases, tmp_path / "infer_out", device="cpu", png=False)
        out = tmp_path / "bundle_out" / f.name
        _same(out, tmp_path / "infer_out" / f.name)
        labels = np.asarray(nib.load(str(out)).dataobj)
        assert labels.shape == nib.load(str(f)).shape and 0 < labels.sum() < labels.size
        assert np.array_equal(nib.load(str(out)).affine, nib.load(str(f)).affine)


def test_bundle_runs_from_the_command_line(exported, tmp_path):
    """As a user: ``python -m monai.bundle run --config_file ... --dataset_dir ...``."""
    pytest.importorskip("fire", reason="MONAI's bundle command line needs python-fire")
    ckpt, bundle, inputs, _ = exported
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str(bundle / "configs/inference.json"), "--dataset_dir", str(inputs),
           "--output_dir", str(tmp_path / "out")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in inputs.iterdir()
    )
    bad = subprocess.run(cmd[:-4] + ["--dataset_dir", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode != 0 and "input folder not found" in bad.stderr


def test_bundle_program_equals_the_network(exported, tmp_path):
    """models/model.pt2: the eval network with the bundle's weights, the NMF layers as fastnmf's
    op, any batch size; ``--no-program`` leaves it out."""
    from fastnmf.bundle import network
    from fastnmf.cli import main
    from fastnmf.program import load_program

    ckpt, bundle, _, cfg = exported
    saved = torch.load(ckpt, weights_only=False)
    net = network(config=saved["config"], info=saved["info"], kernel="torch")
    net.load_state_dict(torch.load(bundle / "models/model.pt", weights_only=True))
    program = load_program(bundle / "models/model.pt2")
    # no example input saved with it (67 MB for a 4-channel 128^3 batch of 2)
    assert torch.export.load(bundle / "models/model.pt2").example_inputs is None
    assert any("fastnmf.matricized_nmf" in str(n.target) for n in program.graph.nodes)
    gen = torch.Generator().manual_seed(5)
    for batch in (1, 3):
        x = torch.randn(batch, 1, *[cfg.crop_size] * 3, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(program(x), net(x), rtol=1e-6, atol=1e-7)
    # as the bundle's README says: a fresh process that imports only fastnmf and torch
    code = ("import sys, fastnmf, torch; net = torch.export.load(sys.argv[1]).module(); "
            "s = int(sys.argv[2]); print(list(net(torch.zeros(1, 1, s, s, s)).shape))")
    r = subprocess.run([sys.executable, "-c", code, str(bundle / "models/model.pt2"),
                        str(cfg.crop_size)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    assert r.stdout.strip() == str([1, 1] + [cfg.crop_size] * 3)
    out = tmp_path / "b"
    argv = ["export", "--checkpoint", str(ckpt), "--bundle", str(out), "--no-program"]
    assert main(argv) == 0
    assert (out / "models/model.pt").is_file() and not (out / "models/model.pt2").exists()


def test_export_refuses_a_non_empty_folder(exported, capsys):
    from fastnmf.cli import main

    ckpt, bundle, _, _ = exported
    assert main(["export", "--checkpoint", str(ckpt), "--bundle", str(bundle)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
