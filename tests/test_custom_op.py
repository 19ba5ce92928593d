"""The registered op ``torch.ops.fastnmf.matricized_nmf``: schema / fake / autograd (opcheck),
the same results as the eager path, torch.compile without graph breaks, torch.export, bf16."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from fastnmf import MatricizedNMF, custom_op, matricized_nmf, models

OP = torch.ops.fastnmf.matricized_nmf.default
# the Triton kernels run on CUDA tensors where there is a GPU, else under the interpreter on CPU
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_for(kernel: str) -> str:
    if kernel == "triton":
        pytest.importorskip("triton")
        return TRITON_DEVICE
    return "cpu"


def tiny_model(kernel="torch", dropout=0.0):
    """The smallest registry config the tests use (swin, brats preset, 16^3)."""
    return models.build(
        "swin_factorizer", preset="brats", widths=(8, 16, 32), head_dim=4, window=2,
        shifts="default", deep_supervision=2, dropout=dropout, spatial_size=(16, 16, 16),
        kernel=kernel, seed=3,
    )  # fmt: skip


def twin(kernel="torch"):
    """Two models with the same weights."""
    a, b = tiny_model(kernel), tiny_model(kernel)
    b.load_state_dict(a.state_dict())
    return a, b


def scalar_loss(out):
    outs = out if isinstance(out, (list, tuple)) else [out]
    return sum((o.float() ** 2).mean() for o in outs)


def first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def test_shift_encoding_round_trip():
    assert custom_op.encode_shifts(None, 3) == []
    assert custom_op.decode_shifts([], 3) is None
    flat = custom_op.encode_shifts([None, (2, 2, 2), (1, 2, 3)], 3)
    assert flat == [0, 0, 0, 2, 2, 2, 1, 2, 3]
    assert custom_op.decode_shifts(flat, 3) == [(0, 0, 0), (2, 2, 2), (1, 2, 3)]
    with pytest.raises(ValueError, match="not a multiple of ndim=3"):
        custom_op.decode_shifts([1, 2], 3)


CASES = {
    "swin": dict(head_dim=4, patch=[4, 4, 4], shifts=[0, 0, 0, 2, 2, 2], rank=1),
    "global": dict(head_dim=4, patch=[], shifts=[], rank=1),
    "rank2_2d": dict(head_dim=4, patch=[4, 4], shifts=[0, 0, 1, 2], rank=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case, gen):
    """Schema, fake implementation, autograd registration and AOT dispatch of the op."""
    c = CASES[case]
    spatial = (8, 8) if len(c["patch"]) == 2 else (8, 8, 8)
    x = torch.randn(2, 8, *spatial, generator=gen, dtype=torch.float64, requires_grad=True)
    n = 16 if len(c["patch"]) == 2 else (64 if c["patch"] else 512)
    v0 = torch.rand(n, c["rank"], generator=gen, dtype=torch.float64)
    args = (x, v0, None, c["head_dim"], c["patch"], c["shifts"], 3, "hals", "torch", None, None)
    torch.library.opcheck(OP, args)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_op_matches_direct_path_bitwise(kernel, gen):
    """Routed through the op (forced) or not: the same forward and gradient, bit for bit."""
    dev = device_for(kernel)
    layer = MatricizedNMF(head_dim=4, window=4, shifts="default", kernel=kernel, seed=5).to(dev)
    x = torch.randn(1, 4, 8, 8, 4, generator=gen).to(dev)
    dy = torch.randn(x.shape, generator=gen).to(dev)
    outs = []
    for force in (False, True):
        xr = x.clone().requires_grad_(True)
        with custom_op.forced(force):
            y = layer(xr)
        y.backward(dy)
        outs.append((y.detach(), xr.grad))
        assert ("fastnmf_matricized_nmf" in type(y.grad_fn).__name__) == force
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    assert outs[0][1].abs().sum() > 0


@pytest.mark.parametrize("design, shifts", [(1, [None, 2]), (1, None), (2, [None, 2]), (2, None),
                                            (3, [None, 2]), (3, None), (3, [None, 1, 2])])
def test_triton_window_op_saves_iterates_bitwise(shifts, design, gen, monkeypatch):
    """Triton, windows, values unchecked (a GPU's default): fastnmf::window_nmf_triton runs the
    forward and backward kernels of the design the eager path picks (no recomputation); compiled
    (fullgraph, aot_eager) and forced eager calls equal the direct path bit for bit."""
    wn = importlib.import_module("fastnmf.kernels.window_nmf")
    monkeypatch.setitem(wn.TUNING, "design", design)
    dev = device_for("triton")
    torch._dynamo.reset()
    x = torch.randn(1, 4, 8, 8, 4, generator=gen).to(dev)  # small: the interpreter is slow
    v0 = torch.rand(64, 1, generator=gen).to(dev)
    dy = torch.randn(x.shape, generator=gen).to(dev)

    def layer(t):
        return matricized_nmf(t, v0, head_dim=4, window=4, shifts=shifts, kernel="triton",
                              check=False)  # fmt: skip

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    outs = []
    for mode in ("direct", "forced", "compiled"):
        xr = x.clone().requires_grad_(True)
        with custom_op.forced(mode == "forced"):
            y = compiled(xr) if mode == "compiled" else layer(xr)
        if mode == "forced":
            assert "window_nmf_triton" in type(y.grad_fn).__name__
        y.backward(dy)
        outs.append((y.detach(), xr.grad))
    for y, dx in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(dx, outs[0][1])
    g0 = v0[:, 0].double()
    args = (x.double().requires_grad_(True), g0, torch.ones(4, dtype=torch.float64, device=dev), 4,
            [4, 4, 4], custom_op.encode_shifts(shifts, 3), 3, False, design)  # fmt: skip
    torch.library.opcheck(torch.ops.fastnmf.window_nmf_triton.default, args)


def test_op_learns_v0_like_the_direct_path(gen):
    """kernel='torch' differentiates v0: the op's backward returns the same dv0."""
    x = torch.randn(1, 8, 8, 8, generator=gen)
    v0 = torch.rand(16, 1, generator=gen)
    grads = []
    for force in (False, True):
        v = v0.clone().requires_grad_(True)
        with custom_op.forced(force):
            y = matricized_nmf(x, v, head_dim=4, window=4, shifts=[None, 2], kernel="torch")
        (y**2).sum().backward()
        grads.append(v.grad)
    assert grads[1] is not None and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_layer_compiles_without_graph_breaks(kernel, gen):
    """One MatricizedNMF layer (8 x 8 x 4, window 4, two shifts): zero graph breaks, the op in the
    graph, compiled (aot_eager: the captured forward and backward graphs) equal to eager."""
    dev = device_for(kernel)
    torch._dynamo.reset()
    layer = MatricizedNMF(head_dim=4, window=4, shifts="default", kernel=kernel, seed=7).to(dev)
    x = torch.randn(1, 4, 8, 8, 4, generator=gen).to(dev)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    targets = [str(n.target) for n in explained.graphs[0].graph.nodes]
    assert "fastnmf.matricized_nmf.default" in targets
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ye, yc = layer(xe), compiled(xc)
    (ye**2).sum().backward()
    (yc**2).sum().backward()
    torch.testing.assert_close(yc, ye, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-7)


def test_model_zero_graph_breaks_and_compiled_equals_eager(gen):
    """The whole tiny Swin Factorizer, kernel='torch': one graph (fullgraph), and the compiled
    training step's output and parameter gradients equal eager's."""
    torch._dynamo.reset()
    eager, other = twin("torch")
    x = torch.randn(1, 4, 16, 16, 16, generator=gen)
    explained = torch._dynamo.explain(eager)(x)
    assert explained.graph_break_count == 0
    targets = [str(n.target) for n in explained.graphs[0].graph.nodes]
    nmf_calls = [t for t in targets if "fastnmf.matricized_nmf" in t]
    assert len(nmf_calls) == len(models.nmf_layers(eager))
    norms = [t for t in targets if "fastnmf.channel_layer_norm" in t]  # two per block
    assert len(norms) == 2 * len(models.nmf_layers(eager))
    compiled = torch.compile(other, backend="aot_eager", fullgraph=True)
    ye, yc = eager(x), compiled(x)
    scalar_loss(ye).backward()
    scalar_loss(yc).backward()
    torch.testing.assert_close(first(yc), first(ye), rtol=1e-5, atol=1e-6)
    for (name, pe), pc in zip(eager.named_parameters(), other.parameters(), strict=True):
        assert pe.grad is not None, name
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_inductor_compiles_the_glue(gen):
    """Inductor on conv -> NMF (torch) -> conv -> GELU -> NMF (triton, where it runs) -> conv:
    compiled equals eager, forward and parameter gradients. On a CPU the Triton op runs under the
    interpreter inside the Inductor-compiled graph (one compile covers both kernels)."""
    torch._dynamo.reset()
    have_triton = importlib.util.find_spec("triton") is not None
    dev = TRITON_DEVICE if have_triton else "cpu"
    second = "triton" if have_triton else "torch"
    block = torch.nn.Sequential(
        torch.nn.Conv3d(4, 4, 1, bias=False),
        MatricizedNMF(head_dim=4, window=4, shifts="default", kernel="torch", seed=2),
        torch.nn.Conv3d(4, 4, 1),
        torch.nn.GELU(),
        MatricizedNMF(head_dim=4, window=2, shifts=[None, 1], kernel=second, seed=3),
        torch.nn.Conv3d(4, 4, 1),
    ).to(dev)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(1, 4, 8, 8, 4, generator=gen).to(dev)  # 8 x 8 x 4: 32 windows of 2^3
    ye = block(x)
    grads_e = torch.autograd.grad(scalar_loss(ye), list(block.parameters()))
    yc = compiled(x)
    grads_c = torch.autograd.grad(scalar_loss(yc), list(block.parameters()))
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)


