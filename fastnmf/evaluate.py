"""Evaluation: Dice and HD95 per region (MONAI metrics), per-case CSV, summary, paired tests.

- :func:`case_metrics`: Dice and 95th-percentile Hausdorff distance (mm) of binary region masks.
  Conventions for empty masks (as the BraTS challenge): both empty → Dice 1, HD95 0; only one
  empty → Dice 0, HD95 NaN (left out of means and of the paired tests).
- :func:`evaluate`: predictions ``<pred_dir>/<id>.nii.gz`` (label maps, as written by
  :func:`fastnmf.infer.infer`) against the cases' labels → ``metrics.csv`` (one row per case)
  and ``summary.json`` / printed table (mean, std, median per column). Each prediction must lie
  in its label's voxel grid: same shape, same affine up to float noise (:func:`check_grid`),
  otherwise an error names the file and the difference (``ignore_affine=True`` skips the affine).
- :func:`compare`: two runs' per-case CSVs → paired Wilcoxon signed-rank p-values per column
  (scipy), over the cases both runs have (the paper's Fig. 3).
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from . import data as fdata

__all__ = [
    "case_metrics",
    "check_grid",
    "evaluate",
    "summarise",
    "compare",
    "read_csv",
    "write_csv",
    "format_summary",
    "format_comparison",
]


def _spacing(affine: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


# NIfTI stores the affine as float32: a grid saved and re-read differs by ~1e-5 of its values
AFFINE_RTOL = 1e-5
AFFINE_ATOL = 1e-4  # mm


def check_grid(
    pred_path: str | Path,
    pred: nib.spatialimages.SpatialImage,
    label_path: str | Path,
    label: nib.spatialimages.SpatialImage,
    *,
    ignore_affine: bool = False,
    image_affine: np.ndarray | None = None,
) -> None:
    """Raise :class:`fastnmf.data.DataError` naming ``pred_path`` unless the prediction has the
    label's spatial shape and (unless ``ignore_affine``) its affine, within
    :data:`AFFINE_RTOL` / :data:`AFFINE_ATOL` (mm): a prediction shifted, flipped or resampled
    would otherwise be scored voxel by voxel against the wrong anatomy. ``image_affine`` (the
    case's image) lets the message say when it is the label that disagrees with its image."""
    ps, ls = tuple(pred.shape[:3]), tuple(label.shape[:3])
    if ps != ls:
        raise fdata.DataError(
            pred_path, f"prediction shape {ps} != shape {ls} of the label {label_path}"
        )
    if ignore_affine:
        return
    a, b = np.asarray(pred.affine, np.float64), np.asarray(label.affine, np.float64)
    if np.allclose(a, b, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        return
    shift = a[:3, 3] - b[:3, 3]
    linear = np.abs(a[:3, :3] - b[:3, :3]).max()
    parts = []
    if np.abs(shift).max() > AFFINE_ATOL:
        parts.append("origin shifted by (" + ", ".join(f"{v:+.4g}" for v in shift) + ") mm")
    if linear > AFFINE_ATOL:
        parts.append(f"rotation/spacing part differs by up to {linear:.4g}")
    has_image = image_affine is not None
    if has_image and np.allclose(a, image_affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        parts.append("the prediction has the image's affine: the label's differs from its image's")
    raise fdata.DataError(
        pred_path,
        f"prediction affine differs from that of the label {label_path}: {'; '.join(parts)}"
        f"\nprediction affine:\n{np.array2string(a, precision=4)}\nlabel affine:\n"
        f"{np.array2string(b, precision=4)}\n(pass --ignore-affine / ignore_affine=True to "
        "score it voxel by voxel anyway)",
    )


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    *,
    names: Sequence[str],
    spacing: Sequence[float] | None = None,
) -> dict[str, float]:
    """Dice and HD95 of binary masks ``(R, *S)`` per region; keys ``dice_<name>``,
    ``hd95_<name>`` (HD95 in the units of ``spacing``: mm for NIfTI, voxels if None)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    p = torch.as_tensor(np.asarray(pred) > 0.5)[None].float()  # (1, R, *S)
    t = torch.as_tensor(np.asarray(truth) > 0.5)[None].float()
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape[1:])} != truth {tuple(t.shape[1:])}")
    if p.shape[1] != len(names):
        raise ValueError(f"{p.shape[1]} region channel(s) but {len(names)} names: {names}")
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, t)[0]
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        out[f"dice_{name}"] = float(dice[k])
    for k, name in enumerate(names):
        pe, te = not p[0, k].any(), not t[0, k].any()
        if pe and te:
            v = 0.0
        elif pe or te:
            v = math.nan
        else:
            kw = {"spacing": list(spacing)} if spacing is not None else {}
            with warnings.catch_warnings():  # MONAI's own deprecation notice, not ours
                warnings.simplefilter("ignore", FutureWarning)
                v = float(hd(p[:, k : k + 1], t[:, k : k + 1], **kw)[0, 0])
        out[f"hd95_{name}"] = v
    return out


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0]) if rows else ["id"]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
    return path


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Per-case rows of a ``metrics.csv`` (numbers as floats)."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.csv"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: per-case metrics CSV not found")
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "id" not in rows[0]:
        raise ValueError(f"{p}: not a per-case metrics CSV (needs an 'id' column and rows)")
    out = []
    for r in rows:
        d: dict[str, Any] = {"id": r["id"]}
        for k, v in r.items():
            if k != "id":
                try:
                    d[k] = float(v)
                except (TypeError, ValueError):
                    d[k] = v
        out.append(d)
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per numeric column: mean, std, median, n (NaNs left out)."""
    summary: dict[str, dict[str, float]] = {}
    for key in rows[0] if rows else []:
        vals = [r[key] for r in rows if isinstance(r[key], float)]
        if key == "id" or not vals:
            continue
        a = np.asarray(vals, dtype=np.float64)
        a = a[np.isfinite(a)]
        summary[key] = {
            "mean": float(a.mean()) if a.size else math.nan,
            "std": float(a.std()) if a.size else math.nan,
            "median": float(np.median(a)) if a.size else math.nan,
            "n": int(a.size),
        }
    return summary


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    lines = [f"  {'metric':<14} {'mean':>8} {'std':>8} {'median':>8} {'n':>4}"]
    for k, s in summary.items():
        lines.append(f"  {k:<14} {s['mean']:8.4f} {s['std']:8.4f} {s['median']:8.4f} {s['n']:4d}")
    return "\n".join(lines)


def evaluate(
    pred_dir: str | Path,
    cases: list[dict[str, Any]],
    info: fdata.DatasetInfo,
    *,
    out: str | Path | None = None,
    ignore_affine: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Score ``<pred_dir>/<id>.nii.gz`` against each case's label; write ``metrics.csv`` and
    ``summary.json`` into ``out`` (default ``pred_dir``). Returns ``(rows, summary)``.

    Every prediction is checked against its label's grid first (:func:`check_grid`); all are
    checked before anything is written."""
    pred_dir = Path(pred_dir)
    out = Path(out) if out is not None else pred_dir
    rows = []
    for case in cases:
        if not case.get("label"):
            raise fdata.DataError(case["image"][0], "case has no label to evaluate against")
        pred_path = pred_dir / f"{case['id']}.nii.gz"
        if not pred_path.is_file():
            raise fdata.MissingFileError(pred_path, f"no prediction for case {case['id']!r}")
        _, label, affine = fdata.read_case(case, info)
        try:
            pred_img = nib.load(str(pred_path))
            pred = np.asarray(pred_img.dataobj)
        except Exception as e:
            raise fdata.DataError(pred_path, f"cannot read prediction ({e})") from e
        label_img = nib.load(str(case["label"]))
        check_grid(pred_path, pred_img, case["label"], label_img, ignore_affine=ignore_affine,
                   image_affine=affine)  # fmt: skip
        pred = pred.reshape(pred.shape[:3]) if pred.ndim > 3 else pred
        truth = fdata.labels_to_regions(label, info)
        pr = fdata.labels_to_regions(pred.astype(np.int64), info)
        m = case_metrics(pr, truth, names=info.regions, spacing=_spacing(affine))
        rows.append({"id": case["id"], **m})
    summary = summarise(rows)
    write_csv(rows, out / "metrics.csv")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return rows, summary


def compare(
    a: str | Path | list[dict[str, Any]], b: str | Path | list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Paired two-sided Wilcoxon signed-rank test of every metric column of two runs, over the
    cases both have (matched by id; pairs with a NaN left out).

    Returns rows ``{"metric", "n", "mean_a", "mean_b", "median_diff", "p"}`` (``p`` NaN if fewer
    than 2 pairs or all differences are zero).
    """
    from scipy.stats import wilcoxon

    ra = a if isinstance(a, list) else read_csv(a)
    rb = b if isinstance(b, list) else read_csv(b)
    ib = {r["id"]: r for r in rb}
    common = [r for r in ra if r["id"] in ib]
    if not common:
        raise ValueError("the two runs have no case ids in common")
    cols = [k for k in ra[0] if k != "id" and k in rb[0]]
    result = []
    for col in cols:
        pairs = [
            (r[col], ib[r["id"]][col])
            for r in common
            if isinstance(r[col], float)
            and isinstance(ib[r["id"]][col], float)
            and math.isfinite(r[col])
            and math.isfinite(ib[r["id"]][col])
        ]
        x = np.array([p[0] for p in pairs])
        y = np.array([p[1] for p in pairs])
        p = math.nan
        if len(pairs) >= 2 and np.any(x != y):
            p = float(wilcoxon(x, y).pvalue)
        result.append(
            {
                "metric": col,
                "n": len(pairs),
                "mean_a": float(x.mean()) if len(x) else math.nan,
                "mean_b": float(y.mean()) if len(y) else math.nan,
                "median_diff": float(np.median(x - y)) if len(x) else math.nan,
                "p": p,
            }
        )
    return result


def format_comparison(rows: list[dict[str, Any]]) -> str:
    lines = [f"  {'metric':<14} {'n':>4} {'mean A':>9} {'mean B':>9} {'med A-B':>9} {'p':>9}"]
    for r in rows:
        lines.append(
            f"  {r['metric']:<14} {r['n']:4d} {r['mean_a']:9.4f} {r['mean_b']:9.4f} "
            f"{r['median_diff']:9.4f} {r['p']:9.3g}"
        )
    return "\n".join(lines)
