"""Run one NMF layer call of the static suite under the stub driver and record what a GPU would run.

For a :class:`~fastnmf.profile.static.cases.StaticCase`, ``fastnmf.matricized_nmf(...,
kernel="triton")`` runs forward and then backward on **meta** tensors of the benchmark shape (no
memory is allocated, no value computed): every Triton launch is compiled for the target and
recorded (:class:`~fastnmf.profile.static.driver.Launch`, numbered 0, 1, ... within its call), every
tensor built on the host from Python data (``torch.tensor([...], device=...)``: a host->device copy
on a GPU) is recorded, and so is every other PyTorch op that would launch a device kernel (fills,
reductions, copies, elementwise ops between the Triton launches).

The forward is a training forward (input requiring grad, so the kernels save what backward needs),
except where the Triton path has no backward (today global rank > 1): there it is an inference
forward and the backward is recorded as unsupported.

Needs a process in which Triton compiles (``TRITON_INTERPRET`` unset when the kernels were
imported): under the interpreter the kernels never reach a driver and choose the interpreter's
launch geometry. :func:`fastnmf.profile.static.kernel_report.kernel_rows` starts such a process
by itself.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import math

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .cases import DTYPES, PASSES, StaticCase, selected_design
from .driver import Launch, stub_driver
from .l2 import TARGETS

__all__ = ["CallRecord", "capture_case", "check_compiling", "persistent_grid"]

# aten ops that launch no device kernel (allocation, views, metadata)
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "detach", "alias", "view", "_unsafe_view", "reshape",
    "expand", "transpose", "t", "permute", "unsqueeze", "squeeze", "select", "slice", "unbind",
    "split", "as_strided", "lift_fresh",
}  # fmt: skip
_HOST_DATA_FACTORIES = {"tensor", "as_tensor"}


@dataclasses.dataclass
class CallRecord:
    """What one call (one pass) would run on a GPU."""

    pass_: str  # "fwd" or "bwd"
    forward_mode: str  # "training" or "inference" (the forward of this case)
    launches: list[Launch] = dataclasses.field(default_factory=list)
    host_device_copies: list[dict] = dataclasses.field(default_factory=list)
    torch_ops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    unsupported: str | None = None  # why the pass has no Triton path


def check_compiling() -> None:
    """Raise unless this process compiles Triton kernels (rather than interpreting them)."""
    import importlib

    import triton

    window = importlib.import_module("fastnmf.kernels.window_nmf")  # the module, not the function
    if triton.knobs.runtime.interpret or window.INTERPRET:
        raise RuntimeError(
            "the static kernel report compiles the kernels for a GPU and needs the launch geometry "
            "a GPU would use, but this process runs Triton's interpreter (TRITON_INTERPRET=1 when "
            "fastnmf.kernels was imported); use fastnmf.profile.static.kernel_report.kernel_rows, "
            "which starts a compiling process by itself"
        )


class _HostCopies(TorchFunctionMode):
    """Records torch.tensor / torch.as_tensor of Python or NumPy data (a host->device copy)."""

    def __init__(self, record: CallRecord, stub):
        super().__init__()
        self.record, self.stub = record, stub

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in _HOST_DATA_FACTORIES and args and not isinstance(args[0], torch.Tensor):
            self.record.host_device_copies.append({
                "op": f"torch.{name}",
                "shape": list(out.shape),
                "bytes": out.numel() * out.element_size(),
                "before_launch": len(self.stub.launches),
            })  # fmt: skip
        return out


class _DeviceOps(TorchDispatchMode):
    """Counts the aten ops that would launch a device kernel on a GPU."""

    def __init__(self, record: CallRecord):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NO_KERNEL:
            self.record.torch_ops[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


def _inputs(case: StaticCase, training: bool):
    """Meta tensors of the case's shape: x (B, C, *S), v0 (N, R)."""
    x = torch.empty(case.shape, dtype=DTYPES[case.dtype], device="meta", requires_grad=training)
    cols = math.prod(case.spatial) if case.mode == "global" else case.window ** len(case.spatial)
    v0 = torch.empty(cols, case.rank, dtype=torch.float32, device="meta")
    return x, v0


def _record(stub, record: CallRecord, fn):
    start = len(stub.launches)
    with _HostCopies(record, stub), _DeviceOps(record):
        out = fn()
    record.launches = stub.launches[start:]
    for copy in record.host_device_copies:
        copy["before_launch"] -= start
    return out


def capture_case(case: StaticCase, *, target: str) -> dict[str, CallRecord]:
    """Forward and backward of ``case`` under the stub driver for ``target``: {pass: CallRecord}.

    A case whose Triton path has no backward (NotImplementedError on a training forward) is
    recorded with an inference forward and ``unsupported`` set on the backward.
    """
    check_compiling()
    with stub_driver(target) as stub, persistent_grid(target):
        try:
            return _capture(case, stub, training=True)
        except NotImplementedError as err:
            calls = _capture(case, stub, training=False)
            calls["bwd"].unsupported = f"NotImplementedError: {err}"
            return calls


@contextlib.contextmanager
def persistent_grid(target: str):
    """Persistent kernels (kernels/_window3_sched.py) size their grid by the target's SMs."""
    tuning = importlib.import_module("fastnmf.kernels._window3_sched").TUNING
    saved = tuning["sms"]
    tuning["sms"] = TARGETS[target][1]
    try:
        yield
    finally:
        tuning["sms"] = saved


def _capture(case: StaticCase, stub, *, training: bool) -> dict[str, CallRecord]:
    import fastnmf

    mode = "training" if training else "inference"
    calls = {p: CallRecord(p, mode) for p in PASSES}
    x, v0 = _inputs(case, training)
    kw = dict(case.kwargs(), kernel="triton", check=False)
    with selected_design(case):
        with torch.set_grad_enabled(training):
            y = _record(stub, calls["fwd"], lambda: fastnmf.matricized_nmf(x, v0, **kw))
        if training:
            dy = torch.empty_like(y)
            _record(stub, calls["bwd"], lambda: y.backward(dy))
    return calls
