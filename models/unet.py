"""The U-Net skeleton shared by the Factorizers, the Performer and the nnU-Net/ResU-Net baselines.

Layout (paper section 3.4, Fig. 2; widths (32, 64, 128, 256, 512) by default)::

    stem     3^d conv (no bias) in_channels -> widths[0]
    level 0  block(widths[0] -> widths[0])                                 index 0
    level l  2^d stride-2 conv (bias) widths[l-1] -> widths[l], block      index l
             (the last level is the bridge; a position embedding, if any, is added right after
             its downsampling)
    decoder  2^d stride-2 transposed conv widths[l+1] -> widths[l], concatenation with the
             skip [skip, up], block(2 * widths[l] -> widths[l])            index L + (L-2-l)
    heads    1^d convs at the ``deep_supervision`` highest decoder resolutions

Blocks are numbered in the order the data meets them (encoder levels 0..L-1, then decoder levels
L-2..0), as the ``layer`` index of the original code; a 5-level net has blocks 0..8.

In training mode the forward returns the list of logits [full, 1/2, 1/4, ...] (one per
head) when there is more than one head; in eval mode only the full-resolution logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.networks.layers.factories import Conv
from torch import nn

from .layers import PositionEmbedding

__all__ = ["UNet", "BlockFactory"]

#: make_block(in_channels, out_channels, spatial_size, index) -> block module
BlockFactory = Callable[[int, int, tuple[int, ...], int], nn.Module]


def _valid_sizes(size: int, multiple: int) -> str:
    lower = size - size % multiple
    candidates = [v for v in (lower, lower + multiple) if v > 0]
    return " or ".join(str(v) for v in candidates)


def _check_dtype_device(model: nn.Module, x: torch.Tensor) -> None:
    """A TypeError / ValueError naming the input's dtype or device when they differ from the
    network's parameters, or an empty input (instead of a low-level error further in)."""
    p = next(model.parameters(), None)
    if p is None or not isinstance(x, torch.Tensor):
        return
    if not x.is_floating_point():
        raise TypeError(f"the input has dtype {x.dtype}; the network needs a floating input")
    if x.numel() == 0:
        raise ValueError(f"the input is empty (shape {tuple(x.shape)})")
    if x.device != p.device:
        raise ValueError(
            f"the input is on {x.device} but the network's parameters are on {p.device}; "
            "move them together"
        )
    if x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"the input has dtype {x.dtype} but the network's parameters are {p.dtype}; cast "
            f"the input (x.to({p.dtype})) or the network, or run under torch.autocast"
        )


