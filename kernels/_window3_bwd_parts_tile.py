"""The third design's backward parts pass on a ticket's windows at once (kernels/_window3_bwd.py).

The per-window parts pass (``_parts_bwd_window``) holds one window (E, 8, 8, 8) over 16 warps
with the channel axis across warps: each shift's u^T x and u^T dY is a reduction across warps
through shared memory, and every part's sums cross lanes (``bench/results/static_designs/
instructions.md``: 569 / 1387 warp instructions a window, two thirds of them shuffles, barriers
and the adds of reductions). Here a tile is WT windows (E, WT, BP0, BP1, BP2) laid out as the
forward's ticket tile (kernels/_window3_tile.py): a thread holds all the channels of 2 voxels
along axis 2 (a run inside one sub-box, so in one part of every shift), the warps go to the
windows and coarse bits of the axes (``_tile_axes``). Per shift a thread loads its run's u (the
shifted window's, E / 2 8-byte loads, as the output-pass tile does: kernels/_window3_bwd_tile.py),
u^T x and u^T dY are sums in
the thread, and the part sums of z = dY_s (u^T x) + x (u^T dY_s) come from one product of the
sub-box sums with the 0/1 part matrix (``_tile_parts_store``, shift k's columns stored), into the
same flat part slots the per-window pass writes. HALS only (MU masks x per shift), E even, x in
fp32 / bf16 / fp16 (the product in fp32).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import TRITON_VERSION, acc_dtype
from ._window2_common import _part_member, _part_member_by, _window_origin
from ._window3_bwd_tile import _run_prog, _vec
from ._window3_sched import _BWD_PARTS_TILE, TUNING
from ._window3_tile import (
    _ch_first,
    _join_k,
    _join_k4,
    _tile_axes,
    _tile_parts_store,
    _tile_sums,
    tile_subboxes,
)
from ._window3_tile_store import _rows0_low, _tile_parts_write

__all__ = ["bwd_parts_plan", "bwd_parts_joined"]

# Whether the tile's per-shift products are one product for all the shifts (2 or 4 of them): the
# shifts' sub-box sums side by side along its contraction against the part matrix with each
# sub-box's row repeated a shift (``_part_member_by``), so one operand is staged through shared
# memory and one layout conversion serves every shift's stores, not one of each a shift; the
# terms a column takes from the other shifts' rows are exact zeros. sm_90a, a ticket's backward
# (``sass_loops --ticket``), fp32: Triton 3.6 BraTS 5,140 -> 4,731 instructions, 99 -> 75 CTA
# barriers, [None, 4] 3,425 -> 3,409 and 87 -> 79, no spill (bf16 alike); Triton 3.9 BraTS
# 100 -> 76 barriers but 104 B of spills (bf16 112 B), so on only before 3.7, and only at 16
# warps a program or more (Triton 3.6 at 8 warps, two programs an SM: 736 B of spills with BraTS)
# (``TUNING["bwd_parts_joined"]`` overrides both)
_JOINED = TRITON_VERSION < (3, 7)
_JOINED_WARPS = 16


def bwd_parts_joined(warps: int) -> bool:
    """Whether the backward parts tile of a program of ``warps`` warps takes its shifts as one
    product (``_JOINED``, ``_JOINED_WARPS``)."""
    if TUNING["bwd_parts_joined"] is not None:
        return bool(TUNING["bwd_parts_joined"])
    return _JOINED and warps >= _JOINED_WARPS


@triton.jit
def _parts_bwd_tile(
    x_base, dy_base, first, plane, NPLANE, bh, u_ptr, gpart_ptr, E: tl.constexpr, NWIN, NVOX,
    S1, S2, NW0, NW1, NW2, MW2, W0, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, W: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr,
    BP2: tl.constexpr, BLOCK_E: tl.constexpr, NSB: tl.constexpr, D0: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, ROWS0: tl.constexpr, WT: tl.constexpr,
    EAX: tl.constexpr, JOIN: tl.constexpr,
):  # fmt: skip
    """The backward parts of one ticket's windows as tiles of WT windows (module docstring)."""
    for h in tl.static_range(W // WT):
        _parts_bwd_subtile(x_base, dy_base, first + h * WT, plane, NPLANE, bh, u_ptr, gpart_ptr,
                           E, NWIN, NVOX, S1, S2, NW0, NW1, NW2, MW2, W0, SHIFTS, NSHIFT, WT,
                           P0, P1, P2, BP0, BP1, BP2, BLOCK_E, NSB, D0, D1, D2, ROWS0,
                           EAX, E, JOIN)  # fmt: skip


@triton.jit
def _parts_bwd_subtile(
    x_base, dy_base, first, plane, NPLANE, bh, u_ptr, gpart_ptr, E: tl.constexpr, NWIN, NVOX,
    S1, S2, NW0, NW1, NW2, MW2, W0, SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, W: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, BP0: tl.constexpr, BP1: tl.constexpr,
    BP2: tl.constexpr, BLOCK_E: tl.constexpr, NSB: tl.constexpr, D0: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, ROWS0: tl.constexpr, EAX: tl.constexpr,
    USTRIDE: tl.constexpr, JOIN: tl.constexpr,
):  # fmt: skip
    """Every shift's part sums of dY_s (u^T x) + x (u^T dY_s) of W windows from ``first``. The
    tiles loaded channels first, or fifth where EAX != 0 (kernels/_window3_tile.py says why).
    u of shifted window ``prog`` at u_ptr + prog * USTRIDE (this design's: E; the second's,
    the last saved iterate: T E). With JOIN and 2 or 4 shifts one product for all of them
    (``_JOINED``), else one a shift."""
    V: tl.constexpr = 2  # a run: the voxels a thread holds along axis 2
    c6, j6, q0, q1, r2, g6 = _tile_axes(BLOCK_E, W, BP0, BP1, BP2 // V, V, EAX)  # r2: a run's start
    # a window past the plane's end (masked: nothing loaded, nothing stored) takes the plane's
    # last window's u, so that no load leaves u
    v0, v1, v2 = _window_origin(plane * NPLANE + tl.minimum(first + j6, NPLANE - 1), NW1, NW2,
                                MW2, W0)
    inside = (q0 < P0) & (q1 < P1) & (r2 + g6 < P2)
    voxel = ((v0 * P0 + q0) * S1 + v1 * P1 + q1) * S2 + v2 * P2 + r2 + g6
    offs = c6 * NVOX + voxel
    ok = inside & (first + j6 < NPLANE) & (c6 < E)
    x = _ch_first(tl.maximum(tl.load(x_base + offs, mask=ok, other=0).to(tl.float32), 0), EAX)
    dy = _ch_first(tl.load(dy_base + offs, mask=ok, other=0).to(tl.float32) / NSHIFT, EAX)  # dY_s
    BA0K: tl.constexpr = 1 if ROWS0 else BP0 // D0
    NB: tl.constexpr = 4 if ROWS0 else 8
    NC: tl.constexpr = NB * NSB
    live = (plane >= 0).to(tl.int32)  # built per ticket (kernels/_window3_tile.py says why)
    r = tl.arange(0, BLOCK_E * W)[:, None]
    ea = r // W  # a product row's channel and window
    j = r % W
    slot = (bh * NWIN + plane * NPLANE + first + j) * (NSHIFT * 8)  # the flat slots (no ring)
    row_ok = (first + j < NPLANE) & (ea < E)
    if JOIN and (NSHIFT == 2 or NSHIFT == 4):
        BA0R: tl.constexpr = BP0 // D0 if ROWS0 else 1
        A0L: tl.constexpr = _rows0_low(BA0R, NC)
        a0 = _tile_sums(_shift_z(x, dy, 0, bh, v0, v1, v2, q0, q1, r2, c6, u_ptr, NWIN, NW0, NW1,
                                 NW2, SHIFTS, NSHIFT, P0, P1, P2, E, BLOCK_E, W, BP0, BP1, BP2,
                                 EAX, USTRIDE),
                        BLOCK_E, W, BP0, BP1, BP2, D0, D1, D2, BA0R, A0L)  # fmt: skip
        a1 = _tile_sums(_shift_z(x, dy, 1, bh, v0, v1, v2, q0, q1, r2, c6, u_ptr, NWIN, NW0, NW1,
                                 NW2, SHIFTS, NSHIFT, P0, P1, P2, E, BLOCK_E, W, BP0, BP1, BP2,
                                 EAX, USTRIDE),
                        BLOCK_E, W, BP0, BP1, BP2, D0, D1, D2, BA0R, A0L)  # fmt: skip
        if NSHIFT == 4:
            a2 = _tile_sums(_shift_z(x, dy, 2, bh, v0, v1, v2, q0, q1, r2, c6, u_ptr, NWIN, NW0,
                                     NW1, NW2, SHIFTS, NSHIFT, P0, P1, P2, E, BLOCK_E, W, BP0,
                                     BP1, BP2, EAX, USTRIDE),
                            BLOCK_E, W, BP0, BP1, BP2, D0, D1, D2, BA0R, A0L)  # fmt: skip
            a3 = _tile_sums(_shift_z(x, dy, 3, bh, v0, v1, v2, q0, q1, r2, c6, u_ptr, NWIN, NW0,
                                     NW1, NW2, SHIFTS, NSHIFT, P0, P1, P2, E, BLOCK_E, W, BP0,
                                     BP1, BP2, EAX, USTRIDE),
                            BLOCK_E, W, BP0, BP1, BP2, D0, D1, D2, BA0R, A0L)  # fmt: skip
            k4 = _join_k4(a0, a1, a2, a3)
        else:
            k4 = _join_k(a0, a1)
        member = _part_member_by(SHIFTS, NSHIFT, P0, P1, P2, BA0K, BP1 // D1, BP2 // D2, D0, D1,
                                 D2, NC, NB, tl.float32, live != 0, NSHIFT)  # fmt: skip
        _tile_parts_write(tl.dot(k4, member, input_precision="ieee"), gpart_ptr, E, ea, row_ok,
                          slot, j, -1, SHIFTS, NSHIFT, P0, BLOCK_E, W, BP0, D0, ROWS0, NC, False,
                          1)  # fmt: skip
    else:
        member = _part_member(SHIFTS, NSHIFT, P0, P1, P2, BA0K, BP1 // D1, BP2 // D2, D0, D1, D2,
                              NC, NB, tl.float32, live != 0)  # fmt: skip
        for k in tl.static_range(NSHIFT):
            z = _shift_z(x, dy, k, bh, v0, v1, v2, q0, q1, r2, c6, u_ptr, NWIN, NW0, NW1, NW2,
                         SHIFTS, NSHIFT, P0, P1, P2, E, BLOCK_E, W, BP0, BP1, BP2, EAX, USTRIDE)
            _tile_parts_store(z, member, gpart_ptr, E, ea, row_ok, slot, j, k, SHIFTS, NSHIFT,
                              P0, BLOCK_E, W, BP0, BP1, BP2, D0, D1, D2, ROWS0, NC,
                              False)  # fmt: skip


@triton.jit
def _shift_z(x, dy, k: tl.constexpr, bh, v0, v1, v2, q0, q1, r2, c6, u_ptr, NWIN, NW0, NW1, NW2,
             SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr,
             P2: tl.constexpr, E: tl.constexpr, BLOCK_E: tl.constexpr, W: tl.constexpr,
             BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr, EAX: tl.constexpr,
             USTRIDE: tl.constexpr):  # fmt: skip
    """dY_s (u^T x) + x (u^T dY_s) under shift k, (BLOCK_E, W, BP0, BP1, BP2): u of the shifted
    window each run lies in, its sums in the thread."""
    prog = _run_prog(bh, v0, v1, v2, q0, q1, r2, NWIN, NW0, NW1, NW2, k, SHIFTS, NSHIFT, P0, P1,
                     P2)  # fmt: skip
    uk = _ch_first(_vec(u_ptr + prog * USTRIDE, c6, E, False), EAX)  # the forward's u
    cx = tl.sum(uk * x, axis=0)[None]  # u^T x, in the thread
    cdy = tl.sum(uk * dy, axis=0)[None]
    return tl.reshape(dy * cx + x * cdy, (BLOCK_E, W, BP0, BP1, BP2))

def bwd_parts_plan(geo, mu: bool, dtype: torch.dtype, wpp: int, warps: int) -> dict:
    """The constexprs of the ticket-tile backward parts pass: PTILE (whether it runs:
    ``TUNING["bwd_parts_tile"]`` and :func:`bwd_parts_geometry`'s conditions), the sub-box
    PD0-PD2, PROWS0, PWT, the windows of a tile, and PJOIN (:func:`bwd_parts_joined`)."""
    fits, plan = bwd_parts_geometry(geo, mu, dtype, wpp, warps)
    on = _BWD_PARTS_TILE if TUNING["bwd_parts_tile"] is None else bool(TUNING["bwd_parts_tile"])
    return dict(PTILE=on and fits, **plan)


def bwd_parts_geometry(geo, mu: bool, dtype: torch.dtype, wpp: int,
                       warps: int) -> tuple[bool, dict]:  # fmt: skip
    """(fits, dict(PD0, PD1, PD2, PROWS0, PWT, PJOIN)) of this tile (this design's and the second's,
    kernels/_window2_bwd.py). fits: HALS, E even, not float64, the forward tile's product form
    (``tile_subboxes``), sub-boxes at least 2 voxels wide along axis 2 (a run in one part), a
    power-of-two WPP, a run a thread and the product at least 16 rows."""
    dot = geo.dot(acc_dtype(dtype), mu)
    sub, rows0, k = tile_subboxes(geo, dot)
    threads = 32 * warps
    wt = min(wpp, max(1, threads * 2 // math.prod(geo.bp)))  # windows a tile: a run a thread
    runs = wt * math.prod(geo.bp) // 2
    rows = geo.block_e * wt * (geo.bp[0] // sub[0] if rows0 else 1)
    fits = (dot["DOT"] and not mu and geo.E % 2 == 0 and dtype != torch.float64
            and geo.sub[2] % 2 == 0 and sub[2] % 2 == 0 and wpp & (wpp - 1) == 0
            and runs == threads and rows >= 16 and 16 <= k <= 32)  # fmt: skip
    return fits, dict(PD0=sub[0], PD1=sub[1], PD2=sub[2], PROWS0=rows0, PWT=wt,
                      PJOIN=bwd_parts_joined(warps))  # fmt: skip
