"""Matricize / dematricize: exact inverses in every mode, and the production layout
(fastnmf.layout) equal to the oracle's (fastnmf.reference) element for element."""

import pytest
import torch

from fastnmf import layout, reference

CASES = [
    ((2, 8, 8, 12, 16), 4, 4),
    ((1, 16, 16, 8, 8), 8, (8, 4, 2)),
    ((2, 8, 6, 10, 4), 8, None),
    ((3, 4, 8, 12), 4, 4),
    ((1, 8, 6, 10), 2, None),
    ((1, 8, 6, 10), 2, (3, 5)),
]
SHIFTS = [None, 1, (2, 3, 5)]


def _shift(shift, ndim):
    return shift if shift is None or isinstance(shift, int) else shift[:ndim]


@pytest.mark.parametrize("shape,head_dim,patch", CASES)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("impl", [reference, layout], ids=["reference", "layout"])
def test_round_trip_exact(gen, shape, head_dim, patch, shift, impl):
    x = torch.randn(*shape, generator=gen)
    spatial, dims = shape[2:], tuple(range(2, len(shape)))
    table = layout.shift_table if impl is layout else reference.shifts_as_tuples
    (s,) = table([_shift(shift, len(spatial))], len(spatial))
    rolled = torch.roll(x, s, dims)
    mats = impl.matricize(rolled, head_dim, patch)  # (B, H, nw, E, N)
    assert mats.shape[:2] == (shape[0], shape[1] // head_dim)
    assert mats.shape[2] == impl.window_count(spatial, patch)
    assert mats.shape[3] == head_dim
    back = torch.roll(impl.dematricize(mats, spatial, patch), tuple(-v for v in s), dims)
    assert torch.equal(back, x)


@pytest.mark.parametrize("shape,head_dim,patch", CASES)
def test_layout_equals_oracle(gen, shape, head_dim, patch):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    spatial = shape[2:]
    mats = layout.matricize(x, head_dim, patch)  # (B, H, nw, E, N)
    assert torch.equal(mats, reference.matricize(x, head_dim, patch))
    m = torch.randn(mats.shape, generator=gen, dtype=torch.float64)
    assert torch.equal(
        layout.dematricize(m, spatial, patch), reference.dematricize(m, spatial, patch)
    )
    assert layout.window_count(spatial, patch) == reference.window_count(spatial, patch)


@pytest.mark.parametrize("ndim", [2, 3])
def test_shift_table_equals_oracle(ndim):
    for shifts in (None, [None], [None, 2], [None, 1, (1, 2, 3)[:ndim]], [(0,) * ndim, 4]):
        assert layout.shift_table(shifts, ndim) == reference.shifts_as_tuples(shifts, ndim)


def test_padded_shift_table_is_3d_and_reduced():
    assert layout.padded_shift_table([None, 5, (-1, 9)], (4, 8)) == [
        (0, 0, 0),
        (0, 1, 5),
        (0, 3, 1),
    ]


def test_window_content_is_a_box_of_one_head():
    x = torch.arange(2 * 8 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 8, 4, 4, 4)
    # batch 1, head 1 (channels 4..7), window (0, 1, 1) (third window index 0*4 + 1*2 + 1 = 3)
    want = x[1, 4:8, 0:2, 2:4, 2:4].reshape(4, 8)
    for impl in (reference, layout):
        mats = impl.matricize(x, 4, 2)  # (2, 2, 8, 4, 8)
        assert torch.equal(mats[1, 1, 3], want)
