"""LayerNorm over the channel axis of a channels-first (B, C, *S) tensor, without a transpose.

``channel_layer_norm(x, weight, bias, eps)`` equals ``nn.LayerNorm(C)`` applied to
``x.movedim(1, -1)`` and moved back, but reads and writes x in its own layout: the old
formulation made the CUDA layer norm copy the channels-last view to contiguous memory in forward
and both arguments in backward (17 GB per BraTS training step, issue 17), and handed the next
pointwise convolution a channels-last tensor.

It is one registered op, ``torch.ops.fastnmf.channel_layer_norm(x, weight, bias, eps) -> (y,
mean, rstd)``, with a fake implementation, an autocast rule (float32, as CUDA autocast runs
``layer_norm``) and a hand-written backward op ``fastnmf::channel_layer_norm_backward``:

- CUDA: the Triton kernels of :mod:`fastnmf.kernels.channel_norm` (x read once forward; x and dy
  once backward; the derivation is written above the backward kernel);
- elsewhere (CPU): PyTorch's own layer norm on the channels-last view, the result copied back to
  channels-first (a CPU has no layout traffic worth saving, and PyTorch's CPU kernels are faster
  there: seen on a busy 2-core machine, the demo model's training step at 2 × 32³ took about 8 %
  longer than before with the formulas written over dim 1, about 3 % longer with this).

The training-step account (:mod:`fastnmf.profile.static.step_ops`) counts the op as the CUDA
path moves bytes.

Autograd keeps x (the block's residual stream itself, not a copy), weight and the per-voxel
mean / rstd (B × S fp32 each).

Both ops are ``torch.library.triton_op``s: on CUDA the launchers run with ``wrap=True``
(``wrap_triton``), so torch.compile traces the op into its Triton launches; on CPU and under
``TRITON_INTERPRET=1`` a traced graph keeps the op as one call (today's CPU results, also
compiled), and torch.export keeps it whole everywhere (see fastnmf/custom_op.py, "Triton").
No graph break either way.
"""

from __future__ import annotations

import importlib
import math

import torch

from .custom_op import decompose_only_when_traceable, record_kernels

__all__ = ["channel_layer_norm"]


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _use_triton(x: torch.Tensor) -> bool:
    if x.device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_forward(x, weight, bias, eps):
    """Off CUDA: PyTorch's own layer norm on the channels-last view, the result made
    channels-first again (a CPU has no layout to save; the copy keeps the op's output
    contiguous, as the fake and the Triton kernel have it)."""
    acc, c, b = _acc(x), x.shape[1], x.shape[0]  # statistics in fp32 (fp64), as on CUDA
    y, mean, rstd = torch.native_layer_norm(x.to(acc).movedim(1, -1), [c], weight.to(acc),
                                            bias.to(acc), eps)  # fmt: skip
    y = y.movedim(-1, 1).to(x.dtype).contiguous()
    return y, mean.reshape(b, -1), rstd.reshape(b, -1)  # mean, rstd: (B, S)


def _torch_backward(dy, x, weight, mean, rstd):
    """Off CUDA: PyTorch's layer-norm backward on the channels-last views."""
    stat = (x.shape[0], *x.shape[2:], 1)
    # the bias argument: only its shape and dtype are read (for db), so weight stands in
    acc, w = _acc(x), weight.to(_acc(x))
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy.to(acc).movedim(1, -1), x.to(acc).movedim(1, -1), [x.shape[1]], mean.view(stat),
        rstd.view(stat), w, w, [True, True, True])  # fmt: skip
    dx = dx.movedim(-1, 1).to(x.dtype).contiguous()
    return dx, dw.to(weight.dtype), db.to(weight.dtype)


def _kernels():
    """The Triton launchers' module, its kernels recorded for both ops (``record_kernels``)."""
    kernels = importlib.import_module("fastnmf.kernels.channel_norm")

    record_kernels("fastnmf::channel_layer_norm", [kernels._fwd_kernel])
    record_kernels("fastnmf::channel_layer_norm_backward", [kernels._bwd_kernel])
    return kernels


@torch.library.triton_op("fastnmf::channel_layer_norm", mutates_args=())
def _op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        return _kernels().channel_norm_forward(x, weight, bias, eps, wrap=True)
    return _torch_forward(x, weight, bias, eps)


@_op.register_fake
def _op_fake(x, weight, bias, eps):
    if _use_triton(x):
        _kernels()  # recorded before AOTAutograd computes its cache key (after this fake)
    stat = (x.shape[0], math.prod(x.shape[2:]))  # (B, S)
    return torch.empty_like(x), x.new_empty(stat, dtype=_acc(x)), x.new_empty(stat, dtype=_acc(x))


@torch.library.triton_op("fastnmf::channel_layer_norm_backward", mutates_args=())
def _backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    if _use_triton(x):
        return _kernels().channel_norm_backward(dy, x, weight, mean, rstd, wrap=True)
    return _torch_backward(dy, x, weight, mean, rstd)


@_backward_op.register_fake
def _backward_fake(dy, x, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _bias, _eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero tensors for mean / rstd's (absent) gradients


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    if dy is None:  # y unused by the loss (grads are not materialised)
        return None, None, None, None
    dx, dw, db = _backward_op(dy, x, weight, mean, rstd)
    return dx, dw, db, None


_op.register_autograd(_backward, setup_context=_setup_context)
decompose_only_when_traceable(_op)  # dy, the backward's first argument, is on x's device
decompose_only_when_traceable(_backward_op)
for _device in ("cuda", "cpu"):  # as autocast runs layer_norm: in float32
    torch.library.register_autocast("fastnmf::channel_layer_norm", _device, torch.float32)


def channel_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over dim 1 of (B, C, *S) with per-channel ``weight`` and ``bias`` (C,)."""
    if x.dim() < 3:
        raise ValueError(f"channel_layer_norm expects (B, C, *spatial), got {tuple(x.shape)}")
    if weight.shape != (x.shape[1],) or bias.shape != (x.shape[1],):
        raise ValueError(
            f"weight and bias must have shape ({x.shape[1]},) for C={x.shape[1]}, got "
            f"{tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    return _op(x, weight, bias, float(eps))[0]
