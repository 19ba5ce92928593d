"""The channels-first LayerNorm (fastnmf.channel_norm, kernels/channel_norm.py) against
``nn.LayerNorm`` on the channels-last view (the formulation it replaces), in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from torch import nn

from fastnmf.channel_norm import channel_layer_norm

SHAPES = [(2, 5, 3, 4, 7), (1, 32, 6, 6, 6), (3, 8, 5, 9), (2, 1, 4, 4, 4), (1, 48, 33)]


def rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    """max |a - e| / (max |e| + 1): relative, but an exact zero (dx for C = 1) against the
    reference's rounding noise is not a failure."""
    a, e = a.detach().double().cpu(), e.detach().double().cpu()
    return ((a - e).abs().max() / (e.abs().max() + 1)).item()


def _inputs(gen, shape, dtype=torch.float64):
    c = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).to(dtype)
    w = (torch.randn(c, generator=gen, dtype=torch.float64) + 1).to(dtype)
    b = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, b, dy


def _old(x, w, b, eps):
    """What models.layers.ChannelLayerNorm computed before: nn.LayerNorm on x.movedim(1, -1)."""
    norm = nn.LayerNorm(x.shape[1], eps=eps).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        norm.bias.copy_(b)
    return norm(x.movedim(1, -1)).movedim(-1, 1), norm


def _grads(fn, x, w, b, dy):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_()
    y = fn(x, w, b)
    return (y, *torch.autograd.grad(y, (x, w, b), dy))


def _old_fn(eps):
    def fn(x, w, b):
        norm = nn.LayerNorm(x.shape[1], eps=eps).to(x.dtype)
        return nn.functional.layer_norm(x.movedim(1, -1), norm.normalized_shape, w, b,
                                        eps).movedim(-1, 1)  # fmt: skip

    return fn


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_op_equals_layer_norm_float64(shape, gen):
    """The op off CUDA (PyTorch's layer norm inside, its statistics kept in (B, S) for the
    registered backward op): outputs and gradients as nn.LayerNorm's, a contiguous output."""
    x, w, b, dy = _inputs(gen, shape)
    new = _grads(lambda x, w, b: channel_layer_norm(x, w, b, 1e-5), x, w, b, dy)
    old = _grads(_old_fn(1e-5), x, w, b, dy)
    # float64 both; 1e-10 and not 1e-12: dw / db sum up to 168 voxels, and for C = 1 the exact
    # dx and dw are 0 where nn.LayerNorm's xhat carries rounding noise (seen: 1.2e-12)
    for a, e in zip(new, old, strict=True):
        assert a.shape == e.shape and a.dtype == torch.float64
        assert rel_err(a, e) < 1e-10
    assert new[0].is_contiguous()  # channels-first in, channels-first out


