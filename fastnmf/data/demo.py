"""Built-in demo data: brain-tumour cases synthesised from the MNI152 template that nilearn ships.

Every case starts from real adult anatomy, nilearn's MNI152 (ICBM 2009) T1 template, grey- and
white-matter probability maps and brain mask, loaded with nilearn's own functions from files inside
the nilearn package (nothing is downloaded). A case is made by

1. a random smooth deformation (small random rotation, scaling and shift, plus a smooth random
   displacement field), resampling the template onto a ``size³`` grid of isotropic voxels that
   covers the brain (about 3.9 mm at the default ``size=48``);
2. a synthetic tumour with nested sub-regions, irregular ellipsoids grown in the parenchyma:
   a necrotic core, an enhancing rim around it and a surrounding oedema that spreads further into
   white matter. Labels follow the MSD Task01 convention (1 oedema, 2 necrotic/non-enhancing
   core, 3 enhancing tumour), so the nested BraTS regions are ET = 3, TC = 2|3, WT = 1|2|3;
3. four MR contrasts in MSD channel order (FLAIR, T1w, T1gd, T2w): T1w is the template's own T1
   intensity, the others are synthesised from the tissue maps (WM, GM, CSF) with typical relative
   intensities, tumour tissue has its own (oedema bright on T2/FLAIR, rim enhancing on T1gd,
   necrosis dark on T1 and bright on T2); each channel gets a smooth bias field, noise and a
   random gain, the skull is stripped (zero outside the brain) and intensities are stored as
   int16, like BraTS images.

Everything is drawn from ``numpy.random.default_rng([seed, case_index])``: the same seed gives
bitwise-identical files, and case ``i`` does not depend on ``n_cases``. The set is written once
into a cache folder in the MSD layout (``dataset.json``, ``imagesTr/``, ``labelsTr/``) and read
back by the same loader as any data set.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

__all__ = ["DEMO_VERSION", "cache_root", "demo_spec", "generate_case", "make_demo"]

#: Bump when the generator changes: cached sets of another version are regenerated.
DEMO_VERSION = 1

_CHANNELS = ("FLAIR", "T1w", "T1gd", "T2w")
_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}

# Relative intensity of each tissue in each channel (FLAIR, T1w, T1gd, T2w). T1w of healthy tissue
# comes from the template itself; its row here is used for the tumour classes only.
_TISSUE = {
    "wm": (0.55, 0.85, 0.85, 0.40),
    "gm": (0.72, 0.62, 0.64, 0.62),
    "csf": (0.18, 0.22, 0.24, 1.00),
    "oedema": (1.00, 0.52, 0.54, 0.90),
    "necrosis": (0.45, 0.25, 0.28, 1.05),
    "enhancing": (0.82, 0.58, 1.40, 0.76),
}


def cache_root() -> Path:
    """``$FASTNMF_CACHE`` if set, else the user cache folder (``~/.cache/fastnmf`` on Linux,
    ``$XDG_CACHE_HOME/fastnmf``, ``~/Library/Caches/fastnmf``, ``%LOCALAPPDATA%/fastnmf``)."""
    env = os.environ.get("FASTNMF_CACHE")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "fastnmf"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "fastnmf"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastnmf"


@functools.lru_cache(maxsize=1)
def _template() -> dict[str, Any]:
    """MNI152 T1, GM, WM and brain mask at 2 mm (2 × 2 × 2 block means of nilearn's 1 mm maps)."""
    from nilearn import datasets  # imported here: ~1.5 s, only needed to generate

    maps = {
        "t1": datasets.load_mni152_template(),
        "gm": datasets.load_mni152_gm_template(),
        "wm": datasets.load_mni152_wm_template(),
        "mask": datasets.load_mni152_brain_mask(),
    }
    affine = maps["t1"].affine
    for img in maps.values():
        if not np.allclose(img.affine, affine) or img.shape != maps["t1"].shape:
            raise RuntimeError("nilearn's MNI152 maps do not share one grid")
    out: dict[str, Any] = {}
    for k, img in maps.items():
        a = np.asarray(img.get_fdata(), dtype=np.float32)
        s = [d - d % 2 for d in a.shape]
        a = a[: s[0], : s[1], : s[2]]
        out[k] = a.reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2).mean(axis=(1, 3, 5))
    # voxel i of the 2 mm grid is the mean of 1 mm voxels 2i and 2i + 1: its centre is 2i + 0.5
    scale = np.diag([2.0, 2.0, 2.0, 1.0])
    scale[:3, 3] = 0.5
    out["affine"] = affine @ scale
    out["mask"] = (out["mask"] > 0.5).astype(np.float32)
    out["t1"] *= out["mask"]
    idx = np.argwhere(out["mask"] > 0)
    lo, hi = idx.min(0), idx.max(0)
    out["centre"] = (out["affine"] @ np.append((lo + hi) / 2.0, 1.0))[:3]
    out["extent"] = float(((hi - lo + 1) * np.abs(np.diag(out["affine"])[:3])).max())
    return out


