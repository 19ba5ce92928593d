"""Where the shifted-window kernels spend their time, and how launch parameters move it (GPU).

    python bench/tune_window.py --out runs/tune.json [--shifts 4 | --shifts 2 4 6] [--quick]

1. A per-kernel breakdown (torch.profiler, CUDA time) of forward + backward at the default
   launch parameters: the stats passes (Gram matrix and power steps per window and shift) against
   the apply passes (tiled: one window lookup per tile of voxels and shift).
2. Sweeps of ``kernels.window_nmf.TUNING``: CHUNK x warps of the stats kernels (Gram matrices
   by broadcast-and-sum, and by tl.dot); the largest
   program tile (voxels) x warps of the tiled apply kernels (BLOCK_V x warps of the per-voxel
   ones when the shifts leave no tiles); forward and forward + backward medians
   (triton.testing.do_bench). Every variant's error against a float64 computation is recorded;
   a variant counts only if it is within 2x the default's error (another summation order is
   another rounding, not another function).

Shape: B x C x S^3 (default the BraTS stage-1 layer 2 x 32 x 128^3), E = 8, P = 8, shifts
[None, *SHIFTS] (default [None, 4]; the BraTS preset uses 2 4 6), R = 1, T = 5, fp32.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--shifts", type=int, nargs="+", default=[4], help="shifts besides None")
    p.add_argument("--quick", action="store_true", help="fewer variants")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the script on a CPU (TRITON_INTERPRET=1): tiny shape, two variants per "
        "sweep, nothing timed",
    )
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--dry-run runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        a.size, a.channels, a.batch = 16, 8, 1
        dev = torch.device("cpu")

        def bench(fn):
            fn()
            return float("nan")
    elif not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the launch parameters mean nothing to the interpreter)")
    else:
        import triton.testing

        dev = torch.device("cuda")

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    wn = importlib.import_module("fastnmf.kernels.window_nmf")  # the module, not the function

    import fastnmf
    from fastnmf.profile import environment
    from fastnmf.profile.timing import kernel_ms

    gen = torch.Generator().manual_seed(0)
    s = a.size
    x = torch.randn(a.batch, a.channels, s, s, s, generator=gen).to(dev).requires_grad_()
    v0 = torch.rand(512, 1, generator=gen).to(dev)
    dy = torch.randn(x.shape, generator=gen).to(dev)
    kw = dict(head_dim=8, window=8, shifts=[None, *a.shifts], iters=5, check=False)
    default = dict(wn.TUNING)
    geo = wn._Geometry(x, 8, (8, 8, 8), [None, *((sh,) * 3 for sh in a.shifts)])
    print(f"shape {tuple(x.shape)}, shifts {kw['shifts']}: tile {geo.tile}, program tile {geo.h}, "
          f"tiled apply: {geo.tiled}")  # fmt: skip

    # float64 result to measure every variant's error against
    x64 = x.detach().double().requires_grad_()
    y64 = fastnmf.matricized_nmf(x64, v0.double(), kernel="torch", **kw)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    y64, dx64 = y64.detach(), dx64.detach()
    del x64
    kw["kernel"] = "triton"

    def errors(y, dx):
        ey = ((y.double() - y64).abs().max() / y64.abs().max()).item()
        edx = ((dx.double() - dx64).abs().max() / dx64.abs().max()).item()
        return ey, edx

    def fwd():
        with torch.no_grad():
            return fastnmf.matricized_nmf(x, v0, **kw)

    def fwdbwd():
        y = fastnmf.matricized_nmf(x, v0, **kw)
        return torch.autograd.grad(y, x, dy)[0]

    ref_err = errors(fwd(), fwdbwd())
    print(f"default vs float64: y {ref_err[0]:.2e}, dx {ref_err[1]:.2e}")

    # 1. per-kernel breakdown at the defaults
    breakdown = {k: v["ms"] for k, v in kernel_ms(fwdbwd, dev, calls=10).items()}
    if breakdown:  # ms per fwd+bwd
        print("per-kernel CUDA ms per forward+backward (defaults):")
        for k, v in list(breakdown.items())[:12]:
            print(f"  {v:9.3f}  {k[:90]}")

    # 2. sweeps
    rows = []

    def measure(tuning):
        wn.TUNING.update(default)
        wn.TUNING.update(tuning)
        try:
            ey, edx = errors(fwd(), fwdbwd())
            ok = ey <= max(2 * ref_err[0], 1e-6) and edx <= max(2 * ref_err[1], 1e-6)
            f_ms, fb_ms = bench(fwd), bench(fwdbwd)
            row = dict(tuning, fwd_ms=round(f_ms, 4), fwdbwd_ms=round(fb_ms, 4))
            row.update(err_y=float(f"{ey:.3g}"), err_dx=float(f"{edx:.3g}"), matches=ok)
        except Exception as e:  # a variant the compiler refuses (registers, shared memory)
            row = dict(tuning, error=f"{type(e).__name__}: {str(e)[:200]}")
        rows.append(row)
        print(row, flush=True)

    def variants(*lists):
        combos = list(itertools.product(*lists))
        return combos[:2] if a.dry_run else combos

    measure({})
    chunks, warps = ([64, 128, 256], [1, 2, 4]) if a.quick else ([32, 64, 128, 256], [1, 2, 4, 8])
    for chunk, w in variants(chunks, warps):
        measure(dict(chunk=chunk, stats_warps=w))
    for chunk, w in variants([64, 128], [1, 2, 4]):  # Gram matrices by tl.dot (IEEE fp32)
        measure(dict(gram="dot", chunk=chunk, stats_warps=w))
    if geo.tiled:
        caps = (8, 16, 32, 64, 128, 256, 512)
        tiles = sorted({math.prod(wn._program_tile(geo.tile, t)) for t in caps})
        for t, w in variants(tiles, [1, 2, 4] if a.quick else [1, 2, 4, 8]):
            measure(dict(tile=t, apply_warps=w))
    else:
        for bv, w in variants([64, 128, 256], [2, 4, 8]):
            measure(dict(block_v=bv, apply_warps=w))
    wn.TUNING.update(default)

    report = dict(environment=environment(dev), shape=list(x.shape), shifts=kw["shifts"],
                  defaults=default, program_tile=list(geo.h), error_default=list(ref_err),
                  breakdown_ms=breakdown, sweeps=rows)  # fmt: skip
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    ok = [r for r in rows if r.get("matches") and r["fwd_ms"] == r["fwd_ms"]]  # not NaN
    print("default:", rows[0])
    if ok:
        print("fastest forward:", min(ok, key=lambda r: r["fwd_ms"]))
        print("fastest forward+backward:", min(ok, key=lambda r: r["fwdbwd_ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
