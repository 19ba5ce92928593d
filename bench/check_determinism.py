"""Run the NMF layer N times on the same input and check that every output and gradient is bitwise
equal to the first run's (issue 8: "10 runs bitwise equal, forward and backward").

    python bench/check_determinism.py --out runs/determinism.json          # GPU: triton, 2x32x128^3
    python bench/check_determinism.py --kernel torch --size 16 --runs 3    # CPU smoke

Cases: swin (8^3 windows, shifts [None, 4]), local (8^3 windows) and global; fp32 and bf16 (fp16
too with --dtypes). For each case the JSON records whether the forward outputs and the input
gradients of all runs are bitwise equal, and, if not, the largest difference seen. The exit status
is 1 if any case is not bitwise reproducible, so a GPU session can gate on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import fastnmf
from fastnmf.profile import environment

MODES = {
    "swin": dict(window=8, shifts=[None, 4]),
    "local": dict(window=8),
    "global": dict(window=None),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_case(kernel, device, shape, dtype, mode, runs, seed=0):
    """One case: ``runs`` forward+backward passes; bitwise equality of y and dx against run 0."""
    gen = torch.Generator().manual_seed(seed)
    b, c, s = shape
    x = torch.randn(b, c, s, s, s, generator=gen).to(device, dtype)
    n = 8**3 if MODES[mode]["window"] else s**3
    v0 = torch.rand(n, 1, generator=gen).to(device, dtype)
    dy = torch.randn(x.shape, generator=gen).to(device, dtype)
    first = None
    fwd_equal = bwd_equal = True
    max_fwd = max_bwd = 0.0
    for _ in range(runs):
        xi = x.clone().requires_grad_()
        y = fastnmf.matricized_nmf(xi, v0, head_dim=8, iters=5, kernel=kernel, check=False,
                                   **MODES[mode])  # fmt: skip
        (dx,) = torch.autograd.grad(y, xi, dy)
        y, dx = y.detach(), dx.detach()
        if first is None:
            first = (y, dx)
            continue
        if not torch.equal(y, first[0]):
            fwd_equal = False
            max_fwd = max(max_fwd, (y.float() - first[0].float()).abs().max().item())
        if not torch.equal(dx, first[1]):
            bwd_equal = False
            max_bwd = max(max_bwd, (dx.float() - first[1].float()).abs().max().item())
    return dict(
        mode=mode, dtype=str(dtype).removeprefix("torch."), shape=[b, c, s, s, s], runs=runs,
        forward_bitwise_equal=fwd_equal, backward_bitwise_equal=bwd_equal,
        max_abs_diff_forward=max_fwd, max_abs_diff_backward=max_bwd,
    )  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", default="triton", choices=["triton", "torch", "reference"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--size", type=int, default=128, help="cubic edge (a multiple of 8)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--out", type=Path, help="JSON file to write (default: print only)")
    a = p.parse_args(argv)
    if a.runs < 2:
        p.error(f"--runs must be at least 2, got {a.runs}")
    if a.size % 8:
        p.error(f"--size must be a multiple of the 8^3 window, got {a.size}")
    if a.kernel == "triton" and a.device == "cpu":  # the kernels are loaded on first use
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device(a.device)
    results = []
    for mode in a.modes:
        for name in a.dtypes:
            r = check_case(a.kernel, device, (a.batch, a.channels, a.size), DTYPES[name], mode,
                           a.runs)  # fmt: skip
            ok = r["forward_bitwise_equal"] and r["backward_bitwise_equal"]
            print(f"{mode:6s} {name:4s} {'bitwise equal' if ok else 'DIFFERS'} over {a.runs} runs"
                  + ("" if ok else f" (max |dy| {r['max_abs_diff_forward']:.3g}, "
                                   f"max |dx| {r['max_abs_diff_backward']:.3g})"),
                  flush=True)  # fmt: skip
            results.append(r)
    env = environment(device)
    report = dict(kernel=a.kernel, environment=env, cases=results)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    ok = all(r["forward_bitwise_equal"] and r["backward_bitwise_equal"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
