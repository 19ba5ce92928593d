"""The Triton-backed ops as ``torch.library.triton_op``s: ``fastnmf::channel_layer_norm`` and
``fastnmf::window_nmf_triton`` (each with its backward op).

Traced for CUDA (torch.compile's functionalization), each op is its Triton launches
(``triton_kernel_wrapper_functional`` nodes through ``wrap_triton``); under Triton's CPU interpreter
and on the CPU layer-norm path the graph keeps the op whole; eager calls, export and opcheck work as
for a custom op, with the same bits as the direct launchers.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

from fastnmf import custom_op, matricized_nmf, window_op
from fastnmf.channel_norm import channel_layer_norm

HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# the Triton kernels run on CUDA tensors where there is a GPU, else under the interpreter on CPU
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = ("channel_layer_norm", "channel_layer_norm_backward", "window_nmf_triton",
       "window_nmf_triton_backward")  # fmt: skip
# Every window design's kernels, per op (recorded for AOTAutograd's cache key)
WINDOW_FWD = {"_stats_fwd_kernel", "_apply_fwd_tile_kernel", "_apply_fwd_kernel", "_parts_kernel",
              "_solve_kernel", "_apply_kernel", "_fused_kernel"}  # fmt: skip
WINDOW_BWD = {"_stats_bwd_kernel", "_apply_bwd_tile_kernel", "_apply_bwd_kernel",
              "_parts_bwd_kernel", "_solve_bwd_kernel", "_apply_bwd_kernel2",
              "_fused_bwd_kernel"}  # fmt: skip


def _window_args(gen, device, shifts=(None, 2), dtype=torch.float32, design=1):
    """x (1, 8, 8, 8, 8), g0 (64,), an all-ones row mask and the attributes of the window op."""
    x = torch.randn(1, 8, 8, 8, 8, generator=gen, dtype=dtype).to(device)
    g0 = torch.rand(64, generator=gen, dtype=dtype).to(device)
    rowmask = torch.ones(4, dtype=dtype, device=device)
    return (x, g0, rowmask, 4, [4, 4, 4], custom_op.encode_shifts(list(shifts), 3), 3, False,
            design)  # fmt: skip


def test_ops_are_triton_ops_with_their_kernels_recorded():
    """torch.library keeps the triton ops (and their kernels, part of AOTAutograd's cache key) in
    ``torch._library.triton``; ``custom_op`` ops are not there."""
    from torch._library.triton import get_triton_kernels_for_op, triton_ops_to_kernels

    for name in OPS:
        assert f"fastnmf::{name}" in triton_ops_to_kernels
    assert "fastnmf::matricized_nmf" not in triton_ops_to_kernels  # an opaque custom_op
    if not HAVE_TRITON:
        return
    window_op._record_kernels()
    importlib.import_module("fastnmf.channel_norm")._kernels()

    def names(op):
        return {getattr(k, "fn", k).__name__ for k in get_triton_kernels_for_op(f"fastnmf::{op}")}

    assert names("window_nmf_triton") == WINDOW_FWD
    assert names("window_nmf_triton_backward") == WINDOW_BWD
    assert names("channel_layer_norm") == {"_fwd_kernel"}
    assert names("channel_layer_norm_backward") == {"_bwd_kernel"}


# Traced for CUDA with fake tensors, without the interpreter (a fresh process: TRITON_INTERPRET
# is read when triton is imported): each op's graph is its kernels' launches.
_TRACE_SCRIPT = r"""
import json, torch
from torch._dynamo.source import ConstantSource
from torch._subclasses import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
import fastnmf
from fastnmf.custom_op import encode_shifts
from fastnmf.kernels import _window3_sched
from fastnmf.window_op import _saved_shapes

_window3_sched.TUNING["sms"] = 132  # the persistent grid without a GPU to ask (an H100's SMs)
ops = torch.ops.fastnmf
shifts = encode_shifts([None, (2, 2, 2)], 3)
out = {}
for dynamic in (False, True):  # dynamic: batch and spatial sizes symbolic (dynamic shapes)
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    def size(name, hint):
        if not dynamic:
            return hint
        sym = env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
        return env.create_symintnode(sym, hint=hint)
    b, s = size("B", 2), size("S", 8)
    with mode:
        x, dy = (torch.empty(b, 8, s, s, s, device="cuda") for _ in range(2))
        g0, rm = torch.empty(64, device="cuda"), torch.ones(4, device="cuda")
        w, bias = torch.empty(8, device="cuda"), torch.empty(8, device="cuda")
        stat = torch.empty(b, s * s * s, device="cuda")
        progs = b * 2 * 2 * (s // 4) ** 3
        saved = {d: [torch.empty(shape, device="cuda") for shape in _saved_shapes(d, progs, 3, 4)]
                 for d in (1, 2, 3)}
    calls = {
        "channel_layer_norm": (lambda *a: ops.channel_layer_norm(*a, 1e-5), (x, w, bias)),
        "channel_layer_norm_backward": (ops.channel_layer_norm_backward, (dy, x, w, stat, stat)),
    }
    for d in (1, 2, 3):
        attrs = (4, [4, 4, 4], shifts, 3, False, d)
        calls[f"window_nmf_triton {d}"] = (
            lambda *a, attrs=attrs: ops.window_nmf_triton(*a, *attrs), (x, g0, rm))
        calls[f"window_nmf_triton_backward {d}"] = (
            lambda *a, attrs=attrs: ops.window_nmf_triton_backward(*a, *attrs),
            (dy, x, g0, rm, *saved[d]))
    for name, (fn, args) in calls.items():
        with mode:
            gm = make_fx(dispatch_functionalize(fn))(*args)
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        kernels = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
                   for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
        key = name + (" dynamic" if dynamic else "")
        out[key] = {"fastnmf_calls": [t for t in targets if "fastnmf" in t], "kernels": kernels}
print("RESULT " + json.dumps(out))
"""


@needs_triton
def test_traced_for_cuda_each_op_is_its_triton_launches():
    """make_fx under functionalization (what AOTAutograd does for torch.compile) of each op on
    fake CUDA tensors: no fastnmf op left in the graph, only the wrapped launches of its kernels
    (the window ops with two shifts, each design: the first's stats kernel, then its tiled apply
    kernel; the second's three passes; the third's one persistent kernel), with static and with
    symbolic (dynamic) batch and spatial sizes. Runs on a machine without a GPU: fake CUDA
    tensors hold no memory, and no kernel is launched."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[0][len("RESULT ") :])
    expected = {
        "window_nmf_triton 1": ["_stats_fwd_kernel", "_apply_fwd_tile_kernel"],
        "window_nmf_triton_backward 1": ["_stats_bwd_kernel", "_apply_bwd_tile_kernel"],
        "window_nmf_triton 2": ["_parts_kernel", "_solve_kernel", "_apply_kernel"],
        "window_nmf_triton_backward 2": ["_parts_bwd_kernel", "_solve_bwd_kernel",
                                         "_apply_bwd_kernel2"],
        "window_nmf_triton 3": ["_fused_kernel"],
        "window_nmf_triton_backward 3": ["_fused_bwd_kernel"],
        "channel_layer_norm": ["_fwd_kernel"],
        "channel_layer_norm_backward": ["_bwd_kernel"],
    }
    assert {name.split()[0] for name in expected} == set(OPS)
    for name, kernels in expected.items():
        for key in (name, name + " dynamic"):
            assert got[key] == {"fastnmf_calls": [], "kernels": kernels}, (key, got[key])


def _functional_graph_targets(fn, *args) -> list[str]:
    """The call targets of ``fn`` traced like AOTAutograd does (fake tensors, functionalized)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        gm = make_fx(dispatch_functionalize(fn))(*args)
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_cpu_layer_norm_path_stays_one_op_when_traced(gen):
    """On CPU the channel norm is PyTorch's layer norm inside the op (today's results): a traced
    graph keeps ``fastnmf.channel_layer_norm`` whole instead of decomposing it."""
    x, w, b = torch.randn(2, 8, 4, 4, 4, generator=gen), torch.randn(8), torch.randn(8)
    targets = _functional_graph_targets(
        lambda *a: torch.ops.fastnmf.channel_layer_norm(*a, 1e-5), x, w, b
    )
    assert targets == ["fastnmf.channel_layer_norm.default"] + ["<built-in function getitem>"] * 3


@needs_triton
@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="the interpreter runs on CPU tensors")
def test_interpreted_window_op_stays_one_op_when_traced(gen):
    """Under TRITON_INTERPRET=1 wrap_triton gives back the interpreted kernel (it has no traceable
    form), which cannot run on fake tensors: the traced graph keeps the op whole, and runs it."""
    x, g0, rm, *attrs = _window_args(gen, "cpu")
    targets = _functional_graph_targets(
        lambda *a: torch.ops.fastnmf.window_nmf_triton(*a, *attrs), x, g0, rm
    )
    assert targets[0] == "fastnmf.window_nmf_triton.default"
    assert not any("triton_kernel_wrapper" in t for t in targets)


def test_opcheck_cpu_layer_norm_path(gen):
    """Schema, fake, autograd registration and AOT dispatch of the channel norm ops on CPU."""
    x = torch.randn(2, 6, 3, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(6, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), 1e-5)
    torch.library.opcheck(torch.ops.fastnmf.channel_layer_norm.default, args)
    _, mean, rstd = torch.ops.fastnmf.channel_layer_norm(x.detach(), w.detach(), b.detach(), 1e-5)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastnmf.channel_layer_norm_backward.default,
                          (dy, x.detach(), w.detach(), mean, rstd))  # fmt: skip


@needs_triton
@pytest.mark.parametrize("design", [1, 2, 3])
def test_opcheck_window_backward_op(gen, design):
    x, g0, rm, *attrs = _window_args(gen, TRITON_DEVICE, dtype=torch.float64, design=design)
    _, *saved = torch.ops.fastnmf.window_nmf_triton(x, g0, rm, *attrs)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(TRITON_DEVICE)
    torch.library.opcheck(torch.ops.fastnmf.window_nmf_triton_backward.default,
                          (dy, x, g0, rm, *saved, *attrs))  # fmt: skip


class _Block(torch.nn.Module):
    """conv -> channel norm -> Triton window NMF (rank one, shifted windows, values unchecked:
    the window triton op) -> conv."""

    def __init__(self, gen):
        super().__init__()
        self.inp = torch.nn.Conv3d(4, 8, 1)
        self.out = torch.nn.Conv3d(8, 4, 1)
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(8, generator=gen))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(8, generator=gen))
        self.register_buffer("v0", torch.rand(64, 1, generator=gen))

    def forward(self, x):
        h = channel_layer_norm(self.inp(x), self.weight, self.bias)
        h = matricized_nmf(h, self.v0, head_dim=4, window=4, shifts=[None, 2], kernel="triton",
                           check=False)  # fmt: skip
        return self.out(h)


@needs_triton
def test_export_round_trip_holds_both_triton_ops(tmp_path, gen):
    """torch.export (which never decomposes a triton op) of an eval block: the program holds
    both ops; saved and loaded, it gives eager's output bit for bit (the same op calls)."""
    block = _Block(gen).to(TRITON_DEVICE).eval()
    x = torch.randn(1, 4, 8, 8, 8, generator=gen).to(TRITON_DEVICE)
    with torch.no_grad():
        expected = block(x)
    program = torch.export.export(block, (x,))
    targets = {str(n.target) for n in program.graph.nodes}
    assert {"fastnmf.channel_layer_norm.default", "fastnmf.window_nmf_triton.default"} <= targets
    torch.export.save(program, tmp_path / "block.pt2")
    loaded = torch.export.load(tmp_path / "block.pt2")
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), expected)


