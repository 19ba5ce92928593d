"""Data set layouts → datalists, and the checked NIfTI reader every pipeline goes through.

A *datalist* is a list of cases, each a dict ``{"id": str, "image": [path, ...], "label": path}``.
``image`` is always a list: one path per file, and a file holds one channel (3D NIfTI) or several
(4D NIfTI, channels last, as in the Medical Segmentation Decathlon). Paths are absolute strings.

Layouts (``kind``):

``"brats"``
    MSD Task01_BrainTumour: ``dataset.json`` + ``imagesTr/BRATS_XXX.nii.gz`` (4D, channels
    FLAIR, T1w, T1gd, T2w) + ``labelsTr/BRATS_XXX.nii.gz``. MSD labels (from its dataset.json):
    0 background, 1 oedema, 2 non-enhancing tumour (necrotic and non-enhancing core),
    3 enhancing tumour. Note these are *not* the BraTS 2018–2022 values (1 NCR/NET, 2 oedema,
    4 ET) that MONAI's ``ConvertToMultiChannelBasedOnBratsClassesd`` expects, so that transform
    must not be used on MSD labels: see :mod:`fastnmf.data.transforms` for the conversion.
``"isles"``
    ISLES'22 BIDS: ``rawdata/sub-strokecaseXXXX/ses-0001/dwi/*_dwi.nii.gz`` and ``*_adc.nii.gz``
    (FLAIR in ``anat/`` is ignored, as in the paper) and
    ``derivatives/sub-strokecaseXXXX/ses-0001/*_msk.nii.gz``. Subject folders may also sit
    directly in the root instead of ``rawdata/``.
``"generic"``
    A MONAI decathlon-style JSON datalist (``{"training": [{"image": ..., "label": ...}]}``,
    paths relative to the JSON file), a folder holding such a ``dataset.json``, or a folder with
    ``imagesTr/``/``images/`` and ``labelsTr/``/``labels/`` whose files match by name (an image is
    ``<id>.nii.gz`` or, nnU-Net style, ``<id>_0000.nii.gz``, ``<id>_0001.nii.gz``, ...).
``"demo"``
    The built-in synthetic data set (:mod:`fastnmf.data.demo`), stored in the MSD brats layout.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = [
    "KINDS",
    "DataError",
    "MissingFileError",
    "DatasetInfo",
    "Dataset",
    "dataset_info",
    "detect_kind",
    "open_dataset",
    "load_datalist",
    "check_case",
    "read_case",
]

KINDS = ("demo", "brats", "isles", "generic")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


class DataError(ValueError):
    """Bad input data. The message starts with the offending file: ``"<path>: <problem>"``."""

    def __init__(self, path: str | Path, problem: str | None = None) -> None:
        # one argument: an already formatted message (how torch's DataLoader re-raises a
        # worker's exception)
        self.path = str(path)
        self.problem = problem
        super().__init__(str(path) if problem is None else f"{path}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.problem))


class MissingFileError(DataError, FileNotFoundError):
    """A file the layout or datalist names does not exist."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a pipeline need to know about a data set.

    Attributes:
        kind: one of :data:`KINDS`.
        in_channels: number of input channels (``None``: not known until the data is read).
        channel_names: name of each input channel, in order.
        out_channels: number of output channels (one sigmoid channel per region).
        regions: name of each output channel, in order. BraTS/demo: ``("ET", "TC", "WT")``, the
            order of the original Factorizer code (``BraTSOneHotEncoderd``, nested=True).
        label_values: the integer values a label file may contain.
        label_mode: ``"brats"`` (MSD labels → nested ET, TC, WT) or ``"onehot"`` (channel k is
            ``label == label_values[k + 1]``; a binary mask is the one-channel case).
        crop_size: default training crop (paper: 128³ BraTS, 64³ ISLES); formerly
            ``patch_size`` (still readable as an attribute, with a DeprecationWarning).
        spacing: voxel size (mm) to resample to before training, or ``None`` to keep the data's.
    """

    kind: str
    in_channels: int | None
    channel_names: tuple[str, ...]
    out_channels: int
    regions: tuple[str, ...]
    label_values: tuple[int, ...]
    label_mode: str
    crop_size: tuple[int, int, int]
    spacing: tuple[float, float, float] | None = None

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """Deprecated: the old name of :attr:`crop_size` (removed in the next release)."""
        warnings.warn("DatasetInfo.patch_size is now crop_size", DeprecationWarning, stacklevel=2)
        return self.crop_size


_BRATS_CHANNELS = ("FLAIR", "T1w", "T1gd", "T2w")  # MSD Task01 order (dataset.json "modality")
_INFOS = {
    "brats": DatasetInfo(
        kind="brats",
        in_channels=4,
        channel_names=_BRATS_CHANNELS,
        out_channels=3,
        regions=("ET", "TC", "WT"),
        label_values=(0, 1, 2, 3),
        label_mode="brats",
        crop_size=(128, 128, 128),
    ),
    "isles": DatasetInfo(
        kind="isles",
        in_channels=2,
        channel_names=("DWI", "ADC"),
        out_channels=1,
        regions=("lesion",),
        label_values=(0, 1),
        label_mode="onehot",
        crop_size=(64, 64, 64),
        spacing=(2.0, 2.0, 2.0),
    ),
    "generic": DatasetInfo(
        kind="generic",
        in_channels=None,
        channel_names=(),
        out_channels=1,
        regions=("foreground",),
        label_values=(0, 1),
        label_mode="onehot",
        crop_size=(96, 96, 96),
    ),
}
# the demo set is synthetic BraTS-style data (the same channels, labels and regions), smaller
_INFOS["demo"] = replace(_INFOS["brats"], kind="demo", crop_size=(32, 32, 32))


def _check_kind(kind: str, *, allow_auto: bool = False) -> str:
    valid = (("auto",) if allow_auto else ()) + KINDS
    if kind not in valid:
        raise ValueError(f"unknown data kind {kind!r}; valid kinds: {', '.join(valid)}")
    return kind


def dataset_info(kind: str) -> DatasetInfo:
    """The default :class:`DatasetInfo` of a data-set kind (``"demo"``, ``"brats"``, ...).

    For ``"generic"`` data the channel count and label values depend on the files; use
    :func:`open_dataset` to get the info of actual data.
    """
    return _INFOS[_check_kind(kind)]


@dataclass
class Dataset:
    """A data set found on disk: its kind, root, :class:`DatasetInfo` and datalist."""

    kind: str
    root: Path
    info: DatasetInfo
    cases: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.cases)


# --------------------------------------------------------------------------------------------
# NIfTI reading with errors that name the file


def _load_header(path: str | Path) -> nib.spatialimages.SpatialImage:
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(p, "file not found")
    try:
        img = nib.load(p)
    except Exception as e:  # nibabel raises many types for bad files
        raise DataError(p, f"cannot read as NIfTI ({type(e).__name__}: {e})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(p, f"not a NIfTI image (got {type(img).__name__})")
    return img


def _read_data(img: nib.spatialimages.SpatialImage, path: str | Path) -> np.ndarray:
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # truncated gzip, short file, ...
        raise DataError(path, f"corrupt NIfTI data ({type(e).__name__}: {e})") from e
    return np.asarray(data)


def _n_channels(shape: tuple[int, ...], path: str | Path) -> int:
    """Channels held by a NIfTI of this shape: 3D → 1, 4D → shape[3] (channels last)."""
    if len(shape) == 3:
        return 1
    if len(shape) == 4:
        return int(shape[3])
    if len(shape) == 5 and shape[3] == 1:  # (X, Y, Z, 1, C): NIfTI vector images
        return int(shape[4])
    raise DataError(path, f"expected a 3D or 4D image, got shape {tuple(shape)}")


def _label_spatial_shape(shape: tuple[int, ...], path: str | Path) -> tuple[int, int, int]:
    if len(shape) == 3 or (len(shape) in (4, 5) and all(s == 1 for s in shape[3:])):
        return tuple(int(s) for s in shape[:3])
    raise DataError(path, f"expected a 3D label map, got shape {tuple(shape)}")


def _image_paths(case: dict[str, Any]) -> list[str]:
    image = case.get("image")
    if isinstance(image, (str, Path)):
        return [str(image)]
    if not isinstance(image, (list, tuple)) or not image:
        raise DataError(case.get("id", "?"), "case needs an 'image' path or list of paths")
    return [str(p) for p in image]


def check_case(case: dict[str, Any], info: DatasetInfo) -> int:
    """Check one case from the NIfTI headers only (cheap): files exist and are NIfTI, the number
    of channels is ``info.in_channels``, all channels and the label share one spatial shape.

    Returns the number of channels. Raises :class:`DataError` naming the bad file.
    """
    paths = _image_paths(case)
    shape = None
    n = 0
    for p in paths:
        img = _load_header(p)
        n += _n_channels(img.shape, p)
        if shape is None:
            shape = tuple(img.shape[:3])
        elif tuple(img.shape[:3]) != shape:
            raise DataError(
                p, f"spatial shape {tuple(img.shape[:3])} differs from {paths[0]}'s {shape}"
            )
    if info.in_channels is not None and n != info.in_channels:
        names = f" ({', '.join(info.channel_names)})" if info.channel_names else ""
        raise DataError(
            paths[0] if len(paths) == 1 else ", ".join(paths),
            f"{n} channel(s), but {info.kind} data needs {info.in_channels}{names}",
        )
    if "label" in case and case["label"] is not None:
        lab = _load_header(case["label"])
        lshape = _label_spatial_shape(lab.shape, case["label"])
        if lshape != shape:
            raise DataError(
                case["label"], f"label shape {lshape} does not match image shape {shape}"
            )
    return n


def read_case(
    case: dict[str, Any], info: DatasetInfo
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Read and check one case fully.

    Returns ``(image, label, affine)``: image float32 ``(C, X, Y, Z)``, label uint8 ``(X, Y, Z)``
    with raw label values (``None`` when the case has no label), and the 4 × 4 affine of the
    first image file. Raises :class:`DataError` naming the file for a missing or corrupt file, a
    wrong channel count, non-finite intensities, a shape mismatch, or label values outside
    ``info.label_values``.
    """
    check_case(case, info)
    chans = []
    affine = None
    for p in _image_paths(case):
        img = _load_header(p)
        data = _read_data(img, p).astype(np.float32, copy=False)
        if affine is None:
            affine = np.asarray(img.affine, dtype=np.float64)
        if not np.isfinite(data).all():
            raise DataError(p, "image contains NaN or infinite values")
        if data.ndim == 3:
            chans.append(data[None])
        else:
            data = data.reshape(data.shape[:3] + (-1,))  # (X, Y, Z, C)
            chans.append(np.moveaxis(data, -1, 0))  # (C, X, Y, Z)
    image = np.concatenate(chans, axis=0) if len(chans) > 1 else chans[0]
    label = None
    if case.get("label") is not None:
        p = case["label"]
        raw = _read_data(_load_header(p), p)
        raw = raw.reshape(raw.shape[:3])
        values = np.unique(raw)
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise DataError(p, "label values must be integers")
        bad = sorted(set(values.astype(np.int64).tolist()) - set(info.label_values))
        if bad:
            raise DataError(
                p,
                f"label values {bad} outside the expected set {list(info.label_values)} for "
                f"{info.kind} data",
            )
        label = raw.astype(np.uint8)
    return np.ascontiguousarray(image), label, affine


