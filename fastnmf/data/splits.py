"""Deterministic k-fold cross-validation splits of a datalist."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["folds", "split"]


def _key(case: dict[str, Any]) -> tuple[str, str]:
    image = case.get("image")
    first = image[0] if isinstance(image, (list, tuple)) else str(image)
    return (str(case.get("id", "")), str(first))


def folds(datalist: list[dict[str, Any]], n_folds: int = 5, seed: int = 0) -> list[list[dict]]:
    """Partition ``datalist`` into ``n_folds`` folds of near-equal size (sizes differ by ≤ 1).

    Deterministic in ``(set of cases, n_folds, seed)``: cases are first sorted by id (then first
    image path), so the order of the input list does not matter; then shuffled with
    ``numpy.random.default_rng(seed)`` and dealt round-robin. Within a fold, cases keep that
    sorted order.
    """
    n = len(datalist)
    if not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if n < n_folds:
        raise ValueError(f"cannot split {n} case(s) into {n_folds} folds")
    order = sorted(range(n), key=lambda i: _key(datalist[i]))
    perm = np.random.default_rng(seed).permutation(n)
    buckets: list[list[int]] = [[] for _ in range(n_folds)]
    for j, p in enumerate(perm):
        buckets[j % n_folds].append(int(p))
    return [[datalist[order[p]] for p in sorted(b)] for b in buckets]


def split(
    datalist: list[dict[str, Any]], fold: int, *, n_folds: int = 5, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """``(train, val)`` for cross-validation fold ``fold`` (0 ≤ fold < n_folds): ``val`` is
    ``folds(datalist, n_folds, seed)[fold]`` and ``train`` all other cases (sorted order)."""
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in 0..{n_folds - 1}, got {fold}")
    parts = folds(datalist, n_folds, seed)
    val = parts[fold]
    val_ids = {id(c) for c in val}
    train = sorted((c for c in datalist if id(c) not in val_ids), key=_key)
    return train, val
