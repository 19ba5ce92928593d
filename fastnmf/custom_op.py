"""The NMF layer core as a registered PyTorch op: ``torch.ops.fastnmf.matricized_nmf``.

Why: ``torch.compile`` and ``torch.export`` cannot trace through the eager dispatch of
:func:`fastnmf.matricized_nmf` without graph breaks (the value checks read data with
``float(t.amax())``, the window path caches gather indices with ``functools.lru_cache``). As
one opaque op with a fake (meta) implementation and a registered autograd formula, the layer is
a single node of the graph: zero graph breaks, Inductor fuses the convolutions / norms /
activations around it, and an exported program holds ``fastnmf.matricized_nmf`` as one call.

When it is used: :func:`fastnmf.matricized_nmf` routes to the op only while a graph is being
captured (``torch.compiler.is_compiling()``: ``torch.compile`` and strict ``torch.export``; or
``torch.compiler.is_exporting()``) or inside :func:`forced` (tests). Eager calls keep the direct
path, so eager results are bitwise what they were. The op's own implementation is that eager
path, so compiled and eager runs compute the same thing.

Schema (every non-tensor argument is an attribute the schema allows)::

    fastnmf::matricized_nmf(Tensor x, Tensor v0, Tensor? u0, int head_dim, int[] patch,
        int[] shifts, int iters, str solver, str kernel, int? num_grad_steps, bool? check)
        -> Tensor

- ``patch``: the window per spatial dim; ``[]`` = global matricization (``window=None``).
- ``shifts``: flat, ``ndim`` ints per shift (ndim = x.dim() - 2, the number of spatial dims);
  ``[]`` = ``shifts=None``. A ``None`` item is written as ``ndim`` zeros: both mean "no roll"
  (:func:`fastnmf.layout.shift_table` maps ``None`` to zeros), so the decoded list computes the
  same. ``[None, 2]`` in 3D is ``[0, 0, 0, 2, 2, 2]``.
- ``kernel``: already resolved (``"torch"`` or ``"triton"``; ``"auto"`` is resolved before).

Triton, rank one, windows, values unchecked (the default on a GPU): a second op,
``fastnmf::window_nmf_triton`` (fastnmf/window_op.py), runs the forward kernels of the window
design the eager dispatch picks (``fastnmf.kernels.design_for``) and returns what that design's
backward reads as outputs, and ``fastnmf::window_nmf_triton_backward`` runs its hand-written
backward kernels on them: no recomputation, the same bits as eager. These two are
``torch.library.triton_op``s (see "Triton" below); ``matricized_nmf`` and its backward stay
opaque ``custom_op``s (their bodies are the whole eager dispatch: value checks that read data,
cached gather indices, the torch solvers).

Autograd elsewhere: ``fastnmf::matricized_nmf_backward`` recomputes the layer's forward under
``torch.enable_grad()`` and back-propagates ``dy`` through it with ``torch.autograd.grad`` — i.e.
through the same hand-written backward the eager path uses (``WindowNMF`` / ``GlobalNMF``
Triton backward kernels, ``Rank1ClosedForm`` for kernel="torch", autograd of the batched loop for
rank > 1). No formula is duplicated here. The price is one extra forward of the NMF layer in the
backward (like activation checkpointing of that layer alone); only x (and v0, u0) are saved.

Autocast: the op has no autocast rule, so under ``torch.autocast`` it receives the tensor its
producer made (bf16 after an autocast conv) and returns the same dtype; the kernels load bf16 and
accumulate in fp32 (the closed form and the Triton kernels cast to fp32 themselves).

Triton: ``fastnmf::window_nmf_triton`` and its backward (fastnmf/window_op.py; like
``fastnmf::channel_layer_norm``, fastnmf/channel_norm.py) are ``torch.library.triton_op``s. Their
bodies call the launchers of ``fastnmf.kernels`` with ``wrap=True``, and every launch there is
``kernels._common.launch(kernel, wrap=...)[grid](...)``, i.e. ``wrap_triton(kernel)[grid](...)``
inside the op and ``kernel[grid](...)`` outside it. What that gives:

- eager: the op's implementation runs with wrap_triton disabled (``triton_op`` does so), so the
  launches are the direct ones, bit for bit the eager path's;
- torch.compile on CUDA: AOTAutograd traces the body under functionalization, so the graph holds
  the kernels themselves (``triton_kernel_wrapper_functional`` nodes; tables built on the host
  become graph constants), launched by Inductor's generated code. Checked without a GPU by
  tracing with fake CUDA tensors (tests/test_triton_op.py); the Inductor run itself is tested
  only where a GPU is present. The kernels are recorded for AOTAutograd's cache key
  (:func:`record_kernels`);
- where the body is not traceable, the graph keeps the op as one call with its fake, as a
  ``custom_op`` would (:func:`decompose_only_when_traceable`): under ``TRITON_INTERPRET=1``
  (``wrap_triton`` hands back an interpreted kernel as is: it has no traceable form and cannot
  run on fake tensors) and off CUDA;
- torch.export never decomposes a triton op: an exported program holds the op as one call.

Inductor does not fuse into a user Triton kernel; the glue around it is fused.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import threading
from collections.abc import Sequence

import torch

from .layout import as_tuple

__all__ = [
    "matricized_nmf_op", "wanted", "forced", "encode_shifts", "decode_shifts", "maybe_compile",
]  # fmt: skip

_STATE = threading.local()


def encode_shifts(shifts: Sequence | None, ndim: int) -> list[int]:
    """Shifts (None, or a list of None / ints / tuples of ``ndim`` ints) -> the flat int list of
    the schema (see the module docstring)."""
    if shifts is None:
        return []
    flat: list[int] = []
    for s in shifts:
        flat.extend((0,) * ndim if s is None else (int(v) for v in as_tuple(s, ndim)))
    return flat


def decode_shifts(flat: Sequence[int], ndim: int) -> list[tuple[int, ...]] | None:
    """Inverse of :func:`encode_shifts` (``None`` items come back as zero tuples)."""
    if len(flat) == 0:
        return None
    if len(flat) % ndim:
        raise ValueError(f"shifts list of {len(flat)} ints is not a multiple of ndim={ndim}")
    return [tuple(flat[i : i + ndim]) for i in range(0, len(flat), ndim)]


def wanted() -> bool:
    """Whether :func:`fastnmf.matricized_nmf` should call the op: while a graph is captured
    (compile / export) or inside :func:`forced`, and never from within the op itself."""
    if getattr(_STATE, "inside", False):
        return False
    if getattr(_STATE, "forced", False):
        return True
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


@contextlib.contextmanager
def _flag(name: str, value: bool):
    """Set the thread-local flag ``name`` of ``_STATE`` for the block, then restore it."""
    prev = getattr(_STATE, name, False)
    setattr(_STATE, name, value)
    try:
        yield
    finally:
        setattr(_STATE, name, prev)


def forced(enabled: bool = True):
    """Route eager calls through the op too (tests compare the op with the direct path)."""
    return _flag("forced", enabled)


@contextlib.contextmanager
def _autograd_on():
    """Record autograd inside an op's implementation. A custom op runs below the Autograd
    dispatch key (``_AutoDispatchBelowAutograd``: autograd is excluded from dispatch, so
    ``torch.enable_grad()`` alone records nothing); the backward op re-includes it to
    differentiate the eager path. Autocast stays excluded."""
    c = torch._C
    exclude = c._dispatch_tls_local_exclude_set().remove(c.DispatchKey.AutogradFunctionality)
    with c._ForceDispatchKeyGuard(c._dispatch_tls_local_include_set(), exclude):
        with torch.enable_grad():
            yield


def _inside():
    """Mark the op's own call of the eager path (which must not route to the op again)."""
    return _flag("inside", True)


