"""DRAM estimate of the third window design's persistent launches (kernels/window_nmf3.py): a
block-level L2 model at the benchmark shape itself (an estimate, not a measure).

The sector replay of :mod:`.l2` scales a small-shape trace to the target by the launch's programs
in flight or the whole shape; neither fits a persistent launch, whose reuse distances are set by
the plane schedule (kernels/_window3_sched.py): x is read by parts(p) and again by apply(p) about
one plane later. So here the schedule is walked at the target shape, ticket by ticket, each
ticket touching *blocks* (one chunk of WPP windows of a tensor, or the statistics a chunk writes):

- forward: parts(p, c) reads x[p, c] and writes the chunk's part statistics (K's upper triangle
  and X g0 per part; planes 1.. of every head in one ring of plane regions, plane 0 in one of two
  regions, alternate heads: rewritten while in L2); solve(p, c) reads the statistics of the
  planes it needs and writes u, h and K of its shifted windows (K and h read back at once: the
  same block, in L2); apply(p, c) reads x[p, c] and the
  solves of the planes it needs and writes y[p, c];
- backward: parts reads x, dy and u, h, K (the forward's, one block), writes the ū parts; solve
  reads them and u, h, K (recomputing the iterates), writes S and h̄ (ū through h̄'s slots
  first: the same block); apply reads x, dy, u, S, h̄
  and writes dx.

L2 is one LRU of whole blocks in bytes: a read of a block not resident reads it from DRAM; a
write allocates it without a read; a written block is written back once when evicted or at the
end. Blocks that the output passes read for the last time or store (x, dy, y, dx of an apply
ticket) are evict-first where the kernels mark them so (``_window3_sched.last_use``): any such
block leaves before every other block, the least recently used first. Capacity: the target's
L2 less the data of the tickets in flight (programs x the largest ticket's bytes: a
conservative bound on the lines recently touched by running programs).
Left out: sector granularity (blocks are read whole), the part of a statistics block a stage
really reads (whole blocks: errs high), set associativity and the real replacement policy, what
earlier launches left in L2.
"""

from __future__ import annotations

import collections
import math

import torch

from .cases import DTYPES, StaticCase, ideal_bytes, selected_design
from .l2 import SMALLER_L2, TARGETS

__all__ = ["pipeline_dram", "persistent_programs", "ticket_blocks", "smaller_l2_notes"]

F32 = 4


def _geometry(case: StaticCase):
    from fastnmf.kernels._window2_common import _Geometry2
    from fastnmf.kernels._window3_sched import fused_plan, ring_regions, wpp

    x = torch.empty(case.shape, device="meta")
    patch = (case.window,) * len(case.spatial)
    geo = _Geometry2(x, case.head_dim, patch, list(case.shifts))
    plan = fused_plan(tuple(geo.NW), geo.shifts)
    if plan is None:
        raise ValueError(f"{case.id}: no fused plan (the second design runs)")
    return geo, plan, wpp(), ring_regions(geo.shifts, plan[0])


def persistent_programs(case: StaticCase, target: str = "sm_90a") -> int:
    """Programs of the persistent launch of ``case`` at its own shape on ``target``: the grid
    kernels/_window3_sched.py launches there (the target's SMs, fewer when there are fewer
    tickets)."""
    from fastnmf.kernels._window3_sched import Pipeline

    from .capture import persistent_grid

    geo, plan, _, _ = _geometry(case)
    with persistent_grid(target):
        return Pipeline(geo, plan, torch.device("meta")).grid[0]


def _merges(case: StaticCase, geo, wpp: int, nplane: int, c: int) -> int:
    """Windows of chunk c of a plane whose high parts along axis 2 the forward's parts pass merges
    into their neighbour's (kernels/_window3_slots._merges_next; 0 unless merging is on). A plane
    starts a row of the window grid, so a window's place in its row is its place in the plane
    modulo NW2."""
    from fastnmf.kernels._common import acc_dtype
    from fastnmf.kernels._window3_sched import merge_on

    nw2 = geo.NW[2]
    dot = geo.dot(acc_dtype(DTYPES[case.dtype]), False)["DOT"]
    on = merge_on(dot, geo.shifts, nw2, nplane, wpp)
    windows = range(c * wpp, min((c + 1) * wpp, nplane))
    return sum(on and i % nw2 != nw2 - 1 and i % wpp != wpp - 1 and i + 1 < nplane
               for i in windows)  # fmt: skip


