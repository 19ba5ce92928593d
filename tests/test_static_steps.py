"""The training-step account (issue 14, part 3) on small models: op classes, NMF by the traffic
model, saved bytes with and without checkpointing, and hand counts of single ops."""

import sys

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from fastnmf import models
from fastnmf.profile.static import step_nmf
from fastnmf.profile.static.cases import StaticCase, ideal_bytes
from fastnmf.profile.static.step_account import account_step, account_steps, steps_markdown
from fastnmf.profile.static.step_cuda import CudaPolicy
from fastnmf.profile.static.step_device import h200, measured_steps
from fastnmf.profile.static.step_ops import CLASSES, StepCounter

SMALL = dict(widths=(8, 16, 32), deep_supervision=2)
SIZE = 32  # Factorizer: a multiple of 2^(levels - 1) x window = 4 x 8


def _small(model, **kw):
    return account_step(model, size=SIZE, batch=1, overrides=SMALL, **kw)


@pytest.fixture(scope="module")
def swin():
    return _small("swin_factorizer")


@pytest.fixture(scope="module")
def swin_lean():
    """The blocks' lean branches (no fused glue ops), as a CPU-only GPU stack would run them."""
    return _small("swin_factorizer", fused=False)


@pytest.fixture(scope="module")
def swin_ckpt():
    return _small("swin_factorizer", checkpoint=True)


def test_classes_and_phases_count_the_same_ops(swin):
    phases = swin["by_phase"]
    assert set(phases) == {"forward", "loss", "backward", "optimizer"}
    by_phase = sum(p["bytes_read"] + p["bytes_written"] for p in phases.values())
    assert sum(swin["bytes"][c] for c in CLASSES) == swin["bytes_total"] == by_phase
    assert sum(p["flops"] for p in phases.values()) == swin["flops_total"]
    assert all(swin["bytes"][c] > 0 for c in ("nmf", "fused", "pointwise_conv", "elementwise"))
    roof = swin["roofline_ms"]
    assert roof["total"] == pytest.approx(sum(roof[c] for c in CLASSES))


def test_nmf_counted_once_per_layer_and_pass_by_the_traffic_model(swin):
    net = models.build("swin_factorizer", "brats", spatial_size=(SIZE,) * 3, **SMALL)
    layers = len(models.nmf_layers(net))
    assert swin["nmf_calls"] == 2 * layers  # one forward + one backward per layer
    # the design that serves the first block's calls (design 3 with the BraTS shifts)
    case = StaticCase("window", 1, 8, (SIZE,) * 3, "fp32", (None, 2, 4, 6), design=3)
    one = [step_nmf._nmf_traffic(case, p) for p in ("fwd", "bwd")]
    one_bytes = sum(t["bytes_loaded"] + t["bytes_stored"] for t in one)
    # the first block runs at 8 channels, SIZE^3: its share is one call's fwd + bwd
    assert swin["bytes"]["nmf"] >= one_bytes > 0


BRATS_SHIFTS = [None, (2, 2, 2), (4, 4, 4), (6, 6, 6)]