def _eager(x, v0, u0, head_dim, patch, shifts, iters, solver, kernel, num_grad_steps, check):
    """The eager :func:`fastnmf.matricized_nmf` on decoded attributes."""
    from .ops import matricized_nmf

    ndim = x.dim() - 2
    with _inside():
        return matricized_nmf(
            x, v0, head_dim=head_dim, window=tuple(patch) if len(patch) else None,
            shifts=decode_shifts(shifts, ndim), u0=u0, iters=iters, solver=solver, kernel=kernel,
            num_grad_steps=num_grad_steps, check=check,
        )  # fmt: skip


# The attributes of both ops, in order: one source for their schemas and for the backward's
# ``None`` gradients.
_ATTR_SCHEMA = (
    "int head_dim, int[] patch, int[] shifts, int iters, str solver, str kernel, "
    "int? num_grad_steps, bool? check"
)
_ATTRS = tuple(arg.split()[-1] for arg in _ATTR_SCHEMA.split(", "))


@torch.library.custom_op(
    "fastnmf::matricized_nmf", mutates_args=(),
    schema=f"(Tensor x, Tensor v0, Tensor? u0, {_ATTR_SCHEMA}) -> Tensor",
)  # fmt: skip
def _op(x: torch.Tensor, v0: torch.Tensor, u0: torch.Tensor | None, *attrs) -> torch.Tensor:
    """y of the eager path; ``attrs`` as in ``_ATTRS``."""
    with torch.no_grad():
        y = _eager(x, v0, u0, *attrs)
    # an op output may not alias an input; the eager path always returns a fresh tensor, but
    # make it a guarantee (contiguous, like the fake)
    if y.data_ptr() == x.data_ptr():
        y = y.clone()
    return y.contiguous()


