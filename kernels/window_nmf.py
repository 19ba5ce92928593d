"""Fused rank-one NMF over (shifted) windows: roll + matricize + ReLU + NMF + dematricize-average.

For rank one, every window's reconstruction is Y = u u^T X with u ∝ (X X^T)^(T-1) X g0
(fastnmf/closed_form.py). Y is column-local: the output at voxel v only needs x(v) and the
E-vector u of the window that holds v. So the layer is two kernels, each one pass:

1. ``_stats_fwd_kernel``, one program per (batch*head, window, shift): reads the window straight
   from the (B, C, *S) input, the roll folded into the index arithmetic (rolled position r holds
   voxel (r - s) mod S), applies ReLU, accumulates the E x E Gram matrix K and h = X g0 on chip,
   runs the T - 1 normalised power steps and writes the E-vector u (and, for training, the
   iterates â_t and their norms: T*(E+1) floats per window).
2. ``_apply_fwd_tile_kernel``, one program per (batch*head, tile of voxels): reads x(v) and for
   each shift adds u (u^T x(v)); writes the shift average. A tile is a block of voxels that lies
   inside one window under every shift (its side divides P and every shift mod P), so the
   program loads each shift's u once and reuses it for all its voxels. Shifts that leave tiles
   of fewer than ``_MIN_TILE`` voxels (e.g. a shift of 1) use ``_apply_fwd_kernel`` instead,
   which looks up the window of every voxel.

With one shift (local windows) every voxel lies in one window, so the stats kernels write the
output themselves right after the power steps (the window's second read comes from cache): one
launch and one read of x from memory, the backward likewise.

No rolled copy, no matricized copy, no concatenation and no averaging pass through memory; no
atomics, so the result is bitwise deterministic.

Backward (derivation in fastnmf/closed_form.py): with dY_s = dY / n_shifts for each shift,

    dP = dY_s X^T,  ū = (dP + dP^T) u,
    ā_t = (ū_t - â_t (â_t^T ū_t)) / ||a_t||,  K̄ += ā_t â_{t-1}^T,  ū_{t-1} = K ā_t,  h̄ = ā_1,
    dX = u (u^T dY_s) + (K̄ + K̄^T) X + h̄ g0^T,  then times ReLU'(x).

dX is column-local too: ``_stats_bwd_kernel`` computes per window the small S = K̄ + K̄^T and h̄
(E^2 + E floats) from X, dY and the saved iterates; ``_apply_bwd_tile_kernel`` (or
``_apply_bwd_kernel`` for small tiles) sums the three terms over the shifts for each voxel, the
E x E matrix S loaded once per tile and shift. Saved for backward: the input x and T*(E+1)
floats per window.

MU with zero entries in u0 or v0 keeps those rows/columns of F and G at zero: the kernels mask
the rows (``rowmask``) and, for MU, the columns where g0 is zero.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    WindowSizes,
    _load_shift,
    _power_steps,
    _power_steps_backward,
    _row_mask,
    _voxel_block,
    _voxel_window,
    _window_coords,
    acc_dtype,
    compute_dtype,
    launch,
    shared_geometry,
    shift_rows,
    window_inputs,
)
from ._window1_common import _gram, _load_relu, _stats_program, _store_dx, _tile_setup, _tile_window

__all__ = ["WindowNMF", "window_nmf"]

# Launch parameters that bench/tune_window.py sweeps on a GPU; None / 4 keep the defaults of
# _Geometry and Triton. Not part of the public API.
# "tile": most voxels per program of the tiled apply kernels; "gram": "sum" or "dot" (_gram).
TUNING: dict = {
    "chunk": None,
    "block_v": None,
    "stats_warps": None,
    "apply_warps": None,
    "tile": None,
    "gram": "sum",
    "fuse": True,
    # ptxas's register cap of the stats kernels (None: uncapped); 128 keeps 16 one-warp programs
    # an SM where the compile-time P made the forward take 150-202 registers (a variant for the
    # GPU to time: bench/time_designs.py)
    "stats_maxnreg": None,
    # None: by the shift count (kernels/__init__.py, ``window_design``); 1: this file; 2:
    # kernels/window_nmf2.py (one read of x for every shift's statistics); 3:
    # kernels/window_nmf3.py (2's forward fused into one launch, pipelined by planes)
    "design": None,
}

# Tiled apply kernels when a tile (a block inside one window under every shift) has at least
# this many voxels; below it, the per-voxel lookup of _apply_fwd_kernel / _apply_bwd_kernel.
# The CPU interpreter pays per program, not per register, so there small tiles (thousands of
# 8-voxel programs) take the per-voxel kernels with their 1024-voxel blocks; the tests force the
# tiled kernels on small tiles too (test_tiled_apply_matches_per_voxel_lookup).
_MIN_TILE = 64 if INTERPRET else 4


@triton.jit
def _stats_fwd_kernel(
    x_ptr, y_ptr, g0_ptr, rowmask_ptr, SHIFTS: tl.constexpr, u_ptr, hats_ptr, norms_ptr,
    C, E, HEADS, NSHIFT: tl.constexpr, NWIN, ITERS, PN,
    S0, S1, S2, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, NW1, NW2,
    BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, MU: tl.constexpr, SAVE: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, FUSE: tl.constexpr,
):  # fmt: skip
    s, w, bh, nvox, offset, e, emask, w0, w1, w2, s0, s1, s2 = _stats_program(
        SHIFTS, C, E, HEADS, NSHIFT, S0, S1, S2, NW1, NW2, BLOCK_E
    )
    rowmask = _row_mask(rowmask_ptr, e, emask, ACC, False)  # (FOLD: spills)
    base = x_ptr + offset
    k = tl.zeros((BLOCK_E, BLOCK_E), dtype=ACC)
    h = tl.zeros((BLOCK_E,), dtype=ACC)
    for start in range(0, PN, CHUNK):
        p = start + tl.arange(0, CHUNK)
        pmask = p < PN
        vox = _window_coords(p, w0, w1, w2, s0, s1, s2, S0, S1, S2, P0, P1, P2)
        mask = emask[:, None] & pmask[None, :]
        x = tl.load(base + e[:, None] * nvox + vox[None, :], mask=mask, other=0).to(ACC)
        x = tl.maximum(x, 0) * rowmask[:, None]  # (BLOCK_E, CHUNK): ReLU(X) of this chunk
        g = tl.load(g0_ptr + p, mask=pmask, other=0).to(ACC)
        if MU:
            x = tl.where(g[None, :] > 0, x, 0)
        k += _gram(x, x, DOT, ACC)
        h += tl.sum(x * g[None, :], axis=1)
    prog = (bh * NSHIFT + s) * NWIN + w
    a_hat = _power_steps(k, h, hats_ptr + prog * ITERS * E, norms_ptr + prog * ITERS, e, emask, E,
                         ITERS, SAVE)  # fmt: skip
    tl.store(u_ptr + prog * E + e, a_hat, mask=emask)
    if FUSE:  # one shift: every voxel is in this window only, so write y = u (u^T x) here
        for start in range(0, PN, CHUNK):
            p = start + tl.arange(0, CHUNK)
            pmask = p < PN
            vox = _window_coords(p, w0, w1, w2, s0, s1, s2, S0, S1, S2, P0, P1, P2)
            mask = emask[:, None] & pmask[None, :]
            ofs = e[:, None] * nvox + vox[None, :]
            x = tl.load(base + ofs, mask=mask, other=0).to(ACC)  # just read: from cache
            x = tl.maximum(x, 0) * rowmask[:, None]
            if MU:
                g = tl.load(g0_ptr + p, mask=pmask, other=0)
                x = tl.where(g[None, :] > 0, x, 0)
            c = tl.sum(a_hat[:, None] * x, axis=0)  # (CHUNK,): u^T x(v)
            y = a_hat[:, None] * c[None, :]
            ybase = y_ptr + offset
            tl.store(ybase + ofs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_fwd_kernel(
    x_ptr, y_ptr, g0_ptr, rowmask_ptr, SHIFTS: tl.constexpr, u_ptr,
    C, E, HEADS, NSHIFT: tl.constexpr, NWIN,
    S0, S1, S2, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, NW1, NW2,
    BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    bh, v, vmask, e, emask, mask, ptrs = _voxel_block(C, E, HEADS, S0 * S1 * S2, BLOCK_E, BLOCK_V)
    _, rowmask, x = _load_relu(x_ptr, rowmask_ptr, ptrs, mask, e, emask, ACC)  # (BLOCK_E, BLOCK_V)
    y = tl.zeros((BLOCK_E, BLOCK_V), dtype=ACC)
    for s in range(0, NSHIFT):
        s0, s1, s2 = _load_shift(s, SHIFTS, NSHIFT)
        w, p = _voxel_window(v, s0, s1, s2, S0, S1, S2, P0, P1, P2, NW1, NW2)
        prog = (bh * NSHIFT + s) * NWIN + w
        u = tl.load(u_ptr + prog[None, :] * E + e[:, None], mask=mask, other=0)
        xs = x
        if MU:
            g = tl.load(g0_ptr + p, mask=vmask, other=0)
            xs = tl.where(g[None, :] > 0, x, 0)
        c = tl.sum(u * xs, axis=0)  # (BLOCK_V,): u^T x(v)
        y += u * c[None, :]
    y = y / NSHIFT
    tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_fwd_tile_kernel(
    x_ptr, y_ptr, g0_ptr, rowmask_ptr, SHIFTS: tl.constexpr, u_ptr,
    C, E, HEADS, NSHIFT: tl.constexpr, NWIN,
    S0, S1, S2, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, NW1, NW2,
    H0, H1, H2, NT1, NT2,
    BLOCK_E: tl.constexpr, HB: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    bh, o0, o1, o2, q0, q1, q2, qmask, e, emask, mask, ptrs, _, rowmask, x = _tile_setup(
        x_ptr, rowmask_ptr, C, E, HEADS, S0, S1, S2, H0, H1, H2, NT1, NT2, BLOCK_E, HB, ACC
    )  # x: (BLOCK_E, HB)
    y = tl.zeros((BLOCK_E, HB), dtype=ACC)
    for s in range(0, NSHIFT):
        w, p = _tile_window(s, SHIFTS, NSHIFT, o0, o1, o2, q0, q1, q2, S0, S1, S2, P0, P1, P2,
                            NW1, NW2)  # fmt: skip
        prog = (bh * NSHIFT + s) * NWIN + w  # one window for the whole tile
        u = tl.load(u_ptr + prog * E + e, mask=emask, other=0).to(ACC)  # (BLOCK_E,)
        xs = x
        if MU:
            g = tl.load(g0_ptr + p, mask=qmask, other=0)
            xs = tl.where(g[None, :] > 0, x, 0)
        c = tl.sum(u[:, None] * xs, axis=0)  # (HB,): u^T x(v)
        y += u[:, None] * c[None, :]
    y = y / NSHIFT
    tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stats_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, g0_ptr, rowmask_ptr, SHIFTS: tl.constexpr, hats_ptr, norms_ptr, sym_ptr,
    hbar_ptr,
    C, E, HEADS, NSHIFT: tl.constexpr, NWIN, ITERS, PN,
    S0, S1, S2, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, NW1, NW2,
    BLOCK_E: tl.constexpr, CHUNK: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr,
    DOT: tl.constexpr, FUSE: tl.constexpr,
):  # fmt: skip
    s, w, bh, nvox, offset, e, emask, w0, w1, w2, s0, s1, s2 = _stats_program(
        SHIFTS, C, E, HEADS, NSHIFT, S0, S1, S2, NW1, NW2, BLOCK_E
    )
    rowmask = _row_mask(rowmask_ptr, e, emask, ACC, False)  # (FOLD: spills)
    k = tl.zeros((BLOCK_E, BLOCK_E), dtype=ACC)
    dp = tl.zeros((BLOCK_E, BLOCK_E), dtype=ACC)
    for start in range(0, PN, CHUNK):
        p = start + tl.arange(0, CHUNK)
        pmask = p < PN
        vox = _window_coords(p, w0, w1, w2, s0, s1, s2, S0, S1, S2, P0, P1, P2)
        mask = emask[:, None] & pmask[None, :]
        ptrs = offset + e[:, None] * nvox + vox[None, :]
        x = tl.load(x_ptr + ptrs, mask=mask, other=0).to(ACC)
        x = tl.maximum(x, 0) * rowmask[:, None]  # (BLOCK_E, CHUNK)
        if MU:
            g = tl.load(g0_ptr + p, mask=pmask, other=0)
            x = tl.where(g[None, :] > 0, x, 0)
        dy = tl.load(dy_ptr + ptrs, mask=mask, other=0)
        k += _gram(x, x, DOT, ACC)
        dp += _gram(dy, x, DOT, ACC)  # dY X^T
    dp = dp / NSHIFT
    prog = (bh * NSHIFT + s) * NWIN + w
    sym, hbar = _power_steps_backward(k, dp, hats_ptr + prog * ITERS * E, norms_ptr + prog * ITERS,
                                      e, emask, E, ITERS, BLOCK_E, ACC)  # fmt: skip
    tl.store(
        sym_ptr + prog * E * E + e[:, None] * E + e[None, :],
        sym,
        mask=emask[:, None] & emask[None, :],
    )
    tl.store(hbar_ptr + prog * E + e, hbar, mask=emask)
    if FUSE:  # one shift: dX = u (u^T dY) + S x + h̄ g0^T for this window's voxels, here
        u = tl.load(hats_ptr + (prog * ITERS + ITERS - 1) * E + e, mask=emask, other=0)
        for start in range(0, PN, CHUNK):
            p = start + tl.arange(0, CHUNK)
            pmask = p < PN
            vox = _window_coords(p, w0, w1, w2, s0, s1, s2, S0, S1, S2, P0, P1, P2)
            mask = emask[:, None] & pmask[None, :]
            ptrs = offset + e[:, None] * nvox + vox[None, :]
            x_raw = tl.load(x_ptr + ptrs, mask=mask, other=0).to(ACC)  # just read: from cache
            x = tl.maximum(x_raw, 0) * rowmask[:, None]
            dy = tl.load(dy_ptr + ptrs, mask=mask, other=0).to(ACC)
            g = tl.load(g0_ptr + p, mask=pmask, other=0).to(ACC)
            c = tl.sum(u[:, None] * dy, axis=0)  # (CHUNK,): u^T dY(v)
            sx = tl.sum(sym[:, :, None] * x[None, :, :], axis=1)  # S x(v)
            dx = u[:, None] * c[None, :] + sx + hbar[:, None] * g[None, :]
            if MU:
                dx = tl.where(g[None, :] > 0, dx, 0)
            _store_dx(dx_ptr, ptrs, mask, dx, x_raw, rowmask)


@triton.jit
def _apply_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, g0_ptr, rowmask_ptr, SHIFTS: tl.constexpr, hats_ptr, sym_ptr,
    hbar_ptr,
    C, E, HEADS, NSHIFT: tl.constexpr, NWIN, ITERS,
    S0, S1, S2, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, NW1, NW2,
    BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    bh, v, vmask, e, emask, mask, ptrs = _voxel_block(C, E, HEADS, S0 * S1 * S2, BLOCK_E, BLOCK_V)
    x_raw, rowmask, x = _load_relu(x_ptr, rowmask_ptr, ptrs, mask, e, emask, ACC)
    dy = tl.load(dy_ptr + ptrs, mask=mask, other=0).to(ACC) / NSHIFT
    dx = tl.zeros((BLOCK_E, BLOCK_V), dtype=ACC)
    for s in range(0, NSHIFT):
        s0, s1, s2 = _load_shift(s, SHIFTS, NSHIFT)
        w, p = _voxel_window(v, s0, s1, s2, S0, S1, S2, P0, P1, P2, NW1, NW2)
        prog = (bh * NSHIFT + s) * NWIN + w  # (BLOCK_V,)
        u = tl.load(hats_ptr + ((prog * ITERS + ITERS - 1) * E)[None, :] + e[:, None], mask=mask,
                    other=0)  # fmt: skip
        hb = tl.load(hbar_ptr + (prog * E)[None, :] + e[:, None], mask=mask, other=0)
        sym = tl.load(
            sym_ptr + (prog * E * E)[None, None, :] + e[:, None, None] * E + e[None, :, None],
            mask=emask[:, None, None] & emask[None, :, None] & vmask[None, None, :],
            other=0,
        )  # (BLOCK_E, BLOCK_E, BLOCK_V): S of each voxel's window
        g = tl.load(g0_ptr + p, mask=vmask, other=0).to(ACC)
        c = tl.sum(u * dy, axis=0)  # (BLOCK_V,): u^T dY_s(v)
        term = u * c[None, :] + tl.sum(sym * x[None, :, :], axis=1) + hb * g[None, :]
        if MU:
            term = tl.where(g[None, :] > 0, term, 0)
        dx += term
    _store_dx(dx_ptr, ptrs, mask, dx, x_raw, rowmask)


@triton.jit
def _apply_bwd_tile_kernel(
    x_ptr, dy_ptr, dx_ptr, g0_ptr, rowmask_ptr, SHIFTS: tl.constexpr, hats_ptr, sym_ptr,
    hbar_ptr,
    C, E, HEADS, NSHIFT: tl.constexpr, NWIN, ITERS,
    S0, S1, S2, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, NW1, NW2,
    H0, H1, H2, NT1, NT2,
    BLOCK_E: tl.constexpr, HB: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    bh, o0, o1, o2, q0, q1, q2, qmask, e, emask, mask, ptrs, x_raw, rowmask, x = _tile_setup(
        x_ptr, rowmask_ptr, C, E, HEADS, S0, S1, S2, H0, H1, H2, NT1, NT2, BLOCK_E, HB, ACC
    )  # x: (BLOCK_E, HB)
    dy = tl.load(dy_ptr + ptrs, mask=mask, other=0).to(ACC) / NSHIFT
    dx = tl.zeros((BLOCK_E, HB), dtype=ACC)
    emask2 = emask[:, None] & emask[None, :]
    for s in range(0, NSHIFT):
        w, p = _tile_window(s, SHIFTS, NSHIFT, o0, o1, o2, q0, q1, q2, S0, S1, S2, P0, P1, P2,
                            NW1, NW2)  # fmt: skip
        prog = (bh * NSHIFT + s) * NWIN + w  # one window for the whole tile
        u = tl.load(hats_ptr + (prog * ITERS + ITERS - 1) * E + e, mask=emask, other=0)
        hb = tl.load(hbar_ptr + prog * E + e, mask=emask, other=0)
        sym = tl.load(sym_ptr + prog * E * E + e[:, None] * E + e[None, :], mask=emask2, other=0)
        g = tl.load(g0_ptr + p, mask=qmask, other=0).to(ACC)
        c = tl.sum(u[:, None] * dy, axis=0)  # (HB,): u^T dY_s(v)
        sx = tl.sum(sym[:, :, None] * x[None, :, :], axis=1)  # (BLOCK_E, HB): S x(v)
        term = u[:, None] * c[None, :] + sx + hb[:, None] * g[None, :]
        if MU:
            term = tl.where(g[None, :] > 0, term, 0)
        dx += term
    _store_dx(dx_ptr, ptrs, mask, dx, x_raw, rowmask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


class _Geometry(WindowSizes):
    """WindowSizes plus the shift table and the launch geometry of the first design."""

    def __init__(self, x: torch.Tensor, head_dim: int, patch, shifts):
        super().__init__(x, head_dim, patch)
        self.pn = math.prod(self.P)
        # one 3D roll per shift, mod S: the kernels' compile-time SHIFTS (no copy to the device)
        self.shifts = rows = shift_rows(shifts, tuple(x.shape[2:]))
        self.nshift = len(rows)
        if INTERPRET:  # the CPU interpreter pays per operation, not per register: big tiles
            self.chunk = triton.next_power_of_2(self.pn)
            self.block_v = 1024
            self.stats_warps = 4
            max_tile = 4096
        elif self.block_e <= 8:  # measured on an H200 (bench/results/tune_window_h200.log)
            self.chunk = min(triton.next_power_of_2(self.pn), 128)
            self.block_v = 128
            self.stats_warps = 1
            max_tile = 64
        else:
            self.chunk = min(triton.next_power_of_2(self.pn), max(16, 4096 // self.block_e**2))
            self.block_v = 32
            self.stats_warps = 4
            max_tile = max(16, 4096 // self.block_e**2)
        # Gram matrices of the stats kernels by tl.dot (E padded to 16) instead of
        # broadcast-and-sum: an option for the tuning sweeps, not the default (not yet timed)
        self.gram_dot = TUNING["gram"] == "dot" and x.dtype != torch.float64
        self.stats_block_e = max(self.block_e, 16) if self.gram_dot else self.block_e
        # one shift (local windows): the stats kernels also write the output (one read of x
        # from memory instead of two); TUNING["fuse"] = False keeps the separate output pass
        self.fused = self.nshift == 1 and TUNING["fuse"]
        self.tile = _tile_shape(self.P, rows)
        self.tiled = math.prod(self.tile) >= _MIN_TILE
        self.h = _program_tile(self.tile, TUNING["tile"] or max_tile)
        self.ntiles = self.nvox // math.prod(self.h)
        self.hb = max(2, triton.next_power_of_2(math.prod(self.h)))
        # about 4 values of the (E, tile) block per thread: small tiles get fewer warps
        self.tile_warps = TUNING["apply_warps"] or max(1, min(4, self.block_e * self.hb // 128))

    def common(self):
        return (
            self.channels, self.E, self.heads, self.nshift, self.nwin,
        )  # fmt: skip

    def spatial_args(self):
        return (*self.S, *self.P, self.NW[1], self.NW[2])

    def tile_args(self):
        return (*self.h, self.S[1] // self.h[1], self.S[2] // self.h[2])


_GEOMETRIES: dict = {}  # :func:`geometry`'s


def geometry(x: torch.Tensor, head_dim: int, patch, shifts) -> _Geometry:
    """``_Geometry(x, head_dim, patch, shifts)``, built once for each shape, dtype, head dim,
    window, shift list, ``TUNING`` and the module values it reads (``INTERPRET``, ``_MIN_TILE``:
    the static suite's counter sets the GPU's under the interpreter; :func:`shared_geometry`)."""
    return shared_geometry(_GEOMETRIES, _Geometry, x, head_dim, patch, shifts, x.dtype,
                           tuple(TUNING.items()), INTERPRET, _MIN_TILE)  # fmt: skip


def _tile_shape(patch, rows) -> tuple[int, ...]:
    """The largest block (per axis: a divisor of P and of every shift mod P) such that each
    aligned block lies inside one window under every shift."""
    return tuple(math.gcd(p, *(r[d] % p for r in rows)) for d, p in enumerate(patch))


def _program_tile(tile, max_voxels: int) -> tuple[int, ...]:
    """A sub-block of ``tile`` (each side a divisor) of at most ``max_voxels`` voxels, shrunk along
    the slowest axes first so that rows stay contiguous in memory."""
    h = list(tile)
    for d in range(3):
        while math.prod(h) > max_voxels and h[d] > 1:
            h[d] = max(k for k in range(1, h[d]) if tile[d] % k == 0)
    return tuple(h)


class WindowNMF(torch.autograd.Function):
    """Rank-one matricized NMF over windows; see the module docstring."""

    @staticmethod
    def forward(ctx, x, g0, rowmask, head_dim, patch, shifts, iters, mu):
        geo = geometry(x, head_dim, patch, shifts)
        y, hats, norms = _forward(x, g0, rowmask, geo, iters, mu, save=ctx.needs_input_grad[0])
        ctx.save_for_backward(x, g0, rowmask, hats, norms)
        ctx.geo, ctx.iters, ctx.mu = geo, iters, mu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g0, rowmask, hats, norms = ctx.saved_tensors
        dx = _backward(x, g0, rowmask, hats, norms, dy.contiguous(), ctx.geo, ctx.iters, ctx.mu)
        return dx, None, None, None, None, None, None, None


def _stats_launch(geo: _Geometry) -> dict:
    """Warps (and with ``TUNING["stats_maxnreg"]`` ptxas's register cap) of the stats kernels."""
    cap = TUNING["stats_maxnreg"]
    return {"num_warps": TUNING["stats_warps"] or geo.stats_warps,
            **({"maxnreg": cap} if cap else {})}  # fmt: skip


def _forward(x, g0, rowmask, geo: _Geometry, iters: int, mu: bool, save: bool, *,
             wrap: bool = False):  # fmt: skip
    """(y, hats, norms); ``wrap``: launches through :func:`launch` (inside the triton_op)."""
    progs = geo.batch * geo.heads * geo.nshift * geo.nwin
    f32 = compute_dtype(x.dtype)
    u = torch.empty(progs, geo.E, dtype=f32, device=x.device)
    hats = torch.empty(progs, iters, geo.E, dtype=f32, device=x.device) if save else u
    norms = torch.empty(progs, iters, dtype=f32, device=x.device) if save else u
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x)
    launch(_stats_fwd_kernel, wrap=wrap)[(geo.nwin * geo.nshift, geo.batch * geo.heads)](
        x, y, g0, rowmask, geo.shifts, u, hats, norms,
        *geo.common(), iters, geo.pn, *geo.spatial_args(),
        BLOCK_E=geo.stats_block_e, CHUNK=TUNING["chunk"] or geo.chunk, MU=mu, SAVE=save,
        ACC=acc, DOT=geo.gram_dot, FUSE=geo.fused, **_stats_launch(geo),
    )  # fmt: skip
    if geo.fused:
        pass  # the stats kernel wrote y
    elif geo.tiled:
        launch(_apply_fwd_tile_kernel, wrap=wrap)[(geo.ntiles, geo.batch * geo.heads)](
            x, y, g0, rowmask, geo.shifts, u,
            *geo.common(), *geo.spatial_args(), *geo.tile_args(),
            BLOCK_E=geo.block_e, HB=geo.hb, MU=mu, ACC=acc, num_warps=geo.tile_warps,
        )  # fmt: skip
    else:
        block_v = TUNING["block_v"] or geo.block_v
        grid = (triton.cdiv(geo.nvox, block_v), geo.batch * geo.heads)
        launch(_apply_fwd_kernel, wrap=wrap)[grid](
            x, y, g0, rowmask, geo.shifts, u,
            *geo.common(), *geo.spatial_args(),
            BLOCK_E=geo.block_e, BLOCK_V=block_v, MU=mu, ACC=acc,
                num_warps=TUNING["apply_warps"] or 4,
        )  # fmt: skip
    if not save:
        hats = norms = None
    return y, hats, norms


