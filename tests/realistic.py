"""Small volumes as a user brings them: anisotropic spacing, LPS / LAS affines, odd sizes, tiny
lesions, a decathlon-style dataset.json. Shared by tests/test_real_data.py and test_bundle.py."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

# (shape, spacing mm, axis signs (-1, -1, 1) = LPS, (-1, 1, 1) = LAS, lesion corner, lesion size)
CASES = [
    ((45, 37, 21), (0.9, 0.9, 6.5), (-1, -1, 1), (30, 9, 3), (3, 3, 2)),
    ((39, 44, 17), (1.2, 0.8, 5.0), (-1, 1, 1), (8, 30, 11), (4, 2, 2)),
    ((33, 29, 25), (0.6, 0.6, 3.0), (-1, -1, 1), (20, 6, 17), (2, 3, 3)),
]
REGION = "lesion"


def affine(spacing, signs, origin=(12.5, -30.25, 40.0)) -> np.ndarray:
    a = np.diag([*(s * d for s, d in zip(spacing, signs, strict=True)), 1.0])
    a[:3, 3] = origin
    return a


def volume(index: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image float32, label uint8, affine)`` of case ``index``: an ellipsoid 'organ' of noisy
    intensity 1, a bright box-shaped lesion of a few voxels away from the centre, 0 outside."""
    shape, spacing, signs, corner, size = CASES[index]
    rng = np.random.default_rng([seed, index])
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    organ = sum(g**2 for g in grid) < 0.95
    image = np.where(organ, 1.0 + 0.1 * rng.standard_normal(shape), 0.0)
    label = np.zeros(shape, np.uint8)
    box = tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True))
    label[box] = 1
    image[box] = 3.0 + 0.1 * rng.standard_normal(size)
    return image.astype(np.float32), label, affine(spacing, signs)


def make_dataset(root: Path, *, n: int = 3) -> Path:
    """A decathlon-style folder: imagesTr/, labelsTr/, dataset.json (one region, 'lesion')."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n):
        image, label, aff = volume(i)
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, aff), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(label, aff), str(root / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "TinyLesions",
        "modality": {"0": "FLAIR"},
        "labels": {"0": "background", "1": REGION},
        "numTraining": n,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
