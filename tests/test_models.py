"""Factorizer models, baselines, registry, inference-time controls and NMF components."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import rel_err

from fastnmf import models, reference

# A tiny Factorizer: 3 levels (2 downsamplings), E = 4, window 2 -> sizes must be multiples of 8.
TINY = {
    "widths": (8, 16, 32),
    "head_dim": 4,
    "window": 2,
    "shifts": "default",
    "deep_supervision": 2,
    "dropout": 0.0,
    "mlp_ratio": 2.0,
}


def tiny(name="swin_factorizer", preset="brats", spatial=(16, 16, 16), **kw):
    """A small model (fresh random weights); TINY's settings ``name`` does not take left out."""
    accepted = inspect.signature(models.MODELS[name]).parameters
    opts = {k: v for k, v in TINY.items() if k in accepted}
    return models.build(name, preset=preset, **{**opts, "spatial_size": spatial, **kw})


def rand_input(model, gen, batch=1, dtype=torch.float32):
    return torch.randn(batch, model.in_channels, *model.spatial_size, generator=gen, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Shapes, deep supervision, 2D / 3D


def test_training_returns_deep_supervision_list_and_eval_the_full_resolution(gen):
    net = tiny(kernel="torch")
    x = rand_input(net, gen, batch=2)
    net.train()
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0].shape == (2, 3, 16, 16, 16)
    assert outs[1].shape == (2, 3, 8, 8, 8)
    net.eval()
    y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 16, 16, 16)
    # dropout 0: the eval output is the training list's full-resolution head
    assert rel_err(y, outs[0]) < 1e-6


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_checkpointed_blocks_give_the_same_step_with_less_memory(gen):
    """checkpoint=True: same outputs and gradients (dropout masks replayed), fewer bytes kept."""
    x = rand_input(tiny(kernel="torch", seed=0), gen, batch=2)
    runs = []
    for ckpt in (False, True):
        net = tiny(kernel="torch", seed=0, dropout=0.1, checkpoint=ckpt)
        net.load_state_dict(runs[0][2] if runs else net.state_dict())
        net.train()
        torch.manual_seed(123)  # the same dropout masks in both runs
        outs, kept = _saved_bytes(lambda net=net: net(x))
        sum(o.square().mean() for o in outs).backward()
        grads = [p.grad.clone() for p in net.parameters()]
        runs.append((outs[0].detach(), grads, net.state_dict(), kept))
    (y0, g0, _, kept0), (y1, g1, _, kept1) = runs
    assert torch.equal(y0, y1)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g0, g1, strict=True))
    assert kept1 < 0.5 * kept0, (kept0, kept1)


