"""Argument checks shared by the functional API, the modules and the kernels' launchers.

Every error names the argument, what was given and what would be valid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SOLVERS = ("hals", "mu")
KERNELS = ("auto", "triton", "torch", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_choice(
    name: str, value, choices: Sequence[str], *, listing: str = "valid choices"
) -> str:
    """``value`` if it is one of ``choices``; else a ValueError listing them (after ``listing``)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; {listing}: {', '.join(choices)}")
    return value


def check_heads(channels: int, head_dim: int) -> int:
    """The number of heads: ``channels`` must be divisible by ``head_dim``."""
    if channels % head_dim:
        raise ValueError(
            f"channels C={channels} are not divisible by head_dim={head_dim}; valid head_dim "
            f"values: {[d for d in range(1, channels + 1) if channels % d == 0]}"
        )
    return channels // head_dim


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_float_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; expected a floating dtype "
            "(float16, bfloat16, float32 or float64)"
        )
    return t


def check_same_device(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them together")


def want_value_checks(check: bool | None, x: torch.Tensor) -> bool:
    """``check=None`` checks values on CPU only (on a GPU the check costs a device sync)."""
    return x.device.type == "cpu" if check is None else bool(check)


def check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(f"{name} contains {bad} values")


def check_nonnegative(name: str, t: torch.Tensor) -> None:
    check_finite(name, t)
    if bool((t < 0).any()):
        raise ValueError(
            f"{name} has negative entries (min {t.min().item():.4g}); NMF needs a nonnegative "
            "input (matricized_nmf applies the ReLU itself)"
        )


def check_factor(name: str, t, rows: int, what: str, x: torch.Tensor, rank: int | None = None):
    """v0 (N, R) / u0 (M, R): shape, dtype and device."""
    check_float_tensor(name, t)
    if t.dim() != 2 or t.shape[0] != rows or t.shape[1] < 1:
        raise ValueError(
            f"{name} must have shape ({rows}, R) with R >= 1 ({what}), got {tuple(t.shape)}"
        )
    if rank is not None and t.shape[1] != rank:
        raise ValueError(f"{name} has rank {t.shape[1]} but v0 has rank {rank}")
    check_same_device(name, t, x)
    return t


def as_spatial_tuple(name: str, value, ndim: int) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}")
    if isinstance(value, int):
        value = (value,) * ndim
    try:
        value = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}") from None
    if len(value) != ndim or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}")
    return value


def renamed_argument(new: str, value, old: str, old_value, *, where: str):
    """The value of keyword ``new``, or of its deprecated old name ``old`` (a
    DeprecationWarning; both given is an error). E.g. ``window`` / ``patch_size``."""
    if old_value is None:
        return value
    import warnings

    warnings.warn(
        f"{where}({old}=...) is now {new}=...; {old} will be removed in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    if value is not None:
        raise TypeError(f"{where}: give {new} only ({old} is its deprecated old name)")
    return old_value


def check_window(window, spatial: Sequence[int]) -> tuple[int, ...] | None:
    """NMF window size per spatial dim; every spatial size must be a multiple of it."""
    if window is None:
        return None
    p = as_spatial_tuple("window", window, len(spatial))
    if any(v < 1 for v in p):
        raise ValueError(f"window must be positive, got {p}")
    bad = [(d, s, q) for d, (s, q) in enumerate(zip(spatial, p, strict=True)) if s % q]
    if bad:
        d, s, q = bad[0]
        raise ValueError(
            f"spatial size {tuple(spatial)} is not divisible by window {p}: dim {d} has "
            f"size {s}, not a multiple of {q} (nearest valid sizes: {s - s % q or q}, "
            f"{s - s % q + q}); pad or crop the input"
        )
    return p


check_patch = check_window  # the old name


def check_shifts(shifts, ndim: int) -> list | None:
    if shifts is None:
        return None
    if isinstance(shifts, (int, str)) or not isinstance(shifts, Sequence):
        raise TypeError(
            f"shifts must be None or a list whose items are None, an int, or a tuple of {ndim} "
            f"ints, got {shifts!r}"
        )
    if len(shifts) == 0:
        raise ValueError("shifts must not be empty (use None for one unshifted matricization)")
    return [None if s is None else as_spatial_tuple("shifts item", s, ndim) for s in shifts]


def check_matricized_input(x, head_dim: int) -> tuple[int, ...]:
    """x (B, C, *S) with 2 or 3 spatial dims and C divisible by head_dim; returns S."""
    check_float_tensor("x", x)
    check_int("head_dim", head_dim, 1)
    if x.dim() not in (4, 5):
        raise ValueError(
            f"x must have shape (B, C, H, W) or (B, C, D, H, W), got {tuple(x.shape)} "
            f"({x.dim()} dims)"
        )
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    check_heads(x.shape[1], head_dim)
    return tuple(x.shape[2:])


def matrix_columns(spatial: Sequence[int], patch: Sequence[int] | None) -> int:
    return math.prod(patch if patch is not None else spatial)