def test_cpu_op_gradcheck(gen):
    x, w, b, _ = _inputs(gen, (2, 4, 3, 5))
    args = [t.detach().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: channel_layer_norm(x, w, b, 1e-5), args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_triton_kernels_against_layer_norm(shape, device, gen):
    from fastnmf.kernels.channel_norm import channel_norm_backward, channel_norm_forward

    x, w, b, dy = _inputs(gen, shape)
    ref, dx_ref, dw_ref, db_ref = _grads(_old_fn(1e-5), x, w, b, dy)
    for dtype, tol_fwd, tol_bwd in ((torch.float64, 1e-12, 1e-10), (torch.float32, 1e-5, 1e-4)):
        xd, wd, bd, dyd = (t.to(device=device, dtype=dtype) for t in (x, w, b, dy))
        y, mean, rstd = channel_norm_forward(xd, wd, bd, 1e-5)
        dx, dw, db = channel_norm_backward(dyd, xd, wd, mean, rstd)
        assert y.dtype == dtype and y.shape == x.shape
        assert rel_err(y.cpu(), ref) < tol_fwd
        assert rel_err(dx.cpu(), dx_ref) < tol_bwd
        assert rel_err(dw.cpu(), dw_ref) < tol_bwd
        assert rel_err(db.cpu(), db_ref) < tol_bwd


@pytest.mark.parametrize("device", DEVICES)
def test_triton_kernel_bf16_is_one_rounding_of_the_exact_norm(device, gen):
    """bf16 in and out, fp32 inside: y is the exact norm of the bf16 inputs rounded once to bf16
    — within one bf16 ulp of it (Triton's interpreter converts to bf16 by truncation, up to one
    ulp; CUDA rounds to nearest, half an ulp), plus fp32 rounding of the terms w x̂ and b."""
    from fastnmf.kernels.channel_norm import channel_norm_forward

    x, w, b, _ = _inputs(gen, (2, 16, 4, 4, 8))
    xb, wb, bb = (t.bfloat16() for t in (x, w, b))
    exact = _old_fn(1e-5)(xb.double(), wb.double(), bb.double())
    y, _, _ = channel_norm_forward(xb.to(device), wb.to(device), bb.to(device), 1e-5)
    assert y.dtype == torch.bfloat16
    ulp = torch.ldexp(torch.ones_like(exact), torch.floor(torch.log2(exact.abs())).int() - 7)
    bias = bb.double().view(1, -1, 1, 1, 1)
    terms = (exact - bias).abs() + bias.abs()
    assert ((y.cpu().double() - exact).abs() <= ulp + 2**-20 * terms).all()


def test_block_norm_equals_the_old_formulation_and_loads_old_keys(gen):
    """models.layers.ChannelLayerNorm: the same parameters (names, shapes) as before, and the
    same output as nn.LayerNorm on the channels-last view (fp32), forward and backward."""
    from fastnmf.models.layers import ChannelLayerNorm

    x, w, b, dy = _inputs(gen, (2, 16, 8, 8, 8), torch.float32)
    new = ChannelLayerNorm(16)
    old_state = {"norm.weight": w, "norm.bias": b}  # the keys a checkpoint of the old module had
    new.load_state_dict(old_state)
    assert set(new.state_dict()) == set(old_state)
    xg = x.clone().requires_grad_()
    y = new(xg)
    (dx,) = torch.autograd.grad(y, xg, dy)
    xo = x.clone().requires_grad_()
    y_old, _ = _old(xo, w, b, 1e-5)
    (dx_old,) = torch.autograd.grad(y_old, xo, dy)
    assert rel_err(y, y_old) < 1e-5 and rel_err(dx, dx_old) < 1e-4
    assert y.is_contiguous()


def test_autocast_runs_in_float32_as_layer_norm(gen):
    x, w, b, _ = _inputs(gen, (1, 8, 4, 4, 4), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = channel_layer_norm(x.bfloat16(), w, b)
    assert y.dtype == torch.float32
    assert rel_err(y, _old_fn(1e-5)(x.bfloat16().float(), w, b)) < 1e-5


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\)"):
        channel_layer_norm(torch.zeros(2, 3), torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(4,\) for C=4"):
        channel_layer_norm(torch.zeros(1, 4, 2, 2), torch.ones(3), torch.zeros(3))


def test_compiles_without_graph_breaks(gen):
    x, w, b, _ = _inputs(gen, (1, 8, 4, 4, 4), torch.float32)
    explained = torch._dynamo.explain(channel_layer_norm)(x, w, b)
    assert explained.graph_break_count == 0


def _old_layer_norm_forward(self, x):
    """models.layers.ChannelLayerNorm.forward before issue 17 (channels moved last and back)."""
    return self.norm(x.movedim(1, -1)).movedim(-1, 1)


@pytest.mark.parametrize(
    "name, kw",
    [
        ("swin_factorizer", dict(checkpoint=False)),
        ("swin_factorizer", dict(checkpoint=True)),
        ("performer", dict(spatial_size=(16, 16, 16))),
    ],
)
def test_models_equal_the_old_formulation(name, kw, gen, monkeypatch):
    """Whole models, training step: outputs and every parameter gradient of the copy-free
    blocks (channels-first LayerNorm, decoder adapter without the concatenation) equal those of
    the old formulation (nn.LayerNorm on the channels-last view, torch.cat of skip and x) in
    fp32, and the old model's state dict loads into the new one as it is."""
    from fastnmf.models import layers

    from fastnmf import models

    # dropout 0: a dropout mask is drawn in memory order, and the old norm's output was
    # channels-last, so the two formulations would draw different masks from the same seed
    opts = dict(widths=(8, 16, 32), head_dim=4, deep_supervision=2, dropout=0.0, **kw)
    if name == "swin_factorizer":
        opts.update(window=4, kernel="torch", seed=0, spatial_size=(16, 16, 16))
    x = torch.randn(2, 4, 16, 16, 16, generator=gen)
    runs = []
    for old in (True, False):
        with monkeypatch.context() as m:
            if old:
                m.setattr(layers.ChannelLayerNorm, "forward", _old_layer_norm_forward)
                m.delattr(layers.FactorizerBlock, "forward_skip")
            torch.manual_seed(0)
            net = models.build(name, "brats", **opts).train()
            if runs:
                net.load_state_dict(runs[0][2])  # the old model's checkpoint
            outs = net(x)
            sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs).backward()
            runs.append(([o.detach() for o in outs], [p.grad for p in net.parameters()],
                         net.state_dict()))  # fmt: skip
    (o_old, g_old, s_old), (o_new, g_new, s_new) = runs
    assert list(s_old) == list(s_new)
    for a, e in zip(o_new, o_old, strict=True):
        assert rel_err(a, e) < 1e-5
    for a, e in zip(g_new, g_old, strict=True):
        assert rel_err(a, e) < 1e-4


def test_nmf_layers_get_their_input_in_the_layout_the_kernels_read(gen, monkeypatch):
    """The NMF kernels read (B, C, *S) contiguous (kernels.matricized_nmf copies anything else):
    the channels-first LayerNorm hands the in-projection a contiguous tensor and every NMF layer
    gets one; the old LayerNorm handed it a channels-last view (which cuDNN propagates through
    the pointwise conv, so the NMF input was copied; a CPU conv may or may not)."""
    from fastnmf.models import layers

    from fastnmf import models

    def contiguity():
        torch.manual_seed(0)
        net = models.build("swin_factorizer", "brats", widths=(8, 16, 32), head_dim=4, window=4,
                           kernel="torch", seed=0, spatial_size=(16, 16, 16),
                           deep_supervision=2).train()  # fmt: skip
        seen = {"in_proj": [], "nmf": []}
        for m in net.modules():
            if isinstance(m, layers.WrappedNMF):
                for name in seen:
                    getattr(m, name).register_forward_pre_hook(
                        lambda mod, a, name=name: seen[name].append(a[0].is_contiguous()))
        net(torch.randn(2, 4, 16, 16, 16, generator=gen))
        return seen

    new = contiguity()
    assert len(new["nmf"]) == 5 and all(new["nmf"]) and all(new["in_proj"])
    monkeypatch.setattr(layers.ChannelLayerNorm, "forward", _old_layer_norm_forward)
    assert not any(contiguity()["in_proj"])


def test_step_account_counts_the_op_as_its_kernels_move_bytes():
    """The training-step account (fake tensors) counts the channels-first LayerNorm as one norm
    op each way: forward reads x, w, b and writes y, mean, rstd; backward reads dy, x, w, mean,
    rstd and writes dx, dw, db, plus the partial sums of dw / db; no layout copy."""
    from fastnmf.kernels.channel_norm import backward_workspace_bytes
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastnmf.profile.static.step_device import h200
    from fastnmf.profile.static.step_ops import StepCounter

    b, c, s = 2, 32, (8, 8, 12)
    vox = 8 * 8 * 12
    counter = StepCounter(h200())
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(b, c, *s, requires_grad=True)
        w = torch.empty(c, requires_grad=True)
        bias = torch.empty(c, requires_grad=True)
        with counter:
            y = channel_layer_norm(x, w, bias)
            y.backward(torch.empty_like(y))
    n = counter.by_class["norm"]
    big, stat, vec = 4 * b * c * vox, 4 * b * vox, 4 * c
    extra = backward_workspace_bytes((b, c, *s), torch.float32)
    assert n["ops"] == 3  # forward, backward, the backward's partial-sum reduction
    assert n["bytes_read"] == (big + 2 * vec) + (2 * big + vec + 2 * stat) + extra // 2
    assert n["bytes_written"] == (big + 2 * stat) + (big + 2 * vec) + extra // 2
    assert counter.by_class["layout"]["bytes_read"] == 0
