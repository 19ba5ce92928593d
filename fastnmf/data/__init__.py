"""Data: data-set layouts, the built-in demo set, cross-validation splits and MONAI pipelines.

Typical use by the training pipeline::

    from fastnmf import data

    ds = data.open_dataset("demo")            # or an MSD / ISLES'22 folder, or a JSON datalist
    train_cases, val_cases = data.split(ds.cases, fold=0)
    tr = data.train_transforms(ds.info)       # ds.info: channels, regions, default crop
    va = data.val_transforms(ds.info)
    sample = tr(train_cases[0])               # {"id", "image": (C, *crop), "label": (R, *crop)}

Kinds: ``"demo"`` (default, synthetic, cached), ``"brats"`` (MSD Task01_BrainTumour),
``"isles"`` (ISLES'22), ``"generic"``. Region channels of BraTS-style data are
``("ET", "TC", "WT")``, the original Factorizer code's order. Bad input raises
:class:`DataError` (a ``ValueError``; :class:`MissingFileError` is also a ``FileNotFoundError``)
whose message starts with the offending file.
"""

from . import datasets
from .datasets import *  # noqa: F403  (re-exported: datasets.__all__ heads __all__ below)
from .demo import cache_root, generate_case, make_demo
from .splits import folds, split
from .transforms import (
    LabelsToRegionsd,
    LoadCased,
    labels_to_regions,
    regions_to_labels,
    train_transforms,
    val_transforms,
)

__all__ = [
    *datasets.__all__,
    "make_demo",
    "generate_case",
    "cache_root",
    "folds",
    "split",
    "train_transforms",
    "val_transforms",
    "LoadCased",
    "LabelsToRegionsd",
    "labels_to_regions",
    "regions_to_labels",
]
