"""Rank-one window NMF as ``torch.library.triton_op``s: ``fastnmf::window_nmf_triton`` and
``fastnmf::window_nmf_triton_backward``.

What they are: the eager Triton path of a rank-one window layer with values unchecked (the
default on a GPU), split at the autograd boundary. The forward op runs a window design's forward
kernels and returns, beside y, the three tensors its backward reads (the saved iterates); the
backward op runs that design's hand-written backward kernels on them: no recomputation, the same
bits as eager. :func:`fastnmf.custom_op.matricized_nmf_op` calls them while a graph is captured
(torch.compile, torch.export) or in :func:`fastnmf.custom_op.forced`.

Schema::

    fastnmf::window_nmf_triton(Tensor x, Tensor g0, Tensor? rowmask, int head_dim, int[] patch,
        int[] shifts, int iters, bool mu, int design) -> (Tensor, Tensor, Tensor, Tensor)
    fastnmf::window_nmf_triton_backward(Tensor dy, Tensor x, Tensor g0, Tensor? rowmask,
        Tensor s0, Tensor s1, Tensor s2, <the same attributes>) -> Tensor

``shifts`` as in fastnmf/custom_op.py (flat); ``design`` the window design the eager dispatch
runs for these inputs (:func:`fastnmf.kernels.design_for`, resolved when the call is traced, so a
graph holds the design it was made with). What the three saved tensors are
(``_saved_shapes``; P = the shifted windows, ``progs``, E = head_dim, fp32):

- design 1 (``kernels.window_nmf``): the iterates (P, iters, E), their norms (P, iters), and an
  empty tensor;
- design 2 (``kernels.window_nmf2``): the iterates, their norms, K (P, E, E: its upper triangle
  packed row by row in the first E (E + 1) / 2 floats of each window's E x E, as
  ``_window2_common._tri`` places it; zeros after);
- design 3 (``kernels.window_nmf3``): u (P, E), the last iterate (P, E), K (P, E, E) whole, row
  by row (its backward loads each K as a row of E^2).

Tracing: the launches go through ``wrap_triton`` (``kernels._common.launch(kernel, wrap=True)``),
so torch.compile on CUDA records the kernels themselves in the graph; under the interpreter and
off CUDA the graph keeps the op whole (``custom_op.decompose_only_when_traceable``); torch.export
keeps it whole. The kernels of every design are recorded for AOTAutograd's cache key. The
third design's persistent grid is the GPU's SM count (or ``_window3_sched.TUNING["sms"]``).
"""

from __future__ import annotations

import importlib

import torch

from .custom_op import decode_shifts, decompose_only_when_traceable, encode_shifts, record_kernels

__all__ = ["window_triton"]

_FWD = "fastnmf::window_nmf_triton"
_BWD = "fastnmf::window_nmf_triton_backward"


def _kernel_module(name: str):
    return importlib.import_module(f"fastnmf.kernels.{name}")


def _record_kernels():
    """Every design's kernels, recorded for both ops (before AOTAutograd computes its cache key:
    the fakes call this)."""
    wn, wn2, w2b = (_kernel_module(n) for n in ("window_nmf", "window_nmf2", "_window2_bwd"))
    wn3, w3b = _kernel_module("window_nmf3"), _kernel_module("_window3_bwd")
    record_kernels(_FWD, (wn._stats_fwd_kernel, wn._apply_fwd_tile_kernel, wn._apply_fwd_kernel,
                          wn2._parts_kernel, wn2._solve_kernel, wn2._apply_kernel,
                          wn3._fused_kernel))  # fmt: skip
    record_kernels(_BWD, (wn._stats_bwd_kernel, wn._apply_bwd_tile_kernel, wn._apply_bwd_kernel,
                          w2b._parts_bwd_kernel, w2b._solve_bwd_kernel, w2b._apply_bwd_kernel2,
                          w3b._fused_bwd_kernel))  # fmt: skip


def _forward(design, x, g0, rowmask, head_dim, patch, shifts, iters, mu):
    """(y, s0, s1, s2) of ``design``'s forward launchers (the saved tensors of the module
    docstring)."""
    _check_design(design)
    shifts = decode_shifts(shifts, x.dim() - 2)
    if design == 1:
        wn = _kernel_module("window_nmf")
        geo = wn.geometry(x, head_dim, tuple(patch), shifts)
        y, hats, norms = wn._forward(x, g0, rowmask, geo, iters, mu, save=True, wrap=True)
        return y, hats, norms, hats.new_empty(0)
    geo = _kernel_module("_window2_common").geometry(x, head_dim, tuple(patch), shifts)
    if design == 2:
        y, s0, s1, kmat = _kernel_module("window_nmf2")._forward(x, g0, rowmask, geo, iters, mu,
                                                                 save=True, wrap=True)  # fmt: skip
    else:  # the third design's forward writes K whole (its backward loads it as rows of E^2)
        wn3 = _kernel_module("window_nmf3")
        return wn3._fused_forward(x, g0, rowmask, geo, wn3.plane_plan(geo), iters, mu, save=True,
                                  wrap=True)  # fmt: skip
    # the second design's kernels write K's packed upper triangle, all its backward reads; an op's
    # outputs are whole (defined bits: opcheck, repeatable graphs)
    e = geo.E
    packed = torch.arange(e * e, device=kmat.device).view(e, e) < e * (e + 1) // 2
    return y, s0, s1, torch.where(packed, kmat, 0)


