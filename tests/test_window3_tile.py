"""The third design's forward parts pass on a whole ticket at once (kernels/_window3_tile.py):
which cases take it (``tile_plan``), and its results against the float64 oracle and against the
per-window parts pass, under the interpreter (CPU) or on a GPU."""

import importlib

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICES, rel_err
from kernel_helpers import (
    check_low_precision,
    count_calls,
    design3_pipeline,
    fp32_against_reference,
    nmf_inputs,
    run_grad,
    training_forward,
)

sched = importlib.import_module("fastnmf.kernels._window3_sched")
tile = importlib.import_module("fastnmf.kernels._window3_tile")
store = importlib.import_module("fastnmf.kernels._window3_tile_store")
bwd_tile = importlib.import_module("fastnmf.kernels._window3_bwd_tile")
bwd_parts = importlib.import_module("fastnmf.kernels._window3_bwd_parts_tile")
out_tile = importlib.import_module("fastnmf.kernels._window3_out_tile")
nmf3 = importlib.import_module("fastnmf.kernels.window_nmf3")


@pytest.fixture
def tile_on(monkeypatch):
    """The tile on (``_window3_sched.TUNING["tile"]``; on by default too: ``_TILE``)."""
    monkeypatch.setitem(sched.TUNING, "tile", True)


def _plan(shape, head_dim, patch, shifts, mu=False):
    """(tile_plan, merges) of the forward as the launcher computes them."""
    geo, pipe = design3_pipeline(shape, head_dim, patch, shifts, ring=True)
    dot = geo.dot(tl.float32, mu)
    return tile.tile_plan(geo, dot, pipe.wpp, pipe.warps()), pipe.merges(dot["DOT"])


def test_tile_plan_takes_the_static_suites_shapes(tile_on, monkeypatch):
    """8^3 windows, E = 8, tickets of 4: [None, 2, 4, 6] has 64 sub-boxes of 2^3 (axis 0's in the
    rows, ROWS0), [None, 4] 16 in the dot; MU (no matrix form), more than 32 values a thread
    (E = 16) or TUNING["tile"] = False take the per-window pass."""
    brats, merges = _plan((1, 8, 16, 8, 32), 8, 8, [None, 2, 4, 6])  # 4 shifts: X g0 joined
    assert brats == dict(TILE=True, TD0=2, TD1=2, TD2=2, ROWS0=True, XG0F=True,
                         XG0J=True) and merges  # fmt: skip
    four, _ = _plan((1, 8, 16, 8, 32), 8, 8, [None, 4])
    last = tile._XG0_LAST_FLAT
    assert four == dict(TILE=True, TD0=2, TD1=4, TD2=4, ROWS0=False, XG0F=not last,
                        XG0J=False)  # fmt: skip
    monkeypatch.setitem(sched.TUNING, "xg0_joined", False)  # the knob wins either way
    assert not _plan((1, 8, 16, 8, 32), 8, 8, [None, 2, 4, 6])[0]["XG0J"]
    monkeypatch.setitem(sched.TUNING, "xg0_joined", True)
    assert _plan((1, 8, 16, 8, 32), 8, 8, [None, 4])[0]["XG0J"]
    monkeypatch.setitem(sched.TUNING, "xg0_joined", None)
    monkeypatch.setattr(tile, "_XG0_LAST_FLAT", not last)  # X g0 last: no ROWS0, by the compiler
    assert _plan((1, 8, 16, 8, 32), 8, 8, [None, 4])[0]["XG0F"] == last
    assert _plan((1, 8, 16, 8, 32), 8, 8, [None, 2, 4, 6])[0]["XG0F"]
    assert not _plan((1, 8, 16, 8, 32), 8, 8, [None, 2, 4, 6], mu=True)[0]["TILE"]
    assert not _plan((1, 16, 16, 8, 32), 16, 8, [None, 4])[0]["TILE"]
    monkeypatch.setitem(sched.TUNING, "tile", False)
    assert not _plan((1, 8, 16, 8, 32), 8, 8, [None, 4])[0]["TILE"]
    monkeypatch.setitem(sched.TUNING, "tile", None)  # the default
    assert _plan((1, 8, 16, 8, 32), 8, 8, [None, 4])[0]["TILE"] == sched._TILE


TILE_CASES = [
    # shape, head_dim, shifts, ROWS0, merges: 8^3 windows with the BraTS shifts (axis 0's
    # sub-boxes as rows), rows of 4 windows along axis 2 (merged); rows of 3 (a ticket of 3
    # windows, the fourth masked; no merge), E = 6 (channels past E in the high half masked)
    ((1, 4, 16, 8, 32), 4, [None, 2, 4, 6], True, True),
    ((1, 4, 16, 8, 24), 4, [None, 2, 4, 6], True, False),
    ((1, 6, 16, 8, 32), 6, [None, (4, 2, 6)], True, True),
    # [None, 4]: the sub-boxes of axes 0-2 all in the dot (no ROWS0), merged along axis 2
    ((1, 8, 16, 8, 32), 8, [None, 4], False, True),
    # E = 5 of BLOCK_E = 8 (2 heads): the Gram units' products of channels past E masked
    ((1, 10, 16, 8, 32), 5, [None, 4], False, True),
]
# without ROWS0 each order of X g0 and the Gram (``_XG0_LAST_FLAT``: by the compiler)
TILE_ORDERS = [(*case, first) for case in TILE_CASES
               for first in ((True,) if case[3] else (True, False))]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eax", [0, 1])
