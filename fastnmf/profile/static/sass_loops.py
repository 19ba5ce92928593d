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

__all__ = ["Loop", "parse_sass", "find_loops", "span_count", "disassemble", "main"]

_LOC = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^(\.L_x_\d+):")
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


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


def parse_sass(text: str):
    """(instructions as (text, "file:line") in order, label -> index of the next instruction)
    of ``nvdisasm -g`` output; "?" where no line info precedes an instruction."""
    instrs, labels, loc = [], {}, "?"
    for line in text.splitlines():
        if m := _LOC.match(line):
            loc = f"{os.path.basename(m.group(1))}:{m.group(2)}"
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastnmf.profile.static.sass_loops",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("path", help="a .cubin (disassembled with nvdisasm -g) or SASS text")
    parser.add_argument("--top", type=int, default=4, help="source lines shown per loop")
    parser.add_argument("--span", metavar="FILE",
                        help="count one pass of FILE's code (a base name)")  # fmt: skip
    parser.add_argument("--trips", type=int, nargs="+", default=[],
                        help="trip counts of the loops inside the span, in order")  # fmt: skip
    args = parser.parse_args(argv)
    text = _read(args.path)
    total = len(parse_sass(text)[0])
    if total == 0:
        raise SystemExit(f"sass_loops: error: no SASS instructions in {args.path}")
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
