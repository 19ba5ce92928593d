"""Division by a run-time divisor without a division: a multiply-high and two shifts.

The window kernels map a flat index (a ticket, a window) to coordinates by dividing by sizes
known only at run time (the window grid, the tickets of a head, the heads). A 32-bit division by
a run-time value compiles to a sequence of about 20 instructions (``I2F.RP``, ``MUFU.RCP``,
``F2I``, multiplies and two corrections; sm_90a), issued by every warp every time: the third
design's fused forward had 21 such sequences, its backward 17 (2x32x128^3, E = P = 8,
[None, 4], fp32, Triton 3.9; ``fastnmf profile --suite static``, ``python -m
fastnmf.profile.static.sass_loops``; bench/results/static_designs/instructions.md).

Here the host computes, once per call, a *magic* multiplier m and shift l for each divisor d
(:func:`magic`) and the kernel takes n // d as ``umulhi(2 n, m) >> l`` (:func:`_fdiv`): a shift,
a multiply-high and a shift. Exact for every 0 <= n < 2^31 (Granlund & Montgomery, "Division by
invariant integers using multiplication", PLDI 1994, theorem 4.2, with N = 31 numerator bits:
l = ceil(log2 d), m = ceil(2^(31 + l) / d), so 2^(31 + l) <= m d < 2^(31 + l) + 2^l and
floor(n / d) = floor(n m / 2^(31 + l)); m < 2^32, and umulhi(2 n, m) = floor(n m / 2^31)).
Negative numerators are not allowed: callers clamp where an index can be negative.

m and l travel as one int64 kernel argument, m << 8 | l (always >= 2^39: m >= 2^31, so Triton
types it int64 for every d; pass it with ``do_not_specialize`` so that no value recompiles).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["magic", "magics", "MAGIC_3"]

_MAX_DIVISOR = 2**31 - 1


def magic(d: int) -> int:
    """The packed (m << 8 | l) of :func:`_fdiv` for divisor d, 1 <= d < 2^31."""
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= _MAX_DIVISOR:
        raise ValueError(f"magic: the divisor must be an int in [1, 2^31 - 1], got {d!r}")
    shift = (d - 1).bit_length()  # ceil(log2 d)
    mult = -(-(1 << (31 + shift)) // d)  # ceil(2^(31 + l) / d) < 2^32
    return (mult << 8) | shift


def magics(**divisors: int) -> dict[str, int]:
    """``{"M" + name: magic(d)}``: the kernels' magic arguments for the named divisors."""
    return {f"M{name}": magic(int(d)) for name, d in divisors.items()}


MAGIC_3 = tl.constexpr(magic(3))  # the stage schedule's triples (kernels/_window3_sched.py)


@triton.jit
def _fdiv(n, MAG):
    """n // d for 0 <= n < 2^31 (int32, scalar or tensor), MAG = :func:`magic` (d)."""
    mult = tl.cast(MAG >> 8, tl.uint32)  # (tl.cast: MAG may be a constexpr)
    shift = tl.cast(MAG & 255, tl.uint32)
    q = tl.umulhi(n.to(tl.uint32, bitcast=True) << 1, mult) >> shift
    return q.to(tl.int32, bitcast=True)


@triton.jit
def _fdivmod(n, d, MAG):
    """(n // d, n % d) for 0 <= n < 2^31, MAG = :func:`magic` (d)."""
    q = _fdiv(n, MAG)
    return q, n - q * d
