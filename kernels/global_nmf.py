"""Rank-one NMF of whole matrices (global matricization, and plain ``fastnmf.nmf``) in two passes.

Each matrix X (M x N) is one head of a (B, C, *S) volume (M = E rows, N = prod(S) columns) or one
matrix of a (..., M, N) batch. Rank one gives Y = u u^T X, u ∝ (X X^T)^(T-1) X g0
(fastnmf/closed_form.py), so:

1. ``_reduce_kernel`` (one program per (matrix, group of chunks of columns)) reads X once and
   writes the group's partial Gram matrix K and partial h_s = X g0_s for every shift s. A roll by
   s only permutes the columns of a global matrix: K is unchanged and X_s g0 = X g0_s with
   g0_s[v] = g0[(v + s) mod S], so shifts cost no extra pass. ``_iterate_kernel`` (one program
   per matrix and shift) sums the partials in a fixed order (deterministic; no atomics) and runs
   the T - 1 power steps on the tiny E x E matrices in registers: one launch whatever T.
2. ``_apply_fwd_kernel`` reads X again and writes sum_s u_s (u_s^T x(v)) / n_shifts.

Backward: ``_reduce_kernel`` in its backward mode gives partial dP = dY X^T / n_shifts per matrix,
``_iterate_bwd_kernel`` sums them and goes back through the normalised power steps (the chain of
fastnmf.closed_form.backprop_iterates, in registers, one launch) to S_s = K̄_s + K̄_s^T and h̄_s,
and ``_apply_bwd_kernel`` writes
dX(v) = sum_s [u_s (u_s^T dY(v)) / n_shifts + S_s x(v) + h̄_s g0_s(v)], times ReLU'(x) (the
output passes and the column blocks: kernels/_global_apply.py; up to 8 rows each thread holds
all the rows of its columns there, more take ``_apply_bwd_many_rows_kernel``).
Saved for backward: the input, plus O(E^2) per matrix and shift (u among them: the backward
makes no copy of it). Three launches a call each way, nothing else (no PyTorch op).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    _power_steps,
    _power_steps_backward,
    _row_mask,
    acc_dtype,
    compute_dtype,
    launch,
    row_mask,
    shift_rows,
)
from ._global_apply import (
    ROWS_IN_THREAD,
    _apply_bwd_kernel,
    _apply_bwd_many_rows_kernel,
    _apply_fwd_kernel,
    _g0_at,
    _relu_rows,
    _sub_block,
)

__all__ = ["GlobalNMF", "global_nmf", "TUNING"]


@triton.jit
def _halves(t, R: tl.constexpr, SUB: tl.constexpr):
    """The even and odd columns of t (R, 2 SUB): two (R, SUB) tiles, each thread's pair of
    adjacent columns split in its registers (a load 16 bytes wide feeds two steps)."""
    return tl.split(tl.reshape(t, (R, SUB, 2)))


@triton.jit
def _outer(a, b, R: tl.constexpr, SUB: tl.constexpr, PAIR: tl.constexpr):
    """a[:, None, :] * b[None, :, :] of the step's (R, SUB) tiles; PAIR: a and b are (R, 2 SUB),
    their even and odd columns' products summed (R, R, SUB)."""
    if PAIR == 2:
        a0, a1 = _halves(a, R, SUB)
        b0, b1 = _halves(b, R, SUB)
        return a0[:, None, :] * b0[None, :, :] + a1[:, None, :] * b1[None, :, :]
    else:
        return a[:, None, :] * b[None, :, :]


@triton.jit
def _fold(t, R: tl.constexpr, SUB: tl.constexpr, PAIR: tl.constexpr):
    """t (R, SUB), or with PAIR its even plus its odd columns."""
    if PAIR == 2:
        t0, t1 = _halves(t, R, SUB)
        return t0 + t1
    else:
        return t