# --------------------------------------------------------------------------------------------
# Layout readers


def _is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.endswith(_NIFTI_SUFFIXES) and not p.name.startswith(".")


def _strip_nifti(name: str) -> str:
    for s in _NIFTI_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def _read_json_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(path, "file not found")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise DataError(path, "expected a JSON object with a 'training' list")
    return obj


def _cases_from_json(path: Path, obj: dict[str, Any], section: str) -> list[dict[str, Any]]:
    if section not in obj or not isinstance(obj[section], list):
        raise DataError(path, f"no {section!r} list (keys: {', '.join(map(str, obj))})")
    base = path.parent
    cases = []
    for i, item in enumerate(obj[section]):
        if not isinstance(item, dict) or "image" not in item:
            raise DataError(path, f"{section}[{i}] must be an object with an 'image' entry")
        images = item["image"] if isinstance(item["image"], list) else [item["image"]]
        if not images or not all(isinstance(p, str) and p for p in images):
            raise DataError(
                path, f"{section}[{i}]['image'] must be a path or a non-empty list of paths"
            )
        images = [str((base / str(p)).resolve()) for p in images]
        label = item.get("label")
        if label is not None:
            label = str((base / str(label)).resolve())
        cid = item.get("id") or _strip_nifti(Path(images[0]).name)
        cases.append({"id": str(cid), "image": images, "label": label})
    return cases


