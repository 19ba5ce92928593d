"""kernel="torch" (closed form, hand-written backward) against the float64 reference."""

import pytest
import torch
from conftest import check_fp32, n_columns, rel_err, window_kw

import fastnmf

_n = n_columns


def _run(kernel, x, v0, dy, dtype, **kw):
    xi = x.detach().to(dtype).requires_grad_()
    y = fastnmf.matricized_nmf(xi, v0.to(dtype), kernel=kernel, **window_kw(kw))
    (dx,) = torch.autograd.grad(y, xi, dy.to(dtype))
    return y, dx


def check_against_reference(gen, shape, head_dim, patch, shifts, solver, iters):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    v0 = torch.rand(_n(shape[2:], patch), 1, generator=gen, dtype=torch.float64)
    dy = torch.randn(*shape, generator=gen, dtype=torch.float64)
    kw = dict(head_dim=head_dim, patch_size=patch, shifts=shifts, solver=solver, iters=iters)
    y_ref, dx_ref = _run("reference", x, v0, dy, torch.float64, **kw)
    y64, dx64 = _run("torch", x, v0, dy, torch.float64, **kw)
    assert rel_err(y64, y_ref) <= 1e-10
    assert rel_err(dx64, dx_ref) <= 1e-10
    y32, dx32 = _run("torch", x, v0, dy, torch.float32, **kw)
    assert y32.dtype == torch.float32 and y32.shape == x.shape
    assert rel_err(y32, y_ref) <= 1e-5
    assert rel_err(dx32, dx_ref) <= 1e-4


CASES = [
    # (shape, head_dim, patch, shifts)
    ((1, 8, 8, 8, 8), 4, 4, None),  # local, 3D, batch 1
    ((3, 16, 8, 12, 16), 8, 4, "default"),  # swin, non-cubic, batch 3
    ((1, 16, 8, 16, 8), 8, 8, [None, 2, 4, 6]),  # the original BraTS shifts
    ((2, 8, 16, 8, 8), 4, 8, "default"),
    ((2, 8, 6, 10, 4), 4, None, None),  # global
    ((1, 8, 4, 6, 8), 8, None, [None, 2, (1, 2, 3)]),  # global with shifts
    ((3, 8, 8, 12), 4, 4, None),  # 2D local
    ((1, 16, 16, 24), 8, 8, [None, 2, 4, 6]),  # 2D swin
    ((2, 4, 8, 12), 4, (4, 2), [None, (1, 3)]),  # C = E, anisotropic window
    ((1, 8, 6, 10), 8, None, None),  # 2D global
]


