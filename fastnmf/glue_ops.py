"""The fused glue kernels (:mod:`fastnmf.kernels._glue`) as registered ops, and when the model
uses them.

``fastnmf::mlp_branch(x, ln_w, ln_b, eps, w1, b1, w2, b2, p, seed, dot) -> y`` is a Factorizer
block's ``x + MLP(LN2(x))`` (:mod:`fastnmf.kernels.mlp_branch`: one kernel, x read once and y
written once), with a hand-written backward op ``fastnmf::mlp_branch_backward`` (one kernel: x
and dy read once, dx written once, parameter gradients from per-program partial sums). Autograd
keeps x and the parameters; the dropout masks are regenerated from ``seed``.

Both are ``torch.library.triton_op``s, like ``fastnmf::channel_layer_norm``
(fastnmf/channel_norm.py): Triton kernels on CUDA (and on CPU tensors under
``TRITON_INTERPRET=1``, for the tests); nothing else runs them. The training-step account
(:mod:`fastnmf.profile.static.step_ops`) counts each as one op, as the kernels move bytes.

When the model uses them: :mod:`fastnmf.models.fused` decides (eager training on a GPU).
Unlike the lean branches of :mod:`fastnmf.models.recompute`, the fused branch's dropout masks
are Philox draws, not ``nn.Dropout``'s (same distribution, other values): with dropout 0 both
compute the same function (up to rounding: the kernels keep the hidden tensor in fp32, TF32
products on a GPU).
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from .custom_op import decompose_only_when_traceable, record_kernels

__all__ = ["fused_mlp_branch"]


def _triton_ready(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on x: a CUDA tensor, or the interpreter for CPU ones."""
    if importlib.util.find_spec("triton") is None:
        return False
    from .kernels._common import INTERPRET

    return x.device.type == "cuda" or INTERPRET


def _mlp_kernels():
    kernels = importlib.import_module("fastnmf.kernels.mlp_branch")
    record_kernels("fastnmf::mlp_branch", [kernels._fwd_kernel])
    record_kernels("fastnmf::mlp_branch_backward", [kernels._bwd_kernel])
    return kernels


def _need_triton(x: torch.Tensor, name: str) -> None:
    if not _triton_ready(x):
        raise RuntimeError(f"fastnmf::{name} runs Triton kernels: it needs a CUDA tensor "
                           f"(or TRITON_INTERPRET=1 for CPU tensors); got {x.device}")  # fmt: skip


@torch.library.triton_op("fastnmf::mlp_branch", mutates_args=())
def _mlp_op(
    x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float, w1: torch.Tensor,
    b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, p: float, seed: int, dot: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    _need_triton(x, "mlp_branch")
    return _mlp_kernels().mlp_forward(x, ln_w, ln_b, eps, w1, b1, w2, b2, p, seed, dot=dot,
                                      wrap=True)  # fmt: skip


@_mlp_op.register_fake
def _mlp_fake(x, ln_w, ln_b, eps, w1, b1, w2, b2, p, seed, dot):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.triton_op("fastnmf::mlp_branch_backward", mutates_args=())
def _mlp_backward_op(
    dy: torch.Tensor, x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, p: float, seed: int, dot: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:  # fmt: skip
    _need_triton(x, "mlp_branch_backward")
    return _mlp_kernels().mlp_backward(dy, x, ln_w, ln_b, eps, w1, b1, w2, p, seed, dot=dot,
                                       wrap=True)  # fmt: skip


@_mlp_backward_op.register_fake
def _mlp_backward_fake(dy, x, ln_w, ln_b, eps, w1, b1, w2, p, seed, dot):
    like = [ln_w, ln_b, w1, b1, w2, ln_b]  # db2 has C entries, like ln_b
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            *(torch.empty_like(t) for t in like))  # fmt: skip


def _mlp_setup(ctx, inputs, output):
    x, ln_w, ln_b, eps, w1, b1, w2, _b2, p, seed, dot = inputs
    ctx.save_for_backward(x, ln_w, ln_b, w1, b1, w2)
    ctx.args = (eps, p, seed, dot)


def _mlp_backward(ctx, dy):
    x, ln_w, ln_b, w1, b1, w2 = ctx.saved_tensors
    eps, p, seed, dot = ctx.args
    dx, dlnw, dlnb, dw1, db1, dw2, db2 = _mlp_backward_op(dy, x, ln_w, ln_b, eps, w1, b1, w2, p,
                                                          seed, dot)  # fmt: skip
    return dx, dlnw, dlnb, None, dw1, db1, dw2, db2, None, None, None


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)
decompose_only_when_traceable(_mlp_op)
decompose_only_when_traceable(_mlp_backward_op)


def fused_mlp_branch(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float,
                     w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                     p: float) -> torch.Tensor:  # fmt: skip
    """``x + drop(W2 drop(GELU(W1 LN(x) + b1)) + b2)`` in one fused op; W1 (H, C), W2 (C, H),
    ``p`` both dropouts' rate (a fresh Philox seed per call)."""
    from .kernels._glue import dropout_seed, matmul_dtype

    seed = dropout_seed() if p > 0 else 0
    return _mlp_op(x, ln_w, ln_b, float(eps), w1, b1, w2, b2, float(p), seed, matmul_dtype(x))