@pytest.mark.parametrize("shape,head_dim,shifts,rows0,merges,xg0_first", TILE_ORDERS)
def test_tile_parts_match_reference(gen, design3, tile_on, monkeypatch, device, eax, shape,
                                    head_dim, shifts, rows0, merges, xg0_first):  # fmt: skip
    """The tile's forward (and the backward from its saved K and h) against the float64 oracle;
    the per-window pass's forward too (E = 6 with merging: the per-window merged pass once added
    the last X g0 carry twice where E < BLOCK_E). That the tile ran: under the interpreter its
    calls are counted; compiled, with ROWS0 its sums differ from the per-window pass's in the last
    bits (with [None, 4] they come out bit for bit the same). With x loaded channels first
    (EAX = 0, Triton 3.9's way) and channels fifth (EAX = 1, 3.6's: ``_E_AXIS``), whichever
    Triton runs the test. Without ROWS0, X g0 before and after the Gram."""
    monkeypatch.setattr(bwd_tile, "_E_AXIS", eax)
    monkeypatch.setattr(tile, "_XG0_LAST_FLAT", not xg0_first)
    plan, merged = _plan(shape, head_dim, 8, shifts)
    assert plan["TILE"] and plan["ROWS0"] == rows0 and merged == merges
    assert plan["XG0F"] == xg0_first
    calls = []
    if device == "cpu":  # the interpreter calls the tile as Python: count the calls
        real = nmf3._parts_tile
        monkeypatch.setattr(nmf3, "_parts_tile", lambda *a: calls.append(1) or real(*a))
    x, v0, dy = nmf_inputs(gen, shape, 8, zero_windows=True)
    kw = dict(head_dim=head_dim, patch_size=8, shifts=shifts, solver="hals")
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    y_tile, dx = run_grad("triton", x, v0, dy, torch.float32, device, **kw)
    assert rel_err(y_tile, y_ref) <= 1e-5 and rel_err(dx, dx_ref) <= 1e-4
    assert calls or device != "cpu", "the tile did not run"
    monkeypatch.setitem(sched.TUNING, "tile", False)
    y_window = training_forward(x, v0, device, **kw)
    assert rel_err(y_window, y_ref) <= 1e-5
    assert device == "cpu" or not rows0 or not torch.equal(y_tile, y_window)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,head_dim,shifts", [
    ((1, 4, 16, 8, 32), 4, [None, 2, 4, 6]),  # ROWS0, merged: a product a channel half
    ((1, 6, 16, 8, 32), 6, [None, (4, 2, 6)]),  # E = 6: the high half's channels past E masked
    ((1, 10, 16, 8, 32), 5, [None, 4]),  # no ROWS0: both halves in one product, E = 5 of 8
])  # fmt: skip
def test_tile_xg0_joined_matches_reference(gen, design3, tile_on, monkeypatch, device, shape,
                                           head_dim, shifts):  # fmt: skip
    """X g0 with every shift's sub-box sums along one product's contraction
    (``TUNING["xg0_joined"]``, ``_tile_xg0_joined``): the forward and the backward from its saved
    statistics against the float64 oracle, at the tile test's tolerances."""
    monkeypatch.setitem(sched.TUNING, "xg0_joined", True)
    assert _plan(shape, head_dim, 8, shifts)[0]["XG0J"]
    calls = count_calls(monkeypatch, tile, "_tile_xg0_joined", device)
    x, v0, dy = nmf_inputs(gen, shape, 8, zero_windows=True)
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, head_dim=head_dim, patch_size=8,
                                        shifts=shifts, solver="hals")  # fmt: skip
    assert rel_err(dx, dx_ref) <= 1e-4
    assert calls or device != "cpu", "the joined X g0 did not run"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_tile_low_precision(gen, design3, tile_on, device, dtype):
    """fp16 / bf16 x through the tile (its loads: runs of 4 voxels, 8 bytes) and the other three
    tiles (on by default): within 2x the reference's own error at that dtype, plus an atol
    (``check_low_precision``)."""
    shape, shifts = (1, 4, 16, 8, 32), [None, 2, 4, 6]
    assert _plan(shape, 4, 8, shifts)[0]["TILE"]
    geo, pipe = design3_pipeline(shape, 4, 8, shifts, dtype)
    plans = [f(geo, False, dtype, pipe.wpp, pipe.warps()) for f in
             (out_tile.out_tile_plan, bwd_tile.bwd_tile_plan, bwd_parts.bwd_parts_plan)]
    assert [p[k] for p, k in zip(plans, ("OTILE", "BTILE", "PTILE"), strict=True)] == [True] * 3
    x, v0, dy = nmf_inputs(gen, shape, 8)
    check_low_precision(x, v0, dy, dtype, device, head_dim=4, patch_size=8,
                        shifts=shifts)  # fmt: skip


