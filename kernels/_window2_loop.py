"""The second design's window loops (kernels/window_nmf2.py, _window2_bwd.py): which windows a
program of a window pass takes, one after another or a tile at a time."""

from __future__ import annotations

import triton
import triton.language as tl

from ._fastdiv import _fdiv


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
