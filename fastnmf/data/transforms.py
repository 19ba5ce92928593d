"""MONAI transform pipelines: loading with checks, label conversion, training augmentation.

Training (paper §4.2 / Appendix A, and the original code's ``brats_train_transform`` and
``isles_train_transform``): load → labels to region channels → (ISLES: resample to 2 mm) →
crop to the image foreground → channel-wise z-score over non-zero voxels → random crop
(128³ BraTS, 64³ ISLES, 32³ demo) → the seven random augmentations

=====================  ======  =================================================
augmentation           prob.   range
=====================  ======  =================================================
affine                 0.15    rotation ±30° per axis, scaling ±30 % per axis
flip                   0.5     each of the three axes independently
Gaussian noise         0.15    std 0.1
Gaussian smoothing     0.15    sigma 0.5–1.5 voxels per axis
intensity scaling      0.15    factor 1 ± 0.3
intensity shift        0.15    offset ± 0.1
contrast (gamma)       0.15    gamma 0.7–1.5
=====================  ======  =================================================

→ labels re-binarised at 0.5 (they are interpolated bilinearly, as in the original code).

Validation: load → labels → z-score over the whole volume (no crop: sliding-window inference
covers it). ISLES is trained at 2 mm; ``val_transforms(..., resample=True)`` resamples the input
too, otherwise the inferer must (``info.spacing``).

Every pipeline returns dicts ``{"id": str, "image": MetaTensor (C, X, Y, Z) float32,
"label": MetaTensor (R, X, Y, Z) float32 in {0, 1}}`` with R = ``info.out_channels``; the
MetaTensor carries the affine and source file, so predictions can be saved in the input's space.
Errors in the data (see :func:`fastnmf.data.read_case`) surface as :class:`DataError` naming the
file, not wrapped in MONAI's generic "applying transform" error.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    AsDiscreted,
    Compose,
    CropForegroundd,
    EnsureTyped,
    FgBgToIndicesd,
    MapTransform,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
)

from .._checks import renamed_argument
from .datasets import DataError, DatasetInfo, dataset_info, read_case

__all__ = [
    "LoadCased",
    "LabelsToRegionsd",
    "labels_to_regions",
    "regions_to_labels",
    "train_transforms",
    "val_transforms",
]

KEYS = ("image", "label")


def _info(kind: str | DatasetInfo) -> DatasetInfo:
    return kind if isinstance(kind, DatasetInfo) else dataset_info(kind)


def labels_to_regions(label: np.ndarray | torch.Tensor, info: DatasetInfo) -> np.ndarray:
    """Integer label map ``(X, Y, Z)`` or ``(1, X, Y, Z)`` → float32 region channels ``(R, ...)``.

    ``"brats"`` (MSD labels 1 oedema, 2 non-enhancing/necrotic core, 3 enhancing): channels
    ET = {3}, TC = {2, 3}, WT = {1, 2, 3}, nested ET ⊂ TC ⊂ WT. ``"onehot"``: channel k is
    ``label == info.label_values[k + 1]``.
    """
    lab = np.asarray(label)
    if lab.ndim == 4:
        lab = lab[0]
    if info.label_mode == "brats":
        chans = [lab == 3, (lab == 2) | (lab == 3), lab > 0]  # ET, TC, WT
    elif info.label_mode == "onehot":
        chans = [lab == v for v in info.label_values[1:]]
    else:
        raise ValueError(f"unknown label_mode {info.label_mode!r}; valid: brats, onehot")
    return np.stack(chans).astype(np.float32)


def regions_to_labels(regions: np.ndarray | torch.Tensor, info: DatasetInfo) -> np.ndarray:
    """Inverse of :func:`labels_to_regions` for binary region channels ``(R, X, Y, Z)``.

    BraTS: ET → 3, TC without ET → 2, WT without TC → 1 (a non-nested prediction is read
    outermost-first, as the original code's ``post="class"``)."""
    r = np.asarray(regions) > 0.5
    out = np.zeros(r.shape[1:], np.uint8)
    if info.label_mode == "brats":
        et, tc, wt = r
        out[wt] = 1
        out[tc] = 2
        out[et] = 3
    else:
        for k, v in enumerate(info.label_values[1:]):
            out[r[k]] = v
    return out


class LoadCased(MapTransform):
    """Read a datalist case with :func:`fastnmf.data.read_case` (all checks, errors naming the
    file) into MetaTensors: ``image`` (C, X, Y, Z) float32, ``label`` (1, X, Y, Z) raw values."""

    def __init__(self, info: DatasetInfo, *, allow_missing_label: bool = False) -> None:
        super().__init__(KEYS, allow_missing_keys=allow_missing_label)
        self.info = info
        self.allow_missing_label = allow_missing_label

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = d["image"] if isinstance(d.get("image"), (str, Path)) else d["image"][0]
        if d.get("label") is None and not self.allow_missing_label:
            raise DataError(first, "case has no label")
        image, label, affine = read_case(d, self.info)
        meta = {"filename_or_obj": str(first), "case_id": d.get("id")}
        d["image"] = MetaTensor(torch.from_numpy(image), affine=torch.from_numpy(affine), meta=meta)
        if label is not None:
            lmeta = {"filename_or_obj": d["label"], "case_id": d.get("id")}
            d["label"] = MetaTensor(
                torch.from_numpy(label[None]), affine=torch.from_numpy(affine), meta=lmeta
            )
        else:
            d.pop("label", None)
        return d


class LabelsToRegionsd(MapTransform):
    """Integer label map → region channels (:func:`labels_to_regions`), keeping the metadata."""

    def __init__(self, info: DatasetInfo, *, keys: str = "label") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.info = info

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            regions = torch.from_numpy(labels_to_regions(lab, self.info))
            d[key] = MetaTensor(regions, meta=lab.meta) if isinstance(lab, MetaTensor) else regions
        return d


class _Pipeline(Compose):
    """``Compose`` that re-raises a :class:`DataError` as itself instead of MONAI's
    ``RuntimeError("applying transform ...")`` wrapper, so the message names the file."""

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as e:
            cause = e.__cause__
            while cause is not None and not isinstance(cause, DataError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None


def _crop(crop_size: int | tuple[int, ...] | None, info: DatasetInfo) -> tuple[int, int, int]:
    if crop_size is None:
        return tuple(info.crop_size)
    p = (crop_size,) * 3 if isinstance(crop_size, int) else tuple(int(s) for s in crop_size)
    if len(p) != 3 or min(p) < 1:
        raise ValueError(f"crop_size must be an int or three positive ints, got {crop_size!r}")
    return p


def train_transforms(
    kind: str | DatasetInfo,
    *,
    crop_size: int | tuple[int, int, int] | None = None,
    crop: str = "random",
    pos_ratio: float = 0.5,
    augment: bool = True,
    seed: int | None = None,
    patch_size: int | tuple[int, int, int] | None = None,
) -> Compose:
    """Training pipeline for a data-set kind (or the :class:`DatasetInfo` of
    :func:`fastnmf.data.open_dataset`).

    Args:
        kind: ``"demo"``, ``"brats"``, ``"isles"``, ``"generic"`` or a :class:`DatasetInfo`.
        crop_size: training crop (default ``info.crop_size``).
        crop: ``"random"`` (uniform random crop, as the paper) or ``"posneg"`` (centre on a
            foreground voxel, any region, with probability ``pos_ratio``, else on a background
            voxel; MONAI then returns a one-element list per case, which MONAI's DataLoader
            flattens). The voxel indices are computed once per case, before the first random
            transform, so :class:`monai.data.CacheDataset` keeps them.
        pos_ratio: share of ``posneg`` crops centred on foreground, in [0, 1].
        augment: apply the paper's seven random augmentations.
        seed: seed the pipeline's random state (``Compose.set_random_state``).
        patch_size: deprecated name of ``crop_size`` (a DeprecationWarning; next release: gone).
    """
    info = _info(kind)
    crop_size = renamed_argument(
        "crop_size", crop_size, "patch_size", patch_size, where="train_transforms"
    )
    patch = _crop(crop_size, info)
    if crop not in ("random", "posneg"):
        raise ValueError(f"unknown crop {crop!r}; valid: random, posneg")
    if not 0 <= pos_ratio <= 1:
        raise ValueError(f"pos_ratio must be in [0, 1], got {pos_ratio}")
    t: list = [LoadCased(info), LabelsToRegionsd(info)]
    if info.spacing is not None:
        t.append(Spacingd(KEYS, pixdim=info.spacing, mode=("bilinear", "bilinear")))
    t += [
        CropForegroundd(KEYS, source_key="image", allow_smaller=True),
        NormalizeIntensityd("image", nonzero=True, channel_wise=True),
        SpatialPadd(KEYS, spatial_size=patch),
    ]
    if crop == "random":
        t.append(RandSpatialCropd(KEYS, roi_size=patch, random_size=False))
    else:
        t += [
            FgBgToIndicesd("label"),  # label_fg_indices, label_bg_indices (any region > 0)
            RandCropByPosNegLabeld(
                KEYS,
                label_key="label",
                spatial_size=patch,
                pos=pos_ratio,
                neg=1 - pos_ratio,
                num_samples=1,
                fg_indices_key="label_fg_indices",
                bg_indices_key="label_bg_indices",
            ),
        ]
    if augment:
        t += [
            RandAffined(
                KEYS,
                prob=0.15,
                spatial_size=patch,
                rotate_range=(math.pi / 6,) * 3,
                scale_range=(0.3,) * 3,
                mode=("bilinear", "bilinear"),
                padding_mode="zeros",
            ),
            RandFlipd(KEYS, prob=0.5, spatial_axis=0),
            RandFlipd(KEYS, prob=0.5, spatial_axis=1),
            RandFlipd(KEYS, prob=0.5, spatial_axis=2),
            RandGaussianNoised("image", prob=0.15, std=0.1),
            RandGaussianSmoothd(
                "image", prob=0.15, sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5), sigma_z=(0.5, 1.5)
            ),
            RandScaleIntensityd("image", prob=0.15, factors=0.3),
            RandShiftIntensityd("image", prob=0.15, offsets=0.1),
            RandAdjustContrastd("image", prob=0.15, gamma=(0.7, 1.5)),
        ]
    t += [
        AsDiscreted("label", threshold=0.5),
        EnsureTyped(KEYS, dtype=torch.float32, track_meta=True),
    ]
    pipeline = _Pipeline(t, log_stats=False)
    if seed is not None:
        pipeline.set_random_state(seed=seed)
    return pipeline


def val_transforms(
    kind: str | DatasetInfo, *, resample: bool = False, require_label: bool = True
) -> Compose:
    """Validation / inference pipeline: load, labels to regions, z-score (no crop).

    Args:
        kind: as :func:`train_transforms`.
        resample: resample to ``info.spacing`` (ISLES: 2 mm) here; by default the volume keeps
            its own voxels and the inferer resamples.
        require_label: ``False`` for inference on cases without a label.
    """
    info = _info(kind)
    t: list = [LoadCased(info, allow_missing_label=not require_label), LabelsToRegionsd(info)]
    if resample and info.spacing is not None:
        t.append(
            Spacingd(
                KEYS, pixdim=info.spacing, mode=("bilinear", "nearest"), allow_missing_keys=True
            )
        )
    t += [
        NormalizeIntensityd("image", nonzero=True, channel_wise=True),
        EnsureTyped(KEYS, dtype=torch.float32, track_meta=True, allow_missing_keys=True),
    ]
    return _Pipeline(t, log_stats=False)
