"""Where the shifted-window kernels spend their time, and how launch parameters move it (GPU).

    python bench/tune_window.py --out runs/tune.json

1. A per-kernel breakdown (torch.profiler, CUDA time) of forward + backward at the default
   launch parameters: the stats passes (Gram matrix and power steps per window and shift) against
   the apply passes (one per voxel block, all shifts).
2. Sweeps of ``kernels.window_nmf.TUNING``: CHUNK x warps of the stats kernels, BLOCK_V x warps of
   the apply kernels (the other kernel at its default), forward and backward medians
   (triton.testing.do_bench), each checked against the default's output first.

Shape: B x C x S^3 (default the BraTS stage-1 layer 2 x 32 x 128^3), E = 8, P = 8, shifts
[None, 4], R = 1, T = 5, fp32.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the launch parameters mean nothing to the interpreter)")
    import triton.testing

    wn = importlib.import_module("fastnmf.kernels.window_nmf")  # the module, not the function

    import fastnmf
    from fastnmf.profile import environment

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    s = a.size
    x = torch.randn(a.batch, a.channels, s, s, s, generator=gen).to(dev).requires_grad_()
    v0 = torch.rand(512, 1, generator=gen).to(dev)
    dy = torch.randn(x.shape, generator=gen).to(dev)
    kw = dict(head_dim=8, patch_size=8, shifts=[None, 4], iters=5, kernel="triton", check=False)
    default = dict(wn.TUNING)

    def fwd():
        with torch.no_grad():
            return fastnmf.matricized_nmf(x, v0, **kw)

    def fwdbwd():
        y = fastnmf.matricized_nmf(x, v0, **kw)
        return torch.autograd.grad(y, x, dy)[0]

    y_ref, dx_ref = fwd().clone(), fwdbwd().clone()

    # 1. per-kernel breakdown at the defaults
    for _ in range(3):
        fwdbwd()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fwdbwd()
        torch.cuda.synchronize()
    breakdown = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            breakdown[ev.key] = round(t / 10 / 1e3, 4)  # ms per fwd+bwd
    print("per-kernel CUDA ms per forward+backward (defaults):")
    for k, v in sorted(breakdown.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {v:9.3f}  {k[:90]}")

    # 2. sweeps
    rows = []

    def measure(tuning):
        wn.TUNING.update(default)
        wn.TUNING.update(tuning)
        try:
            y, dx = fwd(), fwdbwd()
            # another CHUNK sums in another order: same function within fp32 rounding
            ok = (y - y_ref).abs().max().item() <= 1e-5 * y_ref.abs().max().item() and (
                dx - dx_ref).abs().max().item() <= 1e-4 * dx_ref.abs().max().item()  # fmt: skip
            f_ms = triton.testing.do_bench(fwd, warmup=25, rep=100, return_mode="median")
            fb_ms = triton.testing.do_bench(fwdbwd, warmup=25, rep=100, return_mode="median")
            row = dict(tuning, fwd_ms=round(f_ms, 4), fwdbwd_ms=round(fb_ms, 4), matches=ok)
        except Exception as e:  # a variant the compiler refuses (registers, shared memory)
            row = dict(tuning, error=f"{type(e).__name__}: {str(e)[:200]}")
        rows.append(row)
        print(row, flush=True)

    measure({})
    for chunk, w in itertools.product([16, 32, 64, 128, 256], [1, 2, 4, 8]):
        measure(dict(chunk=chunk, stats_warps=w))
    for bv, w in itertools.product([64, 128, 256, 512, 1024], [1, 2, 4, 8]):
        measure(dict(block_v=bv, apply_warps=w))
    wn.TUNING.update(default)

    report = dict(environment=environment(dev), shape=list(x.shape), defaults=default,
                  breakdown_ms=breakdown, sweeps=rows)  # fmt: skip
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    ok = [r for r in rows if r.get("matches")]
    best_f = min(ok, key=lambda r: r["fwd_ms"])
    best_fb = min(ok, key=lambda r: r["fwdbwd_ms"])
    print("default:", rows[0])
    print("fastest forward:", best_f)
    print("fastest forward+backward:", best_fb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