def _backward(design, dy, x, g0, rowmask, saved, head_dim, patch, shifts, iters, mu):
    """dx of ``design``'s backward launchers from the forward's saved tensors."""
    _check_design(design)
    shifts = decode_shifts(shifts, x.dim() - 2)
    s0, s1, s2 = saved
    if design == 1:
        wn = _kernel_module("window_nmf")
        geo = wn.geometry(x, head_dim, tuple(patch), shifts)
        return wn._backward(x, g0, rowmask, s0, s1, dy, geo, iters, mu, wrap=True)
    geo = _kernel_module("_window2_common").geometry(x, head_dim, tuple(patch), shifts)
    if design == 2:
        return _kernel_module("_window2_bwd").backward2(x, g0, rowmask, s0, s1, s2, dy, geo, iters,
                                                        mu, wrap=True)  # fmt: skip
    plan = _kernel_module("window_nmf3").plane_plan(geo)
    return _kernel_module("_window3_bwd").backward3(x, g0, rowmask, s0, s1, s2, dy, geo, plan,
                                                    iters, mu, wrap=True)  # fmt: skip


def _check_design(design: int) -> None:
    if design not in (1, 2, 3):
        raise ValueError(f"fastnmf::window_nmf_triton: design must be 1, 2 or 3, got {design!r}")


def _saved_shapes(design: int, progs, iters: int, e: int) -> tuple:
    """The shapes of the saved tensors (module docstring) for ``progs`` shifted windows."""
    _check_design(design)
    kmat = (progs, e, e)
    return {1: ((progs, iters, e), (progs, iters), (0,)),
            2: ((progs, iters, e), (progs, iters), kmat),
            3: ((progs, e), (progs, e), kmat)}[design]  # fmt: skip


@torch.library.triton_op(_FWD, mutates_args=())
def _window_op(
    x: torch.Tensor, g0: torch.Tensor, rowmask: torch.Tensor | None, head_dim: int,
    patch: list[int], shifts: list[int], iters: int, mu: bool, design: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s0, s1, s2): the layer's output and what ``design``'s backward reads."""
    return tuple(_forward(design, x, g0, rowmask, head_dim, patch, shifts, iters, mu))


@_window_op.register_fake
def _window_fake(x, g0, rowmask, head_dim, patch, shifts, iters, mu, design):
    from .kernels._common import compute_dtype

    _record_kernels()
    nshift = max(1, len(shifts) // max(1, x.dim() - 2))
    nwin = 1
    for s, q in zip(x.shape[2:], patch, strict=True):
        nwin *= s // q
    progs = x.shape[0] * (x.shape[1] // head_dim) * nshift * nwin
    f32 = compute_dtype(x.dtype)
    saved = (x.new_empty(s, dtype=f32) for s in _saved_shapes(design, progs, iters, head_dim))
    return (x.new_empty(x.shape), *saved)


@torch.library.triton_op(_BWD, mutates_args=())
def _window_backward_op(
    dy: torch.Tensor, x: torch.Tensor, g0: torch.Tensor, rowmask: torch.Tensor | None,
    s0: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, head_dim: int, patch: list[int],
    shifts: list[int], iters: int, mu: bool, design: int,
) -> torch.Tensor:
    return _backward(design, dy.contiguous(), x, g0, rowmask, (s0, s1, s2), head_dim, patch,
                     shifts, iters, mu)  # fmt: skip


@_window_backward_op.register_fake
def _window_backward_fake(dy, x, *rest):
    return x.new_empty(x.shape)


# dy is the backward op's first argument; the forward's is x: both on x's device
decompose_only_when_traceable(_window_op)
decompose_only_when_traceable(_window_backward_op)


def _setup_context(ctx, inputs, output):
    x, g0, rowmask, *attrs = inputs
    _, *saved = output
    ctx.save_for_backward(x, g0, rowmask, *saved)
    ctx.attrs = attrs
    ctx.mark_non_differentiable(*saved)


def _window_backward(ctx, dy, *_dsaved):
    x, g0, rowmask, *saved = ctx.saved_tensors
    dx = _window_backward_op(dy, x, g0, rowmask, *saved, *ctx.attrs)
    return (dx,) + (None,) * (2 + len(ctx.attrs))


_window_op.register_autograd(_window_backward, setup_context=_setup_context)


def window_triton(x, v0, u0, head_dim, patch, shifts, iters, solver):
    """kernels.matricized_nmf's set-up (the same checks and inputs, the same design), then the
    op: y."""
    from .kernels import _interpreter_check, design_for
    from .kernels._common import window_inputs

    _interpreter_check(x)
    x = x.contiguous()
    g0, rowmask, mu = window_inputs(x, v0, u0, head_dim=head_dim, solver=solver)
    design = design_for(x, head_dim, patch, shifts)
    y, *_ = _window_op(x, g0, rowmask, head_dim, [int(p) for p in patch],
                       encode_shifts(shifts, x.dim() - 2), iters, mu, design)  # fmt: skip
    return y
