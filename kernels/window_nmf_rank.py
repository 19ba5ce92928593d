"""Fused rank-R NMF (R > 1) over (shifted) windows: the literal MU / HALS loop, on chip per window.

For R > 1 there is no closed form: we run the exact algorithm of :mod:`fastnmf.loop` (same
guarded divisions, same HALS column order, F then G in every outer iteration). A window matrix
X (E x P^3, E <= 64, P^3 <= 512 in practice) and its factors F (E x R), G (P^3 x R) fit on chip.

Forward, two kernels (no atomics, bitwise deterministic):

1. ``_window_fwd_kernel``, one program per (batch*head, shift, window): reads the window straight
   from the (B, C, *S) input, the roll folded into the index arithmetic (rolled position r holds
   voxel (r - s) mod S, ``_window_coords`` of :mod:`._common`), applies ReLU, starts from
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

from . import _common as common
from ._common import (
    _head_block,
    _load_shift,
    _voxel_block,
    _voxel_window,
    _window_and_shift,
    _window_coords,
    launch,
)
from ._rank_algebra import _step, _step_bwd, _x_times, _xt_times
from .window_nmf import _Geometry, geometry

__all__ = ["WindowNMFRank", "window_nmf_rank"]

_MAX_TILE = 65536  # E x N x R of the broadcast products (16 x 512 x 8)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _load_window(x_ptr, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, w, s, bh, C, E, HEADS, PN,
                 S0, S1, S2, P0, P1, P2, NW1, NW2, BLOCK_E: tl.constexpr,
                 BLOCK_N: tl.constexpr):  # fmt: skip
    """Pointer offsets (BLOCK_E, BLOCK_N) of window w under shift s, and their mask."""
    nvox = S0 * S1 * S2
    offset, e, emask = _head_block(bh, C, E, HEADS, nvox, BLOCK_E)
    w0, w1, w2, s0, s1, s2 = _window_and_shift(w, s, SHIFTS, NSHIFT, NW1, NW2)
    p = tl.arange(0, BLOCK_N)
    vox = _window_coords(p, w0, w1, w2, s0, s1, s2, S0, S1, S2, P0, P1, P2)
    mask = emask[:, None] & (p < PN)[None, :]
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
def _window_start(x_ptr, u0_ptr, v0_ptr, SHIFTS: tl.constexpr, C, E, HEADS,
                  NSHIFT: tl.constexpr, NWIN, PN,
                  S0, S1, S2, P0, P1, P2, NW1, NW2, R: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Program (window w, shift s, head bh): s, the window's offsets and mask, X = ReLU of the
    window, the initial F and G, and the program's index."""
    w = tl.program_id(0)
    s = tl.program_id(1)
    bh = tl.program_id(2)
    ptrs, mask = _load_window(x_ptr, SHIFTS, NSHIFT, w, s, bh, C, E, HEADS, PN, S0, S1, S2, P0, P1,
                              P2, NW1, NW2, BLOCK_E, BLOCK_N)  # fmt: skip
    x = tl.maximum(tl.load(x_ptr + ptrs, mask=mask, other=0).to(ACC), 0)  # (BLOCK_E, BLOCK_N)
    f, g = _load_init(u0_ptr, v0_ptr, E, PN, R, BLOCK_E, BLOCK_N, BLOCK_R, ACC)
    prog = ((bh * NSHIFT + s) * NWIN + w).to(tl.int64)
    return s, ptrs, mask, x, f, g, prog


