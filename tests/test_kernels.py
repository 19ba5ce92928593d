"""kernel="triton" against the float64 reference.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set in conftest.py);
with one, the same tests run on CUDA tensors (the CPU variant is skipped there).
"""

import importlib

import pytest
import torch
from conftest import DEVICES, rel_err
from kernel_helpers import (
    check_low_precision,
    fp32_against_reference,
    nmf_inputs,
    run_grad,
    spy_on,
)

import fastnmf

CASES = [
    # shape, head_dim, patch, shifts, solver, iters, zero_windows
    ((1, 8, 8, 8, 8), 4, 4, None, "hals", 5, False),  # local 3D
    ((2, 8, 4, 8, 12), 4, 4, [None, 2], "mu", 5, True),  # swin 3D, non-cubic, degenerate
    ((1, 16, 8, 8, 8), 8, 4, [None, 1, 2, 3], "hals", 1, False),  # four shifts, E = 8
    ((1, 8, 8, 16, 8), 8, 8, [None, 4], "hals", 5, True),  # P = 8, C = E
    ((2, 8, 8, 8, 8), 8, 8, [None, 2, 4, 6], "mu", 1, False),  # the original BraTS shifts
    ((1, 8, 8, 8, 4), 4, (4, 2, 4), [None, (1, 1, 2)], "hals", 5, False),  # anisotropic
    ((2, 8, 8, 12), 4, 4, [None, 2], "hals", 5, True),  # swin 2D
    ((1, 8, 16, 8), 8, 8, [None, 2, 4, 6], "mu", 5, False),  # 2D, four shifts
    ((1, 4, 12, 8), 4, (4, 2), None, "hals", 1, False),  # 2D local, C = E
    ((2, 8, 6, 10, 4), 4, None, None, "hals", 5, True),  # global 3D
    ((1, 16, 4, 6, 8), 8, None, [None, 2], "mu", 5, False),  # global with shifts
    ((2, 8, 6, 10), 4, None, [None, (1, 3), (2, 5), 4], "hals", 1, False),  # global 2D, 4 shifts
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,head_dim,patch,shifts,solver,iters,zero", CASES)
def test_triton_fp32_matches_reference(gen, device, shape, head_dim, patch, shifts, solver,
                                       iters, zero):  # fmt: skip
    x, v0, dy = nmf_inputs(gen, shape, patch, zero_windows=zero)
    kw = dict(head_dim=head_dim, patch_size=patch, shifts=shifts, solver=solver, iters=iters)
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, **kw)
    assert rel_err(dx, dx_ref) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("design,patch,shifts,solver", [
    (1, 4, [None, 2], "hals"), (2, 4, [None, 2], "hals"), (2, 4, [None, 2], "mu"),
    (3, 4, [None, 2, 4, 6], "hals"), (1, None, None, "hals")])  # fmt: skip
def test_triton_head_dim_below_its_block(gen, device, design, patch, shifts, solver,
                                         monkeypatch):  # fmt: skip
    """E = 6 rows in blocks of 8 (every other test's E is a power of two): the rows past E are
    zeros (their loads masked) whatever the row mask holds there, which with HALS is all ones
    (kernels/_common._row_mask: no mask tensor)."""
    monkeypatch.setitem(importlib.import_module("fastnmf.kernels.window_nmf").TUNING, "design",
                        design)  # fmt: skip
    x, v0, dy = nmf_inputs(gen, (1, 12, 8, 8, 8), patch)
    kw = dict(head_dim=6, patch_size=patch, shifts=shifts, solver=solver)
    dx, dx_ref = fp32_against_reference(x, v0, dy, device, **kw)
    assert rel_err(dx, dx_ref) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("patch,shifts", [(4, [None, 2]), (None, None)])