@_op.register_fake
def _op_fake(x, v0, u0, *attrs):
    return x.new_empty(x.shape)


@torch.library.custom_op(
    "fastnmf::matricized_nmf_backward", mutates_args=(),
    schema=(
        f"(Tensor dy, Tensor x, Tensor v0, Tensor? u0, {_ATTR_SCHEMA}, bool grad_v0, "
        "bool grad_u0) -> (Tensor, Tensor, Tensor)"
    ),
)  # fmt: skip
def _backward_op(
    dy: torch.Tensor, x: torch.Tensor, v0: torch.Tensor, u0: torch.Tensor | None, *rest
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dv0, du0): dv0 / du0 are zeros when not asked for, du0 is empty when u0 is None.
    ``rest``: the attributes of ``_ATTRS``, then grad_v0 and grad_u0."""
    *attrs, grad_v0, grad_u0 = rest
    with _autograd_on():
        xg = x.detach().requires_grad_(True)
        vg = v0.detach().requires_grad_(grad_v0)
        ug = None if u0 is None else u0.detach().requires_grad_(grad_u0)
        y = _eager(xg, vg, ug, *attrs)
        inputs = [xg] + ([vg] if grad_v0 else []) + ([ug] if grad_u0 and ug is not None else [])
        grads = torch.autograd.grad(y, inputs, dy, allow_unused=True)
    dx = grads[0] if grads[0] is not None else torch.zeros_like(x)
    rest = list(grads[1:])
    dv0 = rest.pop(0) if grad_v0 else None
    du0 = rest.pop(0) if grad_u0 and u0 is not None else None
    dv0 = torch.zeros_like(v0) if dv0 is None else dv0
    du0 = (x.new_empty(0) if u0 is None else torch.zeros_like(u0)) if du0 is None else du0
    return dx.contiguous(), dv0.contiguous(), du0.contiguous()


@_backward_op.register_fake
def _backward_fake(dy, x, v0, u0, *rest):
    du0 = x.new_empty(0) if u0 is None else u0.new_empty(u0.shape)
    return x.new_empty(x.shape), v0.new_empty(v0.shape), du0


def _setup_context(ctx, inputs, output):
    x, v0, u0, *attrs = inputs
    ctx.save_for_backward(x, v0, u0)
    ctx.attrs = attrs
    ctx.has_u0 = u0 is not None


def _op_backward(ctx, dy):
    x, v0, u0 = ctx.saved_tensors
    grad_v0 = ctx.needs_input_grad[1]
    grad_u0 = ctx.has_u0 and ctx.needs_input_grad[2]
    dx, dv0, du0 = _backward_op(dy, x, v0, u0, *ctx.attrs, grad_v0, grad_u0)
    return (dx, dv0 if grad_v0 else None, du0 if grad_u0 else None) + (None,) * len(_ATTRS)


_op.register_autograd(_op_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Triton ops (``torch.library.triton_op``): the launches inside go through ``wrap_triton``
# (kernels._common.launch), so a traced call (torch.compile on CUDA) records the kernels themselves
# in the graph; eager calls launch them directly, bit for bit the direct path.


def triton_traceable(x: torch.Tensor) -> bool:
    """Whether a triton op's body can be traced into a graph for input ``x``: its Triton kernels
    run compiled (CUDA, Triton importable, not ``TRITON_INTERPRET=1``). Under the interpreter
    ``wrap_triton`` hands back the interpreted kernel itself (no traceable wrapper exists for it),
    which would run on fake tensors; off CUDA the body is not Triton at all."""
    if x.device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    from .kernels._common import INTERPRET

    return not INTERPRET


def decompose_only_when_traceable(op) -> None:
    """Let torch.compile trace into the triton op ``op`` (its default under functionalization)
    only where :func:`triton_traceable` holds for its first tensor argument; elsewhere the graph
    keeps the op as one call with its fake, like a ``custom_op`` (and like ``torch.export``,
    which never decomposes a triton op)."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    trace_body = op._torch_dispatch_fns[FunctionalTensorMode]  # triton_op's own rule

    def rule(mode, func, types, args, kwargs):
        if triton_traceable(args[0]):
            return trace_body(mode, func, types, args, kwargs)
        return mode.__torch_dispatch__(func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, rule)


