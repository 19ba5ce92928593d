"""Fused Triton kernels for the NMF layer (installed as ``fastnmf.kernels``).

- :mod:`.window_nmf`: rank one over (shifted) windows, forward and backward;
- :mod:`.window_nmf2`: the same, second design (every shift's statistics from one read of x;
  backward in :mod:`._window2_bwd`);
- :mod:`.window_nmf3`: the same, third design (the second design's forward passes in one
  persistent launch, pipelined plane by plane so x's second read comes from L2);
- which design runs: :func:`window_design` (by the shift count, from the H200's timing:
  bench/results/h200_2026-12-04/), or ``window_nmf.TUNING["design"] = 1 | 2 | 3``;
- :mod:`.global_nmf`: rank one over whole matrices (global matricization, plain NMF); its
  output passes and column blocks in :mod:`._global_apply`;
- :mod:`.window_nmf_rank`: rank R > 1 over (shifted) windows, the literal MU / HALS loop on chip,
  forward and backward;
- :mod:`.global_nmf_rank`: rank R > 1 over whole matrices, forward only (one reduction pass per
  iteration); its backward raises NotImplementedError (use kernel='torch').

Shared by the families: :mod:`._common` (interpreter flag, accumulation dtype, shift table, MU row
mask, input checks, index arithmetic and power steps as ``@triton.jit`` functions) and
:mod:`._rank_algebra` (the rank-R MU / HALS step and its vector-Jacobian product on chip).

The entry points take arguments already validated by :func:`fastnmf.nmf` /
:func:`fastnmf.matricized_nmf`. Names change at this boundary: the public ``window`` is
``patch_size`` here and in the kernel files, and the start vectors ``v0`` (G, N × R) / ``u0``
(F, M × R) of the API are ``g0`` / ``u0`` inside the kernels (rank one: ``g0`` is ``v0[:, 0]``).
Inputs are made contiguous (a channels_last input is copied once).
On a machine without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton

from ._common import version_tuple as _version
from ._window2_common import geometry
from .global_nmf import global_nmf
from .global_nmf_rank import global_nmf_rank
from .window_nmf import TUNING as _WINDOW_TUNING
from .window_nmf import window_nmf
from .window_nmf2 import window_nmf2
from .window_nmf3 import plane_plan, window_nmf3
from .window_nmf_rank import window_nmf_rank

__all__ = ["nmf", "matricized_nmf"]


# Triton reads TRITON_INTERPRET when the kernels are decorated, i.e. when this package is imported
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_check(x: torch.Tensor) -> None:
    """CPU tensors need the interpreter, enabled before import (otherwise Triton fails with "0
    active drivers"). Triton < 3.7's interpreter turns loop bounds into ints with
    ``int(one-element array)``, which NumPy >= 2.4 refuses; fail with the fix instead of an
    InterpreterError from deep inside.
    """
    if x.device.type == "cpu" and not _INTERPRETED:
        raise RuntimeError(
            "kernel='triton' got CPU tensors, but Triton's CPU interpreter is off (Triton would "
            "fail with '0 active drivers'). Either use kernel='torch' (or 'auto': torch on CPU, "
            "triton on CUDA), or set TRITON_INTERPRET=1 in the environment before importing "
            "fastnmf (runs the Triton kernels on the CPU, slowly)"
        )
    if x.device.type != "cpu":
        return
    if _version(triton.__version__) < (3, 7) and _version(np.__version__) >= (2, 4):
        raise RuntimeError(
            f"kernel='triton' on CPU runs Triton's interpreter, and the interpreter of Triton "
            f"{triton.__version__} cannot run with NumPy {np.__version__} (it converts "
            "one-element arrays to int, an error since NumPy 2.4); install numpy<2.4 or "
            "triton>=3.7, or use kernel='torch' on CPU"
        )


def _common_checks(v0: torch.Tensor, iters: int, num_grad_steps) -> None:
    if num_grad_steps is not None and num_grad_steps < iters:
        raise NotImplementedError(
            "kernel='triton' computes the exact gradient of all iterations; num_grad_steps "
            "needs kernel='torch' or kernel='reference'"
        )
    if v0.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "kernel='triton' does not differentiate v0 (a fixed buffer in Factorizer); use "
            "kernel='torch' to learn v0"
        )


# The rank-one window design by the number of shifted windowings (local windows: 1), from the
# H200's timing of the three at 2 x 32 x 128^3, fp32 and bf16 (bench/results/h200_2026-12-04/):
# two shifts ([None, 4]) design 2 (forward + backward 5.05 ms fp32 against 9.52 for design 1 and
# 7.79 for the fastest design-3 variant), three or more ([None, 2, 4, 6]) design 3 with its four
# tiles (8.43 ms against 14.7 for design 1 and 20.4 for design 2); local windows, not timed, the
# first design, which fuses their output pass into the statistics kernel.
_DESIGN_BY_SHIFTS = {1: 1, 2: 2}
_DESIGN_MANY_SHIFTS = 3


def window_design(shifts) -> int:
    """The rank-one window design for a shift list: ``window_nmf.TUNING["design"]`` if set
    (1, 2 or 3), else by the number of shifted windowings (``_DESIGN_BY_SHIFTS``)."""
    design = _WINDOW_TUNING["design"]
    if design is None:
        return _DESIGN_BY_SHIFTS.get(len(shifts) if shifts else 1, _DESIGN_MANY_SHIFTS)
    if design not in (1, 2, 3):
        raise ValueError(f"window_nmf.TUNING['design'] is {design!r}; valid options: None "
                         "(by the shift count), 1, 2, 3")  # fmt: skip
    return design


def design_for(x, head_dim: int, patch, shifts) -> int:
    """The design that runs for these inputs: :func:`window_design`, the second where the third's
    plane schedule does not apply (:func:`.window_nmf3.window_nmf3` falls back the same way)."""
    design = window_design(shifts)
    if design == 3 and plane_plan(geometry(x, head_dim, tuple(patch), shifts)) is None:
        return 2
    return design


def matricized_nmf(
    x, v0, *, head_dim, patch_size, shifts, u0=None, iters=5, solver="hals", num_grad_steps=None
):
    """Triton path of :func:`fastnmf.matricized_nmf` (arguments already validated)."""
    _interpreter_check(x)
    _common_checks(v0, iters, num_grad_steps)
    x = x.contiguous()
    if v0.shape[1] > 1:
        if patch_size is None:
            return global_nmf_rank(x, v0, rows=head_dim, spatial=x.shape[2:], shifts=shifts,
                                   u0=u0, iters=iters, solver=solver, relu=True)  # fmt: skip
        return window_nmf_rank(x, v0, head_dim=head_dim, patch_size=patch_size, shifts=shifts,
                               u0=u0, iters=iters, solver=solver)  # fmt: skip
    if patch_size is None:
        return global_nmf(x, v0, rows=head_dim, spatial=x.shape[2:], shifts=shifts, u0=u0,
                          iters=iters, solver=solver, relu=True)  # fmt: skip
    window = {1: window_nmf, 2: window_nmf2, 3: window_nmf3}[window_design(shifts)]
    return window(x, v0, head_dim=head_dim, patch_size=patch_size, shifts=shifts, u0=u0,
                  iters=iters, solver=solver)  # fmt: skip


def nmf(x, v0, *, u0=None, iters=5, solver="hals", num_grad_steps=None):
    """Triton path of :func:`fastnmf.nmf` (arguments already validated)."""
    _interpreter_check(x)
    _common_checks(v0, iters, num_grad_steps)
    m, n = x.shape[-2:]
    flat = x.reshape(-1, m, n).contiguous()  # (Bm, M, N)
    if v0.shape[1] > 1:
        y = global_nmf_rank(flat, v0, rows=m, spatial=(n,), u0=u0, iters=iters, solver=solver,
                            relu=False)  # fmt: skip
        return y.reshape(x.shape)
    y = global_nmf(flat, v0, rows=m, spatial=(n,), u0=u0, iters=iters, solver=solver, relu=False)
    return y.reshape(x.shape)
