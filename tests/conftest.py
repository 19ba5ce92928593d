"""Test set-up: Triton kernels run on the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    import fast_interpreter  # tests/: the interpreter without its repeated patching (docstring)

    fast_interpreter.install()

# Under pytest-xdist (`pytest -n auto`, the README's test command) each worker takes its share of
# the cores: processes that each run PyTorch's default thread count on the same cores slow each
# other many-fold. Subprocesses started by tests inherit the share through OMP_NUM_THREADS.
MAX_WORKERS = 8  # `-n auto`: one worker per core, at most this many (each holds torch + Triton)
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _share = max(1, _CORES // _WORKERS)
    torch.set_num_threads(_share)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core this process may run on, at most MAX_WORKERS."""
    return min(_CORES, MAX_WORKERS)


@pytest.fixture
def design1(monkeypatch):
    """The first window design (``window_nmf.TUNING["design"] = 1``) for one test."""
    monkeypatch.setitem(importlib.import_module("fastnmf.kernels.window_nmf").TUNING, "design", 1)


@pytest.fixture
def design3(monkeypatch):
    """The third window design (``window_nmf.TUNING["design"] = 3``) for one test."""
    monkeypatch.setitem(importlib.import_module("fastnmf.kernels.window_nmf").TUNING, "design", 3)


@pytest.fixture
def gen():
    """A fresh, unseeded-by-the-test generator: every test run draws new inputs.

    The seed is printed on failure (pytest shows captured stdout), so a failure can be replayed
    with FASTNMF_TEST_SEED=<seed>.
    """
    seed = int(os.environ.get("FASTNMF_TEST_SEED", torch.randint(0, 2**31 - 1, ()).item()))
    print(f"FASTNMF_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


# The tiny demo run of the pipeline tests (4 cases of 32^3, 16^3 crops, a 3-level net), as
# TrainConfig options and as `fastnmf train` arguments
TINY_MODEL_OPTIONS = {"widths": [8, 16, 32], "head_dim": 4, "window": 4, "deep_supervision": 2}
TINY_RUN = dict(demo={"n_cases": 4, "size": 32, "seed": 0}, n_folds=4, crop_size=16)
TINY_TRAIN_ARGS = [
    "--demo-cases=4",
    "--demo-size=32",
    "--folds=4",
    "--crop-size=16",
    *(f"--model-opt={k}={v}".replace(" ", "") for k, v in TINY_MODEL_OPTIONS.items()),
]


def tiny_config(**kw):
    """``resolve("demo", ...)`` of a tiny CPU run: the tiny model, lr 1e-3, no loader workers, no
    final evaluation; ``kw`` adds to or overrides these (e.g. ``**TINY_RUN``, the steps)."""
    from fastnmf.config import resolve

    base = dict(model_options=dict(TINY_MODEL_OPTIONS), lr=1e-3, num_workers=0, evaluate=False,
                device="cpu")  # fmt: skip
    return resolve("demo", **{**base, **kw})

# the kernel tests' devices: the interpreter on a CPU without a GPU, else the GPU
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter runs without GPU"),
    ),
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    ),
]


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints hold bitwise the same model weights and optimizer state."""
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            other = b["optimizer"]["state"][k][name]
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(other)), (k, name)


def n_columns(spatial, patch) -> int:
    """Columns N of each matrix: prod(patch) (an int: per spatial dim), prod(spatial) if None."""
    if patch is None:
        return math.prod(spatial)
    return patch ** len(spatial) if isinstance(patch, int) else math.prod(patch)


def load_bench(name: str):
    """Import bench/<name>.py (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff if scale == 0 else diff / scale


def window_kw(kw: dict) -> dict:
    """The tests' ``patch_size=`` (the kernels' and the oracle's name) as ``matricized_nmf``'s
    ``window=`` (patch_size there is deprecated; the deprecation's own tests call it directly)."""
    kw = dict(kw)
    if "patch_size" in kw:
        kw["window"] = kw.pop("patch_size")
    return kw


def check_fp32(got, want, tol, other_fp32) -> None:
    """An fp32 result ``got`` (output or gradient) within ``tol`` of the float64 oracle's
    ``want``, relative. HALS through T iterations can amplify fp32 rounding (a ReLU of a HALS
    update sits at its kink and flips on rounding): on a few random draws in a hundred to a
    thousand the oracle itself, run in fp32, misses ``tol`` (seed sweeps of rank 2 and 3 cases).
    Only then is ``got`` held to the rule for reduced precision: within 2x the error of another
    implementation in fp32, ``other_fp32()`` (the oracle's; for the oracle itself, the torch
    path's), which must miss ``tol`` too; any other miss fails."""
    err = rel_err(got, want)
    if err <= tol:
        return
    ref_err = rel_err(other_fp32(), want)
    assert ref_err > tol, f"error {err:.3g} > {tol:g} (the other in fp32: {ref_err:.3g})"
    assert err <= 2 * ref_err, f"error {err:.3g} > 2 x the other's fp32 error {ref_err:.3g}"


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A private FASTNMF_CACHE holding the 4-case 32³ demo set, set for the module's tests (a
    fresh folder per module, so that no module sees what another wrote) and restored after."""
    from fastnmf import data

    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("FASTNMF_CACHE")
    os.environ["FASTNMF_CACHE"] = str(root)
    try:
        data.make_demo(n_cases=4, size=32)
        yield root
    finally:
        if old is None:
            os.environ.pop("FASTNMF_CACHE", None)
        else:
            os.environ["FASTNMF_CACHE"] = old


def _ptx_tools_missing() -> list[str]:
    """What the static report lacks to compile for sm_90a (ptxas, nvdisasm; empty: nothing)."""
    from fastnmf.profile.static import ptx_tools  # after TRITON_INTERPRET is set (above)

    return ptx_tools.missing_tools(["sm_90a"])


PTX_MISSING = _ptx_tools_missing()
# the static tests: compiled for sm_90a by Triton's own ptxas (skipped, saying why, without it)
needs_ptxas = pytest.mark.skipif(bool(PTX_MISSING), reason="; ".join(PTX_MISSING) or "present")
