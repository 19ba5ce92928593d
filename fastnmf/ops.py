"""Public functional API and kernel dispatch: ``nmf`` and ``matricized_nmf``.

``kernel`` picks the implementation:

- ``"reference"``: the literal unrolled algorithms of :mod:`fastnmf.reference`, autograd.
- ``"torch"``: fast vectorised PyTorch. Rank one uses the exact closed form of
  :mod:`fastnmf.closed_form` (cost independent of ``iters``, hand-written backward); rank > 1 runs
  the batched loop of :mod:`fastnmf.loop` (autograd) on the layout of :mod:`fastnmf.layout`.
- ``"triton"``: the fused kernels of :mod:`fastnmf.kernels`.
- ``"auto"``: triton for CUDA tensors, torch otherwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from . import _checks as C
from . import custom_op, layout, loop
from .closed_form import compute_dtype, power_iterates, rank1_closed_form

__all__ = ["nmf", "matricized_nmf", "resolve_kernel"]


def resolve_kernel(kernel: str, x: torch.Tensor) -> str:
    """Map ``"auto"`` to ``"triton"`` on CUDA tensors and ``"torch"`` otherwise."""
    C.check_choice("kernel", kernel, C.KERNELS)
    if kernel == "auto":
        return "triton" if x.is_cuda else "torch"
    return kernel


def _triton():
    try:
        from . import kernels
    except ImportError as err:  # pragma: no cover - depends on the machine
        raise RuntimeError(f"kernel='triton' needs triton, which failed to import: {err}") from err
    return kernels


def _oracle():
    """The literal oracle, imported only when ``kernel="reference"`` asks for it."""
    from . import reference

    return reference


def _check_common(iters, solver, num_grad_steps):
    C.check_int("iters", iters, 0)
    C.check_choice("solver", solver, C.SOLVERS)
    if num_grad_steps is not None:
        C.check_int("num_grad_steps", num_grad_steps, 0)


# Magnitudes. NMF is positively homogeneous: NMF(c X; c u0) = c NMF(X; u0) for c > 0, every
# solver, rank and iters. The fp32 Gram matrix X X^T overflows for entries beyond ~1e19 and
# underflows below ~1e-19 (bf16 spans 1e±38), which would give NaN or silently zero outputs. With
# value checks on (``check``; default on CPU), an input whose largest entry lies outside
# [2^-32, 2^32] is scaled by a power of two (exact) to [0.5, 1), factorized and scaled back.
# MU does not depend on the scale of u0 (and keeps a zero entry at zero, so u0 must not underflow):
# only HALS scales u0 too. Gradients of x and u0 pass unscaled (the Jacobian of a degree-1
# homogeneous map has degree 0), that of v0 is scaled back: no extreme intermediate is formed.
_SAFE_RANGE = (2.0**-32, 2.0**32)


def _range_exponent(t: torch.Tensor) -> int:
    """0 if the largest entry of ``t`` is in the safe range (or <= 0), else k with max * 2**k
    in [0.5, 1)."""
    m = float(t.detach().amax()) if t.numel() else 0.0
    if not m > 0 or _SAFE_RANGE[0] <= m <= _SAFE_RANGE[1]:
        return 0
    return -math.frexp(m)[1]


def _checked_exponent(x, v0, u0, check_x) -> int:
    """Check the values (x by ``check_x``, v0 and u0 nonnegative) and return the exponent k of
    :func:`_range_exponent` (0: x needs no rescaling)."""
    check_x("x", x)
    C.check_nonnegative("v0", v0)
    if u0 is not None:
        C.check_nonnegative("u0", u0)
    return _range_exponent(x)


def _ldexp(t: torch.Tensor, k: int) -> torch.Tensor:
    """t * 2**k in steps of at most 2**±64 (each exact, and a float32 scalar)."""
    while k:
        step = max(-64, min(64, k))
        t = t * 2.0**step
        k -= step
    return t


class _Rescale(torch.autograd.Function):
    """Forward ``t * 2**k``, backward ``grad * 2**grad_k``."""

    @staticmethod
    def forward(ctx, t, k, grad_k):
        ctx.grad_k = grad_k
        return _ldexp(t, k) if k else t.clone()

    @staticmethod
    def backward(ctx, grad):
        return _ldexp(grad, ctx.grad_k), None, None


def _rescaled(fn, x, v0, u0, k: int, rows: int, solver: str, **kw):
    """``fn`` on x * 2**k (HALS: u0 scaled alike, None = ones), output scaled back by 2**-k."""
    if solver == "hals":
        u0 = u0 if u0 is not None else v0.new_ones(rows, v0.shape[1])
        u0 = _Rescale.apply(u0, k, 0)  # (M, R)
    xs = _Rescale.apply(x, k, 0)  # (same shape as x)
    vs = _Rescale.apply(v0, 0, -k) if v0.requires_grad else v0  # (N, R)
    y = fn(xs, vs, u0=u0, solver=solver, check=False, **kw)
    return _Rescale.apply(y, -k, 0)


def _mu_masks(x, g0, u0):
    """MU keeps a zero entry of u0 or v0 at zero for ever: mask those rows and columns of X."""
    x = x * (g0 > 0).to(x.dtype)
    if u0 is not None:
        x = x * (u0[:, 0] > 0).to(x.dtype).unsqueeze(-1)
    return x


def _start_vector(x, g0, done: int):
    """Direction of G after ``done`` detached iterations (the scale cancels in the closed form)."""
    if done == 0:
        return g0
    with torch.no_grad():
        cdt = compute_dtype(x.dtype)
        hats, _, _ = power_iterates(x.to(cdt), g0.to(cdt), done)
        return (hats[:, -1].unsqueeze(-2) @ x.to(cdt)).squeeze(-2).to(x.dtype)  # (Bm, N)


def _torch_rank1(x, g0, u0, iters, solver, num_grad_steps, scale=1.0):
    """scale * closed form on x (Bm, M, N), start vector g0 (N,) or (Bm, N); iters >= 1."""
    if solver == "mu":
        x = _mu_masks(x, g0, u0)
    k = iters if num_grad_steps is None else min(num_grad_steps, iters)
    if k == 0:
        with torch.no_grad():
            return rank1_closed_form(x, g0, iters, scale)
    g = _start_vector(x, g0, iters - k)
    return rank1_closed_form(x, g, k, scale)


def nmf(
    x: torch.Tensor,
    v0: torch.Tensor,
    *,
    u0: torch.Tensor | None = None,
    iters: int = 5,
    solver: str = "hals",
    kernel: str = "auto",
    num_grad_steps: int | None = None,
    check: bool | None = None,
) -> torch.Tensor:
    """NMF of every matrix of ``x`` (..., M, N), returning F G^T after ``iters`` iterations.

    Args:
        x: nonnegative input (..., M, N), floating dtype.
        v0: (N, R) initial G, shared by every matrix.
        u0: (M, R) initial F where the solver uses it (None: all ones).
        iters: outer iterations T (F then G in each); 0 returns u0 v0^T.
        solver: ``"hals"`` (Algorithm 2) or ``"mu"`` (Algorithm 1).
        kernel: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``.
        num_grad_steps: only the last k iterations carry gradient (None: all).
        check: check values (finite, nonnegative). None: on CPU only, since on a GPU the check
            forces a device sync.

    Returns:
        Tensor of the same shape and dtype as ``x``.
    """
    C.check_float_tensor("x", x)
    if x.dim() < 2 or x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"x must have shape (..., M, N) with M, N >= 1, got {tuple(x.shape)}")
    m, n = x.shape[-2:]
    C.check_factor("v0", v0, n, "N = x.shape[-1]", x)
    rank = v0.shape[1]
    if u0 is not None:
        C.check_factor("u0", u0, m, "M = x.shape[-2]", x, rank)
    _check_common(iters, solver, num_grad_steps)
    kernel = resolve_kernel(kernel, x)
    if C.want_value_checks(check, x):
        k = _checked_exponent(x, v0, u0, C.check_nonnegative)
        if k:
            kw = dict(iters=iters, kernel=kernel, num_grad_steps=num_grad_steps)
            return _rescaled(nmf, x, v0, u0, k, m, solver, **kw)
    if x.numel() == 0:
        return x.clone()
    if kernel == "reference":
        return _oracle().nmf_loop(x, v0, u0, iters, solver, num_grad_steps)
    if iters == 0 or (kernel == "torch" and rank > 1):  # iters == 0: u0 v0^T
        return loop.nmf_loop(x, v0, u0, iters=iters, solver=solver, num_grad_steps=num_grad_steps)
    if kernel == "triton":
        return _triton().nmf(
            x, v0, u0=u0, iters=iters, solver=solver, num_grad_steps=num_grad_steps
        )
    y = _torch_rank1(x.reshape(-1, m, n), v0[:, 0], u0, iters, solver, num_grad_steps)
    return y.reshape(x.shape)  # (..., M, N)


def _torch_matricized(z, v0, head_dim, patch, shifts, u0, iters, solver, num_grad_steps):
    """Rank-one closed form over the matricization of z = ReLU(x) (B, C, *S)."""
    spatial = tuple(z.shape[2:])
    items = layout.shift_table(shifts, len(spatial))
    g0 = v0[:, 0]
    out = None
    if patch is None:
        # A roll permutes the columns of a global matrix: X_s g0 = X roll(g0, -s) and K is
        # unchanged, so roll g0 instead of the volume.
        mats = layout.matricize(z, head_dim, None)  # (B, H, 1, E, N)
        flat = mats.reshape(-1, head_dim, mats.shape[-1])  # (B*H, E, N)
        for s in items:
            g = torch.roll(
                g0.reshape(spatial), tuple(-v for v in s), dims=tuple(range(len(spatial)))
            )
            g = g.reshape(-1)  # (N,)
            y = _torch_rank1(flat, g, u0, iters, solver, num_grad_steps, scale=1 / len(items))
            out = y if out is None else out + y  # (B*H, E, N)
        return layout.dematricize(out.reshape(mats.shape), spatial, None)
    b, c = z.shape[:2]
    flat = z.reshape(b * c // head_dim, -1)  # (B*H, E*Nvox)
    for s in items:
        idx, inv = _window_gather_index(spatial, patch, s, head_dim, str(z.device))
        mats = _Gather.apply(flat, idx, inv).view(-1, head_dim, math.prod(patch))  # (B*H*nw, E, Pn)
        y = _torch_rank1(mats, g0, u0, iters, solver, num_grad_steps, scale=1 / len(items))
        y = _Gather.apply(y.reshape(flat.shape), inv, idx)  # (B*H, E*Nvox)
        out = y if out is None else out + y
    return out.view(z.shape)


def _loop_matricized(z, v0, head_dim, patch, shifts, u0, iters, solver, num_grad_steps):
    """The batched loop of :mod:`fastnmf.loop` over the matricization of z = ReLU(x)."""
    spatial = tuple(z.shape[2:])
    dims = tuple(range(2, z.dim()))
    items = layout.shift_table(shifts, len(spatial))
    out = None
    for s in items:
        rolled = torch.roll(z, s, dims) if any(s) else z
        mats = layout.matricize(rolled, head_dim, patch)  # (B, H, nw, E, N)
        rec = loop.nmf_loop(mats, v0, u0, iters=iters, solver=solver,
                            num_grad_steps=num_grad_steps)  # fmt: skip
        rec = layout.dematricize(rec, spatial, patch)  # (B, C, *S)
        rec = torch.roll(rec, tuple(-v for v in s), dims) if any(s) else rec
        out = rec if out is None else out + rec
    return out / len(items)


@functools.lru_cache(maxsize=16)
def _window_gather_index(spatial, patch, shift, head_dim: int, device: str):
    """Roll + matricize of one head as a single gather, and its inverse.

    Entry i of ``idx`` is the offset, in a head's (E, Nvox) block, of element i of that head's
    matrices (window-major, then row e, then position p) after rolling the volume by ``shift``:
    ``block.index_select(-1, idx)`` is ``matricize(roll(z, shift))`` in one pass.
    """
    nvox = math.prod(spatial)
    grid = torch.arange(nvox).reshape(spatial)
    rolled = torch.roll(grid, shift, tuple(range(len(spatial))))  # rolled[r] = voxel landing at r
    pos = layout.matricize(rolled[None, None], 1, patch).reshape(-1, 1, math.prod(patch))
    idx = (torch.arange(head_dim).reshape(1, -1, 1) * nvox + pos).reshape(-1)  # (nw*E*Pn,)
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(idx.numel())
    dtype = torch.int32 if idx.numel() < 2**31 else torch.int64
    return idx.to(device=device, dtype=dtype), inv.to(device=device, dtype=dtype)


class _Gather(torch.autograd.Function):
    """``x.index_select(-1, idx)`` for a permutation; the backward gathers with the inverse."""

    @staticmethod
    def forward(ctx, x, idx, inv):
        ctx.save_for_backward(inv)
        return x.index_select(-1, idx)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return grad.contiguous().index_select(-1, inv), None, None


def matricized_nmf(
    x: torch.Tensor,
    v0: torch.Tensor,
    *,
    head_dim: int = 8,
    window: int | Sequence[int] | None = None,
    shifts: Sequence | None = None,
    u0: torch.Tensor | None = None,
    iters: int = 5,
    solver: str = "hals",
    kernel: str = "auto",
    num_grad_steps: int | None = None,
    check: bool | None = None,
    patch_size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Dematricize(NMF(ReLU(Matricize(x)))), averaged over shifted windows.

    Args:
        x: (B, C, *S) before ReLU, 2 or 3 spatial dims, C divisible by ``head_dim``.
        v0: (N, R) initial G with N = prod(window), or prod(S) for a global matricization.
        head_dim: rows E of each matrix (channels per head).
        window: NMF window size (int or one int per spatial dim; S must be divisible by it);
            None matricizes each head globally.
        shifts: None for one unshifted matricization, or a list whose items are None, an int or
            one int per spatial dim: the input is rolled by +s, factorized, the reconstruction
            rolled back by -s, and the results averaged. Swin default: ``[None, P // 2]``.
        u0, iters, solver, kernel, num_grad_steps, check: as in :func:`nmf`; ``check`` here only
            looks for NaN/Inf in x (the ReLU makes any finite input valid).
        patch_size: the deprecated old name of ``window`` (a DeprecationWarning).

    Returns:
        Tensor of the same shape and dtype as ``x``.
    """
    window = C.renamed_argument("window", window, "patch_size", patch_size, where="matricized_nmf")
    spatial = C.check_matricized_input(x, head_dim)
    patch = C.check_window(window, spatial)  # the window; kernels/ and layout.py say "patch"
    shifts = C.check_shifts(shifts, len(spatial))
    n = C.matrix_columns(spatial, patch)
    what = "N = prod(window)" if patch is not None else "N = prod(spatial size)"
    C.check_factor("v0", v0, n, what, x)
    rank = v0.shape[1]
    if u0 is not None:
        C.check_factor("u0", u0, head_dim, "M = head_dim", x, rank)
    _check_common(iters, solver, num_grad_steps)
    kernel = resolve_kernel(kernel, x)
    if kernel != "reference" and custom_op.wanted():  # compile / export: one registered op
        return custom_op.matricized_nmf_op(
            x, v0, head_dim=head_dim, patch=patch, shifts=shifts, u0=u0, iters=iters,
            solver=solver, kernel=kernel, num_grad_steps=num_grad_steps, check=check,
        )  # fmt: skip
    if C.want_value_checks(check, x):
        # any finite x is valid (the ReLU drops negatives); k from the largest positive entry
        k = _checked_exponent(x, v0, u0, C.check_finite)
        if k:
            kw = dict(head_dim=head_dim, window=patch, shifts=shifts, iters=iters)
            kw.update(kernel=kernel, num_grad_steps=num_grad_steps)
            return _rescaled(matricized_nmf, x, v0, u0, k, head_dim, solver, **kw)
    args = (head_dim, patch, shifts, u0, iters, solver, num_grad_steps)  # of every path below
    if kernel == "reference":
        return _oracle().matricized_nmf(x, v0, *args)
    if iters == 0 or (kernel == "torch" and rank > 1):  # iters == 0: u0 v0^T in every window
        return _loop_matricized(torch.relu(x), v0, *args)
    if kernel == "triton":
        return _triton().matricized_nmf(
            x, v0, head_dim=head_dim, patch_size=patch, shifts=shifts, u0=u0, iters=iters,
            solver=solver, num_grad_steps=num_grad_steps,
        )  # fmt: skip
    return _torch_matricized(torch.relu(x), v0, *args)