def test_export_round_trip(tmp_path, gen):
    """torch.export of an eval model holds the op; saved, loaded, it gives eager's output."""
    model = tiny_model("torch").eval()
    x = torch.randn(1, 4, 16, 16, 16, generator=gen)
    with torch.no_grad():
        expected = first(model(x))
    program = torch.export.export(model, (x,))
    assert any("fastnmf.matricized_nmf" in str(n.target) for n in program.graph.nodes)
    path = tmp_path / "factorizer.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        got = first(loaded.module()(x))
        fresh = first(loaded.module()(2 * x))
        ref2 = first(model(2 * x))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fresh, ref2, rtol=1e-6, atol=1e-7)


def test_bf16_autocast_training_step(gen):
    """bf16 autocast on the torch path: the NMF layers receive bf16 (no autocast rule on the
    op: it takes its producer's dtype and accumulates in fp32 inside), a step's loss is finite,
    and its gradients are within bf16 tolerance of fp32's."""
    fp32, bf16 = twin("torch")
    x = torch.randn(1, 4, 16, 16, 16, generator=gen)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: seen.append(a[0].dtype))
             for m in models.nmf_layers(bf16)]  # fmt: skip
    scalar_loss(fp32(x)).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bf16(x)
        loss = scalar_loss(out)
    loss.backward()
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert torch.isfinite(loss)
    flat32 = torch.cat([p.grad.flatten() for p in fp32.parameters()])
    flat16 = torch.cat([p.grad.flatten() for p in bf16.parameters()])
    assert flat16.dtype == torch.float32 and torch.isfinite(flat16).all()
    # bf16 keeps 8 bits: relative error 2^-8 per rounding; a few dozen layers deep, the
    # gradient as a whole stays within a few percent (cosine and norm)
    cos = torch.nn.functional.cosine_similarity(flat16, flat32, dim=0)
    assert cos > 0.99, cos
    assert abs(flat16.norm() / flat32.norm() - 1) < 0.05


