"""Random rank-one window cases of designs 2 and 3 (random tiles, windows a program, shapes,
patches, head dims and shift lists) run as a GPU would launch them and bounds-checked (the byte
counter: ``fastnmf.profile.static.counter``), against the float64 oracle.

The kernel tests run with the interpreter's own launch geometry; here the counter sets the GPU's
(``gpu_geometry``) and stops at any lane outside its tensor. A few seeded cases run in CI; a
longer sweep: ``FASTNMF_FUZZ_CASES=400 pytest tests/test_window_fuzz.py -q`` (about 27 minutes on
one CPU core; all 400 passed on 2026-12-05 at commit 85b84e1, and on 2026-12-06 with the kernels
of commit e5e16ac under Triton 3.9 and under Triton 3.6); the low-precision cases:
``FASTNMF_FUZZ_LOW_CASES=60 pytest tests/test_window_fuzz.py -q -k low`` (5 minutes; all 60 passed
on 2026-12-06, Triton 3.9).
"""

import importlib
import os
import random

import pytest
import torch
from conftest import rel_err
from kernel_helpers import nmf_inputs, run_grad

from fastnmf.profile.static.counter import counting, interpreting

wn = importlib.import_module("fastnmf.kernels.window_nmf")
common2 = importlib.import_module("fastnmf.kernels._window2_common")
sched3 = importlib.import_module("fastnmf.kernels._window3_sched")

TILES2 = ("parts_tile", "apply_tile", "parts_bwd_tile", "out_tile")  # design 2's TUNING keys
CASES = int(os.environ.get("FASTNMF_FUZZ_CASES", "6"))
# the same cases in bf16 (even seeds) and fp16 (odd); in CI seeds 1 (fp16, design 2 with its
# tiles, E = P = 8) and 4 (bf16, design 3, E = P = 8), a few seconds each
_LOW = os.environ.get("FASTNMF_FUZZ_LOW_CASES")
LOW_SEEDS = range(int(_LOW)) if _LOW else (1, 4)
# seeds 0 .. CASES - 1, and 16: the first whose case merges neighbours' parts in design 3's
# ticket tile (the BraTS shifts on rows of 4 windows: 2 x 8 x 8 x 16 x 32)
SEEDS = sorted(set(range(CASES)) | {16})

pytestmark = pytest.mark.skipif(not interpreting(), reason="the counter needs TRITON_INTERPRET=1")


def _production_case(rng: random.Random) -> dict:
    """E = P = 8 (the tiles' shapes) with 1-3 windows an axis (4 along axis 2: rows of whole
    tickets, where design 3 merges neighbours' parts) and the shift sets models use."""
    nwin = [rng.choice([1, 2, 3]), rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4])]
    if nwin[0] * nwin[1] * nwin[2] > 12:
        nwin[0] = 1
    shifts = rng.choice([[None, 4], [None, 2, 4, 6], [None], [None, 3], [None, 2, 6]])
    return dict(shape=(rng.choice([1, 2]), 8 * rng.choice([1, 2]), *(8 * n for n in nwin)),
                head_dim=8, patch=8, shifts=None if shifts == [None] else shifts)  # fmt: skip


def _odd_case(rng: random.Random) -> dict:
    """2D or 3D, anisotropic or non-power-of-two patches, small heads, shifts past P."""
    nd = rng.choice([2, 3, 3])
    patch = tuple(rng.choice([2, 3, 4, 6, 8]) for _ in range(nd))
    nwin = [rng.choice([1, 2, 3, 5]) for _ in range(nd)]
    while torch.Size([p * n for p, n in zip(patch, nwin, strict=True)]).numel() > 8192:
        nwin[nwin.index(max(nwin))] -= 1
    e = rng.choice([2, 4, 8, 16])
    shifts = None
    if rng.random() < 0.7:
        shifts = [None] + [rng.randrange(1, 2 * max(patch)) if rng.random() < 0.5
                           else tuple(rng.randrange(0, 2 * p) for p in patch)
                           for _ in range(rng.choice([1, 2, 3]))]  # fmt: skip
    return dict(shape=(rng.choice([1, 2]), e * rng.choice([1, 2]),
                       *(p * n for p, n in zip(patch, nwin, strict=True))),
                head_dim=e, patch=patch, shifts=shifts)  # fmt: skip


