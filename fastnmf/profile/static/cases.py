"""The calls the static suite analyses: one source for the kernel report, traffic and step account.

A :class:`StaticCase` is one call of ``fastnmf.matricized_nmf`` (the NMF layer's core) at the
benchmark shapes of issue 14: 2x32x128^3 and 2x64x64^3, E = 8, P = 8, T = 5, shifts [None, 4]
(the module default) and [None, 2, 4, 6] (the original code's BraTS config), fp32 and bf16, rank
one and rank two; plus the global path. ``ideal_bytes`` is what a perfect kernel moves: forward
reads x once and writes y once; backward reads x and dy once and writes dx once. ``design`` picks
the window kernels (``fastnmf.kernels.window_nmf.TUNING["design"]``, 1, 2 or 3) for the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math

import torch

__all__ = ["StaticCase", "case_to_json", "case_from_json", "benchmark_cases", "small_case",
           "ideal_bytes", "coverage_cases", "selected_design", "DTYPES", "PASSES",
           "DESIGNS"]  # fmt: skip

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("fwd", "bwd")
BENCH_SHAPES = ((2, 32, 128), (2, 64, 64))  # (batch, channels, side): volumes side^3
SHIFT_SETS = {"swin2": (None, 4), "swin4": (None, 2, 4, 6), "local": (None,)}
HEAD_DIM = 8
WINDOW = 8
ITERS = 5
DESIGNS = (1, 2, 3)  # the window kernels' designs (kernels/window_nmf.py, _nmf2.py, _nmf3.py)


@dataclasses.dataclass(frozen=True)
class StaticCase:
    """One NMF layer call: ``mode`` "window" or "global"; ``shifts`` a tuple (None = unshifted);
    ``design`` the window kernels' design (1, 2 or 3)."""

    mode: str
    batch: int
    channels: int
    spatial: tuple[int, ...]
    dtype: str = "fp32"
    shifts: tuple = (None,)
    head_dim: int = HEAD_DIM
    window: int | None = WINDOW
    rank: int = 1
    iters: int = ITERS
    design: int = 1
    untiled: bool = False  # design 3 with its four tiles off (its per-window passes)
    # design 2's windows a program where set (else its own choice for the shape): the traffic
    # count at a small shape takes the benchmark shape's (traffic.counted_case)
    wpp: int | None = None
    # design 3's waits read their counts in every thread (``_window3_sched.TUNING
    # ["thread_waits"]``) where set
    thread_waits: bool = False
    # design 3's stages read all their planes' counts at once (``_window3_sched.TUNING
    # ["count_waits"]``) where set: True or False, None the code's choice (before Triton 3.7)
    count_waits: bool | None = None
    # design 3's backward parts tile with every shift in one product (``_window3_sched.TUNING
    # ["bwd_parts_joined"]``) where set: True or False, None the code's choice
    bwd_parts_joined: bool | None = None

    def __post_init__(self):
        if self.design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}, got {self.design!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, self.channels, *self.spatial)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def shift_name(self) -> str:
        if self.mode == "global":
            return "global"
        return "[" + ", ".join("None" if s is None else str(s) for s in self.shifts) + "]"

    @property
    def id(self) -> str:
        size = "x".join(map(str, self.shape))
        design = "" if self.design == 1 else f"-d{self.design}"  # design 1: the ids of before
        untiled = "-untiled" if self.untiled else ""
        waits = "-thread-waits" if self.thread_waits else ""
        waits += {None: "", True: "-count-waits", False: "-plane-waits"}[self.count_waits]
        joined = {None: "", True: "-bwd-joined", False: "-bwd-per-shift"}[self.bwd_parts_joined]
        rows = "" if self.head_dim == HEAD_DIM else f"-e{self.head_dim}"  # E = 8: as before
        return (f"{self.mode}-{self.shift_name}-{self.dtype}-r{self.rank}-{size}{rows}{design}"
                f"{untiled}{waits}{joined}")  # fmt: skip

    def kwargs(self) -> dict:
        """Keyword arguments of ``fastnmf.matricized_nmf`` for this case (v0 excluded)."""
        shifts = None if self.mode == "global" else list(self.shifts)
        patch = None if self.mode == "global" else self.window
        return dict(head_dim=self.head_dim, window=patch, shifts=shifts, iters=self.iters)

    def scaled(self, side: int, channels: int | None = None, batch: int | None = None):
        """The same case at a smaller cube ``side^nd`` (for the interpreter's byte counter)."""
        spatial = (side,) * len(self.spatial)
        return dataclasses.replace(
            self, spatial=spatial, channels=channels or self.channels, batch=batch or self.batch
        )