def _spacing(size: int) -> float:
    return round(_template()["extent"] * 1.06 / size, 3)


@functools.lru_cache(maxsize=4)
def _smoothed_template(spacing: float) -> dict[str, np.ndarray]:
    """Template maps low-passed for sampling at ``spacing`` mm (anti-aliasing)."""
    t = _template()
    sigma = max(0.0, (spacing / 2.0 - 1.0) * 0.5)
    return {k: ndi.gaussian_filter(t[k], sigma) if sigma > 0 else t[k] for k in ("t1", "gm", "wm")}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], n_ctrl: int) -> np.ndarray:
    """Smooth random field of unit standard deviation: a coarse ``n_ctrl³`` grid of normal draws,
    interpolated separably with Gaussian weights (cheap: three small matrix products)."""
    coarse = rng.standard_normal((n_ctrl,) * len(shape))
    f = coarse
    for axis, s in enumerate(shape):
        x = np.linspace(0, n_ctrl - 1, s)[:, None]  # (s, 1) position on the coarse grid
        w = np.exp(-0.5 * ((x - np.arange(n_ctrl)[None]) / 0.7) ** 2)  # (s, n_ctrl)
        w /= w.sum(1, keepdims=True)
        f = np.moveaxis(np.tensordot(w, np.moveaxis(f, axis, 0), axes=1), 0, axis)
    return ((f - f.mean()) / (f.std() + 1e-8)).astype(np.float32)


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _grid_affine(size: int, spacing: float) -> np.ndarray:
    """Output grid: isotropic ``spacing``, centred on the template brain, RAS axes."""
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = _template()["centre"] - spacing * (size - 1) / 2.0
    return aff


