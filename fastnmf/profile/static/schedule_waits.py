"""How long the third window design's programs wait on each other (kernels/_window3_sched.py): a
discrete-event model of its persistent launch, no GPU (a model, not a measure).

The launch's programs take tickets in order from one counter (``_take``): ticket t is chunk c
of stage (pass, plane) of batch*head bh, in the schedule's order (``_schedule``). Before its
work a ticket waits until every chunk of each stage it needs has been counted done (``_needs``:
a solve the parts of its planes, an apply the solves). Here each ticket takes a fixed time for
its pass (``durations``, relative: parts, solve, apply; optionally spread by +-``jitter`` / 2 with
a fixed seed), a program takes the next ticket when its last one ends, and a ticket starts once
both its program is free and its needs are done. Reported: the makespan over the work spread
evenly (the programs' busy time over their count: what no waiting would take) and the share of
the programs' time spent waiting.

Left out: what a wait itself costs (the acquire round trips and spins), memory (the ticket's
duration does not depend on what is in L2), the ring's waits (parts on the solves that read a
region: with 3 regions they come 4-5 stages back, never binding here), other launches. The
durations are assumptions: the H200 timed only whole launches (kernels/DESIGNS.md).

``python -m fastnmf.profile.static.schedule_waits`` prints the plain order, the skewed one,
batch*heads side by side and both, for the layer's shapes from 2 x 32 x 128^3 (E = P = 8: 16
planes, 8 batch*heads, 64 chunks a stage) down to 16^3, 132 programs (an H100 / H200), a few
duration ratios (bench/results/schedule_cpu/).
"""

from __future__ import annotations

import argparse
import heapq
import random

__all__ = ["schedule_waits", "table", "main"]

# the benchmark shape's schedule (2 x 32 x 128^3, E = P = 8, 4 windows a ticket) on an H100 / H200
BENCH = dict(npl=16, bh=8, cpp=64, programs=132)
# relative durations of a parts, a solve and an apply ticket (assumptions: the parts pass holds
# most of a ticket's instructions, kernels/DESIGNS.md)
DURATIONS = ((1.0, 0.4, 0.6), (1.0, 0.2, 0.4), (1.0, 1.0, 1.0))


def schedule_waits(npl: int, bh: int, cpp: int, programs: int, durations=(1.0, 0.4, 0.6), *,
                   skew: bool = False, splits=(True,), offsets=(0,), jitter: float = 0.0,
                   seed: int = 0, group: int = 1) -> dict:  # fmt: skip
    """The modelled launch (module docstring) of ``bh`` batch*heads of ``npl`` planes, ``cpp``
    chunks a stage, on ``programs`` programs; ``splits`` / ``offsets``: the shifts along the
    planes' axis as ``_needs`` takes them (default: one shift that splits it, as [None, 4] and
    [None, 2, 4, 6]). Returns makespan, even (the busy time over the programs), slowdown
    (makespan / even) and wait_share (waiting time over programs x makespan)."""
    from fastnmf.kernels._window3_sched import _needs, _schedule

    order = _schedule(npl, skew)
    rng = random.Random(seed)
    free = [(0.0, i) for i in range(programs)]
    done: dict = {}  # (bh, stage) -> the time its last chunk ended
    busy = waited = 0.0
    for g in range(0, bh, group):
        for st in order:
            for b in range(g, min(g + group, bh)):
                needs = [done[(b, n)] for n in _needs(st, npl, list(splits), list(offsets))]
                last = 0.0
                for _ in range(cpp):
                    t, prog = heapq.heappop(free)
                    start = max([t, *needs])
                    took = durations[st[0]] * (1 + jitter * (rng.random() - 0.5))
                    waited += start - t
                    busy += took
                    last = max(last, start + took)
                    heapq.heappush(free, (start + took, prog))
                done[(b, st)] = last
    makespan = max(t for t, _ in free)
    even = busy / programs
    return dict(makespan=makespan, even=even, slowdown=makespan / even,
                wait_share=waited / (programs * makespan))  # fmt: skip


# the layer's shapes from 2 x 32 x 128^3 down, E = 8: (name, planes, batch*heads, chunks a stage)
SHAPES = (("2 x 32 x 128^3 (8)", 16, 8, 64), ("2 x 64 x 64^3 (16)", 8, 16, 16),
          ("2 x 128 x 32^3 (32)", 4, 32, 4), ("2 x 256 x 16^3 (64)", 2, 64, 1))  # fmt: skip


def table(shapes=SHAPES, programs: int = BENCH["programs"], jitter: float = 0.2) -> str:
    """A markdown table: per shape and durations, the plain order, the skewed one, batch*heads
    side by side ("auto": kernels/_window3_sched.head_group) and both."""
    from fastnmf.kernels._window3_sched import head_group

    rows = ["| shape (batch*heads) | planes, chunks a stage | durations | plain | skewed | "
            "side by side (\"auto\": group) | both |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, npl, bh, cpp in shapes:
        g = head_group(bh, cpp, "auto")
        for dur in DURATIONS:
            cells = []
            for skew, group in ((False, 1), (True, 1), (False, g), (True, g)):
                r = schedule_waits(npl, bh, cpp, programs, dur, skew=skew, group=group,
                                   jitter=jitter)  # fmt: skip
                cells.append(f"{r['slowdown']:.2f}x, {100 * r['wait_share']:.0f} %")
            rows.append(f"| {name} | {npl}, {cpp} | {' : '.join(f'{d:g}' for d in dur)} | "
                        f"{cells[0]} | {cells[1]} | {cells[2]} ({g}) | {cells[3]} |")  # fmt: skip
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastnmf.profile.static.schedule_waits",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--shape", type=int, nargs=3, metavar=("NPL", "BH", "CPP"),
                   help="one shape: planes, batch*heads, chunks a stage (default: SHAPES)")
    p.add_argument("--programs", type=int, default=BENCH["programs"])
    p.add_argument("--jitter", type=float, default=0.2, help="ticket times spread +-jitter/2")
    a = p.parse_args(argv)
    shapes = SHAPES if a.shape is None else (("given", *a.shape),)
    print(table(shapes, a.programs, a.jitter))


if __name__ == "__main__":
    main()
