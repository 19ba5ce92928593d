"""Where design 3's forward goes wrong: each case against the reference kernel, run three times.

    python3 bench/check_design3.py                 # on a GPU (the cases below)
    python3 bench/check_design3.py --small         # anywhere (interpreter: tiny shapes)

The first GPU timing (bench/results/h200_2026-12-04/README.md) found design 3's forward with
the per-window parts pass (no ticket tile) wrong with the BraTS shifts [None, 2, 4, 6] at
2x32x128^3 (output error ~1 relative to the largest value, NaN gradients, results that change
from run to run), while the interpreter and the small CUDA tests agree with the oracle (the
cause: kernels/window_nmf3.py, ``_member_matrix``). Each case here is the
forward (E = P = 8, T = 5) of one shape, shift set and design 3 setting, with the persistent grid
as on the device or as one program (no two programs run at once: a race between programs cannot
happen), run three times: its error against kernel "reference" (fp32, same device), whether the
three runs are bitwise equal, and where the wrong voxels are (by window plane along axis 0, by
head, by window position along axes 1 and 2). One JSON line a case, flushed: a run stopped at a
time limit keeps what it printed. Also the gradient (one forward + backward) against the
reference's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/
from time_designs import _layer, _tiles  # noqa: E402  (its layer call: E = P = 8, T = 5)

sched = importlib.import_module("fastnmf.kernels._window3_sched")
wn = importlib.import_module("fastnmf.kernels.window_nmf")

BRATS = [None, 2, 4, 6]
UNTILED = _tiles()  # design 3's four tiles off
# (name, shape, shifts, design 3 TUNING, one program)
GPU_CASES = [
    ("128^3 b2 untiled", (2, 32, 128, 128, 128), BRATS, UNTILED, False),
    ("128^3 b2 untiled, one program", (2, 32, 128, 128, 128), BRATS, UNTILED, True),
    ("128^3 b2 design 3 defaults (tiles)", (2, 32, 128, 128, 128), BRATS, {}, False),
    # batch*heads side by side (4 at 64^3, each its own ring of part statistics) in the skewed
    # order: the orders the waits model favours (off by default; not yet run on a GPU)
    ("64^3 b2 C64 heads side by side, skewed", (2, 64, 64, 64, 64), BRATS,
     {"group": "auto", "skew": True}, False),
    # every thread reads the wait counts with its own acquire load (not yet run on a GPU)
    ("128^3 b2 tiles, thread waits", (2, 32, 128, 128, 128), BRATS, {"thread_waits": True},
     False),
    ("128^3 b2 [None, 4] untiled", (2, 32, 128, 128, 128), [None, 4], UNTILED, False),
    ("128x16x16 one head untiled, one program", (1, 8, 128, 16, 16), BRATS, UNTILED, True),
    ("128^3 b2 [None, 4] tiles, thread waits", (2, 32, 128, 128, 128), [None, 4],
     {"thread_waits": True}, False),
]
SMALL_CASES = [
    ("24x16x16 untiled", (1, 16, 24, 16, 16), BRATS, UNTILED, False),
    ("24x16x16 untiled, one program", (1, 16, 24, 16, 16), BRATS, UNTILED, True),
    ("40x16x16 two heads side by side, skewed", (1, 16, 40, 16, 16), BRATS,
     {"group": 2, "skew": True}, False),
]


@contextlib.contextmanager
def _setting(tuning: dict, one_program: bool):
    saved, saved_programs, saved_design = dict(sched.TUNING), sched._programs, wn.TUNING["design"]
    wn.TUNING["design"] = 3
    sched.TUNING.update(tuning)
    if one_program:
        sched._programs = lambda device, tickets: 1
    try:
        yield
    finally:
        sched.TUNING.clear()
        sched.TUNING.update(saved)
        sched._programs = saved_programs
        wn.TUNING["design"] = saved_design


def _forward(x, v0, shifts, kernel):
    with torch.no_grad():
        return _layer(x, v0, shifts, kernel)


def _grad(x, v0, dy, shifts, kernel):
    xg = x.detach().requires_grad_()
    return torch.autograd.grad(_layer(xg, v0, shifts, kernel), xg, dy)[0]


def _rel(a, b) -> float:
    return float(((a - b).abs().max() / b.abs().max()).nan_to_num(float("inf")))


def _where(bad: torch.Tensor, shape) -> dict:
    """Counts of wrong voxels by window plane along axis 0, head, and window (axis 1, axis 2)."""
    idx = bad.nonzero()
    if idx.numel() == 0:
        return {}
    planes = torch.bincount(idx[:, 2] // 8, minlength=shape[2] // 8).tolist()
    heads = torch.bincount(idx[:, 1] // 8, minlength=shape[1] // 8).tolist()
    w12 = idx[:, 3] // 8 * (shape[4] // 8) + idx[:, 4] // 8
    grid = torch.bincount(w12, minlength=(shape[3] // 8) * (shape[4] // 8))
    return dict(by_plane=planes, by_head=heads, windows_12_with_errors=int((grid > 0).sum()),
                of_windows_12=grid.numel(), batches=torch.bincount(idx[:, 0]).tolist())


def run_case(name, shape, shifts, tuning, one_program, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).to(device)
    v0 = torch.rand(512, 1, generator=gen).to(device)
    dy = torch.randn(*shape, generator=gen).to(device)
    ref, dx_ref = _forward(x, v0, shifts, "reference"), _grad(x, v0, dy, shifts, "reference")
    t0 = time.perf_counter()
    with _setting(tuning, one_program):
        ys = [_forward(x, v0, shifts, "triton") for _ in range(3)]
        dx = _grad(x, v0, dy, shifts, "triton")
    if device.type == "cuda":
        torch.cuda.synchronize()
    scale = ref.abs().max()
    errs = [_rel(y, ref) for y in ys]
    bad = (ys[0] - ref).abs() > 1e-4 * scale
    bad |= ys[0].isnan()
    return dict(case=name, shape=list(shape), shifts=str(shifts), tuning=tuning,
                one_program=one_program, seconds=round(time.perf_counter() - t0, 2),
                rel_err=errs, dx_rel_err=_rel(dx, dx_ref),
                bitwise_repeat=all(torch.equal(ys[0], y) for y in ys[1:]),
                nan=int(ys[0].isnan().sum()), wrong_voxels=int(bad.sum()),
                where=_where(bad, shape))  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="the tiny cases (interpreter)")
    ap.add_argument("--only", type=int, nargs="+", help="case indices")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = SMALL_CASES if args.small else GPU_CASES
    failed = False
    for i, case in enumerate(cases):
        if args.only and i not in args.only:
            continue
        try:
            row = run_case(*case, device)
            failed |= (row["wrong_voxels"] > 0 or not row["bitwise_repeat"]
                       or not row["dx_rel_err"] <= 1e-4)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - recorded, the other cases go on
            row = dict(case=case[0], error=f"{type(e).__name__}: {e}")
            failed = True
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
