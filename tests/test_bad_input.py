"""Bad input raises ValueError/TypeError whose message names the problem and the valid choices."""

import sys

import pytest
import torch

import fastnmf

X5 = (1, 8, 8, 8, 8)


def _mnmf(x=None, v0=None, **kw):
    x = torch.randn(*X5) if x is None else x
    v0 = torch.rand(64, 1) if v0 is None else v0
    kw.setdefault("head_dim", 4)
    kw.setdefault("window", 4)
    return fastnmf.matricized_nmf(x, v0, **kw)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (
            lambda: _mnmf(head_dim=3),
            ValueError,
            r"C=8 are not divisible by head_dim=3.*\[1, 2, 4, 8\]",
        ),
        (
            lambda: _mnmf(window=3, v0=torch.rand(27, 1)),
            ValueError,
            r"not divisible by window \(3, 3, 3\).*dim 0 has size 8.*6, 9",
        ),
        (lambda: _mnmf(v0=torch.rand(60, 1)), ValueError, r"v0 must have shape \(64, R\)"),
        (lambda: _mnmf(v0=torch.rand(64)), ValueError, r"v0 must have shape \(64, R\)"),
        (lambda: _mnmf(solver="als"), ValueError, r"unknown solver 'als'; valid choices: hals, mu"),
        (
            lambda: _mnmf(kernel="cuda"),
            ValueError,
            r"unknown kernel 'cuda'; valid choices: auto, triton, torch, reference",
        ),
        (lambda: _mnmf(x=torch.ones(X5, dtype=torch.int64)), TypeError, r"x has dtype torch.int64"),
        (lambda: _mnmf(v0=torch.ones(64, 1, dtype=torch.int32)), TypeError, r"v0 has dtype"),
        (lambda: _mnmf(x=torch.full(X5, float("nan"))), ValueError, r"x contains NaN"),
        (lambda: _mnmf(x=torch.full(X5, float("inf"))), ValueError, r"x contains Inf"),
        (lambda: _mnmf(x=torch.randn(8, 8, 8)), ValueError, r"\(B, C, H, W\) or \(B, C, D, H, W\)"),
        (lambda: _mnmf(x=torch.randn(0, 8, 8, 8, 8)), ValueError, r"x is empty"),
        (lambda: _mnmf(iters=-1), ValueError, r"iters must be an int >= 0"),
        (lambda: _mnmf(shifts=2), TypeError, r"shifts must be None or a list"),
        (lambda: _mnmf(shifts=[None, (1, 2)]), ValueError, r"tuple of 3 ints"),
        (lambda: _mnmf(u0=torch.rand(5, 1)), ValueError, r"u0 must have shape \(4, R\)"),
        (lambda: _mnmf(v0=-torch.rand(64, 1)), ValueError, r"v0 has negative entries"),
        (
            lambda: fastnmf.nmf(-torch.rand(2, 3, 5), torch.rand(5, 1)),
            ValueError,
            r"x has negative entries",
        ),
        (
            lambda: fastnmf.nmf(torch.rand(2, 3, 5), torch.rand(4, 1)),
            ValueError,
            r"v0 must have shape \(5, R\)",
        ),
        (
            lambda: fastnmf.nmf(torch.rand(2, 3, 5), torch.rand(5, 2), u0=torch.rand(3, 1)),
            ValueError,
            r"u0 has rank 1 but v0 has rank 2",
        ),
        (lambda: fastnmf.nmf(torch.rand(5), torch.rand(5, 1)), ValueError, r"\(\.\.\., M, N\)"),
        (
            lambda: fastnmf.nmf(torch.rand(2, 3, 5).half().long(), torch.rand(5, 1)),
            TypeError,
            r"torch.int64",
        ),
        (
            lambda: fastnmf.nmf(torch.tensor([[float("nan")]]), torch.rand(1, 1)),
            ValueError,
            r"x contains NaN",
        ),
        (lambda: fastnmf.nmf([[1.0]], torch.rand(1, 1)), TypeError, r"x must be a torch.Tensor"),
        (
            lambda: fastnmf.nmf(torch.rand(2, 3, 5), torch.rand(5, 1), iters=2.5),
            ValueError,
            r"iters must be an int",
        ),
    ],
)
def test_bad_input_message(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_value_checks_can_be_disabled():
    x = -torch.rand(2, 3, 5)
    y = fastnmf.nmf(x.clamp_min(0), torch.rand(5, 1), check=False)
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="negative"):
        fastnmf.nmf(x, torch.rand(5, 1), check=True)


def test_triton_kernel_runs_on_cpu_under_the_interpreter():
    """With Triton installed, kernel='triton' on a CPU tensor runs (interpreter) and is right."""
    pytest.importorskip("triton")
    x = torch.randn(*X5, dtype=torch.float64)
    v0 = torch.rand(64, 1, dtype=torch.float64)
    y = _mnmf(x=x.float(), v0=v0.float(), kernel="triton")
    ref = _mnmf(x=x, v0=v0, kernel="reference")
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)


def test_triton_kernel_without_triton_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastnmf.kernels", None)  # the import now fails
    monkeypatch.delattr(fastnmf, "kernels", raising=False)  # (an earlier import set it)
    with pytest.raises(RuntimeError, match="kernel='triton' needs triton, which failed to import"):
        _mnmf(kernel="triton")


def test_triton_interpreter_with_incompatible_numpy_says_how_to_fix(monkeypatch):
    kernels = pytest.importorskip("fastnmf.kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels.triton, "__version__", "3.6.0")
    monkeypatch.setattr(kernels.np, "__version__", "2.4.1")
    with pytest.raises(RuntimeError, match="install numpy<2.4 or triton>=3.7"):
        _mnmf(kernel="triton")


def test_module_errors():
    with pytest.raises(ValueError, match="needs spatial_size"):
        fastnmf.MatricizedNMF(head_dim=4)
    layer = fastnmf.MatricizedNMF(head_dim=4, window=4)
    with pytest.raises(ValueError, match="built for 3 spatial dims"):
        layer(torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="unknown solver"):
        fastnmf.MatricizedNMF(head_dim=4, window=4, solver="sgd")
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        layer.rank = 0
