"""kernel="triton" for rank R > 1 against the float64 reference (the literal MU / HALS loop).

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py);
with one, the same tests run on CUDA tensors (the CPU variant is skipped there). Volumes are tiny:
the interpreter pays per program and per operation.
"""

import pytest
import torch
from conftest import DEVICES, check_fp32, rel_err
from kernel_helpers import fp32_against_reference, nmf_inputs, run_grad

import fastnmf

WINDOW_CASES = [
    # shape, head_dim, patch, shifts, solver, rank, iters, zero_windows
    ((1, 4, 8, 8, 4), 4, 4, None, "hals", 2, 5, False),  # local 3D
    ((1, 4, 8, 8, 8), 4, 4, None, "mu", 3, 1, True),  # local 3D, degenerate
    ((2, 4, 8, 8, 4), 4, 4, [None, 2], "mu", 3, 5, True),  # swin 3D, batch 2, non-cubic
    ((1, 4, 8, 8, 4), 4, 4, [None, 2], "hals", 3, 5, True),  # swin 3D, degenerate
    ((1, 8, 4, 8, 4), 4, 4, [None, 1, 2, 3], "hals", 3, 1, False),  # four shifts, two heads
    ((1, 8, 8, 8, 8), 8, 8, [None, 4], "hals", 2, 5, True),  # P = 8 (512 columns), E = 8
    ((1, 4, 8, 8, 4), 4, (4, 2, 4), [None, (1, 1, 2)], "mu", 2, 5, False),  # anisotropic
    ((2, 4, 4, 8), 4, 4, [None, 2], "hals", 2, 5, True),  # swin 2D, batch 2, non-square
    ((1, 8, 16, 8), 8, 8, [None, 2, 4, 6], "mu", 2, 5, False),  # 2D, four shifts
    ((1, 4, 12, 8), 4, (4, 2), None, "hals", 3, 1, False),  # 2D local, anisotropic
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,head_dim,patch,shifts,solver,rank,iters,zero", WINDOW_CASES)
def test_window_rank_matches_reference(gen, device, shape, head_dim, patch, shifts, solver,
                                       rank, iters, zero):  # fmt: skip
    x, v0, dy = nmf_inputs(gen, shape, patch, rank=rank, zero_windows=zero)
    kw = dict(head_dim=head_dim, patch_size=patch, shifts=shifts, solver=solver, iters=iters)
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, **kw)
    # (on about 1 % of random draws of these cases the oracle in fp32 misses 1e-4 itself)
    check_fp32(dx, dx_ref, 1e-4,
               lambda: run_grad("reference", x, v0, dy, torch.float32, "cpu", **kw)[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_window_rank_u0_with_zeros(gen, device, solver):
    """An explicit u0 with a zero entry (MU keeps it at zero; HALS does not)."""
    x, v0, dy = nmf_inputs(gen, (1, 4, 4, 8, 4), 4, rank=2, zero_windows=True)
    u0 = torch.rand(4, 2, generator=gen, dtype=torch.float64)
    u0[1, 0] = 0
    kw = dict(head_dim=4, patch_size=4, shifts=[None, 2], solver=solver, iters=2)
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", u0=u0, **kw)
    y, dx = run_grad("triton", x, v0, dy, torch.float32, device, u0=u0, **kw)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(dx, dx_ref) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_window_rank_float64(gen, device):
    x, v0, dy = nmf_inputs(gen, (1, 4, 4, 8, 4), 4, rank=3, zero_windows=True)
    kw = dict(head_dim=4, patch_size=4, shifts=[None, 2], solver="hals", iters=2)
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    y, dx = run_grad("triton", x, v0, dy, torch.float64, device, **kw)
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(dx, dx_ref) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_window_rank_all_zero_gives_zero(device, solver):
    x = -torch.ones(1, 4, 4, 8, 4, device=device, requires_grad=True)
    v0 = torch.rand(64, 2, device=device)
    y = fastnmf.matricized_nmf(x, v0, head_dim=4, window=4, shifts=[None, 2], solver=solver,
                               kernel="triton")  # fmt: skip
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("device", DEVICES)
def test_window_rank_deterministic(gen, device):
    x, v0, dy = nmf_inputs(gen, (1, 4, 4, 8, 4), 4, rank=2, zero_windows=True)
    kw = dict(head_dim=4, patch_size=4, shifts=[None, 1, 2, 3], solver="hals", iters=2)
    runs = [run_grad("triton", x, v0, dy, torch.float32, device, **kw) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


GLOBAL_CASES = [
    # shape, head_dim, shifts, solver, iters, zero
    ((2, 8, 6, 10, 4), 4, None, "hals", 5, True),  # global 3D, degenerate
    ((1, 8, 4, 6, 8), 8, [None, 2], "mu", 5, False),  # with shifts
    ((2, 8, 6, 10), 4, [None, (1, 3), (2, 5), 4], "hals", 1, False),  # 2D, four shifts
    ((1, 4, 6, 10), 4, [None, 2], "mu", 1, True),  # 2D, degenerate
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,head_dim,shifts,solver,iters,zero", GLOBAL_CASES)
def test_global_rank_forward_matches_reference(gen, device, shape, head_dim, shifts, solver,
                                               iters, zero):  # fmt: skip
    x, v0, _ = nmf_inputs(gen, shape, None, rank=2, zero_windows=zero)
    kw = dict(head_dim=head_dim, patch_size=None, shifts=shifts, solver=solver, iters=iters)
    y_ref = fastnmf.matricized_nmf(x, v0, kernel="reference", **kw)
    with torch.no_grad():
        runs = [
            fastnmf.matricized_nmf(
                x.float().to(device), v0.float().to(device), kernel="triton", **kw
            ).cpu()  # fmt: skip
            for _ in range(2)
        ]
    assert runs[0].dtype == torch.float32 and runs[0].shape == x.shape
    assert rel_err(runs[0], y_ref) <= 1e-5
    assert torch.equal(runs[0], runs[1])  # deterministic


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["hals", "mu"])
@pytest.mark.parametrize("rank", [2, 3])
def test_plain_nmf_rank(gen, device, solver, rank):
    x = torch.rand(3, 2, 6, 50, generator=gen, dtype=torch.float64)
    x[0, 1, :, 7] = 0  # a zero column
    v0 = torch.rand(50, rank, generator=gen, dtype=torch.float64)
    u0 = torch.rand(6, rank, generator=gen, dtype=torch.float64)
    u0[2, 0] = 0
    ref = fastnmf.nmf(x, v0, u0=u0, solver=solver, kernel="reference")
    y = fastnmf.nmf(x.float().to(device), v0.float().to(device), u0=u0.float().to(device),
                    solver=solver, kernel="triton")  # fmt: skip
    assert rel_err(y.cpu(), ref) <= 1e-5


def test_global_rank_backward_not_implemented(gen):
    x = torch.randn(1, 8, 4, 4, 4, generator=gen, requires_grad=True)
    with pytest.raises(NotImplementedError, match="kernel='torch'"):
        fastnmf.matricized_nmf(x, torch.rand(64, 2), head_dim=4, kernel="triton")
    with pytest.raises(NotImplementedError, match="kernel='torch'"):
        fastnmf.nmf(torch.rand(2, 4, 9, requires_grad=True), torch.rand(9, 2), kernel="triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_window_rank_low_precision(gen, device, dtype):
    """Low-precision in and out, fp32 inside: only the output rounding differs from float64."""
    x, v0, dy = nmf_inputs(gen, (1, 4, 4, 8, 4), 4, rank=2)
    x, v0, dy = (t.to(dtype).double() for t in (x, v0, dy))  # exactly representable inputs
    kw = dict(head_dim=4, patch_size=4, shifts=[None, 2], solver="hals", iters=2)
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    y, dx = run_grad("triton", x, v0, dy, dtype, device, **kw)
    assert y.dtype == dtype and dx.dtype == dtype
    eps = torch.finfo(dtype).eps
    assert rel_err(y, y_ref) <= 2 * eps and rel_err(dx, dx_ref) <= 2 * eps


def test_window_rank_rejects_too_large_tiles(gen):
    x = torch.randn(1, 32, 8, 8, 8, generator=gen)
    with pytest.raises(ValueError, match="too large.*kernel='torch'"):
        fastnmf.matricized_nmf(x, torch.rand(512, 8), head_dim=32, window=8, kernel="triton")
