"""The Factorizer blocks' lean branches (models/recompute.py): the MLP branch and LN -> in_proj
keep only x for backward and recompute the rest there. Checked against the plain modules (the
formulation they replace): outputs, input and parameter gradients bit for bit, dropout masks
replayed (dropout 0 and > 0, CPU and CUDA's fused dropout as the step account emulates it, bf16
autocast), the generator left as the plain run leaves it; eval, no-grad and torch.compile run
the plain modules; the training-step account sees exactly the bytes no longer kept."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from fastnmf.models import layers, recompute
from fastnmf.models.layers import FactorizerBlock, FavorAttention, WrappedNMF
from torch.utils._python_dispatch import TorchDispatchMode

from fastnmf.profile.static.step_account import _lean_mlp_as_on_cuda, account_step
from fastnmf.profile.static.step_cuda import CudaPolicy
from fastnmf.profile.static.step_device import h200
from fastnmf.profile.static.step_ops import StepCounter

LEAN_NODES = {"_MLPBranchBackward", "_NormConvBackward"}


def make_block(kind: str, *, dropout: float, nd: int = 3, cin: int = 8, cout: int = 8):
    if kind == "nmf":
        mixer = WrappedNMF(cout, spatial_dims=nd, head_dim=4, window=2, spatial_size=None,
                           shifts=[None, 1], rank=1, iters=3, solver="hals", kernel="torch",
                           dropout=dropout, seed=1)  # fmt: skip
    else:
        mixer = FavorAttention(cout, spatial_dims=nd, head_dim=4, dropout=dropout, seed=1)
    return FactorizerBlock(cin, cout, mixer=mixer, spatial_dims=nd, mlp_ratio=2.0,
                           dropout=dropout).train()  # fmt: skip


def graph_nodes(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def step(blk, inputs, dy, *, lean: bool, forward_ctx=contextlib.nullcontext):
    """A seeded forward + backward: (y, input grads, parameter grads, the generator's next
    draws, the autograd node names)."""
    for p in blk.parameters():
        p.grad = None
    xs = [t.clone().requires_grad_(True) for t in inputs]
    off = mock.patch.object(layers, "use_lean", lambda *a: False)
    with off if not lean else contextlib.nullcontext():
        torch.manual_seed(1234)
        with forward_ctx():
            y = blk(*xs) if len(xs) == 1 else blk.forward_skip(*xs)
        nodes = graph_nodes(y)
        y.backward(dy)
    grads = {n: p.grad for n, p in blk.named_parameters()}
    return y.detach(), [x.grad for x in xs], grads, torch.rand(8), nodes


def assert_same_step(a, b):
    ya, dxa, ga, ra, _ = a
    yb, dxb, gb, rb, _ = b
    assert torch.equal(ya, yb)
    for u, v in zip(dxa, dxb, strict=True):
        assert torch.equal(u, v)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert ga[name] is not None and torch.equal(ga[name], gb[name]), name
    assert torch.equal(ra, rb)  # the replay leaves the generator as the plain run does


CASES = [("nmf", False, 3), ("nmf", True, 3), ("favor", False, 3), ("nmf", True, 2)]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("kind, skip, nd", CASES)
def test_lean_block_equals_plain_bitwise(kind, skip, nd, dropout, gen):
    """Encoder block, decoder block (adapter over [skip, x]), Performer block, a 2D one."""
    blk = make_block(kind, dropout=dropout, nd=nd, cin=16 if skip else 8)
    spatial = (4, 6, 4)[:nd]
    shapes = [(2, 8, *spatial)] * (2 if skip else 1)
    inputs = [torch.randn(s, generator=gen) for s in shapes]
    dy = torch.randn(2, 8, *spatial, generator=gen)
    plain = step(blk, inputs, dy, lean=False)
    lean = step(blk, inputs, dy, lean=True)
    expected = LEAN_NODES if kind == "nmf" else {"_MLPBranchBackward"}
    assert expected <= lean[4] and not LEAN_NODES & plain[4]
    assert_same_step(plain, lean)
    assert all(g.abs().sum() > 0 for g in lean[2].values())
    if dropout:  # the masks matter: another draw gives another step
        torch.manual_seed(99)
        y_other = blk(*inputs) if not skip else blk.forward_skip(*inputs)
        assert not torch.equal(y_other.detach(), lean[0])


def test_bf16_autocast_bitwise(gen):
    """Under CPU bf16 autocast (convs in bf16, LN in fp32) the recomputation runs as the
    forward did: the same bf16 output and fp32 gradients."""
    blk = make_block("nmf", dropout=0.2, cin=16)
    inputs = [torch.randn(2, 8, 4, 4, 4, generator=gen) for _ in range(2)]
    dy = torch.randn(2, 8, 4, 4, 4, generator=gen)

    def amp():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    plain = step(blk, inputs, dy, lean=False, forward_ctx=amp)
    lean = step(blk, inputs, dy, lean=True, forward_ctx=amp)
    assert LEAN_NODES <= lean[4]
    assert_same_step(plain, lean)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_fused_dropout_path_as_on_cuda(amp, gen):
    """CUDA's dropout (``native_dropout``, bool masks) and autocast lists, emulated as the step
    account does: the replay draws the same masks, uses ``native_dropout_backward`` and runs
    under the forward's policy: bit for bit the plain step's."""
    blk = make_block("nmf", dropout=0.2)
    inputs = [torch.randn(2, 8, 4, 4, 4, generator=gen)]
    dy = torch.randn(2, 8, 4, 4, 4, generator=gen)
    plain = step(blk, inputs, dy, lean=False, forward_ctx=lambda: CudaPolicy(amp))
    ops = _Ops()
    with _lean_mlp_as_on_cuda(amp), ops:
        lean = step(blk, inputs, dy, lean=True, forward_ctx=lambda: CudaPolicy(amp))
    assert_same_step(plain, lean)
    assert "bernoulli_" not in ops.names  # no CPU-style noise tensor anywhere
    # forward: the mixer's and the MLP's two; backward: the MLP's two replayed, three backwards
    assert ops.names.count("native_dropout") == 5
    assert ops.names.count("native_dropout_backward") == 3


def _saved(fn):
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = fn()
    return out, kept


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_branches_keep_only_x(dropout, gen):
    """What autograd keeps (saved-tensor hooks) is x alone, and after the forward no storage it
    made is alive but its output (the step account's live-storage tracking: this also sees
    tensors a Function would stash on ctx)."""
    blk = make_block("nmf", dropout=dropout)
    x = torch.randn(2, 8, 4, 4, 4, generator=gen, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in blk.parameters()}
    for fn in (lambda: recompute.mlp_branch(x, blk.norm2, blk.mlp),
               lambda: recompute.norm_conv(x, blk.norm1, blk.mixer.in_proj)):  # fmt: skip
        counter = StepCounter(h200())
        with counter:
            y, kept = _saved(fn)
        counter.track([])  # drops what was freed
        assert counter.live_bytes == y.untyped_storage().nbytes()
        acts = {t.untyped_storage().data_ptr() for t in kept} - params
        assert acts == {x.untyped_storage().data_ptr()}
    _, plain = _saved(lambda: blk.mlp(blk.norm2(x)))
    plain_bytes = sum(t.untyped_storage().nbytes() for t in plain
                      if t.untyped_storage().data_ptr() not in params)  # fmt: skip
    assert plain_bytes > 5 * x.untyped_storage().nbytes()


def test_eval_no_grad_and_compile_run_the_plain_modules(gen):
    blk = make_block("nmf", dropout=0.2)
    x = torch.randn(1, 8, 4, 4, 4, generator=gen, requires_grad=True)
    blk.eval()
    assert not LEAN_NODES & graph_nodes(blk(x))
    blk.train()
    with torch.no_grad():
        assert blk(x).grad_fn is None
    torch._dynamo.reset()
    explained = torch._dynamo.explain(blk)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    blk.mixer.dropout.p = blk.mlp.drop1.p = blk.mlp.drop2.p = 0.0  # compiled vs eager, no RNG
    compiled = torch.compile(blk, backend="aot_eager", fullgraph=True)
    ye, yc = blk(x), compiled(x)
    assert LEAN_NODES <= graph_nodes(ye)
    ge = torch.autograd.grad(ye.square().sum(), [x, *blk.parameters()])
    gc = torch.autograd.grad(yc.square().sum(), [x, *blk.parameters()])
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
    for a, b in zip(gc, ge, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    program = torch.export.export(blk.eval(), (x.detach(),))
    torch.testing.assert_close(program.module()(x.detach()), blk(x.detach()))


def test_two_dropout_rates_run_the_plain_mlp():
    """The MLP's dropouts at different rates (not what the models build): the block trains with
    the plain MLP; mlp_branch itself refuses them."""
    blk = make_block("nmf", dropout=0.1)
    blk.mlp.drop2.p = 0.3
    x = torch.randn(1, 8, 2, 2, 2, requires_grad=True)
    nodes = graph_nodes(blk(x))
    assert "_MLPBranchBackward" not in nodes and "_NormConvBackward" in nodes
    with pytest.raises(ValueError, match="GELU and dropout rates 0.1 and 0.3"):
        recompute.mlp_branch(x, blk.norm2, blk.mlp)
    blk.mlp.drop2.p = blk.mlp.drop1.p = 1.0
    with pytest.raises(ValueError, match="rate below 1"):
        recompute.mlp_branch(x, blk.norm2, blk.mlp)


# ---------------------------------------------------------------------------------------------
# The training-step account

SMALL = dict(widths=(8, 16), deep_supervision=1)
SIZE = 16


def _block_voxels_and_channels() -> list[tuple[int, int]]:
    """(voxels, C) of every Factorizer block of the small account model (batch 1): encoder
    blocks at levels 0, 1, ..., decoder blocks back up to level 0 (C = widths[level])."""
    widths = SMALL["widths"]
    levels = [*range(len(widths)), *range(len(widths) - 2, -1, -1)]
    return [((SIZE // 2**lvl) ** 3, widths[lvl]) for lvl in levels]


@pytest.fixture(scope="module")
def account_rows():
    rows = {}
    for dtype in ("fp32", "bf16"):
        for lean in (True, False):
            off = mock.patch.object(layers, "use_lean", lambda *a: False)
            with off if not lean else contextlib.nullcontext():
                rows[dtype, lean] = account_step("swin_factorizer", dtype=dtype, size=SIZE,
                                                 batch=1, overrides=SMALL, fused=False)  # fmt: skip
    return rows


def test_account_sees_exactly_what_the_branches_no_longer_keep(account_rows):
    """fp32: per block and voxel the plain step kept, besides x: LN2's output n, fc1's output
    h, the bool dropout masks (2C and C bytes), fc2's input g, LN1's output and both
    LayerNorms' mean / rstd (4 bytes each): 4C + 8C + 2C + 8C + C + 4C = 27C, + 16."""
    lean, plain = account_rows["fp32", True], account_rows["fp32", False]
    blocks = _block_voxels_and_channels()
    expected = sum(v * (27 * c + 16) for v, c in blocks)
    assert plain["saved_bytes"] - lean["saved_bytes"] == expected
    # the recomputation: LN's forward once more per branch (x, weight and bias read; n, mean and
    # rstd written)
    extra_norm = sum(2 * (v * (8 * c + 8) + 8 * c) for v, c in blocks)
    assert lean["bytes"]["norm"] - plain["bytes"]["norm"] == extra_norm
    for dtype in ("fp32", "bf16"):  # bf16: the replay runs under CUDA's policy (it would fail
        lean, plain = account_rows[dtype, True], account_rows[dtype, False]  # in mixed dtypes)
        assert lean["saved_bytes"] < 0.6 * plain["saved_bytes"]
        assert lean["predicted_peak_bytes"] < plain["predicted_peak_bytes"]
        assert lean["bytes"]["nmf"] == plain["bytes"]["nmf"]
        assert lean["bytes_total"] > plain["bytes_total"]
