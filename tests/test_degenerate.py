"""Degenerate inputs are normal after ReLU: finite outputs and gradients, zeros stay zero."""

import pytest
import torch
from conftest import rel_err

import fastnmf

KERNELS = ["torch", "reference"]


def _layer(x, v0, kernel, **kw):
    x = x.detach().requires_grad_()
    y = fastnmf.matricized_nmf(x, v0, head_dim=4, kernel=kernel, **kw)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return y, dx


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("solver", ["hals", "mu"])
@pytest.mark.parametrize("patch,shifts", [(4, [None, 2]), (None, None)])
def test_all_zero_and_all_negative_input(gen, kernel, solver, patch, shifts):
    v0 = torch.rand(64 if patch else 512, 1, generator=gen)
    for x in (torch.zeros(1, 8, 8, 8, 8), -torch.rand(1, 8, 8, 8, 8, generator=gen)):
        y, dx = _layer(x, v0, kernel, patch_size=patch, shifts=shifts, solver=solver)
        assert torch.equal(y, torch.zeros_like(y))
        assert torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_zero_windows_rows_columns_match_reference(gen, solver):
    x = torch.randn(2, 8, 8, 8, 8, generator=gen, dtype=torch.float64)
    x[0, :, :4, :4, :4] = -1  # a whole zero window (both heads)
    x[1, 0:4, :, :, 4:8] = -2  # zero windows of one head
    x[1, 5] = -1  # a zero row in every window of head 1
    x[0, :, :, 2, :] = -3  # zero columns
    v0 = torch.rand(64, 1, generator=gen, dtype=torch.float64)
    kw = dict(patch_size=4, shifts=[None, 2], solver=solver)
    y_ref, dx_ref = _layer(x, v0, "reference", **kw)
    y, dx = _layer(x.float(), v0.float(), "torch", **kw)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(dx, dx_ref) <= 1e-4
    y_ref_noshift, _ = _layer(x, v0, "reference", patch_size=4, solver=solver)
    assert torch.equal(y_ref_noshift[0, :, :4, :4, :4], torch.zeros(8, 4, 4, 4, dtype=y.dtype))


@pytest.mark.parametrize("kernel", KERNELS)
def test_single_nonzero_voxel(gen, kernel):
    x = -torch.ones(1, 8, 8, 8, 8)
    x[0, 2, 3, 4, 5] = 2.5
    v0 = torch.rand(64, 1, generator=gen)
    y, dx = _layer(x, v0, kernel, patch_size=4, shifts=[None, 2])
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    # a rank-one fit of a matrix with one nonzero entry is exact
    want = torch.zeros_like(y)
    want[0, 2, 3, 4, 5] = 2.5
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scale", [1e4, 1e-6])
def test_extreme_magnitudes(gen, kernel, scale):
    x = torch.randn(1, 8, 8, 8, 8, generator=gen, dtype=torch.float64)
    v0 = torch.rand(64, 1, generator=gen, dtype=torch.float64)
    y_ref, dx_ref = _layer(x * scale, v0, "reference", patch_size=4, shifts=[None, 2])
    y, dx = _layer((x * scale).float(), v0.float(), kernel, patch_size=4, shifts=[None, 2])
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(dx, dx_ref) <= 1e-4


@pytest.mark.parametrize("kernel", KERNELS)
def test_nmf_zero_matrix_gives_zero(gen, kernel):
    x = torch.rand(3, 4, 10, generator=gen)
    x[1] = 0
    x = x.requires_grad_()
    v0 = torch.rand(10, 1, generator=gen)
    y = fastnmf.nmf(x, v0, kernel=kernel)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(y[1], torch.zeros(4, 10)) and torch.equal(dx[1], torch.zeros(4, 10))
    assert torch.isfinite(dx).all()
