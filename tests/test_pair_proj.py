"""The decoder's fused skip adapter (kernels/pair_proj.py, ``a = drop(Ws s + Wx x)``) against
float64 PyTorch: forward and every gradient, with the kernels' own dropout masks
(tests/_glue_masks.py) in the reference."""

from __future__ import annotations

import pytest
import torch
from _glue_masks import LaunchCapture, kernel_masks
from conftest import DEVICES, rel_err
from fastnmf.kernels import pair_proj as P
from fastnmf.models.layers import SkipAdapter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # of the tests without a device param
# (skip's shape, Cx, Cout): odd voxel counts, several tiles per item and per program (the
# interpreter's tiles have 256 voxels), 1-3 spatial dims, non-power-of-two and unequal channels
SHAPES = [((2, 16, 9, 8, 7), 16, 16), ((1, 24, 3, 9, 5), 40, 16), ((2, 32, 17, 19), 16, 32),
          ((3, 8, 11), 3, 40), ((1, 16, 5, 6, 7), 24, 24)]  # fmt: skip
NAMES = ("a", "ds", "dx", "dWs", "dWx")


def _pointwise(w, z):
    """The 1x1 conv ``w`` (Cout, Cin) of z (B, Cin, *S)."""
    return torch.einsum("oc,bc...->bo...", w, z)


def _inputs(gen, shape, cx, cout, dtype, device):
    """(s, x, ws, wx, da), drawn in float64 and rounded to ``dtype``; s of ``shape``."""
    b, cs, *spatial = shape
    out = [torch.randn(shape, generator=gen, dtype=torch.float64),
           torch.randn(b, cx, *spatial, generator=gen, dtype=torch.float64) * 2 - 0.5,
           torch.randn(cout, cs, generator=gen, dtype=torch.float64) / cs**0.5,
           torch.randn(cout, cx, generator=gen, dtype=torch.float64) / cx**0.5,
           torch.randn(b, cout, *spatial, generator=gen, dtype=torch.float64)]  # fmt: skip
    return [t.to(device=device, dtype=dtype) for t in out]


def _check(gen, shape, cx, cout, p, dtype, device, seed=4321):
    """(kernel results, float64 reference results): a, ds, dx, dWs, dWx."""
    s, x, ws, wx, da = _inputs(gen, shape, cx, cout, dtype, device)
    a = P.pair_proj_forward(s, x, ws, wx, p, seed)
    grads = P.pair_proj_backward(da, s, x, ws, wx, p, seed)
    leaves = [t.detach().double().requires_grad_() for t in (s, x, ws, wx)]
    a_ref = _pointwise(leaves[2], leaves[0]) + _pointwise(leaves[3], leaves[1])
    if p > 0:
        masks = kernel_masks(shape[0], cout, a.shape[2:].numel(), 0, p, seed, device=device)
        a_ref = a_ref * masks.view(a.shape).double()
    grads_ref = torch.autograd.grad(a_ref, leaves, da.double())
    return (a, *grads), (a_ref, *grads_ref)


