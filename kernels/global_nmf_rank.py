"""Rank-R NMF (R > 1) of whole matrices (global matricization, plain ``fastnmf.nmf``), forward.

Each matrix X (M x N) is one head of a (B, C, *S) volume (M = E rows, N = prod(S) columns) or one
matrix of a (..., M, N) batch. We run the loop of :mod:`fastnmf.loop` (guarded divisions, HALS
column order, F then G). A global matrix does not fit on chip, but within one outer iteration:

- the F update needs only A = X G (M x R) and B = G^T G (R x R): sums over columns;
- the G update is row-local: row j of G_t needs only column j of X, G_{t-1}[j], F_t and
  D = F_t^T F_t.

So G lives in a global buffer (N x R per matrix and shift), and each outer iteration is one pass
of ``_pass_kernel`` over X, one program per (matrix*shift, chunk of columns): it updates its rows
of G in place (from F_t, D_t) and writes the chunk's partial A and B for the next F update. The
partials are summed in a fixed order by ``sum`` over the chunk dim (deterministic, no atomics),
and the tiny F update (M x R, R x R) runs in PyTorch (:func:`fastnmf.loop.mu_update` /
:func:`fastnmf.loop.hals_sweep`). ``_apply_kernel`` then writes sum_s F_s G_s[v]^T / n_shifts
from the G buffer (no read of X). Passes over X: T + 1.

A roll by s permutes the columns of a global matrix, and every step of MU and HALS is equivariant
under a column permutation, so shift s is the NMF of X itself from G_0 = v0[(v + s) mod S]:
no rolled copy, and the reconstruction needs no roll back.

Backward is not implemented for R > 1 here: calling with gradients enabled on an input that
requires grad raises NotImplementedError (use kernel='torch', which runs the batched loop with
autograd).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastnmf import loop

from ._common import (
    INTERPRET,
    _load_shift,
    _rolled_index,
    acc_dtype,
    compute_dtype,
    launch,
    shift_rows,
)
from ._rank_algebra import _gram, _hals_sweep, _mu_update, _x_times, _xt_times

__all__ = ["global_nmf_rank"]


@triton.jit
def _pass_kernel(
    x_ptr, v0_ptr, SHIFTS: tl.constexpr, g_ptr, f_ptr, d_ptr, ap_ptr, bp_ptr,
    E, NSHIFT: tl.constexpr, NCHUNK, S0, S1, S2,
    R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
    RELU: tl.constexpr, MU: tl.constexpr, UPDATE: tl.constexpr, PARTIALS: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """UPDATE: G[rows] <- upd(X^T F, F^T F, G[rows]); else G[rows] <- rolled v0. PARTIALS: the
    chunk's X G and G^T G."""
    chunk = tl.program_id(0)
    ms = tl.program_id(1)
    m = ms // NSHIFT
    s = ms % NSHIFT
    nvox = S0 * S1 * S2
    v = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = v < nvox
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    xofs = m.to(tl.int64) * E * nvox + e[:, None] * nvox + v[None, :]
    x = tl.load(x_ptr + xofs, mask=emask[:, None] & vmask[None, :], other=0).to(ACC)
    if RELU:
        x = tl.maximum(x, 0)  # (BLOCK_E, BLOCK_V)
    gofs = (ms.to(tl.int64) * nvox + v[:, None]) * R + rr[None, :]
    gmask = vmask[:, None] & rmask[None, :]
    if UPDATE:
        g = tl.load(g_ptr + gofs, mask=gmask, other=0)  # (BLOCK_V, BLOCK_R)
        fmask = emask[:, None] & rmask[None, :]
        f = tl.load(f_ptr + (ms * E + e[:, None]) * R + rr[None, :], mask=fmask, other=0)
        dmask = rmask[:, None] & rmask[None, :]
        d = tl.load(d_ptr + (ms * R + rr[:, None]) * R + rr[None, :], mask=dmask, other=0)
        c = _xt_times(x, f)  # (BLOCK_V, BLOCK_R): X^T F
        if MU:
            g = _mu_update(g, c, d, R, BLOCK_R)
        else:
            g = _hals_sweep(c, d, g, R, BLOCK_R)
    else:
        s0, s1, s2 = _load_shift(s, SHIFTS, NSHIFT)
        idx = _rolled_index(v, s0, s1, s2, S0, S1, S2)
        g = tl.load(v0_ptr + idx[:, None] * R + rr[None, :], mask=gmask, other=0).to(ACC)
    tl.store(g_ptr + gofs, g, mask=gmask)
    if PARTIALS:
        out = (ms * NCHUNK + chunk).to(tl.int64)
        a = _x_times(x, g)  # (BLOCK_E, BLOCK_R)
        tl.store(ap_ptr + (out * E + e[:, None]) * R + rr[None, :], a,
                 mask=emask[:, None] & rmask[None, :])  # fmt: skip
        b = _gram(g, g)  # (BLOCK_R, BLOCK_R)
        tl.store(bp_ptr + (out * R + rr[:, None]) * R + rr[None, :], b,
                 mask=rmask[:, None] & rmask[None, :])  # fmt: skip


