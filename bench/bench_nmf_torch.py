"""kernel="reference" vs kernel="torch" for the NMF layer on the CPU.

    pytest bench/bench_nmf_torch.py --benchmark-only --benchmark-group-by=param:case

Cases: 1 x 32 x {32, 64}^3, shifted 8^3 windows (E = 8, shifts [None, 4]) and global, forward
and forward + backward, T in {1, 5, 20}. Target (issue 2): torch >= 3x reference at T = 5 for
forward + backward of the shifted-window layer, and flat in T.
"""

import pytest
import torch

import fastnmf

SIZES = [32, 64]
MODES = {"swin": dict(window=8, shifts=[None, 4]), "global": dict(window=None)}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("iters", [1, 5, 20])
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("kernel", ["reference", "torch"])
def test_nmf_layer_cpu(benchmark, size, mode, iters, pass_, kernel):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, size, size, size, generator=gen, requires_grad=pass_ != "fwd")
    kw = MODES[mode]
    n = 8**3 if kw["window"] else size**3
    v0 = torch.rand(n, 1, generator=gen)
    benchmark.group = f"{mode} {size}^3 {pass_}"
    benchmark.extra_info.update(case=f"{mode}-{size}-{pass_}", iters=iters, kernel=kernel)

    def run():
        if pass_ == "fwd":
            with torch.no_grad():
                return fastnmf.matricized_nmf(
                    x, v0, head_dim=8, iters=iters, kernel=kernel, check=False, **kw
                )
        x.grad = None
        y = fastnmf.matricized_nmf(x, v0, head_dim=8, iters=iters, kernel=kernel, check=False, **kw)
        y.backward(torch.ones_like(y))
        return y

    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
