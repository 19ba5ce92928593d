"""The power steps of the third window design in two forms (kernels/window_nmf3.py's solve and
kernels/_window3_bwd.py's, which recomputes the forward's iterates): every vector held as rows
(NB, 1, E) and as columns (NB, E, 1), each form from the other by a product with the symmetric K,
so that no vector changes layout; with K loaded as rows of E^2 (``_load_square_batch``), a matrix
lies in one warp and no sum crosses warps. The forward and the backward run these same
operations on the same rows (``Pipeline.solve_shifts``), so that the backward recomputes the
forward's iterates (bit for bit under the interpreter; compiled, where both kernels contract
their products alike).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._window3_slots import _load_square_batch


@triton.jit
def _normed(v, AX: tl.constexpr):
    """v / ||v|| and ||v|| for vectors v as rows (NB, 1, E; AX = 2) or columns (NB, E, 1;
    AX = 1): the norm sums along v's own axis, (NB, 1, 1) in v's layout."""
    norm = tl.expand_dims(tl.sqrt(tl.sum(v * v, axis=AX)), AX)
    return tl.where(norm > 0, v / tl.where(norm > 0, norm, 1), 0), norm


@triton.jit
def _kdot(k_mat, v, AX: tl.constexpr):
    """K v (K symmetric) for v as rows (AX = 2), as columns, or for v as columns (AX = 1), as
    rows: the product sums along v's axis, and the other axis is left."""
    return tl.expand_dims(tl.sum(k_mat * v, axis=AX), AX)


@triton.jit
def _next_both(k_mat, row, col):
    """â_s = K â_{s-1} / ||K â_{s-1}|| as rows and as columns, and each form's norm: each form
    from the other's (:func:`_kdot`), so that no vector changes layout."""
    new_row, nr = _normed(_kdot(k_mat, col, 1), 2)
    new_col, nc = _normed(_kdot(k_mat, row, 2), 1)
    return new_row, new_col, nr, nc


@triton.jit
def _iterate_both_to(k_mat, h_row, h_col, t):
    """The forward's power iterates recomputed from K and h: â_{t-1} as rows and columns (zeros
    at t = 0), â_t as rows and columns, and their norms (:func:`_next_both`)."""
    row, nr = _normed(h_row, 2)
    col, nc = _normed(h_col, 1)
    prev_row = tl.zeros_like(row)
    prev_col = tl.zeros_like(col)
    for _s in range(0, t):
        prev_row, prev_col = row, col
        row, col, nr, nc = _next_both(k_mat, row, col)
    return prev_row, prev_col, row, col, nr, nc


@triton.jit
def _load_both(ptr, slot, ok, E: tl.constexpr, BLOCK_E: tl.constexpr):
    """The E-vectors at ptr + slot * E for the rows ok, as rows (NB, 1, BLOCK_E) and as columns
    (NB, BLOCK_E, 1); past L1 (the forward's solve loads what its program has just stored)."""
    e = tl.arange(0, BLOCK_E)
    at = ptr + slot[:, None, None] * E
    ok3 = ok[:, None, None]
    row = tl.load(at + e[None, None, :], mask=ok3 & (e[None, None, :] < E), other=0,
                  cache_modifier=".cg")  # fmt: skip
    col = tl.load(at + e[None, :, None], mask=ok3 & (e[None, :, None] < E), other=0,
                  cache_modifier=".cg")  # fmt: skip
    return row, col


@triton.jit
def _power_u(kmat_ptr, hsave_ptr, slot, ok, ITERS, E: tl.constexpr, BLOCK_E: tl.constexpr):
    """u = â_T (rows, (NB, 1, BLOCK_E)) of the power steps â_1 = h / ||h||, â_t = K â_{t-1} /
    ||K â_{t-1}|| for the rows ok, K and h loaded from their slots: the backward's recomputation
    (:func:`_iterate_both_to`)."""
    k_mat = _load_square_batch(kmat_ptr, slot, ok, E, BLOCK_E)
    h_row, h_col = _load_both(hsave_ptr, slot, ok, E, BLOCK_E)
    _, _, row, _, _, _ = _iterate_both_to(k_mat, h_row, h_col, ITERS - 1)
    return row
