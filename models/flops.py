"""Parameter and FLOP counting.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products and
convolutions, 2 FLOPs per multiply-add; element-wise ops, norms and activations are not
counted). By default the model is copied to the meta device, so no memory is allocated and
nothing is computed: full 128^3 volumes are counted in seconds on a CPU.

The NMF layers are counted with the kernel given as ``nmf_kernel``: by default ``"reference"``,
the literal unrolled algorithm (T iterations of F and G updates, what the paper counts), which
also runs on the meta device. ``nmf_kernel=None`` keeps each layer's own kernel (the rank-one
closed form of ``"torch"`` costs far fewer FLOPs; it needs ``device="cpu"``, since its autocast
guard does not accept meta tensors).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .factorizer import set_kernel

__all__ = ["count_parameters", "count_flops"]


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; buffers such as the NMF initial factors not counted."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    device: str | torch.device = "meta",
    by_module: bool = False,
    nmf_kernel: str | None = "reference",
) -> int | dict[str, int]:
    """FLOPs of one forward pass in eval mode on a zero input of ``input_shape`` (B, C, *S).

    Args:
        model: the model (left untouched: a deep copy is moved to ``device``).
        input_shape: e.g. ``(1, 4, 128, 128, 128)``.
        device: ``"meta"`` (default: shapes only) or a real device.
        by_module: also return per-module FLOPs: ``{"total": ..., name: ...}`` for the modules
            one and two levels below the root (``"stem"``, ``"encoder.0"``, ...; a parent's
            figure includes its children's).
        nmf_kernel: kernel of every NMF layer while counting (None: as the model has it).
    """
    device = torch.device(device)
    net = copy.deepcopy(model).to(device).eval()
    if nmf_kernel is not None:
        set_kernel(net, nmf_kernel)
    x = torch.zeros(tuple(input_shape), device=device)
    counter = FlopCounterMode(display=False, depth=3)
    with counter, torch.no_grad():
        net(x)
    total = counter.get_total_flops()
    if not by_module:
        return total
    out = {"total": total}
    for name, table in counter.get_flop_counts().items():
        if name.count(".") in (1, 2):
            out[name.split(".", 1)[1]] = sum(table.values())
    return out
