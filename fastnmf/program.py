"""An exported program (``torch.export``, ``.pt2``) of a trained model, for eval.

``fastnmf export`` writes one beside the bundle's weights (``models/model.pt2``): the eval
network as a graph of ATen ops and ``fastnmf.matricized_nmf`` calls (the NMF layer as one
registered op, :mod:`fastnmf.custom_op`), with the weights inside. It takes a window
``(B, C, *S)`` (``S`` the model's ``spatial_size``, the training crop; any batch size ``B``)
and returns the logits ``(B, R, *S)`` — the network's output, no sliding window, sigmoid or
threshold. Loading it needs ``import fastnmf`` first (that registers the op)::

    import fastnmf, torch
    net = torch.export.load("models/model.pt2").module()
    logits = net(window)

The program is traced on the CPU with ``kernel="torch"`` (the NMF layers' PyTorch path), so it
runs wherever PyTorch does; on a GPU, ``fastnmf infer`` or the bundle's ``inference.json``
(``--kernel auto``) use the Triton kernels instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["export_program", "load_program", "MAX_BATCH"]

MAX_BATCH = 64  # the largest batch the program accepts (torch.export needs a bound)


def export_program(model: nn.Module, *, in_channels: int, path: str | Path) -> Path:
    """Trace the eval ``model`` on windows ``(B, in_channels, *model.spatial_size)`` with a
    dynamic batch size ``B`` (1 to :data:`MAX_BATCH`) and save the program to ``path``."""
    from .infer import model_window

    if in_channels < 1:
        raise ValueError(f"export_program: in_channels must be >= 1, got {in_channels}")
    path = Path(path)
    model = model.eval()
    device = next(model.parameters()).device
    example = torch.zeros(2, in_channels, *model_window(model), device=device)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    program.example_inputs = None  # else the zeros are saved too (67 MB at 4 x 128^3, batch 2)
    torch.export.save(program, path)
    return path


def load_program(path: str | Path) -> nn.Module:
    """The callable module of a saved program (``fastnmf`` is imported, so its op exists)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported program (.pt2) there")
    return torch.export.load(path).module()
