"""The fused glue kernels (:mod:`fastnmf.kernels._glue`) as registered ops.

- ``fastnmf::mlp_branch(x, ln_w, ln_b, eps, w1, b1, w2, b2, p, seed, dot) -> y``: a Factorizer
  block's ``x + MLP(LN2(x))`` (:mod:`fastnmf.kernels.mlp_branch`: one kernel, x read once and y
  written once), with a hand-written backward op ``fastnmf::mlp_branch_backward`` (one kernel:
  x and dy read once, dx written once, parameter gradients from per-program partial sums).
  Autograd keeps x and the parameters; the dropout masks are regenerated from ``seed``.
- ``fastnmf::norm_proj`` (LN1 + in-projection) and ``fastnmf::proj_residual`` (out-projection
  + dropout + residual) with their backward ops (:mod:`fastnmf.kernels.proj_glue`); the model
  runs them around its NMF layer in one autograd Function (:func:`fused_context_branch`) whose
  backward hands the residual's gradient to norm_proj's backward kernel (``dres``).
- ``fastnmf::pair_proj`` (+ backward): a decoder block's skip adapter ``drop(W_s skip + W_x x)``
  (:mod:`fastnmf.kernels.pair_proj`).

All are ``torch.library.triton_op``s, like ``fastnmf::channel_layer_norm``
(fastnmf/channel_norm.py): Triton kernels on CUDA (and on CPU tensors under
``TRITON_INTERPRET=1``, for the tests); nothing else runs them. The training-step account
(:mod:`fastnmf.profile.static.step_ops`) counts each as one op, as the kernels move bytes.

When the model uses them: :mod:`fastnmf.models.fused` decides (eager training on a GPU).
Unlike the lean branches of :mod:`fastnmf.models.recompute`, the fused ops' dropout masks are
Philox draws, not ``nn.Dropout``'s (same distribution, other values): with dropout 0 both
compute the same function (up to rounding: the kernels keep intermediates in fp32, TF32
products on a GPU).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from .custom_op import decompose_only_when_traceable, record_kernels

__all__ = ["fused_mlp_branch", "fused_context_branch", "fused_pair_proj"]


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


# ----------------------------------------------------------------------------------------------
# The context branch: LN1 + in-projection (norm_proj), out-projection + dropout + residual
# (proj_residual), around the NMF layer (kernels/proj_glue.py)


def _proj_kernels():
    kernels = importlib.import_module("fastnmf.kernels.proj_glue")
    record_kernels("fastnmf::norm_proj", [kernels._norm_proj_fwd_kernel])
    record_kernels("fastnmf::norm_proj_backward", [kernels._norm_proj_bwd_kernel])
    record_kernels("fastnmf::proj_residual", [kernels._proj_residual_fwd_kernel])
    record_kernels("fastnmf::proj_residual_backward", [kernels._proj_residual_bwd_kernel])
    return kernels


def _out_like(x: torch.Tensor, channels: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], channels, *x.shape[2:]))


@torch.library.triton_op("fastnmf::norm_proj", mutates_args=())
def _norm_proj_op(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float,
                  w: torch.Tensor, dot: torch.dtype) -> torch.Tensor:  # fmt: skip
    _need_triton(x, "norm_proj")
    return _proj_kernels().norm_proj_forward(x, ln_w, ln_b, eps, w, dot=dot, wrap=True)


@_norm_proj_op.register_fake
def _norm_proj_fake(x, ln_w, ln_b, eps, w, dot):
    return _out_like(x, w.shape[0])


@torch.library.triton_op("fastnmf::norm_proj_backward", mutates_args=())
def _norm_proj_backward_op(
    dz: torch.Tensor, x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float,
    w: torch.Tensor, dot: torch.dtype, dres: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    _need_triton(x, "norm_proj_backward")
    return _proj_kernels().norm_proj_backward(dz, x, ln_w, ln_b, eps, w, dres=dres, dot=dot,
                                              wrap=True)  # fmt: skip


@_norm_proj_backward_op.register_fake
def _norm_proj_backward_fake(dz, x, ln_w, ln_b, eps, w, dot, dres=None):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(ln_w),
            torch.empty_like(ln_b), torch.empty_like(w))  # fmt: skip


def _norm_proj_setup(ctx, inputs, output):
    x, ln_w, ln_b, eps, w, dot = inputs
    ctx.save_for_backward(x, ln_w, ln_b, w)
    ctx.args = (eps, dot)


def _norm_proj_backward(ctx, dz):
    x, ln_w, ln_b, w = ctx.saved_tensors
    eps, dot = ctx.args
    dx, dlnw, dlnb, dw = _norm_proj_backward_op(dz, x, ln_w, ln_b, eps, w, dot)
    return dx, dlnw, dlnb, None, dw, None


@torch.library.triton_op("fastnmf::proj_residual", mutates_args=())
def _proj_residual_op(z: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                      p: float, seed: int, dot: torch.dtype) -> torch.Tensor:  # fmt: skip
    _need_triton(z, "proj_residual")
    return _proj_kernels().proj_residual_forward(z, x, w, b, p, seed, dot=dot, wrap=True)


@_proj_residual_op.register_fake
def _proj_residual_fake(z, x, w, b, p, seed, dot):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.triton_op("fastnmf::proj_residual_backward", mutates_args=())
def _proj_residual_backward_op(
    dout: torch.Tensor, z: torch.Tensor, w: torch.Tensor, p: float, seed: int, dot: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    _need_triton(z, "proj_residual_backward")
    return _proj_kernels().proj_residual_backward(dout, z, w, p, seed, dot=dot, wrap=True)


@_proj_residual_backward_op.register_fake
def _proj_residual_backward_fake(dout, z, w, p, seed, dot):
    return (torch.empty_like(z, memory_format=torch.contiguous_format), torch.empty_like(w),
            w.new_empty(w.shape[0]))  # fmt: skip


def _proj_residual_setup(ctx, inputs, output):
    z, _x, w, _b, p, seed, dot = inputs
    ctx.save_for_backward(z, w)
    ctx.args = (p, seed, dot)


def _proj_residual_backward(ctx, dout):
    z, w = ctx.saved_tensors
    p, seed, dot = ctx.args
    dz, dw, db = _proj_residual_backward_op(dout, z, w, p, seed, dot)
    return dz, dout, dw, db, None, None, None  # the residual's gradient is dout itself


for _op, _bwd, _setup, _back in (
    (_norm_proj_op, _norm_proj_backward_op, _norm_proj_setup, _norm_proj_backward),
    (_proj_residual_op, _proj_residual_backward_op, _proj_residual_setup,
     _proj_residual_backward),
):  # fmt: skip
    _op.register_autograd(_back, setup_context=_setup)
    decompose_only_when_traceable(_op)
    decompose_only_when_traceable(_bwd)


class _ContextBranch(torch.autograd.Function):
    """``x + drop(W_out mid(W_in LN(x)) + b_out)``: norm_proj, ``mid`` (the NMF layer, with its
    own autograd), proj_residual; backward: proj_residual's, mid's (``torch.autograd.grad``),
    then norm_proj's with the residual's gradient ``dout`` added inside its kernel (x's two
    gradients are not summed in another pass)."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w_in, w_out, b_out, mid, eps, p, seed, dot):
        z = _norm_proj_op(x, ln_w, ln_b, eps, w_in, dot)
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            m = mid(z)  # (B, C, *S), its graph back to z kept for backward
        kept = m.detach()
        out = _proj_residual_op(kept, x, w_out, b_out, p, seed, dot)
        ctx.save_for_backward(x, ln_w, ln_b, w_in, w_out, kept)
        ctx.graph = (z, m)
        ctx.args = (eps, p, seed, dot)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, ln_w, ln_b, w_in, w_out, kept = ctx.saved_tensors
        (z, m), (eps, p, seed, dot) = ctx.graph, ctx.args
        del ctx.graph
        dm, dw_out, db_out = _proj_residual_backward_op(dout, kept, w_out, p, seed, dot)
        (dz,) = torch.autograd.grad(m, z, dm)
        dx, dlnw, dlnb, dw_in = _norm_proj_backward_op(dz, x, ln_w, ln_b, eps, w_in, dot, dout)
        return dx, dlnw, dlnb, dw_in, dw_out, db_out, None, None, None, None, None