def test_triton_low_precision(gen, device, dtype, patch, shifts):
    """Within 2x the reference's own error at that dtype, plus an atol."""
    x, v0, dy = nmf_inputs(gen, (1, 8, 8, 8, 8), patch)
    check_low_precision(x, v0, dy, dtype, device, head_dim=4, patch_size=patch, shifts=shifts)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_float64(gen, device):
    x, v0, dy = nmf_inputs(gen, (1, 4, 8, 8, 8), 4)
    kw = dict(head_dim=4, patch_size=4, shifts=[None, 2])
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    y, dx = run_grad("triton", x, v0, dy, torch.float64, device, **kw)
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(dx, dx_ref) <= 1e-12


_APPLY_KERNELS = (
    "_apply_fwd_kernel", "_apply_fwd_tile_kernel", "_apply_bwd_kernel", "_apply_bwd_tile_kernel"
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,patch,shifts,solver",
    [
        ((1, 4, 8, 8, 8), 4, [None, 2], "hals"),  # 2 x 2 x 2 tiles (one head: the others two)
        ((1, 8, 8, 16, 8), 8, [None, 4], "mu"),  # 4 x 4 x 4 tiles, MU masks
        ((1, 8, 8, 12), (4, 4), [None, (2, 2)], "hals"),  # 2D
    ],
)
def test_tiled_apply_matches_per_voxel_lookup(gen, design1, device, monkeypatch, shape, patch,
                                              shifts, solver):  # fmt: skip
    """The tiled apply kernels (one window lookup per tile) give what the per-voxel ones give
    (the first design's kernels)."""
    wn = importlib.import_module("fastnmf.kernels.window_nmf")
    launched = []
    spy_on(monkeypatch, wn, _APPLY_KERNELS, launched)
    x, v0, dy = nmf_inputs(gen, shape, patch)
    kw = dict(head_dim=4, patch_size=patch, shifts=shifts, solver=solver)
    x64 = x.to(torch.float64)
    monkeypatch.setattr(wn, "_MIN_TILE", 4)  # the GPU's threshold (the interpreter's is higher)
    tiled = run_grad("triton", x64, v0, dy, torch.float64, device, **kw)
    assert launched == ["_apply_fwd_tile_kernel", "_apply_bwd_tile_kernel"]
    monkeypatch.setattr(wn, "_MIN_TILE", 10**9)  # force the per-voxel lookup
    lookup = run_grad("triton", x64, v0, dy, torch.float64, device, **kw)
    assert launched[2:] == ["_apply_fwd_kernel", "_apply_bwd_kernel"]
    assert rel_err(tiled[0], lookup[0]) <= 1e-13 and rel_err(tiled[1], lookup[1]) <= 1e-13
    assert tiled[1].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,patch,solver",
    [((1, 4, 8, 8, 8), 4, "hals"), ((2, 8, 8, 4), (4, 2), "mu")],  # 3D; 2D with MU masks
)
def test_local_windows_fuse_the_output_pass(gen, device, monkeypatch, shape, patch, solver):
    """One shift: the stats kernels write y and dx; same result as the separate output pass."""
    wn = importlib.import_module("fastnmf.kernels.window_nmf")
    launched = []
    spy_on(monkeypatch, wn, _APPLY_KERNELS, launched)
    x, v0, dy = nmf_inputs(gen, shape, patch, zero_windows=True)
    kw = dict(head_dim=4, patch_size=patch, shifts=None, solver=solver)
    x64 = x.to(torch.float64)
    fused = run_grad("triton", x64, v0, dy, torch.float64, device, **kw)
    assert launched == []  # no output pass
    monkeypatch.setitem(wn.TUNING, "fuse", False)
    separate = run_grad("triton", x64, v0, dy, torch.float64, device, **kw)
    assert [n[:10] for n in launched] == ["_apply_fwd", "_apply_bwd"]  # an output pass ran
    assert rel_err(fused[0], separate[0]) <= 1e-13 and rel_err(fused[1], separate[1]) <= 1e-13
    y_ref, dx_ref = run_grad("reference", x64, v0, dy, torch.float64, "cpu", **kw)
    assert rel_err(fused[0], y_ref) <= 1e-12 and rel_err(fused[1], dx_ref) <= 1e-12


