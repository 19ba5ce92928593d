"""Inference: checkpoints → models, sliding-window prediction, NIfTI and overlay PNG outputs.

- :func:`model_from_checkpoint` rebuilds the model from the config stored inside a checkpoint
  (read by :func:`fastnmf.checkpoints.load_checkpoint`, which owns the format; it and
  :func:`fastnmf.build.build_model` / :func:`~fastnmf.build.resolve_device` are re-exported here).
- :func:`sliding_window_logits`: MONAI's sliding-window inference with windows of the model's
  ``spatial_size``, 50 % overlap and gaussian blending, so a volume of any size can be segmented
  (smaller volumes are padded).
- :func:`predict_case`: one preprocessed case → region probabilities; thresholded at 0.5.
- :func:`infer`: a list of cases → ``<out>/<id>.nii.gz`` label maps (the input's affine and
  header, MSD label values for BraTS-style data) and ``<out>/<id>.png`` overlays.

The inference-time controls of the models (``iters``, ``skip``, ``kernel``: paper Fig. 8) are
applied with :func:`fastnmf.models.inference_controls`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from . import data as fdata
from .build import build_model, resolve_device
from .checkpoints import CheckpointError, config_of, info_from_dict, info_to_dict, load_checkpoint
from .config import TrainConfig
from .overlay import overlay_png

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "info_from_dict",
    "info_to_dict",
    "model_from_checkpoint",
    "build_model",
    "resolve_device",
    "sliding_window_logits",
    "predict_case",
    "save_label_map",
    "to_input_grid",
    "write_prediction",
    "overlay_png",
    "infer",
    "cases_for",
]


def model_from_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu", kernel: str | None = None
) -> tuple[nn.Module, TrainConfig, fdata.DatasetInfo, dict[str, Any]]:
    """``(model in eval mode, config, data info, checkpoint)`` from a checkpoint file."""
    ckpt = load_checkpoint(path)
    cfg = config_of(ckpt)
    if kernel is not None:
        cfg.kernel = kernel
    info = info_from_dict(ckpt["info"])
    model = build_model(cfg, info)
    model.load_state_dict(ckpt["model"])
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return model.to(dev).eval(), cfg, info, ckpt


def model_window(model: nn.Module) -> tuple[int, ...]:
    size = getattr(model, "spatial_size", None)
    if size is None:
        raise ValueError("model has no spatial_size: cannot choose a sliding-window size")
    return tuple(int(s) for s in size)


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module,
    image: torch.Tensor,
    *,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    mode: str = "gaussian",
    amp: str = "none",
) -> torch.Tensor:
    """Logits ``(B, out, *S)`` for an image ``(B, C, *S)`` of any spatial size.

    Windows are the model's ``spatial_size`` (``roi_size`` overrides), ``overlap`` 0.5 and
    ``mode`` ``"gaussian"`` blending by default (MONAI :func:`sliding_window_inference`).
    """
    from monai.inferers import sliding_window_inference

    roi = tuple(roi_size) if roi_size is not None else model_window(model)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(x).float()

    try:
        x = image.as_tensor() if hasattr(image, "as_tensor") else image
        out = sliding_window_inference(
            x.to(dev),
            roi_size=roi,
            sw_batch_size=sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode=mode,
        )
    finally:
        model.train(was_training)
    return out.as_tensor() if hasattr(out, "as_tensor") else out


def predict_case(
    model: nn.Module,
    image: torch.Tensor,
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 4,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Binary region masks ``(R, *S)`` (bool, CPU) for one preprocessed image ``(C, *S)``:
    sigmoid of the sliding-window logits, thresholded at ``threshold``."""
    logits = sliding_window_logits(
        model, image[None], overlap=overlap, sw_batch_size=sw_batch_size
    )  # (1, R, *S)
    return (torch.sigmoid(logits[0]) > threshold).cpu()


def save_label_map(labels: np.ndarray, reference: str | Path, path: str | Path) -> Path:
    """Write an integer label map ``(X, Y, Z)`` as NIfTI with the affine and header of the image
    file ``reference`` (a 4D reference's header is reduced to 3D). Written atomically."""
    ref = nib.load(str(reference))
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(labels.astype(np.uint8), ref.affine, header=header)
    img.header.set_data_shape(labels.shape)
    img.set_qform(ref.affine, code=int(ref.header["qform_code"]) or 1)
    img.set_sform(ref.affine, code=int(ref.header["sform_code"]) or 1)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(out)
    return out