@triton.jit
def _apply_kernel(
    y_ptr, f_ptr, g_ptr, E, NSHIFT, NVOX,
    R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    m = tl.program_id(1)
    v = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = v < NVOX
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    y = tl.zeros((BLOCK_E, BLOCK_V), dtype=ACC)
    for s in range(0, NSHIFT):
        ms = (m * NSHIFT + s).to(tl.int64)
        for r in tl.static_range(R):
            f = tl.load(f_ptr + (ms * E + e) * R + r, mask=emask, other=0)
            g = tl.load(g_ptr + (ms * NVOX + v) * R + r, mask=vmask, other=0)
            y += f[:, None] * g[None, :]
    y = y / NSHIFT
    ptrs = y_ptr + m.to(tl.int64) * E * NVOX + e[:, None] * NVOX + v[None, :]
    tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=emask[:, None] & vmask[None, :])


def global_nmf_rank(x, v0, *, rows, spatial, shifts=None, u0=None, iters=5, solver="hals",
                    relu=True):  # fmt: skip
    """Rank-R NMF of every (rows, prod(spatial)) matrix of the contiguous tensor ``x``, forward.

    ``x`` is (B, C, *spatial) with C a multiple of ``rows`` (global matricization, ``relu=True``)
    or (..., rows, N) with ``spatial=(N,)`` (plain NMF, ``relu=False``). Arguments are assumed
    validated by the public API.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        raise NotImplementedError(
            f"kernel='triton' has no backward for a global (patch_size=None) or plain NMF of "
            f"rank > 1 (v0 has rank {v0.shape[1]}); use kernel='torch' to train it, or call "
            "under torch.no_grad() for inference"
        )
    if not x.is_contiguous():
        raise ValueError("x must be contiguous for the Triton global kernels")
    if rows > 64:
        raise ValueError(f"M={rows} rows is too many for the Triton kernels (max 64)")
    if v0.device != x.device:
        raise ValueError(f"v0 is on {v0.device} but x is on {x.device}")
    cdt = compute_dtype(x.dtype)
    acc = acc_dtype(x.dtype)
    dev = x.device
    rank = v0.shape[1]
    pad = 3 - len(spatial)
    S = (1,) * pad + tuple(spatial)
    nvox = math.prod(S)
    matrices = x.numel() // (rows * nvox)
    shift_t = shift_rows(shifts, spatial)  # the kernel's compile-time SHIFTS
    nshift = len(shift_t)
    block_e = max(triton.next_power_of_2(rows), 2)
    block_r = max(triton.next_power_of_2(rank), 2)
    if INTERPRET:  # the CPU interpreter pays per operation, not per register: big tiles
        block_v = 1024
    else:
        block_v = max(16, min(256, 4096 // (block_e * block_r)))
    nchunk = triton.cdiv(nvox, block_v)
    ms = matrices * nshift
    v0c = v0.detach().to(cdt).contiguous()  # (N, R)
    if u0 is None:
        f = torch.ones(ms, rows, rank, dtype=cdt, device=dev)
    else:
        f = u0.detach().to(device=dev, dtype=cdt).expand(ms, rows, rank).contiguous()
    g = torch.empty(ms, nvox, rank, dtype=cdt, device=dev)  # (Bm*nshift, N, R)
    ap = torch.empty(ms, nchunk, rows, rank, dtype=cdt, device=dev)
    bp = torch.empty(ms, nchunk, rank, rank, dtype=cdt, device=dev)
    d = torch.empty(ms, rank, rank, dtype=cdt, device=dev)
    mu = solver == "mu"
    meta = dict(R=rank, BLOCK_E=block_e, BLOCK_V=block_v, BLOCK_R=block_r, RELU=relu, MU=mu,
                ACC=acc)  # fmt: skip
    grid = (nchunk, ms)
    args = (x, v0c, shift_t, g, f, d, ap, bp, rows, nshift, nchunk, *S)
    # G_0 = rolled v0
    launch(_pass_kernel, wrap=False)[grid](*args, UPDATE=False, PARTIALS=True, **meta)
    for t in range(1, iters + 1):
        a = ap.sum(1)  # (Bm*nshift, M, R): X G_{t-1}, fixed-order sum over chunks
        b = bp.sum(1)  # (Bm*nshift, R, R): G_{t-1}^T G_{t-1}
        f = loop.mu_update(f, a, b) if mu else loop.hals_sweep(f, a, b)  # (Bm*nshift, M, R)
        f = f.contiguous()
        torch.matmul(f.transpose(-1, -2), f, out=d)  # F_t^T F_t
        args = (x, v0c, shift_t, g, f, d, ap, bp, rows, nshift, nchunk, *S)
        launch(_pass_kernel, wrap=False)[grid](*args, UPDATE=True, PARTIALS=t < iters, **meta)
    y = torch.empty_like(x)
    launch(_apply_kernel, wrap=False)[(nchunk, matrices)](
        y, f, g, rows, nshift, nvox, R=rank, BLOCK_E=block_e, BLOCK_V=block_v, ACC=acc
    )
    return y