def test_geometry_is_built_once_per_sizes_dtype_and_tuning(monkeypatch):
    """``window_nmf.geometry`` (design 1, rank > 1): one geometry for the calls of one shape,
    dtype, head dim, window, shift list and TUNING; another when any differs (the dtype decides
    ``gram_dot``, TUNING the tiles), or the module values it reads (the interpreter's or the
    GPU's launch geometry, the tile threshold)."""
    from fastnmf.profile.static.counter import gpu_geometry

    wn = importlib.import_module("fastnmf.kernels.window_nmf")
    monkeypatch.setattr(wn, "_GEOMETRIES", {})
    x, shifts = torch.empty(1, 8, 8, 8, 8), [None, (2, 2, 2)]
    geo = wn.geometry(x, 4, (4, 4, 4), shifts)
    assert wn.geometry(torch.empty(1, 8, 8, 8, 8), 4, (4, 4, 4), [None, (2, 2, 2)]) is geo
    others = [wn.geometry(x.double(), 4, (4, 4, 4), shifts), wn.geometry(x, 4, (4, 4, 4), None),
              wn.geometry(x, 8, (4, 4, 4), shifts), wn.geometry(x, 4, (4, 4, 2), shifts)]
    with gpu_geometry():  # the module values the static suite's counter sets: the GPU's
        others.append(wn.geometry(x, 4, (4, 4, 4), shifts))
    monkeypatch.setattr(wn, "_MIN_TILE", 4)  # the GPU's (the interpreter's: 64)
    others.append(wn.geometry(x, 4, (4, 4, 4), shifts))
    monkeypatch.setitem(wn.TUNING, "gram", "dot")
    others.append(wn.geometry(x, 4, (4, 4, 4), shifts))
    assert all(g is not geo for g in others) and len({id(g) for g in others}) == len(others)
    assert others[-1].gram_dot and not geo.gram_dot and not others[0].gram_dot
    assert (others[-3].block_v, geo.block_v) == (128, 1024) and others[-2].tiled and not geo.tiled


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_by_dot_matches_broadcast_sum(gen, device, monkeypatch, dtype):
    """TUNING["gram"] = "dot" (tl.dot in the stats kernels, a tuning option) computes the same."""
    wn = importlib.import_module("fastnmf.kernels.window_nmf")
    x, v0, dy = nmf_inputs(gen, (1, 4, 8, 8, 8), 4)
    kw = dict(head_dim=4, patch_size=4, shifts=[None, 2], solver="mu")
    y_sum, dx_sum = run_grad("triton", x, v0, dy, dtype, device, **kw)
    monkeypatch.setitem(wn.TUNING, "gram", "dot")
    assert wn._Geometry(x.to(dtype), 4, (4, 4, 4), None).gram_dot
    y_dot, dx_dot = run_grad("triton", x, v0, dy, dtype, device, **kw)
    y64, dx64 = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    assert rel_err(y_dot, y64) <= 2 * rel_err(y_sum, y64) + 1e-6
    assert rel_err(dx_dot, dx64) <= 2 * rel_err(dx_sum, dx64) + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("patch", [4, None])
