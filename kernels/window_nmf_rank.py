"""Fused rank-R NMF (R > 1) over (shifted) windows: the literal MU / HALS loop, on chip per window.

For R > 1 there is no closed form: we run the exact algorithm of :mod:`fastnmf.loop` (same
guarded divisions, same HALS column order, F then G in every outer iteration). A window matrix
X (E x P^3, E <= 64, P^3 <= 512 in practice) and its factors F (E x R), G (P^3 x R) fit on chip.

Forward, two kernels (no atomics, bitwise deterministic):

1. ``_window_fwd_kernel``, one program per (batch*head, shift, window): reads the window straight
   from the (B, C, *S) input, the roll folded into the index arithmetic (rolled position r holds
   voxel (r - s) mod S, ``_window_coords`` of :mod:`.window_nmf`), applies ReLU, starts from
   F = u0 (ones when None) and G = v0, runs T outer iterations in registers and writes F_w
   (E x R) and G_w (P^3 x R) to a small buffer: R/E of the input's size per shift.
2. ``_window_apply_kernel``, one program per (batch*head, block of voxels): for each shift finds
   the window w and position p of voxel v (``_voxel_window``) and adds F_w G_w[p]^T; writes the
   shift average. Each voxel sums its n_shifts terms in a fixed order.

Small matrix products (E, R < 16) are written as broadcast-multiply-and-sum over one column of R
at a time (``tl.dot`` needs tiles >= 16 on a GPU); all arithmetic is in fp32 (fp64 for fp64
input), whatever the input dtype.

Backward, ``_window_bwd_kernel`` (derivation above it), one program per (batch*head, shift,
window): recomputes the forward iterates from X (saved: only the input), stores them in a
per-program scratch buffer, then runs reverse mode through each outer iteration's G update and F
update, accumulating dX_w on chip. dX_w / n_shifts goes to a per-shift buffer at its voxels (each
voxel is written by exactly one window per shift); the shifts are summed by one ``sum(0)`` over
that buffer (a fixed-order reduction, deterministic) and multiplied by ReLU'(x).

Memory of the backward: the per-shift dX buffer (n_shifts x the input, fp32) and the scratch
iterates, T (E + P^3) R floats per (batch*head, shift, window), i.e. about T R / E of the input
per shift. (Recomputing the iterates from scratch at every reverse step instead would cost
T(T-1)/2 extra forward steps and no memory; not done.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .window_nmf import _check_inputs, _Geometry, _voxel_window, _window_coords

__all__ = ["WindowNMFRank", "window_nmf_rank"]

_MAX_TILE = 65536  # E x N x R of the broadcast products (16 x 512 x 8)


# ------------------------------------------------------------------------------------------------
# Small dense algebra on register tiles. The factors are (rows, BLOCK_R) tiles; products are
# broadcast-multiply-and-sum (tl.dot needs tiles >= 16 on a GPU, and E, R are smaller): the
# largest temporary is E x N x BLOCK_R (8 x 512 x 8 floats for the biggest windows).
# ------------------------------------------------------------------------------------------------


@triton.jit
def _x_times(x, y):
    """X Y: x (M, N), y (N, BLOCK_R) -> (M, BLOCK_R)."""
    return tl.sum(x[:, :, None] * y[None, :, :], axis=1)


@triton.jit
def _xt_times(x, z):
    """X^T Z: x (M, N), z (M, BLOCK_R) -> (N, BLOCK_R)."""
    return tl.sum(x[:, :, None] * z[:, None, :], axis=0)


@triton.jit
def _gram(z, w):
    """Z^T W: z, w (K, BLOCK_R) -> (BLOCK_R, BLOCK_R)."""
    return tl.sum(z[:, :, None] * w[:, None, :], axis=0)


@triton.jit
def _times_small(z, b):
    """Z B: z (K, BLOCK_R), b (BLOCK_R, BLOCK_R) -> (K, BLOCK_R)."""
    return tl.sum(z[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _outer(z, w):
    """Z W^T: z (M, BLOCK_R), w (N, BLOCK_R) -> (M, N)."""
    return tl.sum(z[:, None, :] * w[None, :, :], axis=2)


@triton.jit
def _safe_div(a, b):
    """a / b where b != 0, else 0 (fastnmf.loop.safe_div)."""
    nz = b != 0
    return tl.where(nz, a / tl.where(nz, b, 1.0), 0.0)


# ------------------------------------------------------------------------------------------------
# One outer iteration (forward) and its vector-Jacobian product.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _hals_column(a, b, state, onehot, onehot1):
    """Step r of the sweep (onehot (1, BLOCK_R), onehot1 (BLOCK_R,) mark r): q_r, B_:r, B_rr."""
    bcol = tl.sum(tl.where(onehot, b, 0.0), axis=1)  # (BLOCK_R,): B_sr, column r
    brr = tl.sum(tl.where(onehot1, bcol, 0.0), axis=0)  # B_rr
    others = tl.sum(tl.where(onehot, 0.0, state * bcol[None, :]), axis=1)  # sum_{s!=r} f_s B_sr
    q = _safe_div(tl.sum(tl.where(onehot, a, 0.0), axis=1) - others, brr)  # (K,)
    return q, bcol, brr


@triton.jit
def _hals_sweep(a, b, f, R: tl.constexpr, BLOCK_R: tl.constexpr):
    """f_r <- relu(safe_div(A_r - sum_{s != r} f_s B_sr, B_rr)) for r = 0, ..., R - 1 in turn."""
    rr1 = tl.arange(0, BLOCK_R)
    rr = rr1[None, :]
    for r in tl.static_range(R):
        onehot = rr == r
        q, bcol, brr = _hals_column(a, b, f, onehot, rr1 == r)
        f = tl.where(onehot, tl.maximum(q, 0.0)[:, None], f)
    return f


@triton.jit
def _hals_sweep_bwd(a, b, f_in, f_out, df, R: tl.constexpr, BLOCK_R: tl.constexpr):
    """VJP of ``_hals_sweep``: (dA, dB, df_in) from df = d f_out (see the backward derivation)."""
    rr1 = tl.arange(0, BLOCK_R)
    rr = rr1[None, :]
    da = tl.zeros(a.shape, dtype=a.dtype)
    db = tl.zeros(b.shape, dtype=b.dtype)
    for i in tl.static_range(R):
        r = R - 1 - i
        onehot = rr == r
        state = tl.where(rr < r, f_out, f_in)  # columns < r updated, >= r not yet
        q, bcol, brr = _hals_column(a, b, state, onehot, rr1 == r)
        dq = tl.where(q > 0, tl.sum(tl.where(onehot, df, 0.0), axis=1), 0.0)  # relu'(0) = 0
        dnum = _safe_div(dq, brr)  # no gradient where B_rr == 0
        da = tl.where(onehot, dnum[:, None], da)
        # column r of dB: -f_s . n for s != r, -sum(n q_r) on the diagonal
        dbcol = tl.where(rr1 == r, -tl.sum(dnum * q, axis=0),
                         -tl.sum(state * dnum[:, None], axis=0))  # fmt: skip
        db = tl.where(onehot, dbcol[:, None], db)
        # df_s -= n B_sr for s != r; the old f_r is overwritten and unused by step r: df_r = 0
        df = tl.where(onehot, 0.0, df - dnum[:, None] * bcol[None, :])
    return da, db, df


@triton.jit
def _mu_update(f, a, b, R: tl.constexpr, BLOCK_R: tl.constexpr):
    """safe_div(F * A, F B)."""
    return _safe_div(f * a, _times_small(f, b))


@triton.jit
def _mu_update_bwd(f_in, f_out, a, b, df, R: tl.constexpr, BLOCK_R: tl.constexpr):
    """VJP of ``_mu_update``: (dA, dB, df_in)."""
    den = _times_small(f_in, b)
    dnum = _safe_div(df, den)
    dden = -dnum * f_out  # f_out = F * A / den where den != 0, and dnum = 0 elsewhere
    df_in = dnum * a + _times_small(dden, tl.trans(b))
    da = dnum * f_in
    db = _gram(f_in, dden)
    return da, db, df_in


@triton.jit
def _step(x, f, g, R: tl.constexpr, BLOCK_R: tl.constexpr, MU: tl.constexpr):
    """One outer iteration: F from A = X G, B = G^T G; then G from C = X^T F, D = F^T F."""
    a = _x_times(x, g)
    b = _gram(g, g)
    if MU:
        f = _mu_update(f, a, b, R, BLOCK_R)
    else:
        f = _hals_sweep(a, b, f, R, BLOCK_R)
    c = _xt_times(x, f)
    d = _gram(f, f)
    if MU:
        g = _mu_update(g, c, d, R, BLOCK_R)
    else:
        g = _hals_sweep(c, d, g, R, BLOCK_R)
    return f, g


@triton.jit
def _step_bwd(x, f_in, g_in, f_out, g_out, df, dg, R: tl.constexpr, BLOCK_R: tl.constexpr,
              MU: tl.constexpr):  # fmt: skip
    """VJP of ``_step``: (dX, dF_in, dG_in) from (dF_out, dG_out)."""
    # G update: G_out = upd(C, D, G_in), C = X^T F_out, D = F_out^T F_out
    c = _xt_times(x, f_out)
    d = _gram(f_out, f_out)
    if MU:
        dc, dd, dg_in = _mu_update_bwd(g_in, g_out, c, d, dg, R, BLOCK_R)
    else:
        dc, dd, dg_in = _hals_sweep_bwd(c, d, g_in, g_out, dg, R, BLOCK_R)
    df = df + _x_times(x, dc) + _times_small(f_out, dd + tl.trans(dd))
    dx = _outer(f_out, dc)
    # F update: F_out = upd(A, B, F_in), A = X G_in, B = G_in^T G_in
    a = _x_times(x, g_in)
    b = _gram(g_in, g_in)
    if MU:
        da, db, df_in = _mu_update_bwd(f_in, f_out, a, b, df, R, BLOCK_R)
    else:
        da, db, df_in = _hals_sweep_bwd(a, b, f_in, f_out, df, R, BLOCK_R)
    dx += _outer(da, g_in)
    dg_in += _xt_times(x, da) + _times_small(g_in, db + tl.trans(db))
    return dx, df_in, dg_in


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _load_window(x_ptr, shift_ptr, w, s, bh, C, E, HEADS, PN, S0, S1, S2, P0, P1, P2, NW1, NW2,
                 BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Pointer offsets (BLOCK_E, BLOCK_N) of window w under shift s, and their mask."""
    b = bh // HEADS
    head = bh % HEADS
    nvox = S0 * S1 * S2
    offset = (b * C + head * E).to(tl.int64) * nvox
    w2 = w % NW2
    w1 = (w // NW2) % NW1
    w0 = w // (NW1 * NW2)
    s0 = tl.load(shift_ptr + s * 3)
    s1 = tl.load(shift_ptr + s * 3 + 1)
    s2 = tl.load(shift_ptr + s * 3 + 2)
    e = tl.arange(0, BLOCK_E)
    p = tl.arange(0, BLOCK_N)
    vox = _window_coords(p, w0, w1, w2, s0, s1, s2, S0, S1, S2, P0, P1, P2)
    mask = (e < E)[:, None] & (p < PN)[None, :]
    return offset + e[:, None] * nvox + vox[None, :], mask


@triton.jit
def _load_init(u0_ptr, v0_ptr, E, PN, R: tl.constexpr, BLOCK_E: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    e = tl.arange(0, BLOCK_E)
    p = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    f = tl.load(u0_ptr + e[:, None] * R + rr[None, :],
                mask=(e < E)[:, None] & (rr < R)[None, :], other=0).to(ACC)  # fmt: skip
    g = tl.load(v0_ptr + p[:, None] * R + rr[None, :],
                mask=(p < PN)[:, None] & (rr < R)[None, :], other=0).to(ACC)  # fmt: skip
    return f, g


@triton.jit
def _window_fwd_kernel(
    x_ptr, u0_ptr, v0_ptr, shift_ptr, f_ptr, g_ptr,
    C, E, HEADS, NSHIFT, NWIN, ITERS, PN,
    S0, S1, S2, P0, P1, P2, NW1, NW2,
    R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MU: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    w = tl.program_id(0)
    s = tl.program_id(1)
    bh = tl.program_id(2)
    ptrs, mask = _load_window(x_ptr, shift_ptr, w, s, bh, C, E, HEADS, PN, S0, S1, S2, P0, P1,
                              P2, NW1, NW2, BLOCK_E, BLOCK_N)  # fmt: skip
    x = tl.maximum(tl.load(x_ptr + ptrs, mask=mask, other=0).to(ACC), 0)  # (BLOCK_E, BLOCK_N)
    f, g = _load_init(u0_ptr, v0_ptr, E, PN, R, BLOCK_E, BLOCK_N, BLOCK_R, ACC)
    for _ in range(0, ITERS):
        f, g = _step(x, f, g, R, BLOCK_R, MU)
    prog = ((bh * NSHIFT + s) * NWIN + w).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    p = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    tl.store(f_ptr + (prog * E + e[:, None]) * R + rr[None, :], f,
             mask=(e < E)[:, None] & (rr < R)[None, :])  # fmt: skip
    tl.store(g_ptr + (prog * PN + p[:, None]) * R + rr[None, :], g,
             mask=(p < PN)[:, None] & (rr < R)[None, :])  # fmt: skip


@triton.jit
def _window_apply_kernel(
    y_ptr, shift_ptr, f_ptr, g_ptr,
    C, E, HEADS, NSHIFT, NWIN, PN,
    S0, S1, S2, P0, P1, P2, NW1, NW2,
    R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HEADS
    head = bh % HEADS
    nvox = S0 * S1 * S2
    offset = (b * C + head * E).to(tl.int64) * nvox
    v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = v < nvox
    e = tl.arange(0, BLOCK_E)
    mask = (e < E)[:, None] & vmask[None, :]
    y = tl.zeros((BLOCK_E, BLOCK_V), dtype=ACC)
    for s in range(0, NSHIFT):
        s0 = tl.load(shift_ptr + s * 3)
        s1 = tl.load(shift_ptr + s * 3 + 1)
        s2 = tl.load(shift_ptr + s * 3 + 2)
        w, p = _voxel_window(v, s0, s1, s2, S0, S1, S2, P0, P1, P2, NW1, NW2)
        prog = ((bh * NSHIFT + s) * NWIN + w).to(tl.int64)  # (BLOCK_V,)
        for r in tl.static_range(R):
            f = tl.load(f_ptr + (prog[None, :] * E + e[:, None]) * R + r, mask=mask, other=0)
            g = tl.load(g_ptr + (prog * PN + p) * R + r, mask=vmask, other=0)
            y += f * g[None, :]  # F_w[:, r] G_w[p, r]
    y = y / NSHIFT
    tl.store(y_ptr + offset + e[:, None] * nvox + v[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask)  # fmt: skip


# Backward.
#
# Per window (X = ReLU of the window, E x N) the forward is T maps (F, G) <- step(F, G) and the
# output Y = F_T G_T^T, whose adjoint is dY_w = dY[window voxels] / n_shifts. Reverse mode:
#
#   dF_T = dY_w G_T,   dG_T = dY_w^T F_T,   dX = 0,
#
# then for t = T, ..., 1 with (F_in, G_in) = (F_{t-1}, G_{t-1}), F_out = F_t, G_out = G_t:
#
#   G update, G_out = upd(C, D, G_in), C = X^T F_out, D = F_out^T F_out:
#       (dC, dD, dG_in) = upd^*(dG_out)
#       dF_out += X dC + F_out (dD + dD^T),   dX += F_out dC^T
#   F update, F_out = upd(A, B, F_in), A = X G_in, B = G_in^T G_in:
#       (dA, dB, dF_in) = upd^*(dF_out)
#       dG_in += X^T dA + G_in (dB + dB^T),   dX += dA G_in^T
#
# MU, upd(A, B, F) = Q with Q = (F * A) / (F B) where F B != 0 and Q = 0 (a constant) elsewhere:
#   with n = dQ / (F B) where F B != 0, else 0:
#       dF_in = n * A - (n * Q) B^T,   dA = n * F,   dB = -F^T (n * Q).
#
# HALS, the column sweep f_r <- relu(q_r), q_r = (A_r - sum_{s != r} f_s B_sr) / B_rr (q_r = 0 if
# B_rr == 0), where f_s is already updated for s < r and not yet for s > r. Reverse the sweep,
# r = R-1, ..., 0, with the state before step r = (updated columns < r, input columns >= r),
# both known from the sweep's input and output:
#       dq = df_r * [q_r > 0]                        (relu'(0) = 0, as in PyTorch)
#       n = dq / B_rr if B_rr != 0 else 0           (no gradient through a guarded 0)
#       dA_r = n,  dB_rr = -sum(n * q_r),  dB_sr = -f_s . n,  df_s -= n B_sr  (s != r)
#       df_r = 0                                     (the old f_r is overwritten, unused by step r)
# After r = 0, df is the adjoint of the sweep's input F.
#
# Finally dX_w -> its voxels (one per-shift buffer), summed over shifts, times ReLU'(x).
#
# The iterates (F_t, G_t), t < T, are recomputed from X and stored in a per-program scratch
# buffer (T (E + N) R floats); a barrier separates its writes from the reads of the reverse loop.


@triton.jit
def _window_bwd_kernel(
    x_ptr, dy_ptr, u0_ptr, v0_ptr, shift_ptr, fs_ptr, gs_ptr, dx_ptr,
    C, E, HEADS, NSHIFT, NWIN, ITERS, PN, NUMEL,
    S0, S1, S2, P0, P1, P2, NW1, NW2,
    R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MU: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    w = tl.program_id(0)
    s = tl.program_id(1)
    bh = tl.program_id(2)
    ptrs, mask = _load_window(x_ptr, shift_ptr, w, s, bh, C, E, HEADS, PN, S0, S1, S2, P0, P1,
                              P2, NW1, NW2, BLOCK_E, BLOCK_N)  # fmt: skip
    x = tl.maximum(tl.load(x_ptr + ptrs, mask=mask, other=0).to(ACC), 0)  # (BLOCK_E, BLOCK_N)
    f, g = _load_init(u0_ptr, v0_ptr, E, PN, R, BLOCK_E, BLOCK_N, BLOCK_R, ACC)
    prog = ((bh * NSHIFT + s) * NWIN + w).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    p = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    fofs = e[:, None] * R + rr[None, :]
    fmask = (e < E)[:, None] & (rr < R)[None, :]
    gofs = p[:, None] * R + rr[None, :]
    gmask = (p < PN)[:, None] & (rr < R)[None, :]
    fs = fs_ptr + prog * ITERS * E * R
    gs = gs_ptr + prog * ITERS * PN * R
    for t in range(0, ITERS):  # recompute, keeping the input of every step
        tl.store(fs + t * E * R + fofs, f, mask=fmask)
        tl.store(gs + t * PN * R + gofs, g, mask=gmask)
        f, g = _step(x, f, g, R, BLOCK_R, MU)
    tl.debug_barrier()
    dy = tl.load(dy_ptr + ptrs, mask=mask, other=0).to(ACC) / NSHIFT  # (BLOCK_E, BLOCK_N)
    df = _x_times(dy, g)  # dY G_T
    dg = _xt_times(dy, f)  # dY^T F_T
    dx = tl.zeros((BLOCK_E, BLOCK_N), dtype=ACC)
    for i in range(0, ITERS):
        t = ITERS - 1 - i
        f_in = tl.load(fs + t * E * R + fofs, mask=fmask, other=0)
        g_in = tl.load(gs + t * PN * R + gofs, mask=gmask, other=0)
        ddx, df, dg = _step_bwd(x, f_in, g_in, f, g, df, dg, R, BLOCK_R, MU)
        dx += ddx
        f, g = f_in, g_in
    tl.store(dx_ptr + s.to(tl.int64) * NUMEL + ptrs, dx, mask=mask)  # shift s's slice


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _meta(geo: _Geometry, rank: int, x: torch.Tensor, mu: bool):
    block_n = max(triton.next_power_of_2(geo.pn), 2)
    block_r = max(triton.next_power_of_2(rank), 2)
    return dict(
        R=rank,
        BLOCK_E=geo.block_e,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        MU=mu,
        ACC=_acc(x.dtype),
        num_warps=8 if geo.block_e * block_n * block_r > 8192 else 4,  # the E x N x R temporary
    )


def _forward(x, u0, v0, geo: _Geometry, iters: int, mu: bool):
    rank = v0.shape[1]
    progs = geo.batch * geo.heads * geo.nshift * geo.nwin
    f = torch.empty(progs, geo.E, rank, dtype=u0.dtype, device=x.device)
    g = torch.empty(progs, geo.pn, rank, dtype=u0.dtype, device=x.device)
    meta = _meta(geo, rank, x, mu)
    _window_fwd_kernel[(geo.nwin, geo.nshift, geo.batch * geo.heads)](
        x, u0, v0, geo.shifts, f, g,
        *geo.common(), iters, geo.pn, *geo.spatial_args(), **meta,
    )  # fmt: skip
    y = torch.empty_like(x)
    _window_apply_kernel[(triton.cdiv(geo.nvox, geo.block_v), geo.batch * geo.heads)](
        y, geo.shifts, f, g,
        *geo.common(), geo.pn, *geo.spatial_args(),
        R=rank, BLOCK_E=geo.block_e, BLOCK_V=geo.block_v, ACC=meta["ACC"],
    )  # fmt: skip
    return y


def _backward(x, u0, v0, dy, geo: _Geometry, iters: int, mu: bool):
    rank = v0.shape[1]
    progs = geo.batch * geo.heads * geo.nshift * geo.nwin
    fs = torch.empty(progs, iters, geo.E, rank, dtype=u0.dtype, device=x.device)
    gs = torch.empty(progs, iters, geo.pn, rank, dtype=u0.dtype, device=x.device)
    buf = torch.empty(geo.nshift, *x.shape, dtype=u0.dtype, device=x.device)  # (nshift, B, C, *S)
    _window_bwd_kernel[(geo.nwin, geo.nshift, geo.batch * geo.heads)](
        x, dy, u0, v0, geo.shifts, fs, gs, buf,
        *geo.common(), iters, geo.pn, x.numel(), *geo.spatial_args(), **_meta(geo, rank, x, mu),
    )  # fmt: skip
    dx = buf[0] if geo.nshift == 1 else buf.sum(0)  # fixed-order sum over shifts
    return torch.where(x > 0, dx, 0).to(x.dtype)  # ReLU'(x)


class WindowNMFRank(torch.autograd.Function):
    """Rank-R matricized NMF over windows; see the module docstring."""

    @staticmethod
    def forward(ctx, x, u0, v0, head_dim, patch, shifts, iters, mu):
        geo = _Geometry(x, head_dim, patch, shifts)
        ctx.save_for_backward(x, u0, v0)
        ctx.geo, ctx.iters, ctx.mu = geo, iters, mu
        return _forward(x, u0, v0, geo, iters, mu)

    @staticmethod
    def backward(ctx, dy):
        x, u0, v0 = ctx.saved_tensors
        dx = _backward(x, u0, v0, dy.contiguous(), ctx.geo, ctx.iters, ctx.mu)
        return dx, None, None, None, None, None, None, None


def window_nmf_rank(x, v0, *, head_dim, patch_size, shifts, u0=None, iters=5, solver="hals"):
    """Rank-R (R >= 1) matricized NMF over (shifted) windows with the fused kernels.

    x (B, C, *S) before ReLU, contiguous; v0 (prod(P), R); u0 (E, R) or None (ones);
    patch_size a tuple per spatial dim; shifts None or a list of None / tuples. Arguments are
    assumed validated by :func:`fastnmf.matricized_nmf`.
    """
    _check_inputs(x, v0, head_dim)
    pn = math.prod(patch_size)
    rank = v0.shape[1]
    tile = triton.next_power_of_2(head_dim) * triton.next_power_of_2(pn)
    tile *= triton.next_power_of_2(rank)
    if tile > _MAX_TILE:
        raise ValueError(
            f"head_dim={head_dim} x prod(patch_size)={pn} x rank={rank} is too large for the "
            f"rank-R Triton window kernels, which hold a window on chip (padded to powers of two, "
            f"at most {_MAX_TILE}); use kernel='torch'"
        )
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    v0c = v0.detach().to(cdt).contiguous()  # (N, R)
    if u0 is None:
        u0c = torch.ones(head_dim, rank, dtype=cdt, device=x.device)
    else:
        u0c = u0.detach().to(device=x.device, dtype=cdt).contiguous()  # (E, R)
    return WindowNMFRank.apply(x, u0c, v0c, head_dim, tuple(patch_size), shifts, iters,
                               solver == "mu")  # fmt: skip