def _sizes(case: StaticCase, geo, per_chunk: int, merges: int = 0) -> dict:
    """Bytes of one block of each kind (a chunk of ``per_chunk`` windows, ``merges`` of them
    merged into their neighbour: :func:`_merges`)."""
    e = geo.E
    vol = e * math.prod(geo.P) * case.itemsize  # one window of x (y, dy, dx)
    parts = sum(math.prod(2 if s[d] else 1 for d in range(3)) for s in geo.shifts)
    high = sum(math.prod(2 if s[d] else 1 for d in range(2)) for s in geo.shifts if s[2])
    tri = e * (e + 1) // 2
    n = geo.nshift
    return {
        "vol": per_chunk * vol,
        # K upper triangle + X g0 per part (a merged window's high parts along axis 2: none)
        "parts_fwd": (per_chunk * parts - merges * high) * (tri + e) * F32,
        "solve_fwd": per_chunk * n * (2 * e + e * e) * F32,  # u, h, K (whole)
        "parts_bwd": per_chunk * parts * e * F32,  # ū per part
        "saved": per_chunk * n * (2 * e + e * e) * F32,  # the forward's u, h, K
        "solve_bwd": per_chunk * n * (e * e + e) * F32,  # S, h̄
    }


def _needs(plane: int, npl: int, shifts, ax: int, sign: int) -> set[int]:
    return {(plane + sign * (b + s[3 + ax])) % npl for s in shifts
            for b in ((0, 1) if s[ax] else (0,))}  # fmt: skip


def _stage_order(order, bh: int, group: int):
    """(batch*head, stage) in ticket order: each stage of ``group`` batch*heads side by side
    (kernels/_window3_sched._take)."""
    for g in range(0, bh, group):
        for stage in order:
            for b in range(g, g + group):
                yield b, stage


def ticket_blocks(case: StaticCase, pass_: str):
    """The blocks each ticket touches, in ticket order: a list of tickets, each a list of
    (block key, bytes, store, evict-first)."""
    from fastnmf.kernels._window3_sched import head_group, last_use

    geo, (ax, order), per_chunk, ring = _geometry(case)
    if pass_ != "fwd":
        ring = 0  # the backward's ū parts are flat

    def region(bh: int, p: int) -> tuple[int, int]:
        """(owner, region) of plane p's parts (kernels/_window3_slots._ring_region): the ring's
        regions are shared by all heads (owner -1), with heads side by side by all groups (each
        head of a group its own regions)."""
        if ring == 0:
            return bh, p
        h, b = divmod(bh, group)
        return -1, (ring + h % 2 if p == 0 else (h * (npl - 1) + p - 1) % ring) * group + b

    npl = geo.NW[ax]
    nplane = geo.nwin // npl
    cpp = math.ceil(nplane / per_chunk)
    group = head_group(geo.bh, cpp)  # batch*heads side by side (Pipeline)
    sizes = [_sizes(case, geo, min(per_chunk, nplane - c * per_chunk),
                    _merges(case, geo, per_chunk, nplane, c)) for c in range(cpp)]  # fmt: skip
    fwd = pass_ == "fwd"
    vol_in = ("x",) if fwd else ("x", "dy")
    last = bool(last_use())  # the output passes' x, dy, y, dx: evict-first
    tickets = []
    for bh, (phase, p) in _stage_order(order, geo.bh, group):
        for c in range(cpp):
            def blk(name, plane, kind, store=False, first=False, bh=bh, c=c):
                return ((name, bh, plane, c), sizes[c][kind], store, first)

            def parts(q, store=False, bh=bh, c=c):
                kind = "parts_fwd" if fwd else "parts_bwd"
                return (("parts", *region(bh, q), c), sizes[c][kind], store, False)

            if phase == 0:
                acc = [blk(v, p, "vol") for v in vol_in]
                if not fwd:
                    acc.append(blk("saved", p, "saved"))
                acc.append(parts(p, True))
            elif phase == 1:
                acc = [parts(q) for q in sorted(_needs(p, npl, geo.shifts, ax, -1))]
                if not fwd:
                    acc.append(blk("saved", p, "saved"))
                acc.append(blk("solve", p, "solve_fwd" if fwd else "solve_bwd", True))
            else:
                acc = [blk(v, p, "vol", first=last) for v in vol_in]
                acc += [blk("solve", q, "solve_fwd" if fwd else "solve_bwd")
                        for q in sorted(_needs(p, npl, geo.shifts, ax, 1))]  # fmt: skip
                acc.append(blk("y" if fwd else "dx", p, "vol", True, last))
            tickets.append(acc)
    return tickets