def test_triton_deterministic(gen, device, patch):
    x, v0, dy = nmf_inputs(gen, (1, 4, 8, 8, 8), patch)
    kw = dict(head_dim=4, patch_size=patch, shifts=[None, 2])
    runs = [run_grad("triton", x, v0, dy, torch.float32, device, **kw) for _ in range(3)]
    for y, dx in runs[1:]:
        assert torch.equal(y, runs[0][0]) and torch.equal(dx, runs[0][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,head_dim,shifts,solver,zero_g0", [
    ((1, 8, 6, 10, 9), 8, None, "hals", False),  # 540 columns: the last chunk 28 wide
    ((1, 16, 4, 6, 12), 8, [None, 2], "mu", True),  # MU with shifts: a K per shift
    ((2, 8, 20, 30), 4, [None, (1, 3), (2, 5), 4], "hals", False),  # 2D, four shifts
    ((1, 12, 6, 10, 9), 6, None, "mu", False),  # E = 6 in blocks of 8: rows past E masked
    ((1, 24, 6, 10, 9), 12, [None, 2], "mu", False),  # 12 rows: the backward's rows across threads
])  # fmt: skip
def test_global_kernels_in_the_gpus_steps(gen, device, shape, head_dim, shifts, solver, zero_g0):
    """The global path with the GPU's launch geometry (``gpu_geometry``): chunks of 256 columns,
    which the reduction takes 32 (E = 8) or 128 (E = 4) at a time and sums in its program (under
    the interpreter a chunk is 1024 columns in one step; E = 8: the forward loads 64 columns and
    splits them into two steps); the backward's output pass in programs of 512 columns with all
    their rows in a thread (up to 8 rows; 12: a chunk with the rows across threads), against the
    float64 oracle, forward and backward."""
    from fastnmf.profile.static.counter import gpu_geometry

    gn = importlib.import_module("fastnmf.kernels.global_nmf")
    x, v0, dy = nmf_inputs(gen, shape, None, zero_windows=True, zero_g0=zero_g0)
    kw = dict(head_dim=head_dim, patch_size=None, shifts=shifts, solver=solver)
    with gpu_geometry():
        plan = gn._Plan(x, head_dim, shape[2:], shifts, solver == "mu")
        assert (plan.block_v, plan.sub) == {8: (256, 32), 6: (256, 32), 4: (256, 128),
                                            12: (64, 16)}[head_dim]  # fmt: skip
        assert plan.pair == {8: 2, 6: 2, 4: 1, 12: 2}[head_dim]  # the forward's two steps a load
        # the backward's output pass: 4 columns a thread with all their rows, up to 8 rows
        assert (plan.rows_in_thread, plan.apply_v) == ((True, 512) if head_dim <= 8 else
                                                       (False, plan.block_v))  # fmt: skip
        y, dx = run_grad("triton", x, v0, dy, torch.float64, device, **kw)
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(dx, dx_ref) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver,shifts", [("hals", [None, 2]), ("mu", [None, (1, 2, 3)])])
def test_global_reduction_in_groups_of_chunks(gen, monkeypatch, device, solver, shifts):
    """The reduction's programs each take several chunks (6 chunks a matrix in 3 groups: the
    GPU's geometry with fewer programs), and the iterate kernels sum its partials 2 groups a load
    (the second load half masked), against the float64 oracle, forward and backward."""
    from fastnmf.profile.static.counter import gpu_geometry

    gn = importlib.import_module("fastnmf.kernels.global_nmf")
    monkeypatch.setattr(gn, "_MIN_PROGRAMS", 6)
    monkeypatch.setattr(gn, "_GROUP_CHUNKS", 2)
    monkeypatch.setattr(gn, "_SUM_ELEMS", 2 * 64)
    shape = (1, 16, 10, 12, 11)  # 2 matrices of 1,320 columns
    x, v0, dy = nmf_inputs(gen, shape, None, zero_windows=True)
    kw = dict(head_dim=8, patch_size=None, shifts=shifts, solver=solver)
    with gpu_geometry():
        plan = gn._Plan(x, 8, shape[2:], shifts, solver == "mu")
        assert (plan.nchunk, plan.ngroup, plan.block_g) == (6, 3, 2)
        y, dx = run_grad("triton", x, v0, dy, torch.float64, device, **kw)
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    assert rel_err(y, y_ref) <= 1e-12 and rel_err(dx, dx_ref) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_triton_plain_nmf(gen, device, solver):
    x = torch.rand(3, 2, 6, 50, generator=gen, dtype=torch.float64)
    v0 = torch.rand(50, 1, generator=gen, dtype=torch.float64)
    u0 = torch.rand(6, 1, generator=gen, dtype=torch.float64)
    u0[2] = 0  # MU keeps this row at zero
    dy = torch.randn(3, 2, 6, 50, generator=gen, dtype=torch.float64)
    ref = fastnmf.nmf(x.requires_grad_(), v0, u0=u0, solver=solver, kernel="reference")
    (g_ref,) = torch.autograd.grad(ref, x, dy)
    xf = x.detach().float().to(device).requires_grad_()
    y = fastnmf.nmf(xf, v0.float().to(device), u0=u0.float().to(device), solver=solver,
                    kernel="triton")  # fmt: skip
    (g,) = torch.autograd.grad(y, xf, dy.float().to(device))
    assert rel_err(y.cpu(), ref) <= 1e-5 and rel_err(g.cpu(), g_ref) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_triton_channels_last_and_autocast(gen, device):
    x, v0, dy = nmf_inputs(gen, (1, 4, 8, 8, 8), 4)
    kw = dict(head_dim=4, window=4, shifts=[None, 2])
    y_ref, _ = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    xc = x.float().to(device).to(memory_format=torch.channels_last_3d)
    y = fastnmf.matricized_nmf(xc, v0.float().to(device), kernel="triton", **kw)
    assert rel_err(y.cpu(), y_ref) <= 1e-5
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y_ac = fastnmf.matricized_nmf(x.float().to(device), v0.float().to(device),
                                      kernel="triton", **kw)  # fmt: skip
    assert y_ac.dtype == torch.float32  # the kernels keep the input dtype
    assert rel_err(y_ac.cpu(), y_ref) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_triton_all_zero_window_gives_zero(device):
    x = -torch.ones(1, 4, 8, 8, 8, device=device, requires_grad=True)
    v0 = torch.rand(64, 1, device=device)
    y = fastnmf.matricized_nmf(x, v0, head_dim=4, window=4, shifts=[None, 2], kernel="triton")
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(dx, torch.zeros_like(dx))