def _assert_close(got, want, tol, dtype):
    for name, a, e in zip(NAMES, got, want, strict=True):
        assert a.dtype == dtype and a.shape == e.shape, (name, a.dtype, a.shape, e.shape)
        err = rel_err(a.cpu(), e.cpu())
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# ----------------------------------------------------------------------------------------------
# float64: exact against PyTorch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize(("shape", "cx", "cout"), SHAPES)
def test_pair_proj_float64(gen, shape, cx, cout, p, device):
    got, want = _check(gen, shape, cx, cout, p, torch.float64, device)
    _assert_close(got, want, 1e-12, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_skip_adapter(gen, device):
    """The kernel with the adapter's own weights (flattened 1x1 conv weights) is the model's
    ``SkipAdapter.pair`` (dropout 0), forward and gradients; x channels-last in memory (a
    non-contiguous view)."""
    adapter = SkipAdapter(16, 24, 32, spatial_dims=3).double().to(device)
    s = torch.randn(2, 16, 5, 6, 7, generator=gen, dtype=torch.float64).to(device)
    x = torch.randn(2, 5, 6, 7, 24, generator=gen, dtype=torch.float64).to(device).movedim(-1, 1)
    da = torch.randn(2, 32, 5, 6, 7, generator=gen, dtype=torch.float64).to(device)
    ws, wx = adapter.weight_skip.detach().flatten(1), adapter.weight_x.detach().flatten(1)
    got = (P.pair_proj_forward(s, x, ws, wx, 0.0, 1),
           *P.pair_proj_backward(da, s, x, ws, wx, 0.0, 1))
    leaves = [t.clone().requires_grad_() for t in (s, x)]
    a_ref = adapter.pair(*leaves)
    params = [adapter.weight_skip, adapter.weight_x]
    ds, dx, dws, dwx = torch.autograd.grad(a_ref, [*leaves, *params], da)
    want = (a_ref, ds, dx, dws.flatten(1), dwx.flatten(1))
    _assert_close(got, want, 1e-12, torch.float64)


# ----------------------------------------------------------------------------------------------
# fp32 / bf16 / fp16 inputs: fp32 accumulation


def _tolerance(dtype, device) -> float:
    """Relative error allowed against float64 on the same (rounded) inputs: the outputs' rounding
    and the rounding of the backward's dot operand ``m da`` (bf16 / fp16: 8 / 11 significant
    bits; fp32 operands run as TF32, 11 bits, on a GPU)."""
    if dtype == torch.float32:
        return 3e-3 if device == "cuda" else 1e-5
    return {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pair_proj_low_precision(gen, dtype, device):
    got, want = _check(gen, (2, 24, 9, 8, 7), 32, 40, 0.2, dtype, device)
    _assert_close(got, want, _tolerance(dtype, device), dtype)


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter: on a GPU fp32 products are TF32")
def test_autocast_and_dot_reach_the_products(gen):
    """fp32 tensors under bf16 autocast, or with ``dot=torch.bfloat16`` (how the backward, run
    outside autocast, keeps the forward's choice): bf16 operands (an error of bf16's size, not
    fp32's), fp32 results."""
    s, x, ws, wx, da = _inputs(gen, (1, 32, 6, 7, 5), 32, 32, torch.float32, "cpu")
    leaves = [t.double().requires_grad_() for t in (s, x, ws, wx)]
    a_ref = _pointwise(leaves[2], leaves[0]) + _pointwise(leaves[3], leaves[1])
    grads_ref = torch.autograd.grad(a_ref, leaves, da.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = P.pair_proj_forward(s, x, ws, wx, 0.0, 1)
    runs = {"plain": (P.pair_proj_forward(s, x, ws, wx, 0.0, 1),
                      *P.pair_proj_backward(da, s, x, ws, wx, 0.0, 1)),
            "bf16": (auto, *P.pair_proj_backward(da, s, x, ws, wx, 0.0, 1, dot=torch.bfloat16))}
    for name, got in runs.items():
        assert all(t.dtype == torch.float32 for t in got)
        errs = [rel_err(g, w) for g, w in zip(got, (a_ref, *grads_ref), strict=True)]
        low, high = (0.0, 1e-5) if name == "plain" else (1e-4, 2e-2)
        assert all(low <= e < high for e in errs), (name, errs)


# ----------------------------------------------------------------------------------------------
# dropout masks and determinism


def test_bitwise_deterministic(gen):
    """Two runs give the same bits (partial sums reduced in a fixed order; masks regenerated
    from the seed)."""
    s, x, ws, wx, da = _inputs(gen, (2, 24, 9, 8, 7), 16, 40, torch.float32, DEVICE)  # 4 tiles
    runs = [(P.pair_proj_forward(s, x, ws, wx, 0.4, 99),
             *P.pair_proj_backward(da, s, x, ws, wx, 0.4, 99)) for _ in range(2)]  # fmt: skip
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_dropout_keeps_one_minus_p_and_seeds_differ():
    """The forward's own mask (s = 1, Ws = a one-hot column, Wx = 0: a = the mask's scale factor):
    the kept fraction is 1 - p, kept entries are 1 / (1 - p), the backward uses the same mask,
    and another seed or batch item draws another mask."""
    shape, p = (2, 32, 16, 16, 16), 0.3
    s, x = torch.ones(shape, device=DEVICE), torch.randn(2, 16, 16, 16, 16, device=DEVICE)
    ws, wx = torch.zeros(32, 32, device=DEVICE), torch.zeros(32, 16, device=DEVICE)
    ws[:, 0] = 1.0
    a = P.pair_proj_forward(s, x, ws, wx, p, 7)
    kept = a != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01  # 262144 draws: sd 9e-4
    assert torch.allclose(a[kept], torch.full_like(a[kept], 1 / (1 - p)), rtol=1e-6, atol=0)
    _, _, dws, _ = P.pair_proj_backward(torch.ones_like(a), s, x, ws, wx, p, 7)
    assert torch.allclose(dws[:, 0], a.sum((0, 2, 3, 4)), rtol=1e-6)  # the same mask's sum
    other = P.pair_proj_forward(s, x, ws, wx, p, 8)
    assert (kept != (other != 0)).double().mean().item() > 0.3  # independent: 2 p (1 - p) = 0.42
    assert (kept[0] != kept[1]).double().mean().item() > 0.3


# ----------------------------------------------------------------------------------------------
# bad input, limits, workspace


def test_bad_input():
    s, x = torch.randn(2, 16, 5), torch.randn(2, 24, 5)
    ws, wx = torch.randn(8, 16), torch.randn(8, 24)
    with pytest.raises(ValueError, match=r"skip expects \(B, C, \*spatial\)"):
        P.pair_proj_forward(torch.randn(2, 16), x, ws, wx, 0.0, 1)
    with pytest.raises(ValueError, match="must share batch and spatial sizes"):
        P.pair_proj_forward(s, torch.randn(2, 24, 6), ws, wx, 0.0, 1)
    with pytest.raises(ValueError, match="must share batch and spatial sizes"):
        P.pair_proj_forward(s, torch.randn(1, 24, 5), ws, wx, 0.0, 1)
    with pytest.raises(TypeError, match="expects one dtype"):
        P.pair_proj_forward(s, x.double(), ws, wx, 0.0, 1)
    with pytest.raises(TypeError, match="dtype"):
        P.pair_proj_forward(s.to(torch.int32), x.to(torch.int32), ws, wx, 0.0, 1)
    with pytest.raises(ValueError, match=r"16 skip channels expects a 2-D weight \(C, 16\)"):
        P.pair_proj_forward(s, x, wx, wx, 0.0, 1)
    with pytest.raises(ValueError, match=r"24 x channels expects a 2-D weight \(C, 24\)"):
        P.pair_proj_forward(s, x, ws, torch.randn(8, 24, 1, 1), 0.0, 1)
    with pytest.raises(ValueError, match="output channels differ"):
        P.pair_proj_forward(s, x, ws, torch.randn(9, 24), 0.0, 1)
    with pytest.raises(ValueError, match="dropout rate"):
        P.pair_proj_forward(s, x, ws, wx, 1.0, 1)
    with pytest.raises(ValueError, match="output gradient"):
        P.pair_proj_backward(torch.randn(2, 9, 5), s, x, ws, wx, 0.0, 1)


def test_limits():
    """Beyond the registers' weight gradients, and beyond int32 dropout offsets: clear errors."""
    assert P.supported(64, 64, 64) and P.supported(64, 64, 128) and P.supported(24, 40, 16)
    assert not P.supported(128, 128, 128) and not P.supported(64, 65, 128)
    s, w = torch.randn(1, 128, 2, 2), torch.randn(128, 128)
    with pytest.raises(ValueError, match=r"Cs=128, Cx=128, C=128 is beyond the fused kernel"):
        P.pair_proj_forward(s, s, w, w, 0.0, 1)
    with pytest.raises(ValueError, match="beyond the fused kernel"):
        P.pair_proj_backward(s, s, s, w, w, 0.0, 1)
    big = torch.empty(1, 32, 1024, 1024, 2048, device="meta")  # 32 * 2**31 dropout offsets
    w = torch.empty(32, 32)
    with pytest.raises(ValueError, match="int32"):
        P.pair_proj_forward(big, big, w, w, 0.1, 1)


@pytest.mark.parametrize("cx", [None, 24])
def test_workspace_bytes(gen, cx, monkeypatch):
    """``pair_proj_workspace_bytes`` is what the backward's partial-sum workspace moves: written
    once by the kernel and read once by its reduction (x's channels default to skip's)."""
    spy = LaunchCapture(P._bwd_kernel)
    monkeypatch.setattr(P, "_bwd_kernel", spy)
    shape, cout = (2, 16, 9, 8, 7), 40
    s, x, ws, wx, da = _inputs(gen, shape, cx or 16, cout, torch.float32, DEVICE)
    P.pair_proj_backward(da, s, x, ws, wx, 0.1, 5)
    ((grid, args),) = spy.calls
    part = args[7]
    assert part.shape[0] == grid[0] > 1
    kw = {} if cx is None else {"x_channels": cx}
    predicted = P.pair_proj_workspace_bytes(shape, cout, torch.float32, grid[0], **kw)
    assert predicted == 2 * part.numel() * part.element_size()
