"""The fused MLP branch (kernels/mlp_branch.py, fastnmf::mlp_branch, models/fused.py) under the
Triton interpreter: against PyTorch in float64 (forward and every gradient, with and without
dropout: the kernels' own masks read back by a test kernel), gradcheck of the registered op,
the Factorizer block taking it on a "GPU" and matching the lean branch, bf16 autocast,
determinism, errors."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from _glue_masks import kernel_masks
from fastnmf.kernels import mlp_branch as M
from fastnmf.models import fused, layers
from fastnmf.models.layers import FactorizerBlock

from fastnmf.glue_ops import fused_mlp_branch

EPS = 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter without a GPU
# fused vs lean in fp32: equal up to rounding on the CPU; on a GPU both run TF32 products (tl.dot,
# cuDNN) rounded differently
FP32_TOL = dict(rtol=1e-5, atol=1e-5) if DEVICE == "cpu" else dict(rtol=2e-2, atol=2e-2)


def _params(c, h, dtype, gen):
    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    return [t.to(DEVICE) for t in (r(c, scale=0.3, shift=1.0), r(c, scale=0.1),
            r(h, c, scale=c**-0.5), r(h, scale=0.1), r(c, h, scale=h**-0.5), r(c, scale=0.1))]


def _reference(x, lnw, lnb, w1, b1, w2, b2, p, seed):
    """The branch in PyTorch, dropout with the kernels' masks."""
    b, c, h = x.shape[0], x.shape[1], w1.shape[0]
    xs = x.reshape(b, c, -1)  # (B, C, S)
    s = xs.shape[2]
    n = F.layer_norm(xs.transpose(1, 2), (c,), lnw, lnb, EPS).transpose(1, 2)
    g = F.gelu(torch.einsum("hc,bcs->bhs", w1, n) + b1[:, None])
    if p > 0:
        g = g * kernel_masks(b, h, s, 0, p, seed, device=x.device).to(x.dtype)
    o = torch.einsum("ch,bhs->bcs", w2, g) + b2[:, None]
    if p > 0:
        o = o * kernel_masks(b, c, s, 1, p, seed, device=x.device).to(x.dtype)
    return (xs + o).reshape(x.shape)


CASES = [  # (B, C, H, spatial, p)
    (2, 16, 32, (5, 6, 7), 0.0),
    (2, 24, 48, (3, 9, 5), 0.3),
    (1, 32, 64, (4, 7), 0.1),
]


@pytest.mark.parametrize("b,c,h,spatial,p", CASES)
def test_float64_against_pytorch(b, c, h, spatial, p, gen):
    x = torch.randn(b, c, *spatial, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    params = [t.requires_grad_() for t in _params(c, h, torch.float64, gen)]
    seed = int(torch.randint(0, 2**30, (), generator=gen))
    ref = _reference(x, *params, p, seed)
    y = M.mlp_forward(x.detach(), *(t.detach() for t in params[:2]), EPS,
                      *(t.detach() for t in params[2:]), p, seed)  # fmt: skip
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    dy = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    want = torch.autograd.grad(ref, [x, *params], dy)
    lnw, lnb, w1, b1, w2, _ = (t.detach() for t in params)
    got = M.mlp_backward(dy, x.detach(), lnw, lnb, EPS, w1, b1, w2, p, seed)
    names = ["dx", "dlnw", "dlnb", "dw1", "db1", "dw2", "db2"]
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-11, msg=name)


def test_op_gradcheck(gen):
    """The registered op's autograd (fastnmf::mlp_branch + its backward op) in float64."""
    b, c, h, p = 1, 16, 32, 0.2
    x = torch.randn(b, c, 3, 5, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    params = [t.requires_grad_() for t in _params(c, h, torch.float64, gen)]
    lnw, lnb, w1, b1, w2, b2 = params
    with mock.patch("fastnmf.kernels._glue.dropout_seed", lambda: 77):
        def f(*a):
            return fused_mlp_branch(a[0], a[1], a[2], EPS, *a[3:], p)

        assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, fast_mode=True)


def _block(c, dropout, gen):
    torch.manual_seed(int(torch.randint(0, 2**30, (), generator=gen)))
    block = FactorizerBlock(c, c, mixer=torch.nn.Identity(), spatial_dims=3, mlp_ratio=2.0,
                            dropout=dropout)  # fmt: skip
    for prm in block.parameters():  # away from the initial ones (LN weight 1, bias 0)
        prm.data += 0.05 * torch.randn(prm.shape, generator=gen)
    return block.to(DEVICE).train()


