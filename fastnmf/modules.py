"""``torch.nn`` modules around the functional API: :class:`NMF` and :class:`MatricizedNMF`.

The initial factors are buffers drawn once from U(0, 1] with a private ``torch.Generator``
(never the global seed): column r of v0/u0 depends only on ``seed`` and r, so changing the rank
after construction keeps the existing columns and draws the new ones reproducibly.

Every hyper-parameter (rank, iters, solver, head_dim, window, shifts, kernel,
num_grad_steps) can be changed after construction, e.g. for the inference-time ablations of the
paper's Fig. 8. ``num_grad_steps`` (only the last k iterations carry gradient, as in the original
code) is honoured by ``kernel="reference"`` and ``"torch"``; the Triton kernels compute the full
gradient and reject it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from . import _checks as C
from .ops import matricized_nmf, nmf

__all__ = ["NMF", "MatricizedNMF", "draw_factor"]


def draw_factor(rows: int, rank: int, seed: int, salt: int) -> torch.Tensor:
    """(rows, rank) from U(0, 1]; column r depends only on (seed, salt, r)."""
    cols = []
    for r in range(rank):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + salt * 7_919 + r) % (2**63))
        cols.append(1.0 - torch.rand(rows, generator=gen, dtype=torch.float64))
    return torch.stack(cols, dim=1).float()  # (rows, rank)


class _Redrawn:
    """A setting whose change redraws u0 and v0 (their sizes depend on it): ``check(name,
    value)`` validates and normalises the new value, kept in ``_<name>``."""

    def __init__(self, check, doc: str):
        self.check, self.__doc__ = check, doc

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.attr = name, "_" + name

    def __get__(self, obj, objtype=None):
        return self if obj is None else getattr(obj, self.attr)

    def __set__(self, obj, value) -> None:
        setattr(obj, self.attr, self.check(self.name, value))
        obj._redraw()


def _positive_int(name: str, value) -> int:
    return C.check_int(name, value, 1)


class _FactorBuffers(nn.Module):
    """Keeps u0 (M, R) and v0 (N, R) in step with the rank and sizes, and holds the solver
    settings."""

    rank = _Redrawn(_positive_int, "R, the rank of the factors.")

    def __init__(self, rows: int, cols: int, rank: int, seed: int | None):
        super().__init__()
        self.seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
        self._rank = C.check_int("rank", rank, 1)
        self.register_buffer("u0", draw_factor(rows, rank, self.seed, 0))
        self.register_buffer("v0", draw_factor(cols, rank, self.seed, 1))

    def _set_solver(self, iters: int, solver: str, kernel: str, num_grad_steps: int | None):
        self.iters = C.check_int("iters", iters, 0)
        self.solver = C.check_choice("solver", solver, C.SOLVERS)
        self.kernel = C.check_choice("kernel", kernel, C.KERNELS)
        if num_grad_steps is not None:
            C.check_int("num_grad_steps", num_grad_steps, 0)
        self.num_grad_steps = num_grad_steps

    def _solver_options(self) -> dict:
        """The keyword arguments of :func:`fastnmf.nmf` this layer holds (u0 and the settings)."""
        return dict(u0=self.u0, iters=self.iters, solver=self.solver, kernel=self.kernel,
                    num_grad_steps=self.num_grad_steps)  # fmt: skip

    def _factor_rows_cols(self) -> tuple[int, int]:
        """(M, N) of the factors after a change of the settings (here: unchanged)."""
        return self.u0.shape[0], self.v0.shape[0]

    def _redraw(self) -> None:
        rows, cols = self._factor_rows_cols()
        device = self.v0.device
        self.u0 = draw_factor(rows, self.rank, self.seed, 0).to(device)
        self.v0 = draw_factor(cols, self.rank, self.seed, 1).to(device)


class NMF(_FactorBuffers):
    """NMF of every (M, N) matrix of a nonnegative input (..., M, N); returns F G^T.

    Args:
        size: (M, N), the matrix size.
        rank: R.
        iters: outer iterations T.
        solver: ``"hals"`` or ``"mu"``.
        kernel: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``.
        num_grad_steps: only the last k iterations carry gradient (None: all).
        seed: seed of the private generator for u0 and v0 (None: drawn from torch's RNG).
    """

    def __init__(
        self,
        size: tuple[int, int],
        *,
        rank: int = 1,
        iters: int = 5,
        solver: str = "hals",
        kernel: str = "auto",
        num_grad_steps: int | None = None,
        seed: int | None = None,
    ):
        m, n = (C.check_int("size[0]", size[0], 1), C.check_int("size[1]", size[1], 1))
        super().__init__(m, n, rank, seed)
        self._set_solver(iters, solver, kernel, num_grad_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nmf(x, self.v0, **self._solver_options())

    def extra_repr(self) -> str:
        m, n = self.u0.shape[0], self.v0.shape[0]
        return (
            f"size=({m}, {n}), rank={self.rank}, iters={self.iters}, "
            f"solver={self.solver!r}, kernel={self.kernel!r}"
        )


class MatricizedNMF(_FactorBuffers):
    """Dematricize(NMF(ReLU(Matricize(x)))) of a (B, C, *S) input, see :func:`matricized_nmf`.

    Args:
        head_dim: channels per head E (the matrices are E x N).
        window: NMF window size (int or tuple); None for a global matricization.
        spatial_size: the input's spatial size, needed for a global matricization
            (N = prod(spatial_size)); ignored with windows.
        spatial_dims: 2 or 3 (taken from ``spatial_size`` when given).
        shifts: None, or a list of shifts (None / int / tuple) averaged as in Swin;
            ``"default"`` means ``[None, P // 2]``.
        rank, iters, solver, kernel, num_grad_steps, seed: as in :class:`NMF`.
        patch_size: the deprecated old name of ``window`` (a DeprecationWarning); so is the
            ``patch_size`` attribute.
    """

    def __init__(
        self,
        *,
        head_dim: int = 8,
        window: int | Sequence[int] | None = None,
        spatial_size: Sequence[int] | None = None,
        spatial_dims: int = 3,
        shifts: Sequence | str | None = None,
        rank: int = 1,
        iters: int = 5,
        solver: str = "hals",
        kernel: str = "auto",
        num_grad_steps: int | None = None,
        seed: int | None = None,
        patch_size: int | Sequence[int] | None = None,
    ):
        self._head_dim = C.check_int("head_dim", head_dim, 1)
        self._window = C.renamed_argument(
            "window", window, "patch_size", patch_size, where="MatricizedNMF"
        )
        self._spatial_size = None if spatial_size is None else tuple(spatial_size)
        if self._spatial_size is not None:
            spatial_dims = len(self._spatial_size)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims
        super().__init__(self._head_dim, self._columns(), rank, seed)
        self.shifts = shifts
        self._set_solver(iters, solver, kernel, num_grad_steps)

    def _columns(self) -> int:
        if self._window is None:
            if self._spatial_size is None:
                raise ValueError(
                    "a global MatricizedNMF (window=None) needs spatial_size, the input's "
                    "spatial size (N = prod(spatial_size))"
                )
            return math.prod(self._spatial_size)
        p = C.as_spatial_tuple("window", self._window, self.spatial_dims)
        if any(v < 1 for v in p):
            raise ValueError(f"window must be positive, got {p}")
        return math.prod(p)

    head_dim = _Redrawn(_positive_int, "E, channels per head (the rows of each matrix).")
    window = _Redrawn(
        lambda name, value: value,  # checked by _columns() as the factors are redrawn
        "The NMF window (int or tuple, as given), or None for a global matricization.",
    )
    spatial_size = _Redrawn(
        lambda name, value: None if value is None else tuple(value),
        "The input's spatial size (N = prod(spatial_size) for a global matricization).",
    )

    def _factor_rows_cols(self) -> tuple[int, int]:
        return self._head_dim, self._columns()

    @property
    def patch_size(self):
        """Deprecated: the old name of :attr:`window`."""
        _warn_patch_size()
        return self._window

    @patch_size.setter
    def patch_size(self, value) -> None:
        _warn_patch_size()
        self.window = value

    def resolved_shifts(self, ndim: int):
        if isinstance(self.shifts, str):
            if self.shifts != "default":
                raise ValueError(f"unknown shifts {self.shifts!r}; use 'default', None or a list")
            if self._window is None:
                raise ValueError("shifts='default' needs windows (window)")
            p = C.as_spatial_tuple("window", self._window, ndim)
            return [None, tuple(q // 2 for q in p)]
        return self.shifts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ndim = x.dim() - 2
        if ndim != self.spatial_dims:
            raise ValueError(
                f"this MatricizedNMF was built for {self.spatial_dims} spatial dims, got an "
                f"input of shape {tuple(x.shape)} ({ndim} spatial dims)"
            )
        return matricized_nmf(
            x,
            self.v0,
            head_dim=self._head_dim,
            window=self._window,
            shifts=self.resolved_shifts(ndim),
            **self._solver_options(),
        )

    def extra_repr(self) -> str:
        return (
            f"head_dim={self._head_dim}, window={self._window}, shifts={self.shifts}, "
            f"rank={self.rank}, iters={self.iters}, solver={self.solver!r}, "
            f"kernel={self.kernel!r}"
        )


def _warn_patch_size() -> None:
    import warnings

    warnings.warn(
        "MatricizedNMF.patch_size is now window; the old name will be removed in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