@pytest.mark.parametrize("variant", ["global", "local", "swin"])
@pytest.mark.parametrize("spatial", [(16, 24), (8, 16, 16)])
def test_variants_2d_and_3d(variant, spatial, gen):
    net = tiny(f"{variant}_factorizer", preset="isles", spatial=spatial, kernel="torch")
    net.eval()
    x = rand_input(net, gen)
    y = net(x)
    assert y.shape == (1, 1, *spatial)
    assert torch.isfinite(y).all()
    nmfs = models.nmf_layers(net)
    assert len(nmfs) == 5  # 3 encoder + 2 decoder blocks
    for lvl, layer in zip([0, 1, 2, 1, 0], nmfs, strict=True):
        stage = [s // 2**lvl for s in spatial]
        expected_n = math.prod(stage) if variant == "global" else 2 ** len(spatial)
        assert layer.v0.shape == (expected_n, 1)
        assert layer.window == (None if variant == "global" else 2)
        assert (layer.shifts is not None) == (variant == "swin")


def test_position_embedding_sits_in_the_bridge(gen):
    net = tiny(kernel="torch").eval()
    assert net.pos_embed.pos.shape == (1, 32, 4, 4, 4)
    x = rand_input(net, gen)
    y0 = net(x)
    with torch.no_grad():
        net.pos_embed.pos.add_(1.0)
    assert rel_err(net(x), y0) > 1e-3
    assert tiny("nnunet", spatial=(16, 16)).pos_embed is None


# ---------------------------------------------------------------------------------------------
# Parameter counts (no forward, full size)


@pytest.mark.parametrize(
    "name, preset, paper",
    [
        ("swin_factorizer", "brats", 5.856e6),
        ("swin_factorizer", "isles", 7.372e6),
        ("nnunet", "brats", 28.7e6),
        ("resunet", "brats", 28.9e6),
        ("performer", "brats", 6.7e6),
    ],
)
def test_parameter_counts_match_the_paper(name, preset, paper):
    n = models.count_parameters(models.build(name, preset=preset))
    assert abs(n - paper) / paper < 5e-3, n


def test_exact_factorizer_parameter_counts():
    # 6 C^2 + 8 C per block (2 LayerNorms, C x C in/out projections, MLP ratio 2), convs, heads,
    # the 512 x 8^3 position embedding: worked out by hand in the report; the four stride-2
    # downsampling convs carry a bias as in the original code: 64 + 128 + 256 + 512 = 960.
    brats = models.build("swin_factorizer", preset="brats")
    assert sum(m.bias.numel() for m in brats.down) == 960
    assert models.count_parameters(brats) == 5_855_241 + 960
    assert models.count_parameters(models.build("swin_factorizer", preset="isles")) == (
        7_371_523 + 960
    )
    # the variant changes no parameter
    for v in ("global", "local"):
        assert models.count_parameters(models.build(f"{v}_factorizer")) == 5_855_241 + 960


# ---------------------------------------------------------------------------------------------
# Kernel equivalence


def _grads(net, x):
    net.zero_grad()
    x = x.clone().requires_grad_(True)
    y = net(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    (y * w).sum().backward()
    # eval mode: the lower-resolution deep supervision heads get no gradient
    grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    assert len(grads) == len(list(net.parameters())) - 2  # one head (weight, bias) unused
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("variant", ["global", "swin"])
def test_kernel_switch_reference_vs_torch(variant, gen):
    net = tiny(f"{variant}_factorizer", kernel="reference", spatial=(8, 16, 8)).double().eval()
    x = rand_input(net, gen, dtype=torch.float64)
    y_ref, gx_ref, gp_ref = _grads(net, x)
    models.set_kernel(net, "torch")
    assert {layer.kernel for layer in models.nmf_layers(net)} == {"torch"}
    y, gx, gp = _grads(net, x)
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(gx, gx_ref) < 1e-8
    for a, b in zip(gp, gp_ref, strict=True):
        assert rel_err(a, b) < 1e-8


def test_kernel_switch_float32(gen):
    net = tiny(kernel="reference").eval()
    x = rand_input(net, gen)
    y_ref, gx_ref, _ = _grads(net, x)
    models.set_kernel(net, "torch")
    y, gx, _ = _grads(net, x)
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(gx, gx_ref) < 1e-3


@pytest.mark.parametrize("variant", ["swin", "global"])
def test_kernel_switch_triton_interpreter(variant, gen):
    net = tiny(f"{variant}_factorizer", kernel="reference", spatial=(8, 8), widths=(4, 8, 8))
    net.eval()
    x = rand_input(net, gen)
    y_ref, gx_ref, _ = _grads(net, x)
    pytest.importorskip("triton")
    models.set_kernel(net, "triton")
    y, gx, _ = _grads(net, x)
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(gx, gx_ref) < 1e-3


def test_build_passes_the_kernel_to_every_layer():
    net = tiny(kernel="reference")
    assert {layer.kernel for layer in models.nmf_layers(net)} == {"reference"}
    with pytest.raises(ValueError, match="valid choices: auto, triton, torch, reference"):
        models.build("swin_factorizer", kernel="cuda")


# ---------------------------------------------------------------------------------------------
# Inference-time controls


def test_controls_change_outputs_and_restore_them(gen):
    net = tiny(kernel="torch").eval()
    x = rand_input(net, gen)
    with torch.no_grad():
        y0 = net(x)
        for controls in (
            {"iters": 1},
            {"iters": 12},
            {"rank": 2},
            {"rank": 3, "solver": "mu"},
            {"skip": [0]},
            {"skip": [2, 4]},
        ):
            with models.inference_controls(net, **controls):
                y = net(x)
            assert rel_err(y, y0) > 1e-4, controls
            assert torch.equal(net(x), y0), controls  # restored exactly
    layers_ = models.nmf_layers(net)
    assert {(m.iters, m.rank, m.solver) for m in layers_} == {(5, 1, "hals")}
    assert not any(w.bypass for w in models.wrapped_nmf_blocks(net))


def test_set_nmf_in_place_and_skip_semantics(gen):
    net = tiny(kernel="torch").eval()
    models.set_nmf(net, iters=3, rank=2, solver="mu", skip=[-1])
    assert {(m.iters, m.rank, m.solver) for m in models.nmf_layers(net)} == {(3, 2, "mu")}
    assert [w.bypass for w in models.wrapped_nmf_blocks(net)] == [False] * 4 + [True]
    assert all(m.v0.shape[1] == 2 and m.u0.shape[1] == 2 for m in models.nmf_layers(net))
    with pytest.raises(ValueError, match="NMF blocks 0..4"):
        models.set_nmf(net, skip=[5])
    with pytest.raises(ValueError, match="valid choices: hals, mu"):
        models.set_nmf(net, solver="als")


def test_short_circuit_is_identity_factorization(gen):
    block = models.WrappedNMF(
        8,
        spatial_dims=3,
        head_dim=4,
        window=2,
        spatial_size=None,
        shifts=None,
        rank=1,
        iters=5,
        solver="hals",
        kernel="torch",
        dropout=0.0,
        seed=1,
    )
    x = torch.randn(2, 8, 4, 4, 4, generator=gen)
    with torch.no_grad():
        y_nmf = block(x)
        block.bypass = True
        y = block(x)
        expected = block.out_proj(torch.relu(block.in_proj(x)))
    assert torch.allclose(y, expected)
    assert rel_err(y_nmf, y) > 1e-3


def test_iters_zero_is_the_initial_factors(gen):
    net = tiny(kernel="torch").eval()
    x = rand_input(net, gen)
    with torch.no_grad(), models.inference_controls(net, iters=0):
        y = net(x)
    assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------
# NMF components (Fig. 6)


@pytest.mark.parametrize("variant, block", [("local", 0), ("local", 3), ("global", 1)])
def test_components_span_each_window_of_the_reconstruction(variant, block, gen):
    """Rank one: every window of the NMF output is f g^T, so its rows are multiples of g."""
    net = tiny(f"{variant}_factorizer", kernel="reference").double().eval()
    x = rand_input(net, gen, dtype=torch.float64)
    layer = models.nmf_layers(net)[block]
    seen = []
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(out))
    comps = models.nmf_components(net, x, block=block)
    handle.remove()
    y = seen[0]  # (B, C, *S), the layer's reconstruction
    b, c, *spatial = y.shape
    heads = c // layer.head_dim
    assert comps.shape == (b, heads, 1, *spatial)
    assert (comps >= 0).all() and comps.sum() > 0
    ym = reference.matricize(y, layer.head_dim, layer.window)  # (B, H, nw, E, N)
    gm = reference.matricize(comps.reshape(b, heads, *spatial), 1, layer.window)
    g = gm.squeeze(-2).unsqueeze(-1)  # (B, H, nw, N, 1)
    gg = (g * g).sum(-2, keepdim=True)  # (B, H, nw, 1, 1)
    proj = (ym @ g) @ g.transpose(-1, -2) / gg.clamp_min(1e-300)  # (B, H, nw, E, N)
    assert rel_err(ym, proj) < 1e-8


def test_components_swin_rank2_shape_and_nonnegativity(gen):
    net = tiny(kernel="torch").eval()
    models.set_nmf(net, rank=2)
    x = rand_input(net, gen, batch=2)
    comps = models.nmf_components(net, x, block=4)  # decoder, full resolution
    assert comps.shape == (2, 8 // 4, 2, 16, 16, 16)
    assert (comps >= 0).all() and torch.isfinite(comps).all()
    # the components do not depend on the block being short-circuited, and leave it as it was
    models.set_nmf(net, skip=[4])
    assert torch.equal(models.nmf_components(net, x, block=4), comps)
    assert models.wrapped_nmf_blocks(net)[4].bypass


# ---------------------------------------------------------------------------------------------
# Baselines


@pytest.mark.parametrize(
    "name, overrides, spatial",
    [
        ("nnunet", {"widths": (8, 16, 32), "deep_supervision": 2}, (16, 16, 16)),
        ("resunet", {"widths": (8, 16, 32), "deep_supervision": 2}, (16, 16)),
        ("performer", {"widths": (8, 16, 32), "deep_supervision": 2, "head_dim": 4}, (16, 16, 8)),
        ("unetr", {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}, (32,) * 3),
        ("swin_unetr", {"feature_size": 12, "num_heads": (1, 1, 1, 1)}, (64, 64)),
        ("segresnet", {"init_filters": 8}, (16, 16, 16)),
    ],
)
def test_baselines_forward(name, overrides, spatial, gen):
    net = models.build(name, preset="isles", spatial_size=spatial, **overrides).eval()
    x = torch.randn(1, 2, *spatial, generator=gen)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 1, *spatial)
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="expected 2 input channels"):
        net(torch.randn(1, 3, *spatial))


