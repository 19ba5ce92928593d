"""The context branch's fused projections (kernels/proj_glue.py) against float64 PyTorch:
``norm_proj`` (``z = W LN(x)``) and ``proj_residual`` (``out = x + drop(W z + b)``), forward and
every gradient, with the kernels' own dropout masks (tests/_glue_masks.py) in the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _glue_masks import LaunchCapture, kernel_masks
from conftest import DEVICES, rel_err
from fastnmf.kernels import proj_glue as P

EPS = 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # of the tests without a device param
# (x's shape, Cout): odd voxel counts, several tiles per item and per program (the interpreter's
# tiles have 256 voxels), 1-3 spatial dims, non-power-of-two and unequal channel counts
SHAPES = [((2, 16, 9, 8, 7), 16), ((1, 24, 3, 9, 5), 40), ((2, 32, 17, 19), 32),
          ((3, 24, 11), 16), ((1, 16, 5, 6, 7), 24)]  # fmt: skip


def _ln(x, w, b):
    """LayerNorm over the channels of a (B, C, *S) tensor, on its channels-last view."""
    return F.layer_norm(x.movedim(1, -1), (x.shape[1],), w, b, EPS).movedim(-1, 1)


def _pointwise(w, z):
    """The 1x1 conv ``w`` (Cout, Cin) of z (B, Cin, *S)."""
    return torch.einsum("oc,bc...->bo...", w, z)


def _mask(shape, p, seed, dtype, device):
    """The kernels' dropout mask (k = 0) for an output of ``shape``, or None without dropout."""
    if p == 0:
        return None
    b, c = shape[:2]
    return kernel_masks(b, c, shape[2:].numel(), 0, p, seed, device=device).view(shape).to(dtype)


def _proj_residual_ref(z, x, w, b, mask):
    h = _pointwise(w, z) + b.view(-1, *[1] * (z.dim() - 2))
    return x + (h if mask is None else h * mask)


def _norm_proj_inputs(gen, shape, cout, dtype, device):
    """(x, ln_w, ln_b, w, dz), drawn in float64 and rounded to ``dtype``."""
    c = shape[1]
    out = [torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5,
           torch.randn(c, generator=gen, dtype=torch.float64) * 0.5 + 1,
           torch.randn(c, generator=gen, dtype=torch.float64) * 0.2,
           torch.randn(cout, c, generator=gen, dtype=torch.float64) / c**0.5,
           torch.randn(shape[0], cout, *shape[2:], generator=gen, dtype=torch.float64)]  # fmt: skip
    return [t.to(device=device, dtype=dtype) for t in out]


def _proj_residual_inputs(gen, shape, cout, dtype, device):
    """(z, x, w, b, dout), drawn in float64 and rounded to ``dtype``; z of ``shape``."""
    cin = shape[1]
    oshape = (shape[0], cout, *shape[2:])
    out = [torch.randn(shape, generator=gen, dtype=torch.float64),
           torch.randn(oshape, generator=gen, dtype=torch.float64),
           torch.randn(cout, cin, generator=gen, dtype=torch.float64) / cin**0.5,
           torch.randn(cout, generator=gen, dtype=torch.float64) * 0.5,
           torch.randn(oshape, generator=gen, dtype=torch.float64)]  # fmt: skip
    return [t.to(device=device, dtype=dtype) for t in out]


def _norm_proj_check(gen, shape, cout, dtype, device):
    """(kernel results, float64 reference results): z, dx, dlnw, dlnb, dW."""
    x, lnw, lnb, w, dz = _norm_proj_inputs(gen, shape, cout, dtype, device)
    z = P.norm_proj_forward(x, lnw, lnb, EPS, w)
    grads = P.norm_proj_backward(dz, x, lnw, lnb, EPS, w)
    leaves = [t.detach().double().requires_grad_() for t in (x, lnw, lnb, w)]
    z_ref = _pointwise(leaves[3], _ln(*leaves[:3]))
    grads_ref = torch.autograd.grad(z_ref, leaves, dz.double())
    return (z, *grads), (z_ref, *grads_ref)