@triton.jit
def _reduce_kernel(
    x_ptr, dy_ptr, g0_ptr, rowmask_ptr, SHIFTS: tl.constexpr, kp_ptr, hp_ptr,
    E, NSHIFT: tl.constexpr, NK, NCHUNK, NGROUP, S0, S1, S2,
    BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr, SUB: tl.constexpr, NSB: tl.constexpr,
    PAIR: tl.constexpr, RELU: tl.constexpr, MU: tl.constexpr, BACKWARD: tl.constexpr,
    ACC: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Forward: partial K_s = X_s X_s^T and h_s = X g0_s. Backward: partial dP_s = dY X_s^T.
    Program (group, m) takes the chunks group, group + NGROUP, ... of matrix m, each chunk's
    BLOCK_V columns SUB at a time (:func:`_sub_block`), all summed in the program."""
    group = tl.program_id(0)
    m = tl.program_id(1)
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    rowmask = _row_mask(rowmask_ptr, e, emask, ACC)
    srow = tl.arange(0, NSB)  # the shifts, as rows of the accumulators
    # products summed over the steps elementwise, reduced across the columns once at the end.
    # One loop over the group's chunks' steps (a trip: SUB * PAIR columns); with STAGES = 3
    # Triton's pipeliner copies each trip's x (dy) and g0 into shared memory (cp.async) while
    # the trip before is summed, and the products read them from there (_STAGES)
    kacc = tl.zeros((BLOCK_E, BLOCK_E, SUB), dtype=ACC)  # K (or dP) of shift 0: all shifts' HALS
    kmu = tl.zeros((NSB, BLOCK_E, BLOCK_E), dtype=ACC)  # MU: row s > 0, K of shift s
    hacc = tl.zeros((NSB, BLOCK_E, SUB), dtype=ACC)  # row s: h of shift s
    NSTEP: tl.constexpr = BLOCK_V // (SUB * PAIR)  # a chunk's steps (trips of the loop)
    nsteps = tl.cdiv(NCHUNK - group, NGROUP) * NSTEP
    for i in tl.range(0, nsteps, num_stages=STAGES):
        chunk = group + (i // NSTEP) * NGROUP
        j = i % NSTEP
        v, vmask, mask, ptrs, x_raw = _sub_block(x_ptr, chunk, j, m, e, emask, E, S0, S1, S2,
                                                 BLOCK_V, SUB * PAIR, ACC)  # fmt: skip
        x = _relu_rows(x_raw, rowmask, RELU)  # (BLOCK_E, SUB * PAIR)
        if BACKWARD:
            a = tl.load(dy_ptr + ptrs, mask=mask, other=0)
            a = a.to(ACC) / NSHIFT
        else:
            a = x
        for s in tl.static_range(NSHIFT):
            g = _g0_at(g0_ptr, SHIFTS, s, v, vmask, S0, S1, S2).to(ACC)
            xs = x
            if MU:
                xs = tl.where(g[None, :] > 0, x, 0)
            if s == 0:  # one K (or dP) for all shifts, except MU: the column masks differ
                kacc += _outer(a, xs, BLOCK_E, SUB, PAIR)
            elif MU:
                k = tl.sum(_outer(a, xs, BLOCK_E, SUB, PAIR), axis=2)
                kmu += tl.where(srow[:, None, None] == s, k[None, :, :], 0)
            if not BACKWARD:
                hs = _fold(xs * g[None, :], BLOCK_E, SUB, PAIR)
                hacc += tl.where(srow[:, None, None] == s, hs[None, :, :], 0)
    k0 = tl.sum(kacc, axis=2)
    kall = tl.where(srow[:, None, None] == 0, k0[None, :, :], kmu)
    out = (m * NGROUP + group).to(tl.int64)
    kofs = ((out * NK + srow[:, None, None]) * E + e[None, :, None]) * E + e[None, None, :]
    kmask = (srow[:, None, None] < NK) & emask[None, :, None] & emask[None, None, :]
    tl.store(kp_ptr + kofs, kall, mask=kmask)
    if not BACKWARD:
        hofs = (out * NSHIFT + srow[:, None]) * E + e[None, :]
        hmask = (srow[:, None] < NSHIFT) & emask[None, :]
        tl.store(hp_ptr + hofs, tl.sum(hacc, axis=2), mask=hmask)


@triton.jit
def _group_sum(ptr, stride, NGROUP, ofs, mask, BLOCK_G: tl.constexpr, MAT: tl.constexpr,
               STAGES: tl.constexpr):  # fmt: skip
    """The sum over the groups g < NGROUP of the reduction's partials at ptr + g stride + ofs
    (ofs, mask: one group's entries, a vector, or with MAT a matrix), BLOCK_G groups a load, in
    a fixed order."""
    gs = tl.arange(0, BLOCK_G)
    if not MAT:
        gs3 = gs[:, None]
        ofs3 = ofs[None, :]
        mask3 = mask[None, :]
    else:
        gs3 = gs[:, None, None]
        ofs3 = ofs[None, :, :]
        mask3 = mask[None, :, :]
    acc = tl.zeros(ofs.shape, dtype=ptr.dtype.element_ty)  # the partials' (compute) dtype
    for g in tl.range(0, NGROUP, BLOCK_G, num_stages=STAGES):
        part = tl.load(ptr + (g + gs3).to(tl.int64) * stride + ofs3,
                       mask=mask3 & (g + gs3 < NGROUP), other=0)  # fmt: skip
        acc += tl.sum(part, axis=0)
    return acc


@triton.jit
def _iterate_kernel(
    kp_ptr, hp_ptr, k_ptr, hats_ptr, norms_ptr, u_ptr, E: tl.constexpr, NSHIFT, NK, NGROUP, ITERS,
    BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Program (shift s, matrix m): K (m, s mod NK) and h (m, s) summed from the reduction's
    partials (K stored for the backward by the program of each K's first shift), then the
    power steps."""
    s = tl.program_id(0)
    m = tl.program_id(1)
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    kmask = emask[:, None] & emask[None, :]
    mat = e[:, None] * E + e[None, :]
    k = _group_sum(kp_ptr + (m * NGROUP * NK + s % NK) * E * E, NK * E * E, NGROUP, mat, kmask,
                   BLOCK_G, True, STAGES)  # fmt: skip
    if s < NK:  # K for the backward, from the program of its first shift
        tl.store(k_ptr + (m * NK + s) * E * E + mat, k, mask=kmask)
    ms = m * NSHIFT + s
    h = _group_sum(hp_ptr + (m * NGROUP * NSHIFT + s) * E, NSHIFT * E, NGROUP, e, emask, BLOCK_G,
                   False, STAGES)  # fmt: skip
    u = _power_steps(k, h, hats_ptr + ms * ITERS * E, norms_ptr + ms * ITERS, e, emask, E, ITERS,
                     True)  # fmt: skip
    tl.store(u_ptr + ms * E + e, u, mask=emask)


@triton.jit
def _iterate_bwd_kernel(
    k_ptr, dpp_ptr, hats_ptr, norms_ptr, sym_ptr, hbar_ptr, E: tl.constexpr, NSHIFT, NK, NGROUP,
    ITERS,
    BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, ACC: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Program (shift s, matrix m): S = K̄ + K̄^T and h̄ from dP (m, s mod NK), summed from the
    reduction's partials."""
    s = tl.program_id(0)
    m = tl.program_id(1)
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    kmask = emask[:, None] & emask[None, :]
    mat = e[:, None] * E + e[None, :]
    k = tl.load(k_ptr + (m * NK + s % NK) * E * E + mat, mask=kmask, other=0)
    dp = _group_sum(dpp_ptr + (m * NGROUP * NK + s % NK) * E * E, NK * E * E, NGROUP, mat, kmask,
                    BLOCK_G, True, STAGES)  # fmt: skip
    ms = m * NSHIFT + s
    sym, hbar = _power_steps_backward(k, dp, hats_ptr + ms * ITERS * E, norms_ptr + ms * ITERS, e,
                                      emask, E, ITERS, BLOCK_E, ACC)  # fmt: skip
    tl.store(sym_ptr + (ms * E + e[:, None]) * E + e[None, :], sym, mask=kmask)
    tl.store(hbar_ptr + ms * E + e, hbar, mask=emask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


# The reduction's (E, E, SUB) products a step (_Plan.sub): 16 a thread at 4 warps
_STEP_PRODUCTS = 2048
# The reduction loop's stages (``tl.range(num_stages=)``): 3 copies the next trip's columns while
# one is summed (sm_90a, E = 8, fp32 / bf16, forward and backward: 40-48 registers, 36-48
# resident warps, 4-8 KB of shared memory a program); 2 keeps one buffer, so the copy waits for
# the sums (no overlap); 1, plain loads: 64-72 registers
_STAGES = 3
# The reduction's programs: a program takes up to _GROUP_CHUNKS chunks (its sums across the
# columns and stores once for them), but no fewer than _MIN_PROGRAMS programs are made where the
# chunks allow: about 6 waves of the 10 programs an SM of 132 holds at 40 resident warps, so that
# the last wave's idle SMs cost little (at most 1 / 6). 2 x 32 x 128^3 (8 matrices of 8,192
# chunks): 8,192 programs of 8 chunks; 2 x 32 x 64^3: 8,192 of 1; 16^3: 128 of 1
_GROUP_CHUNKS = 8
_MIN_PROGRAMS = 8192
# The partials' entries the iterate kernels load at once (E = 8: 32 groups' K, 16 a thread),
# pipelined like the reduction (_STAGES); E is a compile-time constant there, so that a group's
# E x E block is known contiguous: 16-byte copies (sm_90a, Triton 3.9: 54 -> 15 copies, 840 ->
# 496 instructions, the forward's); 4096 took 24 resident warps (95-128 registers with 3.6)
_SUM_ELEMS = 2048
# The elements a (BLOCK_E, SUB) block needs so that each thread of a 4-warp program loads 4 fp32
_LOAD_ELEMS = 4 * 32 * 4
# The backward output pass's warps a program (kernels/_global_apply.py: 32 * warps * VEC columns)
_APPLY_WARPS = 4
# sub: the reduction's columns a step where set (BLOCK_V: a chunk a step, as before 2026-12-06
# but in the grouped, pipelined loop; bench/time_global.py times it), None: from _STEP_PRODUCTS;
# pair: two steps a load where a step is under _LOAD_ELEMS (_Plan.pair); apply_vec: the adjacent
# columns a thread of the backward's output pass (_global_apply._apply_bwd_kernel) holds, all
# rows of each (fp32: 4, 16-byte loads, 24-28 resident warps; 2: 8 bytes, 32-40 warps);
# apply_rows False: that pass with the rows across threads whatever E (the kernel before
# 2026-12-06, _apply_bwd_many_rows_kernel), for bench/time_global.py to time against
TUNING: dict = {"sub": None, "pair": True, "apply_vec": 4, "apply_rows": True}


class _Plan:
    """Matrix count, rows, the spatial grid the columns live on, shifts and block sizes."""

    def __init__(self, x: torch.Tensor, rows: int, spatial, shifts, mu: bool):
        self.E = rows
        self.S = (1,) * (3 - len(spatial)) + tuple(spatial)
        self.nvox = math.prod(self.S)
        self.matrices = x.numel() // (rows * self.nvox)
        self.shifts = shift_rows(shifts, spatial)  # the kernels' compile-time SHIFTS
        self.nshift = len(self.shifts)
        self.nk = self.nshift if mu else 1
        self.block_e = max(triton.next_power_of_2(rows), 2)
        if INTERPRET:  # the CPU interpreter pays per operation, not per register: big tiles
            self.block_v = 1024
        else:
            self.block_v = max(16, min(256, 4096 // self.block_e**2 * 4))
        # the reduction takes its chunks SUB columns a step (E = 8: 32 of 256; two steps a trip
        # of its loop, pair below), summing the (E, E, SUB) products of the steps elementwise.
        # sm_90a, 2 x 32 x 128^3, a program of 4 warps, fp32 forward / backward, Triton 3.9: 48 /
        # 48 registers (40 resident warps an SM), 133 / 107 warp instructions a trip of 64
        # columns, x copied 16 bytes at a time; a chunk a program in one step (before
        # 2026-12-06) took 102 / 96 registers (16 / 20 warps), 1,464 / 1,296 instructions a
        # chunk; kernels/DESIGNS.md
        sub = TUNING["sub"] or max(16, _STEP_PRODUCTS // self.block_e**2)
        self.sub = self.block_v if INTERPRET else min(self.block_v, sub)
        if self.block_v % self.sub:
            raise ValueError(f"global_nmf.TUNING['sub'] = {sub} does not divide the chunk of "
                             f"{self.block_v} columns")  # fmt: skip
        # the reduction loads two steps' columns at once where a step's block gives a thread
        # fewer than 4 (E = 8: fp32 x 16 bytes a copy, bf16 8, not 8 / 4)
        self.pair = 2 if (TUNING["pair"] and self.block_e * self.sub < _LOAD_ELEMS
                          and self.block_v % (2 * self.sub) == 0) else 1  # fmt: skip
        self.nsb = triton.next_power_of_2(self.nshift)
        self.nchunk = triton.cdiv(self.nvox, self.block_v)
        # the reduction's programs a matrix, each taking every ngroup-th chunk: at most
        # _GROUP_CHUNKS chunks a program, and a chunk a program while that gives fewer than
        # _MIN_PROGRAMS; its partials, summed by the iterate kernels BLOCK_G a load
        self.ngroup = min(self.nchunk, max(triton.cdiv(self.nchunk, _GROUP_CHUNKS),
                                           triton.cdiv(_MIN_PROGRAMS, self.matrices)))  # fmt: skip
        self.block_g = max(1, min(triton.next_power_of_2(self.ngroup),
                                  _SUM_ELEMS // self.block_e**2))  # fmt: skip
        # the backward's output pass: each thread holds every row of apply_vec adjacent columns
        # where there are at most ROWS_IN_THREAD rows (_apply_bwd_kernel), else a chunk of
        # BLOCK_V columns with the rows across threads (_apply_bwd_many_rows_kernel)
        self.rows_in_thread = TUNING["apply_rows"] and self.block_e <= ROWS_IN_THREAD
        vec = TUNING["apply_vec"]
        if vec not in (1, 2, 4, 8):
            raise ValueError(f"global_nmf.TUNING['apply_vec'] = {vec}: 1, 2, 4 or 8 columns")
        self.apply_vec = vec
        self.apply_v = vec * 32 * _APPLY_WARPS if self.rows_in_thread else self.block_v
        self.apply_nchunk = triton.cdiv(self.nvox, self.apply_v)
        self.acc = acc_dtype(x.dtype)
        self.cdt = compute_dtype(x.dtype)


def _reduce(x, dy, g0, rowmask, plan: _Plan, relu: bool, mu: bool):
    """The partial K (or dP), (Bm, ngroup, nk, E, E), and the forward's partial h, (Bm, ngroup,
    nshift, E): one per program (matrix, group of chunks), summed by the iterate kernels."""
    dev = x.device
    kp = torch.empty(
        plan.matrices, plan.ngroup, plan.nk, plan.E, plan.E, dtype=plan.cdt, device=dev
    )
    backward = dy is not None
    hp = kp if backward else torch.empty(
        plan.matrices, plan.ngroup, plan.nshift, plan.E, dtype=plan.cdt, device=dev
    )  # fmt: skip
    launch(_reduce_kernel, wrap=False)[(plan.ngroup, plan.matrices)](
        x, dy if backward else x, g0, rowmask, plan.shifts, kp, hp,
        plan.E, plan.nshift, plan.nk, plan.nchunk, plan.ngroup, *plan.S,
        BLOCK_E=plan.block_e, BLOCK_V=plan.block_v, SUB=plan.sub, NSB=plan.nsb,
        PAIR=plan.pair, RELU=relu, MU=mu, BACKWARD=backward, ACC=plan.acc,
        STAGES=_STAGES,
    )  # fmt: skip
    return kp, (None if backward else hp)


class GlobalNMF(torch.autograd.Function):
    """Rank-one NMF of every (E, prod(S)) matrix; see the module docstring."""

    @staticmethod
    def forward(ctx, x, g0, rowmask, rows, spatial, shifts, iters, relu, mu):
        plan = _Plan(x, rows, spatial, shifts, mu)
        kp, hp = _reduce(x, None, g0, rowmask, plan, relu, mu)
        shape = (plan.matrices, plan.nshift)
        # K, one per shift for MU, else one for all shifts: summed by the iterate kernel
        k = torch.empty(plan.matrices, plan.nk, plan.E, plan.E, dtype=plan.cdt, device=x.device)
        hats = torch.empty(*shape, iters, plan.E, dtype=plan.cdt, device=x.device)
        norms = torch.empty(*shape, iters, dtype=plan.cdt, device=x.device)
        u = torch.empty(*shape, plan.E, dtype=plan.cdt, device=x.device)
        launch(_iterate_kernel, wrap=False)[(plan.nshift, plan.matrices)](
            kp, hp, k, hats, norms, u, plan.E, plan.nshift, plan.nk, plan.ngroup, iters,
            BLOCK_E=plan.block_e, BLOCK_G=plan.block_g, STAGES=_STAGES,
        )  # fmt: skip
        y = torch.empty_like(x)
        launch(_apply_fwd_kernel, wrap=False)[(plan.nchunk, plan.matrices)](
            x, y, g0, rowmask, plan.shifts, u, plan.E, plan.nshift, *plan.S,
            BLOCK_E=plan.block_e, BLOCK_V=plan.block_v, RELU=relu, MU=mu, ACC=plan.acc,
        )  # fmt: skip
        ctx.save_for_backward(x, g0, rowmask, hats, norms, k, u)  # u: the apply's, (Bm, S, E)
        ctx.plan, ctx.relu, ctx.mu = plan, relu, mu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g0, rowmask, hats, norms, k, u = ctx.saved_tensors
        plan, relu, mu = ctx.plan, ctx.relu, ctx.mu
        dy = dy.contiguous()
        dpp, _ = _reduce(x, dy, g0, rowmask, plan, relu, mu)  # (Bm, ngroup, nk, E, E)
        sym = torch.empty(plan.matrices, plan.nshift, plan.E, plan.E, dtype=plan.cdt,
                          device=x.device)  # fmt: skip
        hbar = torch.empty(plan.matrices, plan.nshift, plan.E, dtype=plan.cdt, device=x.device)
        launch(_iterate_bwd_kernel, wrap=False)[(plan.nshift, plan.matrices)](
            k, dpp, hats, norms, sym, hbar, plan.E, plan.nshift, plan.nk, plan.ngroup,
            hats.shape[-2], BLOCK_E=plan.block_e, BLOCK_G=plan.block_g, ACC=plan.acc,
            STAGES=_STAGES,
        )  # fmt: skip
        dx = torch.empty_like(x)
        args = (x, dy, dx, g0, rowmask, plan.shifts, u, sym, hbar, plan.E, plan.nshift, *plan.S)
        flags = dict(BLOCK_E=plan.block_e, BLOCK_V=plan.apply_v, RELU=relu, MU=mu, ACC=plan.acc)
        if plan.rows_in_thread:
            launch(_apply_bwd_kernel, wrap=False)[(plan.apply_nchunk, plan.matrices)](
                *args, VEC=plan.apply_vec, NSB=plan.nsb, num_warps=_APPLY_WARPS, **flags
            )
        else:
            grid = (plan.apply_nchunk, plan.matrices)
            launch(_apply_bwd_many_rows_kernel, wrap=False)[grid](*args, **flags)
        return dx, None, None, None, None, None, None, None, None


def global_nmf(x, v0, *, rows, spatial, shifts=None, u0=None, iters=5, solver="hals", relu=True):
    """Rank-one NMF of every (rows, prod(spatial)) matrix of the contiguous tensor ``x``.

    ``x`` is (B, C, *spatial) with C a multiple of ``rows`` (global matricization, ``relu=True``)
    or (..., rows, N) with ``spatial=(N,)`` (plain NMF, ``relu=False``). Arguments are assumed
    validated by the public API.
    """
    if not x.is_contiguous():
        raise ValueError("x must be contiguous for the Triton global kernels")
    if rows > 64:
        raise ValueError(f"M={rows} rows is too many for the Triton kernels (max 64)")
    cdt = compute_dtype(x.dtype)
    g0 = v0[:, 0].detach().to(cdt).contiguous()
    mu = solver == "mu"
    rowmask = row_mask(u0, mu, cdt, x.device)
    return GlobalNMF.apply(x, g0, rowmask, rows, tuple(spatial), shifts, iters, relu, mu)