def to_input_grid(masks: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Binary masks ``(R, *S)`` predicted on a resampled grid (ISLES: 2 mm) → the input's voxel
    grid ``shape`` (nearest neighbour); unchanged if already there."""
    if masks.shape[1:] == tuple(shape):
        return masks
    t = torch.from_numpy(masks[None].astype(np.float32))  # (1, R, *S)
    return torch.nn.functional.interpolate(t, size=tuple(shape), mode="nearest")[0].numpy() > 0.5


def write_prediction(
    masks: np.ndarray, info: fdata.DatasetInfo, reference: str | Path, path: str | Path
) -> tuple[np.ndarray, Path]:
    """Region masks ``(R, *S)`` → the label map of the input file ``reference`` (its grid,
    affine and header; data-set label values) at ``path``. Returns ``(masks on the input's grid,
    path)``. The one writer of :func:`infer` and of exported MONAI bundles."""
    masks = to_input_grid(np.asarray(masks) > 0.5, nib.load(str(reference)).shape[:3])
    return masks, save_label_map(fdata.regions_to_labels(masks, info), reference, path)


def cases_for(
    data: str | Path,
    *,
    cfg: TrainConfig | None = None,
    fold: int | None = None,
    select: str = "val",
) -> tuple[list[dict[str, Any]], fdata.DatasetInfo | None]:
    """The cases to run on: ``data`` is ``"demo"``, a data-set folder / JSON datalist, or a single
    NIfTI image file. ``select``: ``"val"`` (the validation fold ``fold``, default the
    checkpoint's), ``"all"``, or comma-separated case ids."""
    p = Path(str(data))
    if p.suffix in (".nii", ".gz") and p.name.endswith((".nii", ".nii.gz")):
        if not p.is_file():
            raise fdata.MissingFileError(p, "file not found")
        cid = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
        return [{"id": cid, "image": [str(p.resolve())]}], None
    demo_kwargs = dict(cfg.demo) if (cfg is not None and str(data) == "demo") else {}
    ds = fdata.open_dataset(data, **demo_kwargs)
    if select == "all":
        return ds.cases, ds.info
    if select == "val":
        n_folds = cfg.n_folds if cfg else 5
        seed = cfg.split_seed if cfg else 0
        k = fold if fold is not None else (cfg.fold if cfg else 0)
        _, val = fdata.split(ds.cases, k, n_folds=n_folds, seed=seed)
        return val, ds.info
    ids = [s.strip() for s in select.split(",") if s.strip()]
    by_id = {c["id"]: c for c in ds.cases}
    missing = [i for i in ids if i not in by_id]
    if missing:
        some = ", ".join(list(by_id)[:5])
        raise ValueError(f"unknown case id(s) {', '.join(missing)}; e.g. {some}; or 'val'/'all'")
    return [by_id[i] for i in ids], ds.info


def infer(
    checkpoint: str | Path,
    cases: list[dict[str, Any]],
    out: str | Path,
    *,
    device: str = "auto",
    kernel: str | None = None,
    iters: int | None = None,
    skip: Sequence[int] | None = None,
    overlap: float = 0.5,
    sw_batch_size: int | None = None,
    threshold: float = 0.5,
    png: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Segment ``cases`` with the model of ``checkpoint``; write ``<out>/<id>.nii.gz`` (label map
    with the input's affine/header) and, if ``png``, ``<out>/<id>.png`` overlays.

    ``iters``, ``skip`` (NMF block indices short-circuited) and ``kernel`` are the inference-time
    controls (no retraining). Returns ``[{"id", "prediction", "png"}]`` (paths as strings;
    ``png`` is ``None`` without ``png``).
    """
    from fastnmf import models

    model, cfg, info, _ = model_from_checkpoint(checkpoint, device=device, kernel=kernel)
    has_label = all(c.get("label") for c in cases)
    transform = fdata.val_transforms(info, resample=True, require_label=has_label)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    nmf_blocks = len(models.wrapped_nmf_blocks(model))
    if (iters is not None or skip) and nmf_blocks == 0:
        raise ValueError(f"--iters/--skip need a Factorizer; {cfg.model} has no NMF layers")
    from tqdm.auto import tqdm

    with models.inference_controls(model, iters=iters, skip=skip) if nmf_blocks else nullcontext():
        quiet = not progress or not sys.stderr.isatty()  # a bar only on a terminal
        for case in tqdm(cases, desc="infer", disable=quiet, leave=False):
            item = transform(case)
            image = item["image"]
            masks = predict_case(
                model,
                image,
                overlap=overlap,
                sw_batch_size=sw_batch_size or cfg.sw_batch_size,
                threshold=threshold,
            ).numpy()
            ref = case["image"][0] if isinstance(case["image"], list) else case["image"]
            masks, pred_path = write_prediction(masks, info, ref, out / f"{case['id']}.nii.gz")
            png_path = None
            if png:
                png_path = _overlay(case, item, masks, info, ref, out / f"{case['id']}.png")
            png_file = None if png_path is None else str(png_path)
            written.append({"id": case["id"], "prediction": str(pred_path), "png": png_file})
    return written


def _overlay(case, item, masks, info, ref, path) -> Path:
    """The overlay PNG of one case, on the input's voxel grid and spacing."""
    image = item["image"]
    img = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    truth = item.get("label")
    if tuple(img.shape[1:]) != masks.shape[1:]:  # resampled: back to the input's grid
        img = torch.nn.functional.interpolate(img[None].float(), size=masks.shape[1:])[0]
        truth = None
        if case.get("label"):
            _, label, _ = fdata.read_case(case, info)
            truth = fdata.labels_to_regions(label, info)
    spacing = nib.load(str(ref)).header.get_zooms()[:3]
    return overlay_png(
        img.numpy(),
        masks,
        path,
        names=info.regions,
        title=str(case["id"]),
        truth=None if truth is None else np.asarray(truth),
        spacing=spacing,
    )
