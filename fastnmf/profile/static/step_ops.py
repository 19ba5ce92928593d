"""Bytes, FLOPs, roofline time and live memory of every aten op (a TorchDispatchMode).

Per op (as it reaches the dispatcher below autograd: composite ops arrive decomposed):

- **bytes read** = every distinct tensor input's touched bytes (itemsize x the product of the
  sizes whose stride is not 0, so a broadcast input counts once); **bytes written** = every new
  output's plus every argument the op mutates (``add_``, ``_foreach_mul_``...). Ops that only write
  their first argument (``copy_``, ``fill_``, ``zero_``, ``bernoulli_``...) do not read it, nor do
  factories that take only its shape (``new_zeros``, ``zeros_like``...). Views
  (aliasing outputs: ``view``, ``permute``, ``movedim``, ``expand``...) and allocations (``empty*``)
  move no bytes. What an op does inside its kernel is not seen: e.g. the CUDA layer norm copies a
  non-contiguous input (the old ``ChannelLayerNorm``'s ``movedim``) to contiguous memory first;
  that copy is added explicitly (``IMPLICIT_CONTIGUOUS``) and counted as a layout copy.
  fastnmf's channels-first LayerNorm (``fastnmf::channel_layer_norm`` and its backward op,
  :data:`COUNTED_FASTNMF_OPS`) is counted as one op: its inputs read once, its outputs written
  once, as its Triton kernels do on CUDA.
- **FLOPs**: ``torch.utils.flop_counter``'s formulas for matrix products, convolutions and
  attention (2 per multiply-add); any other op is counted as one FLOP per output element (a
  rough figure, but such ops are bandwidth-bound by orders of magnitude, so it never sets their
  roofline time).
- **class**: one of :data:`CLASSES` (see :func:`classify`).
- **roofline time**: ``max(bytes / copy bandwidth, FLOPs / peak)`` with the peak of the op's kind
  and dtype (:class:`~fastnmf.profile.static.step_device.DeviceFigures`), summed per class.
- **live memory**: every storage an op allocates is tracked (by a weak reference) until it is
  freed; the largest total over the step is the simulated peak, with the storages live at that
  moment kept for the breakdown. The CUDA caching allocator's rounding and fragmentation,
  cuDNN / cuBLAS workspaces and memory allocated inside kernels are not seen.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

__all__ = ["CLASSES", "StepCounter", "classify", "touched_bytes", "op_bytes"]

CLASSES = ("nmf", "fused", "norm", "pointwise_conv", "conv", "elementwise", "layout", "other")

aten = torch.ops.aten
_CONV = {"convolution", "convolution_backward", "_convolution", "cudnn_convolution"}
_LINEAR = {"mm", "addmm"}  # nn.Linear: a 1x1x1 conv over the channels of every voxel / token
_LAYOUT = {
    "clone", "copy_", "cat", "stack", "roll", "constant_pad_nd", "index_select", "gather",
    "slice_backward", "select_backward", "as_strided_scatter", "slice_scatter", "select_scatter",
    "repeat", "flip", "index", "index_put", "index_put_", "_unsafe_index", "scatter", "scatter_",
    "permute_copy", "expand_copy", "narrow_copy", "unfold_backward", "reflection_pad3d",
    "replication_pad3d",
}  # fmt: skip
_ELEMENTWISE = {
    "native_dropout", "native_dropout_backward", "bernoulli_", "bernoulli", "fill_", "zero_",
    "new_zeros", "zeros_like", "ones_like", "full_like", "zeros", "ones", "full", "scalar_tensor",
    "rand_like", "uniform_", "normal_", "threshold_backward", "gelu_backward", "sigmoid_backward",
    "silu_backward", "leaky_relu_backward", "elu_backward", "tanh_backward", "masked_fill",
    "masked_fill_", "_to_copy", "lerp_", "addcdiv_", "addcmul_",
}  # fmt: skip
_NORM_WORDS = ("layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm")
_ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
_WRITE_ONLY = {"copy_", "fill_", "zero_", "bernoulli_", "uniform_", "normal_", "random_"}
# factories that take only the shape, dtype and device of their tensor argument (read nothing)
_SHAPE_ONLY = {"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like",
               "rand_like", "randn_like"}  # fmt: skip
# ops whose CUDA kernel (or launcher) makes these (non-contiguous) tensor arguments contiguous
IMPLICIT_CONTIGUOUS = {"native_layer_norm": (0,), "native_layer_norm_backward": (0, 1),
                       "channel_layer_norm": (0,), "channel_layer_norm_backward": (0, 1)}
# fastnmf's own ops counted like aten ops: one kernel that reads each input once and writes each
# output once (the channels-first LayerNorm's Triton kernels on CUDA; the backward's partial sums
# of dw / db, written and read once more, are added, with their reduction as one more op); the
# NMF layer is counted by the traffic model instead (step_nmf)
# the fused glue ops (fastnmf/glue_ops.py), class "fused": their matrix-product FLOPs from the
# arguments (2 per multiply-add per product, activation elements B C S x the weight's rows:
# mlp forward fc1 + fc2, backward fc1 again, dW2, dg, dW1, dn; norm_proj forward W, backward dn,
# dW; proj_residual forward W, backward dz, dW; pair_proj forward both weights, backward their
# two input gradients and two weight gradients) and, for the backward ops, the launcher of their
# partial sums' workspace bytes (kernel module, function, index of the weight arg)


def _mm(k: int, i: int, j: int):
    return lambda a: k * a[i].numel() * a[j].shape[0]


def _pair(k: int, first: int):  # skip, x at first, first + 1; their weights at first + 2, + 3
    return lambda a: k * a[first + 2].shape[0] * (a[first].numel() + a[first + 1].numel())


_FUSED_MATMULS = {
    "mlp_branch": _mm(4, 0, 4), "mlp_branch_backward": _mm(10, 1, 5),
    "norm_proj": _mm(2, 0, 4), "norm_proj_backward": _mm(4, 1, 5),
    "proj_residual": _mm(2, 0, 2), "proj_residual_backward": _mm(4, 1, 2),
    "pair_proj": _pair(2, 0), "pair_proj_backward": _pair(4, 1),
}  # fmt: skip
_FUSED_WORKSPACE = {
    "mlp_branch_backward": ("mlp_branch", "backward_workspace_bytes", 5),
    "norm_proj_backward": ("proj_glue", "norm_proj_workspace_bytes", 5),
    "proj_residual_backward": ("proj_glue", "proj_residual_workspace_bytes", 2),
    "pair_proj_backward": ("pair_proj", "pair_proj_workspace_bytes", 3),
}  # fmt: skip
COUNTED_FASTNMF_OPS = frozenset({"channel_layer_norm", "channel_layer_norm_backward",
                                 *_FUSED_MATMULS})  # fmt: skip
H200_SMS = 132  # the persistent glue kernels' programs: PROGRAMS_PER_SM per SM


def touched_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of ``t`` (a broadcast, stride-0 dim counts once)."""
    if t.numel() == 0:
        return 0
    return t.element_size() * math.prod(s for s, st in zip(t.shape, t.stride(), strict=True) if st)


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _unique(ts):
    seen, out = set(), []
    for t in ts:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _mutated(func, args, kwargs) -> list[torch.Tensor]:
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            val = args[i] if i < len(args) else kwargs.get(a.name)
            out.extend(_tensors(val))
    return out


