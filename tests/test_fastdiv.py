"""Division by run-time divisors through magic numbers (kernels/_fastdiv.py): the host's magic
numbers are exact for every 31-bit numerator, the kernels' helpers agree with ``//`` and ``%``,
and the persistent kernels take one magic number per divisor they use."""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

fastdiv = importlib.import_module("fastnmf.kernels._fastdiv")
sched = importlib.import_module("fastnmf.kernels._window3_sched")
common = importlib.import_module("fastnmf.kernels._window2_common")
wn3 = importlib.import_module("fastnmf.kernels.window_nmf3")
bwd3 = importlib.import_module("fastnmf.kernels._window3_bwd")

_fdivmod = fastdiv._fdivmod
_MAGIC_3 = fastdiv.MAGIC_3
_TOP = 2**31 - 1  # the largest numerator (and divisor)


def _numerators(rng: np.random.Generator, d: int) -> np.ndarray:
    """Random 31-bit numerators and the edges: 0, 1, around d and its multiples, the top."""
    edges = [0, 1, d - 1, d, d + 1, 2 * d - 1, 2 * d, _TOP - 1, _TOP, _TOP - _TOP % d,
             _TOP - _TOP % d - 1]  # fmt: skip
    n = np.concatenate([rng.integers(0, _TOP, 4000, endpoint=True), np.array(edges)])
    return n[(n >= 0) & (n <= _TOP)].astype(np.uint64)


def _quotient(n: np.ndarray, packed: int) -> np.ndarray:
    """The kernels' arithmetic in numpy: umulhi(2 n, m) >> l (uint64: 2 n m < 2^64)."""
    mult, shift = np.uint64(packed >> 8), np.uint64(packed & 255)
    return (((n * np.uint64(2)) * mult) >> np.uint64(32)) >> shift


def _divisors() -> list[int]:
    small = list(range(1, 2049))
    powers = [2**k + o for k in range(11, 31) for o in (-1, 0, 1)]
    return small + powers + [3 * 5 * 7 * 11 * 13 * 17, 10**9 + 7, _TOP - 1, _TOP]