def _backward(x, g0, rowmask, hats, norms, dy, geo: _Geometry, iters: int, mu: bool, *,
              wrap: bool = False):  # fmt: skip
    """dx; ``wrap`` as in :func:`_forward`."""
    progs = hats.shape[0]
    sym = torch.empty(progs, geo.E, geo.E, dtype=hats.dtype, device=x.device)
    hbar = torch.empty(progs, geo.E, dtype=hats.dtype, device=x.device)
    acc = acc_dtype(x.dtype)
    dx = torch.empty_like(x)
    launch(_stats_bwd_kernel, wrap=wrap)[(geo.nwin * geo.nshift, geo.batch * geo.heads)](
        x, dy, dx, g0, rowmask, geo.shifts, hats, norms, sym, hbar,
        *geo.common(), iters, geo.pn, *geo.spatial_args(),
        BLOCK_E=geo.stats_block_e, CHUNK=TUNING["chunk"] or geo.chunk, MU=mu, ACC=acc,
        DOT=geo.gram_dot, FUSE=geo.fused, **_stats_launch(geo),
    )  # fmt: skip
    if geo.fused:
        pass  # the stats kernel wrote dx
    elif geo.tiled:
        launch(_apply_bwd_tile_kernel, wrap=wrap)[(geo.ntiles, geo.batch * geo.heads)](
            x, dy, dx, g0, rowmask, geo.shifts, hats, sym, hbar,
            *geo.common(), iters, *geo.spatial_args(), *geo.tile_args(),
            BLOCK_E=geo.block_e, HB=geo.hb, MU=mu, ACC=acc, num_warps=geo.tile_warps,
        )  # fmt: skip
    else:
        block_v = TUNING["block_v"] or geo.block_v
        grid = (triton.cdiv(geo.nvox, block_v), geo.batch * geo.heads)
        launch(_apply_bwd_kernel, wrap=wrap)[grid](
            x, dy, dx, g0, rowmask, geo.shifts, hats, sym, hbar,
            *geo.common(), iters, *geo.spatial_args(),
            BLOCK_E=geo.block_e, BLOCK_V=block_v, MU=mu, ACC=acc,
                num_warps=TUNING["apply_warps"] or 4,
        )  # fmt: skip
    return dx


def window_nmf(x, v0, *, head_dim, patch_size, shifts, u0=None, iters=5, solver="hals"):
    """Rank-one matricized NMF over (shifted) windows with the fused kernels.

    x (B, C, *S) before ReLU, contiguous; v0 (prod(P), 1); patch_size a tuple per spatial dim;
    shifts None or a list of None / tuples. Arguments are assumed validated by
    :func:`fastnmf.matricized_nmf`.
    """
    g0, rowmask, mu = window_inputs(x, v0, u0, head_dim=head_dim, solver=solver)
    return WindowNMF.apply(x, g0, rowmask, head_dim, tuple(patch_size), shifts, iters, mu)
