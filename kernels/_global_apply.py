"""The global path's column blocks and its output passes (kernels/global_nmf.py).

``_apply_fwd_kernel`` writes Y = sum_s u_s (u_s^T x) / n_shifts of a chunk of columns;
``_apply_bwd_kernel`` writes dX = sum_s [u_s (u_s^T dY) / n_shifts + S_s x + h̄_s g0_s], times
ReLU'(x), with each thread holding every row of VEC adjacent columns (up to ``ROWS_IN_THREAD``
rows): u^T dY and S x are sums inside the thread, loaded VEC columns a load (fp32: 16 bytes), no
value crosses threads, no CTA barrier. More rows take ``_apply_bwd_many_rows_kernel`` (rows across
threads). With HALS the shifts' S are summed before the product (one E x E product a column, not
one a shift); MU masks each shift's terms by its g0_s.

sm_90a, 2 x 32 x 128^3, E = 8, 4 warps, 512 columns a program (VEC = 4), 2026-12-06, a chunk of
256 columns against the many-rows kernel's 680 instructions, 21 CTA barriers, 128 registers (16
resident warps an SM): Triton 3.9 fp32 / bf16 72 / 80 registers (28 / 24 warps), 412 / 416
instructions, no barrier, no shuffle, no shared memory; Triton 3.6 75 / 72 registers (24 / 28
warps), 460 / 524 instructions. With VEC = 2 (``global_nmf.TUNING["apply_vec"]``; fp32 loads 8
bytes): 3.9 56 / 62 registers (36 / 32 warps), 472 / 512 instructions; 3.6 46 / 48 (40 / 40),
592 / 664.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import _load_shift, _rolled_index, _row_mask

# the most rows _apply_bwd_kernel holds in a thread (more: _apply_bwd_many_rows_kernel); with
# VEC = 4 its three tiles are then 32 values a thread each
ROWS_IN_THREAD = 8


@triton.jit
def _sub_block(x_ptr, chunk, j, m, e, emask, E, S0, S1, S2, BLOCK_V: tl.constexpr,
               SUB: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Columns j SUB .. (j + 1) SUB of chunk ``chunk`` of matrix m: v, their mask, the
    (BLOCK_E, SUB) mask and element offsets, and that block of x (in ACC)."""
    nvox = S0 * S1 * S2
    v = chunk * BLOCK_V + j * SUB + tl.arange(0, SUB)
    vmask = v < nvox
    ptrs = m.to(tl.int64) * E * nvox + e[:, None] * nvox + v[None, :]
    mask = emask[:, None] & vmask[None, :]
    x_raw = tl.load(x_ptr + ptrs, mask=mask, other=0).to(ACC)
    return v, vmask, mask, ptrs, x_raw


