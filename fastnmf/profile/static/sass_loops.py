"""The loops of a kernel's SASS and the source lines their instructions come from: how many
instructions a warp issues each time round a loop, the figure that decides whether a kernel can
keep up with memory (an SM issues at most one warp instruction per cycle in each of its 4
sub-partitions), where the byte counts cannot tell.

A loop is the span from a label to the last branch back to it (``BRA`` to an earlier address);
a loop inside another is nested (its instructions are not the outer loop's ``own``). Static
counts: a loop body counts once however often it runs, and each instruction once however many of
its lanes are predicated off; the trip counts come from the source (``lines``).

    python -m fastnmf.profile.static.sass_loops KERNEL.cubin|KERNEL.sass [--top N]
        [--span FILE [--trips T ...]]

``--span FILE``: the instructions one pass of the code from source file FILE issues: the SASS span
from its first to its last instruction from FILE (what the compiler placed between them counts),
the loops inside the span counted ``--trips`` times each (in order; default once).

``--ticket [--loop-trips FILE:LINE=N ...]``: the instructions one trip of a persistent kernel's
outermost loop issues (its ticket loop: one ticket of each pass, as the static count has each
branch once), with the functions it calls (bodies after the kernel's own code) as often as it
calls them, and every loop whose own instructions include source line FILE:LINE run N times
(others once: spin waits). The ticket-taking code runs for every pass but counts once. Of that
count, the CTA barriers (``BAR``), the shared-memory instructions (``LDS``, ``STS``, ...), the
global-memory ones (``LDG``, ``STG``, atomics) and the shuffles are printed too, each with the
``--top`` source lines that issue most, and the fewest L1/TEX data wavefronts the shared and
global ones take (:func:`wavefronts`: a bound without bank conflicts; the unit does at most one
a cycle, and Nsight Compute found it 48 % busy in design 3's forward on the H200).
``--callers``: a line of Triton's own library (``triton/language/``: ``standard.py:293`` is
every ``tl.sum``) is shown with the kernel line that precedes it in the SASS,
``standard.py:293<_window3_tile.py:273``, which is most often the call that reached it (a
heuristic: the disassembly keeps no inlining).

A cubin is disassembled with Triton's bundled ``nvdisasm -g`` (source lines from Triton's line
info); a Triton cache folder holds ``<kernel>.cubin`` for every compiled kernel (the static report
compiles into it: ``TRITON_CACHE_DIR``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import sys

__all__ = ["Loop", "parse_sass", "find_loops", "span_count", "ticket_count", "ticket_ops",
           "TICKET_OPS", "wavefronts", "disassemble", "main"]

_LOC = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+):")
_FUNC = re.compile(r"^(\$\S+):\s*$")  # a called function's first instruction (nvdisasm -c)
_CALL = re.compile(r"\bCALL\.\S+\s+`\((\$[^)]+)\)")
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_LIBRARY = re.compile(r"[/\\]triton[/\\]language[/\\]")  # Triton's own tl.sum, tl.dot, ...


@dataclasses.dataclass
class Loop:
    start: int  # index of the loop's first instruction (its label)
    end: int  # index of its last branch back
    depth: int  # 0: outermost
    own: int  # instructions not in a nested loop
    lines: collections.Counter  # "file:line" -> own instructions from it

    @property
    def instructions(self) -> int:
        return self.end - self.start + 1


def parse_sass(text: str, callers: bool = False):
    """(instructions as (text, "file:line") in order, label -> index of the next instruction)
    of ``nvdisasm -g`` output; "?" where no line info precedes an instruction. With ``callers``
    a line of Triton's library is "file:line<caller file:line" (the last other line before it)."""
    instrs, labels, loc, caller = [], {}, "?", "?"
    for line in text.splitlines():
        if m := _LOC.match(line):
            loc = f"{os.path.basename(m.group(1))}:{m.group(2)}"
            if not _LIBRARY.search(m.group(1)):
                caller = loc
            elif callers:
                loc = f"{loc}<{caller}"
        elif m := _LABEL.match(line):
            labels[m.group(1)] = len(instrs)
        elif m := _INSTR.match(line):
            instrs.append((m.group(2), loc))
    return instrs, labels