def _warp_anatomy(
    rng: np.random.Generator, size: int, spacing: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    t, sm = _template(), _smoothed_template(spacing)
    shape = (size,) * 3
    out_aff = _grid_affine(size, spacing)
    ijk = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij")).reshape(3, -1)
    world = out_aff[:3, :3] @ ijk + out_aff[:3, 3:4]  # (3, N) mm
    centre = t["centre"][:, None]
    a = _rotation(rng.uniform(-0.15, 0.15, 3)) @ np.diag(rng.uniform(0.9, 1.1, 3))
    shift = rng.uniform(-4.0, 4.0, (3, 1))
    disp = np.stack([_smooth_field(rng, shape, 5).reshape(-1) for _ in range(3)]) * 3.0  # mm
    src = a @ (world - centre) + centre + shift + disp  # template world coordinates
    inv = np.linalg.inv(t["affine"])
    vox = (inv[:3, :3] @ src + inv[:3, 3:4]).reshape((3,) + shape)
    maps = {k: ndi.map_coordinates(sm[k], vox, order=1, mode="constant") for k in sm}
    mask = ndi.map_coordinates(t["mask"], vox, order=1, mode="constant") > 0.5
    mask = ndi.binary_fill_holes(mask)
    return {k: v.astype(np.float32) * mask for k, v in maps.items()} | {"mask": mask}, out_aff


def _tumour(
    rng: np.random.Generator, anat: dict[str, np.ndarray], affine: np.ndarray, spacing: float
) -> np.ndarray:
    """MSD-style label map: 1 oedema, 2 necrotic core, 3 enhancing rim (nested by construction)."""
    mask, wm, gm = anat["mask"], anat["wm"], anat["gm"]
    shape = mask.shape
    r_core = rng.uniform(11.0, 22.0)  # tumour-core radius, mm
    depth = max(1, int(round(0.5 * r_core / spacing)))
    inner = ndi.binary_erosion(mask, iterations=depth) & (wm + gm > 0.6)
    z_world = affine[2, 2] * np.arange(shape[2]) + affine[2, 3]  # MNI z (mm) of each slice
    supra = inner & (z_world > -10.0)[None, None, :]  # gliomas: mostly above the tentorium
    inner = supra if supra.any() else inner
    if not inner.any():  # tiny grids: fall back to the brain itself
        inner = mask if mask.any() else np.ones(shape, bool)
    cands = np.argwhere(inner)
    c = cands[rng.integers(len(cands))].astype(np.float64)
    axes = r_core * rng.uniform(0.8, 1.2, 3) / spacing  # semi-axes, voxels
    rot = _rotation(rng.uniform(-np.pi, np.pi, 3))
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).reshape(3, -1)
    local = rot.T @ (ijk - c[:, None])
    r = np.sqrt(((local / axes[:, None]) ** 2).sum(0)).reshape(shape)  # 1 on the core boundary
    r_core_eff = r * (1.0 + 0.15 * _smooth_field(rng, shape, 6))
    r_oed_eff = r * (1.0 + 0.25 * _smooth_field(rng, shape, 6))
    necrosis = rng.uniform(0.55, 0.8)
    oedema = rng.uniform(1.4, 2.0) * (0.8 + 0.4 * wm)  # spreads further in white matter
    label = np.zeros(shape, np.uint8)
    label[r_oed_eff < oedema] = 1
    label[r_core_eff < 1.0] = 3
    label[r_core_eff < necrosis] = 2
    label[~mask] = 0
    return label


def _contrasts(
    rng: np.random.Generator, anat: dict[str, np.ndarray], label: np.ndarray
) -> np.ndarray:
    """(4, X, Y, Z) int16 image in MSD channel order (FLAIR, T1w, T1gd, T2w)."""
    mask, wm, gm, t1 = anat["mask"], anat["wm"], anat["gm"], anat["t1"]
    shape = mask.shape
    tot = np.maximum(wm + gm, 1.0)
    wm, gm = wm / tot, gm / tot
    csf = np.clip(1.0 - wm - gm, 0.0, 1.0) * mask
    soft = {  # partial-volume tumour fractions
        name: ndi.gaussian_filter((label == v).astype(np.float32), 0.6)
        for name, v in (("oedema", 1), ("necrosis", 2), ("enhancing", 3))
    }
    tumour = sum(soft.values())
    healthy = np.clip(1.0 - tumour, 0.0, 1.0)
    core_wm = wm > 0.9
    t1_wm = float(np.median(t1[core_wm])) if core_wm.any() else 1.0
    t1_scale = _TISSUE["wm"][1] / max(t1_wm, 1e-3)  # template T1 with WM at the table's value
    chans = []
    for ch in range(4):
        jitter = {k: v[ch] * rng.uniform(0.95, 1.05) for k, v in _TISSUE.items()}
        if ch in (1, 2):  # T1w and T1gd: the template's real T1 contrast
            base = t1 * t1_scale * (1.0 if ch == 1 else jitter["wm"] / _TISSUE["wm"][ch])
        else:
            base = wm * jitter["wm"] + gm * jitter["gm"] + csf * jitter["csf"]
        img = healthy * base + sum(soft[k] * jitter[k] for k in soft)
        bias = np.exp(0.08 * _smooth_field(rng, shape, 4))
        gain = 1000.0 * rng.uniform(0.7, 1.3)
        img = img * bias * gain + rng.normal(0.0, 0.02 * gain, shape)
        img = np.where(mask, np.clip(img, 1.0, 32000.0), 0.0)
        chans.append(np.round(img).astype(np.int16))
    return np.stack(chans)