def fused_context_branch(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float,
                         w_in: torch.Tensor, mid: Callable[[torch.Tensor], torch.Tensor],
                         w_out: torch.Tensor, b_out: torch.Tensor, p: float) -> torch.Tensor:
    """``x + drop(W_out mid(W_in LN(x)) + b_out)`` (a block's context branch around its NMF layer
    ``mid``) as ``fastnmf::norm_proj``, ``mid`` and ``fastnmf::proj_residual``, with x's
    residual gradient added inside norm_proj's backward kernel."""  # fmt: skip
    from .kernels._glue import dropout_seed, matmul_dtype

    seed = dropout_seed() if p > 0 else 0
    return _ContextBranch.apply(x, ln_w, ln_b, w_in, w_out, b_out, mid, float(eps), float(p),
                                seed, matmul_dtype(x))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# A decoder block's skip adapter: drop(W_s skip + W_x x) (kernels/pair_proj.py)


def _pair_kernels():
    kernels = importlib.import_module("fastnmf.kernels.pair_proj")
    record_kernels("fastnmf::pair_proj", [kernels._fwd_kernel])
    record_kernels("fastnmf::pair_proj_backward", [kernels._bwd_kernel])
    return kernels


@torch.library.triton_op("fastnmf::pair_proj", mutates_args=())
def _pair_proj_op(s: torch.Tensor, x: torch.Tensor, ws: torch.Tensor, wx: torch.Tensor,
                  p: float, seed: int, dot: torch.dtype) -> torch.Tensor:  # fmt: skip
    _need_triton(s, "pair_proj")
    return _pair_kernels().pair_proj_forward(s, x, ws, wx, p, seed, dot=dot, out_dtype=dot,
                                             wrap=True)  # fmt: skip