@pytest.mark.parametrize(
    ("shape", "shifts", "rank", "design"),
    [((2, 32, 128, 128, 128), [None, (4, 4, 4)], 1, 2),
     ((2, 32, 128, 128, 128), BRATS_SHIFTS, 1, 3),
     ((1, 8, SIZE, SIZE, SIZE), BRATS_SHIFTS, 1, 3),
     ((2, 32, 128, 128, 128), [None], 1, 1),
     ((2, 32, 128, 128, 128), BRATS_SHIFTS, 2, 1)],  # rank > 1: window_nmf_rank
)  # fmt: skip
def test_step_account_takes_the_window_design_that_runs(shape, shifts, rank, design):
    """The NMF op of the account carries the design the layer runs for the call (two shifted
    windowings design 2, more design 3, local windows design 1: kernels.window_design), and keeps
    that design's saved tensors for backward: design 1 T iterates and norms per shifted window,
    design 2 those and K (E x E), design 3 u, the last iterate and K."""
    x = torch.empty(shape, device="meta")
    case = step_nmf.static_case(x, torch.rand(512, rank), head_dim=8, patch_size=(8, 8, 8),
                                shifts=shifts, iters=5)  # fmt: skip
    assert case.design == design
    windows = (shape[2] // 8) ** 3
    programs = shape[0] * (shape[1] // 8) * len(shifts) * windows
    per_window = {1: 5 * (8 + 1), 2: 5 * (8 + 1) + 8 * 8, 3: 8 + 8 + 8 * 8}[design]
    assert step_nmf._saved_aux_numel(case) == (programs * per_window if rank == 1 else 0)


def test_the_traffic_counter_leaves_no_trace_in_the_account():
    """Design 3's traffic comes from the interpreter's counter, which runs the kernels forward and
    backward on real tensors: with its caches cold (the counter runs inside the account) the step
    keeps and moves what it does with them warm (the counter does not run)."""
    from fastnmf.profile.static import traffic

    step_nmf._nmf_traffic.cache_clear()
    saved = dict(traffic._COUNTS)
    traffic._COUNTS.clear()
    try:
        cold = _small("swin_factorizer", fused=False)
        warm = _small("swin_factorizer", fused=False)
        # what the counter counted inside the account: the kernels themselves (one persistent
        # launch), not the account's stand-in op
        case = StaticCase("window", 1, 8, (SIZE,) * 3, "fp32", (None, 2, 4, 6), design=3)
        fwd = step_nmf._nmf_traffic(case, "fwd")
        assert fwd["triton_launches"] == 1
        assert fwd["bytes_loaded"] + fwd["bytes_stored"] > ideal_bytes(case, "fwd")
    finally:
        traffic._COUNTS.update(saved)
        step_nmf._nmf_traffic.cache_clear()
    assert set(cold["nmf_calls_by"]) == {"fp32 bwd d3", "fp32 fwd d3"}
    for key in ("nmf_calls_by", "saved_bytes", "predicted_peak_bytes", "bytes_total", "ops"):
        assert cold[key] == warm[key], key


def test_nnunet_has_no_nmf_and_more_conv_flops():
    row = _small("nnunet")
    assert row["bytes"]["nmf"] == 0 and row["nmf_calls"] == 0
    assert row["flops"]["conv"] > 0 and row["bytes_total"] > 0


def test_checkpointing_keeps_less_and_recomputes(swin, swin_lean, swin_ckpt):
    assert swin_ckpt["checkpoint_kept_bytes"] > 0
    # without checkpointing the blocks' lean branches keep little already (x, the NMF's input
    # and output, masks; models/recompute.py): checkpointing keeps the branch inputs alone
    assert swin_ckpt["saved_bytes"] < 0.75 * swin_lean["saved_bytes"]
    assert swin_ckpt["predicted_peak_bytes"] < swin_lean["predicted_peak_bytes"]
    # the recomputation runs each block's forward again, NMF included
    assert swin_ckpt["bytes"]["nmf"] > swin["bytes"]["nmf"]
    assert swin_ckpt["bytes_total"] > swin["bytes_total"]


def test_peak_breakdown_adds_up(swin):
    b = swin["peak_breakdown"]
    assert sum(b.values()) == swin["predicted_peak_bytes"]
    params = sum(4 * p for p in [swin["params"]])
    assert b["params"] >= params  # parameters (and buffers) are live all step
    assert b["optimizer"] >= 2 * params  # AdamW's two moments
    assert b["saved"] > 0


def _count(fn, *shapes, dtype=torch.float32):
    counter = StepCounter(h200())
    with FakeTensorMode(allow_non_fake_inputs=True):
        ts = [torch.empty(s, dtype=dtype) for s in shapes]
        with counter:
            fn(*ts)
    return counter


def test_conv_bytes_and_flops_by_hand():
    conv = nn.Conv3d(4, 8, 3, padding=1)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        conv.weight = nn.Parameter(mode.from_tensor(conv.weight.detach()))
        conv.bias = nn.Parameter(mode.from_tensor(conv.bias.detach()))
        x = torch.empty(2, 4, 6, 7, 5)
        counter = StepCounter(h200())
        with counter, torch.no_grad():
            conv(x)
    c = counter.by_class["conv"]
    vox = 6 * 7 * 5
    assert c["ops"] == 1
    assert c["bytes_read"] == 4 * (2 * 4 * vox + 8 * 4 * 27 + 8)  # x, weight, bias
    assert c["bytes_written"] == 4 * 2 * 8 * vox
    assert c["flops"] == 2 * (2 * 8 * vox) * 4 * 27  # 2 per multiply-add
    dev = h200()
    expect = max((c["bytes_read"] + c["bytes_written"]) / dev.copy_bytes_per_s,
                 c["flops"] / dev.tf32_flops)  # fmt: skip
    assert c["seconds"] == pytest.approx(expect)
    assert sum(counter.by_class[k]["ops"] for k in CLASSES) == 1


def test_pointwise_conv_broadcast_views_and_inplace_by_hand():
    pw = _count(lambda x, w: torch.nn.functional.conv3d(x, w), (1, 16, 4, 4, 4), (8, 16, 1, 1, 1))
    assert pw.by_class["pointwise_conv"]["ops"] == 1 and pw.by_class["conv"]["ops"] == 0
    # a broadcast operand is read once; a view moves nothing
    add = _count(lambda a, b: a.permute(0, 2, 1) + b.expand(7, 5), (3, 5, 7), (1, 5))
    e = add.by_class["elementwise"]
    assert (e["bytes_read"], e["bytes_written"], e["ops"]) == (4 * (105 + 5), 4 * 105, 1)
    assert add.views == 2  # permute, expand
    # in place: read and write the operand; fill_: write only
    ip = _count(lambda a: (a.mul_(2.0), a.fill_(1.0)), (10, 10))
    assert ip.by_class["elementwise"]["bytes_read"] == 400
    assert ip.by_class["elementwise"]["bytes_written"] == 800


def test_layer_norm_over_channels_counts_the_kernels_copy():
    ln = nn.LayerNorm(8, elementwise_affine=False)
    counter = _count(lambda x: ln(x.movedim(1, -1)), (2, 8, 4, 4, 4))
    n = 4 * 2 * 8 * 64
    assert counter.by_class["norm"]["bytes_read"] == n
    layout = counter.by_class["layout"]
    assert layout["bytes_read"] == layout["bytes_written"] == n


def test_dropout_runs_as_cudas_fused_kernel_with_a_bool_mask():
    drop = nn.Dropout(0.1)

    def run(x):
        with CudaPolicy(None):
            return drop(x)

    counter = _count(run, (2, 8, 4, 4, 4))
    e = counter.by_class["elementwise"]
    n = 2 * 8 * 64
    assert (e["ops"], e["bytes_read"], e["bytes_written"]) == (1, 4 * n, 4 * n + n)  # y + mask


def test_fused_mlp_branch_by_hand():
    """fastnmf::mlp_branch and its backward: one op each, x (and dy) read once, y (dx and the
    gradients) written once, the partial sums' workspace, matrix-product FLOPs; and the Factorizer
    account takes the fused branch at widths the kernels support."""
    from fastnmf.kernels._glue import PROGRAMS_PER_SM
    from fastnmf.kernels.mlp_branch import backward_workspace_bytes

    from fastnmf.profile.static.step_ops import H200_SMS

    b, c, h, vox = 2, 16, 32, 4 * 5 * 6
    sizes = [(c,), (c,), (h, c), (h,), (c, h), (c,)]
    params = 4 * sum(torch.Size(s).numel() for s in sizes)
    x_bytes = 4 * b * c * vox

    def fwd(x, *p):
        return torch.ops.fastnmf.mlp_branch(x, p[0], p[1], 1e-5, *p[2:], 0.1, 3, torch.float32)

    f = _count(fwd, (b, c, 4, 5, 6), *sizes).by_class["fused"]
    assert (f["ops"], f["bytes_read"], f["bytes_written"]) == (1, x_bytes + params, x_bytes)
    assert f["flops"] == 4 * b * c * vox * h

    def bwd(dy, x, *p):
        return torch.ops.fastnmf.mlp_branch_backward(dy, x, p[0], p[1], 1e-5, p[2], p[3], p[4],
                                                     0.1, 3, torch.float32)  # fmt: skip

    g = _count(bwd, (b, c, 4, 5, 6), (b, c, 4, 5, 6), *sizes[:5]).by_class["fused"]
    ws = backward_workspace_bytes((b, c, vox), h, torch.float32, PROGRAMS_PER_SM * H200_SMS)
    grads = params  # the six gradients, db2 like ln_b
    assert g["ops"] == 2  # the kernel and the reduction of its partial sums
    assert g["bytes_read"] == 2 * x_bytes + params - 4 * c + ws // 2  # dy, x; b2 is not an input
    assert g["bytes_written"] == x_bytes + grads + ws // 2
    assert g["flops"] == 10 * b * c * vox * h


def test_factorizer_step_takes_the_fused_glue_ops(swin, swin_lean):
    """At widths 8-32 every block runs its MLP branch and both ends of its context branch as
    fused ops (forward, backward, reduction of the partial sums: 3 x 3 per block), the two
    decoder blocks their skip adapters too (3 each), no LayerNorm op is left, and the step moves
    fewer bytes and keeps less than with the lean branches."""
    assert swin["ops"]["fused"] == 3 * 3 * 5 + 3 * 2
    assert swin_lean["ops"]["fused"] == swin_lean["bytes"]["fused"] == 0
    assert swin["bytes"]["norm"] == 0 < swin_lean["bytes"]["norm"]
    assert swin["bytes_total"] < 0.75 * swin_lean["bytes_total"]
    assert swin["saved_bytes"] <= swin_lean["saved_bytes"]
    assert swin["bytes"]["nmf"] == swin_lean["bytes"]["nmf"]


def test_traffic_adapter_falls_back_to_ideal_only_when_missing(monkeypatch):
    case = StaticCase("window", 1, 8, (16, 16, 16), "bf16", (None, 4))
    step_nmf._nmf_traffic.cache_clear()
    monkeypatch.setitem(sys.modules, "fastnmf.profile.static.traffic", None)  # import fails
    try:
        for pass_ in ("fwd", "bwd"):
            t = step_nmf._nmf_traffic(case, pass_)
            assert t["source"] == "ideal (traffic model missing)"
            assert t["bytes_loaded"] + t["bytes_stored"] == ideal_bytes(case, pass_)
    finally:
        step_nmf._nmf_traffic.cache_clear()


def test_nmf_bytes_and_launches_come_from_the_traffic_model(monkeypatch, swin):
    """With a traffic model present, its figures are used as they are (a stand-in model here:
    3x the ideal bytes, 2 launches a pass)."""
    import types

    def model_call(case, pass_):
        ideal = ideal_bytes(case, pass_)
        return {"bytes_loaded": 2 * ideal, "bytes_stored": ideal, "launches": 2}

    stub = types.ModuleType("fastnmf.profile.static.traffic")
    stub.model_call = model_call
    monkeypatch.setitem(sys.modules, "fastnmf.profile.static.traffic", stub)
    step_nmf._nmf_traffic.cache_clear()
    try:
        row = _small("swin_factorizer")
    finally:
        step_nmf._nmf_traffic.cache_clear()
    assert row["nmf_source"] == "traffic model"
    assert swin["nmf_source"].startswith(("traffic model", "ideal (traffic model missing)"))
    if swin["nmf_source"].startswith("ideal"):
        assert row["bytes"]["nmf"] == 3 * swin["bytes"]["nmf"]
    assert row["ops"]["nmf"] == 2 * row["nmf_calls"]
    others = [c for c in CLASSES if c != "nmf"]
    assert [row["bytes"][c] for c in others] == [swin["bytes"][c] for c in others]


def test_bf16_autocast_follows_cuda_and_reaches_the_recomputation(swin_lean, swin_ckpt):
    swin = swin_lean
    bf = _small("swin_factorizer", dtype="bf16", fused=False)
    assert 0 < bf["bytes"]["nmf"] < swin["bytes"]["nmf"]  # the NMF runs on bf16 conv outputs
    assert bf["bytes"]["pointwise_conv"] < swin["bytes"]["pointwise_conv"]
    # CUDA autocast runs layer norm in fp32 (CPU autocast would not): its outputs stay fp32
    assert bf["bytes_written"]["norm"] > 0.9 * swin["bytes_written"]["norm"]
    bf_ckpt = _small("swin_factorizer", dtype="bf16", checkpoint=True)
    assert bf_ckpt["nmf_calls"] == bf["nmf_calls"] * 3 // 2  # forward twice, backward once
    # the recomputed forward runs under autocast too: every NMF call has a bf16 input (the swin
    # blocks' BraTS shifts: design 3)
    layers = bf["nmf_calls"] // 2
    assert bf_ckpt["nmf_calls_by"] == {"bf16 bwd d3": layers, "bf16 fwd d3": 2 * layers}
    assert swin_ckpt["nmf_calls_by"] == {"fp32 bwd d3": layers, "fp32 fwd d3": 2 * layers}
    assert bf_ckpt["bytes"]["nmf"] < swin_ckpt["bytes"]["nmf"]


def test_bad_arguments_name_the_valid_options():
    with pytest.raises(ValueError, match="valid: fp32, bf16"):
        account_step("nnunet", dtype="fp16")
    with pytest.raises(ValueError, match="valid: train, bce"):
        account_step("nnunet", loss="dice")
    with pytest.raises(ValueError, match="unknown model 'unet3d'; valid: "):
        account_steps(models=["unet3d"])
    with pytest.raises(ValueError, match="no checkpointing option"):
        account_step("nnunet", checkpoint=True)


def test_quick_selection_is_the_measured_comparison(monkeypatch):
    from fastnmf.profile.static import step_account

    calls = []
    monkeypatch.setattr(step_account, "account_step", lambda m, **kw: calls.append((m, kw)))
    account_steps(quick=True)
    assert [(m, kw["dtype"], kw["checkpoint"]) for m, kw in calls] == [
        ("swin_factorizer", "fp32", False), ("nnunet", "fp32", False), ("swin_unetr", "fp32", False)
    ]  # fmt: skip
    calls.clear()
    account_steps(models=["nnunet", "global_factorizer"])
    assert len(calls) == 2 + 4  # nnunet: fp32, bf16; the Factorizer: x (no ckpt, ckpt)


def test_h200_figures_and_report(swin):
    dev = h200()
    assert 3.0e12 < dev.copy_bytes_per_s < 4.8e12  # the H200's HBM3e: 4.8 TB/s at most
    meas = measured_steps()
    for model in ("swin_factorizer", "nnunet", "swin_unetr"):
        assert meas[(model, "fp32", False, 128, 2)]["ms"] > 0
    assert swin["measured_ms"] is None  # no measurement at this small size
    text = "\n".join(steps_markdown([swin]))
    assert "swin_factorizer" in text and "No H200 measurement" in text