def _is_view(func) -> bool:
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def op_bytes(func, args, kwargs, out) -> tuple[int, int]:
    """(bytes read, bytes written) of one op call; (0, 0) for views and allocations."""
    name = func.overloadpacket.__name__
    if _is_view(func) or name in _ALLOC:
        return 0, 0
    inputs = _unique(_tensors((args, kwargs)))
    mutated = _unique(_mutated(func, args, kwargs))
    mut_ids = {id(t) for t in mutated}
    in_ids = {id(t) for t in inputs}
    skip = mut_ids if name in _WRITE_ONLY else set()
    read = 0 if name in _SHAPE_ONLY else sum(touched_bytes(t) for t in inputs if id(t) not in skip)
    news = [t for t in _unique(_tensors(out)) if id(t) not in in_ids]
    written = sum(touched_bytes(t) for t in mutated) + sum(touched_bytes(t) for t in news)
    return read, written


def _is_pointwise_conv(func, args) -> bool:
    name = func.overloadpacket.__name__
    weight, stride = (args[2], args[4]) if name == "convolution_backward" else (args[1], args[3])
    return all(k == 1 for k in weight.shape[2:]) and all(s == 1 for s in stride)


def classify(func, args, kwargs=None) -> str:
    """The op class: conv / pointwise_conv (1x1x1, stride 1; and nn.Linear's mm / addmm), norm,
    layout (data movement: copies, cat, roll, pad, gather...), elementwise (pointwise-tagged ops,
    dropout, fills, dtype casts, the optimizer's ``_foreach_*``), other (reductions, softmax,
    batched matrix products, attention, pooling, resampling, losses...)."""
    name = func.overloadpacket.__name__
    if name in _FUSED_MATMULS:
        return "fused"
    if name in _CONV:
        return "pointwise_conv" if _is_pointwise_conv(func, args) else "conv"
    if name in _LINEAR:
        return "pointwise_conv"
    if any(w in name for w in _NORM_WORDS):
        return "norm"
    if name == "_to_copy" and args and isinstance(args[0], torch.Tensor):
        dtype = (kwargs or {}).get("dtype")
        return "layout" if dtype in (None, args[0].dtype) else "elementwise"
    if name in _LAYOUT:
        return "layout"
    if torch.Tag.pointwise in func.tags or name in _ELEMENTWISE or name.startswith("_foreach_"):
        return "elementwise"
    return "other"


