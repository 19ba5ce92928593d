"""The window layout shared by the fast paths: matricize / dematricize and shift tables.

A (B, C, *S) volume with head dim E (C = H E) is cut into matrices:

- global (``window`` None): one E x prod(S) matrix per head;
- local: S is tiled by windows of P voxels per axis (S divisible by P); each head and window
  gives one E x prod(P) matrix. Windows are numbered in C order over the window grid S / P,
  columns in C order over the window's voxels.

A shift table lists, for each item of a ``shifts`` argument (None, an int or one int per spatial
dim), the roll applied to the volume before matricizing (None: no roll).

Written for the production paths (``kernel="torch"``, the models, the Triton launchers) and tested
against :mod:`fastnmf.reference`, which keeps its own literal version; nothing here imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "as_tuple",
    "shift_table",
    "padded_shift_table",
    "matricize",
    "dematricize",
    "window_count",
]


def as_tuple(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """An int repeated ``ndim`` times, or the given sequence as a tuple of ints."""
    if isinstance(value, int):
        return (value,) * ndim
    return tuple(int(v) for v in value)


def shift_table(shifts: Sequence | None, ndim: int) -> list[tuple[int, ...]]:
    """One ``ndim``-tuple per item of ``shifts`` (None alone, or a None item: no roll)."""
    if shifts is None:
        return [(0,) * ndim]
    return [(0,) * ndim if s is None else as_tuple(s, ndim) for s in shifts]


def padded_shift_table(shifts: Sequence | None, spatial: Sequence[int]) -> list[tuple[int, ...]]:
    """:func:`shift_table` as 3D rolls (leading zeros for a 2D or 1D grid), each entry reduced
    modulo the size of its axis: the shift table of the Triton kernels."""
    pad = 3 - len(spatial)
    size = (1,) * pad + tuple(spatial)
    rows = [(0,) * pad + s for s in shift_table(shifts, len(spatial))]
    return [tuple(v % n for v, n in zip(r, size, strict=True)) for r in rows]


def _grid(spatial: Sequence[int], window: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s // p for s, p in zip(spatial, window, strict=True))


def matricize(x: torch.Tensor, head_dim: int, window: Sequence[int] | int | None) -> torch.Tensor:
    """(B, C, *S) -> (B, H, windows, E, N): one E x N matrix per head and window."""
    b, c, *spatial = x.shape
    heads = c // head_dim
    if window is None:
        return x.reshape(b, heads, 1, head_dim, math.prod(spatial))  # (B, H, 1, E, N)
    p = as_tuple(window, len(spatial))
    n = _grid(spatial, p)
    d = len(spatial)
    split = [v for pair in zip(n, p, strict=True) for v in pair]  # n0, p0, n1, p1, ...
    t = x.reshape(b, heads, head_dim, *split)  # (B, H, E, n0, p0, n1, p1, ...)
    order = [0, 1, *(3 + 2 * i for i in range(d)), 2, *(4 + 2 * i for i in range(d))]
    t = t.permute(order)  # (B, H, n0, n1, ..., E, p0, p1, ...)
    return t.reshape(b, heads, math.prod(n), head_dim, math.prod(p))  # (B, H, nw, E, N)


def dematricize(
    m: torch.Tensor, spatial: Sequence[int], window: Sequence[int] | int | None
) -> torch.Tensor:
    """Inverse of :func:`matricize`: (B, H, windows, E, N) -> (B, H E, *S)."""
    b, heads, _, e, _ = m.shape
    spatial = tuple(spatial)
    if window is None:
        return m.reshape(b, heads * e, *spatial)  # (B, C, *S)
    p = as_tuple(window, len(spatial))
    n = _grid(spatial, p)
    d = len(spatial)
    t = m.reshape(b, heads, *n, e, *p)  # (B, H, n0, n1, ..., E, p0, p1, ...)
    order = [0, 1, 2 + d, *(v for i in range(d) for v in (2 + i, 3 + d + i))]
    t = t.permute(order)  # (B, H, E, n0, p0, n1, p1, ...)
    return t.reshape(b, heads * e, *spatial)  # (B, C, *S)


def window_count(spatial: Sequence[int], window: Sequence[int] | int | None) -> int:
    """Windows per head (1 for a global matricization)."""
    if window is None:
        return 1
    return math.prod(_grid(spatial, as_tuple(window, len(spatial))))
