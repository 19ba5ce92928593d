"""Test set-up: Triton kernels run on the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen():
    """A fresh, unseeded-by-the-test generator: every test run draws new inputs.

    The seed is printed on failure (pytest shows captured stdout), so a failure can be replayed
    with FASTNMF_TEST_SEED=<seed>.
    """
    seed = int(os.environ.get("FASTNMF_TEST_SEED", torch.randint(0, 2**31 - 1, ()).item()))
    print(f"FASTNMF_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff if scale == 0 else diff / scale


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A private FASTNMF_CACHE holding the 4-case 32³ demo set, set for the module's tests (a
    fresh folder per module, so that no module sees what another wrote) and restored after."""
    from fastnmf import data

    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("FASTNMF_CACHE")
    os.environ["FASTNMF_CACHE"] = str(root)
    try:
        data.make_demo(n_cases=4, size=32)
        yield root
    finally:
        if old is None:
            os.environ.pop("FASTNMF_CACHE", None)
        else:
            os.environ["FASTNMF_CACHE"] = old