@pytest.mark.parametrize("shape,head_dim,patch,shifts", CASES)
@pytest.mark.parametrize("solver", ["hals", "mu"])
@pytest.mark.parametrize("iters", [1, 5])
def test_torch_matches_reference(gen, shape, head_dim, patch, shifts, solver, iters):
    if shifts == "default":
        shifts = [None, patch // 2]
    check_against_reference(gen, shape, head_dim, patch, shifts, solver, iters)


@pytest.mark.parametrize("iters", [2, 8, 20])
def test_torch_matches_reference_more_iterations(gen, iters):
    check_against_reference(gen, (2, 8, 8, 8, 8), 4, 4, [None, 2], "hals", iters)


@pytest.mark.parametrize("solver", ["hals", "mu"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_nmf_torch_matches_reference(gen, solver, rank):
    x = torch.rand(4, 2, 8, 30, generator=gen, dtype=torch.float64, requires_grad=True)
    v0 = torch.rand(30, rank, generator=gen, dtype=torch.float64, requires_grad=True)
    u0 = torch.rand(8, rank, generator=gen, dtype=torch.float64)
    dy = torch.randn(4, 2, 8, 30, generator=gen, dtype=torch.float64)
    outs = {}
    for kernel in ("reference", "torch"):
        y = fastnmf.nmf(x, v0, u0=u0, iters=5, solver=solver, kernel=kernel)
        outs[kernel] = (y, *torch.autograd.grad(y, (x, v0), dy))
    (y, dx, dv), (y_ref, dx_ref, dv_ref) = outs["torch"], outs["reference"]
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(dx, dx_ref) <= 1e-10
    # dv0 is small by cancellation (the power steps forget their start vector like
    # (lambda2/lambda1)^(T-1)), so its rounding error is set by the size of the terms that cancel,
    # which are of the size of dx: measure it on that scale (seen: 1e-10 relative to itself,
    # 4e-15 absolute, over 300 seeds).
    scale = max(dv_ref.abs().max().item(), dx_ref.abs().max().item())
    assert (dv - dv_ref).abs().max().item() <= 1e-10 * scale


@pytest.mark.parametrize("shape,head_dim,patch,shifts", [CASES[1], CASES[5], CASES[7]])
@pytest.mark.parametrize("solver", ["hals", "mu"])
@pytest.mark.parametrize("rank", [2, 3])
def test_torch_rank_above_one_matches_reference(gen, shape, head_dim, patch, shifts, solver, rank):
    """Rank > 1 runs the batched loop of fastnmf.loop, not the oracle: compare them."""
    if shifts == "default":
        shifts = [None, patch // 2]
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    v0 = torch.rand(_n(shape[2:], patch), rank, generator=gen, dtype=torch.float64)
    u0 = torch.rand(head_dim, rank, generator=gen, dtype=torch.float64)
    dy = torch.randn(*shape, generator=gen, dtype=torch.float64)
    kw = dict(head_dim=head_dim, patch_size=patch, shifts=shifts, solver=solver, iters=4, u0=u0)
    y_ref, dx_ref = _run("reference", x, v0, dy, torch.float64, **kw)
    y, dx = _run("torch", x, v0, dy, torch.float64, **kw)
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(dx, dx_ref) <= 1e-10
    kw32 = {**kw, "u0": u0.float()}
    y32, dx32 = _run("torch", x, v0, dy, torch.float32, **kw32)
    assert rel_err(y32, y_ref) <= 1e-4
    # (rank 3, HALS, 2D BraTS shifts: 1 draw in 300 where the oracle in fp32 misses 1e-3 itself,
    # by 4.6e-2, and the torch path with it)
    check_fp32(dx32, dx_ref, 1e-3,
               lambda: _run("reference", x, v0, dy, torch.float32, **kw32)[1])


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_num_grad_steps_torch_matches_reference(gen, k):
    x = torch.rand(3, 8, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    v0 = torch.rand(40, 1, generator=gen, dtype=torch.float64)
    dy = torch.randn(3, 8, 40, generator=gen, dtype=torch.float64)
    ref = fastnmf.nmf(x, v0, iters=5, kernel="reference", num_grad_steps=k)
    fast = fastnmf.nmf(x, v0, iters=5, kernel="torch", num_grad_steps=k)
    assert rel_err(fast, ref) <= 1e-10
    if k == 0:
        assert not ref.requires_grad and not fast.requires_grad
        return
    (g_ref,) = torch.autograd.grad(ref, x, dy)
    (g_fast,) = torch.autograd.grad(fast, x, dy)
    assert rel_err(g_fast, g_ref) <= 1e-10


def test_mu_respects_zero_initial_entries(gen):
    """MU keeps zero entries of u0 and v0 at zero; the closed form masks them the same way."""
    x = torch.rand(2, 6, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    v0 = torch.rand(12, 1, generator=gen, dtype=torch.float64)
    u0 = torch.rand(6, 1, generator=gen, dtype=torch.float64)
    v0[3] = 0
    u0[1] = 0
    dy = torch.randn(2, 6, 12, generator=gen, dtype=torch.float64)
    ys = [fastnmf.nmf(x, v0, u0=u0, solver="mu", kernel=k) for k in ("reference", "torch")]
    assert rel_err(ys[1], ys[0]) <= 1e-10
    assert torch.all(ys[1][:, 1] == 0) and torch.all(ys[1][:, :, 3] == 0)
    grads = [torch.autograd.grad(y, x, dy)[0] for y in ys]
    assert rel_err(grads[1], grads[0]) <= 1e-10


def test_iters_zero_returns_initial_product(gen):
    x = torch.rand(2, 4, 9, generator=gen)
    v0 = torch.rand(9, 2, generator=gen)
    u0 = torch.rand(4, 2, generator=gen)
    for kernel in ("torch", "reference"):
        y = fastnmf.nmf(x, v0, u0=u0, iters=0, kernel=kernel)
        torch.testing.assert_close(y, (u0 @ v0.T).expand(2, 4, 9))


def test_cost_flat_in_iterations_uses_closed_form(gen, monkeypatch):
    """The torch path builds the Gram matrix once, whatever T (no per-iteration pass over X)."""
    from fastnmf import closed_form

    calls = []
    real = closed_form.power_iterates

    def spy(x, g0, iters):
        calls.append(iters)
        return real(x, g0, iters)

    monkeypatch.setattr(closed_form, "power_iterates", spy)
    x = torch.rand(2, 8, 64, generator=gen, requires_grad=True)
    v0 = torch.rand(64, 1, generator=gen)
    for t in (1, 5, 50):
        fastnmf.nmf(x, v0, iters=t, kernel="torch").sum().backward()
    assert calls == [1, 5, 50]  # one Gram build per call, T only sets the small loop


def test_autocast_bfloat16_input(gen):
    x = torch.randn(1, 8, 8, 8, 8, generator=gen)
    v0 = torch.rand(64, 1, generator=gen)
    ref = fastnmf.matricized_nmf(
        x.double(), v0.double(), head_dim=4, window=4, kernel="reference"
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastnmf.matricized_nmf(x.bfloat16(), v0, head_dim=4, window=4, kernel="torch")
    assert y.dtype == torch.bfloat16
    y_bf_ref = fastnmf.matricized_nmf(
        x.bfloat16(), v0.bfloat16(), head_dim=4, window=4, kernel="reference"
    )
    # torch computes in fp32 from bf16 inputs: within 2x the reference's own bf16 error + atol
    assert rel_err(y, ref) <= 2 * rel_err(y_bf_ref, ref) + 1e-2
