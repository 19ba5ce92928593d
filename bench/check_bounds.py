"""Run window kernel variants under the byte counter's bounds check at ragged shapes (no GPU).

    TRITON_INTERPRET=1 python bench/check_bounds.py             # every design 2 and 3 variant
    TRITON_INTERPRET=1 python bench/check_bounds.py --variants "design 2, four tiles" \
        --dtypes fp32 bf16 --out bounds.json

Each case is one forward and backward call of ``fastnmf.matricized_nmf(..., kernel="triton")``
counted by ``fastnmf.profile.static.counter.count_call``, which stops at the first active lane
outside its tensor argument (``OutOfBounds``: past the end of one, before every one, or one access
across two) before the interpreter reads it. The shapes (batch 1, 2 heads of E = 8, windows 8^3)
have window counts that no power of two divides, so that a program's windows run past a head's
last one (design 2 at ``--wpp`` windows a program), where bounds bugs hide. A lane that lands
wholly inside another argument is not seen. Exit status 1 if any case fails; a CUDA GPU is not
needed (nor used).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/: also when imported
from time_designs import SHIFTS, VARIANTS, _tuned  # noqa: E402

SHAPES = {"8x16x24": ((8, 16, 24), 4), "16x8x40": ((16, 8, 40), 3), "24x16x16": ((24, 16, 16), 8)}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [v[0] for v in VARIANTS if v[1] in (1, 2, 3)]
    ap.add_argument("--variants", nargs="+", choices=names, metavar="VARIANT",
                    help="time_designs.py variants (default: every design 2 and 3 one)")
    ap.add_argument("--match", help="only the variants whose name this regex finds")
    ap.add_argument("--shifts", nargs="+", choices=list(SHIFTS),
                    default=["[None, 4]", "[None, 2, 4, 6]"])  # fmt: skip
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                    help="spatial shapes (each with the windows a program design 2 takes there)")
    ap.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    ap.add_argument("--out", help="JSON file of the cases and their results")
    return ap


def run_case(variant: tuple, shifts: str, shape: str, dtype: str) -> dict:
    """One variant, shift set, shape and dtype under the counter: the row of the report."""
    from fastnmf.profile.static.cases import StaticCase
    from fastnmf.profile.static.counter import count_call

    name, design, tuning = variant
    spatial, wpp = SHAPES[shape]
    shift_list = SHIFTS[shifts]
    case = StaticCase("window", 1, 16, spatial, dtype, tuple(shift_list or (None,)),
                      design=design, wpp=wpp if design == 2 else None)  # fmt: skip
    t0 = time.time()
    error = None
    try:
        with _tuned(design, tuning):
            count_call(case)
    except Exception as e:  # noqa: BLE001 - every failure is a row of the report
        error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return dict(variant=name, shifts=shifts, shape=shape, dtype=dtype, ok=error is None,
                error=error, seconds=round(time.time() - t0, 1))  # fmt: skip


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from fastnmf.profile.static.counter import interpreting

    if not interpreting():
        raise SystemExit("check_bounds.py: error: the counter needs TRITON_INTERPRET=1")
    wanted = args.variants or [v[0] for v in VARIANTS if v[1] in (2, 3)]
    pattern = re.compile(args.match) if args.match else None
    variants = [v for v in VARIANTS if v[0] in wanted and (not pattern or pattern.search(v[0]))]
    if not variants:
        raise SystemExit("check_bounds.py: error: no variant selected")
    rows = []
    for variant in variants:
        for shifts in args.shifts:
            for shape in args.shapes:
                for dtype in args.dtypes:
                    row = run_case(variant, shifts, shape, dtype)
                    rows.append(row)
                    status = "ok" if row["ok"] else f"FAIL {row['error']}"
                    print(f"{row['variant']!r:45} {shifts:17} {shape:9} {dtype}: {status} "
                          f"({row['seconds']} s)", flush=True)  # fmt: skip
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} cases inside their tensors")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
