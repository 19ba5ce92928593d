"""Bad input over every public entry, table-driven: (entry, case, call, expected).

``expected`` is ``(exception type, message regex)`` — a clear error naming the problem — or a
callable checking a documented correct result. Cases already in test_bad_input.py, test_data.py,
test_models.py and test_pipeline.py are not repeated here. The README's Reliability section quotes
how many cases this file tries; ``test_case_counts_match_the_readme`` reads it and compares.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import fastnmf
from fastnmf import data, models
from fastnmf.config import resolve
from fastnmf.infer import CheckpointError, load_checkpoint, resolve_device

HAS_CUDA = torch.cuda.is_available()
X5 = (1, 8, 8, 8, 8)


def mnmf(x=None, v0=None, **kw):
    x = torch.randn(*X5) if x is None else x
    v0 = torch.rand(64, 1) if v0 is None else v0
    return fastnmf.matricized_nmf(x, v0, **{"head_dim": 4, "window": 4, **kw})


def nmf(x=None, v0=None, **kw):
    x = torch.rand(2, 3, 5) if x is None else x
    return fastnmf.nmf(x, torch.rand(5, 1) if v0 is None else v0, **kw)


def finite(y):
    assert torch.isfinite(y).all()


def shape(*s):
    def check(y):
        assert tuple(y.shape) == s

    return check


def net(**kw):
    opts = dict(widths=(8, 16, 32), head_dim=4, window=2, deep_supervision=1)
    return models.build("swin_factorizer", spatial_size=(16, 16, 16), kernel="torch", **opts, **kw)


def nmf_module_with(**attrs):
    layer = fastnmf.NMF((3, 5))
    for k, v in attrs.items():
        setattr(layer, k, v)
    return layer


def tiny_net():
    return net().eval()


# ---------------------------------------------------------------------------------------------
# data helpers (a folder of 2 generic cases, written once per test)


def nifti(path: Path, arr, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else affine), str(path))
    return path


def folder(root: Path, label=None) -> Path:
    rng = np.random.default_rng(0)
    for i in range(2):
        nifti(root / "imagesTr" / f"c{i}.nii.gz", rng.normal(size=(8, 8, 8)).astype(np.float32))
        lab = np.zeros((8, 8, 8), np.uint8) if label is None or i else label
        nifti(root / "labelsTr" / f"c{i}.nii.gz", lab)
    return root


def datalist(root: Path, entries) -> Path:
    folder(root)
    p = root / "dl.json"
    p.write_text(json.dumps(entries))
    return p


def img(root: Path, i=0) -> str:
    return str(root / "imagesTr" / f"c{i}.nii.gz")


def lab(root: Path, i=0) -> str:
    return str(root / "labelsTr" / f"c{i}.nii.gz")


def first_case(root: Path):
    ds = data.open_dataset(root)
    return data.val_transforms(ds.info)(ds.cases[0])


def truncated(root: Path) -> Path:
    folder(root)
    p = Path(img(root))
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])  # gzip stream cut in half
    return root


def zero_byte(root: Path) -> Path:
    folder(root)
    Path(lab(root, 1)).write_bytes(b"")
    return root


# ---------------------------------------------------------------------------------------------
# the table: entry, case, call (gets tmp_path), expected

E = ValueError
T = TypeError
DE = data.DataError
CASES = [
    # functional nmf
    ("nmf", "x on meta, v0 on cpu", lambda p: nmf(torch.rand(2, 3, 5, device="meta")),
     (E, r"v0 is on cpu but x is on meta")),
    ("nmf", "u0 on another device", lambda p: nmf(u0=torch.rand(3, 1, device="meta")),
     (E, r"u0 is on meta but x is on cpu")),
    ("nmf", "empty matrix (M = 0)", lambda p: nmf(torch.rand(2, 0, 5)), (E, r"M, N >= 1")),
    ("nmf", "empty batch", lambda p: nmf(torch.rand(0, 3, 5)), shape(0, 3, 5)),
    ("nmf", "Inf in x", lambda p: nmf(torch.full((2, 3, 5), float("inf"))),
     (E, r"x contains Inf")),
    ("nmf", "NaN in v0", lambda p: nmf(v0=torch.full((5, 1), float("nan"))),
     (E, r"v0 contains NaN")),
    ("nmf", "negative u0", lambda p: nmf(u0=-torch.rand(3, 1)), (E, r"u0 has negative entries")),
    ("nmf", "Inf in u0", lambda p: nmf(u0=torch.full((3, 1), float("inf"))),
     (E, r"u0 contains Inf")),
    ("nmf", "complex x", lambda p: nmf(torch.rand(2, 3, 5, dtype=torch.complex64)),
     (T, r"x has dtype torch.complex64; expected a floating dtype")),
    ("nmf", "v0 not a tensor", lambda p: nmf(v0=[[1.0]] * 5), (T, r"v0 must be a torch.Tensor")),
    ("nmf", "unknown kernel", lambda p: nmf(kernel="cuda"), (E, r"unknown kernel 'cuda'")),
    ("nmf", "unknown solver", lambda p: nmf(solver="als"), (E, r"unknown solver 'als'")),
    ("nmf", "num_grad_steps < 0", lambda p: nmf(num_grad_steps=-1),
     (E, r"num_grad_steps must be an int >= 0")),
    ("nmf", "v0 of 3 dims", lambda p: nmf(v0=torch.rand(5, 1, 1)), (E, r"v0 must have shape")),
    ("nmf", "all-zero v0: documented zero output", lambda p: nmf(v0=torch.zeros(5, 1)), finite),
    ("nmf", "huge magnitude 1e30", lambda p: nmf(torch.rand(2, 3, 5) * 1e30), finite),
    ("nmf", "tiny magnitude 1e-30", lambda p: nmf(torch.rand(2, 3, 5) * 1e-30), finite),
    ("nmf", "x float64, v0 float32: runs in x's dtype",
     lambda p: nmf(torch.rand(2, 3, 5, dtype=torch.float64)), finite),
    # functional matricized_nmf
    ("matricized_nmf", "x on meta, v0 on cpu", lambda p: mnmf(torch.randn(X5, device="meta")),
     (E, r"v0 is on cpu but x is on meta")),
    ("matricized_nmf", "u0 on another device", lambda p: mnmf(u0=torch.rand(4, 1, device="meta")),
     (E, r"u0 is on meta but x is on cpu")),
    ("matricized_nmf", "meta device: shapes only (FLOP counting)",
     lambda p: mnmf(torch.randn(X5, device="meta"), torch.rand(64, 1, device="meta")),
     shape(*X5)),
    ("matricized_nmf", "head_dim 0", lambda p: mnmf(head_dim=0), (E, r"head_dim must be an int")),
    ("matricized_nmf", "window 0", lambda p: mnmf(window=0),
     (E, r"window must be positive")),
    ("matricized_nmf", "window a float", lambda p: mnmf(window=4.0),
     (T, r"window must be an int or a tuple of 3 ints, got 4.0")),
    ("matricized_nmf", "window larger than the volume", lambda p: mnmf(window=16),
     (E, r"dim 0 has size 8, not a multiple of 16")),
    ("matricized_nmf", "zero-size spatial dim", lambda p: mnmf(torch.randn(1, 8, 0, 8, 8)),
     (E, r"x is empty")),
    ("matricized_nmf", "empty shifts list", lambda p: mnmf(shifts=[]),
     (E, r"shifts must not be empty")),
    ("matricized_nmf", "shifts a string", lambda p: mnmf(shifts="default"),
     (T, r"shifts must be None or a list")),
    ("matricized_nmf", "rank 0 v0", lambda p: mnmf(v0=torch.rand(64, 0)),
     (E, r"v0 must have shape \(64, R\) with R >= 1")),
    ("matricized_nmf", "numpy input", lambda p: mnmf(torch.randn(X5).numpy()),
     (T, r"x must be a torch.Tensor, got ndarray")),
    ("matricized_nmf", "6-dim input", lambda p: mnmf(torch.randn(1, 8, 4, 4, 4, 4)),
     (E, r"\(6 dims\)")),
    ("matricized_nmf", "NaN in v0", lambda p: mnmf(v0=torch.full((64, 1), float("nan"))),
     (E, r"v0 contains NaN")),
    ("matricized_nmf", "negative u0", lambda p: mnmf(u0=-torch.rand(4, 1)),
     (E, r"u0 has negative entries")),
    ("matricized_nmf", "triton: head_dim beyond 64",
     lambda p: mnmf(torch.randn(1, 128, 4, 4, 4), head_dim=128, kernel="triton"),
     (E, r"head_dim=128 is too large for the Triton kernels \(max 64\)")),
    ("matricized_nmf", "shift beyond the volume: wraps", lambda p: mnmf(shifts=[None, 1000]),
     finite),
    ("matricized_nmf", "negative shift", lambda p: mnmf(shifts=[None, -2]), finite),
    ("matricized_nmf", "huge magnitude 1e30", lambda p: mnmf(torch.randn(X5) * 1e30), finite),
    ("matricized_nmf", "tiny magnitude 1e-30", lambda p: mnmf(torch.randn(X5) * 1e-30), finite),
    ("matricized_nmf", "single voxel, global", lambda p: mnmf(torch.randn(1, 8, 1, 1, 1),
     torch.rand(1, 1), window=None), finite),
    # modules
    ("modules", "MatricizedNMF window 0",
     lambda p: fastnmf.MatricizedNMF(head_dim=4, window=0),
     (E, r"window must be positive")),
    ("modules", "MatricizedNMF num_grad_steps < 0",
     lambda p: fastnmf.MatricizedNMF(head_dim=4, window=4, num_grad_steps=-3),
     (E, r"num_grad_steps must be an int >= 0")),
    ("modules", "MatricizedNMF unknown shifts string",
     lambda p: fastnmf.MatricizedNMF(head_dim=4, window=4, shifts="swin")(torch.randn(X5)),
     (E, r"unknown shifts 'swin'")),
    ("modules", "MatricizedNMF spatial_dims 4",
     lambda p: fastnmf.MatricizedNMF(head_dim=4, window=4, spatial_dims=4),
     (E, r"spatial_dims must be 2 or 3")),
    ("modules", "MatricizedNMF input on meta, buffers on cpu",
     lambda p: fastnmf.MatricizedNMF(head_dim=4, window=4)(torch.randn(X5, device="meta")),
     (E, r"v0 is on cpu but x is on meta")),
    ("modules", "MatricizedNMF non-divisible input",
     lambda p: fastnmf.MatricizedNMF(head_dim=4, window=4)(torch.randn(1, 8, 6, 8, 8)),
     (E, r"dim 0 has size 6, not a multiple of 4 \(nearest valid sizes: 4, 8\)")),
    ("modules", "NMF size 0", lambda p: fastnmf.NMF((0, 5)), (E, r"size\[0\] must be an int >= 1")),
    ("modules", "NMF wrong matrix width", lambda p: fastnmf.NMF((3, 5))(torch.rand(2, 3, 6)),
     (E, r"v0 must have shape \(6, R\)")),
    ("modules", "NMF negative input", lambda p: fastnmf.NMF((3, 5))(-torch.rand(2, 3, 5)),
     (E, r"x has negative entries")),
    ("modules", "NMF rank True", lambda p: fastnmf.NMF((3, 5), rank=True),
     (E, r"rank must be an int >= 1, got True")),
    ("modules", "iters set to -1 after construction, then called",
     lambda p: nmf_module_with(iters=-1)(torch.rand(2, 3, 5)), (E, r"iters must be an int >= 0")),
    # models
    ("models", "integer input",
     lambda p: tiny_net()(torch.ones(1, 4, 16, 16, 16, dtype=torch.long)),
     (T, r"dtype torch.int64; the network needs a floating input")),
    ("models", "float64 input to a float32 network",
     lambda p: tiny_net()(torch.ones(1, 4, 16, 16, 16, dtype=torch.float64)),
     (T, r"dtype torch.float64 but the network's parameters are torch.float32")),
    ("models", "input on meta, network on cpu",
     lambda p: tiny_net()(torch.ones(1, 4, 16, 16, 16, device="meta")),
     (E, r"input is on meta but the network's parameters are on cpu")),
    ("models", "empty batch", lambda p: tiny_net()(torch.ones(0, 4, 16, 16, 16)),
     (E, r"the input is empty \(shape \(0, 4, 16, 16, 16\)\)")),
    ("models", "NaN input", lambda p: tiny_net()(torch.full((1, 4, 16, 16, 16), float("nan"))),
     (E, r"contains NaN")),
    ("models", "baseline: float64 input",
     lambda p: models.build("unetr", spatial_size=(16, 16, 16), feature_size=8, hidden_size=48,
                            mlp_dim=96, num_heads=4)(torch.ones(1, 4, 16, 16, 16).double()),
     (T, r"float64 but the network's parameters are torch.float32")),
    ("models", "unknown kernel", lambda p: models.build("swin_factorizer", kernel="gpu"),
     (E, r"unknown kernel 'gpu'")),
    ("models", "one-level widths",
     lambda p: models.build("swin_factorizer", widths=(8,), spatial_size=(16, 16, 16)),
     (E, r"widths needs at least 2 levels")),
    ("models", "set_nmf iters -1", lambda p: models.set_nmf(tiny_net(), iters=-1),
     (E, r"iters must be an int >= 0")),
    ("models", "set_nmf unknown solver", lambda p: models.set_nmf(tiny_net(), solver="x"),
     (E, r"unknown solver 'x'")),
    ("models", "skip a block that does not exist",
     lambda p: models.inference_controls(tiny_net(), skip=[99]).__enter__(),
     (E, r"block indices \[99\] out of range")),
    # data loaders
    ("data", "datalist without 'training'", lambda p: data.open_dataset(datalist(p, {"foo": []})),
     (DE, r"dl.json: no 'training' list \(keys: foo\)")),
    ("data", "datalist 'training' not a list",
     lambda p: data.open_dataset(datalist(p, {"training": "x"})), (DE, r"no 'training' list")),
    ("data", "datalist entry without 'image'",
     lambda p: data.open_dataset(datalist(p, {"training": [{"label": "l.nii.gz"}]})),
     (DE, r"training\[0\] must be an object with an 'image' entry")),
    ("data", "datalist entry with an empty image list",
     lambda p: data.open_dataset(datalist(p, {"training": [{"image": [], "label": "x"}]})),
     (DE, r"training\[0\]\['image'\] must be a path or a non-empty list")),
    ("data", "datalist entry with a numeric image",
     lambda p: data.open_dataset(datalist(p, {"training": [{"image": 5, "label": "x"}]})),
     (DE, r"training\[0\]\['image'\] must be a path")),
    ("data", "datalist top level a list", lambda p: data.open_dataset(datalist(p, [1, 2])),
     (DE, r"expected a JSON object with a 'training' list")),
    ("data", "datalist duplicate case ids",
     lambda p: data.open_dataset(datalist(p, {"training": [{"image": "imagesTr/c0.nii.gz"}] * 2})),
     (DE, r"duplicate case ids: c0")),
    ("data", "datalist names a missing file",
     lambda p: data.open_dataset(datalist(p, {"training": [{"image": "nope.nii.gz"}]})),
     (data.MissingFileError, r"nope.nii.gz: file not found")),
    ("data", "zero-byte label NIfTI", lambda p: data.open_dataset(zero_byte(p)),
     (DE, r"c1.nii.gz: cannot read as NIfTI")),
    ("data", "truncated gzip image (header reads, data does not)",
     lambda p: first_case(truncated(p)), (DE, r"c0.nii.gz")),
    ("data", "fractional label values",
     lambda p: first_case(folder(p, np.full((8, 8, 8), 0.5, np.float32))),
     (DE, r"c0.nii.gz: label values must be integers")),
    ("data", "negative label values",
     lambda p: first_case(folder(p, np.full((8, 8, 8), -1, np.int16))),
     (DE, r"label values \[-1\] outside the expected set \[0, 1\]")),
    ("data", "demo size below 16", lambda p: data.make_demo(n_cases=2, size=8),
     (E, r"size must be >= 16, got 8")),
    ("data", "demo with no cases", lambda p: data.make_demo(n_cases=0, size=16),
     (E, r"n_cases must be >= 1")),
    ("data", "crop size 0", lambda p: data.train_transforms("demo", crop_size=0),
     (E, r"crop_size must be an int or three positive ints, got 0")),
    ("data", "one fold", lambda p: data.split([{"id": "a", "image": ["x"]}] * 3, 0, n_folds=1),
     (E, r"n_folds must be an integer >= 2")),
    # config
    ("config", "steps 0", lambda p: resolve("demo", steps=0), (E, r"steps must be an integer >=")),
    ("config", "steps 2.5", lambda p: resolve("demo", steps=2.5), (E, r"steps must be an integer")),
    ("config", "negative batch", lambda p: resolve("demo", batch_size=-1), (E, r"batch_size")),
    ("config", "overlap 1", lambda p: resolve("demo", overlap=1.0), (E, r"overlap must be in")),
    ("config", "lr 0", lambda p: resolve("demo", lr=0.0), (E, r"lr must be > 0")),
    ("config", "deterministic 'yes'", lambda p: resolve("demo", deterministic="yes"),
     (E, r"deterministic must be true or false")),
    ("config", "fold out of range", lambda p: resolve("demo", fold=7), (E, r"fold must be in 0")),
    ("config", "amp fp8", lambda p: resolve("demo", amp="fp8"), (E, r"unknown amp mode 'fp8'")),
    ("config", "model_options a list", lambda p: resolve("demo", model_options=[1]),
     (E, r"model_options must be a dict")),
    ("config", "empty deep_supervision", lambda p: resolve("demo", deep_supervision=[]),
     (E, r"deep_supervision must be a non-empty list")),
    ("config", "unknown key", lambda p: resolve("demo", bogus=1), (E, r"config key.* bogus")),
    ("config", "unknown device", lambda p: resolve_device("tpu"), (E, r"unknown device 'tpu'")),
    # checkpoints
    ("checkpoint", "missing file", lambda p: load_checkpoint(p / "nope.pt"),
     (CheckpointError, r"nope.pt: checkpoint not found")),
    ("checkpoint", "a folder", lambda p: load_checkpoint(p), (CheckpointError, r"not found")),
    ("checkpoint", "not a fastnmf checkpoint",
     lambda p: (torch.save([1, 2], p / "l.pt"), load_checkpoint(p / "l.pt")),
     (CheckpointError, r"l.pt: not a fastnmf checkpoint")),
    ("checkpoint", "truncated file",
     lambda p: (torch.save({"config": {}, "model": {}}, p / "t.pt"),
                (p / "t.pt").write_bytes((p / "t.pt").read_bytes()[:300]),
                load_checkpoint(p / "t.pt")),
     (CheckpointError, r"t.pt: cannot read checkpoint")),
]  # fmt: skip

if HAS_CUDA:  # pragma: no cover - GPU sessions
    CASES += [
        ("nmf", "x on cuda, v0 on cpu", lambda p: nmf(torch.rand(2, 3, 5, device="cuda")),
         (E, r"v0 is on cpu but x is on cuda")),
        ("matricized_nmf", "x on cuda, v0 on cpu", lambda p: mnmf(torch.randn(X5, device="cuda")),
         (E, r"v0 is on cpu but x is on cuda")),
        ("models", "input on cuda, network on cpu",
         lambda p: tiny_net()(torch.ones(1, 4, 16, 16, 16, device="cuda")),
         (E, r"input is on cuda:0 but the network's parameters are on cpu")),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "entry,case,call,expected", CASES, ids=[f"{e}: {c}" for e, c, _, _ in CASES]
)
def test_bad_input(entry, case, call, expected, tmp_path):
    if isinstance(expected, tuple):
        exc, match = expected
        with pytest.raises(exc, match=match):
            call(tmp_path)
    else:
        expected(call(tmp_path))


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only message")
def test_cuda_requested_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available here"):
        resolve_device("cuda")


# ---------------------------------------------------------------------------------------------
# CLI: every error is one line "fastnmf <command>: error: ..." with status 2, no traceback


def cli(*args):
    from fastnmf.cli import main

    return main([str(a) for a in args])


def blocked(p: Path) -> Path:
    """An output path that cannot be created (its parent is a regular file; works as root)."""
    (p / "file").write_text("x")
    return p / "file" / "out"


CLI_CASES = [
    ("train", "steps 0", lambda p: ["train", "--steps", 0, "--out", p / "o"],
     r"steps must be an integer >= 1"),
    ("train", "cuda device without CUDA", lambda p: ["train", "--device", "cuda", "--out", p / "o"],
     r"CUDA is not available|cannot|device"),
    ("train", "model option without '='", lambda p: ["train", "--model-opt", "widths",
                                                     "--out", p / "o"], r"expects KEY=VALUE"),
    ("train", "resume a missing checkpoint",
     lambda p: ["train", "--resume", p / "nope.pt"], r"nope.pt: checkpoint not found"),
    ("train", "datalist with missing keys",
     lambda p: ["train", "--data", datalist(p, {"foo": []}), "--out", p / "o"],
     r"no 'training' list"),
    ("train", "unwritable output directory",
     lambda p: ["train", "--steps", 1, "--out", blocked(p)], r"Not a directory|File exists"),
    ("infer", "missing checkpoint", lambda p: ["infer", "--checkpoint", p / "none.pt"],
     r"none.pt: checkpoint not found"),
    ("evaluate", "missing predictions folder",
     lambda p: ["evaluate", "--pred", p / "nope", "--data", folder(p / "d"), "--cases", "all"],
     r"predictions folder not found"),
    ("compare", "missing CSV", lambda p: ["compare", p / "a.csv", p / "b.csv"],
     r"a.csv: per-case metrics CSV not found"),
    ("bench-layer", "volume not divisible by the window",
     lambda p: ["bench-layer", "--size", 10, "--window", 4, "--repeats", 1],
     r"not divisible by window"),
]  # fmt: skip


@pytest.mark.parametrize(
    "command,case,argv,match", CLI_CASES, ids=[f"cli {c}: {k}" for c, k, _, _ in CLI_CASES]
)
def test_cli_bad_input(command, case, argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTNMF_CACHE", str(tmp_path / "cache"))
    if HAS_CUDA and case == "cuda device without CUDA":
        pytest.skip("CUDA is available")
    rc = cli(*argv(tmp_path))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"fastnmf {command}: error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(match, err), err


def test_cli_infer_unwritable_output(tmp_path, capsys, monkeypatch):
    """A trained checkpoint, then --out under a regular file: one error line, status 2."""
    monkeypatch.setenv("FASTNMF_CACHE", str(tmp_path / "cache"))
    data.make_demo(n_cases=4, size=32)
    from fastnmf.train import train

    cfg = resolve(
        "demo",
        demo={"n_cases": 4, "size": 32, "seed": 0},
        n_folds=4,
        crop_size=16,
        model_options={"widths": [8, 16, 32], "head_dim": 4, "window": 4, "deep_supervision": 2},
        steps=1,
        val_every=1,
        val_cases=1,
        num_workers=0,
        evaluate=False,
        device="cpu",
    )
    train(cfg, out=tmp_path / "run", progress=False, verbose=False)
    rc = cli("infer", "--checkpoint", tmp_path / "run", "--out", blocked(tmp_path), "--no-png")
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fastnmf infer: error: ") and "Traceback" not in err, err


README = Path(__file__).resolve().parents[1] / "README.md"
# the README's names for the areas of CASES ("cli" gathers every CLI_CASES row)
README_AREAS = {
    "`nmf`": "nmf",
    "`matricized_nmf`": "matricized_nmf",
    "modules": "modules",
    "models": "models",
    "data": "data",
    "config": "config",
    "checkpoints": "checkpoint",
    "CLI": "cli",
}


def _readme_counts() -> tuple[int, dict[str, int]]:
    """The total and the per-area counts in the README's Reliability row for this file."""
    row = next(
        line for line in README.read_text().splitlines() if "test_reliability_inputs" in line
    )
    cell = row.rstrip(" |").rsplit("|", 1)[-1]  # "106: `nmf` 18, `matricized_nmf` 21, ..."
    total, areas = cell.split(":", 1)
    counts = {}
    for name, key in README_AREAS.items():
        found = re.search(rf"(?:^|, ){re.escape(name)} (\d+)", areas.strip())
        assert found, f"README's reliability row names no count for {name}: {cell!r}"
        counts[key] = int(found.group(1))
    return int(total), counts


def test_case_counts_match_the_readme():
    """The README's Reliability section quotes how many bad inputs this file tries: the table
    rows per area, and in all (the rows plus this file's other tests)."""
    counts = Counter(e for e, *_ in CASES)
    counts["cli"] = len(CLI_CASES)
    others = [n for n, f in globals().items() if n.startswith("test_") and callable(f)]
    others = [n for n in others if n not in ("test_bad_input", "test_cli_bad_input")]
    others.remove("test_case_counts_match_the_readme")
    total, quoted = _readme_counts()
    assert dict(counts) == quoted
    assert total == len(CASES) + len(CLI_CASES) + len(others)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plain_cuda_resolves_to_an_indexed_device():
    """torch.cuda.set_device (training) needs an index; 'cuda' means this process's GPU."""
    dev = resolve_device("cuda")
    assert dev.type == "cuda" and dev.index == torch.cuda.current_device()
    assert resolve_device("auto").index is not None
