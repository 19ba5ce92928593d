"""What the Triton kernel tests (test_kernels*.py) share: inputs, a forward + backward run, a
launch spy, and the checks against the float64 oracle that several kernels pass alike."""

import importlib

import torch
from conftest import n_columns, rel_err, window_kw

import fastnmf


def run_grad(kernel, x, v0, dy, dtype, device, u0=None, **kw):
    """(y, dx) of ``matricized_nmf`` at ``dtype`` on ``device`` (returned on the CPU)."""
    xi = x.detach().to(device=device, dtype=dtype).requires_grad_()
    if u0 is not None:
        u0 = u0.to(device=device, dtype=dtype)
    y = fastnmf.matricized_nmf(xi, v0.to(device=device, dtype=dtype), u0=u0, kernel=kernel,
                               **window_kw(kw))  # fmt: skip
    (dx,) = torch.autograd.grad(y, xi, dy.to(device=device, dtype=dtype))
    return y.cpu(), dx.cpu()


def training_forward(x, v0, device, **kw):
    """The forward as training runs it (input requiring grad: K and h saved), without the
    backward: the merge is the forward's parts pass alone."""
    xi = x.detach().to(device=device, dtype=torch.float32).requires_grad_()
    y = fastnmf.matricized_nmf(xi, v0.to(device=device, dtype=torch.float32), kernel="triton",
                               **window_kw(kw))  # fmt: skip
    return y.detach().cpu()


def design3_pipeline(shape, head_dim, patch, shifts, dtype=torch.float32, ring=False):
    """(geometry, Pipeline) of the third design's launch for an x of ``shape`` and ``dtype``, as
    the launchers compute them (for the tile plans)."""
    common = importlib.import_module("fastnmf.kernels._window2_common")
    sched = importlib.import_module("fastnmf.kernels._window3_sched")
    x = torch.zeros(shape, dtype=dtype)
    geo = common._Geometry2(x, head_dim, (patch,) * (x.dim() - 2), shifts)
    return geo, sched.Pipeline(geo, sched.fused_plan(tuple(geo.NW), geo.shifts), x.device,
                               ring=ring)  # fmt: skip


def nmf_inputs(gen, shape, patch, *, rank=1, zero_windows=False, zero_g0=False):
    """float64 (x, v0, dy): x of ``shape``, v0 (N, rank) for windows of ``patch`` (None: global).

    ``zero_windows``: a zero window of every head in batch 0 and zero columns (after ReLU);
    ``zero_g0``: two zero entries of v0 (MU drops those columns, at another voxel per shift)."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if zero_windows:
        x[0, :, ..., :4, :4] = -1.0
        x[-1, :, ..., 1, :] = -0.5
    v0 = torch.rand(n_columns(shape[2:], patch), rank, generator=gen, dtype=torch.float64)
    if zero_g0:
        v0[1] = 0
        v0[-3] = 0
    dy = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x, v0, dy


class Spy:
    """Stands in for a Triton kernel and records its name in ``launched`` at each launch."""

    def __init__(self, name, kernel, launched):
        self.name, self.kernel, self.launched = name, kernel, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def spy_on(monkeypatch, module, names, launched):
    """Replace each kernel ``names`` of ``module`` by a :class:`Spy` writing to ``launched``."""
    for name in names:
        monkeypatch.setattr(module, name, Spy(name, getattr(module, name), launched))


def count_calls(monkeypatch, module, name, device) -> list:
    """The calls of ``module.name`` from here on, one entry each, where the interpreter runs the
    kernels (``device`` "cpu": it calls an inlined jit function as Python); compiled, none."""
    calls: list = []
    if device == "cpu":
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls


def fp32_against_reference(x, v0, dy, device, **kw):
    """Triton in fp32 against the float64 oracle: the output's dtype and shape, its error
    (<= 1e-5) and a finite gradient are checked here; returns (dx, dx_ref) for the caller's
    gradient rule."""
    y_ref, dx_ref = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    y, dx = run_grad("triton", x, v0, dy, torch.float32, device, **kw)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert rel_err(y, y_ref) <= 1e-5
    assert torch.isfinite(dx).all()
    return dx, dx_ref


def check_low_precision(x, v0, dy, dtype, device, **kw):
    """Triton at ``dtype`` (fp16 / bf16) within 2x the oracle's own error at that dtype, plus an
    atol of 1e-3, on the output and the gradient."""
    y64, dx64 = run_grad("reference", x, v0, dy, torch.float64, "cpu", **kw)
    y_low, dx_low = run_grad("reference", x, v0, dy, dtype, "cpu", **kw)
    y, dx = run_grad("triton", x, v0, dy, dtype, device, **kw)
    assert y.dtype == dtype and dx.dtype == dtype
    assert rel_err(y, y64) <= 2 * rel_err(y_low, y64) + 1e-3
    assert rel_err(dx, dx64) <= 2 * rel_err(dx_low, dx64) + 1e-3