@needs_triton
def test_block_has_no_graph_breaks(gen):
    block = _Block(gen).to(TRITON_DEVICE)
    x = torch.randn(1, 4, 8, 8, 8, generator=gen).to(TRITON_DEVICE)
    explained = torch._dynamo.explain(block)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@needs_triton
@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="the interpreter runs on CPU tensors")
def test_wrap_triton_under_the_interpreter_is_the_kernel_itself():
    """Under TRITON_INTERPRET=1 ``wrap_triton`` returns the interpreted kernel unchanged, so a
    wrapped launch on CPU tensors is the direct one (and runs eagerly)."""
    from fastnmf.kernels import _common
    from fastnmf.kernels import channel_norm as cn

    wn = importlib.import_module("fastnmf.kernels.window_nmf")
    assert _common.INTERPRET
    for kernel in (wn._stats_fwd_kernel, wn._apply_bwd_kernel, cn._fwd_kernel):
        for wrap in (True, False):  # the direct launch, with the compile options
            assert _common.launch(kernel, wrap=wrap).kernel is kernel


@needs_triton
@pytest.mark.parametrize(
    "shifts, kind", [((None,), "fused"), ((None, 4), "tiled"), ((None, 1), "voxel")]
)
def test_wrapped_launches_equal_direct_launches_bitwise(shifts, kind, gen):
    """_forward / _backward of the first window design with ``wrap=True`` (as inside the op; on
    a GPU, called outside an op, wrap_triton dispatches through its HOP) and ``wrap=False``
    (WindowNMF's direct launches): the same bits, for the fused, tiled and per-voxel kernels."""
    wn = importlib.import_module("fastnmf.kernels.window_nmf")
    x, g0, rm, head_dim, patch, flat, iters, mu, _ = _window_args(gen, TRITON_DEVICE, shifts)
    dy = torch.randn(x.shape, generator=gen).to(TRITON_DEVICE)
    geo = wn._Geometry(x, head_dim, tuple(patch), custom_op.decode_shifts(flat, 3))
    assert (geo.fused, not geo.fused and geo.tiled) == (kind == "fused", kind == "tiled")
    results = []
    for wrap in (False, True):
        y, hats, norms = wn._forward(x, g0, rm, geo, iters, mu, save=True, wrap=wrap)
        dx = wn._backward(x, g0, rm, hats, norms, dy, geo, iters, mu, wrap=wrap)
        results.append((y, hats, norms, dx))
    for direct, wrapped in zip(*results, strict=True):
        assert torch.equal(direct, wrapped)
    assert results[0][0].abs().sum() > 0 and results[0][3].abs().sum() > 0


