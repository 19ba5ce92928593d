"""Matricize / dematricize are exact inverses in every mode."""

import pytest
import torch

from fastnmf import reference


@pytest.mark.parametrize(
    "shape,head_dim,patch",
    [
        ((2, 8, 8, 12, 16), 4, 4),
        ((1, 16, 16, 8, 8), 8, (8, 4, 2)),
        ((2, 8, 6, 10, 4), 8, None),
        ((3, 4, 8, 12), 4, 4),
        ((1, 8, 6, 10), 2, None),
        ((1, 8, 6, 10), 2, (3, 5)),
    ],
)
@pytest.mark.parametrize("shift", [None, 1, (2, 3, 5)])
def test_round_trip_exact(gen, shape, head_dim, patch, shift):
    x = torch.randn(*shape, generator=gen)
    spatial, dims = shape[2:], tuple(range(2, len(shape)))
    (s,) = reference.shifts_as_tuples(
        [shift if shift is None or isinstance(shift, int) else shift[: len(spatial)]], len(spatial)
    )
    rolled = torch.roll(x, s, dims)
    mats = reference.matricize(rolled, head_dim, patch)  # (B, H, nw, E, N)
    assert mats.shape[:2] == (shape[0], shape[1] // head_dim)
    assert mats.shape[2] == reference.window_count(spatial, patch)
    assert mats.shape[3] == head_dim
    back = torch.roll(reference.dematricize(mats, spatial, patch), tuple(-v for v in s), dims)
    assert torch.equal(back, x)


def test_window_content_is_a_box_of_one_head():
    x = torch.arange(2 * 8 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 8, 4, 4, 4)
    mats = reference.matricize(x, 4, 2)  # (2, 2, 8, 4, 8)
    # batch 1, head 1 (channels 4..7), window (0, 1, 1) (third window index 0*4 + 1*2 + 1 = 3)
    want = x[1, 4:8, 0:2, 2:4, 2:4].reshape(4, 8)
    assert torch.equal(mats[1, 1, 3], want)