def _fused_workspace(name: str, args) -> int:
    """Bytes of a fused backward op's partial sums (written by its kernel, read by the sum)."""
    import importlib

    from fastnmf.kernels._glue import PROGRAMS_PER_SM

    module, fn, j = _FUSED_WORKSPACE[name]
    bytes_of = getattr(importlib.import_module(f"fastnmf.kernels.{module}"), fn)
    x = args[1]  # the activation the kernel tiles (x; z for proj_residual, skip for pair_proj)
    extra = {"x_channels": args[2].shape[1]} if name == "pair_proj_backward" else {}
    return bytes_of(tuple(x.shape), args[j].shape[0], x.dtype, PROGRAMS_PER_SM * H200_SMS,
                    **extra)  # fmt: skip


def _kind(func) -> str:
    name = func.overloadpacket.__name__
    if name in _FUSED_MATMULS or name in _CONV:  # tensor cores, TF32 for fp32 (tl.dot's default)
        return "conv"
    return "matmul" if func.overloadpacket in flop_registry else "simt"


def _dtype(args) -> torch.dtype | None:
    for t in _tensors(args):
        if t.is_floating_point():
            return t.dtype
    return None


def _zero() -> dict:
    return {"bytes_read": 0, "bytes_written": 0, "flops": 0, "ops": 0, "seconds": 0.0}


class StepCounter(TorchDispatchMode):
    """Counts every op by class (and by phase) and tracks live memory; see the module doc."""

    def __init__(self, device):
        super().__init__()
        self.device = device
        self.by_class = {c: _zero() for c in CLASSES}
        self.by_phase: dict[str, dict] = defaultdict(_zero)
        self.phase = "setup"
        self.views = 0
        self._opaque = 0
        self._live: dict[int, tuple[StorageWeakRef, int, int]] = {}  # address -> ref, bytes, serial
        self._serial = 0
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_sizes: dict[int, int] = {}  # storages live at the peak: serial -> bytes
        self.peak_phase = ""

    # -- bookkeeping -------------------------------------------------------------------------
    def add(self, cls: str, read: int, written: int, flops: int, seconds: float, ops: int = 1):
        for acc in (self.by_class[cls], self.by_phase[self.phase]):
            acc["bytes_read"] += read
            acc["bytes_written"] += written
            acc["flops"] += flops
            acc["ops"] += ops
            acc["seconds"] += seconds

    @contextlib.contextmanager
    def opaque(self):
        """Ops inside are not counted (their cost is added by the caller), memory still is."""
        self._opaque += 1
        try:
            yield
        finally:
            self._opaque -= 1

    def track(self, tensors) -> list[int]:
        """Track the storages of ``tensors`` (those made before the mode was entered, or outside
        its view) and return their serial numbers (unique over the step, unlike addresses)."""
        serials = []
        for t in _tensors(tensors):
            st = t.untyped_storage()
            key = st._cdata
            entry = self._live.get(key)
            if entry is None or entry[0].expired():
                if entry is not None:
                    self.live_bytes -= entry[1]
                self._serial += 1
                entry = (StorageWeakRef(st), st.nbytes(), self._serial)
                self._live[key] = entry
                self.live_bytes += st.nbytes()
            serials.append(entry[2])
        self._update_peak()
        return serials

    def _update_peak(self) -> None:
        for key in [k for k, (ref, _, _) in self._live.items() if ref.expired()]:
            self.live_bytes -= self._live.pop(key)[1]
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_sizes = {serial: n for _, n, serial in self._live.values()}
            self.peak_phase = self.phase

    # -- dispatch ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace != "aten" and not (
            func.namespace == "fastnmf" and func.overloadpacket.__name__ in COUNTED_FASTNMF_OPS
        ):
            return out
        self.track(_tensors(out))
        if self._opaque:
            return out
        if _is_view(func):
            self.views += 1
            return out
        self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        read, written = op_bytes(func, args, kwargs, out)
        name = func.overloadpacket.__name__
        if name in _FUSED_MATMULS:
            flops = _FUSED_MATMULS[name](args)
        elif func.overloadpacket in flop_registry:
            flops = int(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
        else:
            flops = sum(t.numel() for t in _tensors(out))
        cls, dtype = classify(func, args, kwargs), _dtype(args)
        secs = self.device.op_seconds(read + written, flops, _kind(func), dtype)
        self.add(cls, read, written, flops, secs)
        if name == "channel_layer_norm_backward":  # its partial sums
            from fastnmf.kernels.channel_norm import backward_workspace_bytes

            extra = backward_workspace_bytes(tuple(args[1].shape), args[1].dtype)
            self.add(cls, extra // 2, extra // 2, 0, extra / self.device.copy_bytes_per_s, ops=1)
        if name in _FUSED_WORKSPACE:  # its per-program partial sums
            extra = _fused_workspace(name, args)
            self.add(cls, extra // 2, extra // 2, 0, extra / self.device.copy_bytes_per_s, ops=1)
        for i in IMPLICIT_CONTIGUOUS.get(func.overloadpacket.__name__, ()):
            t = args[i] if i < len(args) else None
            if isinstance(t, torch.Tensor) and not t.is_contiguous():
                nbytes = touched_bytes(t)
                self.add("layout", nbytes, nbytes, 0, 2 * nbytes / self.device.copy_bytes_per_s)
