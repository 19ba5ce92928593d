"""Rank-one NMF in closed form (``kernel="torch"``), with a hand-written backward.

For R = 1, HALS and MU agree, and after T outer iterations started from G = g0

    F G^T = P X,   P = u u^T,   u = f / ||f||,   f = (X X^T)^(T-1) X g0.

(Each F update is f <- X g / ||g||^2 and each G update g <- X^T f / ||f||^2; the scalings cancel
in P.) So one pass builds the M x M Gram matrix K = X X^T and h = X g0, T - 1 small products
give u, and a second pass writes u (u^T X). The cost does not grow with T.

Forward, with every iterate normalised (no overflow for large T or large inputs):

    a_1 = h,  a_t = K â_{t-1} (t = 2..T),  â_t = a_t / ||a_t||  (0 when a_t = 0),  u = â_T.

Backward, given dY = dL/dY:

    dP = dY X^T                                  (M x M)
    ū_T = (dP + dP^T) u                          (from Y = u u^T X)
    ā_t = (ū_t - â_t (â_t^T ū_t)) / ||a_t||      (through the normalisation; 0 when a_t = 0)
    K̄ += ā_t â_{t-1}^T,  ū_{t-1} = K ā_t         (t = T..2, K symmetric)
    h̄ = ā_1
    dX = P dY + (K̄ + K̄^T) X + h̄ g0^T,   dg0 = X^T h̄.

A zero matrix gives a zero output and a zero gradient; nothing is ever NaN.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = [
    "Rank1ClosedForm",
    "rank1_closed_form",
    "power_iterates",
    "iterate_gram",
    "backprop_iterates",
    "compute_dtype",
]


def _no_autocast(device: torch.device):
    """Disable autocast inside the closed form (it accumulates in fp32 itself)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. the meta device used for FLOP counting


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _matvec(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(Bm, M, N) x (N,) or (Bm, N) -> (Bm, M)."""
    if v.dim() == 1:
        return a @ v
    return (a @ v.unsqueeze(-1)).squeeze(-1)


def _normalise(a: torch.Tensor):
    """â = a / ||a|| over the last dim, 0 where ||a|| = 0. Returns (â, ||a||)."""
    norm = torch.linalg.vector_norm(a, dim=-1)  # (Bm,)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return a / safe.unsqueeze(-1), norm


def iterate_gram(k: torch.Tensor, h: torch.Tensor, iters: int):
    """Normalised iterates from the Gram matrix: â_1 = h/||h||, â_t ∝ K â_{t-1}.

    k (..., M, M), h (..., M). Returns (â (..., T, M), norms ||a_t|| (..., T)).
    """
    a = h
    hats, norms = [], []
    for t in range(iters):
        if t > 0:
            a = (k @ hats[-1].unsqueeze(-1)).squeeze(-1)  # (..., M)
        a_hat, norm = _normalise(a)
        hats.append(a_hat)
        norms.append(norm)
    return torch.stack(hats, dim=-2), torch.stack(norms, dim=-1)


def power_iterates(x: torch.Tensor, g0: torch.Tensor, iters: int):
    """The normalised iterates â_1..â_T of the closed form and K = X X^T.

    x (Bm, M, N) in the compute dtype; g0 (N,) or (Bm, N). Returns (â (Bm, T, M), norms (Bm, T),
    K (Bm, M, M)).
    """
    k = x @ x.transpose(-1, -2)  # (Bm, M, M)
    hats, norms = iterate_gram(k, _matvec(x, g0), iters)
    return hats, norms, k


def backprop_iterates(dp: torch.Tensor, hats: torch.Tensor, norms: torch.Tensor, k: torch.Tensor):
    """From dP = dL/dP (..., M, M) back through u = â_T to (S = K̄ + K̄^T, h̄).

    hats (..., T, M), norms (..., T), k (..., M, M) as from :func:`iterate_gram`.
    """
    iters = hats.shape[-2]
    grad_hat = ((dp + dp.transpose(-1, -2)) @ hats[..., -1, :].unsqueeze(-1)).squeeze(-1)
    kbar = torch.zeros_like(k)  # (..., M, M)
    hbar = torch.zeros_like(grad_hat)
    for t in reversed(range(iters)):
        a_hat, norm = hats[..., t, :], norms[..., t]  # (..., M), (...)
        radial = (a_hat * grad_hat).sum(-1, keepdim=True)  # (..., 1)
        inv = torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, 1.0), 0.0)
        a_bar = (grad_hat - a_hat * radial) * inv.unsqueeze(-1)  # (..., M)
        if t > 0:
            kbar = kbar + a_bar.unsqueeze(-1) * hats[..., t - 1, :].unsqueeze(-2)
            grad_hat = (k @ a_bar.unsqueeze(-1)).squeeze(-1)
        else:
            hbar = a_bar
    return kbar + kbar.transpose(-1, -2), hbar


class Rank1ClosedForm(torch.autograd.Function):
    """Y = u u^T X for every matrix of x (Bm, M, N); see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g0: torch.Tensor, iters: int, scale: float = 1.0):
        cdt = compute_dtype(x.dtype)
        with _no_autocast(x.device):
            xc = x.to(cdt)
            hats, norms, k = power_iterates(xc, g0.to(cdt), iters)
            u = hats[:, -1]  # (Bm, M)
            y = u.unsqueeze(-1) * ((u * scale).unsqueeze(-2) @ xc)  # (Bm, M, 1) * (Bm, 1, N)
        ctx.save_for_backward(x, g0, hats, norms, k)
        ctx.scale = scale
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, g0, hats, norms, k = ctx.saved_tensors
        cdt = hats.dtype
        with _no_autocast(x.device):
            dy = dy.to(cdt)
            dx, dg0 = _rank1_backward(x.to(cdt), g0.to(cdt), hats, norms, k, dy, ctx.scale)
        dg0 = dg0.to(g0.dtype) if ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), dg0, None, None


def _rank1_backward(x, g0, hats, norms, k, dy, scale=1.0):
    """dX and dg0 of Y = scale * u u^T X (formulas in the module docstring)."""
    u = hats[:, -1]  # (Bm, M)
    dp = (dy @ x.transpose(-1, -2)) * scale  # (Bm, M, M)
    sym, hbar = backprop_iterates(dp, hats, norms, k)  # (Bm, M, M), (Bm, M)
    c = (u * scale).unsqueeze(-2) @ dy  # (Bm, 1, N): scale u^T dY
    g_row = g0.unsqueeze(-2).expand_as(c)  # (Bm, 1, N)
    # dX = u c + h̄ g0^T + S X as two batched products: [u h̄] [c; g0^T], then + S X
    dx = torch.stack([u, hbar], -1) @ torch.cat([c, g_row], -2)  # (Bm, M, N)
    dx.baddbmm_(sym, x)
    dg0 = (hbar.unsqueeze(-2) @ x).squeeze(-2)  # (Bm, N)
    if g0.dim() == 1:
        dg0 = dg0.sum(0)
    return dx, dg0


def rank1_closed_form(
    x: torch.Tensor, g0: torch.Tensor, iters: int, scale: float = 1.0
) -> torch.Tensor:
    """scale * P X for every matrix of x (Bm, M, N), P the rank-one projector after ``iters``."""
    return Rank1ClosedForm.apply(x, g0, iters, scale)