@triton.jit
def _chunk_block(x_ptr, rowmask_ptr, E, S0, S1, S2, BLOCK_E: tl.constexpr,
                 BLOCK_V: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Program (chunk, matrix m) of the S0 * S1 * S2 columns: the chunk, m, the columns v of the
    chunk, the rows e, their masks, the (BLOCK_E, BLOCK_V) mask and element offsets of the
    chunk's block of m, the MU row mask, and that block of x (in ACC)."""
    chunk = tl.program_id(0)
    m = tl.program_id(1)
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    rowmask = _row_mask(rowmask_ptr, e, emask, ACC)
    v, vmask, mask, ptrs, x_raw = _sub_block(x_ptr, chunk, 0, m, e, emask, E, S0, S1, S2,
                                             BLOCK_V, BLOCK_V, ACC)  # fmt: skip
    return chunk, m, v, vmask, e, emask, mask, ptrs, rowmask, x_raw


@triton.jit
def _rolled_g0(g0_ptr, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, s, v, vmask, S0, S1, S2):
    """g0_s(v) = g0[(v + s) mod S]: the start vector of shift s at columns v."""
    s0, s1, s2 = _load_shift(s, SHIFTS, NSHIFT)
    return tl.load(g0_ptr + _rolled_index(v, s0, s1, s2, S0, S1, S2), mask=vmask, other=0)


@triton.jit
def _g0_at(g0_ptr, SHIFTS: tl.constexpr, s: tl.constexpr, v, vmask, S0, S1, S2):
    """g0_s(v) for a compile-time shift s: g0[v] where s is no roll (no division: the columns'
    coordinates are only needed to roll them), else :func:`_rolled_g0`."""
    if SHIFTS[s][0] == 0 and SHIFTS[s][1] == 0 and SHIFTS[s][2] == 0:
        return tl.load(g0_ptr + v, mask=vmask, other=0)
    else:
        return _rolled_g0(g0_ptr, SHIFTS, len(SHIFTS), s, v, vmask, S0, S1, S2)


@triton.jit
def _relu_rows(x_raw, rowmask, RELU: tl.constexpr):
    """ReLU (if RELU) of x, then times the MU row mask."""
    x = x_raw
    if RELU:
        x = tl.maximum(x, 0)
    return x * rowmask[:, None]


@triton.jit
def _apply_fwd_kernel(
    x_ptr, y_ptr, g0_ptr, rowmask_ptr, SHIFTS: tl.constexpr, u_ptr,
    E, NSHIFT: tl.constexpr, S0, S1, S2,
    BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr, RELU: tl.constexpr, MU: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    chunk, m, v, vmask, e, emask, mask, ptrs, rowmask, x_raw = _chunk_block(
        x_ptr, rowmask_ptr, E, S0, S1, S2, BLOCK_E, BLOCK_V, ACC
    )
    x = _relu_rows(x_raw, rowmask, RELU)
    y = tl.zeros((BLOCK_E, BLOCK_V), dtype=ACC)
    for s in range(0, NSHIFT):
        u = tl.load(u_ptr + (m * NSHIFT + s) * E + e, mask=emask, other=0).to(ACC)
        xs = x
        if MU:
            g = _rolled_g0(g0_ptr, SHIFTS, NSHIFT, s, v, vmask, S0, S1, S2)
            xs = tl.where(g[None, :] > 0, x, 0)
        c = tl.sum(u[:, None] * xs, axis=0)  # (BLOCK_V,)
        y += u[:, None] * c[None, :]
    y = y / NSHIFT
    tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_bwd_many_rows_kernel(
    x_ptr, dy_ptr, dx_ptr, g0_ptr, rowmask_ptr, SHIFTS: tl.constexpr, u_ptr, sym_ptr, hbar_ptr,
    E, NSHIFT: tl.constexpr, S0, S1, S2,
    BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr, RELU: tl.constexpr, MU: tl.constexpr,
    ACC: tl.constexpr,
):  # fmt: skip
    """dX of the chunk's columns, the rows spread over threads: for more than ``ROWS_IN_THREAD``
    rows (:func:`_apply_bwd_kernel` takes fewer). sm_90a, E = 8, fp32 (its case until
    2026-12-06): 128 registers (16 resident warps an SM), 680 instructions and 21 CTA barriers
    a chunk of 256 columns; taken SUB columns at a time like the reduction, 32 warps but about
    1,090 instructions."""
    chunk, m, v, vmask, e, emask, mask, ptrs, rowmask, x_raw = _chunk_block(
        x_ptr, rowmask_ptr, E, S0, S1, S2, BLOCK_E, BLOCK_V, ACC
    )
    x = x_raw * rowmask[:, None]
    if RELU:
        x = tl.maximum(x, 0)
    dy = tl.load(dy_ptr + ptrs, mask=mask, other=0).to(ACC) / NSHIFT
    kmask = emask[:, None] & emask[None, :]
    dx = tl.zeros((BLOCK_E, BLOCK_V), dtype=ACC)
    for s in tl.static_range(NSHIFT):
        ms = m * NSHIFT + s
        u = tl.load(u_ptr + ms * E + e, mask=emask, other=0).to(ACC)
        hb = tl.load(hbar_ptr + ms * E + e, mask=emask, other=0).to(ACC)
        sym = tl.load(sym_ptr + ms * E * E + e[:, None] * E + e[None, :], mask=kmask, other=0)
        g = _g0_at(g0_ptr, SHIFTS, s, v, vmask, S0, S1, S2).to(ACC)
        c = tl.sum(u[:, None] * dy, axis=0)  # (BLOCK_V,): u^T dY(v)
        term = u[:, None] * c[None, :] + tl.sum(sym.to(ACC)[:, :, None] * x[None, :, :], axis=1)
        term += hb[:, None] * g[None, :]
        if MU:
            term = tl.where(g[None, :] > 0, term, 0)
        dx += term
    dx = dx * rowmask[:, None]
    if RELU:
        dx = tl.where(x_raw > 0, dx, 0)
    tl.store(dx_ptr + ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row(t, rows, j: tl.constexpr):
    """Row j of the tile t (rows: its row indices), whose rows each thread holds all of: a
    choice of registers (the other rows add -0.0, which folds)."""
    return tl.sum(tl.where(rows[:, None] == j, t, -0.0), axis=0)


@triton.jit
def _entry(vec, tile, rows, j: tl.constexpr):
    """Entry j of the vector vec (one a row of tile), in the layout of a row of tile."""
    return _row(tl.broadcast_to(vec[:, None], tile.shape), rows, j)


@triton.jit
def _matvec_row(a, x, e, E: tl.constexpr):
    """sum_j a[j] x[j, :]: an FMA a row and column, in the thread."""
    acc = _entry(a, x, e, 0) * _row(x, e, 0)
    for j in tl.static_range(1, E):
        acc = tl.fma(_entry(a, x, e, j), _row(x, e, j), acc)
    return acc


@triton.jit
def _sym_row(sym_ptr, ms, c: tl.constexpr, e, emask, E: tl.constexpr, ACC: tl.constexpr):
    """Row c of S of (matrix, shift) ms: its column c, S being symmetric."""
    return tl.load(sym_ptr + (ms * E + c) * E + e, mask=emask, other=0).to(ACC)


@triton.jit
def _shift_terms(acc, uc, hc, tt, gg, srows, s: tl.constexpr):
    """acc + u_s[c] (u_s^T dY) + h̄_s[c] g0_s: row c's terms of shift s."""
    acc = tl.fma(_entry(uc, tt, srows, s), _row(tt, srows, s), acc)
    return tl.fma(_entry(hc, gg, srows, s), _row(gg, srows, s), acc)


@triton.jit
def _apply_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, g0_ptr, rowmask_ptr, SHIFTS: tl.constexpr, u_ptr, sym_ptr, hbar_ptr,
    E: tl.constexpr, NSHIFT: tl.constexpr, S0, S1, S2,
    BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, NSB: tl.constexpr,
    RELU: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """dX of the chunk's BLOCK_V columns (module docstring): u_s^T dY of every shift first (rows
    s of tt; g0_s likewise in gg), so that dY is dead before x is loaded; then dX a row at a
    time, each row stored as it is made."""
    chunk = tl.program_id(0)
    m = tl.program_id(1)
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    nvox = S0 * S1 * S2
    # the loads' width told to the compiler (VEC columns), so that its layout spreads the
    # threads over the columns only: each thread holds all the rows of its columns
    v = chunk * BLOCK_V + tl.max_contiguous(tl.arange(0, BLOCK_V), [VEC])
    vmask = v < nvox
    ptrs = m.to(tl.int64) * E * nvox + e[:, None] * nvox + v[None, :]
    mask = emask[:, None] & vmask[None, :]
    dy = tl.load(dy_ptr + ptrs, mask=mask, other=0).to(ACC)
    srows = tl.arange(0, NSB)
    tt = tl.zeros((NSB, BLOCK_V), dtype=ACC)  # row s: u_s^T dY / n_shifts
    gg = tl.zeros((NSB, BLOCK_V), dtype=ACC)  # row s: g0_s
    for s in tl.static_range(NSHIFT):
        u = tl.load(u_ptr + (m * NSHIFT + s) * E + e, mask=emask, other=0).to(ACC)
        t = tl.sum(u[:, None] * dy, axis=0) / NSHIFT
        g = _g0_at(g0_ptr, SHIFTS, s, v, vmask, S0, S1, S2).to(ACC)
        tt = tl.where(srows[:, None] == s, t[None, :], tt)
        gg = tl.where(srows[:, None] == s, g[None, :], gg)
    x_raw = tl.load(x_ptr + ptrs, mask=mask, other=0).to(ACC)
    x = x_raw * _row_mask(rowmask_ptr, e, emask, ACC)[:, None]
    if RELU:
        x = tl.maximum(x, 0)
    svec = (m * NSHIFT + srows) * E  # row s: where (matrix m, shift s)'s u and h̄ start
    for c in tl.static_range(E):
        uc = tl.load(u_ptr + svec + c, mask=srows < NSHIFT, other=0).to(ACC)
        hc = tl.load(hbar_ptr + svec + c, mask=srows < NSHIFT, other=0).to(ACC)
        if MU:  # each shift's terms masked by its g0_s
            acc = tl.zeros((BLOCK_V,), dtype=ACC)
            for s in tl.static_range(NSHIFT):
                sx = _matvec_row(_sym_row(sym_ptr, m * NSHIFT + s, c, e, emask, E, ACC), x, e, E)
                term = _shift_terms(sx, uc, hc, tt, gg, srows, s)
                acc += tl.where(_row(gg, srows, s) > 0, term, 0)
        else:  # the shifts' S summed first: one product
            srow = _sym_row(sym_ptr, m * NSHIFT, c, e, emask, E, ACC)
            for s in tl.static_range(1, NSHIFT):
                srow += _sym_row(sym_ptr, m * NSHIFT + s, c, e, emask, E, ACC)
            acc = _matvec_row(srow, x, e, E)
            for s in tl.static_range(NSHIFT):
                acc = _shift_terms(acc, uc, hc, tt, gg, srows, s)
        if rowmask_ptr is not None:
            acc = acc * tl.load(rowmask_ptr + c).to(ACC)
        if RELU:  # row c of x is 0 where the row mask drops it: dX is 0 there
            acc = tl.where(_row(x, e, c) > 0, acc, 0)
        tl.store(dx_ptr + m.to(tl.int64) * E * nvox + c * nvox + v,
                 acc.to(dx_ptr.dtype.element_ty), mask=vmask)  # fmt: skip