class UNet(nn.Module):
    """Generic U-Net with pluggable blocks; see the module docstring for the layout.

    Args:
        in_channels: input channels (modalities).
        out_channels: output channels (classes).
        spatial_size: the training crop size; its length sets 2D or 3D. Every stage's spatial
            size is derived from it (level l: ``spatial_size // 2**l``).
        make_block: ``make_block(in_ch, out_ch, stage_spatial_size, index)`` builds block
            ``index``.
        widths: channels per level; ``len(widths) - 1`` downsamplings.
        pos_embed: add a learnable position embedding in the bridge (fixes the input size).
        pos_dropout: dropout after the position embedding.
        deep_supervision: number of output heads (1 = none).
        size_multiple: every spatial size must be a multiple of this (e.g. 2**(L-1) x window);
            default ``2**(L-1)``.
        fixed_size: inputs must have exactly ``spatial_size`` (position embedding, global NMF).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        spatial_size: Sequence[int],
        make_block: BlockFactory,
        widths: Sequence[int] = (32, 64, 128, 256, 512),
        pos_embed: bool = False,
        pos_dropout: float = 0.0,
        deep_supervision: int = 3,
        size_multiple: int | None = None,
        fixed_size: bool = False,
    ):
        super().__init__()
        spatial_size = tuple(int(s) for s in spatial_size)
        widths = tuple(int(w) for w in widths)
        if len(spatial_size) not in (2, 3):
            raise ValueError(f"spatial_size must have 2 or 3 entries, got {spatial_size}")
        if len(widths) < 2:
            raise ValueError(f"widths needs at least 2 levels, got {widths}")
        if not 1 <= deep_supervision <= len(widths) - 1:
            raise ValueError(
                f"deep_supervision must be in 1..{len(widths) - 1} for {len(widths)} levels, "
                f"got {deep_supervision}"
            )
        levels = len(widths)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.spatial_size = spatial_size
        self.spatial_dims = nd = len(spatial_size)
        self.widths = widths
        self.size_multiple = size_multiple if size_multiple is not None else 2 ** (levels - 1)
        self.fixed_size = fixed_size or pos_embed
        self._check_spatial(spatial_size, what="spatial_size")

        conv = Conv[Conv.CONV, nd]
        tconv = Conv[Conv.CONVTRANS, nd]
        stage_size = [tuple(s // 2**lvl for s in spatial_size) for lvl in range(levels)]

        self.stem = conv(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        # The downsampling convs carry a bias, as in the original Factorizer code (the paper is
        # silent; 960 parameters at the default widths). No reason to differ: the next block's
        # LayerNorm, over channels, does not remove a per-channel bias, and with it the
        # parameter count of the BraTS model matches the paper's 5.856 M.
        self.down = nn.ModuleList(
            conv(widths[lvl - 1], widths[lvl], kernel_size=2, stride=2, bias=True)
            for lvl in range(1, levels)
        )
        self.pos_embed = (
            PositionEmbedding(widths[-1], stage_size[-1], dropout=pos_dropout)
            if pos_embed
            else None
        )
        self.encoder = nn.ModuleList(
            make_block(widths[lvl], widths[lvl], stage_size[lvl], lvl) for lvl in range(levels)
        )
        dec_levels = list(range(levels - 2, -1, -1))
        self.up = nn.ModuleList(
            tconv(widths[lvl + 1], widths[lvl], kernel_size=2, stride=2) for lvl in dec_levels
        )
        self.decoder = nn.ModuleList(
            make_block(2 * widths[lvl], widths[lvl], stage_size[lvl], levels + i)
            for i, lvl in enumerate(dec_levels)
        )
        self.heads = nn.ModuleList(
            conv(widths[lvl], out_channels, kernel_size=1) for lvl in range(deep_supervision)
        )

    @property
    def blocks(self) -> list[nn.Module]:
        """Every block in data order (encoder levels, then decoder levels from the bridge up)."""
        return [*self.encoder, *self.decoder]

    def _check_spatial(self, spatial: Sequence[int], *, what: str) -> None:
        q = self.size_multiple
        bad = [(d, s) for d, s in enumerate(spatial) if s % q or s == 0]
        if bad:
            d, s = bad[0]
            raise ValueError(
                f"{what} {tuple(spatial)}: dim {d} has size {s}, not a multiple of {q} "
                f"(2**{len(self.widths) - 1} downsamplings"
                + (
                    f" x window {q // 2 ** (len(self.widths) - 1)}"
                    if q > 2 ** (len(self.widths) - 1)
                    else ""
                )
                + f"); nearest sizes that work: {_valid_sizes(s, q)}. Pad or crop the input, "
                "or use sliding-window inference with this model's spatial_size"
            )

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the bad dimension if ``x`` does not fit this network."""
        _check_dtype_device(self, x)
        nd = self.spatial_dims
        if x.dim() != nd + 2:
            raise ValueError(
                f"expected a ({'B, C, H, W' if nd == 2 else 'B, C, D, H, W'}) input for this "
                f"{nd}D network, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels (dim 1), got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        spatial = tuple(x.shape[2:])
        self._check_spatial(spatial, what="input spatial size")
        if self.fixed_size and spatial != self.spatial_size:
            d = next(
                i for i, (a, b) in enumerate(zip(spatial, self.spatial_size, strict=True)) if a != b
            )
            raise ValueError(
                f"input spatial size {spatial} differs from this network's spatial_size "
                f"{self.spatial_size} at dim {d} ({spatial[d]} != {self.spatial_size[d]}); its "
                "position embedding or global NMF fixes the size: use sliding-window inference "
                f"with roi size {self.spatial_size}, or rebuild with spatial_size={spatial}"
            )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Decoder features per level [level 0 (full res), level 1, ...] (the bridge last)."""
        self.check_input(x)
        levels = len(self.widths)
        x = self.stem(x)
        skips = []
        for lvl in range(levels):
            if lvl > 0:
                x = self.down[lvl - 1](x)
            if lvl == levels - 1 and self.pos_embed is not None:
                x = self.pos_embed(x)
            x = self.encoder[lvl](x)
            skips.append(x)
        feats = list(skips)
        for i, lvl in enumerate(range(levels - 2, -1, -1)):
            x = self.up[i](x)
            block = self.decoder[i]
            if hasattr(block, "forward_skip"):  # block(cat([skip, x])) without the copy
                x = block.forward_skip(skips[lvl], x)
            else:
                x = block(torch.cat([skips[lvl], x], dim=1))  # (B, 2 C_l, *S_l) in
            feats[lvl] = x
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        feats = self.forward_features(x)
        if self.training and len(self.heads) > 1:
            return [head(feats[j]) for j, head in enumerate(self.heads)]
        return self.heads[0](feats[0])

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"spatial_size={self.spatial_size}, widths={self.widths}, "
            f"size_multiple={self.size_multiple}, fixed_size={self.fixed_size}, "
            f"params={sum(p.numel() for p in self.parameters()) / 1e6:.3f}M"
        )
