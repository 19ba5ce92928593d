"""Overlay pictures of a segmentation: the slices through the lesion, in true proportions.

:func:`overlay_png` draws one slice per axis: the slice with the largest area of predicted or true
foreground (any region), the centre only when both are empty, each shown with the aspect ratio of
its voxel spacing; the legend and title use the data set's own region names, and the truth is
mentioned only when there is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["overlay_png", "lesion_slices"]

_COLOURS = [(0.0, 0.9, 0.2), (1.0, 0.85, 0.0), (1.0, 0.15, 0.1), (0.2, 0.6, 1.0)]
_TRUTH_COLOUR = "cyan"


def lesion_slices(mask: np.ndarray) -> tuple[int, int, int]:
    """Per axis, the index of the slice with the most foreground voxels of ``mask`` ``(X, Y, Z)``
    (the first such slice on a tie); the centre slice when the mask is empty."""
    m = np.asarray(mask, dtype=bool)
    out = []
    for axis in range(3):
        area = m.sum(axis=tuple(a for a in range(3) if a != axis))  # (size along axis,)
        out.append(int(area.argmax()) if area.any() else m.shape[axis] // 2)
    return tuple(out)


def _union_name(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else " ∪ ".join(names)


def overlay_png(
    image: np.ndarray,
    regions: np.ndarray,
    path: str | Path,
    *,
    names: Sequence[str] = (),
    title: str = "",
    truth: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    return_figure: bool = False,
):
    """Write a PNG: per axis, the image's first channel in grey, each predicted region as a
    coloured overlay (largest region drawn first), the outline of the true foreground (union of
    the regions) if ``truth`` is given, through the slice of :func:`lesion_slices` of the union
    of prediction and truth.

    Args:
        image: ``(C, X, Y, Z)`` or ``(X, Y, Z)``.
        regions: ``(R, X, Y, Z)`` binary predictions.
        names: the R region names (legend).
        title: the picture's title, e.g. the case id; what is drawn is added to it.
        truth: ``(R, X, Y, Z)`` binary true regions, or None (no truth: none is drawn or named).
        spacing: voxel size (mm) along X, Y, Z; pixels are drawn in these proportions.
        return_figure: return the matplotlib figure (left open) instead of the path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(image, dtype=np.float32)
    img = img[0] if img.ndim == 4 else img
    reg = np.asarray(regions) > 0.5
    true_fg = None if truth is None or not len(truth) else (np.asarray(truth) > 0.5).any(axis=0)
    if reg.shape[1:] != img.shape or (true_fg is not None and true_fg.shape != img.shape):
        raise ValueError(
            f"overlay: image {img.shape}, prediction {reg.shape[1:]} and truth "
            f"{None if true_fg is None else true_fg.shape} must have one spatial shape"
        )
    sp = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    fg = reg.any(axis=0) if len(reg) else np.zeros(img.shape, bool)
    slices = lesion_slices(fg | true_fg if true_fg is not None else fg)
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.8))
    order = np.argsort([-r.sum() for r in reg]) if len(reg) else []
    for axis, ax in enumerate(axes):
        idx = slices[axis]
        h, v = (a for a in range(3) if a != axis)  # displayed horizontally / vertically
        sl = np.take(img, idx, axis=axis).T  # (size[v], size[h])
        aspect = sp[v] / sp[h]
        ax.imshow(sl, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1,
                  aspect=aspect, interpolation="nearest")  # fmt: skip
        rgba = np.zeros((*sl.shape, 4), np.float32)
        for k in order:
            rgba[np.take(reg[k], idx, axis=axis).T] = (*_COLOURS[k % len(_COLOURS)], 0.45)
        ax.imshow(rgba, origin="lower", aspect=aspect, interpolation="nearest")
        if true_fg is not None:
            t = np.take(true_fg, idx, axis=axis).T.astype(float)
            if t.any():
                ax.contour(t, levels=[0.5], colors=_TRUTH_COLOUR, linewidths=0.9)
        ax.set_title(f"axis {axis}, slice {idx}", fontsize=8)
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLOURS[k % len(_COLOURS)]) for k in order]
    names = [names[k] for k in order] if len(names) == len(reg) else list(names)
    labels = [f"predicted {n}" for n in names][: len(handles)]
    if true_fg is not None:
        handles.append(plt.Line2D([0], [0], color=_TRUTH_COLOUR))
        labels.append(f"true {_union_name(names) if names else 'foreground'} (outline)")
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    what = ", ".join(names) + ": " if names else ""
    what += "prediction" + (" and truth" if true_fg is not None else "")
    found = fg.any() or (true_fg is not None and true_fg.any())
    where = "slices through the lesion" if found else "centre slices (nothing found)"
    fig.suptitle(f"{title}: {what}, {where}" if title else f"{what}, {where}", fontsize=9)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    if return_figure:
        return fig
    plt.close(fig)
    return out
