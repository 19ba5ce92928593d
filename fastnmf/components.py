"""NMF component maps of a trained Factorizer for one case (paper Fig. 6).

:func:`component_maps` takes the window of the model's ``spatial_size`` centred on the case's
tumour (or the volume centre), runs :func:`fastnmf.models.nmf_components` for one block and
returns the maps upsampled to the window's voxels; :func:`save_components` writes them as a 4D
NIfTI (one volume per head and rank, in the input's space) and a PNG (middle axial slice of the
image and of every map).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from . import data as fdata

__all__ = ["component_maps", "save_components"]


def _window(shape: tuple[int, ...], roi: tuple[int, ...], centre: np.ndarray) -> list[slice]:
    sl = []
    for n, r, c in zip(shape, roi, centre, strict=True):
        lo = int(round(c - r / 2))
        lo = max(0, min(lo, n - r)) if n >= r else 0
        sl.append(slice(lo, lo + r))
    return sl


def component_maps(
    model: torch.nn.Module, image: torch.Tensor, *, block: int, label: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    """``(maps (heads·R, *roi), window image (C, *roi), window slices)`` for one image
    ``(C, *S)``; the window is centred on ``label``'s foreground when given."""
    from fastnmf.models import nmf_components

    roi = tuple(int(s) for s in model.spatial_size)
    shape = tuple(image.shape[1:])
    if label is not None and torch.as_tensor(label).any():
        centre = torch.nonzero(torch.as_tensor(label).any(0)).float().mean(0).numpy()
    else:
        centre = np.array(shape, dtype=np.float64) / 2
    sl = _window(shape, roi, centre)
    x = torch.as_tensor(image)[(slice(None), *sl)]
    pad = [v for n, r in zip(reversed(x.shape[1:]), reversed(roi), strict=True) for v in (0, r - n)]
    x = F.pad(x, pad)  # (C, *roi)
    dev = next(model.parameters()).device
    maps = nmf_components(model, x[None].to(dev), block=block)  # (1, H, R, *S_block)
    maps = maps.flatten(1, 2).float().cpu()  # (1, H*R, *S_block)
    maps = F.interpolate(maps, size=roi, mode="trilinear", align_corners=False)[0]
    return maps, x, sl


def save_components(
    checkpoint: str | Path,
    case: dict[str, Any],
    out: str | Path,
    *,
    block: int,
    device: str = "auto",
    iters: int | None = None,
) -> dict[str, Path]:
    """Write ``<out>/<id>_block<k>_components.nii.gz`` and ``.png`` for one case."""
    from fastnmf import models

    from .infer import model_from_checkpoint

    model, cfg, info, _ = model_from_checkpoint(checkpoint, device=device)
    n = len(models.wrapped_nmf_blocks(model))
    if n == 0:
        raise ValueError(f"model {cfg.model} has no NMF layers: no components to show")
    transform = fdata.val_transforms(info, resample=True, require_label=bool(case.get("label")))
    item = transform(case)
    with models.inference_controls(model, iters=iters):
        maps, x, sl = component_maps(model, item["image"], block=block, label=item.get("label"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{case['id']}_block{block}_components"
    ref = case["image"][0] if isinstance(case["image"], list) else case["image"]
    affine = np.asarray(nib.load(str(ref)).affine, dtype=np.float64)
    shift = np.array([s.start for s in sl] + [1.0])
    win_affine = affine.copy()
    win_affine[:3, 3] = (affine @ shift)[:3]  # the window's first voxel
    vol = np.moveaxis(maps.numpy().astype(np.float32), 0, -1)  # (X, Y, Z, H*R)
    nii = out / f"{stem}.nii.gz"
    nib.save(nib.Nifti1Image(vol, win_affine), str(nii))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = maps.shape[0]
    cols = min(k + 1, 9)
    rows = int(np.ceil((k + 1) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.9 * rows), squeeze=False)
    z = maps.shape[-1] // 2
    img = x[0].numpy()
    axes[0, 0].imshow(img[:, :, z].T, cmap="gray", origin="lower")
    axes[0, 0].set_title("image", fontsize=7)
    for j in range(k):
        ax = axes[(j + 1) // cols, (j + 1) % cols]
        ax.imshow(maps[j, :, :, z].numpy().T, cmap="magma", origin="lower")
        ax.set_title(f"component {j}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{case['id']}: NMF components of block {block} (axial slice {z})", fontsize=8)
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return {"nifti": nii, "png": png}
