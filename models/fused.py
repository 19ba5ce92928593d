"""When a Factorizer block runs its fused glue ops (:mod:`fastnmf.glue_ops`).

The MLP branch ``x + MLP(LN2(x))`` runs as one fused op (one Triton kernel each way, nothing kept
but x) in eager training on a GPU, where the lean branches of :mod:`~fastnmf.models.recompute`
would run otherwise, when :data:`ENABLED` and the kernels take the branch (exact GELU, both
dropouts of one rate, biases, weight gradients that fit in a program's registers: C <= 64 at the
default MLP ratio 2). Its dropout masks are Philox draws (see :mod:`fastnmf.kernels._glue`).
The context branch of a block with a wrapped NMF mixer, ``x + drop(W_out NMF(W_in LN1(x)) +
b_out)``, runs as two fused ops around the NMF layer under the same conditions (C <= 128):
LN1 + in-projection (``fastnmf::norm_proj``: x read, z written) and out-projection + dropout +
residual (``fastnmf::proj_residual``: the NMF output and x read, the block's stream written),
in :func:`fastnmf.glue_ops.fused_context_branch`, whose backward adds the residual's gradient
inside norm_proj's backward kernel (no separate pass sums x's two gradients). A decoder block's
skip adapter ``drop(W_s skip + W_x x)`` is one fused op (``fastnmf::pair_proj``) where
C_out * (C_skip + C_x) <= 16384 (C <= 64 in the U-Net).
Elsewhere (CPU, evaluation, torch.compile / export, wide deep stages) nothing changes.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from torch import nn

from fastnmf.glue_ops import fused_context_branch, fused_mlp_branch, fused_pair_proj

from .recompute import lean_mlp_supported, use_lean

__all__ = ["ENABLED", "fused_mlp_ok", "fused_mlp", "fused_context_ok", "fused_context",
           "fused_adapter_ok", "fused_adapter"]



def _env_switch() -> bool:
    """``FASTNMF_FUSED_GLUE``: ``1`` (default) or ``0`` (every block runs its lean branches)."""
    value = os.environ.get("FASTNMF_FUSED_GLUE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"FASTNMF_FUSED_GLUE must be 0 or 1, got {value!r}")
    return value == "1"


# set an entry False to run the lean branches instead (e.g. to compare); default from the
# environment (FASTNMF_FUSED_GLUE=0 turns both off)
ENABLED = dict.fromkeys(("mlp", "context", "adapter"), _env_switch())


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
    fits = mlp_branch.supported(c, h, _capability(x))
    return fits and max(c, h) * math.prod(x.shape[2:]) < 2**31


def _capability(x: torch.Tensor) -> int:
    """x's GPU's compute capability as 10 * major + minor (90 where x is not on a GPU: the step
    account, which models an H200)."""
    if x.device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(x.device)
    return 10 * major + minor


def fused_mlp(x: torch.Tensor, norm: nn.Module, mlp: nn.Module) -> torch.Tensor:
    """``x + mlp(norm(x))`` as :func:`fastnmf.glue_ops.fused_mlp_branch` (``norm``: a
    ChannelLayerNorm, ``mlp``: an MLP)."""
    c, h = x.shape[1], mlp.fc1.weight.shape[0]
    ln = norm.norm
    p = float(mlp.drop1.p) if mlp.training else 0.0
    return fused_mlp_branch(x, ln.weight, ln.bias, ln.eps, mlp.fc1.weight.view(h, c),
                            mlp.fc1.bias, mlp.fc2.weight.view(c, h), mlp.fc2.bias, p)  # fmt: skip


def fused_context_ok(x: torch.Tensor, block: nn.Module) -> bool:
    """Whether :func:`fused_context` runs ``block``'s context branch (a wrapped NMF mixer; see
    the module doc)."""
    if not (ENABLED["context"] and _on_gpu(x) and use_lean(block, x)):
        return False
    from fastnmf.kernels import proj_glue

    c = x.shape[1]
    fits = proj_glue.supported(c, c) and c * math.prod(x.shape[2:]) < 2**31
    return fits and block.mixer.dropout.p < 1


def fused_context(x: torch.Tensor, norm: nn.Module, mixer: nn.Module) -> torch.Tensor:
    """``x + mixer(norm(x))`` for a WrappedNMF ``mixer`` and a ChannelLayerNorm ``norm``: the
    projections, LN1, the dropout and the residual add fused, the NMF layer between them."""
    c, ln, out = x.shape[1], norm.norm, mixer.out_proj
    mid = torch.relu if mixer.bypass else mixer.nmf
    p = float(mixer.dropout.p) if mixer.training else 0.0
    return fused_context_branch(x, ln.weight, ln.bias, ln.eps, mixer.in_proj.weight.view(c, c),
                                mid, out.weight.view(c, c), out.bias, p)  # fmt: skip


def fused_adapter_ok(skip: torch.Tensor, x: torch.Tensor, block: nn.Module) -> bool:
    """Whether :func:`fused_adapter` runs ``block``'s skip adapter (see the module doc)."""
    if not (ENABLED["adapter"] and _on_gpu(x) and use_lean(block, x)):
        return False
    from fastnmf.kernels import pair_proj

    conv, drop = block.adapter
    if drop.p >= 1:
        return False
    cs, cx = conv.split
    cout = conv.weight_x.shape[0]
    voxels = math.prod(x.shape[2:])
    return pair_proj.supported(cs, cx, cout) and max(cs, cx, cout) * voxels < 2**31


def fused_adapter(skip: torch.Tensor, x: torch.Tensor, adapter: nn.Module) -> torch.Tensor:
    """``adapter``'s ``drop(conv.pair(skip, x))`` (a SkipAdapter and its dropout) in one op."""
    conv, drop = adapter
    cs, cx = conv.split
    cout = conv.weight_x.shape[0]
    p = float(drop.p) if drop.training else 0.0
    return fused_pair_proj(skip, x, conv.weight_skip.view(cout, cs),
                           conv.weight_x.view(cout, cx), p)  # fmt: skip