@triton.jit
def _window_fwd_kernel(
    x_ptr, u0_ptr, v0_ptr, SHIFTS: tl.constexpr, f_ptr, g_ptr,
    C, E, HEADS, NSHIFT: tl.constexpr, NWIN, ITERS, PN,
    S0, S1, S2, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, NW1, NW2,
    R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MU: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    s, ptrs, mask, x, f, g, prog = _window_start(
        x_ptr, u0_ptr, v0_ptr, SHIFTS, C, E, HEADS, NSHIFT, NWIN, PN,
        S0, S1, S2, P0, P1, P2, NW1, NW2, R, BLOCK_E, BLOCK_N, BLOCK_R, ACC,
    )  # fmt: skip
    for _ in range(0, ITERS):
        f, g = _step(x, f, g, R, BLOCK_R, MU)
    e = tl.arange(0, BLOCK_E)
    p = tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    tl.store(f_ptr + (prog * E + e[:, None]) * R + rr[None, :], f,
             mask=(e < E)[:, None] & (rr < R)[None, :])  # fmt: skip
    tl.store(g_ptr + (prog * PN + p[:, None]) * R + rr[None, :], g,
             mask=(p < PN)[:, None] & (rr < R)[None, :])  # fmt: skip


@triton.jit
def _window_apply_kernel(
    y_ptr, SHIFTS: tl.constexpr, f_ptr, g_ptr,
    C, E, HEADS, NSHIFT: tl.constexpr, NWIN, PN,
    S0, S1, S2, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, NW1, NW2,
    R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    bh, v, vmask, e, emask, mask, ptrs = _voxel_block(C, E, HEADS, S0 * S1 * S2, BLOCK_E, BLOCK_V)
    y = tl.zeros((BLOCK_E, BLOCK_V), dtype=ACC)
    for s in range(0, NSHIFT):
        s0, s1, s2 = _load_shift(s, SHIFTS, NSHIFT)
        w, p = _voxel_window(v, s0, s1, s2, S0, S1, S2, P0, P1, P2, NW1, NW2)
        prog = ((bh * NSHIFT + s) * NWIN + w).to(tl.int64)  # (BLOCK_V,)
        for r in tl.static_range(R):
            f = tl.load(f_ptr + (prog[None, :] * E + e[:, None]) * R + r, mask=mask, other=0)
            g = tl.load(g_ptr + (prog * PN + p) * R + r, mask=vmask, other=0)
            y += f * g[None, :]  # F_w[:, r] G_w[p, r]
    y = y / NSHIFT
    tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


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
    x_ptr, dy_ptr, u0_ptr, v0_ptr, SHIFTS: tl.constexpr, fs_ptr, gs_ptr, dx_ptr,
    C, E, HEADS, NSHIFT: tl.constexpr, NWIN, ITERS, PN, NUMEL,
    S0, S1, S2, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, NW1, NW2,
    R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MU: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    s, ptrs, mask, x, f, g, prog = _window_start(
        x_ptr, u0_ptr, v0_ptr, SHIFTS, C, E, HEADS, NSHIFT, NWIN, PN,
        S0, S1, S2, P0, P1, P2, NW1, NW2, R, BLOCK_E, BLOCK_N, BLOCK_R, ACC,
    )  # fmt: skip
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


def _meta(geo: _Geometry, rank: int, x: torch.Tensor, mu: bool):
    block_n = max(triton.next_power_of_2(geo.pn), 2)
    block_r = max(triton.next_power_of_2(rank), 2)
    return dict(
        R=rank,
        BLOCK_E=geo.block_e,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        MU=mu,
        ACC=common.acc_dtype(x.dtype),
        num_warps=8 if geo.block_e * block_n * block_r > 8192 else 4,  # the E x N x R temporary
    )


def _forward(x, u0, v0, geo: _Geometry, iters: int, mu: bool):
    rank = v0.shape[1]
    progs = geo.batch * geo.heads * geo.nshift * geo.nwin
    f = torch.empty(progs, geo.E, rank, dtype=u0.dtype, device=x.device)
    g = torch.empty(progs, geo.pn, rank, dtype=u0.dtype, device=x.device)
    meta = _meta(geo, rank, x, mu)
    launch(_window_fwd_kernel, wrap=False)[(geo.nwin, geo.nshift, geo.batch * geo.heads)](
        x, u0, v0, geo.shifts, f, g,
        *geo.common(), iters, geo.pn, *geo.spatial_args(), **meta,
    )  # fmt: skip
    y = torch.empty_like(x)
    grid = (triton.cdiv(geo.nvox, geo.block_v), geo.batch * geo.heads)
    launch(_window_apply_kernel, wrap=False)[grid](
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
    launch(_window_bwd_kernel, wrap=False)[(geo.nwin, geo.nshift, geo.batch * geo.heads)](
        x, dy, u0, v0, geo.shifts, fs, gs, buf,
        *geo.common(), iters, geo.pn, x.numel(), *geo.spatial_args(), **_meta(geo, rank, x, mu),
    )  # fmt: skip
    dx = buf[0] if geo.nshift == 1 else buf.sum(0)  # fixed-order sum over shifts
    return torch.where(x > 0, dx, 0).to(x.dtype)  # ReLU'(x)


class WindowNMFRank(torch.autograd.Function):
    """Rank-R matricized NMF over windows; see the module docstring."""

    @staticmethod
    def forward(ctx, x, u0, v0, head_dim, patch, shifts, iters, mu):
        geo = geometry(x, head_dim, patch, shifts)
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
    common.check_window_inputs(x, v0, head_dim)
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
    cdt = common.compute_dtype(x.dtype)
    v0c = v0.detach().to(cdt).contiguous()  # (N, R)
    if u0 is None:
        u0c = torch.ones(head_dim, rank, dtype=cdt, device=x.device)
    else:
        u0c = u0.detach().to(device=x.device, dtype=cdt).contiguous()  # (E, R)
    return WindowNMFRank.apply(x, u0c, v0c, head_dim, tuple(patch_size), shifts, iters,
                               solver == "mu")  # fmt: skip
