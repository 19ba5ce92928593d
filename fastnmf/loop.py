"""The batched MU / HALS loop of the fast paths (rank R > 1, ``iters == 0``, NMF components).

For every matrix X (..., M, N) of a batch, T outer iterations update F (M x R), then G (N x R),
from F = u0 (ones when None) and G = v0, shared by the batch:

- MU (Algorithm 1): F <- F * A / (F B) with A = X G, B = G^T G; then G alike from X^T F, F^T F.
- HALS (Algorithm 2): for r = 0 .. R-1 in turn,
  f_r <- max(0, (A_r - sum_{s != r} f_s B_sr) / B_rr),
  i.e. the whole batch at once, one matrix-vector product with B's off-diagonal column per r.

Every division is guarded (:func:`safe_div`: 0 where the denominator is 0), so a zero row, column
or window stays zero and nothing turns into NaN. The Triton kernels use the same guarded forms.

Written for production and tested against the literal oracle :mod:`fastnmf.reference` (float64);
nothing here imports it.
"""

from __future__ import annotations

import torch

__all__ = ["safe_div", "mu_update", "hals_sweep", "nmf_factors", "nmf_loop"]


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` where ``b != 0`` and 0 where ``b == 0``; the gradient is finite everywhere (the
    zero branch never divides by zero)."""
    ok = b != 0
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.where(ok, a / torch.where(ok, b, torch.ones_like(b)), zero)


def mu_update(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Multiplicative update of the factor f (..., K, R) from A (..., K, R) and B (..., R, R)."""
    return safe_div(f * a, f @ b)  # (..., K, R)


def hals_sweep(f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """HALS update of every column of f (..., K, R) in turn, from A (..., K, R) and B (..., R, R).

    Column r uses the columns s < r already updated and s > r not yet, as Algorithm 2 does.
    """
    rank = f.shape[-1]
    eye = torch.eye(rank, dtype=torch.bool, device=f.device)
    off = b.masked_fill(eye, 0)  # (..., R, R): B without its diagonal
    diag = torch.diagonal(b, dim1=-2, dim2=-1)  # (..., R)
    cols = torch.arange(rank, device=f.device)
    for r in range(rank):
        rest = (f @ off[..., :, r : r + 1]).squeeze(-1)  # (..., K): sum_{s != r} f_s B_sr
        new = torch.relu(safe_div(a[..., r] - rest, diag[..., r : r + 1]))  # (..., K)
        f = torch.where(cols == r, new.unsqueeze(-1), f)  # (..., K, R), column r replaced
    return f


def _outer_iteration(x: torch.Tensor, f: torch.Tensor, g: torch.Tensor, solver: str):
    """F from A = X G, B = G^T G; then G from C = X^T F, D = F^T F."""
    update = mu_update if solver == "mu" else hals_sweep
    f = update(f, x @ g, g.transpose(-1, -2) @ g)  # (..., M, R)
    g = update(g, x.transpose(-1, -2) @ f, f.transpose(-1, -2) @ f)  # (..., N, R)
    return f, g


def nmf_factors(
    x: torch.Tensor,
    v0: torch.Tensor,
    u0: torch.Tensor | None = None,
    *,
    iters: int,
    solver: str,
    num_grad_steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F (..., M, R), G (..., N, R)) after ``iters`` outer iterations on every matrix of x.

    Only the last ``num_grad_steps`` iterations are differentiated (None: all); the earlier
    ones run without autograd.
    """
    m, n = x.shape[-2:]
    batch = x.shape[:-2]
    rank = v0.shape[-1]
    f0 = torch.ones(m, rank, dtype=x.dtype, device=x.device) if u0 is None else u0.to(x.dtype)
    f = f0.expand(*batch, m, rank)  # (..., M, R)
    g = v0.to(x.dtype).expand(*batch, n, rank)  # (..., N, R)
    graded = iters if num_grad_steps is None else min(num_grad_steps, iters)
    with torch.no_grad():
        for _ in range(iters - graded):
            f, g = _outer_iteration(x, f, g, solver)
    for _ in range(graded):
        f, g = _outer_iteration(x, f, g, solver)
    return f, g


def nmf_loop(x: torch.Tensor, v0: torch.Tensor, u0: torch.Tensor | None = None, *, iters: int,
             solver: str, num_grad_steps: int | None = None) -> torch.Tensor:  # fmt: skip
    """The reconstruction F G^T (..., M, N) of :func:`nmf_factors`."""
    f, g = nmf_factors(x, v0, u0, iters=iters, solver=solver, num_grad_steps=num_grad_steps)
    return f @ g.transpose(-1, -2)  # (..., M, N)
