"""The third design's forward output pass on a ticket's windows at once (kernels/window_nmf3.py).

The per-window output pass (``_apply_window``) holds one window (E, 8, 8, 8) over 16 warps with
the channel axis across warps: each shift's u^T x is a reduction across warps and each shift's u
is spread to the sub-boxes through shared memory (``bench/results/static_designs/
instructions.md``: 283 / 514 warp instructions a window, ``[None, 4]`` / ``[None, 2, 4, 6]``).
Here a tile is WT windows of the ticket in the backward output-pass tile's layout
(kernels/_window3_bwd_tile.py): a thread holds one run of R2 voxels along axis 2 (inside one
sub-box, so in one part of every shift) with all its channels, loads its run's u per shift (E / 2
8-byte loads, past L1: the same launch's solves wrote it), and u^T x is a sum in the thread:
nothing crosses lanes or warps. Where the sub-boxes are even along axis 1 (``run_tile_geometry``'s
R1 = 2, ``_window3_sched._RUN_PAIRS``), a thread holds the runs at q1 and q1 + 1 as two tiles of
one layout, both in the same parts: each u loaded once for two runs, tiles of twice the windows.

y = mean_s u_s (u_s^T ReLU(x)) (HALS; MU masks x per shift and takes the per-window pass).

Static figures (sm_90a, 16 warps, 2x32x128^3, E = P = 8; bench/results/static_designs/
tiles.md): 149 / 234 warp instructions a window with Triton 3.9 fp32 ([None, 4] /
[None, 2, 4, 6]; 3.6: 145 / 213), against 283 / 514; the forward's bytes asked 2.08x / 2.70x the
ideal fp32 (1.59x / 1.72x per window: every lane loads its run's u), sectors 1.63x / 1.84x
(1.62x / 1.79x), bf16 sectors 2.27x / 2.68x (3.23x / 3.58x), DRAM estimate unchanged.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._window3_bwd_tile import (
    _load_last,
    _run_prog,
    _run_tile,
    _store_last,
    _vec,
    run_tile_geometry,
)
from ._window3_sched import _OUT_TILE, TUNING

__all__ = ["out_tile_plan"]


@triton.jit
def _apply_fwd_tile(
    x_base, y_base, first, plane, NPLANE, bh, u_ptr, E: tl.constexpr, NWIN, NVOX, S1, S2, NW0,
    NW1, NW2, MW2, W0, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, W: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr,
    BP2: tl.constexpr, BLOCK_E: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, WT: tl.constexpr,
    EAX: tl.constexpr, LAST: tl.constexpr,
):  # fmt: skip
    """y of one ticket's windows as tiles of WT windows (module docstring). With more than two
    shifts each tile is a call (``_apply_fwd_subtile_call``), inlined otherwise: sm_90a, 16
    warps, Triton 3.9, fp32, the fused forward's spills at commit 50a8845 (the solves shift by
    shift): [None, 2, 4, 6] 72 B inlined, 8 B called (0 B with the ticket tile); [None, 4] 0 B
    inlined, 16 B called."""
    for h in tl.static_range(W // WT):
        if NSHIFT > 2:
            _apply_fwd_subtile_call(x_base, y_base, first + h * WT, plane, NPLANE, bh, u_ptr, E,
                                    NWIN, NVOX, S1, S2, NW0, NW1, NW2, MW2, W0, SHIFTS, NSHIFT,
                                    WT, P0, P1, P2, BP0, BP1, BP2, BLOCK_E, R1, R2,
                                    EAX, LAST)  # fmt: skip
        else:
            _apply_fwd_subtile(x_base, y_base, first + h * WT, plane, NPLANE, bh, u_ptr, E,
                               NWIN, NVOX, S1, S2, NW0, NW1, NW2, MW2, W0, SHIFTS, NSHIFT, WT,
                               P0, P1, P2, BP0, BP1, BP2, BLOCK_E, R1, R2, EAX,
                               LAST)  # fmt: skip


@triton.jit(noinline=True)
def _apply_fwd_subtile_call(
    x_base, y_base, first, plane, NPLANE, bh, u_ptr, E: tl.constexpr, NWIN, NVOX, S1, S2, NW0,
    NW1, NW2, MW2, W0, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, W: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr,
    BP2: tl.constexpr, BLOCK_E: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
    EAX: tl.constexpr, LAST: tl.constexpr,
):  # fmt: skip
    """``_apply_fwd_subtile`` as a function of its own (not inlined)."""
    _apply_fwd_subtile(x_base, y_base, first, plane, NPLANE, bh, u_ptr, E, NWIN, NVOX, S1, S2,
                       NW0, NW1, NW2, MW2, W0, SHIFTS, NSHIFT, W, P0, P1, P2, BP0, BP1, BP2,
                       BLOCK_E, R1, R2, EAX, LAST)  # fmt: skip


@triton.jit
def _apply_fwd_subtile(
    x_base, y_base, first, plane, NPLANE, bh, u_ptr, E: tl.constexpr, NWIN, NVOX, S1, S2, NW0,
    NW1, NW2, MW2, W0, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, W: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr,
    BP2: tl.constexpr, BLOCK_E: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
    EAX: tl.constexpr, LAST: tl.constexpr = 0,
):  # fmt: skip
    """y of W windows from ``first`` as one tile: its runs (window, q0, q1, run along axis 2) on
    one axis, the channels on another, a run's R2 voxels on the last; with R1 = 2 the runs at
    q1 + 1 as a second tile (suffix b) that takes the same u. LAST: x (its last read in the
    launch) loaded and y stored evict-first (``_window3_sched.last_use``; 0: not)."""
    _, c3, _, q0, q1, r2, v0, v1, v2, _, ok, offs = _run_tile(
        first, plane, NPLANE, E, NVOX, S1, S2, NW1, NW2, MW2, W0, W, P0, P1, P2, BP0, BP1, BP2,
        BLOCK_E, R1, R2, EAX)  # fmt: skip
    x = tl.maximum(_load_last(x_base + offs, ok, LAST).to(tl.float32), 0)
    y = tl.zeros(offs.shape, dtype=tl.float32)
    if R1 == 2:  # the runs at q1 + 1 (the same sub-box: the same parts)
        xb = tl.maximum(_load_last(x_base + offs + S2, ok, LAST).to(tl.float32), 0)
        yb = tl.zeros(offs.shape, dtype=tl.float32)
    for k in tl.static_range(NSHIFT):
        prog = _run_prog(bh, v0, v1, v2, q0, q1, r2, NWIN, NW0, NW1, NW2, k, SHIFTS, NSHIFT,
                         P0, P1, P2)  # fmt: skip
        uk = _vec(u_ptr + prog * E, c3, E, True)  # this launch's solves wrote u: past L1
        y += uk * tl.expand_dims(tl.sum(uk * x, axis=EAX), EAX)
        if R1 == 2:
            yb += uk * tl.expand_dims(tl.sum(uk * xb, axis=EAX), EAX)
    _store_last(y_base + offs, (y / NSHIFT).to(y_base.dtype.element_ty), ok, LAST)
    if R1 == 2:
        _store_last(y_base + offs + S2, (yb / NSHIFT).to(y_base.dtype.element_ty), ok, LAST)


def out_tile_plan(geo, mu: bool, dtype, wpp: int, warps: int) -> dict:
    """The constexprs of the forward's output-pass tile: OTILE (whether it runs:
    ``TUNING["out_tile"]`` and the conditions of :func:`run_tile_geometry`), and its runs a
    thread R1, run length R2, windows a tile WT and channel axis EAX."""
    on = _OUT_TILE if TUNING["out_tile"] is None else bool(TUNING["out_tile"])
    fits, geometry = run_tile_geometry(geo, mu, dtype, wpp, warps, False)
    return dict(OTILE=on and fits, **geometry)
