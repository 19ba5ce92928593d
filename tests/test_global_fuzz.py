"""Random rank-one global cases (the whole volume one matrix a head: random 2D / 3D sizes, head
dims, shift lists, solvers and the global kernels' knobs) run as a GPU would launch them and
bounds-checked (the byte counter: ``fastnmf.profile.static.counter``), against the float64 oracle.

The global path's reduction takes its chunks in steps, in groups of chunks a program, pipelined,
and its backward output pass holds all rows of a few columns a thread (kernels/global_nmf.py,
kernels/_global_apply.py); the kernel tests run those at a few chosen shapes. Here the counter
sets the GPU's geometry and stops at any lane outside its tensor, over sizes that leave ragged
last chunks, steps and groups. A few seeded cases run in CI; a longer sweep:
``FASTNMF_GLOBAL_FUZZ_CASES=500 pytest tests/test_global_fuzz.py -q`` (6 minutes on one CPU core;
all 500 passed on 2026-12-06 at commit e982926; the first 200 under Triton 3.6 too).
"""

import importlib
import math
import os
import random

import pytest
import torch
from conftest import rel_err
from kernel_helpers import nmf_inputs, run_grad

from fastnmf.profile.static.counter import counting, interpreting

gn = importlib.import_module("fastnmf.kernels.global_nmf")

CASES = int(os.environ.get("FASTNMF_GLOBAL_FUZZ_CASES", "16"))
# float32 as models run it; float64, where only the indexing can differ from the oracle
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-11, 1e-10)}

pytestmark = pytest.mark.skipif(not interpreting(), reason="the counter needs TRITON_INTERPRET=1")


def _sizes(rng: random.Random, nd: int) -> tuple[int, ...]:
    """Odd and even sizes, at most 3,000 voxels (the interpreter's pace)."""
    sizes = [rng.randint(2, 40 if nd == 2 else 18) for _ in range(nd)]
    while math.prod(sizes) > 3000:
        sizes[sizes.index(max(sizes))] //= 2
    return tuple(sizes)


def _shifts(rng: random.Random, sizes: tuple[int, ...]):
    """None (no roll), or [None] and 1-3 rolls: one int for every axis, or one an axis; rolls past
    an axis's size wrap."""
    if rng.random() < 0.4:
        return None
    return [None] + [rng.randrange(1, 2 * max(sizes)) if rng.random() < 0.5
                     else tuple(rng.randrange(0, 2 * s) for s in sizes)
                     for _ in range(rng.choice([1, 2, 3]))]  # fmt: skip


def random_case(seed: int) -> dict:
    """A case: the inputs' geometry, solver, dtype, and the global kernels' knobs."""
    rng = random.Random(seed)
    sizes = _sizes(rng, rng.choice([2, 3, 3]))
    e = rng.choice([2, 3, 4, 6, 8, 8, 12, 16])
    knobs = {
        "sub": rng.choice([None, None, 16]),  # divides every GPU chunk (16 .. 256 columns)
        "pair": rng.choice([True, False]),
        "apply_vec": rng.choice([1, 2, 4, 4, 8]),
        "apply_rows": rng.choice([True, True, False]),
    }
    # the reduction's programs: a chunk each (the GPU's rule at these sizes), or several
    grouping = rng.choice([None, (1, 2), (2, 3), (1, 8)])  # (_MIN_PROGRAMS, _GROUP_CHUNKS)
    return dict(shape=(rng.choice([1, 2]), e * rng.choice([1, 2]), *sizes), head_dim=e,
                shifts=_shifts(rng, sizes), solver=rng.choice(["hals", "hals", "mu"]),
                iters=rng.choice([1, 3, 5]), dtype=rng.choice([torch.float32, torch.float64]),
                knobs=knobs, grouping=grouping, zero_g0=rng.random() < 0.3)  # fmt: skip


@pytest.mark.parametrize("seed", range(CASES))
def test_random_global_case_matches_the_oracle_at_gpu_geometry(gen, monkeypatch, seed):
    case = random_case(seed)
    x, v0, dy = nmf_inputs(gen, case["shape"], None, zero_windows=seed % 3 == 0,
                           zero_g0=case["zero_g0"])  # fmt: skip
    kw = dict(head_dim=case["head_dim"], patch_size=None, shifts=case["shifts"],
              solver=case["solver"], iters=case["iters"])  # fmt: skip
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    for key, value in case["knobs"].items():
        monkeypatch.setitem(gn.TUNING, key, value)
    if case["grouping"]:
        monkeypatch.setattr(gn, "_MIN_PROGRAMS", case["grouping"][0])
        monkeypatch.setattr(gn, "_GROUP_CHUNKS", case["grouping"][1])
    with counting() as count:
        y, dx = run_grad("triton", x, v0, dy, case["dtype"], "cpu", **kw)
    kernels = {launch.kernel for launch in count.launches if launch.kind == "triton"}
    assert {"_reduce_kernel", "_iterate_kernel", "_iterate_bwd_kernel"} <= kernels, case
    tol_y, tol_dx = TOLERANCES[case["dtype"]]
    assert rel_err(y, y_ref) <= tol_y, case
    assert rel_err(dx, dx_ref) <= tol_dx, case


def test_the_cases_reach_every_branch():
    """The first 40 seeds (those a longer sweep starts with) take each knob both ways, 2D and 3D,
    rows in a thread and across threads, grouped and single-chunk reductions."""
    cases = [random_case(seed) for seed in range(40)]
    assert {len(c["shape"]) for c in cases} == {4, 5}
    assert {c["knobs"]["pair"] for c in cases} == {True, False}
    assert {c["knobs"]["apply_rows"] and c["head_dim"] <= 8 for c in cases} == {True, False}
    assert {c["grouping"] is None for c in cases} == {True, False}
    assert {c["shifts"] is None for c in cases} == {True, False}
    assert {c["dtype"] for c in cases} == set(TOLERANCES)