def find_loops(text: str) -> list[Loop]:
    """The loops of SASS text, outermost first within each span (sorted by start, then size)."""
    instrs, labels = parse_sass(text)
    ends: dict[int, int] = {}
    for i, (ins, _) in enumerate(instrs):
        m = _BRANCH.search(ins)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            start = labels[m.group(1)]
            ends[start] = max(ends.get(start, i), i)
    spans = sorted(ends.items(), key=lambda s: (s[0], -s[1]))
    loops = []
    for start, end in spans:
        depth = sum(1 for s, e in spans if s <= start and end <= e and (s, e) != (start, end))
        inner = [i for s, e in spans if start <= s and e <= end and (s, e) != (start, end)
                 for i in range(s, e + 1)]  # fmt: skip
        nested = set(inner)
        own = [instrs[i][1] for i in range(start, end + 1) if i not in nested]
        loops.append(Loop(start, end, depth, len(own), collections.Counter(own)))
    return loops


def span_count(text: str, source: str, trips=()) -> tuple[int, int, list[Loop], int]:
    """(first, last, loops inside, instructions one pass issues) of the span of SASS from the
    first to the last instruction from source file ``source`` (a base name): the span's
    instructions with each top-level loop inside it counted ``trips[i]`` times (default 1)."""
    instrs, _ = parse_sass(text)
    idx = [i for i, (_, loc) in enumerate(instrs) if loc.rsplit(":", 1)[0] == source]
    if not idx:
        raise ValueError(f"no instruction comes from {source}")
    first, last = idx[0], idx[-1]
    inside = [lp for lp in find_loops(text) if first <= lp.start and lp.end <= last]
    top = [lp for lp in inside if not any(o is not lp and o.start <= lp.start and lp.end <= o.end
                                          for o in inside)]  # fmt: skip
    if len(trips) > len(top):
        raise ValueError(f"{len(trips)} trip counts for {len(top)} loops in the span")
    counts = list(trips) + [1] * (len(top) - len(trips))
    extra = sum((t - 1) * lp.instructions for t, lp in zip(counts, top, strict=True))
    total = last - first + 1 + extra
    return first, last, top, total


def _functions(text: str) -> dict[str, tuple[int, int]]:
    """name -> (first, last) instruction of each called function of SASS text: from its label to
    the next function's (the kernel's own code comes first)."""
    starts, n = [], 0
    for line in text.splitlines():
        if m := _FUNC.match(line):
            starts.append((m.group(1), n))
        elif _INSTR.match(line):
            n += 1
    ends = [s for _, s in starts[1:]] + [n]
    return {name: (s, e - 1) for (name, s), e in zip(starts, ends[:len(starts)], strict=True)}


def ticket_count(text: str, loop_trips: dict[str, int]) -> tuple[Loop, dict[str, int], int]:
    """(the ticket loop, calls per function, instructions one trip issues) of a persistent
    kernel's SASS (module docstring, ``--ticket``): the outermost loop of the kernel's own code
    with the bodies of the functions it calls, each instruction weighted by the trips of the loops
    around it (a loop's trips: ``loop_trips[FILE:LINE]`` of the first of its own source lines that
    has one, else 1; the ticket loop itself once)."""
    ticket, calls, weighted, _ = _ticket_weights(text, loop_trips)
    return ticket, calls, sum(w for _, _, w in weighted)


def unused_trips(text: str, loop_trips: dict[str, int]) -> list[str]:
    """The keys of ``loop_trips`` that set no loop's trips in :func:`ticket_count` (no loop but
    the ticket loop has its own code at that line: a line an edit moved, or another kernel's)."""
    used = _ticket_weights(text, loop_trips)[3]
    return [k for k in loop_trips if k not in used]


# what the ticket count breaks out by kind (``ticket_ops``): CTA barriers (the stall Nsight
# Compute found in design 3's forward: bench/results/h200_2026-12-04/) and shared-memory
# instructions (each at least one L1 wavefront: its data pipe was the busiest unit there)
TICKET_OPS = {
    "barriers": re.compile(r"^(?:@!?U?P\w+\s+)?BAR\.(?:SYNC|RED|ARV)\b"),
    "shared": re.compile(r"^(?:@!?U?P\w+\s+)?(?:LDS|STS|LDSM|STSM|ATOMS)\b"),
    # global memory through the L1/TEX unit: loads, stores, async copies, atomics (the spin-waits'
    # polls among them); shuffles go through the SM's memory I/O queue as loads do
    "global": re.compile(r"^(?:@!?U?P\w+\s+)?(?:LDG|STG|LDGSTS|ATOMG|RED|ATOM)\b"),
    "shuffles": re.compile(r"^(?:@!?U?P\w+\s+)?SHFL\b"),
}
# a warp's bytes per lane by an instruction's width suffix (none: 4); ldmatrix / stmatrix move
# 128 bytes a 8x8 matrix of 16-bit values (M88, .2 / .4: two or four)
_WIDTH = re.compile(r"\.(64|128)\b")
_MATRIX = re.compile(r"\b(?:LDSM|STSM)\.16\.M(?:T)?88(?:\.(2|4))?\b")
_L1_BYTES = 128  # an L1/TEX wavefront: 128 bytes of a warp's request, at most one a cycle