def _is_msd_brats(obj: dict[str, Any]) -> bool:
    labels = {str(k): str(v).lower() for k, v in (obj.get("labels") or {}).items()}
    return (
        "edema" in labels.get("1", "")
        and "non-enhancing" in labels.get("2", "")
        and "enhancing" in labels.get("3", "")
    ) or "brats" in str(obj.get("name", "")).lower()


def _json_kind(obj: dict[str, Any]) -> str:
    if "fastnmf_demo" in obj:
        return "demo"
    if _is_msd_brats(obj):
        return "brats"
    return "generic"


def _isles_subject_root(root: Path) -> Path:
    return root / "rawdata" if (root / "rawdata").is_dir() else root


def _is_isles(root: Path) -> bool:
    return (root / "derivatives").is_dir() and any(_isles_subject_root(root).glob("sub-*"))


def _read_isles(root: Path) -> list[dict[str, Any]]:
    raw = _isles_subject_root(root)
    subjects = sorted(p for p in raw.glob("sub-*") if p.is_dir())
    if not subjects:
        raise MissingFileError(raw / "sub-*", "no ISLES'22 subject folders")
    cases = []
    for sub in subjects:
        sessions = sorted(p for p in sub.glob("ses-*") if p.is_dir()) or [sub]
        for ses in sessions:
            rel = ses.relative_to(raw)
            found = {}
            for key, pattern in (("dwi", "dwi/*_dwi.nii*"), ("adc", "dwi/*_adc.nii*")):
                hits = sorted(ses.glob(pattern))
                if len(hits) != 1:
                    what = "no file" if not hits else f"{len(hits)} files"
                    raise MissingFileError(ses / pattern, f"{what} (need exactly one)")
                found[key] = hits[0]
            mask_dir = root / "derivatives" / rel
            masks = sorted(mask_dir.glob("*_msk.nii*"))
            if len(masks) != 1:
                what = "no file" if not masks else f"{len(masks)} files"
                raise MissingFileError(mask_dir / "*_msk.nii.gz", f"{what} (need exactly one)")
            cid = sub.name if ses is sub else f"{sub.name}_{ses.name}"
            cases.append(
                {
                    "id": cid,
                    "image": [str(found["dwi"].resolve()), str(found["adc"].resolve())],
                    "label": str(masks[0].resolve()),
                }
            )
    return cases


