"""What CUDA does differently from the CPU, for the step account's fake CPU tensors.

:class:`CudaPolicy` (a TorchFunctionMode) applies two CUDA behaviours while a model runs:

**Dropout.** In training, CUDA runs ``dropout`` as the fused ``native_dropout`` (output + a
one-byte bool mask kept for backward) where the CPU multiplies by a mask of the input's dtype
(four bytes a voxel in fp32, also kept): ``dropout`` with 0 < p < 1 becomes ``native_dropout``.

**Autocast (bf16 rows).** The account runs on fake CPU tensors, where only CPU autocast
applies, and its op lists differ from CUDA's (CPU autocast runs ``layer_norm`` in bf16, CUDA in
fp32, so a CPU bf16 step moves about half the bytes of the fp32 step everywhere, a CUDA one does
not). Given an autocast dtype, :class:`CudaPolicy` applies CUDA's lists instead, at the
torch-function level (above autograd, so backward sees the casts as a real autocast region
records them), after PyTorch's AMP documentation ("CUDA Ops that can autocast to float16" /
"... to float32" / "... promote to the widest input type"):

- lower precision: matrix products, convolutions, ``linear``, ``prelu``, attention: floating
  inputs cast to the autocast dtype;
- float32: layer / group norm, softmax, exp, log, sum, pow, losses ...: inputs cast to float32;
- promote: ``cat``, ``stack``, ``addcmul`` ...: mixed inputs cast to the widest.

Unlike CUDA autocast (a dispatcher key that sees the aten ops a composite function decomposes
into), functions are matched by name as the model calls them; casts of parameters are not cached
across uses (each module uses its weight once per forward, so nothing is lost there).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

__all__ = ["CudaPolicy", "LOWER", "FP32", "PROMOTE"]

LOWER = frozenset({
    "__matmul__", "__rmatmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm",
    "chain_matmul", "multi_dot", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "linear", "matmul", "mm", "mv", "prelu",
    "scaled_dot_product_attention", "conv_tbc", "_convolution", "convolution",
    "einsum",  # not on CUDA's list itself, but it runs as bmm / mm, which are
})  # fmt: skip
FP32 = frozenset({
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "cosh", "erfinv", "exp",
    "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh", "tan", "pow",
    "softplus", "layer_norm", "group_norm", "norm", "nuclear_norm", "frobenius_norm",
    "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "softmax", "log_softmax", "softmin", "cumprod", "cumsum", "prod", "sum", "normalize",
    "cross_entropy",
    "channel_layer_norm",  # fastnmf's op, registered with CUDA autocast's float32 rule
})  # fmt: skip
PROMOTE = frozenset({
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sample", "index_put",
    "scatter_add", "tensordot", "cat", "stack", "index_copy",
})  # fmt: skip


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


class CudaPolicy(TorchFunctionMode):
    """``with CudaPolicy(torch.bfloat16):`` casts as a CUDA autocast region would (``None``: no
    autocast) and runs dropout as CUDA's fused kernel."""

    def __init__(self, amp: torch.dtype | None = None):
        super().__init__()
        if amp not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast dtype must be None, bfloat16 or float16, got {amp}")
        self.amp = amp

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if isinstance(func, torch._ops.OpOverload) and func.namespace == "fastnmf":
            name = func.overloadpacket.__name__  # "channel_layer_norm", not "....default"
        if name == "dropout":
            return _dropout(*args, **kwargs)
        target = None if self.amp is None else self._target(name, args, kwargs)
        if target is not None:
            cast = lambda t: t.to(target) if _eligible(t) and t.dtype != target else t  # noqa: E731
            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        return func(*args, **kwargs)

    def _target(self, name: str, args, kwargs) -> torch.dtype | None:
        if name in LOWER:
            return self.amp
        if name in FP32:
            return torch.float32
        if name in PROMOTE:
            found = [t.dtype for t in _flat(args, kwargs) if _eligible(t)]
            if len(set(found)) > 1:
                return torch.float32 if torch.float32 in found else found[0]
        return None


def _dropout(input, p=0.5, training=True, inplace=False):
    """CUDA's ``dropout``: the fused kernel for 0 < p < 1 in training, else the identity."""
    if not training or p == 0 or input.numel() == 0:
        return input
    if p == 1:
        return input * 0
    out = torch.native_dropout(input, p, True)[0]
    return input.copy_(out) if inplace else out


def _flat(args, kwargs) -> list:
    out = []
    tree_map(out.append, (args, kwargs))
    return out
