"""The literal oracle: Algorithms 1-3 of the Factorizer paper, unrolled, differentiated by autograd.

Written for clarity, not speed. Every faster path (``kernel="torch"``, ``kernel="triton"``) is
tested against these functions. This module imports nothing of the project.

Notation (paper, Eq. 6 and Algorithms 1-3): a nonnegative matrix X (M x N) is approximated by
F G^T with F (M x R) and G (N x R). One outer iteration updates F, then G.

Divisions are *guarded*: ``a / b`` is taken as 0 where ``b == 0``. The unguarded multiplicative
update turns a zero row or column into 0/0 = NaN after one iteration; the original code adds an
``eps`` instead, which biases every result. A guarded division is exact wherever the denominator
is nonzero, so the rank-one closed form (derived in fastnmf/closed_form.py) matches this loop to
rounding error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange

__all__ = [
    "safe_div",
    "mu_step",
    "hals_step",
    "nmf_factors",
    "nmf_loop",
    "matricize",
    "dematricize",
    "matricized_nmf",
    "shifts_as_tuples",
    "window_count",
]


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` where ``b != 0`` and 0 elsewhere, with finite gradients everywhere."""
    nonzero = b != 0
    b_safe = torch.where(nonzero, b, torch.ones_like(b))
    return torch.where(nonzero, a / b_safe, torch.zeros((), dtype=a.dtype, device=a.device))


def mu_step(x: torch.Tensor, f: torch.Tensor, g: torch.Tensor):
    """One outer iteration of Algorithm 1 (multiplicative update), F then G.

    F <- F * (X G) / (F G^T G);  G <- G * (X^T F) / (G F^T F).
    """
    xt = x.transpose(-1, -2)  # (..., N, M)
    f = safe_div(f * (x @ g), f @ (g.transpose(-1, -2) @ g))  # (..., M, R)
    g = safe_div(g * (xt @ f), g @ (f.transpose(-1, -2) @ f))  # (..., N, R)
    return f, g