def test_bf16_autocast_compiled_step(gen):
    """The same bf16 step through torch.compile: the op keeps bf16 in the graph, no break."""
    torch._dynamo.reset()
    eager, other = twin("torch")
    x = torch.randn(1, 4, 16, 16, 16, generator=gen)
    compiled = torch.compile(other, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ye, yc = eager(x), compiled(x)
        le, lc = scalar_loss(ye), scalar_loss(yc)
    le.backward()
    lc.backward()
    assert first(yc).dtype == first(ye).dtype
    torch.testing.assert_close(lc, le, rtol=2e-2, atol=1e-4)
    flat_e = torch.cat([p.grad.flatten() for p in eager.parameters()])
    flat_c = torch.cat([p.grad.flatten() for p in other.parameters()])
    assert torch.nn.functional.cosine_similarity(flat_c, flat_e, dim=0) > 0.99


def test_bf16_autocast_triton_layer(gen):
    """Under bf16 autocast the Triton op receives the bf16 output of the autocast conv, returns
    bf16 and stays within bf16 rounding of the fp32 layer (fp32 accumulation inside)."""
    dev = device_for("triton")
    torch._dynamo.reset()
    block = torch.nn.Sequential(
        torch.nn.Conv3d(4, 4, 1, bias=False),
        MatricizedNMF(head_dim=4, window=4, shifts="default", kernel="triton", seed=4),
    ).to(dev)
    x = torch.randn(1, 4, 8, 8, 4, generator=gen).to(dev)
    y32 = block(x)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    with torch.autocast(dev, dtype=torch.bfloat16):
        y16 = compiled(x)
    assert y16.dtype == torch.bfloat16
    # fp32 layer on the bf16 conv output (bf16 x and weight, fp32 sum, rounded to bf16): what is
    # left is the output's bf16 rounding (2^-8 relative) and the conv's summation order
    conv, layer = block[0], block[1]
    z = torch.nn.functional.conv3d(x.bfloat16().float(), conv.weight.bfloat16().float())
    ref = layer(z.bfloat16().float()).detach()
    scale = float(ref.abs().max())
    torch.testing.assert_close(y16.float(), ref, rtol=8e-3, atol=4e-3 * scale)
    assert float((y16.float() - y32).abs().max()) < 3e-2 * scale  # and near the fp32 layer


def test_maybe_compile():
    model = tiny_model("torch")
    assert custom_op.maybe_compile(model, enabled=False) is model
    wrapped = custom_op.maybe_compile(model, enabled=True, backend="eager")
    assert wrapped is not model and wrapped._orig_mod is model
    with pytest.raises(TypeError, match="enabled must be a bool"):
        custom_op.maybe_compile(model, enabled="yes")