@_pair_proj_op.register_fake
def _pair_proj_fake(s, x, ws, wx, p, seed, dot):
    return s.new_empty((s.shape[0], ws.shape[0], *s.shape[2:]), dtype=dot)


@torch.library.triton_op("fastnmf::pair_proj_backward", mutates_args=())
def _pair_proj_backward_op(
    da: torch.Tensor, s: torch.Tensor, x: torch.Tensor, ws: torch.Tensor, wx: torch.Tensor,
    p: float, seed: int, dot: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    _need_triton(s, "pair_proj_backward")
    return _pair_kernels().pair_proj_backward(da, s, x, ws, wx, p, seed, dot=dot, wrap=True)


@_pair_proj_backward_op.register_fake
def _pair_proj_backward_fake(da, s, x, ws, wx, p, seed, dot):
    return (torch.empty_like(s, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(ws),
            torch.empty_like(wx))  # fmt: skip


def _pair_proj_setup(ctx, inputs, output):
    s, x, ws, wx, p, seed, dot = inputs
    ctx.save_for_backward(s, x, ws, wx)
    ctx.args = (p, seed, dot)


def _pair_proj_backward(ctx, da):
    s, x, ws, wx = ctx.saved_tensors
    p, seed, dot = ctx.args
    ds, dx, dws, dwx = _pair_proj_backward_op(da, s, x, ws, wx, p, seed, dot)
    return ds, dx, dws, dwx, None, None, None


_pair_proj_op.register_autograd(_pair_proj_backward, setup_context=_pair_proj_setup)
decompose_only_when_traceable(_pair_proj_op)
decompose_only_when_traceable(_pair_proj_backward_op)


def fused_pair_proj(s: torch.Tensor, x: torch.Tensor, ws: torch.Tensor, wx: torch.Tensor,
                    p: float) -> torch.Tensor:  # fmt: skip
    """``drop(W_s s + W_x x)`` in one fused op (W_s: (C, Cs), W_x: (C, Cx); a fresh Philox seed
    per call); the result in the products' dtype (autocast's, as its convolutions)."""
    from .kernels._glue import dropout_seed, matmul_dtype

    seed = dropout_seed() if p > 0 else 0
    return _pair_proj_op(s, x, ws, wx, float(p), seed, matmul_dtype(s))