@needs_cuda
@needs_triton
@pytest.mark.parametrize("design", [1, 2, 3])
def test_inductor_compiles_the_triton_ops_on_cuda(gen, design, monkeypatch):
    """On a GPU: Inductor compiles the block with both ops decomposed into the kernels of each
    window design; compiled equals eager (forward and gradients) within float32 tolerance."""
    wn = importlib.import_module("fastnmf.kernels.window_nmf")
    monkeypatch.setitem(wn.TUNING, "design", design)
    torch._dynamo.reset()
    eager = _Block(gen).cuda()
    other = _Block(gen).cuda()
    other.load_state_dict(eager.state_dict())
    compiled = torch.compile(other, fullgraph=True)
    x = torch.randn(2, 4, 16, 16, 16, generator=gen).cuda()
    ye, yc = eager(x), compiled(x)
    torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
    (ye**2).mean().backward()
    (yc**2).mean().backward()
    for (name, pe), (_, pc) in zip(eager.named_parameters(), other.named_parameters(),
                                   strict=True):  # fmt: skip
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-3, atol=1e-5, msg=name)


@needs_triton
def test_window_op_names_a_bad_design(gen):
    x, g0, rm, *attrs = _window_args(gen, TRITON_DEVICE, design=4)
    with pytest.raises(ValueError, match="design must be 1, 2 or 3, got 4"):
        torch.ops.fastnmf.window_nmf_triton(x, g0, rm, *attrs)
