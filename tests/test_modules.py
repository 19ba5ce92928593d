"""The nn.Module wrappers: buffers, reproducibility, switching hyper-parameters."""

import pytest
import torch
from conftest import rel_err

import fastnmf


def test_buffers_are_positive_and_reproducible():
    a = fastnmf.MatricizedNMF(head_dim=8, window=4, rank=2, seed=3)
    b = fastnmf.MatricizedNMF(head_dim=8, window=4, rank=2, seed=3)
    c = fastnmf.MatricizedNMF(head_dim=8, window=4, rank=2, seed=4)
    assert a.v0.shape == (64, 2) and a.u0.shape == (8, 2)
    assert torch.equal(a.v0, b.v0) and not torch.equal(a.v0, c.v0)
    assert (a.v0 > 0).all() and (a.v0 <= 1).all()
    assert set(dict(a.named_buffers())) == {"u0", "v0"}


def test_no_global_seeding():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    fastnmf.MatricizedNMF(head_dim=8, window=4, seed=0)
    assert torch.equal(torch.rand(3), before)  # a fixed seed leaves the global RNG alone


def test_rank_change_keeps_existing_columns():
    layer = fastnmf.MatricizedNMF(head_dim=4, window=4, rank=1, seed=1)
    first = layer.v0.clone()
    layer.rank = 3
    assert layer.v0.shape == (64, 3) and layer.u0.shape == (4, 3)
    assert torch.equal(layer.v0[:, :1], first)
    layer.rank = 1
    assert torch.equal(layer.v0, first)


def test_switch_kernel_iters_solver_shifts(gen):
    x = torch.randn(2, 8, 8, 8, 8, generator=gen)
    layer = fastnmf.MatricizedNMF(head_dim=4, window=4, shifts="default", seed=0)
    assert layer.resolved_shifts(3) == [None, (2, 2, 2)]
    layer.kernel = "reference"
    ref = layer(x)
    layer.kernel = "torch"
    assert rel_err(layer(x), ref) <= 1e-5
    layer.iters = 1
    one = layer(x)
    assert rel_err(one, ref) > 1e-4  # T changes the output
    layer.iters = 5
    layer.shifts = None
    assert rel_err(layer(x), ref) > 1e-4
    layer.shifts = "default"
    layer.solver = "mu"
    assert rel_err(layer(x), ref) <= 1e-5  # rank one: MU == HALS


def test_global_module_and_2d(gen):
    layer = fastnmf.MatricizedNMF(head_dim=4, spatial_size=(6, 10), seed=0)
    assert layer.v0.shape == (60, 1) and layer.spatial_dims == 2
    x = torch.randn(1, 8, 6, 10, generator=gen, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()


def test_nmf_module(gen):
    layer = fastnmf.NMF((6, 20), rank=2, iters=3, seed=0)
    x = torch.rand(5, 6, 20, generator=gen)
    want = fastnmf.nmf(x, layer.v0, u0=layer.u0, iters=3, kernel="reference")
    torch.testing.assert_close(layer(x), want)
    assert "rank=2" in repr(layer)


def test_state_dict_round_trip():
    a = fastnmf.MatricizedNMF(head_dim=4, window=4, seed=5)
    b = fastnmf.MatricizedNMF(head_dim=4, window=4, seed=6)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.v0, b.v0)


def test_patch_size_is_a_deprecated_name_of_window():
    """The old keyword (function and module) and attribute still work, with a warning, and give
    exactly what ``window=`` gives; both names at once are refused."""
    x = torch.randn(1, 8, 8, 8, 8)
    v0 = torch.rand(64, 1)
    kw = dict(head_dim=4, shifts=[None, 2], kernel="torch")
    new = fastnmf.matricized_nmf(x, v0, window=4, **kw)
    with pytest.warns(DeprecationWarning, match=r"patch_size=.*is now window="):
        old = fastnmf.matricized_nmf(x, v0, patch_size=4, **kw)
    assert torch.equal(new, old)
    with pytest.raises(TypeError, match="give window only"):
        fastnmf.matricized_nmf(x, v0, window=4, patch_size=4, **kw)
    with pytest.warns(DeprecationWarning, match=r"MatricizedNMF\(patch_size=.*is now window="):
        layer = fastnmf.MatricizedNMF(head_dim=4, patch_size=4, seed=0)
    assert layer.window == 4
    with pytest.warns(DeprecationWarning, match="MatricizedNMF.patch_size is now window"):
        assert layer.patch_size == 4
    ref = fastnmf.MatricizedNMF(head_dim=4, window=4, seed=0)
    assert torch.equal(layer(x), ref(x))
