"""DRAM estimate: replay a sector trace through a model of a GPU's L2 (an estimate, not a measure).

Model: one fully associative LRU cache of ``l2_bytes`` in 128-byte lines of four 32-byte sectors
(NVIDIA's sectored L2: a line is allocated on a miss, sectors are filled one by one). A load of
a sector not present in its resident line reads 32 bytes from DRAM; a store writes into L2
without reading (byte-masked); every sector stored while its line was resident is written back
once when the line is evicted, or at the end of the trace (it will be, eventually).

Order: launches in call order; inside a launch, programs in GPU linear order in waves of
``wave_programs`` (resident programs per SM x SM count); the programs of one wave run at the same
rate, so their accesses are interleaved by progress (access k of a program of n accesses at time
k / n). The replay is vectorised: each access's LRU stack distance (distinct lines touched since
the previous access to its line) is counted offline, level by level of a binary split of the
trace (sort + searchsorted per level, O(n log^2 n)); an access hits when that distance is below
the capacity in lines.

Trace from a smaller shape (the counter runs 16^3): reuse inside a launch happens between the
programs in flight together, so a launch gets the L2 share of the programs it has in flight
(``l2_bytes * min(programs, wave) / wave``); reuse across launches spans a whole launch's data,
which scales with the shape, so it gets ``l2_bytes * ratio`` (ratio = small / target elements).
See :func:`capacities`.

Left out: set associativity, hashing and the real replacement policy; the two L2 partitions of
sm_80 / sm_90 (data may be duplicated across them); L1 hits (bytes asked twice by one program
may never reach L2); prefetching and DRAM page effects; what the previous layer left in L2 (the
replay starts cold); other streams. Programs of a wave progress in lockstep here, which makes
a wave's footprint peak at once (real programs drift apart): e.g. the fused one-shift kernel's
second read of x, meant to come from L2, partly misses here (the estimate errs high). Reuse
inside a launch at distances of more than a wave at the target shape (e.g. g0 shared by every
matrix of the global kernels) is counted as hits at the small shape.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TARGETS", "SMALLER_L2", "replay", "interleave", "capacities", "stack_distances"]

LINE = 128
SECTOR = 32

# target: (L2 bytes, SMs). H100/H200 (sm_90a): DESIGN.md takes 60 MB for the H200 (the H100 SXM
# enables 50 MB of the die's 60; the H200's datasheet gives no L2 size, and `fastnmf info` prints
# the device's, which the GPU session's setup logs); A100 (sm_80): 40 MB, 108 SMs. The report
# notes the third design's estimate at SMALLER_L2 too (its fp32 backward is near the capacity).
TARGETS = {"sm_90a": (60 * 2**20, 132), "sm_80": (40 * 2**20, 108)}
# A smaller L2 of a target's GPUs, for which the static report notes the third window design's
# persistent DRAM estimate as well (its backward's reuse of x and dy sits near the capacity)
SMALLER_L2 = {"sm_90a": ("an H100", 50 * 2**20)}


def interleave(prog: np.ndarray, wave_programs: float) -> np.ndarray:
    """Order (indices) of one launch's accesses (given in program order) as waves run them."""
    n = prog.size
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, prog[1:] != prog[:-1]])
    lengths = np.diff(np.r_[starts, n])
    k = np.arange(n) - np.repeat(starts, lengths)
    progress = (k + 0.5) / np.repeat(lengths, lengths)
    wave = np.floor(prog / max(wave_programs, 1.0))
    return np.lexsort((prog, progress, wave))


def _previous(keys: np.ndarray) -> np.ndarray:
    """Index of the previous occurrence of each key (-1 for the first)."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    prev_sorted = np.r_[-1, order[:-1]]
    prev_sorted[np.r_[True, k[1:] != k[:-1]]] = -1
    prev = np.empty_like(order)
    prev[order] = prev_sorted
    return prev


def stack_distances(keys: np.ndarray) -> np.ndarray:
    """LRU stack distance of every access (distinct other keys since its previous access;
    -1 for a first access)."""
    n = keys.size
    prev = _previous(keys)
    # distance(i) = #{k < i : prev[k] <= prev[i]} - (prev[i] + 1)   (for prev[i] >= 0)
    count = np.zeros(n, np.int64)
    idx = np.arange(n, dtype=np.int64)
    level = 0
    while (1 << level) < n:
        right = ((idx >> level) & 1).astype(bool)
        block = idx >> (level + 1)
        left_keys = np.sort(block[~right] * (n + 1) + (prev[~right] + 1))
        qi = idx[right]
        hi = np.searchsorted(left_keys, block[qi] * (n + 1) + (prev[qi] + 1), side="right")
        lo = np.searchsorted(left_keys, block[qi] * (n + 1), side="left")
        count[qi] += hi - lo
        level += 1
    dist = count - (prev + 1)
    dist[prev < 0] = -1
    return dist


def replay(sector: np.ndarray, store: np.ndarray, launch: np.ndarray, *,
           intra_lines: np.ndarray, inter_lines: float):  # fmt: skip
    """DRAM bytes (read, written) charged to each access of a trace in time order.

    ``sector``: canonical sector ids (the low two bits are the sector in its 128-byte line);
    ``store``: store flags; ``launch``: launch index of each access. An access hits when its
    stack distance in lines is below ``intra_lines[launch]`` if the line's previous access was
    in the same launch, below ``inter_lines`` if it was in an earlier launch (see
    :func:`capacities`). Returns two int arrays (bytes read from DRAM, written to DRAM).
    """
    n = sector.size
    read = np.zeros(n, np.int64)
    write = np.zeros(n, np.int64)
    if n == 0:
        return read, write
    line = sector >> 2
    dist = stack_distances(line)
    prev = _previous(line)
    same = (prev >= 0) & (launch[np.maximum(prev, 0)] == launch)
    cap = np.where(same, np.asarray(intra_lines)[launch], inter_lines)
    miss = (dist < 0) | (dist >= cap)
    # episodes: residencies of a line, each starting at a miss
    order = np.lexsort((np.arange(n), line))
    episode = np.empty(n, np.int64)
    episode[order] = np.cumsum(miss[order]) - 1
    # per (episode, sector): the first access reads if it is a load; any store writes back once
    key = episode * 4 + (sector & 3)
    korder = np.lexsort((np.arange(n), key))
    ks = key[korder]
    first = np.r_[True, ks[1:] != ks[:-1]]
    firsts = korder[first]
    read[firsts[~store[firsts]]] = SECTOR
    group = np.cumsum(first) - 1
    write[firsts[np.unique(group[store[korder]])]] = SECTOR
    return read, write


def capacities(l2_bytes: float, programs: list[int], wave_programs: list[float], ratio: float):
    """Capacities in lines for a trace counted at a shape ``ratio`` times the target shape.

    Inside a launch, reuse happens between programs in flight together, so what matters is
    the L2 share per program in flight: a launch of ``programs`` programs at the small shape,
    run in waves of ``wave_programs`` (resident per SM x SMs, unscaled), gets
    ``l2_bytes * min(programs, wave) / wave``. Between launches the reuse distance is the
    data of a whole launch, which scales with the shape: ``l2_bytes * ratio``.
    """
    intra = [l2_bytes * min(p, w) / w / LINE for p, w in zip(programs, wave_programs, strict=True)]
    return np.maximum(np.array(intra), 1.0), max(l2_bytes * ratio / LINE, 1.0)