def wavefronts(instruction: str) -> int:
    """The fewest L1/TEX data wavefronts one warp-wide shared or global memory instruction takes
    (its 32 lanes' bytes over 128 a wavefront: LDS 1, LDS.64 2, LDS.128 4, LDSM.16.M88.4 4),
    reached without bank conflicts and, for global memory, with every lane in one line; 0 for
    any other instruction."""
    if not (TICKET_OPS["shared"].match(instruction) or TICKET_OPS["global"].match(instruction)):
        return 0
    opcode = re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0]  # not the operands' R2.64
    m = _MATRIX.search(opcode)
    if m:
        return int(m.group(1) or 1)
    w = _WIDTH.search(opcode)
    return max(1, 32 * (int(w.group(1)) // 8 if w else 4) // _L1_BYTES)


def ticket_ops(text: str, loop_trips: dict[str, int], kind: str,
               callers: bool = False) -> collections.Counter:  # fmt: skip
    """The instructions of ``kind`` (a :data:`TICKET_OPS` key) one ticket issues, weighted as in
    :func:`ticket_count`, by source line ("file:line"; with ``callers`` see :func:`parse_sass`)."""
    return _ops_by_line(_ticket_weights(text, loop_trips, callers)[2], kind)


def _ops_by_line(weighted, kind: str) -> collections.Counter:
    """:func:`ticket_ops` of an already weighted ticket (:func:`_ticket_weights`)."""
    pattern = TICKET_OPS[kind]
    ops: collections.Counter = collections.Counter()
    for ins, loc, w in weighted:
        if pattern.match(ins):
            ops[loc] += w
    return ops


def _with_nested_calls(instrs, funcs: dict, calls: collections.Counter) -> collections.Counter:
    """``calls`` (function -> calls a ticket) plus the calls those functions make, each call site
    once per call of its function, down the call graph (depth-first; a cycle is an error)."""
    total: collections.Counter = collections.Counter()

    def visit(name: str, n: int, path: tuple) -> None:
        if name in path:
            raise ValueError(f"recursive call in the SASS: {' -> '.join(path + (name,))}")
        total[name] += n
        first, last = funcs[name]
        for ins, _ in instrs[first:last + 1]:
            if m := _CALL.search(ins):
                visit(m.group(1), n, path + (name,))

    for name, n in calls.items():
        visit(name, n, ())
    return total


def _ticket_weights(text: str, loop_trips: dict[str, int], callers: bool = False):
    """(ticket loop, calls, [(instruction, file:line, times one ticket issues it)], the
    ``loop_trips`` keys used): the ticket loop's own instructions, then each called function's
    once per call (also the functions they call: :func:`_with_nested_calls`)."""
    instrs, _ = parse_sass(text, callers)
    funcs = _functions(text)
    own_end = min((s for s, _ in funcs.values()), default=len(instrs))
    loops = find_loops(text)
    body = [lp for lp in loops if lp.end < own_end]
    if not body:
        raise ValueError("no loop in the kernel's own code")
    ticket = max(body, key=lambda lp: lp.instructions)
    weight = [1] * len(instrs)
    used = set()
    for lp in loops:
        if lp is not ticket:
            key = next((k for k in lp.lines if k in loop_trips), None)
            used.add(key)
            for i in range(lp.start, lp.end + 1):
                weight[i] *= loop_trips.get(key, 1)
    calls = collections.Counter(m.group(1) for ins, _ in instrs[ticket.start:ticket.end + 1]
                                if (m := _CALL.search(ins)))  # fmt: skip
    calls = _with_nested_calls(instrs, funcs, calls)
    spans = [(ticket.start, ticket.end, 1)] + [(*funcs[name], n) for name, n in calls.items()]
    weighted = [(instrs[i][0], instrs[i][1], weight[i] * n)
                for first, last, n in spans for i in range(first, last + 1)]  # fmt: skip
    return ticket, dict(calls), weighted, used


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -g -c`` of a cubin (Triton's bundled tool): SASS with source lines."""
    from .ptx_tools import nvdisasm_text

    return nvdisasm_text(cubin, "-g", "-c")


def _read(path: str) -> str:
    if not os.path.isfile(path):
        raise SystemExit(f"sass_loops: error: no such file: {path}")
    if path.endswith(".cubin"):
        with open(path, "rb") as f:
            return disassemble(f.read())
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _print_ticket(text: str, specs: list[str], top: int, callers: bool = False) -> None:
    trips = {}
    for spec in specs:
        key, _, n = spec.rpartition("=")
        if not key or ":" not in key or not n.isdigit():
            raise SystemExit(f"sass_loops: error: --loop-trips takes FILE:LINE=N, not {spec!r}")
        trips[key] = int(n)
    try:
        ticket, calls, total = ticket_count(text, trips)
    except ValueError as e:
        raise SystemExit(f"sass_loops: error: {e}") from None
    for key in unused_trips(text, trips):
        print(f"sass_loops: warning: --loop-trips {key}: no loop here has its own code at that "
              "line, so it counts nothing (moved by an edit, or another kernel's?)",
              file=sys.stderr)  # fmt: skip
    called = ", ".join(f"{name.split('$')[-1][:40]} x{n}" for name, n in calls.items())
    print(f"ticket loop [{ticket.start}-{ticket.end}] {ticket.instructions} instructions; calls: "
          f"{called or 'none'}; one ticket: {total}")  # fmt: skip
    _, _, weighted, _ = _ticket_weights(text, trips, callers)  # once for every kind
    for kind in TICKET_OPS:
        ops = _ops_by_line(weighted, kind)
        lines = ", ".join(f"{k} x{v}" for k, v in ops.most_common(top))
        print(f"  {kind}: {sum(ops.values())}" + (f" ({lines})" if lines else ""))
    shared = sum(wavefronts(i) * w for i, _, w in weighted if TICKET_OPS["shared"].match(i))
    glob = sum(wavefronts(i) * w for i, _, w in weighted if TICKET_OPS["global"].match(i))
    print(f"  L1 wavefronts at least: {shared + glob} (shared {shared}, global {glob}; a warp, "
          f"one a cycle an SM)")  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastnmf.profile.static.sass_loops",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("path", help="a .cubin (disassembled with nvdisasm -g) or SASS text")
    parser.add_argument("--top", type=int, default=4, help="source lines shown per loop")
    parser.add_argument("--span", metavar="FILE",
                        help="count one pass of FILE's code (a base name)")  # fmt: skip
    parser.add_argument("--trips", type=int, nargs="+", default=[],
                        help="trip counts of the loops inside the span, in order")  # fmt: skip
    parser.add_argument("--ticket", action="store_true",
                        help="count one trip of the kernel's ticket loop with what it calls")
    parser.add_argument("--loop-trips", nargs="+", default=[], metavar="FILE:LINE=N",
                        help="with --ticket: loops with own code from FILE:LINE run N times")
    parser.add_argument("--callers", action="store_true",
                        help="with --ticket: show Triton's library lines with the kernel line "
                             "before each")  # fmt: skip
    args = parser.parse_args(argv)
    text = _read(args.path)
    total = len(parse_sass(text)[0])
    if total == 0:
        raise SystemExit(f"sass_loops: error: no SASS instructions in {args.path}")
    if args.ticket:
        _print_ticket(text, args.loop_trips, args.top, args.callers)
        return
    if args.span:
        try:
            first, last, loops, count = span_count(text, args.span, args.trips)
        except ValueError as e:
            raise SystemExit(f"sass_loops: error: {e}") from None
        trips = args.trips + [1] * (len(loops) - len(args.trips))
        inner = ", ".join(f"[{lp.start}-{lp.end}] {lp.instructions} x{t}"
                          for lp, t in zip(loops, trips, strict=True))  # fmt: skip
        print(f"{args.span}: span [{first}-{last}] {last - first + 1} instructions; loops inside: "
              f"{inner or 'none'}; one pass: {count}")  # fmt: skip
        return
    print(f"{total} instructions; loops (instructions per trip: all / own, not in nested loops):")
    for loop in find_loops(text):
        top = ", ".join(f"{k} x{v}" for k, v in loop.lines.most_common(args.top))
        print(f"{'  ' * loop.depth}[{loop.start}-{loop.end}] {loop.instructions} / {loop.own}: "
              f"{top}")  # fmt: skip


if __name__ == "__main__":
    main()
