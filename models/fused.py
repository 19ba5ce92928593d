"""When a Factorizer block runs its fused glue ops (:mod:`fastnmf.glue_ops`).

The MLP branch ``x + MLP(LN2(x))`` runs as one fused op (one Triton kernel each way, nothing kept
but x) in eager training on a GPU, where the lean branches of :mod:`~fastnmf.models.recompute`
would run otherwise, when :data:`ENABLED` and the kernels take the branch (exact GELU, both
dropouts of one rate, biases, weight gradients that fit in a program's registers: C <= 64 at the
default MLP ratio 2). Its dropout masks are Philox draws (see :mod:`fastnmf.kernels._glue`).
Elsewhere (CPU, evaluation, torch.compile / export, wide deep stages) nothing changes.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import nn

from fastnmf.glue_ops import fused_mlp_branch

from .recompute import lean_mlp_supported, use_lean

__all__ = ["ENABLED", "fused_mlp_ok", "fused_mlp"]

ENABLED = {"mlp": True}  # set False to run the lean branches instead (e.g. to compare)


def _on_gpu(x: torch.Tensor) -> bool:
    """Whether x is where the fused kernels run in training (the step account patches this)."""
    return x.device.type == "cuda" and importlib.util.find_spec("triton") is not None


def fused_mlp_ok(x: torch.Tensor, mlp: nn.Module) -> bool:
    """Whether :func:`fused_mlp` runs this block's MLP branch (see the module doc)."""
    if not (ENABLED["mlp"] and _on_gpu(x) and use_lean(mlp, x) and lean_mlp_supported(mlp)):
        return False
    if mlp.act.approximate != "none" or mlp.fc1.bias is None or mlp.fc2.bias is None:
        return False
    from fastnmf.kernels import mlp_branch

    c, h = x.shape[1], mlp.fc1.weight.shape[0]
    return mlp_branch.supported(c, h) and max(c, h) * math.prod(x.shape[2:]) < 2**31


def fused_mlp(x: torch.Tensor, norm: nn.Module, mlp: nn.Module) -> torch.Tensor:
    """``x + mlp(norm(x))`` as :func:`fastnmf.glue_ops.fused_mlp_branch` (``norm``: a
    ChannelLayerNorm, ``mlp``: an MLP)."""
    c, h = x.shape[1], mlp.fc1.weight.shape[0]
    ln = norm.norm
    p = float(mlp.drop1.p) if mlp.training else 0.0
    return fused_mlp_branch(x, ln.weight, ln.bias, ln.eps, mlp.fc1.weight.view(h, c),
                            mlp.fc1.bias, mlp.fc2.weight.view(c, h), mlp.fc2.bias, p)  # fmt: skip