def record_kernels(name: str, kernels) -> None:
    """Name the Triton kernels of triton op ``name`` for AOTAutograd's cache key (their source
    is part of it). ``triton_op`` finds them itself only when the body calls ``wrap_triton`` on a
    kernel by name; here the launchers of ``fastnmf.kernels`` do it through ``launch``."""
    from torch._library import triton as library_triton

    library_triton.triton_ops_to_kernels[name] = list(kernels)


def _direct_window_path(x, v0, u0, patch, iters, kernel, num_grad_steps, check) -> bool:
    """Whether the eager path would reach the window kernels (kernels.design_for's design) with x
    as is: Triton, rank one, windows, iters >= 1, no value checks (no rescaling: the default on a
    GPU), the full gradient, v0 fixed."""
    from . import _checks as C

    return (
        kernel == "triton" and patch is not None and v0.shape[1] == 1 and iters >= 1
        and not C.want_value_checks(check, x) and not v0.requires_grad
        and (num_grad_steps is None or num_grad_steps >= iters)
    )  # fmt: skip


def matricized_nmf_op(
    x: torch.Tensor,
    v0: torch.Tensor,
    *,
    head_dim: int,
    patch: Sequence[int] | None,
    shifts: Sequence | None,
    u0: torch.Tensor | None,
    iters: int,
    solver: str,
    kernel: str,
    num_grad_steps: int | None,
    check: bool | None,
) -> torch.Tensor:
    """Call ``torch.ops.fastnmf.matricized_nmf`` with validated arguments of
    :func:`fastnmf.matricized_nmf` (patch a tuple or None, shifts validated, kernel resolved)."""
    if kernel not in ("torch", "triton"):
        raise ValueError(f"the fastnmf op takes kernel 'torch' or 'triton', got {kernel!r}")
    if _direct_window_path(x, v0, u0, patch, iters, kernel, num_grad_steps, check):
        from .window_op import window_triton

        return window_triton(x, v0, u0, head_dim, patch, shifts, iters, solver)
    ndim = x.dim() - 2
    return _op(
        x, v0, u0, head_dim, [] if patch is None else [int(p) for p in patch],
        encode_shifts(shifts, ndim), iters, solver, kernel, num_grad_steps, check,
    )  # fmt: skip


def maybe_compile(model: torch.nn.Module, *, enabled: bool, backend: str = "inductor", mode=None):
    """``torch.compile(model)`` when ``enabled`` (``fastnmf train --compile``), else ``model``.

    The NMF layers are one registered op each, so the compiled model has no graph breaks;
    Inductor compiles the convolutions, norms and activations around them. The parameters are
    shared with ``model`` (save and load the state dict of ``model``, not of the wrapper).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    if not enabled:
        return model
    return torch.compile(model, backend=backend, mode=mode)
