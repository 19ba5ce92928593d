"""The production batched loop (fastnmf.loop) against the literal oracle, in float64."""

import pytest
import torch
from conftest import rel_err

from fastnmf import loop, reference


def test_safe_div_matches_oracle_and_guards_zero(gen):
    a = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        b[1, 2] = 0
        b[3] = 0
    y = loop.safe_div(a, b)
    assert torch.equal(y, reference.safe_div(a, b))
    assert torch.all(y[3] == 0) and y[1, 2] == 0
    y.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert b.grad[3].abs().sum() == 0


@pytest.mark.parametrize("solver", ["hals", "mu"])
@pytest.mark.parametrize("rank", [1, 2, 3, 5])
@pytest.mark.parametrize("with_u0", [False, True])
def test_factors_and_gradients_match_oracle(gen, solver, rank, with_u0):
    x = torch.rand(3, 2, 6, 20, generator=gen, dtype=torch.float64)
    x[0, 1, :, 4] = 0  # a zero column
    x[1, 0] = 0  # a zero matrix
    x.requires_grad_()
    v0 = torch.rand(20, rank, generator=gen, dtype=torch.float64, requires_grad=True)
    u0 = torch.rand(6, rank, generator=gen, dtype=torch.float64) if with_u0 else None
    df = torch.randn(3, 2, 6, rank, generator=gen, dtype=torch.float64)
    dg = torch.randn(3, 2, 20, rank, generator=gen, dtype=torch.float64)
    f, g = loop.nmf_factors(x, v0, u0, iters=4, solver=solver)
    f_ref, g_ref = reference.nmf_factors(x, v0, u0, 4, solver)
    assert rel_err(f, f_ref) <= 1e-12 and rel_err(g, g_ref) <= 1e-12
    assert torch.isfinite(f).all() and torch.all(f[1, 0] == 0)
    grads = torch.autograd.grad((f * df).sum() + (g * dg).sum(), (x, v0))
    grads_ref = torch.autograd.grad((f_ref * df).sum() + (g_ref * dg).sum(), (x, v0))
    for got, want in zip(grads, grads_ref, strict=True):
        assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize("solver", ["hals", "mu"])
@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_num_grad_steps_matches_oracle(gen, solver, k):
    x = torch.rand(4, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    v0 = torch.rand(12, 2, generator=gen, dtype=torch.float64)
    dy = torch.randn(4, 5, 12, generator=gen, dtype=torch.float64)
    y = loop.nmf_loop(x, v0, iters=5, solver=solver, num_grad_steps=k)
    y_ref = reference.nmf_loop(x, v0, None, 5, solver, k)
    assert rel_err(y, y_ref) <= 1e-12
    assert y.requires_grad == y_ref.requires_grad == (k > 0)
    if k:
        (dx,) = torch.autograd.grad(y, x, dy)
        (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
        assert rel_err(dx, dx_ref) <= 1e-10


def test_iters_zero_is_initial_product(gen):
    x = torch.rand(2, 4, 9, generator=gen, dtype=torch.float64)
    v0 = torch.rand(9, 3, generator=gen, dtype=torch.float64)
    u0 = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    y = loop.nmf_loop(x, v0, u0, iters=0, solver="hals")
    # the batched product (u0 and v0 expanded over the batch) may round differently from the
    # plain one by an ulp (FASTNMF_TEST_SEED=414751513: 2.2e-16); one iteration changes it by O(1)
    torch.testing.assert_close(y, (u0 @ v0.T).expand(2, 4, 9), rtol=1e-14, atol=0)