@triton.jit
def _units_kernel(out_ptr, H: tl.constexpr):
    """For unit d, rows (H slots) of out[d - 1]: the least and most of each of its two factors over
    the tile's 16 voxels, the voxel taken off (x = 16 channel + voxel: 16 times the channel on
    every voxel unless a factor mixed voxels), then the two channels ``_unit_channels`` names."""
    v = (tl.arange(0, 2)[None, :, None, None, None] * 8 + tl.arange(0, 2)[None, None, :, None, None]
         * 4 + tl.arange(0, 2)[None, None, None, :, None] * 2
         + tl.arange(0, 2)[None, None, None, None, :])  # fmt: skip
    x = tl.arange(0, H)[:, None, None, None, None] * 16 + v
    s = tl.arange(0, H)
    for d in tl.static_range(1, 2 * H):
        f, g = tile._gram_unit(x, x + 16 * H, d)
        f = tl.reshape(f - v, (H, 16))
        g = tl.reshape(g - v, (H, 16))
        c, c2 = tile._unit_channels(s, d, H)
        row = out_ptr + (d - 1) * 6 * H + s
        tl.store(row, tl.min(f, axis=1))
        tl.store(row + H, tl.max(f, axis=1))
        tl.store(row + 2 * H, tl.min(g, axis=1))
        tl.store(row + 3 * H, tl.max(g, axis=1))
        tl.store(row + 4 * H, c)
        tl.store(row + 5 * H, c2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("half", [1, 2, 4, 8])
def test_gram_units_cover_the_triangle_once(device, half):
    """The units past the squares, d = 1 .. 2H - 1: every pair c < c' of the 2H channels exactly
    once (with the squares, the whole upper triangle), each unit's factors on every voxel of the
    tile the channels that ``_unit_channels`` names (the store rows)."""
    out = torch.full((2 * half - 1, 6, half), -1, dtype=torch.int32, device=device)
    _units_kernel[(1,)](out, H=half)
    f_lo, f_hi, g_lo, g_hi, c, c2 = out.cpu().unbind(1)
    assert torch.equal(f_lo, 16 * c) and torch.equal(f_hi, 16 * c)
    assert torch.equal(g_lo, 16 * c2) and torch.equal(g_hi, 16 * c2)
    assert bool((c < c2).all())
    pairs = sorted(zip(c.flatten().tolist(), c2.flatten().tolist(), strict=True))
    assert pairs == [(a, b) for a in range(2 * half) for b in range(a + 1, 2 * half)]


@triton.jit
def _prev_tree_kernel(x_ptr, out_ptr, N: tl.constexpr, LOG: tl.constexpr):
    """``_last_two`` applied as a GPU scan applies it: in a tree, each step combining the prefix
    that ends 2^d rows earlier (many rows) with this row's (as many), not one row at a time as the
    interpreter's scan does."""
    i = tl.arange(0, N)
    v = tl.load(x_ptr + i)
    f = tl.zeros([N], dtype=tl.int32)
    p = tl.zeros([N], dtype=tl.float32)
    for d in tl.static_range(LOG):
        src = i - (1 << d)
        ok = src >= 0
        src = tl.where(ok, src, 0)
        fa, pa, va = tl.gather(f, src, 0), tl.gather(p, src, 0), tl.gather(v, src, 0)
        f2, p2, v2 = store._last_two(fa, pa, va, f, p, v)
        f, p, v = tl.where(ok, f2, f), tl.where(ok, p2, p), tl.where(ok, v2, v)
    tl.store(out_ptr + i, p)
    tl.store(out_ptr + N + i, _prev_rows_of(x_ptr, N))


@triton.jit
def _prev_rows_of(x_ptr, N: tl.constexpr):
    """``_prev_row`` of the rows x (N / 4 channels of 4 windows, 2 columns)."""
    r = tl.arange(0, N)
    t = tl.load(x_ptr + r)[:, None] + tl.zeros([N, 2], dtype=tl.float32)
    return tl.max(store._prev_row(t, 4), axis=1)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_takes_the_previous_windows_row(device):
    """The merge's row shift (``_prev_row``): the combine is associative (a tree of steps, as a
    GPU's scan runs it, gives every row its predecessor: it fails if a combined run's "has two"
    flag is not set), and the scan along the window axis gives window j window j - 1's row of the
    same channel (window 0: zeros)."""
    n = 16
    x = torch.arange(1, n + 1, dtype=torch.float32, device=device)
    out = torch.empty(2 * n, dtype=torch.float32, device=device)
    _prev_tree_kernel[(1,)](x, out, N=n, LOG=4)
    tree, rows = out.cpu().split(n)
    assert torch.equal(tree, torch.cat([torch.zeros(1), x.cpu()[:-1]]))
    prev = x.cpu().view(n // 4, 4).roll(1, dims=1)
    prev[:, 0] = 0
    assert torch.equal(rows, prev.flatten())
