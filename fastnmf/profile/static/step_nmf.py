"""The NMF layer in the training-step account: one opaque op whose bytes come from the traffic
model of the Triton kernels (issue 14, part 3).

During the account every NMF layer runs with ``kernel="triton"``, and ``fastnmf.ops._triton`` (the
dispatch's hook to :mod:`fastnmf.kernels`) is replaced by :class:`_Shim`. Its
``matricized_nmf`` does what :func:`fastnmf.kernels.matricized_nmf` does around the kernels
(``x.contiguous()``: a copy when x is not contiguous, counted as a layout copy), then runs the
core as :class:`_OpaqueNMF`: forward allocates y and keeps for backward x and what the kernels
that run keep: for rank-one windows the design the layer picks for the call
(:func:`fastnmf.kernels.design_for`), its saved tensors as ``fastnmf.window_op._saved_shapes``
gives them (fp32, per shifted window: design 1 the power iterates and their norms, design 2 those
and K, design 3 u, the last iterate and K); the global path its iterates and norms; rank > 1 x
only. Backward allocates dx. The bytes, launches and FLOPs of each pass come from
:func:`_nmf_traffic` for a :class:`~fastnmf.profile.static.cases.StaticCase` built from the call,
with that design: the analytic model for design 1, the interpreter's counter at a small shape,
scaled, for designs 2 and 3.
"""

from __future__ import annotations

import contextlib
import functools
import math
from unittest import mock

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .cases import DTYPES, StaticCase, ideal_bytes

__all__ = ["nmf_as_opaque_op", "static_case", "_nmf_traffic"]

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@functools.cache
def _nmf_traffic(case: StaticCase, pass_: str) -> dict:
    """Bytes loaded / stored and launches of one NMF call and pass (``"fwd"`` / ``"bwd"``) from the
    traffic model (``fastnmf.profile.static.traffic.model_call``); where that module is missing,
    the ideal traffic (read x once, write y once; backward read x and dy, write dx), marked so."""
    try:
        from fastnmf.profile.static.traffic import model_call
    except ImportError:
        total = ideal_bytes(case, pass_)
        stored = case.numel * case.itemsize
        return {
            "bytes_loaded": total - stored,
            "bytes_stored": stored,
            "launches": None,
            "source": "ideal (traffic model missing)",
        }
    # the counter fallback runs the kernels (forward and backward) on real tensors: outside the
    # account's fake-tensor and counting modes and under hooks of its own that shadow the
    # account's saved-tensor hooks (what it moves is this call's traffic, added by the caller;
    # what it saves is not the step's)
    with _disable_current_modes(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
        out = dict(model_call(case, pass_))
    how = out.get("source")  # the traffic module's own label (e.g. analytic model or counter)
    out["source"] = f"traffic model ({how})" if how else "traffic model"
    return out


def _same(t):
    return t


def _uniform(value):
    """A tuple with equal entries -> the entry (StaticCase's int form); None stays None."""
    if value is None or isinstance(value, int):
        return value
    value = tuple(value)
    return value[0] if len(set(value)) == 1 else value


def _design(x: torch.Tensor, v0: torch.Tensor, head_dim, patch_size, shifts) -> int:
    """The window design that serves this call (1 where the window kernels do not run)."""
    if patch_size is None or v0.shape[1] > 1:
        return 1
    from fastnmf.kernels import design_for

    return design_for(x, head_dim, tuple(patch_size), shifts)


def static_case(x: torch.Tensor, v0: torch.Tensor, *, head_dim, patch_size, shifts, iters):
    """The :class:`StaticCase` of one ``matricized_nmf`` call (arguments as validated by ops),
    with the window design that serves it."""
    if x.dtype not in _DTYPE_NAMES:
        raise ValueError(
            f"the step account models the NMF in {', '.join(DTYPES)}, got an input of {x.dtype}"
        )
    mode = "global" if patch_size is None else "window"
    items = tuple(_uniform(s) for s in shifts) if shifts is not None else (None,)
    return StaticCase(
        mode=mode,
        batch=x.shape[0],
        channels=x.shape[1],
        spatial=tuple(x.shape[2:]),
        dtype=_DTYPE_NAMES[x.dtype],
        shifts=items,
        head_dim=head_dim,
        window=_uniform(patch_size),
        rank=v0.shape[1],
        iters=iters,
        design=_design(x, v0, head_dim, patch_size, shifts),
    )


def _saved_aux_numel(case: StaticCase) -> int:
    """fp32 values the rank-one kernels keep for backward besides x (module docstring)."""
    if case.rank > 1:
        return 0
    heads = case.channels // case.head_dim
    if case.mode != "window":  # the global path: iterates and norms per matrix
        return case.batch * heads * case.iters * (case.head_dim + 1)
    from fastnmf.window_op import _saved_shapes

    win = case.window if isinstance(case.window, tuple) else (case.window,) * len(case.spatial)
    windows = math.prod(s // p for s, p in zip(case.spatial, win, strict=True))
    programs = case.batch * heads * len(case.shifts) * windows
    shapes = _saved_shapes(case.design, programs, case.iters, case.head_dim)
    return sum(math.prod(shape) for shape in shapes)


class _OpaqueNMF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counter, case):
        with counter.opaque():
            y = torch.empty_like(x)
            aux = x.new_empty(_saved_aux_numel(case), dtype=torch.float32)
        _add(counter, case, "fwd")
        ctx.save_for_backward(x, aux)
        ctx.counter, ctx.case = counter, case
        return y

    @staticmethod
    def backward(ctx, dy):
        x, _aux = ctx.saved_tensors
        with ctx.counter.opaque():
            dx = torch.empty_like(x)
        _add(ctx.counter, ctx.case, "bwd")
        return dx, None, None


def _add(counter, case: StaticCase, pass_: str) -> None:
    t = _nmf_traffic(case, pass_)
    read, written = int(t["bytes_loaded"]), int(t["bytes_stored"])
    flops = int(t.get("flops") or 0)
    secs = counter.device.op_seconds(read + written, flops, "simt", None)
    counter.add("nmf", read, written, flops, secs, ops=int(t.get("launches") or 1))
    counter.nmf_sources.add(t["source"])
    counter.nmf_calls.append((case, pass_))


class _Shim:
    """Stands in for :mod:`fastnmf.kernels` during the account."""

    def __init__(self, counter):
        self.counter = counter

    def matricized_nmf(self, x, v0, *, head_dim, patch_size, shifts, u0=None, iters=5,
                       solver="hals", num_grad_steps=None):  # fmt: skip
        x = x.contiguous()
        case = static_case(x, v0, head_dim=head_dim, patch_size=patch_size, shifts=shifts,
                           iters=iters)  # fmt: skip
        return _OpaqueNMF.apply(x, self.counter, case)

    def nmf(self, *args, **kwargs):
        raise NotImplementedError("the step account models matricized_nmf only (the NMF layer)")


@contextlib.contextmanager
def nmf_as_opaque_op(counter):
    """While active, every ``kernel="triton"`` NMF layer call is one opaque op counted on
    ``counter`` by the traffic model."""
    counter.nmf_sources = set()
    counter.nmf_calls = []
    with mock.patch("fastnmf.ops._triton", lambda: _Shim(counter)):
        yield
