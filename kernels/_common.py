"""Helpers shared by the kernel families (the Liger-Kernel ``ops/utils.py`` habit).

Host side: whether Triton runs its CPU interpreter, the accumulation dtype, the shift table (a
compile-time constant of the kernels), the MU row mask and the input checks of the window
launchers. Device side (``@triton.jit`` functions inlined into the kernels): voxel <-> window
index arithmetic under a roll, and the normalised power steps of the rank-one closed form with
their backward.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from fastnmf._checks import FLOAT_DTYPES
from fastnmf.layout import padded_shift_table


def version_tuple(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0", "2.13.0+cpu" or "3.7.0rc1"."""
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# the installed Triton's (major, minor): its compilers differ (layout order, ptxas heuristics)
TRITON_VERSION = version_tuple(triton.__version__)

# Triton's CPU interpreter (no GPU): it pays per operation, not per register, so the launchers
# pick big tiles there
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype in memory: float64 for float64 input, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_dtype(dtype: torch.dtype):
    """:func:`compute_dtype` as a Triton dtype (the ``ACC`` constexpr of the kernels)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


# The compile options every direct launch passes. FMA contraction on: the kernels were written,
# tested against the float64 oracle, counted (static suite) and timed with it, Triton's default up
# to 3.9; Triton 3.9 warns that 3.10 turns it off by default (--fmad=false: separate multiply and
# add, more instructions, other roundings), so it is asked for, not left to the default.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


class _Direct:
    """``kernel[grid](*args, **kwargs)`` with :data:`COMPILE_OPTIONS` added to the kwargs."""

    __slots__ = ("kernel",)

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        run = self.kernel[grid]
        return lambda *args, **kwargs: run(*args, **COMPILE_OPTIONS, **kwargs)


def launch(kernel, *, wrap: bool):
    """What a launcher indexes with its grid: ``kernel`` itself, with :data:`COMPILE_OPTIONS`, or,
    with ``wrap`` (inside a ``torch.library.triton_op``), ``torch.library.wrap_triton(kernel)``.

    Traced (torch.compile's decomposition of the op on CUDA), the wrapped launch is recorded as a
    ``triton_kernel_wrapper`` node, which Inductor compiles and launches itself: it takes
    ``num_warps`` and the like from the call but no other compile option, so there FMA contraction
    is Triton's default (on up to 3.9; with Triton >= 3.10 set ``TRITON_DEFAULT_FP_FUSION=1``).
    Run eagerly, wrap_triton hands back the kernel itself (the op's eager implementation disables
    wrapping, and under ``TRITON_INTERPRET=1`` an interpreted kernel is returned as is), so the
    launch is the direct one, options included. Outside an op (``wrap=False``) nothing of
    torch.library is touched: the kernels import and launch without it. Every launch in
    ``fastnmf.kernels`` goes through here (tests/test_compile_options.py).
    """
    if wrap:
        from torch.library import wrap_triton

        wrapped = wrap_triton(kernel)
        if wrapped is not kernel:
            return wrapped
    return _Direct(kernel)


def shift_rows(shifts, spatial) -> tuple[tuple[int, int, int], ...]:
    """The shift table of the kernels, a compile-time constant (their ``SHIFTS``): one (s0, s1, s2)
    roll per shift, as 3D (a 2D grid gets a leading axis of size 1) and reduced modulo the size of
    its axis. Python ints, so nothing is copied to the device per call and a graph traced with
    symbolic sizes specialises on them."""
    return tuple(tuple(int(v) for v in r) for r in padded_shift_table(shifts, tuple(spatial)))


def row_mask(u0, mu: bool, dtype: torch.dtype, device) -> torch.Tensor | None:
    """(rows,) 1/0: MU keeps a zero entry of u0 at zero for ever, so its row of X is dropped.
    None for HALS or without u0, where no row is dropped: the kernels take every row
    (:func:`_row_mask`), and a call makes no tensor of ones (a fill launch on a GPU)."""
    if mu and u0 is not None:
        return (u0[:, 0] > 0).to(device=device, dtype=dtype)
    return None


def check_window_inputs(x: torch.Tensor, v0: torch.Tensor, head_dim: int) -> None:
    """What the window launchers need beyond the public API's checks."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the Triton kernels take float16/32/64, bfloat16")
    if not x.is_contiguous():
        raise ValueError(
            "x must be contiguous for the Triton window kernels (channels_last inputs are copied "
            "by fastnmf.kernels.matricized_nmf)"
        )
    if head_dim > 64:
        raise ValueError(f"head_dim={head_dim} is too large for the Triton kernels (max 64)")
    if v0.device != x.device:
        raise ValueError(f"v0 is on {v0.device} but x is on {x.device}")


def window_inputs(x: torch.Tensor, v0: torch.Tensor, u0, *, head_dim: int, solver: str):
    """The window launchers' shared set-up: checks (:func:`check_window_inputs`), then g0 (P,)
    in the compute dtype, the row mask and whether the solver is MU: (g0, rowmask, mu)."""
    check_window_inputs(x, v0, head_dim)
    cdt = compute_dtype(x.dtype)
    g0 = v0[:, 0].detach().to(cdt).contiguous()  # (prod(P), 1) -> (prod(P),)
    mu = solver == "mu"
    return g0, row_mask(u0, mu, cdt, x.device), mu


# ------------------------------------------------------------------------------------------------
# Device functions
# ------------------------------------------------------------------------------------------------


@triton.jit
def _row_mask(rowmask_ptr, e, emask, ACC: tl.constexpr, FOLD: tl.constexpr = True):
    """The row mask of rows e (0/1 in ACC): loaded (0 past E), or, where the launcher passes None
    (:func:`row_mask`: no row dropped), made without a load: with FOLD all ones, so the products
    by it fold away (rows past E hold zeros: their loads are masked), else 1 below E and 0 past.
    Against the 0/1 select, all ones takes 16-48 instructions fewer in the global kernels
    (sm_90a, Triton 3.9) and 72-160 in design 1's stats kernels, but those, at their 168-register
    cap, then spill (sm_90a fp32 backward with the BraTS shifts 12 B, sm_80 bf16 local forward
    8 B): they pass FOLD False."""
    if rowmask_ptr is None:
        if FOLD:
            return tl.full(e.shape, 1.0, ACC)
        else:
            return tl.where(emask, 1.0, 0.0).to(ACC)
    else:
        return tl.load(rowmask_ptr + e, mask=emask, other=0).to(ACC)


@triton.jit
def _shift_of(k, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, AX: tl.constexpr):
    """Entry AX of row k of the compile-time table SHIFTS (elementwise over a tensor or a scalar
    k, a run-time index; 0 past NSHIFT): a select per row, no load."""
    s = k * 0
    for j in tl.static_range(NSHIFT):
        s = tl.where(k == j, SHIFTS[j][AX], s)
    return s


@triton.jit
def _load_shift(s, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr):
    """The roll (s0, s1, s2) of shift s: row s of the :func:`shift_rows` table."""
    s0 = _shift_of(s, SHIFTS, NSHIFT, 0)
    return s0, _shift_of(s, SHIFTS, NSHIFT, 1), _shift_of(s, SHIFTS, NSHIFT, 2)


@triton.jit
def _window_and_shift(w, s, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, NW1, NW2):
    """Grid coordinates (w0, w1, w2) of window w and the roll (s0, s1, s2) of shift s."""
    w2 = w % NW2
    w1 = (w // NW2) % NW1
    w0 = w // (NW1 * NW2)
    s0, s1, s2 = _load_shift(s, SHIFTS, NSHIFT)
    return w0, w1, w2, s0, s1, s2


@triton.jit
def _wrap_below(t, n):
    """t mod n for -n <= t < n: one conditional addition, no division."""
    return tl.where(t < 0, t + n, t)


@triton.jit
def _wrap_above(t, n):
    """t mod n for 0 <= t < 2n: one conditional subtraction, no division."""
    return tl.where(t >= n, t - n, t)


@triton.jit
def _window_coords(p, w0, w1, w2, s0, s1, s2, S0, S1, S2, P0, P1, P2):
    """Flat voxel index of position p of rolled window (w0, w1, w2) under shift (s0, s1, s2).

    The kernels pass P as compile-time constants (the divisions by P are then a shift and a mask
    for a power of two, a multiply-high otherwise) and each roll reduced modulo S, so the roll
    back wraps by one conditional addition (positions p past the window give indices the
    callers mask)."""
    p2 = p % P2
    p1 = (p // P2) % P1
    p0 = p // (P1 * P2)
    v0 = _wrap_below(w0 * P0 + p0 - s0, S0)
    v1 = _wrap_below(w1 * P1 + p1 - s1, S1)
    v2 = _wrap_below(w2 * P2 + p2 - s2, S2)
    return (v0 * S1 + v1) * S2 + v2


@triton.jit
def _voxel_window(v, s0, s1, s2, S0, S1, S2, P0, P1, P2, NW1, NW2):
    """For flat voxel v under shift s (reduced modulo S): (window index, position inside it)."""
    r0, r1, r2 = _rolled_coords(v, s0, s1, s2, S0, S1, S2)
    w = ((r0 // P0) * NW1 + r1 // P1) * NW2 + r2 // P2
    p = ((r0 % P0) * P1 + r1 % P1) * P2 + r2 % P2
    return w, p


@triton.jit
def _rolled_coords(v, s0, s1, s2, S0, S1, S2):
    """Coordinates of voxel (v + s) mod S, s reduced modulo S (the roll wraps by a conditional
    subtraction; the split of v into its coordinates divides by S)."""
    r2 = _wrap_above(v % S2 + s2, S2)
    r1 = _wrap_above((v // S2) % S1 + s1, S1)
    r0 = _wrap_above(v // (S1 * S2) + s0, S0)
    return r0, r1, r2


@triton.jit
def _rolled_index(v, s0, s1, s2, S0, S1, S2):
    """Flat index of voxel (v + s) mod S."""
    r0, r1, r2 = _rolled_coords(v, s0, s1, s2, S0, S1, S2)
    return (r0 * S1 + r1) * S2 + r2


@triton.jit
def _head_block(bh, C, E, HEADS, NVOX, BLOCK_E: tl.constexpr):
    """Offset of head bh's (E, NVOX) block in a (B, C, *S) tensor, its rows e and their mask."""
    offset = ((bh // HEADS) * C + (bh % HEADS) * E).to(tl.int64) * NVOX
    e = tl.arange(0, BLOCK_E)
    return offset, e, e < E


@triton.jit
def _voxel_block(C, E, HEADS, NVOX, BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr):
    """Block program_id(0) of BLOCK_V voxels of head bh = program_id(1): bh, the voxels v, their
    mask, the rows e, their mask, the (BLOCK_E, BLOCK_V) mask and element offsets in the
    (B, C, *S) tensor."""
    bh = tl.program_id(1)
    offset, e, emask = _head_block(bh, C, E, HEADS, NVOX, BLOCK_E)
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = v < NVOX
    mask = emask[:, None] & vmask[None, :]
    return bh, v, vmask, e, emask, mask, offset + e[:, None] * NVOX + v[None, :]


@triton.jit
def _power_steps(k, h, hats_ptr, norms_ptr, e, emask, E, ITERS, SAVE: tl.constexpr):
    """â_1 = h / ||h||, â_t = K â_{t-1} / ||K â_{t-1}|| (0 where the norm is 0); returns â_T.

    With SAVE, stores â_t at hats_ptr + t*E and ||a_t|| at norms_ptr + t (what backward needs).
    """
    norm = tl.sqrt(tl.sum(h * h, axis=0))
    a_hat = tl.where(norm > 0, h / tl.where(norm > 0, norm, 1), 0)
    if SAVE:
        tl.store(hats_ptr + e, a_hat, mask=emask)
        tl.store(norms_ptr, norm)
    for t in range(1, ITERS):
        a = tl.sum(k * a_hat[None, :], axis=1)
        norm = tl.sqrt(tl.sum(a * a, axis=0))
        a_hat = tl.where(norm > 0, a / tl.where(norm > 0, norm, 1), 0)
        if SAVE:
            tl.store(hats_ptr + t * E + e, a_hat, mask=emask)
            tl.store(norms_ptr + t, norm)
    return a_hat


@triton.jit
def _power_steps_backward(k, dp, hats_ptr, norms_ptr, e, emask, E, ITERS, BLOCK_E: tl.constexpr,
                          ACC: tl.constexpr):  # fmt: skip
    """From dP (dL/dP of P = u u^T, u = â_T) back through the power steps: (K̄ + K̄^T, h̄)."""
    u = tl.load(hats_ptr + (ITERS - 1) * E + e, mask=emask, other=0)
    grad = tl.sum(dp * u[None, :], axis=1) + tl.sum(dp * u[:, None], axis=0)  # (dP + dP^T) u
    return _steps_backward(k, grad, hats_ptr, norms_ptr, e, emask, E, ITERS, BLOCK_E, ACC)


@triton.jit
def _steps_backward(k, grad, hats_ptr, norms_ptr, e, emask, E, ITERS, BLOCK_E: tl.constexpr,
                    ACC: tl.constexpr):  # fmt: skip
    """From ū = (dP + dP^T) u back through the power steps: (K̄ + K̄^T, h̄). The loop of
    :func:`_power_steps_backward`; the second window design's backward starts here (its ū is a
    sum over parts)."""
    kbar = tl.zeros((BLOCK_E, BLOCK_E), dtype=ACC)
    hbar = tl.zeros((BLOCK_E,), dtype=ACC)
    for i in range(0, ITERS):
        t = ITERS - 1 - i
        a_hat = tl.load(hats_ptr + t * E + e, mask=emask, other=0)
        norm = tl.load(norms_ptr + t)
        radial = tl.sum(a_hat * grad, axis=0)
        a_bar = tl.where(norm > 0, (grad - a_hat * radial) / tl.where(norm > 0, norm, 1), 0)
        prev = tl.load(hats_ptr + tl.maximum(t - 1, 0) * E + e, mask=emask, other=0)
        kbar += tl.where(t > 0, a_bar[:, None] * prev[None, :], 0.0)  # no K̄ term at t = 0
        hbar = a_bar  # the last pass (t = 0) leaves h̄ = ā_1
        grad = tl.sum(k * a_bar[None, :], axis=1)
    return kbar + tl.trans(kbar), hbar


# geometries kept by :func:`shared_geometry` per cache (then it starts again; a model has a few
# dozen layer shapes)
_GEOMETRIES_KEPT = 256


def shared_geometry(cache: dict, build, x: torch.Tensor, head_dim: int, patch, shifts, *key):
    """``build(x, head_dim, patch, shifts)``, built once in ``cache`` for each shape, head dim,
    window, shift list and ``key`` (what else the geometry reads: the dtype, its TUNING): a
    window call's host time is a few hundred microseconds at small volumes, and building a
    geometry was tens of them (bench/host_overhead.py). The geometries are read-only once
    built. Built afresh where a size is symbolic (traced for torch.compile / export)."""
    shape = tuple(x.shape)
    if not all(type(n) is int for n in shape):
        return build(x, head_dim, patch, shifts)
    shift_key = None if shifts is None else tuple(
        tuple(s) if isinstance(s, (list, tuple)) else s for s in shifts)  # fmt: skip
    full = (shape, head_dim, tuple(patch), shift_key, *key)
    geo = cache.get(full)
    if geo is None:
        if len(cache) >= _GEOMETRIES_KEPT:
            cache.clear()
        geo = cache[full] = build(x, head_dim, patch, shifts)
    return geo


class WindowSizes:
    """Sizes of a (B, C, *S) input as 3D (a 2D input gets a leading spatial dim of 1), its
    windows P and their grid NW: what the window launchers of both designs start from."""

    def __init__(self, x: torch.Tensor, head_dim: int, patch):
        spatial = tuple(x.shape[2:])
        pad = 3 - len(spatial)
        self.batch, self.channels = x.shape[:2]
        self.E = head_dim
        self.heads = self.channels // head_dim
        self.S = (1,) * pad + spatial
        self.P = (1,) * pad + tuple(patch)
        self.NW = tuple(s // p for s, p in zip(self.S, self.P, strict=True))
        self.nwin = math.prod(self.NW)
        self.nvox = math.prod(self.S)
        self.block_e = max(triton.next_power_of_2(head_dim), 2)
