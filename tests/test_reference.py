"""The oracle against an independent float64 transcription of Algorithms 1-2, and gradcheck."""

import numpy as np
import pytest
import torch

from fastnmf import reference


def _div(a, b):
    out = np.zeros_like(a)
    np.divide(a, b, out=out, where=b != 0)
    return out


def mu_numpy(x, f, g, iters):
    """Algorithm 1, one matrix, plain numpy."""
    for _ in range(iters):
        f = _div(f * (x @ g), f @ (g.T @ g))
        g = _div(g * (x.T @ f), g @ (f.T @ f))
    return f @ g.T


def hals_numpy(x, f, g, iters):
    """Algorithm 2, one matrix, plain numpy, column by column."""
    f, g = f.copy(), g.copy()
    rank = f.shape[1]
    for _ in range(iters):
        a, b = x @ g, g.T @ g
        for r in range(rank):
            num = a[:, r] - sum(f[:, s] * b[s, r] for s in range(rank) if s != r)
            f[:, r] = np.maximum(_div(num, np.full_like(num, b[r, r])), 0)
        c, d = x.T @ f, f.T @ f
        for r in range(rank):
            num = c[:, r] - sum(g[:, s] * d[s, r] for s in range(rank) if s != r)
            g[:, r] = np.maximum(_div(num, np.full_like(num, d[r, r])), 0)
    return f @ g.T


@pytest.mark.parametrize("solver", ["mu", "hals"])
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("iters", [1, 2, 5, 8])
def test_reference_matches_numpy_transcription(gen, solver, rank, iters):
    x = torch.rand(3, 6, 11, generator=gen, dtype=torch.float64)
    v0 = torch.rand(11, rank, generator=gen, dtype=torch.float64) + 0.1
    u0 = torch.rand(6, rank, generator=gen, dtype=torch.float64) + 0.1
    got = reference.nmf_loop(x, v0, u0, iters, solver)
    fn = mu_numpy if solver == "mu" else hals_numpy
    for i in range(3):
        want = fn(x[i].numpy(), u0.numpy(), v0.numpy(), iters)
        np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("solver", ["mu", "hals"])
@pytest.mark.parametrize("rank", [1, 2])
def test_reference_gradcheck(gen, solver, rank):
    x = (torch.rand(2, 4, 7, generator=gen, dtype=torch.float64) + 0.05).requires_grad_()
    v0 = torch.rand(7, rank, generator=gen, dtype=torch.float64) + 0.1
    u0 = torch.rand(4, rank, generator=gen, dtype=torch.float64) + 0.1
    assert torch.autograd.gradcheck(lambda t: reference.nmf_loop(t, v0, u0, 3, solver), (x,))


def test_reference_matricized_gradcheck(gen):
    x = torch.randn(1, 4, 4, 6, generator=gen, dtype=torch.float64).requires_grad_()
    v0 = torch.rand(4, 1, generator=gen, dtype=torch.float64) + 0.1

    def fn(t):
        return reference.matricized_nmf(t, v0, head_dim=2, patch_size=2, shifts=[None, 1])

    assert torch.autograd.gradcheck(fn, (x,))


def test_num_grad_steps_only_last_iterations_carry_gradient(gen):
    x = torch.rand(2, 4, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    v0 = torch.rand(9, 2, generator=gen, dtype=torch.float64)
    full = reference.nmf_loop(x, v0, None, 4, "hals")
    part = reference.nmf_loop(x, v0, None, 4, "hals", num_grad_steps=1)
    assert torch.equal(full, part)  # same forward
    (gf,) = torch.autograd.grad(full.sum(), x)
    (gp,) = torch.autograd.grad(part.sum(), x)
    assert not torch.allclose(gf, gp)  # truncated backward differs
    none = reference.nmf_loop(x, v0, None, 4, "hals", num_grad_steps=0)
    assert not none.requires_grad