def pipeline_dram(case: StaticCase, pass_: str, *, target: str = "sm_90a",
                  programs_per_sm: int = 1, l2_bytes: int | None = None) -> dict:  # fmt: skip
    """DRAM bytes read and written by the persistent launch of ``case``'s ``pass_`` ("fwd" or
    "bwd") at its own shape, and the ratio to the ideal (see the module docstring); ``l2_bytes``
    in place of the target's L2."""
    target_l2, sms = TARGETS[target]
    l2_bytes = target_l2 if l2_bytes is None else l2_bytes
    tickets = ticket_blocks(case, pass_)
    inflight = sms * programs_per_sm * max(sum(b for _, b, _, _ in t) for t in tickets)
    capacity = l2_bytes - inflight
    # key -> (bytes, dirty): the evict-first blocks, then the others, each least recent first
    first: collections.OrderedDict = collections.OrderedDict()
    normal: collections.OrderedDict = collections.OrderedDict()
    used = read = written = 0
    for ticket in tickets:
        for key, nbytes, store, evict_first in ticket:
            held = first.pop(key, None) or normal.pop(key, None)
            if held is None:
                read += 0 if store else nbytes
                used += nbytes
            (first if evict_first else normal)[key] = (nbytes, store or bool(held and held[1]))
            while used > capacity and (first or normal):
                _, (b, dirty) = (first or normal).popitem(last=False)
                used -= b
                written += b if dirty else 0
    written += sum(b for d in (first, normal) for b, dirty in d.values() if dirty)
    ideal = ideal_bytes(case, pass_)
    return dict(read=read, written=written, dram_bytes=read + written, ideal_bytes=ideal,
                dram_over_ideal=(read + written) / ideal, capacity=capacity,
                inflight=inflight)  # fmt: skip


def smaller_l2_notes(cases, targets) -> list[str]:
    """For each target with a smaller L2 among its GPUs (``l2.SMALLER_L2``) and each case that
    runs the third design's persistent launches: that launch's DRAM estimate with the smaller L2,
    forward, backward and both (the report's column takes the target's own)."""
    notes = []
    for target in targets:
        if target not in SMALLER_L2:
            continue
        gpu, l2_bytes = SMALLER_L2[target]
        for case in cases:
            if (case.mode, case.rank, case.design) != ("window", 1, 3):
                continue
            try:
                with selected_design(case):
                    est = {p: pipeline_dram(case, p, target=target, l2_bytes=l2_bytes)
                           for p in ("fwd", "bwd")}  # fmt: skip
            except ValueError:  # no fused plan: the second design runs
                continue
            both = sum(e["dram_bytes"] for e in est.values()) / sum(
                e["ideal_bytes"] for e in est.values())
            notes.append(f"{target}, {case.id}: the persistent launches' DRAM estimate with "
                         f"{gpu}'s {l2_bytes / 2**20:g} MB L2 (the table: "
                         f"{TARGETS[target][0] / 2**20:g} MB): forward "
                         f"{est['fwd']['dram_over_ideal']:.2f}x, backward "
                         f"{est['bwd']['dram_over_ideal']:.2f}x, both {both:.2f}x")  # fmt: skip
    return notes
