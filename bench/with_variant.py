"""Run a fastnmf command or a bench script with a window-kernel variant of bench/time_designs.py.

    python3 bench/with_variant.py --variant "design 3, four tiles" -- -m fastnmf profile ...
    python3 bench/with_variant.py --best designs.json -- bench/check_determinism.py --runs 10

The variant's design and ``_window3_sched.TUNING`` (``time_designs.VARIANTS``) are set in this
process, then the module (``-m NAME ARGS``) or script (``PATH ARGS``) runs in it as ``__main__``:
what the GPU session measures after the designs (the layer suite against SDPA, determinism) runs
the variant the designs' timing found fastest, before a default is chosen in the code.
``--best FILE`` picks, from time_designs.py's JSON, the variant with the fastest forward +
backward for ``--dtype`` and ``--shifts`` (default fp32, [None, 4]: the layer suite's).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: also when imported
from time_designs import SHIFTS, VARIANTS, _tuned, fastest  # noqa: E402


def best_variant(path: str, dtype: str = "fp32", shifts: str = "[None, 4]") -> str | None:
    """The name of the variant with the fastest forward + backward in a time_designs.py JSON
    (None if it timed none of ``dtype`` and ``shifts``)."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    best = fastest([r for r in rows if r["dtype"] == dtype and r["shifts"] == shifts])
    return best["variant"] if best else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pick = ap.add_mutually_exclusive_group(required=True)
    pick.add_argument("--variant", choices=[v[0] for v in VARIANTS if v[1] != 0])
    pick.add_argument("--best", metavar="FILE", help="bench/time_designs.py's JSON")
    ap.add_argument("--dtype", default="fp32", help="with --best (default fp32)")
    ap.add_argument("--shifts", default="[None, 4]", choices=list(SHIFTS), help="with --best")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- -m MODULE ARGS | -- SCRIPT ARGS")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or command == ["-m"]:
        ap.error("no command: give '-- -m MODULE ARGS' or '-- SCRIPT ARGS'")
    name = args.variant or best_variant(args.best, args.dtype, args.shifts)
    if name is None:  # nothing timed: the code's defaults, said so
        print(f"with_variant.py: no timed {args.dtype} {args.shifts} variant in {args.best}: "
              "the code's defaults", flush=True)  # fmt: skip
        design, tuning = None, {}
    else:
        _, design, tuning = next(v for v in VARIANTS if v[0] == name)
        print(f"with_variant.py: {name!r} (design {design}, {tuning})", flush=True)
    with _tuned(design, tuning):
        if command[0] == "-m":
            sys.argv = command[1:]
            runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = command
            runpy.run_path(command[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