_IMAGE_DIRS = ("imagesTr", "images", "image", "imgs")
_LABEL_DIRS = ("labelsTr", "labels", "label", "masks")


def _find_subdir(root: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def _read_folder(root: Path) -> list[dict[str, Any]]:
    img_dir, lab_dir = _find_subdir(root, _IMAGE_DIRS), _find_subdir(root, _LABEL_DIRS)
    if img_dir is None or lab_dir is None:
        raise DataError(
            root,
            "cannot tell the layout: expected a dataset.json, ISLES'22 rawdata/ + derivatives/, "
            f"or image and label folders (one of {', '.join(_IMAGE_DIRS)} and one of "
            f"{', '.join(_LABEL_DIRS)})",
        )
    images = {_strip_nifti(p.name): p for p in sorted(img_dir.iterdir()) if _is_nifti(p)}
    labels = {_strip_nifti(p.name): p for p in sorted(lab_dir.iterdir()) if _is_nifti(p)}
    if not labels:
        raise MissingFileError(lab_dir / "*.nii.gz", "no label files")
    cases = []
    for cid, lab in labels.items():
        if cid in images:  # one file: 3D, or 4D with channels last
            chans = [images.pop(cid)]
        else:  # nnU-Net style: <id>_0000, <id>_0001, ...
            found = sorted(k for k in images if re.fullmatch(re.escape(cid) + r"_\d{4}", k))
            if not found:
                raise MissingFileError(img_dir / f"{cid}.nii.gz", f"no image for label {lab}")
            idx = [int(k[-4:]) for k in found]
            if idx != list(range(len(found))):
                gap = min(set(range(max(idx) + 2)) - set(idx))
                raise MissingFileError(
                    img_dir / f"{cid}_{gap:04d}.nii.gz",
                    f"channel file missing: case {cid!r} has channels {idx}",
                )
            chans = [images.pop(k) for k in found]
        cases.append(
            {"id": cid, "image": [str(p.resolve()) for p in chans], "label": str(lab.resolve())}
        )
    if images:
        stem = sorted(images)[0]
        cid = re.sub(r"_\d{4}$", "", stem)
        want = sorted({f"{stem}.nii.gz", f"{cid}.nii.gz"})
        raise MissingFileError(
            images[stem], f"image without label (looked for {' or '.join(want)} in {lab_dir})"
        )
    return cases


# --------------------------------------------------------------------------------------------
# Public entry points


def detect_kind(data: str | Path) -> str:
    """The layout of ``data``: ``"demo"`` for the string "demo", else from the files (see the
    module docstring). Raises :class:`DataError` naming the path when nothing matches."""
    if str(data) == "demo":
        return "demo"
    path = Path(data).expanduser()
    if path.is_file():
        return _json_kind(_read_json_file(path))
    if not path.exists():
        raise MissingFileError(path, "no such file or folder (or pass 'demo')")
    if (path / "dataset.json").is_file():
        return _json_kind(_read_json_file(path / "dataset.json"))
    if _is_isles(path):
        return "isles"
    if _find_subdir(path, _IMAGE_DIRS) and _find_subdir(path, _LABEL_DIRS):
        return "generic"
    _read_folder(path)  # raises the layout error
    raise AssertionError("unreachable")


def _generic_info(obj: dict[str, Any] | None, n_channels: int) -> DatasetInfo:
    info = replace(_INFOS["generic"], in_channels=n_channels)
    if obj is not None and obj.get("modality"):
        mods = obj["modality"]
        names = [str(mods[k]) for k in sorted(mods, key=int)] if isinstance(mods, dict) else []
        if len(names) == n_channels:
            info = replace(info, channel_names=tuple(names))
    if obj is not None and isinstance(obj.get("labels"), dict) and len(obj["labels"]) > 1:
        items = sorted((int(k), str(v)) for k, v in obj["labels"].items())
        values = tuple(k for k, _ in items)
        if values[0] != 0:
            values = (0,) + values
            items = [(0, "background")] + items
        info = replace(
            info,
            label_values=values,
            regions=tuple(v for k, v in items if k != 0),
            out_channels=len(values) - 1,
        )
    return info


def open_dataset(
    data: str | Path,
    *,
    kind: str = "auto",
    section: str = "training",
    check: bool = True,
    **demo_kwargs: Any,
) -> Dataset:
    """Find a data set and list its cases.

    Args:
        data: ``"demo"`` (the built-in synthetic set, generated and cached on first use), a folder
            (MSD, ISLES'22 or generic layout, detected) or a JSON datalist.
        kind: ``"auto"`` or one of :data:`KINDS` to force a reader.
        section: the JSON list to read (``"training"``; MSD's ``"test"`` has no labels).
        check: read every file's header and check existence, channel count and shapes.
        demo_kwargs: passed to :func:`fastnmf.data.make_demo` when ``data == "demo"``
            (``n_cases``, ``size``, ``seed``, ``cache_dir``).

    Returns:
        a :class:`Dataset` with ``kind``, ``root``, ``info`` and ``cases``.
    """
    _check_kind(kind, allow_auto=True)
    if str(data) == "demo":
        from .demo import make_demo

        data = make_demo(**demo_kwargs)
        kind = "demo" if kind == "auto" else kind
    elif demo_kwargs:
        raise TypeError(f"unexpected arguments for non-demo data: {', '.join(demo_kwargs)}")
    path = Path(data).expanduser().resolve()
    if kind == "auto":
        kind = detect_kind(path)
    obj = None
    if path.is_file():
        obj, root = _read_json_file(path), path.parent
        cases = _cases_from_json(path, obj, section)
    elif kind == "isles" and not (path / "dataset.json").is_file():
        root, cases = path, _read_isles(path)
    elif (path / "dataset.json").is_file():
        obj, root = _read_json_file(path / "dataset.json"), path
        cases = _cases_from_json(path / "dataset.json", obj, section)
    elif path.is_dir():
        root, cases = path, _read_folder(path)
    else:
        raise MissingFileError(path, "no such file or folder (or pass 'demo')")
    if not cases:
        raise DataError(path, "the data set has no cases")
    ids = [c["id"] for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(path, f"duplicate case ids: {', '.join(dup[:5])}")
    for c in cases:
        for p in c["image"] + ([c["label"]] if c.get("label") else []):
            if not Path(p).is_file():
                raise MissingFileError(p, f"file not found (listed for case {c['id']!r})")
    if kind == "generic":
        n = check_case(cases[0], _INFOS["generic"])
        info = _generic_info(obj, n)
    else:
        info = _INFOS[kind]
    if check:
        for c in cases:
            check_case(c, info)
    return Dataset(kind=kind, root=root, info=info, cases=cases)


def load_datalist(data: str | Path, *, kind: str = "auto", **kwargs: Any) -> list[dict[str, Any]]:
    """The cases of :func:`open_dataset` (same arguments): ``[{"id", "image", "label"}, ...]``."""
    return open_dataset(data, kind=kind, **kwargs).cases
