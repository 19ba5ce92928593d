"""Time the global path: its reduction in steps (two a trip, one a trip) or a chunk in one step,
and its backward's output pass in three forms.

    python3 bench/time_global.py --out global_steps.json          # 2 x 32 x 128^3, fp32 + bf16
    python3 bench/time_global.py --shape 1 8 16 16 16 --repeats 2  # any device (CPU: interpreter)

The global path (``matricized_nmf(..., window=None, kernel="triton")``, kernels/global_nmf.py)
reduces each chunk of 256 columns to partial Gram matrices. Since 2026-12-06 it takes the chunk
2048 / E^2 columns a step (E = 8: 32), two steps a trip of a loop over a few chunks a program,
pipelined through shared memory (``TUNING["pair"]``: fp32 x copied 16 bytes at a time, not 8),
which the static suite predicts to be faster (sm_90a: 102 -> 48 registers, 16 -> 40 resident
warps, about a third of the instructions a chunk). The variants: the default; one step a trip
(``pair`` off); ``TUNING["sub"] = BLOCK_V``, a chunk a trip in one step. Two more time the
backward's output pass (kernels/_global_apply.py), which since 2026-12-06 holds all the rows of 4
adjacent columns in a thread (sm_90a, E = 8: no CTA barrier, 24-28 resident warps, about 0.6x
the instructions a column): against it the pass with the rows across threads (``apply_rows``
off, the kernel before: 16 warps, 21 barriers a chunk) and 2 columns a thread (``apply_vec`` 2:
fp32 loads 8 bytes, 32-40 warps). Each row: the median of
``--repeats`` timed calls of the forward (no grad) and the forward + backward, % of copy bandwidth
for the ideal bytes (forward: read x, write y; forward + backward: also read x and dy, write dx),
the largest difference to the first variant's output and gradient (relative to the largest value),
and whether a repeat was bitwise equal. Timed, so nothing here gates CI.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys

import torch

import fastnmf
from fastnmf.profile.timing import DTYPES, copy_bw, environment, median_ms, pick_device

# (name, the global_nmf.TUNING settings): {} the code's defaults; sub 0 the chunk in one step;
# the last two change only the backward's output pass (kernels/_global_apply.py)
VARIANTS = (
    ("steps, two a trip (default)", {}),
    ("steps, one a trip", {"pair": False}),
    ("a chunk in one step", {"sub": 0, "pair": False}),
    ("backward pass, rows across threads", {"apply_rows": False}),
    ("backward pass, 2 columns a thread", {"apply_vec": 2}),
)


@contextlib.contextmanager
def _tuning(settings: dict):
    """``global_nmf.TUNING`` with the variant's settings (sub 0: the chunk's BLOCK_V columns)."""
    gn = importlib.import_module("fastnmf.kernels.global_nmf")
    saved = dict(gn.TUNING)
    gn.TUNING.update(settings)
    if settings.get("sub") == 0:
        gn.TUNING["sub"] = 256  # BLOCK_V at E = 8 (a larger chunk's: capped to it)
    try:
        yield
    finally:
        gn.TUNING.clear()
        gn.TUNING.update(saved)


def _inputs(shape, dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    v0 = torch.rand(int(torch.tensor(shape[2:]).prod()), 1, generator=gen).to(device, dtype)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    return x, v0, dy


def _run(x, v0, dy, head_dim: int, iters: int, device, repeats: int) -> dict:
    kw = dict(head_dim=head_dim, window=None, iters=iters, kernel="triton", check=False)
    xg = x.detach().requires_grad_()

    def fwd():
        with torch.no_grad():
            return fastnmf.matricized_nmf(x, v0, **kw)

    def fwdbwd():
        (dx,) = torch.autograd.grad(fastnmf.matricized_nmf(xg, v0, **kw), xg, dy)
        return dx

    y, dx = fwd(), fwdbwd()  # the first calls compile
    repeat = bool(torch.equal(fwd(), y) and torch.equal(fwdbwd(), dx))
    return dict(fwd_ms=median_ms(fwd, device, repeats, 1),
                fwdbwd_ms=median_ms(fwdbwd, device, repeats, 1), y=y, dx=dx,
                bitwise_repeat=repeat)  # fmt: skip


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[2, 32, 128, 128, 128])
    ap.add_argument("--head-dim", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--out", help="JSON file")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    device = pick_device(args.device)
    shape = tuple(args.shape)
    bw = copy_bw(device)
    rows = []
    for dname in args.dtypes:
        x, v0, dy = _inputs(shape, DTYPES[dname], device)
        nbytes = x.numel() * x.element_size()
        first = None
        for name, settings in VARIANTS:
            with _tuning(settings):
                r = _run(x, v0, dy, args.head_dim, args.iters, device, args.repeats)
            first = first or r
            row = dict(variant=name, dtype=dname, shape=list(shape), fwd_ms=r["fwd_ms"],
                       fwdbwd_ms=r["fwdbwd_ms"],
                       fwd_pct_copy_bw=100 * 2 * nbytes / (r["fwd_ms"] * 1e-3) / 1e9 / bw,
                       fwdbwd_pct_copy_bw=100 * 5 * nbytes / (r["fwdbwd_ms"] * 1e-3) / 1e9 / bw,
                       y_diff=_diff(r["y"], first["y"]), dx_diff=_diff(r["dx"], first["dx"]),
                       bitwise_repeat=r["bitwise_repeat"])  # fmt: skip
            rows.append(row)
            print(f"{dname} {name:34} fwd {row['fwd_ms']:8.3f} ms ({row['fwd_pct_copy_bw']:5.1f} %)"
                  f"  fwd+bwd {row['fwdbwd_ms']:8.3f} ms ({row['fwdbwd_pct_copy_bw']:5.1f} %)  "
                  f"diff {row['y_diff']:.1e} / {row['dx_diff']:.1e}  "
                  f"bitwise repeat {row['bitwise_repeat']}", flush=True)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, copy_bw_gbs=bw, env=environment(device)), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