def generate_case(index: int, *, size: int = 48, seed: int = 0) -> dict[str, Any]:
    """Synthesise demo case ``index`` in memory.

    Returns ``{"image": int16 (4, S, S, S), "label": uint8 (S, S, S), "affine": (4, 4),
    "mask": bool (S, S, S)}`` with channels FLAIR, T1w, T1gd, T2w and MSD label values.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = np.random.default_rng([int(seed), int(index)])
    spacing = _spacing(size)
    anat, affine = _warp_anatomy(rng, size, spacing)
    label = _tumour(rng, anat, affine, spacing)
    image = _contrasts(rng, anat, label)
    return {"image": image, "label": label, "affine": affine, "mask": anat["mask"]}


def demo_spec(*, n_cases: int = 16, size: int = 48, seed: int = 0) -> dict[str, Any]:
    """What identifies a cached demo set: generator version, case count, grid size, seed, and the
    nilearn release whose MNI152 files it was built from."""
    return {
        "version": DEMO_VERSION,
        "n_cases": int(n_cases),
        "size": int(size),
        "seed": int(seed),
        "template": f"nilearn-{importlib.metadata.version('nilearn')}",
    }


def _is_complete(folder: Path, spec: dict[str, Any]) -> bool:
    try:
        with open(folder / "dataset.json") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return False
    if obj.get("fastnmf_demo") != spec:
        return False
    return (
        all(
            (folder / c["image"]).is_file() and (folder / c["label"]).is_file()
            for c in obj.get("training", [])
        )
        and len(obj.get("training", [])) == spec["n_cases"]
    )


def make_demo(
    *,
    n_cases: int = 16,
    size: int = 48,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    force: bool = False,
    verbose: bool = False,
) -> Path:
    """Generate (once) and cache the demo data set; return its folder (MSD layout).

    Args:
        n_cases: number of cases.
        size: grid size per axis; voxels are isotropic, sized so the grid covers the brain
            (48 → about 3.9 mm).
        seed: the set is a pure function of ``(n_cases, size, seed)`` and :data:`DEMO_VERSION`.
        cache_dir: parent folder (default :func:`cache_root`).
        force: regenerate even if a complete cached copy exists.
        verbose: print where and how long.

    The set is written into a temporary folder next to its final place and renamed into place
    when complete, so an interrupted run never leaves a half-written set.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    spec = demo_spec(n_cases=n_cases, size=size, seed=seed)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    folder = root / f"demo-v{DEMO_VERSION}-n{n_cases}-s{size}-seed{seed}"
    if not force and _is_complete(folder, spec):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=root))
    try:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        training = []
        for i in range(n_cases):
            case = generate_case(i, size=size, seed=seed)
            name = f"demo_{i:03d}.nii.gz"
            img = nib.Nifti1Image(np.moveaxis(case["image"], 0, -1), case["affine"])  # (X,Y,Z,C)
            img.header.set_xyzt_units("mm")
            nib.save(img, tmp / "imagesTr" / name)
            lab = nib.Nifti1Image(case["label"], case["affine"])
            lab.header.set_xyzt_units("mm")
            nib.save(lab, tmp / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        obj = {
            "name": "fastnmf-demo",
            "description": "Synthetic brain tumours on deformed MNI152 anatomy (fastnmf.data.demo)",
            "reference": "MNI152 ICBM 2009 template as shipped by nilearn",
            "tensorImageSize": "4D",
            "modality": {str(i): c for i, c in enumerate(_CHANNELS)},
            "labels": _LABELS,
            "numTraining": n_cases,
            "numTest": 0,
            "training": training,
            "test": [],
            "fastnmf_demo": spec,
        }
        with open(tmp / "dataset.json", "w") as f:
            json.dump(obj, f, indent=1)
        if folder.exists():  # stale or forced: move aside, then swap in
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=root))
            os.replace(folder, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _is_complete(folder, spec):  # lost a race to a broken copy: surface it
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(
            f"demo data: {n_cases} cases of {size}³ in {time.perf_counter() - t0:.1f} s → {folder}"
        )
    return folder
