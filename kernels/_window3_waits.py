"""The third design's waits and counts (kernels/_window3_sched.py has the schedule they follow):
a stage waits, with acquire loads, until the stages it needs have all their chunks counted, and
each chunk is counted with a release once every thread's stores are done. The kind of wait is
the host's choice (``_window3_sched.wait_mode``: TWAIT)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import INTERPRET
from ._window2_common import _wrap_add, _wrap_sub

_INTERPRET = tl.constexpr(INTERPRET)  # kernels/_common.py: Triton's CPU interpreter


@triton.jit
def _acquire_each(ptr):
    """The int32 at ptr, read by each thread with an acquire load of its own at GPU scope (what
    the programs counted there wrote before their release is visible to this thread after it):
    no thread waits for another, nothing goes through shared memory."""
    return tl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [ptr],
                                     dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _wait_for(flag_ptr, need, TWAIT: tl.constexpr):
    """Spin until the count at flag_ptr reaches need (acquire: what the counted programs wrote
    before their release is visible after): with TWAIT each thread reads the count itself
    (:func:`_acquire_each`), else one thread's atomic read shared with the others. Under the
    interpreter the programs run one after another, so a wait that finds its count short would
    spin forever: a schedule error, raised."""
    if TWAIT == 1 and not _INTERPRET:
        n = _acquire_each(flag_ptr)
        while n < need:
            n = _acquire_each(flag_ptr)
    else:
        n = tl.atomic_add(flag_ptr, 0, sem="acquire")
        _check_count(n, need)
        while n < need:
            n = tl.atomic_add(flag_ptr, 0, sem="acquire")


@triton.jit
def _check_count(n, need):
    """Under the interpreter a count short of ``need`` is a schedule error (below)."""
    if _INTERPRET:
        assert n >= need, "window kernels: a stage waits for one that has not run (schedule error)"


@triton.jit
def _wait_stage(flags, npl, plane, before: tl.constexpr, need, OFFS: tl.constexpr,
                NOFF: tl.constexpr, TWAIT: tl.constexpr):  # fmt: skip
    """Wait for the planes a stage needs of the pass before it: planes plane -/+ o for each
    distinct offset o = b + Q_AX of :func:`wait_offsets` (one count per plane, not per shift);
    ``before`` 1: parts -> solve (minus), 2: solve -> apply (plus). flags: the batch*head's
    (pass, plane) counts. An offset is at most npl (a shift's whole-window offset is reduced
    modulo the grid: Q_AX < npl), so one conditional add or subtraction wraps it, no division.
    TWAIT (:func:`wait_mode`): 0, one thread reads a count, shares it through shared memory,
    and the next plane's is read after (:func:`_wait_for`); 2, with more than one plane (up to
    8), the counts are read at once, one thread each, and the wait spins on their least: one
    round trip to L2 a stage and one broadcast, one CTA barrier, for them all (Triton 3.6 PTX,
    sm_90a: ``atom.global.gpu.acquire`` by 2 threads, ``bar.sync``, a shuffle for the least,
    against ``ld.global.gpu.acquire`` and ``bar.sync`` a plane after another, 3 barriers for 2
    planes); 1, every thread reads every count itself, all before it spins (no barrier)."""
    if NOFF == 1 or TWAIT == 0 or NOFF > 8:
        for k in tl.static_range(NOFF):
            _wait_for(flags + (before - 1) * npl + _dep_plane(plane, before, OFFS[k], npl), need,
                      TWAIT)  # fmt: skip
    elif TWAIT == 1 and not _INTERPRET:
        n = _acquire_least(flags, npl, plane, before, OFFS, NOFF)
        while n < need:
            n = _acquire_least(flags, npl, plane, before, OFFS, NOFF)
    else:
        NP2: tl.constexpr = 2 if NOFF == 2 else (4 if NOFF <= 4 else 8)
        i = tl.arange(0, NP2)
        offs = tl.full((NP2,), OFFS[0], tl.int32)  # padded with the first: read twice, no harm
        for k in tl.static_range(1, NOFF):
            offs = tl.where(i == k, OFFS[k], offs)
        ptrs = flags + (before - 1) * npl + _dep_plane(plane, before, offs, npl)
        n = tl.min(tl.atomic_add(ptrs, 0, sem="acquire"), 0)
        _check_count(n, need)
        while n < need:
            n = tl.min(tl.atomic_add(ptrs, 0, sem="acquire"), 0)


@triton.jit
def _wait(flags, npl, plane, before: tl.constexpr, need, OFFS: tl.constexpr, NOFF: tl.constexpr,
          TWAIT: tl.constexpr):  # fmt: skip
    """A stage's wait (:func:`_wait_stage`): with TWAIT 2 a function of its own (inlined, ptxas
    hoisted the counts vector's lane arithmetic out of the backward's ticket loop and spilled it
    across the pass calls: Triton 3.6, BraTS fp32, 20 B), else inlined as before (Triton 3.9's
    bf16 BraTS backward spilled 8 B with the call)."""
    if TWAIT == 2:
        _wait_stage_call(flags, npl, plane, before, need, OFFS, NOFF, TWAIT)
    else:
        _wait_stage(flags, npl, plane, before, need, OFFS, NOFF, TWAIT)


@triton.jit(noinline=True)
def _wait_stage_call(flags, npl, plane, before: tl.constexpr, need, OFFS: tl.constexpr,
                     NOFF: tl.constexpr, TWAIT: tl.constexpr):  # fmt: skip
    """:func:`_wait_stage` as a function of its own (not inlined)."""
    _wait_stage(flags, npl, plane, before, need, OFFS, NOFF, TWAIT)


@triton.jit
def _dep_plane(plane, before: tl.constexpr, o, npl):
    """The plane a stage of ``plane`` needs at offset o (a scalar or a vector of offsets): minus
    for the solves' parts (``before`` 1), plus for the applies' solves (2)."""
    if before == 1:
        return _wrap_sub(plane, 0, o, npl)
    else:
        return _wrap_add(plane, 0, o, npl)


@triton.jit
def _acquire_least(flags, npl, plane, before: tl.constexpr, OFFS: tl.constexpr,
                   NOFF: tl.constexpr):  # fmt: skip
    """The least of a stage's counts, each read by this thread with an acquire of its own
    (:func:`_acquire_each`), issued one after another before any is used: their round trips
    overlap."""
    n = _acquire_each(flags + (before - 1) * npl + _dep_plane(plane, before, OFFS[0], npl))
    for k in tl.static_range(1, NOFF):
        n = tl.minimum(n, _acquire_each(flags + (before - 1) * npl +
                                        _dep_plane(plane, before, OFFS[k], npl)))
    return n


@triton.jit
def _count_done(flags, phase, plane, NPL):
    """Count a chunk of stage (phase, plane) done: every thread's stores first (barrier), then
    one release."""
    tl.debug_barrier()
    tl.atomic_add(flags + phase * NPL + plane, 1, sem="release")