def test_triton_rejects_what_it_does_not_do(gen):
    x = torch.randn(1, 8, 8, 8, 8, generator=gen)
    with pytest.raises(NotImplementedError, match="num_grad_steps"):
        fastnmf.matricized_nmf(x, torch.rand(64, 1), head_dim=4, window=4, kernel="triton",
                               num_grad_steps=1)  # fmt: skip
    with pytest.raises(NotImplementedError, match="does not differentiate v0"):
        fastnmf.matricized_nmf(x, torch.rand(64, 1, requires_grad=True), head_dim=4,
                               window=4, kernel="triton")  # fmt: skip


@pytest.mark.parametrize(
    ("triton_version", "numpy_version", "fails"),
    [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False),
     ("3.9.0+git1234", "2.5.0.dev0", False)],
)  # fmt: skip
def test_interpreter_version_clash_is_a_clear_error(monkeypatch, triton_version, numpy_version,
                                                    fails):  # fmt: skip
    """Triton < 3.7's interpreter cannot run with NumPy >= 2.4: say so and name the fix."""
    import fastnmf.kernels as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels.triton, "__version__", triton_version)
    monkeypatch.setattr(kernels.np, "__version__", numpy_version)
    x = torch.rand(1, 4, 8, 8)
    if fails:
        with pytest.raises(RuntimeError, match=r"NumPy 2\.4\.6.*numpy<2\.4 or triton>=3\.7"):
            kernels._interpreter_check(x)
    else:
        kernels._interpreter_check(x)
    # compiled Triton (device tensors; a meta tensor stands in for one) is not affected
    monkeypatch.setattr(kernels.triton, "__version__", "3.6.0")
    monkeypatch.setattr(kernels.np, "__version__", "2.4.6")
    kernels._interpreter_check(torch.empty(1, 4, 8, 8, device="meta"))
    # without the interpreter, CPU tensors get the error naming the two ways out instead
    monkeypatch.setattr(kernels, "_INTERPRETED", False)
    with pytest.raises(RuntimeError, match=r"interpreter is off.*kernel='torch'.*TRITON_INTERPRET"):
        kernels._interpreter_check(x)