def test_magic_numbers_are_exact_for_every_31_bit_numerator():
    """floor(n / d) for d in 1..2048, around every power of two up to 2^31 and a few large ones,
    at 4000 random numerators each and the edges (the theorem in kernels/_fastdiv.py)."""
    rng = np.random.default_rng(0)
    for d in _divisors():
        packed = fastdiv.magic(d)
        assert 2**39 <= packed < 2**40, d  # always typed int64 by Triton
        n = _numerators(rng, d)
        np.testing.assert_array_equal(_quotient(n, packed), n // np.uint64(d), err_msg=str(d))


@pytest.mark.parametrize("bad", [0, -3, 2**31, 2.0, True, "8"])
def test_magic_rejects_divisors_it_cannot_serve(bad):
    with pytest.raises(ValueError, match=r"divisor must be an int in \[1, 2\^31 - 1\]"):
        fastdiv.magic(bad)


@triton.jit
def _divmod_kernel(n_ptr, q_ptr, r_ptr, q3_ptr, r3_ptr, N, D, MAG, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    n = tl.load(n_ptr + i, mask=i < N, other=0)
    q, r = _fdivmod(n, D, MAG)  # a tensor numerator, a run-time divisor
    tl.store(q_ptr + i, q, mask=i < N)
    tl.store(r_ptr + i, r, mask=i < N)
    q3, r3 = _fdivmod(n, 3, _MAGIC_3)  # a compile-time magic number
    tl.store(q3_ptr + i, q3, mask=i < N)
    tl.store(r3_ptr + i, r3, mask=i < N)


@pytest.mark.parametrize("d", [1, 2, 3, 7, 16, 255, 4096, 12345, 2**20 + 3, _TOP])
def test_kernel_divmod_matches_floor_division(d):
    rng = np.random.default_rng(d)
    n = torch.from_numpy(_numerators(rng, d)[:1000].astype(np.int32))
    out = [torch.full_like(n, -1) for _ in range(4)]
    _divmod_kernel[(1,)](n, *out, n.numel(), d, fastdiv.magic(d), BLOCK=1024)
    wide = n.to(torch.int64)
    for got, want in zip(out, (wide // d, wide % d, wide // 3, wide % 3), strict=True):
        assert torch.equal(got.to(torch.int64), want)


@triton.jit
def _origin_kernel(w_ptr, out_ptr, N, NW0, NW1, NW2, MW2, MW12, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + i, mask=i < N, other=0)
    plane = w // (NW1 * NW2)  # the planes along axis 0 (where NW0 > 1)
    if NW0 == 1:
        plane = tl.where(NW1 > 1, w // NW2, w)  # along axis 1, else 2
    # the third design's form (the plane's coordinate), then the second's (w // (NW1 NW2))
    w0, w1, w2 = common._window_origin(w, NW1, NW2, MW2, common._plane_w0(plane, NW0))
    v0, v1, v2 = common._window_origin(w, NW1, NW2, MW2, fastdiv._fdiv(w, MW12))
    for k, v in enumerate((w0, w1, w2, v0, v1, v2)):
        tl.store(out_ptr + k * BLOCK + i, v, mask=i < N)


@pytest.mark.parametrize("nw", [(16, 16, 16), (3, 5, 7), (1, 1, 9), (2, 1, 1), (6, 4, 12),
                                (1, 5, 3), (1, 4, 1)])
def test_window_origin_with_magic_numbers(nw):
    """Every window of odd and unit grids: the grid coordinates from NW2's magic number and the
    window's coordinate along axis 0, taken from its plane (the third design) or from NW1 NW2's
    magic number (the second)."""
    total = nw[0] * nw[1] * nw[2]
    block = triton.next_power_of_2(total)
    w = torch.arange(total, dtype=torch.int32)
    out = torch.full((6, block), -1, dtype=torch.int32)
    _origin_kernel[(1,)](w, out, total, *nw, fastdiv.magic(nw[2]), fastdiv.magic(nw[1] * nw[2]),
                         BLOCK=block)  # fmt: skip
    want = np.stack(np.unravel_index(np.arange(total), nw))
    np.testing.assert_array_equal(out[:3, :total].numpy(), want)
    np.testing.assert_array_equal(out[3:, :total].numpy(), want)


def test_pipeline_passes_one_magic_number_per_divisor_the_kernels_take(monkeypatch):
    """``Pipeline.magic`` names exactly the kernels' unspecialised magic arguments, each the magic
    number of the divisor it stands for."""
    x = torch.zeros(2, 12, 8, 12, 20)
    geo = common._Geometry2(x, 4, (4, 4, 4), [None, (2, 2, 2)])
    pipe = sched.Pipeline(geo, sched.fused_plan(tuple(geo.NW), geo.shifts), x.device)
    got = pipe.magic(geo)
    assert tuple(got) == sched._MAGIC_ARGS
    divisors = {"MSPB": pipe.stages * pipe.cpp, "MCPP": pipe.cpp, "MHEADS": geo.heads,
                "MNPL1": max(pipe.npl - 1, 1), "MW2": geo.NW[2], "MGCPP": pipe.cpp}
    assert got == {name: fastdiv.magic(d) for name, d in divisors.items()}
    # with batch*heads side by side (GROUP of them): a group's tickets and a stage's
    monkeypatch.setitem(sched.TUNING, "group", 2)
    pipe = sched.Pipeline(geo, sched.fused_plan(tuple(geo.NW), geo.shifts), x.device)
    assert pipe.group == 2 and pipe.block(geo)["GROUP"] == 2
    got = pipe.magic(geo)
    assert got["MSPB"] == fastdiv.magic(2 * pipe.stages * pipe.cpp)
    assert got["MGCPP"] == fastdiv.magic(2 * pipe.cpp)
    for kernel in (wn3._fused_kernel, bwd3._fused_bwd_kernel):
        params = inspect.signature(kernel.fn).parameters
        assert set(sched._MAGIC_ARGS) <= set(params), kernel


def test_second_design_passes_the_magic_numbers_its_kernels_take():
    """``_Geometry2.magic`` names the window passes' and the solves' unspecialised magic
    arguments, each the magic number of its divisor (NW1 NW2, NW2, heads)."""
    wn2 = importlib.import_module("fastnmf.kernels.window_nmf2")
    bwd2 = importlib.import_module("fastnmf.kernels._window2_bwd")
    x = torch.zeros(2, 12, 8, 12, 20)
    geo = common._Geometry2(x, 4, (4, 4, 4), [None, (2, 2, 2)])
    divisors = {"MW12": 3 * 5, "MW2": 5, "MHEADS": 3}
    assert geo.magic() == {name: fastdiv.magic(d) for name, d in divisors.items()}
    assert tuple(geo.magic()) == common.MAGIC_PASS
    assert tuple(geo.magic(heads=False)) == common.MAGIC_SOLVE
    passes = (wn2._parts_kernel, wn2._apply_kernel, bwd2._parts_bwd_kernel,
              bwd2._apply_bwd_kernel2)  # fmt: skip
    for kernels, names in ((passes, common.MAGIC_PASS),
                           ((wn2._solve_kernel, bwd2._solve_bwd_kernel), common.MAGIC_SOLVE)):
        for kernel in kernels:
            params = inspect.signature(kernel.fn).parameters
            assert set(names) <= set(params), kernel
