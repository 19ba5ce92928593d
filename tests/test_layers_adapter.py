"""The decoder blocks' adapter (models/layers.py SkipAdapter): a pointwise conv of cat([skip, x])
held as two weights, so no weight is sliced (no layout op in the training step); the state dict
is the old single conv's (old checkpoints load, new ones load into the old module)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from fastnmf.models import layers
from torch import nn

from fastnmf.profile.static.step_account import account_step


def old_adapter(cin, cout, nd=3):
    return nn.Sequential(layers.pointwise_conv(cin, cout, spatial_dims=nd, bias=False),
                         nn.Dropout(0.0))  # fmt: skip


def new_block(cin, cout, nd=3, skip_channels=None):
    mixer = layers.WrappedNMF(cout, spatial_dims=nd, head_dim=4, window=2, spatial_size=None,
                              shifts=None, rank=1, iters=2, solver="hals", kernel="torch",
                              dropout=0.0, seed=0)  # fmt: skip
    return layers.FactorizerBlock(cin, cout, mixer=mixer, spatial_dims=nd, mlp_ratio=2.0,
                                  dropout=0.0, skip_channels=skip_channels)  # fmt: skip


@pytest.mark.parametrize("nd", [2, 3])
def test_old_checkpoints_load_and_the_adapter_equals_the_old_conv(nd, gen):
    cs, cx, cout = 8, 12, 8
    spatial = (4, 6, 2)[:nd]
    old = old_adapter(cs + cx, cout, nd)
    blk = new_block(cs + cx, cout, nd, skip_channels=cs)
    sd = old.state_dict()
    new_sd = blk.adapter.state_dict()
    assert {k: v.shape for k, v in new_sd.items()} == {k: v.shape for k, v in sd.items()}
    blk.adapter.load_state_dict(sd)  # strict: the old key becomes the two weights
    adapter = blk.adapter[0]
    assert torch.equal(torch.cat([adapter.weight_skip, adapter.weight_x], 1), sd["0.weight"])
    fresh_old = old_adapter(cs + cx, cout, nd)
    fresh_old.load_state_dict(blk.adapter.state_dict())  # and back into the old module
    assert torch.equal(fresh_old[0].weight, sd["0.weight"])
    skip = torch.randn(2, cs, *spatial, generator=gen, requires_grad=True)
    x = torch.randn(2, cx, *spatial, generator=gen, requires_grad=True)
    dy = torch.randn(2, cout, *spatial, generator=gen)
    y_old = old(torch.cat([skip, x], dim=1))
    g_old = torch.autograd.grad(y_old, [skip, x, old[0].weight], dy)
    y_new = adapter.pair(skip, x)
    g_new = torch.autograd.grad(y_new, [skip, x, adapter.weight_skip, adapter.weight_x], dy)
    assert rel_err(y_new, y_old) < 1e-6
    assert rel_err(g_new[0], g_old[0]) < 1e-6 and rel_err(g_new[1], g_old[1]) < 1e-6
    assert rel_err(torch.cat(g_new[2:], 1), g_old[2]) < 1e-6
    assert torch.equal(adapter(torch.cat([skip, x], 1)), y_old)  # concatenated input: one conv


def test_initialised_as_the_old_conv():
    torch.manual_seed(5)
    old = layers.pointwise_conv(24, 8, spatial_dims=3, bias=False)
    torch.manual_seed(5)
    new = layers.SkipAdapter(16, 8, 8, spatial_dims=3)
    assert torch.equal(torch.cat([new.weight_skip, new.weight_x], 1), old.weight)


def test_bad_split_and_bad_checkpoint_are_named():
    blk = new_block(16, 8)
    with pytest.raises(ValueError, match="takes \\(skip, x\\) with 8 and 8 channels, got 4 and 12"):
        blk.forward_skip(torch.zeros(1, 4, 2, 2, 2), torch.zeros(1, 12, 2, 2, 2))
    bad = old_adapter(24, 8).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for 0.weight: .*\\(8, 24, 1, 1, 1\\)"):
        blk.adapter.load_state_dict(bad)
    with pytest.raises(ValueError, match="skip_channels=16 must be in 1..15"):
        layers.FactorizerBlock(16, 8, mixer=nn.Identity(), spatial_dims=3, mlp_ratio=2.0,
                               dropout=0.0, skip_channels=16)  # fmt: skip


def test_step_account_sees_no_layout_op():
    """The Swin Factorizer's training step (decoder adapters included) moves no byte between
    layouts: no weight slice's gradient, no concatenation, no copy. (Batch 2: at batch 1 the
    position embedding's gradient is the incoming gradient itself, which AccumulateGrad copies.)"""
    row = account_step("swin_factorizer", size=16, batch=2,
                       overrides=dict(widths=(8, 16), deep_supervision=1))  # fmt: skip
    assert row["bytes"]["layout"] == 0 and row["ops"]["layout"] == 0
    assert row["bytes"]["pointwise_conv"] > 0


def test_an_optimizer_state_of_the_merged_adapter_weight_resumes():
    """A run saved while the adapter was one conv weight resumes: its AdamW state is split into
    the two weights (the same moments as a run that always had two), a current state passes."""
    from fastnmf.checkpoints import upgrade_optimizer_state

    torch.manual_seed(0)
    blk = new_block(20, 8, skip_channels=8)
    opt = torch.optim.AdamW(blk.parameters(), lr=1e-3)
    for _ in range(2):
        blk(torch.rand(1, 20, 4, 4, 4)).square().sum().backward()
        opt.step()
    state = opt.state_dict()
    params, adapter = list(blk.parameters()), blk.adapter[0]
    first = next(j for j, p in enumerate(params) if p is adapter.weight_skip)
    old = {}  # the saved layout of before: the two adapter entries merged into one
    for j in range(len(params)):
        if j == first + 1:
            continue
        entry = state["state"][j]
        if j == first:
            entry = {n: torch.cat([v, state["state"][j + 1][n]], 1) if v.dim() > 1 else v
                     for n, v in entry.items()}  # fmt: skip
        old[len(old)] = entry
    group = dict(state["param_groups"][0], params=list(range(len(old))))
    old = {"state": old, "param_groups": [group]}
    fresh = torch.optim.AdamW(blk.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="size"):
        fresh.load_state_dict(old)  # what resuming such a run did without the upgrade
    fresh.load_state_dict(upgrade_optimizer_state(blk, old))
    got = fresh.state_dict()["state"]
    assert got.keys() == state["state"].keys()
    for j, entry in state["state"].items():
        assert all(torch.equal(got[j][n], v) for n, v in entry.items()), j
    assert upgrade_optimizer_state(blk, state) is state
