"""Small dense algebra of the rank-R kernels (window and global), on register tiles.

The factors are (rows, BLOCK_R) tiles; products are broadcast-multiply-and-sum (``tl.dot`` needs
tiles >= 16 on a GPU, and E, R are smaller): the largest temporary is E x N x BLOCK_R (8 x 512 x
8 floats for the biggest windows). One outer iteration of MU / HALS (``_step``) and its
vector-Jacobian product (``_step_bwd``; derivation above ``_window_bwd_kernel`` in
:mod:`.window_nmf_rank`), with the guarded divisions of :mod:`fastnmf.loop`.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    f = _update(f, _x_times(x, g), _gram(g, g), R, BLOCK_R, MU)
    g = _update(g, _xt_times(x, f), _gram(f, f), R, BLOCK_R, MU)
    return f, g


@triton.jit
def _update(z, a, b, R: tl.constexpr, BLOCK_R: tl.constexpr, MU: tl.constexpr):
    """The factor z updated from A and B by MU or the HALS sweep."""
    if MU:
        z = _mu_update(z, a, b, R, BLOCK_R)
    else:
        z = _hals_sweep(a, b, z, R, BLOCK_R)
    return z


@triton.jit
def _update_bwd(z_in, z_out, a, b, dz, R: tl.constexpr, BLOCK_R: tl.constexpr, MU: tl.constexpr):
    """VJP of ``_update``: (dA, dB, dz_in) from dz = d z_out."""
    if MU:
        da, db, dz_in = _mu_update_bwd(z_in, z_out, a, b, dz, R, BLOCK_R)
    else:
        da, db, dz_in = _hals_sweep_bwd(a, b, z_in, z_out, dz, R, BLOCK_R)
    return da, db, dz_in


@triton.jit
def _step_bwd(x, f_in, g_in, f_out, g_out, df, dg, R: tl.constexpr, BLOCK_R: tl.constexpr,
              MU: tl.constexpr):  # fmt: skip
    """VJP of ``_step``: (dX, dF_in, dG_in) from (dF_out, dG_out)."""
    # G update: G_out = upd(C, D, G_in), C = X^T F_out, D = F_out^T F_out
    c = _xt_times(x, f_out)
    dc, dd, dg_in = _update_bwd(g_in, g_out, c, _gram(f_out, f_out), dg, R, BLOCK_R, MU)
    df = df + _x_times(x, dc) + _times_small(f_out, dd + tl.trans(dd))
    dx = _outer(f_out, dc)
    # F update: F_out = upd(A, B, F_in), A = X G_in, B = G_in^T G_in
    a = _x_times(x, g_in)
    da, db, df_in = _update_bwd(f_in, f_out, a, _gram(g_in, g_in), df, R, BLOCK_R, MU)
    dx += _outer(da, g_in)
    dg_in += _xt_times(x, da) + _times_small(g_in, db + tl.trans(db))
    return dx, df_in, dg_in