def test_favor_attention_approximates_softmax_attention(gen):
    attn = models.FavorAttention(4, spatial_dims=2, head_dim=4, dropout=0.0, num_features=8192)
    attn = attn.double()
    x = 0.5 * torch.randn(1, 4, 6, 5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = attn(x)
        q, k, v = attn.qkv(x).reshape(1, 3, 1, 4, -1).transpose(-1, -2).unbind(1)  # (B,H,N,E)
        a = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # (B, H, N, N)
        exact = attn.out_proj((a @ v).transpose(-1, -2).reshape(1, 4, 6, 5))
    assert rel_err(y, exact) < 0.02  # seen: mean 0.003, max 0.009 over 20 seeds


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_count_flops_of_a_convolution():
    conv = torch.nn.Conv3d(2, 3, kernel_size=3, padding=1, bias=False)
    assert models.count_flops(conv, (1, 2, 8, 8, 8)) == 2 * 2 * 3 * 27 * 8**3


def test_count_flops_meta_equals_cpu_and_leaves_the_model_alone():
    net = tiny(kernel="torch")
    shape = (1, 4, 16, 16, 16)
    meta = models.count_flops(net, shape)
    assert meta == models.count_flops(net, shape, device="cpu")
    assert meta > 0
    assert {layer.kernel for layer in models.nmf_layers(net)} == {"torch"}
    assert next(net.parameters()).device.type == "cpu"
    parts = models.count_flops(net, shape, by_module=True)
    assert parts["total"] == meta and parts["stem"] == 2 * 4 * 8 * 27 * 16**3


# ---------------------------------------------------------------------------------------------
# Bad input and the registry


def test_registry_lists_and_rejects():
    names = models.available()
    for n in ("swin_factorizer", "local_factorizer", "global_factorizer", "factorizer"):
        assert n in names
    for n in ("nnunet", "resunet", "performer", "unetr", "swin_unetr", "segresnet"):
        assert n in names
    with pytest.raises(ValueError, match="unknown model 'transunet'; available models: .*nnunet"):
        models.build("transunet")
    with pytest.raises(ValueError, match="unknown preset 'lits'; valid presets: brats, isles"):
        models.build("nnunet", preset="lits")
    with pytest.raises(TypeError, match="no option.* window; valid options: .*widths"):
        models.build("nnunet", window=4)
    with pytest.raises(ValueError, match="unknown variant"):
        models.factorizer(in_channels=1, out_channels=1, spatial_size=(16, 16), variant="tiled")


def test_wrong_channel_count():
    net = tiny(kernel="torch")
    with pytest.raises(ValueError, match="expected 4 input channels .dim 1., got 2"):
        net(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="3D network"):
        net(torch.randn(1, 4, 16, 16))


def test_spatial_size_not_divisible_names_sizes_that_work():
    # 2 downsamplings x window 2 -> multiples of 8
    with pytest.raises(ValueError, match=r"dim 1 has size 20, not a multiple of 8.*16 or 24"):
        tiny(spatial=(16, 20, 16))
    net = tiny("nnunet", spatial=(16, 16, 16)).eval()  # no position embedding: multiples of 4
    assert net(torch.randn(1, 4, 12, 16, 20)).shape == (1, 3, 12, 16, 20)
    with pytest.raises(ValueError, match=r"dim 2 has size 18, not a multiple of 4.*16 or 20"):
        net(torch.randn(1, 4, 16, 16, 18))
    # the full presets: 16 x window
    with pytest.raises(ValueError, match=r"not a multiple of 128.*nearest sizes that work: 128"):
        models.build("swin_factorizer", spatial_size=(96, 128, 128))
    with pytest.raises(ValueError, match=r"not a multiple of 64.*64 or 128"):
        models.build("swin_factorizer", preset="isles", spatial_size=(64, 100, 64))


def test_fixed_size_models_name_the_mismatch():
    net = tiny(kernel="torch")  # position embedding fixes the size
    with pytest.raises(ValueError, match=r"differs .* at dim 0 \(24 != 16\)"):
        net(torch.randn(1, 4, 24, 16, 16))


def test_bad_head_dim():
    with pytest.raises(ValueError, match="not divisible by head_dim=3"):
        tiny(head_dim=3)
