"""Factorizer U-Nets (paper sections 3.2-3.4), their inference-time controls and NMF components.

- :func:`factorizer`: a U-Net of :class:`~fastnmf.models.layers.FactorizerBlock` s whose
  context sub-block is a :class:`~fastnmf.models.layers.WrappedNMF` (variant ``"global"``,
  ``"local"`` or ``"swin"``: the matricization).
- :func:`nmf_layers`, :func:`set_kernel`, :func:`set_nmf`, :func:`inference_controls`: the
  inference-time controls of paper section 4.5 / Fig. 8 (iterations T, rank, solver, kernel,
  short-circuited blocks), no retraining.
- :func:`nmf_components`: the spatial NMF components of a block (Fig. 6).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from fastnmf import MatricizedNMF, layout, loop
from fastnmf._checks import KERNELS, SOLVERS, check_choice, check_int

from .layers import FactorizerBlock, WrappedNMF
from .unet import UNet

__all__ = [
    "VARIANTS",
    "factorizer",
    "nmf_layers",
    "wrapped_nmf_blocks",
    "set_kernel",
    "set_nmf",
    "inference_controls",
    "nmf_components",
]

VARIANTS = ("global", "local", "swin")


def mixer_blocks(
    make_mixer: Callable[[int, tuple[int, ...], int | None], nn.Module],
    *,
    spatial_dims: int,
    mlp_ratio: float,
    dropout: float,
    seed: int | None,
    checkpoint: bool = False,
) -> Callable[[int, int, tuple[int, ...], int], nn.Module]:
    """The ``make_block`` of a Factorizer-skeleton :class:`UNet`: block ``index`` is a
    :class:`FactorizerBlock` whose context mixer is ``make_mixer(cout, stage size, seed)``, the
    seed ``seed + index`` (None: drawn from torch's RNG)."""

    def make_block(cin: int, cout: int, size: tuple[int, ...], index: int) -> nn.Module:
        mixer = make_mixer(cout, size, None if seed is None else seed + index)
        return FactorizerBlock(
            cin, cout, mixer=mixer, spatial_dims=spatial_dims, mlp_ratio=mlp_ratio,
            dropout=dropout, checkpoint=checkpoint,
        )  # fmt: skip

    return make_block


def factorizer(
    *,
    in_channels: int,
    out_channels: int,
    spatial_size: Sequence[int],
    variant: str = "swin",
    widths: Sequence[int] = (32, 64, 128, 256, 512),
    head_dim: int = 8,
    window: int = 8,
    shifts: Sequence | str | None = "default",
    rank: int = 1,
    iters: int = 5,
    solver: str = "hals",
    kernel: str = "auto",
    mlp_ratio: float = 2.0,
    dropout: float = 0.1,
    pos_embed: bool = True,
    deep_supervision: int = 3,
    seed: int | None = None,
    checkpoint: bool = False,
) -> UNet:
    """A Factorizer U-Net.

    Args:
        in_channels, out_channels: input modalities and output classes.
        spatial_size: training crop size (2 or 3 entries: 2D or 3D). Sets each stage's size
            (N = prod(stage size) for the global variant) and the position embedding's.
        variant: ``"global"`` (one E x N matrix per head over the whole stage), ``"local"``
            (non-overlapping windows of ``window`` voxels per axis) or ``"swin"`` (windows
            averaged over ``shifts``).
        widths: channels per level (default 32 ... 512: four stride-2 downsamplings, 1/16).
        head_dim: channels per head E (rows of each matrix).
        window: window size P per axis (local and swin); ignored by the global variant.
        shifts: swin only: ``"default"`` ([None, P // 2]) or a list of shifts (None / int /
            tuple), e.g. ``[None, 2, 4, 6]``.
        rank, iters, solver, kernel: of every NMF layer; changeable later (:func:`set_nmf`).
        mlp_ratio: MLP inner width / C.
        dropout: after the wrapped NMF, in the MLP, after the adapters and the position embedding.
        pos_embed: learnable position embedding in the bridge (after its downsampling).
        deep_supervision: output heads at the highest decoder resolutions (1 = none).
        seed: seeds the NMF layers' initial factors (layer i uses seed + i); None: drawn from
            torch's RNG.
        checkpoint: activation checkpointing of every Factorizer block while training (keeps
            only the inputs of each block's two residual branches and recomputes the branches
            in backward): much less memory, about one more forward per step, same results.
    """
    check_choice("variant", variant, VARIANTS)
    check_choice("kernel", kernel, KERNELS)
    check_choice("solver", solver, SOLVERS)
    nd = len(spatial_size)
    levels = len(widths)
    layer_window = None if variant == "global" else window
    layer_shifts = shifts if variant == "swin" else None

    def make_mixer(cout: int, size: tuple[int, ...], layer_seed: int | None) -> nn.Module:
        return WrappedNMF(
            cout, spatial_dims=nd, head_dim=head_dim, window=layer_window, spatial_size=size,
            shifts=layer_shifts, rank=rank, iters=iters, solver=solver, kernel=kernel,
            dropout=dropout, seed=layer_seed,
        )  # fmt: skip

    make_block = mixer_blocks(
        make_mixer, spatial_dims=nd, mlp_ratio=mlp_ratio, dropout=dropout, seed=seed,
        checkpoint=bool(checkpoint),
    )  # fmt: skip
    base = 2 ** (levels - 1)  # the deepest stage is 1 / base of the input
    return UNet(
        in_channels=in_channels, out_channels=out_channels, spatial_size=spatial_size,
        make_block=make_block, widths=widths, deep_supervision=deep_supervision,
        pos_embed=pos_embed, pos_dropout=dropout,
        size_multiple=base * (window if layer_window is not None else 1),
        fixed_size=variant == "global",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Inference-time controls


def wrapped_nmf_blocks(model: nn.Module) -> list[WrappedNMF]:
    """Every :class:`WrappedNMF` of ``model`` in data order (block 0 first)."""
    blocks = model.blocks if isinstance(model, UNet) else list(model.modules())
    found: list[WrappedNMF] = []
    for blk in blocks:
        found.extend(m for m in blk.modules() if isinstance(m, WrappedNMF))
    return found


def nmf_layers(model: nn.Module) -> list[MatricizedNMF]:
    """Every :class:`fastnmf.MatricizedNMF` of ``model`` in data order."""
    return [w.nmf for w in wrapped_nmf_blocks(model)]


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Switch every NMF layer of ``model`` to ``kernel`` (auto / triton / torch / reference)."""
    return set_nmf(model, kernel=kernel)


def _check_blocks(model: nn.Module, blocks: Iterable[int]) -> list[int]:
    n = len(wrapped_nmf_blocks(model))
    chosen = sorted(set(int(b) for b in blocks))
    bad = [b for b in chosen if not -n <= b < n]
    if bad:
        raise ValueError(f"block indices {bad} out of range: this model has NMF blocks 0..{n - 1}")
    return [b % n for b in chosen]


def set_nmf(
    model: nn.Module,
    *,
    iters: int | None = None,
    rank: int | None = None,
    solver: str | None = None,
    kernel: str | None = None,
    skip: Iterable[int] | None = None,
) -> nn.Module:
    """Change every NMF layer in place (None leaves a setting as it is); returns ``model``.

    ``skip``: indices of the blocks whose NMF is short-circuited (identity, as in the paper's
    Fig. 8 layer-removal experiments); every other block is un-skipped. ``skip=None`` keeps the
    current choice. Changing the rank redraws the initial factors from each layer's own seed,
    keeping the existing columns, so restoring the rank restores the model exactly.
    """
    if solver is not None:
        check_choice("solver", solver, SOLVERS)
    if kernel is not None:
        check_choice("kernel", kernel, KERNELS)
    chosen = None if skip is None else set(_check_blocks(model, skip))
    for i, wrapped in enumerate(wrapped_nmf_blocks(model)):
        layer = wrapped.nmf
        if iters is not None:
            layer.iters = check_int("iters", iters, 0)
        if rank is not None and rank != layer.rank:
            layer.rank = rank
        if solver is not None:
            layer.solver = solver
        if kernel is not None:
            layer.kernel = kernel
        if chosen is not None:
            wrapped.bypass = i in chosen
    return model


@contextlib.contextmanager
def inference_controls(model: nn.Module, *, iters: int | None = None, rank: int | None = None,
                       solver: str | None = None, kernel: str | None = None,
                       skip: Iterable[int] | None = None) -> Iterator[nn.Module]:  # fmt: skip
    """Apply :func:`set_nmf` inside a ``with`` block and restore every layer on exit.

    >>> with inference_controls(model, iters=10, skip=[4]):   # doctest: +SKIP
    ...     y = model(x)
    """
    saved = [
        (w.nmf.iters, w.nmf.rank, w.nmf.solver, w.nmf.kernel, w.bypass)
        for w in wrapped_nmf_blocks(model)
    ]
    try:
        yield set_nmf(model, iters=iters, rank=rank, solver=solver, kernel=kernel, skip=skip)
    finally:
        for w, (t, r, s, k, b) in zip(wrapped_nmf_blocks(model), saved, strict=True):
            w.nmf.iters, w.nmf.solver, w.nmf.kernel, w.bypass = t, s, k, b
            if w.nmf.rank != r:
                w.nmf.rank = r


# ----------------------------------------------------------------------------------------------
# Interpretability


@torch.no_grad()
def nmf_components(model: nn.Module, x: torch.Tensor, *, block: int) -> torch.Tensor:
    """The spatial NMF components of block ``block`` for input ``x`` (paper Fig. 6).

    Runs the model on ``x``, takes the input z of the chosen block's NMF layer, and for every
    head recomputes the factors (F, G) of ReLU(Matricize(z)) with that layer's settings (the
    batched loop of :func:`fastnmf.loop.nmf_factors`). Each head's G (N x R per window)
    is put back at the voxel positions its columns came from; with shifted windows every shift's
    map is rolled back by -s and the shifts are averaged, as in the forward.

    Returns:
        (B, heads, R, *S) nonnegative tensor, S the block's spatial size.
    """
    wrapped = wrapped_nmf_blocks(model)
    (index,) = _check_blocks(model, [block])
    layer = wrapped[index].nmf
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    was_training, bypass = model.training, wrapped[index].bypass
    try:
        model.eval()
        wrapped[index].bypass = False
        model(x)
    finally:
        handle.remove()
        model.train(was_training)
        wrapped[index].bypass = bypass
    z = torch.relu(captured[0])  # (B, C, *S)
    spatial = tuple(z.shape[2:])
    dims = tuple(range(2, z.dim()))
    ndim = len(spatial)
    patch = layer.window  # the window, in fastnmf.layout's name
    items = layout.shift_table(layer.resolved_shifts(ndim), ndim)
    b, c = z.shape[:2]
    heads = c // layer.head_dim
    out = None
    for s in items:
        rolled = torch.roll(z, s, dims) if any(s) else z
        mats = layout.matricize(rolled, layer.head_dim, patch)  # (B, H, nw, E, N)
        v0 = layer.v0.to(mats.dtype)
        u0 = layer.u0.to(mats.dtype)
        _, g = loop.nmf_factors(mats, v0, u0, iters=layer.iters, solver=layer.solver)
        maps = layout.dematricize(g.transpose(-1, -2), spatial, patch)  # (B, H*R, *S)
        maps = torch.roll(maps, tuple(-v for v in s), dims) if any(s) else maps
        out = maps if out is None else out + maps
    out = out / len(items)
    return out.reshape(b, heads, layer.rank, *spatial)  # (B, H, R, *S)
