"""The oracle (fastnmf.reference) only checks: no fast path, model or kernel uses it.

1. Statically: no module of the package imports it, except the ``kernel="reference"`` dispatch
   (fastnmf/ops.py ``_oracle``) and the profiling harness (fastnmf/profile, a benchmark, which
   times the compiled oracle).
2. At run time: with every function of the oracle made to raise, every ``torch`` and ``triton``
   path (rank 1 and > 1, iters 0, global, local, swin, 2D, plain NMF, NMF components of a model)
   still runs, forward and backward, and ``kernel="reference"`` does raise.
"""

import ast
import inspect
from pathlib import Path

import pytest
import torch

import fastnmf
from fastnmf import models, reference

ROOT = Path(__file__).resolve().parents[1]
# (file, function) pairs allowed to import the oracle; a function of None means module level
ALLOWED = {("fastnmf/ops.py", "_oracle"), ("fastnmf/profile", None)}


class OracleCalled(AssertionError):
    pass


def _imports_of_reference(path: Path):
    """(enclosing function or None, line) of every import of fastnmf.reference in a file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            name = (
                child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            )
            if isinstance(child, ast.ImportFrom):
                mod = child.module or ""
                names = {a.name for a in child.names}
                if mod.endswith("reference") or ("reference" in names and child.level + (
                        mod in ("fastnmf", "")) > 0):  # fmt: skip
                    found.append((func, child.lineno))
            elif isinstance(child, ast.Import):
                if any(a.name.endswith(".reference") for a in child.names):
                    found.append((func, child.lineno))
            visit(child, name)

    visit(tree, None)
    return found


def test_no_production_module_imports_the_oracle():
    bad = []
    for folder in ("fastnmf", "kernels", "models"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "fastnmf/reference.py" or rel.startswith("fastnmf/profile/"):
                continue
            for func, line in _imports_of_reference(path):
                if (rel, func) not in ALLOWED:
                    bad.append(f"{rel}:{line} (in {func or 'module'})")
    assert not bad, f"production modules import the oracle: {bad}"


def test_the_import_scan_sees_imports():
    """The scan is not blind: it finds the one allowed import and the test files' imports."""
    assert [f for f, _ in _imports_of_reference(ROOT / "fastnmf/ops.py")] == ["_oracle"]
    assert _imports_of_reference(Path(__file__)) != []


@pytest.fixture
def oracle_raises(monkeypatch):
    """Every function of fastnmf.reference, public or private, raises when called."""
    patched = []
    for name, obj in list(vars(reference).items()):
        if inspect.isfunction(obj) and obj.__module__ == reference.__name__:

            def boom(*args, _name=name, **kwargs):
                raise OracleCalled(f"fastnmf.reference.{_name} was called")

            monkeypatch.setattr(reference, name, boom)
            patched.append(name)
    assert {"nmf_loop", "matricized_nmf", "matricize", "safe_div", "_hals_sweep"} <= set(patched)
    return patched


def test_reference_kernel_reaches_the_patched_oracle(oracle_raises, gen):
    x = torch.rand(2, 4, 6, generator=gen)
    with pytest.raises(OracleCalled):
        fastnmf.nmf(x, torch.rand(6, 1, generator=gen), kernel="reference")
    with pytest.raises(OracleCalled):
        fastnmf.matricized_nmf(x[None], torch.rand(24, 1, generator=gen), head_dim=2,
                               kernel="reference")  # fmt: skip


def _grad_ok(y, x):
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.isfinite(dx).all()


MATRICIZED = [
    # (shape, head_dim, window, shifts)
    ((1, 8, 8, 8, 8), 4, None, None),  # global 3D
    ((1, 8, 4, 4, 8), 4, None, [None, 2]),  # global, shifted
    ((1, 4, 8, 8, 8), 4, 4, None),  # local 3D (one head: the interpreter pays per window)
    ((1, 4, 8, 8, 8), 4, 4, [None, 2]),  # swin 3D
    ((1, 4, 8, 8), 4, 4, [None, 2]),  # swin 2D
    ((2, 4, 6, 10), 4, None, None),  # global 2D
]


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("rank,iters", [(1, 3), (2, 3), (1, 0), (2, 0)])
@pytest.mark.parametrize("shape,head_dim,window,shifts", MATRICIZED)
def test_matricized_paths_run_without_the_oracle(
    oracle_raises, gen, kernel, rank, iters, shape, head_dim, window, shifts
):
    n = torch.Size(shape[2:]).numel() if window is None else window ** (len(shape) - 2)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    v0 = torch.rand(n, rank, generator=gen)
    kw = dict(head_dim=head_dim, window=window, shifts=shifts, iters=iters, kernel=kernel)
    # the Triton rank > 1 kernels call no PyTorch code in backward that could reach the oracle;
    # their backward (slow under the interpreter) runs for one 2D case only
    grad = kernel == "torch" or rank == 1 or (window is not None and len(shape) == 4)
    with torch.set_grad_enabled(grad):
        y = fastnmf.matricized_nmf(x, v0, **kw)
    assert y.shape == x.shape and torch.isfinite(y).all()
    if grad and iters > 0:
        _grad_ok(y, x)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("rank,iters", [(1, 4), (3, 4), (2, 0)])
@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_plain_nmf_runs_without_the_oracle(oracle_raises, gen, kernel, rank, iters, solver):
    x = torch.rand(3, 6, 20, generator=gen, requires_grad=True)
    v0 = torch.rand(20, rank, generator=gen)
    u0 = torch.rand(6, rank, generator=gen)
    grad = not (kernel == "triton" and rank > 1 and iters > 0)  # that kernel: forward only
    with torch.set_grad_enabled(grad):
        y = fastnmf.nmf(x, v0, u0=u0, iters=iters, solver=solver, kernel=kernel)
    assert y.shape == x.shape and torch.isfinite(y).all()
    if grad and iters > 0:
        _grad_ok(y, x)


@pytest.mark.parametrize("variant", ["global", "local", "swin"])
@pytest.mark.parametrize("rank", [1, 2])
def test_model_and_components_run_without_the_oracle(oracle_raises, gen, variant, rank):
    net = models.build(f"{variant}_factorizer", preset="isles", kernel="torch",
                       spatial_size=(16, 16, 16), widths=(8, 16), head_dim=4, window=2,
                       deep_supervision=1, dropout=0.0, rank=rank)  # fmt: skip
    x = torch.randn(1, net.in_channels, 16, 16, 16, generator=gen)
    net.train()
    out = net(x)
    out = out[0] if isinstance(out, list) else out
    out.sum().backward()
    comps = models.nmf_components(net.eval(), x, block=0)
    assert comps.shape[2] == rank and (comps >= 0).all() and torch.isfinite(comps).all()