def _proj_residual_check(gen, shape, cout, p, dtype, device, seed=1234):
    """(kernel results, float64 reference results): out, dz, dW, db."""
    z, x, w, b, dout = _proj_residual_inputs(gen, shape, cout, dtype, device)
    out = P.proj_residual_forward(z, x, w, b, p, seed)
    grads = P.proj_residual_backward(dout, z, w, p, seed)
    leaves = [t.detach().double().requires_grad_() for t in (z, w, b)]
    mask = _mask(out.shape, p, seed, torch.float64, device)
    out_ref = _proj_residual_ref(leaves[0], x.double(), leaves[1], leaves[2], mask)
    grads_ref = torch.autograd.grad(out_ref, leaves, dout.double())
    return (out, *grads), (out_ref, *grads_ref)


def _assert_close(got, want, tol, dtype, names):
    for name, a, e in zip(names, got, want, strict=True):
        assert a.dtype == dtype and a.shape == e.shape, (name, a.dtype, a.shape, e.shape)
        err = rel_err(a.cpu(), e.cpu())
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


NORM_PROJ_NAMES = ("z", "dx", "dlnw", "dlnb", "dW")
PROJ_RESIDUAL_NAMES = ("out", "dz", "dW", "db")


# ----------------------------------------------------------------------------------------------
# float64: exact against PyTorch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "cout"), SHAPES)
def test_norm_proj_float64(gen, shape, cout, device):
    got, want = _norm_proj_check(gen, shape, cout, torch.float64, device)
    _assert_close(got, want, 1e-12, torch.float64, NORM_PROJ_NAMES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize(("shape", "cout"), SHAPES)
def test_proj_residual_float64(gen, shape, cout, p, device):
    got, want = _proj_residual_check(gen, shape, cout, p, torch.float64, device)
    _assert_close(got, want, 1e-12, torch.float64, PROJ_RESIDUAL_NAMES)


@pytest.mark.parametrize("device", DEVICES)
def test_norm_proj_degenerate(gen, device):
    """Voxels whose channels are all equal (variance 0: xhat = 0, rstd = eps^-1/2) or tiny, and an
    all-zero item: finite and exact. eps = 2^-17 is exact in fp32 (a Python float reaches a
    compiled kernel as fp32)."""
    eps = 2.0**-17
    x, lnw, lnb, w, dz = _norm_proj_inputs(gen, (2, 24, 4, 5, 6), 16, torch.float64, device)
    x[0, :, 1] = 3.0
    x[0, :, 2] *= 1e-4
    x[1] = 0.0
    z = P.norm_proj_forward(x, lnw, lnb, eps, w)
    grads = P.norm_proj_backward(dz, x, lnw, lnb, eps, w)
    leaves = [t.detach().requires_grad_() for t in (x, lnw, lnb, w)]
    n = F.layer_norm(leaves[0].movedim(1, -1), (24,), leaves[1], leaves[2], eps).movedim(-1, 1)
    z_ref = _pointwise(leaves[3], n)
    want = (z_ref, *torch.autograd.grad(z_ref, leaves, dz))
    assert all(torch.isfinite(t).all() for t in (z, *grads))
    _assert_close((z, *grads), want, 1e-12, torch.float64, NORM_PROJ_NAMES)


# ----------------------------------------------------------------------------------------------
# fp32 / bf16 / fp16 inputs: fp32 accumulation


def _tolerance(dtype, device) -> float:
    """Relative error allowed against float64 on the same (rounded) inputs: the output's
    rounding and the rounding of the dot operands (bf16 / fp16: 8 / 11 significant bits; fp32
    operands run as TF32, 11 bits, on a GPU)."""
    if dtype == torch.float32:
        return 3e-3 if device == "cuda" else 1e-5
    return {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_proj_low_precision(gen, dtype, device):
    got, want = _norm_proj_check(gen, (2, 24, 9, 8, 7), 32, dtype, device)
    _assert_close(got, want, _tolerance(dtype, device), dtype, NORM_PROJ_NAMES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_proj_residual_low_precision(gen, dtype, device):
    got, want = _proj_residual_check(gen, (2, 32, 9, 8, 7), 24, 0.2, dtype, device)
    _assert_close(got, want, _tolerance(dtype, device), dtype, PROJ_RESIDUAL_NAMES)


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter: on a GPU fp32 products are TF32")
def test_autocast_and_dot_reach_the_products(gen):
    """fp32 tensors under bf16 autocast, or with ``dot=torch.bfloat16`` (how the backward, run
    outside autocast, keeps the forward's choice): bf16 operands (an error of bf16's size, not
    fp32's), fp32 results."""
    x, lnw, lnb, w, dz = _norm_proj_inputs(gen, (1, 32, 6, 7, 5), 32, torch.float32, "cpu")
    leaves = [t.double().requires_grad_() for t in (x, lnw, lnb, w)]
    z_ref = _pointwise(leaves[3], _ln(*leaves[:3]))
    dx_ref, *_ = torch.autograd.grad(z_ref, leaves, dz.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = P.norm_proj_forward(x, lnw, lnb, EPS, w)
    runs = {"plain": (P.norm_proj_forward(x, lnw, lnb, EPS, w),
                      P.norm_proj_backward(dz, x, lnw, lnb, EPS, w)[0]),
            "bf16": (auto, P.norm_proj_backward(dz, x, lnw, lnb, EPS, w, dot=torch.bfloat16)[0])}
    for name, (z, dx) in runs.items():
        assert z.dtype == dx.dtype == torch.float32
        errs = rel_err(z, z_ref), rel_err(dx, dx_ref)
        low, high = (0.0, 1e-5) if name == "plain" else (1e-4, 2e-2)
        assert all(low <= e < high for e in errs), (name, errs)


# ----------------------------------------------------------------------------------------------
# dropout masks and determinism


def test_bitwise_deterministic(gen):
    """Two runs of every kernel give the same bits (partial sums reduced in a fixed order; masks
    regenerated from the seed)."""
    shape = (2, 24, 9, 8, 7)  # 4 tiles on 3 programs
    x, lnw, lnb, w, dz = _norm_proj_inputs(gen, shape, 16, torch.float32, DEVICE)
    z, x2, w2, b2, dout = _proj_residual_inputs(gen, shape, 40, torch.float32, DEVICE)
    runs = [(P.norm_proj_forward(x, lnw, lnb, EPS, w),
             *P.norm_proj_backward(dz, x, lnw, lnb, EPS, w),
             P.proj_residual_forward(z, x2, w2, b2, 0.4, 99),
             *P.proj_residual_backward(dout, z, w2, 0.4, 99)) for _ in range(2)]  # fmt: skip
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_dropout_keeps_one_minus_p_and_seeds_differ():
    """The forward's own mask (W = 0, b = 1, x = 0: out = the mask's scale factor): the kept
    fraction is 1 - p, kept entries are 1 / (1 - p), the mask is the one the backward uses, and
    another seed or batch item draws another mask."""
    shape, p = (2, 32, 16, 16, 16), 0.3
    z, x = torch.randn(shape, device=DEVICE), torch.zeros(shape, device=DEVICE)
    w, b = torch.zeros(32, 32, device=DEVICE), torch.ones(32, device=DEVICE)
    out = P.proj_residual_forward(z, x, w, b, p, 7)
    kept = out != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01  # 262144 draws: sd 9e-4
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - p)), rtol=1e-6, atol=0)
    _, _, db = P.proj_residual_backward(torch.ones_like(x), z, w, p, 7)
    assert torch.allclose(db, out.sum((0, 2, 3, 4)), rtol=1e-6)  # db = sum of the same mask
    other = P.proj_residual_forward(z, x, w, b, p, 8)
    assert (kept != (other != 0)).double().mean().item() > 0.3  # independent: 2 p (1 - p) = 0.42
    assert (kept[0] != kept[1]).double().mean().item() > 0.3


def test_mask_helper_draws_per_mask_index():
    """Masks 0 and 1 of one call differ (the MLP branch draws two); no mask 4."""
    m0, m1 = (kernel_masks(1, 16, 1000, k, 0.5, 3, device=DEVICE) for k in (0, 1))
    assert ((m0 == 0) != (m1 == 0)).double().mean().item() > 0.3
    with pytest.raises(ValueError, match="mask index"):
        kernel_masks(1, 16, 1000, 4, 0.5, 3)


# ----------------------------------------------------------------------------------------------
# bad input, limits, workspace


def test_norm_proj_bad_input():
    x, lnw, w = torch.randn(2, 24, 3, 4), torch.ones(24), torch.randn(24, 24)
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\)"):
        P.norm_proj_forward(torch.randn(2, 24), lnw, lnw, EPS, w)
    with pytest.raises(ValueError, match=r"2-D weight \(Cout, 24\)"):
        P.norm_proj_forward(x, lnw, lnw, EPS, torch.randn(24, 16))
    with pytest.raises(ValueError, match=r"2-D weight \(Cout, 24\)"):
        P.norm_proj_forward(x, lnw, lnw, EPS, torch.randn(24, 24, 1, 1))
    with pytest.raises(ValueError, match="norm weight and bias"):
        P.norm_proj_forward(x, torch.ones(16), lnw, EPS, w)
    with pytest.raises(ValueError, match="output gradient"):
        P.norm_proj_backward(torch.randn(2, 24, 3, 5), x, lnw, lnw, EPS, w)
    with pytest.raises(TypeError, match="dtype"):
        P.norm_proj_forward(x.to(torch.int32), lnw, lnw, EPS, w)