def random_case(seed: int) -> dict:
    """A case: the inputs' geometry, the solver, and the design with its knobs."""
    rng = random.Random(seed)
    case = _production_case(rng) if rng.random() < 0.6 else _odd_case(rng)
    tiles = TILES2 + ("tile", "bwd_tile", "bwd_parts_tile")
    return dict(case, solver=rng.choice(["hals", "hals", "mu"]), iters=rng.choice([1, 3, 5]),
                design=rng.choice([2, 3]), tiles=[t for t in tiles if rng.random() < 0.5],
                wpp=rng.choice([None, 1, 2, 3, 4, 8, 16]))  # fmt: skip


def _tuning(case: dict) -> list[tuple[dict, str, object]]:
    """(TUNING dict, key, value) settings of a case."""
    out = [(wn.TUNING, "design", case["design"])]
    if case["design"] == 2:
        out += [(common2.TUNING, t, True) for t in case["tiles"] if t in TILES2]
        out += [(common2.TUNING, "wpp", case["wpp"])] if case["wpp"] else []
    else:
        out += [(sched3.TUNING, t, True) for t in case["tiles"] if t in sched3.TUNING]
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_random_window_case_matches_the_oracle_at_gpu_geometry(gen, monkeypatch, seed):
    case = random_case(seed)
    x, v0, dy = nmf_inputs(gen, case["shape"], case["patch"], zero_windows=seed % 3 == 0)
    kw = dict(head_dim=case["head_dim"], patch_size=case["patch"], shifts=case["shifts"],
              solver=case["solver"], iters=case["iters"])  # fmt: skip
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    for table, key, value in _tuning(case):
        monkeypatch.setitem(table, key, value)
    with counting() as count:
        y, dx = run_grad("triton", x, v0, dy, torch.float32, "cpu", **kw)
    assert any(launch.kind == "triton" for launch in count.launches), case  # counted, checked
    assert rel_err(y, y_ref) <= 1e-5, case
    assert rel_err(dx, dx_ref) <= 1e-4, case


@pytest.mark.parametrize("seed", LOW_SEEDS)
def test_random_window_case_in_low_precision(gen, monkeypatch, seed):
    """The same random cases with bf16 / fp16 in and out (fp32 accumulation; the tiles' bf16
    layouts among them), bounds-checked, within 2x the oracle's own error at that dtype plus an
    atol of 1e-3 (check_low_precision's bound)."""
    case = random_case(seed)
    dtype = (torch.bfloat16, torch.float16)[seed % 2]
    x, v0, dy = nmf_inputs(gen, case["shape"], case["patch"], zero_windows=seed % 3 == 0)
    kw = dict(head_dim=case["head_dim"], patch_size=case["patch"], shifts=case["shifts"],
              solver=case["solver"], iters=case["iters"])  # fmt: skip
    y64, dx64 = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    y_low, dx_low = run_grad("reference", x, v0, dy, dtype, "cpu", **kw)
    for table, key, value in _tuning(case):
        monkeypatch.setitem(table, key, value)
    with counting() as count:
        y, dx = run_grad("triton", x, v0, dy, dtype, "cpu", **kw)
    assert any(launch.kind == "triton" for launch in count.launches), case
    assert y.dtype == dtype and dx.dtype == dtype
    assert rel_err(y, y64) <= 2 * rel_err(y_low, y64) + 1e-3, case
    assert rel_err(dx, dx64) <= 2 * rel_err(dx_low, dx64) + 1e-3, case


@pytest.mark.skipif(not interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")
@pytest.mark.parametrize("preset", ["brats", "isles"])
def test_each_presets_layer_config_matches_the_oracle_at_gpu_geometry(gen, preset):
    """The swin layer of each model preset (models/registry.py: brats E = P = 8 with shifts
    [None, 2, 4, 6], isles E = P = 4 with [None, 1, 2, 3], sub-boxes of one voxel), with the
    design the code picks for it (kernels.design_for: the third for both), launched as a GPU
    would launch it and bounds-checked, against the float64 oracle, forward and backward."""
    arch = importlib.import_module("fastnmf.models.registry").ARCH_PRESETS[preset]
    e, p, shifts = arch["head_dim"], arch["window"], arch["shifts"]
    shape = (1, 2 * e, 2 * p, 3 * p, 2 * p)  # two heads; 12 windows, 3 along the middle axis
    x, v0, dy = nmf_inputs(gen, shape, p)
    kw = dict(head_dim=e, patch_size=p, shifts=shifts)
    design = importlib.import_module("fastnmf.kernels").design_for(x, e, (p,) * 3, shifts)
    assert design == 3, design
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    with counting() as count:
        y, dx = run_grad("triton", x, v0, dy, torch.float32, "cpu", **kw)
    assert {launch.kernel for launch in count.launches} >= {"_fused_kernel", "_fused_bwd_kernel"}
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(dx, dx_ref) <= 1e-4