def ideal_bytes(case: StaticCase, pass_: str) -> int:
    """fwd: read x + write y; bwd: read x and dy + write dx (each once)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    tensors = 2 if pass_ == "fwd" else 3
    return tensors * case.numel * case.itemsize


def benchmark_cases(*, ranks=(1, 2), dtypes=tuple(DTYPES)) -> list[StaticCase]:
    """Every case of the static suite at the benchmark shapes (3D)."""
    cases = []
    for batch, channels, side in BENCH_SHAPES:
        for dtype in dtypes:
            for rank in ranks:
                for shifts in SHIFT_SETS.values():
                    cases.append(StaticCase("window", batch, channels, (side,) * 3, dtype,
                                            shifts, rank=rank))  # fmt: skip
                cases.append(StaticCase("global", batch, channels, (side,) * 3, dtype,
                                        (None,), window=None, rank=rank))  # fmt: skip
    return cases


def small_case(case: StaticCase, side: int = 16) -> StaticCase:
    """``case`` at a cube of ``side`` (default 16^3, batch 1): cheap enough for the interpreter."""
    return case.scaled(side, batch=1)


def coverage_cases(dtype: str = "fp32") -> list[StaticCase]:
    """Cases that launch every Triton kernel of the layer: the benchmark cases at the first
    benchmark shape (rank one and two, every shift set, global) plus shifts [None, 3], whose
    tiles of one voxel send the window apply passes to the per-voxel kernels, plus the second
    window design with both shift sets ([None, 4]: sub-boxes of 4^3, [None, 2, 4, 6]: of 2^3) and
    the third (its fused kernels) with both, with its tiles (the default) and without, plus the
    global path with 16 rows a matrix (its backward output pass then spreads the rows over
    threads: kernels/_global_apply.py), plus the isles preset's layer (E = P = 4, shifts
    [None, 1, 2, 3]: design 3 with windows smaller than its program, kernels/_window3_bwd.py)."""
    cases = benchmark_cases(dtypes=(dtype,))
    cases = [c for c in cases if c.shape == cases[0].shape]
    odd = dataclasses.replace(cases[0], mode="window", shifts=(None, 3), window=WINDOW, rank=1)
    two = [dataclasses.replace(cases[0], mode="window", shifts=SHIFT_SETS[name], window=WINDOW,
                               rank=1, design=d, untiled=u)
           for d, u in ((2, False), (3, False), (3, True))
           for name in ("swin2", "swin4")]  # fmt: skip
    wide = dataclasses.replace(cases[0], mode="global", shifts=(None,), window=None, rank=1,
                               head_dim=16)  # fmt: skip
    isles = dataclasses.replace(cases[0], mode="window", shifts=(None, 1, 2, 3), window=4,
                                head_dim=4, rank=1, design=3)  # fmt: skip
    return [*cases, odd, *two, wide, isles]


@contextlib.contextmanager
def selected_design(case: StaticCase):
    """Inside the block the window kernels of ``case.design`` serve the layer's calls (design 3
    with its tiles off where ``case.untiled``, its waits in every thread where
    ``case.thread_waits``, all a stage's counts at once or not as ``case.count_waits``, its
    backward parts tile joined or not as ``case.bwd_parts_joined`` says; design 2 with
    ``case.wpp`` windows a program where set)."""
    tuning = importlib.import_module("fastnmf.kernels.window_nmf").TUNING
    tuning2 = importlib.import_module("fastnmf.kernels._window2_common").TUNING
    tuning3 = importlib.import_module("fastnmf.kernels._window3_sched").TUNING
    saved, saved2, saved3 = tuning["design"], tuning2["wpp"], dict(tuning3)
    tuning["design"] = case.design
    if case.wpp:
        tuning2["wpp"] = case.wpp
    if case.untiled:
        sched = importlib.import_module("fastnmf.kernels._window3_sched")
        tuning3.update(dict.fromkeys(sched.TILE_KEYS, False))
    if case.thread_waits:
        tuning3["thread_waits"] = True
    if case.count_waits is not None:
        tuning3["count_waits"] = case.count_waits
    if case.bwd_parts_joined is not None:
        tuning3["bwd_parts_joined"] = case.bwd_parts_joined
    try:
        yield
    finally:
        tuning["design"], tuning2["wpp"] = saved, saved2
        tuning3.update(saved3)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def case_to_json(case: StaticCase) -> dict:
    """A case as plain JSON data (for the suite's subprocesses: JSON, never pickle)."""
    return dataclasses.asdict(case)


def case_from_json(data: dict) -> StaticCase:
    """The inverse of :func:`case_to_json` (JSON lists back to the tuples of the dataclass)."""
    return StaticCase(**{k: _tuples(v) for k, v in data.items()})