def test_block_takes_fused_branch_and_matches_lean(gen):
    """On a "GPU" (patched) the block's MLP branch is the fused op, equal to the lean branch
    (dropout 0) in output and every gradient."""
    block = _block(16, 0.0, gen)
    x = torch.randn(2, 16, 4, 5, 6, generator=gen).to(DEVICE).requires_grad_()
    dy = torch.randn(x.shape, generator=gen).to(DEVICE)

    def run(on_gpu):
        with mock.patch.object(fused, "_on_gpu", lambda t: on_gpu), \
                mock.patch.object(layers, "fused_mlp", wraps=fused.fused_mlp) as spy:  # fmt: skip
            y = block._mlp(x)
        grads = torch.autograd.grad(y, [x, *block.parameters()], dy, allow_unused=True)
        return y, grads, spy.call_count

    y_fused, g_fused, calls = run(True)
    y_lean, g_lean, lean_calls = run(False)
    assert (calls, lean_calls) == (1, 0)
    torch.testing.assert_close(y_fused, y_lean, **FP32_TOL)
    for a, b in zip(g_fused, g_lean, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=10 * FP32_TOL["rtol"], atol=FP32_TOL["atol"])


def test_block_context_branch_fused_matches_lean(gen):
    """On a "GPU" (patched) a block with a wrapped NMF mixer runs LN1 + in_proj and out_proj +
    dropout + residual as fused ops around the NMF layer, and a decoder block its skip adapter
    as one; equal to the lean branches (dropout 0), whole model, output and every gradient."""
    from fastnmf import models

    torch.manual_seed(int(torch.randint(0, 2**30, (), generator=gen)))
    net = models.build("swin_factorizer", "brats", spatial_size=(16,) * 3, widths=(16, 32),
                       head_dim=8, window=4, dropout=0.0, kernel="torch", deep_supervision=1)
    net.to(DEVICE).train()
    x = torch.randn(1, 4, 16, 16, 16, generator=gen).to(DEVICE)
    spies = {}

    def run(on_gpu):
        with mock.patch.object(fused, "_on_gpu", lambda t: on_gpu), \
                mock.patch.object(layers, "fused_context", wraps=fused.fused_context) as spy, \
                mock.patch.object(layers, "fused_adapter", wraps=fused.fused_adapter) as ad:
            out = net(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            grads = torch.autograd.grad(out.square().sum(), list(net.parameters()),
                                        allow_unused=True)  # fmt: skip
        spies[on_gpu] = spy.call_count, ad.call_count
        return out, grads

    (y1, g1), (y0, g0) = run(True), run(False)
    blocks = [m for m in net.modules() if isinstance(m, FactorizerBlock)]
    decoders = sum(not isinstance(m.adapter, torch.nn.Identity) for m in blocks)
    assert decoders > 0
    assert spies == {True: (len(blocks), decoders), False: (0, 0)}
    torch.testing.assert_close(y1, y0, rtol=10 * FP32_TOL["rtol"], atol=FP32_TOL["atol"])
    for (name, _), a, b in zip(net.named_parameters(), g1, g0, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=100 * FP32_TOL["rtol"], atol=FP32_TOL["atol"],
                                       msg=name)  # fmt: skip


def test_norm_proj_backward_adds_the_residual_gradient(gen):
    """norm_proj's backward with ``dres``: dx is the plain backward's dx + dres (float64), the
    other gradients unchanged."""
    from fastnmf.kernels import proj_glue

    b, c = 2, 24
    x = torch.randn(b, c, 5, 3, 7, generator=gen, dtype=torch.float64).to(DEVICE)
    lnw, lnb, w = (t.to(torch.float64) for t in _params(c, c, torch.float32, gen)[:3])
    dz, dres = (torch.randn(x.shape, generator=gen, dtype=torch.float64).to(DEVICE)
                for _ in range(2))  # fmt: skip
    plain = proj_glue.norm_proj_backward(dz, x, lnw, lnb, EPS, w)
    folded = proj_glue.norm_proj_backward(dz, x, lnw, lnb, EPS, w, dres=dres)
    torch.testing.assert_close(folded[0], plain[0] + dres, rtol=0, atol=1e-13)
    for a, b_ in zip(folded[1:], plain[1:], strict=True):
        assert torch.equal(a, b_)
    with pytest.raises(ValueError, match="dres"):
        proj_glue.norm_proj_backward(dz, x, lnw, lnb, EPS, w, dres=dres[:, :8])


def test_context_branch_against_pytorch(gen):
    """fused_context_branch (norm_proj, a differentiable middle, proj_residual with dropout; the
    residual's gradient folded into norm_proj's backward) against the same function in PyTorch
    with the kernels' own mask, float64, output and every gradient."""
    from fastnmf.glue_ops import fused_context_branch

    b, c, p, seed = 2, 16, 0.25, 11
    x = torch.randn(b, c, 3, 5, 4, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    lnw, lnb, w_in, _, _, b_out = (t.to(torch.float64).requires_grad_()
                                   for t in _params(c, c, torch.float32, gen))  # fmt: skip
    w_out = (torch.randn(c, c, generator=gen, dtype=torch.float64) / 4).to(DEVICE)
    w_out.requires_grad_()
    leaves = [x, lnw, lnb, w_in, w_out, b_out]
    with mock.patch("fastnmf.kernels._glue.dropout_seed", lambda: seed):
        got = fused_context_branch(x, lnw, lnb, EPS, w_in, torch.tanh, w_out, b_out, p)
    xs = x.reshape(b, c, -1)  # (B, C, S)
    n = F.layer_norm(xs.transpose(1, 2), (c,), lnw, lnb, EPS).transpose(1, 2)
    m = torch.tanh(torch.einsum("oc,bcs->bos", w_in, n))
    mask = kernel_masks(b, c, xs.shape[2], 0, p, seed, device=x.device).to(x.dtype)
    want = (xs + mask * (torch.einsum("oc,bcs->bos", w_out, m) + b_out[:, None])).view(x.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    names = ["dx", "dlnw", "dlnb", "dw_in", "dw_out", "db_out"]
    grads = zip(names, torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy),
                strict=True)  # fmt: skip
    for name, g, w in grads:
        torch.testing.assert_close(g, w, rtol=0, atol=1e-11, msg=name)


def test_block_dropout_draws_fresh_masks_and_eval_skips(gen):
    block = _block(16, 0.25, gen)
    x = torch.randn(1, 16, 8, 8, 8, generator=gen).to(DEVICE)
    with mock.patch.object(fused, "_on_gpu", lambda t: True), torch.enable_grad():
        y1, y2 = block._mlp(x), block._mlp(x)
        assert not torch.equal(y1, y2)  # a new seed per call
        block.eval()
        assert not fused.fused_mlp_ok(x, block.mlp)


def _rel_err(a, truth):
    return ((a.double() - truth).norm() / truth.norm()).item()


def test_bf16_as_accurate_as_pytorch_autocast(gen):
    """bf16 products (autocast, or bf16 input): within 2x the error of PyTorch's own bf16
    autocast of the same branch, both against float64."""
    b, c, h = 2, 32, 64
    x = torch.randn(b, c, 6, 7, 5, generator=gen).to(DEVICE)
    params = _params(c, h, torch.float32, gen)
    truth = _reference(x.double(), *(t.double() for t in params), 0.0, 0)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = fused_mlp_branch(x, params[0], params[1], EPS, *params[2:], 0.0)
        torch_bf16 = _reference(x, *params, 0.0, 0)
    assert got.dtype == torch.float32
    yardstick = _rel_err(torch_bf16, truth)
    assert 1e-4 < yardstick < 2e-2  # the products did run in bf16
    assert _rel_err(got, truth) < 2 * yardstick
    got_bf16 = fused_mlp_branch(x.to(torch.bfloat16), params[0], params[1], EPS, *params[2:], 0.0)
    assert got_bf16.dtype == torch.bfloat16
    assert _rel_err(got_bf16, truth) < 2 * yardstick + 2**-8  # + bf16 rounding of x and y


def test_backward_bitwise_deterministic(gen):
    b, c, h, p = 2, 16, 32, 0.1
    x = torch.randn(b, c, 9, 11, generator=gen).to(DEVICE)
    lnw, lnb, w1, b1, w2, _ = _params(c, h, torch.float32, gen)
    dy = torch.randn(x.shape, generator=gen).to(DEVICE)
    runs = [M.mlp_backward(dy, x, lnw, lnb, EPS, w1, b1, w2, p, 5) for _ in range(2)]
    for a, b_ in zip(*runs, strict=True):
        assert torch.equal(a, b_)


def test_sm80_takes_the_fused_mlp_at_c32_only(gen):
    """Before Hopper the MLP backward spills at C = 64 (the static suite): the block falls back
    to the lean branch there, keeps the fused one at C = 32."""
    assert M.supported(64, 128) and not M.supported(64, 128, 80) and M.supported(32, 64, 80)
    for c, want in ((16, True), (64, False)):
        block = _block(c, 0.0, gen)
        x = torch.randn(1, c, 4, 4, 4, generator=gen).to(DEVICE).requires_grad_()
        with mock.patch.object(fused, "_on_gpu", lambda t: True), \
                mock.patch.object(fused, "_capability", lambda t: 80):  # fmt: skip
            assert fused.fused_mlp_ok(x, block.mlp) is want


def test_errors():
    x = torch.randn(1, 16, 4, 4)
    lnw, lnb = torch.ones(16), torch.zeros(16)
    w1, b1, w2 = torch.randn(32, 16), torch.zeros(32), torch.randn(16, 32)
    with pytest.raises(ValueError, match="W2"):
        M.mlp_forward(x, lnw, lnb, EPS, w1, b1, w2.T, torch.zeros(16), 0.0, 0)
    with pytest.raises(ValueError, match="beyond the fused kernel"):
        big, c, h = torch.randn(1, 128, 2, 2), 128, 256
        M.mlp_forward(big, torch.ones(c), torch.zeros(c), EPS, torch.randn(h, c), torch.zeros(h),
                      torch.randn(c, h), torch.zeros(c), 0.0, 0)  # fmt: skip
    with pytest.raises(ValueError, match="spatial"):
        M.mlp_forward(x[0, 0], lnw, lnb, EPS, w1, b1, w2, torch.zeros(16), 0.0, 0)
    with mock.patch("fastnmf.kernels._common.INTERPRET", False), \
            pytest.raises(RuntimeError, match="needs a CUDA tensor"):  # fmt: skip
        fused_mlp_branch(x, lnw, lnb, EPS, w1, b1, w2, torch.zeros(16), 0.0)  # a CPU tensor