def _hals_sweep(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Update every column of ``f`` in turn: f_r <- [(A_r - sum_{s != r} f_s B_sr) / B_rr]_+.

    This is Algorithm 2's ``f_r + (A_r - F B_r) / B_rr`` written without the cancellation of
    ``f_r`` against ``F B_r``; the two are equal in exact arithmetic.
    """
    cols = list(f.unbind(-1))  # R tensors of shape (..., M)
    for r in range(len(cols)):
        others = sum(
            (cols[s] * b[..., s, r].unsqueeze(-1) for s in range(len(cols)) if s != r),
            torch.zeros_like(cols[r]),
        )
        numerator = a[..., r] - others  # (..., M)
        cols[r] = torch.relu(safe_div(numerator, b[..., r, r].unsqueeze(-1)))
    return torch.stack(cols, dim=-1)  # (..., M, R)


def hals_step(x: torch.Tensor, f: torch.Tensor, g: torch.Tensor):
    """One outer iteration of Algorithm 2 (hierarchical alternating least squares), F then G."""
    f = _hals_sweep(x @ g, g.transpose(-1, -2) @ g, f)  # A = X G (M x R), B = G^T G (R x R)
    xt = x.transpose(-1, -2)  # (..., N, M)
    g = _hals_sweep(xt @ f, f.transpose(-1, -2) @ f, g)  # C = X^T F (N x R), D = F^T F (R x R)
    return f, g


_STEPS = {"mu": mu_step, "hals": hals_step}


def nmf_factors(
    x: torch.Tensor,
    v0: torch.Tensor,
    u0: torch.Tensor | None = None,
    iters: int = 5,
    solver: str = "hals",
    num_grad_steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, G) after ``iters`` outer iterations of ``solver`` on every matrix of ``x`` (..., M, N).

    ``v0`` (N, R) initialises G and ``u0`` (M, R) initialises F (all ones when None); both are
    shared by every matrix. Only the last ``num_grad_steps`` iterations carry gradient (None:
    all), as in the original code. F is (..., M, R) and G is (..., N, R).
    """
    step = _STEPS[solver]
    m, n = x.shape[-2:]
    rank = v0.shape[-1]
    batch = x.shape[:-2]
    if u0 is None:
        u0 = torch.ones(m, rank, dtype=x.dtype, device=x.device)
    f = u0.to(x.dtype).expand(*batch, m, rank)  # (..., M, R)
    g = v0.to(x.dtype).expand(*batch, n, rank)  # (..., N, R)
    k = iters if num_grad_steps is None else num_grad_steps
    for it in range(1, iters + 1):
        with torch.set_grad_enabled(torch.is_grad_enabled() and it >= iters - k + 1):
            f, g = step(x, f, g)
    return f, g


def nmf_loop(x: torch.Tensor, v0: torch.Tensor, u0: torch.Tensor | None = None, iters: int = 5,
             solver: str = "hals", num_grad_steps: int | None = None) -> torch.Tensor:  # fmt: skip
    """F G^T of :func:`nmf_factors`: the reconstruction (..., M, N)."""
    f, g = nmf_factors(x, v0, u0, iters, solver, num_grad_steps)
    return f @ g.transpose(-1, -2)  # (..., M, N)


def _as_tuple(value, ndim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    return tuple(int(v) for v in value)


def matricize(
    x: torch.Tensor, head_dim: int, patch_size: Sequence[int] | int | None
) -> torch.Tensor:
    """(B, C, *S) -> (B, heads, windows, E, N): one E x N matrix per head and window.

    Global (``patch_size`` None): one window per head, N = prod(S). Local: windows of
    ``patch_size`` voxels, N = prod(patch_size). Channel c belongs to head c // E.
    """
    spatial = x.shape[2:]
    if patch_size is None:
        return rearrange(x, "b (h e) ... -> b h 1 e (...)", e=head_dim)  # (B, H, 1, E, N)
    p = _as_tuple(patch_size, len(spatial))
    if len(spatial) == 2:
        return rearrange(  # (B, H, nw, E, N)
            x, "b (h e) (x p) (y q) -> b h (x y) e (p q)", e=head_dim, p=p[0], q=p[1]
        )
    return rearrange(  # (B, H, nw, E, N)
        x,
        "b (h e) (x p) (y q) (z r) -> b h (x y z) e (p q r)",
        e=head_dim,
        p=p[0],
        q=p[1],
        r=p[2],
    )


def dematricize(
    m: torch.Tensor, spatial: Sequence[int], patch_size: Sequence[int] | int | None
) -> torch.Tensor:
    """Inverse of :func:`matricize`: (B, heads, windows, E, N) -> (B, C, *S)."""
    spatial = tuple(spatial)
    if patch_size is None:
        return m.reshape(m.shape[0], m.shape[1] * m.shape[3], *spatial)  # (B, C, *S)
    p = _as_tuple(patch_size, len(spatial))
    n = [s // q for s, q in zip(spatial, p, strict=True)]
    if len(spatial) == 2:
        return rearrange(  # (B, C, *S)
            m, "b h (x y) e (p q) -> b (h e) (x p) (y q)", x=n[0], y=n[1], p=p[0], q=p[1]
        )
    return rearrange(  # (B, C, *S)
        m,
        "b h (x y z) e (p q r) -> b (h e) (x p) (y q) (z r)",
        x=n[0],
        y=n[1],
        z=n[2],
        p=p[0],
        q=p[1],
        r=p[2],
    )


def matricized_nmf(
    x: torch.Tensor,
    v0: torch.Tensor,
    head_dim: int = 8,
    patch_size: Sequence[int] | int | None = None,
    shifts: Sequence | None = None,
    u0: torch.Tensor | None = None,
    iters: int = 5,
    solver: str = "hals",
    num_grad_steps: int | None = None,
) -> torch.Tensor:
    """Algorithm 3: Dematricize(NMF(ReLU(Matricize(x)))), averaged over shifted windows.

    Each item ``s`` of ``shifts`` (None, an int, or one int per spatial dim) rolls the input by
    +s, factorizes, and rolls the reconstruction back by -s. (Algorithm 3 of the paper rolls
    back by -P, which does not undo the roll; this is the corrected form.)
    """
    spatial = tuple(x.shape[2:])
    dims = tuple(range(2, x.ndim))
    z = torch.relu(x)
    out = torch.zeros_like(z)
    items = shifts_as_tuples(shifts, len(spatial))
    for s in items:
        rolled = torch.roll(z, shifts=s, dims=dims) if any(s) else z
        mats = matricize(rolled, head_dim, patch_size)  # (B, H, nw, E, N)
        rec = nmf_loop(mats, v0, u0, iters, solver, num_grad_steps)  # (B, H, nw, E, N)
        rec = dematricize(rec, spatial, patch_size)  # (B, C, *S)
        out = out + (torch.roll(rec, shifts=tuple(-v for v in s), dims=dims) if any(s) else rec)
    return out / len(items)


def shifts_as_tuples(shifts: Sequence | None, ndim: int) -> list[tuple[int, ...]]:
    """Normalise a shift list to one tuple of ints per item (None -> zeros)."""
    items = [None] if shifts is None else list(shifts)
    return [(0,) * ndim if s is None else _as_tuple(s, ndim) for s in items]


def window_count(spatial: Sequence[int], patch_size: Sequence[int] | int | None) -> int:
    """Number of windows per head (1 for a global matricization)."""
    if patch_size is None:
        return 1
    p = _as_tuple(patch_size, len(spatial))
    return math.prod(s // q for s, q in zip(spatial, p, strict=True))
