"""The second design's window loops (kernels/window_nmf2.py, _window2_bwd.py): a window pass's
set-up, which windows a program takes, one after another or a tile at a time, and how it loads
one (the helpers they share, and the window geometry, are in _window2_common.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import _row_mask
from ._fastdiv import _fdiv, _fdivmod
from ._window2_common import _window_offsets, _window_origin


@triton.jit
def _tile_w0(first, NWIN, MW12):
    """The axis-0 coordinate of the tile of windows from ``first`` (the third design's tiles that
    this design's passes run: ``TUNING["parts_tile"]`` and kin; a tile's windows share it): that
    of the head's last window where the tile lies past it. The tiles take such windows as the
    head's last, their values masked; with the tile's own coordinate they would read the vectors
    (u, S, h-bar) of shifted windows outside the head, past the end of their buffers. A tile lies
    wholly before or wholly past the last window (``_Geometry2.tiles_fit``; its first a
    multiple of its size)."""
    return _fdiv(tl.minimum(first, NWIN - 1), MW12)


@triton.jit
def _pass_rows(rowmask_ptr, C, E: tl.constexpr, HEADS, MHEADS, NVOX, BLOCK_E: tl.constexpr,
               ACC: tl.constexpr):  # fmt: skip
    """Set-up of a window pass (program axis 1: batch * head): bh, the int64 offset of the head's
    first element, the rows e (BLOCK_E,), their mask and the MU row mask (0/1, ACC). MHEADS: the
    magic number of HEADS."""
    bh = tl.program_id(1)
    batch, head = _fdivmod(bh, HEADS, MHEADS)
    offset = (batch * C + head * E).to(tl.int64) * NVOX
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    rowmask = _row_mask(rowmask_ptr, e, emask, ACC)
    return bh, offset, e, emask, rowmask


@triton.jit
def _window_of(j, NWIN, WPP: tl.constexpr, STAGES: tl.constexpr):
    """(w, whether to run it): unshifted window j of this program's WPP (program axis 0), to run
    if w < NWIN. With STAGES (a pipelined loop, ``TUNING["stages"]``), past the head's last
    window the last window again, always run: its values are computed and stored again, the same
    ones, and the loop has no branch, which Triton's pipelining needs (the constant condition
    folds away)."""
    w = tl.program_id(0) * WPP + j
    if STAGES is not None:
        w = tl.minimum(w, NWIN - 1)
    return w, (w < NWIN) | (STAGES is not None)


@triton.jit
def _next_raw(base, e, emask, j, NWIN, WPP: tl.constexpr, NVOX, S1, S2, NW1, NW2, MW12, MW2,
              P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
              BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr):  # fmt: skip
    """The elements at ``base`` (BLOCK_E, BP0, BP1, BP2; as stored, no ReLU) of the window this
    program's loop takes at step j, 0 where it takes none (j = WPP, or past the head's last
    window): what a loop that prefetches loads a step ahead (``TUNING["prefetch"]``)."""
    w = tl.program_id(0) * WPP + j
    w0, w1, w2 = _window_origin(w, NW1, NW2, MW2, _fdiv(w, MW12))
    offs, mask = _window_offsets(e, emask, w0, w1, w2, NVOX, S1, S2, P0, P1, P2, BP0, BP1, BP2)
    mask = (mask & (j < WPP) & (w < NWIN)) != 0  # (the interpreter holds & with 0-d as int32)
    return tl.load(base + offs, mask=mask, other=0)


@triton.jit
def _relu_rows(raw, rowmask, ACC: tl.constexpr):
    """A window's elements as stored to ACC, after ReLU and the MU row mask (0/1)."""
    return tl.maximum(raw.to(ACC), 0) * rowmask[:, None, None, None]


@triton.jit
def _load_window(x_base, rowmask, e, emask, w, NVOX, S1, S2, NW1, NW2,
                 P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                 BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
                 ACC: tl.constexpr, MW2, W0):  # fmt: skip
    """Unshifted window w of the head at x_base: its grid coordinates (w0, w1, w2), the offsets
    and mask of :func:`_window_offsets`, and x (BLOCK_E, BP0, BP1, BP2) after ReLU and the row
    mask, in ACC (MW2, W0: :func:`_window_origin`)."""
    w0, w1, w2 = _window_origin(w, NW1, NW2, MW2, W0)
    offs, mask = _window_offsets(e, emask, w0, w1, w2, NVOX, S1, S2, P0, P1, P2, BP0, BP1, BP2)
    x = _relu_rows(tl.load(x_base + offs, mask=mask, other=0), rowmask, ACC)
    return w0, w1, w2, offs, mask, x  # x: (BLOCK_E, BP0, BP1, BP2)
