"""The third design's backward output pass on a ticket's windows at once (kernels/_window3_bwd.py).

The per-window output pass (``_apply_bwd_window``) holds one window (E, 8, 8, 8) over 16 warps with
the channel axis across warps: every u^T dY and every column of S x is a reduction across warps,
and each shift's u, h-bar and S columns are spread to the sub-boxes through shared memory
(``bench/results/static_designs/instructions.md``: 995-2846 warp instructions a window). Here a
tile is WT windows of the ticket as (channel, run, voxel): a run is R2 voxels along axis 2 that
lie in one sub-box, so in one part (one shifted window) of every shift, and each thread holds one
run with all its channels. Then per shift a thread loads its run's u and h-bar (E / 2 8-byte
loads each) and S x is the symmetric S summed over the shifts, E (E + 1) / 2 entries loaded in
8-byte pairs: every channel sum and every channel's product is in the thread, nothing crosses
lanes or warps. The cost is in the bytes the lanes ask: a warp's 32 runs lie in a few parts, whose
vectors each lane loads itself (a warp's lanes that share an address make one request; S and
h-bar, written by the same launch's solves, come from L2 past L1, u from L1), so the backward's
bytes asked are 4-12x the ideal where the per-window pass asks 2x (its sectors and DRAM estimate
barely change).

With ``TUNING["bwd_run_pairs"]`` (off: 24 B of spills, sm_90a, Triton 3.6, fp32 BraTS shifts)
a thread holds the runs at q1 and q1 + 1 of one sub-box (R1 = 2, ``run_tile_geometry``), whose
u, h-bar and S are the same: loaded and summed once for both, half the lanes' bytes a voxel.

dX = sum_s [u (u^T dY_s) + h-bar g0_s + S_s x] times ReLU'(x), dY_s = dY / n_shifts (HALS: the
shifts' S are summed before the product; kernels/_window2_bwd.py derives it).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import TRITON_VERSION
from ._window2_common import _window_origin, _wrap_add
from ._window3_sched import _BWD_TILE, TUNING, run_pairs

__all__ = ["bwd_tile_plan", "run_tile_geometry"]

# Where the tile's channel axis goes so that Triton's load layouts keep a voxel's channels in one
# thread: the layout orders the axes by the addresses' contiguity (the run's voxels first) and
# breaks ties by axis position, last first in Triton 3.9 (channels first: their axis is the last
# to get lanes), first first in 3.6 (channels second, after the runs). Either way the results are
# the same; the other order puts the channels across lanes (sm_90a, Triton 3.6, the first order:
# shuffles for every channel sum, 2 KB of spills)
_E_AXIS = 0 if TRITON_VERSION >= (3, 7) else 1


@triton.jit
def _run_prog(bh, w0, w1, w2, q0, q1, r2, NWIN, NW0, NW1, NW2, k: tl.constexpr,
              SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr,
              P2: tl.constexpr):  # fmt: skip
    """The shifted window (its flat program index under shift k) that each run lies in."""
    o0 = _wrap_add(w0, (q0 >= P0 - SHIFTS[k][0]).to(tl.int32), SHIFTS[k][3], NW0)
    o1 = _wrap_add(w1, (q1 >= P1 - SHIFTS[k][1]).to(tl.int32), SHIFTS[k][4], NW1)
    o2 = _wrap_add(w2, (r2 >= P2 - SHIFTS[k][2]).to(tl.int32), SHIFTS[k][5], NW2)
    return (bh * NSHIFT + k) * NWIN + (o0 * NW1 + o1) * NW2 + o2


@triton.jit
def _load_last(ptr, mask, LAST: tl.constexpr):
    """tl.load(ptr, mask, other=0) of what the launch reads for the last time: evict-first with
    LAST (``_window3_sched.last_use``: 2 ``.cs``, 1 an L2 evict_first policy), else plain."""
    if LAST == 2:
        return tl.load(ptr, mask=mask, other=0, cache_modifier=".cs")
    elif LAST == 1:
        return tl.load(ptr, mask=mask, other=0, eviction_policy="evict_first")
    else:
        return tl.load(ptr, mask=mask, other=0)


@triton.jit
def _store_last(ptr, value, mask, LAST: tl.constexpr):
    """tl.store of what the launch does not read again: ``.cs`` (evict-first) with LAST."""
    if LAST:
        tl.store(ptr, value, mask=mask, cache_modifier=".cs")
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _pair(ptr, CG: tl.constexpr):
    """Two fp32 at ptr (8-byte aligned) from one 8-byte load (the halves of an int64); with CG
    past L1 (``.cg``: what other programs of the same launch wrote)."""
    if CG:
        v = tl.load(ptr.to(tl.pointer_type(tl.int64)), cache_modifier=".cg")
    else:
        v = tl.load(ptr.to(tl.pointer_type(tl.int64)))
    lo = v.to(tl.int32).to(tl.float32, bitcast=True)
    hi = (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _vec(ptr, c3, E: tl.constexpr, CG: tl.constexpr):
    """The E-vector at ptr (one per run, 8-byte aligned) as the tile's channel axis: E / 2
    8-byte loads, each half put in its channel's registers (selects on a known channel fold)."""
    v = tl.zeros(c3.shape, dtype=tl.float32) + tl.zeros(ptr.shape, dtype=tl.float32)
    for i in tl.static_range(E // 2):
        lo, hi = _pair(ptr + 2 * i, CG)
        v = tl.where(c3 == 2 * i, lo, tl.where(c3 == 2 * i + 1, hi, v))
    return v


@triton.jit
def _chan(t, c3, c: tl.constexpr, EAX: tl.constexpr):
    """Channel c of the tile t (its registers: the others add -0.0, which folds)."""
    return tl.expand_dims(tl.sum(tl.where(c3 == c, t, -0.0), axis=EAX), EAX)


@triton.jit
def _axes(n, R2: tl.constexpr, BLOCK_E: tl.constexpr, EAX: tl.constexpr):
    """The run n (N,) and the channels (BLOCK_E,) as two axes of a 3-d tile whose last axis is a
    run's voxels (R2): (channel, run, voxel) or, EAX = 1, (run, channel, voxel)."""
    c = tl.arange(0, BLOCK_E)
    g3 = tl.arange(0, R2)[None, None, :]
    if EAX == 0:
        return n[None, :, None], c[:, None, None], g3
    else:
        return n[:, None, None], c[None, :, None], g3


@triton.jit
def _run_tile(first, plane, NPLANE, E: tl.constexpr, NVOX, S1, S2, NW1, NW2, MW2, W0,
              W: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
              BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr, BLOCK_E: tl.constexpr,
              R1: tl.constexpr, R2: tl.constexpr, EAX: tl.constexpr):  # fmt: skip
    """The run tile of W windows from ``first`` (this module's and the forward output tile's,
    kernels/_window3_out_tile.py): the runs n (window, q0, q1 / R1, run along axis 2), channels
    c3 and a run's voxels g3 (:func:`_axes`); each run's q0, q1, first voxel r2 along axis 2 and
    its window's grid origin (v0, v1, v2); which elements lie in the window (inside) and exist
    (ok); their offsets from the head's first element. With R1 = 2 a thread holds the runs at q1
    and q1 + 1 (the same sub-box: offsets + S2, same masks) as two tiles of this layout."""
    NR: tl.constexpr = BP2 // R2
    NQ1: tl.constexpr = BP1 // R1
    n, c3, g3 = _axes(tl.arange(0, W * BP0 * NQ1 * NR), R2, BLOCK_E, EAX)
    r2 = (n % NR) * R2  # a run's first voxel along axis 2
    q1 = (n // NR) % NQ1 * R1
    q0 = (n // (NR * NQ1)) % BP0
    jj = n // (NR * NQ1 * BP0)
    # a window past the plane's end (masked: nothing loaded from x or dy, nothing stored) takes
    # the plane's last window's vectors, so that no load leaves u, S and h-bar
    v0, v1, v2 = _window_origin(plane * NPLANE + tl.minimum(first + jj, NPLANE - 1), NW1, NW2,
                                MW2, W0)
    inside = (q0 < P0) & (q1 < P1) & (r2 < P2) & (g3 >= 0)  # R2 divides P2, R1 divides P1
    voxel = ((v0 * P0 + q0) * S1 + v1 * P1 + q1) * S2 + v2 * P2 + r2
    voxel = tl.multiple_of(voxel, [R2] * 3) + g3
    ok = inside & (first + jj < NPLANE) & (c3 < E)
    return n, c3, g3, q0, q1, r2, v0, v1, v2, inside, ok, c3 * NVOX + voxel


@triton.jit
def _apply_tile(
    x_base, dy_base, dx_base, g0_ptr, first, plane, NPLANE, bh, u_ptr, sym_ptr, hbar_ptr,
    E: tl.constexpr, NWIN, NVOX, S1, S2, NW0, NW1, NW2, MW2, W0, SHIFTS: tl.constexpr,
    NSHIFT: tl.constexpr, W: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr, BLOCK_E: tl.constexpr,
    R1: tl.constexpr, R2: tl.constexpr, WT: tl.constexpr, EAX: tl.constexpr, LAST: tl.constexpr,
):  # fmt: skip
    """dX of one ticket's windows as tiles of WT windows (module docstring); LAST: x and dy
    loaded and dx stored evict-first (``_window3_sched.last_use``)."""
    for h in tl.static_range(W // WT):
        _apply_subtile(x_base, dy_base, dx_base, g0_ptr, first + h * WT, plane, NPLANE, bh,
                       u_ptr, sym_ptr, hbar_ptr, E, NWIN, NVOX, S1, S2, NW0, NW1, NW2, MW2, W0,
                       SHIFTS, NSHIFT, WT, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, R1, R2, EAX,
                       E, LAST)  # fmt: skip


@triton.jit
def _dy_terms(dx, dy, uk, hb, g, EAX: tl.constexpr):
    """dx plus one shift's u (u^T dY_s) + h-bar g0_s on a run tile."""
    dx += uk * tl.expand_dims(tl.sum(uk * dy, axis=EAX), EAX)
    return dx + hb * g


@triton.jit
def _sym_terms(dx, x, lo, hi, c3, c: tl.constexpr, i: tl.constexpr, EAX: tl.constexpr):
    """dx plus the terms of S x from the entries (c, 2 i) = lo and (c, 2 i + 1) = hi of the
    symmetric S (each off-diagonal entry for both of its channels)."""
    if 2 * i == c:
        dx += tl.where(c3 == c, lo * _chan(x, c3, c, EAX), -0.0)
    if 2 * i > c:
        dx += tl.where(c3 == c, lo * _chan(x, c3, 2 * i, EAX), -0.0)
        dx += tl.where(c3 == 2 * i, lo * _chan(x, c3, c, EAX), -0.0)
    if 2 * i + 1 == c:
        dx += tl.where(c3 == c, hi * _chan(x, c3, c, EAX), -0.0)
    else:
        dx += tl.where(c3 == c, hi * _chan(x, c3, 2 * i + 1, EAX), -0.0)
        dx += tl.where(c3 == 2 * i + 1, hi * _chan(x, c3, c, EAX), -0.0)
    return dx


@triton.jit
def _apply_subtile(
    x_base, dy_base, dx_base, g0_ptr, first, plane, NPLANE, bh, u_ptr, sym_ptr, hbar_ptr,
    E: tl.constexpr, NWIN, NVOX, S1, S2, NW0, NW1, NW2, MW2, W0, SHIFTS: tl.constexpr,
    NSHIFT: tl.constexpr, W: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr, BLOCK_E: tl.constexpr,
    R1: tl.constexpr, R2: tl.constexpr, EAX: tl.constexpr, USTRIDE: tl.constexpr,
    LAST: tl.constexpr = 0,
):  # fmt: skip
    """dX of W windows from ``first`` as one tile: its runs (window, q0, q1, run along axis 2)
    on one axis, the channels on another, a run's R2 voxels on the last; with R1 = 2 the runs
    at q1 + 1 as a second tile (suffix b) that takes the same loaded u, h-bar and S. u of
    shifted window ``prog`` at u_ptr + prog * USTRIDE (the third design's u: E; the second's,
    the last saved iterate: T E). LAST: the loads of x and dy (their last in the launch) and
    the stores of dx evict-first (``_load_last``; 0: not)."""
    n, c3, g3, q0, q1, r2, v0, v1, v2, inside, ok, offs = _run_tile(
        first, plane, NPLANE, E, NVOX, S1, S2, NW1, NW2, MW2, W0, W, P0, P1, P2, BP0, BP1, BP2,
        BLOCK_E, R1, R2, EAX)  # fmt: skip
    dy = _load_last(dy_base + offs, ok, LAST).to(tl.float32) / NSHIFT
    dx = tl.zeros(offs.shape, dtype=tl.float32)
    if R1 == 2:
        dyb = _load_last(dy_base + offs + S2, ok, LAST).to(tl.float32) / NSHIFT
        dxb = tl.zeros(offs.shape, dtype=tl.float32)
    for k in tl.static_range(NSHIFT):
        prog = _run_prog(bh, v0, v1, v2, q0, q1, r2, NWIN, NW0, NW1, NW2, k, SHIFTS, NSHIFT,
                         P0, P1, P2)  # fmt: skip
        uk = _vec(u_ptr + prog * USTRIDE, c3, E, False)  # the forward's u
        m0 = q0 + SHIFTS[k][0]
        m1 = q1 + SHIFTS[k][1]
        m2 = r2 + SHIFTS[k][2]  # a run never straddles the roll's wrap (sub-box aligned)
        rolled = (tl.where(m0 >= P0, m0 - P0, m0) * P1 + tl.where(m1 >= P1, m1 - P1, m1)) * P2
        rolled += tl.where(m2 >= P2, m2 - P2, m2)
        rolled = tl.multiple_of(rolled, [R2] * 3) + g3
        hb = _vec(hbar_ptr + prog * E, c3, E, True)
        dx = _dy_terms(dx, dy, uk, hb, tl.load(g0_ptr + rolled, mask=inside, other=0)
                       .to(tl.float32), EAX)  # fmt: skip
        if R1 == 2:  # q1 + 1: the next row of the rolled window (same sub-box: no wrap)
            dxb = _dy_terms(dxb, dyb, uk, hb, tl.load(g0_ptr + rolled + P2, mask=inside, other=0)
                            .to(tl.float32), EAX)  # fmt: skip
    x = tl.maximum(_load_last(x_base + offs, ok, LAST).to(tl.float32), 0)
    if R1 == 2:
        xb = tl.maximum(_load_last(x_base + offs + S2, ok, LAST).to(tl.float32), 0)
    for c in tl.static_range(E):  # S x with S symmetric: the entries (c, c2 >= c), in pairs
        for i in tl.static_range(c // 2, E // 2):
            lo = tl.zeros(n.shape, dtype=tl.float32)
            hi = tl.zeros(n.shape, dtype=tl.float32)
            for k in tl.static_range(NSHIFT):
                prog = _run_prog(bh, v0, v1, v2, q0, q1, r2, NWIN, NW0, NW1, NW2, k, SHIFTS,
                                 NSHIFT, P0, P1, P2)  # fmt: skip
                a, b = _pair(sym_ptr + prog * (E * E) + c * E + 2 * i, True)
                lo += a
                hi += b
            dx = _sym_terms(dx, x, lo, hi, c3, c, i, EAX)
            if R1 == 2:
                dxb = _sym_terms(dxb, xb, lo, hi, c3, c, i, EAX)
    dx = tl.where(x > 0, dx, 0)
    _store_last(dx_base + offs, dx.to(dx_base.dtype.element_ty), ok, LAST)
    if R1 == 2:
        dxb = tl.where(xb > 0, dxb, 0)
        _store_last(dx_base + offs + S2, dxb.to(dx_base.dtype.element_ty), ok, LAST)


def run_tile_geometry(geo, mu: bool, dtype: torch.dtype, wpp: int, warps: int,
                      backward: bool) -> tuple:  # fmt: skip
    """(fits, dict(R1, R2, WT, EAX)) of the run tiles (this module's, and the forward's
    output-pass tile: kernels/_window3_out_tile.py). fits: HALS, E even and the statistics in
    fp32 for the 8-byte pair loads, a power-of-two WPP, at most 32 values of a tile a thread and
    at least a run a thread. R2, the run length along axis 2 (the sub-box's, so that a run lies
    in one part of every shift and never straddles a roll's wrap, at most 2: runs of 4 spilled
    with bf16 [None, 4]); R1, the runs a thread along axis 1 (2 where ``run_pairs(backward)``
    (the backward's tile or the forward's) and an even sub-box along axis 1 allow and the tile
    fits so, else 1); WT, the windows of a tile (R1 runs a thread; before R1, one window more a
    thread, two runs of different windows, spilled); EAX (``_E_AXIS``)."""
    r2 = min(geo.sub[2], 2)
    for r1 in (2, 1) if run_pairs(backward) and geo.sub[1] % 2 == 0 else (1,):
        fits, plan = _run_fit(geo, mu, dtype, wpp, warps, r1, r2)
        if fits:
            break
    return fits, plan


def _run_fit(geo, mu: bool, dtype: torch.dtype, wpp: int, warps: int, r1: int, r2: int) -> tuple:
    """:func:`run_tile_geometry` with R1 runs of R2 voxels a thread."""
    threads = 32 * warps
    run = r1 * r2
    wt = min(wpp, max(1, threads * run // math.prod(geo.bp)))  # windows a tile: R1 runs a thread
    values = geo.block_e * wt * math.prod(geo.bp) // threads
    runs = wt * math.prod(geo.bp) // run
    fits = (not mu and geo.E % 2 == 0 and dtype != torch.float64 and wpp & (wpp - 1) == 0
            and values <= 32 and runs >= threads)  # fmt: skip
    return fits, dict(R1=r1, R2=r2, WT=wt, EAX=_E_AXIS)


def bwd_tile_plan(geo, mu: bool, dtype: torch.dtype, wpp: int, warps: int) -> dict:
    """The constexprs of the ticket-tile output pass: BTILE (whether it runs:
    ``TUNING["bwd_tile"]`` and the conditions of :func:`run_tile_geometry`), R1, R2, WT, EAX."""
    on = _BWD_TILE if TUNING["bwd_tile"] is None else bool(TUNING["bwd_tile"])
    fits, geometry = run_tile_geometry(geo, mu, dtype, wpp, warps, True)
    return dict(BTILE=on and fits, **geometry)