def test_proj_residual_bad_input():
    z, x, w, b = torch.randn(2, 16, 5), torch.randn(2, 24, 5), torch.randn(24, 16), torch.ones(24)
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\)"):
        P.proj_residual_forward(torch.randn(2, 16), x, w, b, 0.0, 1)
    with pytest.raises(ValueError, match=r"2-D weight \(Cout, 16\)"):
        P.proj_residual_forward(z, x, w.t(), b, 0.0, 1)
    with pytest.raises(ValueError, match=r"expects x \(2, 24, 5\) and b \(24,\)"):
        P.proj_residual_forward(z, torch.randn(2, 16, 5), w, b, 0.0, 1)
    with pytest.raises(ValueError, match=r"expects x \(2, 24, 5\) and b \(24,\)"):
        P.proj_residual_forward(z, x, w, torch.ones(16), 0.0, 1)
    with pytest.raises(ValueError, match="dropout rate"):
        P.proj_residual_forward(z, x, w, b, 1.0, 1)
    with pytest.raises(ValueError, match="output gradient"):
        P.proj_residual_backward(torch.randn(2, 16, 5), z, w, 0.0, 1)


def test_limits():
    """Beyond the registers' weight gradient, and beyond int32 dropout offsets: clear errors."""
    assert P.supported(128, 128) and P.supported(24, 40)
    assert not P.supported(256, 128)
    x, one = torch.randn(1, 256, 2, 2), torch.ones(256)
    with pytest.raises(ValueError, match="beyond the fused kernel"):
        P.norm_proj_forward(x, one, one, EPS, torch.randn(128, 256))
    with pytest.raises(ValueError, match="beyond the fused kernel"):
        P.proj_residual_backward(torch.randn(1, 128, 2, 2), x, torch.randn(128, 256), 0.0, 1)
    big = torch.empty(1, 32, 1024, 1024, 2048, device="meta")  # 32 * 2**31 dropout offsets
    with pytest.raises(ValueError, match="int32"):
        P.proj_residual_forward(big, big, torch.empty(32, 32), torch.empty(32), 0.1, 1)


@pytest.mark.parametrize("op", ["norm_proj", "proj_residual"])
def test_workspace_bytes(op, gen, monkeypatch):
    """``*_workspace_bytes`` is what the backward's partial-sum workspace moves: written once by
    the kernel and read once by its reduction."""
    spy = LaunchCapture(getattr(P, f"_{op}_bwd_kernel"))
    monkeypatch.setattr(P, f"_{op}_bwd_kernel", spy)
    shape, cout = (2, 24, 9, 8, 7), 40
    if op == "norm_proj":
        x, lnw, lnb, w, dz = _norm_proj_inputs(gen, shape, cout, torch.float32, DEVICE)
        P.norm_proj_backward(dz, x, lnw, lnb, EPS, w)
    else:
        z, _, w, _, dout = _proj_residual_inputs(gen, shape, cout, torch.float32, DEVICE)
        P.proj_residual_backward(dout, z, w, 0.1, 5)
    ((grid, args),) = spy.calls
    ws = args[6] if op == "norm_proj" else args[4]
    assert ws.shape[0] == grid[0] > 1
    predicted = getattr(P, f"{op}_workspace_bytes")(shape, cout, torch.float32, grid[0])
    assert predicted == 2 * ws.numel() * ws.element_size()
