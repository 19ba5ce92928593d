"""The NMF layer with each kernel: time, bandwidth, memory (issue 3; figures recorded by issue 8).

    pytest bench/bench_nmf.py --benchmark-only

On a GPU: shapes 2x32x128^3 (the BraTS stage-1 layer), 2x64x64^3, 2x128x32^3, 2x256x16^3,
2x512x8^3, fp32 and bf16, E=8, P=8, shifts [None, 4], R=1, T=5, plus the global path; kernels
triton, torch, reference and torch.compile(reference). On the CPU (no Triton timing: the
interpreter is not a benchmark) the same at small shapes. Each benchmark records in extra_info:
median ms (pytest-benchmark's own stats), GB/s with bytes = every input read once + every output
written once, % of the device's measured copy bandwidth, memory kept for backward and, on a GPU,
peak memory.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _util import copy_bandwidth_gbs, env_info, peak_bytes, saved_bytes, sync, timed_median_s

import fastnmf
from fastnmf import reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
GPU_SHAPES = [(2, 32, 128), (2, 64, 64), (2, 128, 32), (2, 256, 16), (2, 512, 8)]
CPU_SHAPES = [(1, 32, 32), (1, 64, 16), (1, 128, 8)]
SHAPES = GPU_SHAPES if CUDA else CPU_SHAPES
KERNELS = ["triton", "torch", "reference", "compiled-reference"] if CUDA else [
    "torch", "reference", "compiled-reference"
]  # fmt: skip
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
MODES = {"swin": dict(window=8, shifts=[None, 4]), "global": dict(window=None)}


@functools.cache
def _copy_bw() -> float:
    return copy_bandwidth_gbs(DEVICE)


@functools.cache
def _compiled():
    return torch.compile(reference.matricized_nmf)


def _layer(kernel, x, v0, mode, iters=5):
    kw = dict(head_dim=8, iters=iters, **MODES[mode])
    if kernel == "compiled-reference":
        return _compiled()(x, v0, kw["head_dim"], kw["window"], kw.get("shifts"), None, iters)
    return fastnmf.matricized_nmf(x, v0, kernel=kernel, check=False, **kw)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}^3")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("pass_", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: "k_" + k.replace("-", "_"))
def test_nmf_layer(benchmark, shape, dtype, mode, pass_, kernel):
    b, c, s = shape
    if mode == "global" and s > 64 and kernel in ("reference", "compiled-reference"):
        pytest.skip("the literal global loop at this size is too slow to be worth timing")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, s, s, s, generator=gen).to(DEVICE, dtype).requires_grad_(pass_ != "fwd")
    n = 8**3 if MODES[mode]["window"] else s**3
    v0 = torch.rand(n, 1, generator=gen).to(DEVICE, dtype)
    dy = torch.randn_like(x)
    nbytes = x.numel() * x.element_size()
    y_keep = None

    if pass_ == "fwd":

        def run():
            with torch.no_grad():
                _layer(kernel, x, v0, mode)
            sync(DEVICE)

        moved = 2 * nbytes  # read x, write y
    elif pass_ == "bwd":
        y_keep = _layer(kernel, x, v0, mode)

        def run():
            torch.autograd.grad(y_keep, x, dy, retain_graph=True)
            sync(DEVICE)

        moved = 3 * nbytes  # read x and dy, write dx
    else:

        def run():
            y = _layer(kernel, x, v0, mode)
            torch.autograd.grad(y, x, dy)
            sync(DEVICE)

        moved = 5 * nbytes

    benchmark.group = f"{mode} {b}x{c}x{s}^3 {str(dtype)[6:]} {pass_}"
    benchmark.pedantic(run, rounds=5 if CUDA else 2, warmup_rounds=1, iterations=1)
    median_s = timed_median_s(benchmark, run, DEVICE)
    gbs = moved / median_s / 1e9
    info = dict(
        **env_info(DEVICE),
        kernel=kernel,
        gb_per_s=round(gbs, 2),
        pct_copy_bandwidth=round(100 * gbs / _copy_bw(), 1),
        copy_bandwidth_gb_per_s=round(_copy_bw(), 1),
        input_bytes=nbytes,
    )
    if pass_ != "fwd":
        info["saved_for_backward_bytes"] = saved_bytes(lambda: _layer(kernel, x, v0, mode))
        info["saved_over_input"] = round(info["saved_for_backward_bytes"] / nbytes, 3)
    peak = peak_bytes(run, DEVICE)
    if peak is not None:
        info["peak_bytes"] = peak
    benchmark.extra_info.update(info)


ITERS_SHAPE = (2, 32, 128) if CUDA else (1, 32, 16)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("iters", [1, 5, 20], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("kernel", ["triton", "torch"] if CUDA else ["torch"])
def test_global_iters(benchmark, kernel, iters, pass_):
    """The global path's time against T (the closed form: independent of T), fp32."""
    b, c, s = ITERS_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, s, s, s, generator=gen).to(DEVICE).requires_grad_(pass_ != "fwd")
    v0 = torch.rand(s**3, 1, generator=gen).to(DEVICE)
    dy = torch.randn_like(x)

    def run():
        if pass_ == "fwd":
            with torch.no_grad():
                _layer(kernel, x, v0, "global", iters)
        else:
            torch.autograd.grad(_layer(kernel, x, v0, "global", iters), x, dy)
        sync(DEVICE)

    benchmark.group = f"global-iters {b}x{c}x{s}^3 float32 {pass_} {kernel}"
    benchmark.pedantic(run, rounds=5 if CUDA else 2, warmup_rounds=1, iterations=1)
    median_s = timed_median_s(benchmark, run, DEVICE)
    benchmark.extra_info.update(
        **env_info(DEVICE),
        kernel=kernel,
        iters=iters,
        median_ms=round(median_s * 1e3, 4),
    )
