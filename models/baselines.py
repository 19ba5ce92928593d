"""Baselines of the paper's comparisons, built like the Factorizers.

- :func:`nnunet`: the Factorizer's U-Net skeleton with blocks of two 3^d convs, each followed
  by GroupNorm(8) and LeakyReLU(0.01) (MONAI's ``UnetBasicBlock``), no position embedding.
- :func:`resunet`: the same with a residual connection (MONAI's ``UnetResBlock``: a 1^d conv
  + GroupNorm on the shortcut where the channels change).
- :func:`performer`: the Factorizer skeleton whose context sub-block is FAVOR+ self-attention
  over all voxels (:class:`~fastnmf.models.layers.FavorAttention`).
- :func:`unetr`, :func:`swin_unetr`, :func:`segresnet`: MONAI's networks, configured as in the
  original code's BraTS configs (UNETR feature_size 32; SwinUNETR feature_size 48, depths
  (2, 2, 2, 2)) and, for SegResNet, Myronenko's BraTS configuration (init_filters 32, blocks
  down (1, 2, 2, 4), up (1, 1, 1)). They have no deep supervision: one tensor out in both modes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock
from monai.networks.nets import UNETR, SegResNet, SwinUNETR
from torch import nn

from .factorizer import mixer_blocks
from .layers import FavorAttention
from .unet import UNet, _check_dtype_device

__all__ = ["nnunet", "resunet", "performer", "unetr", "swin_unetr", "segresnet", "MonaiNet"]

_NORM = ("group", {"num_groups": 8})
_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


def _conv_unet_builder(block_cls, name: str, doc: str):
    """A convolutional U-Net builder whose every block is ``block_cls`` (GroupNorm, LeakyReLU)."""

    def build(
        *,
        in_channels: int,
        out_channels: int,
        spatial_size: Sequence[int],
        widths: Sequence[int] = (32, 64, 128, 256, 512),
        deep_supervision: int = 3,
    ) -> UNet:
        nd = len(spatial_size)
        if any(w % _NORM[1]["num_groups"] for w in widths):
            raise ValueError(f"widths {tuple(widths)} must be multiples of 8 (GroupNorm groups)")

        def make_block(cin: int, cout: int, size: tuple[int, ...], index: int) -> nn.Module:
            return block_cls(nd, cin, cout, kernel_size=3, stride=1, norm_name=_NORM,
                             act_name=_ACT)  # fmt: skip

        io = dict(in_channels=in_channels, out_channels=out_channels, spatial_size=spatial_size)
        arch = dict(make_block=make_block, widths=widths, deep_supervision=deep_supervision)
        return UNet(**io, **arch, pos_embed=False)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    return build


nnunet = _conv_unet_builder(
    UnetBasicBlock,
    "nnunet",
    "U-Net with (3^d conv -> GroupNorm -> LeakyReLU) x 2 blocks (nnU-Net style).",
)
resunet = _conv_unet_builder(
    UnetResBlock, "resunet", "U-Net with residual (3^d conv -> GroupNorm -> LeakyReLU) x 2 blocks."
)


def performer(
    *,
    in_channels: int,
    out_channels: int,
    spatial_size: Sequence[int],
    widths: Sequence[int] = (32, 64, 128, 256, 512),
    head_dim: int = 8,
    num_features: int | None = None,
    mlp_ratio: float = 2.0,
    dropout: float = 0.1,
    pos_embed: bool = True,
    deep_supervision: int = 3,
    seed: int | None = None,
) -> UNet:
    """The Factorizer skeleton with ViT blocks whose attention is FAVOR+ (global, all voxels)."""
    nd = len(spatial_size)

    def make_mixer(cout: int, size: tuple[int, ...], layer_seed: int | None) -> nn.Module:
        return FavorAttention(
            cout, spatial_dims=nd, head_dim=head_dim, dropout=dropout, num_features=num_features,
            seed=layer_seed,
        )  # fmt: skip

    make_block = mixer_blocks(
        make_mixer, spatial_dims=nd, mlp_ratio=mlp_ratio, dropout=dropout, seed=seed
    )
    io = dict(in_channels=in_channels, out_channels=out_channels, spatial_size=spatial_size)
    arch = dict(make_block=make_block, widths=widths, deep_supervision=deep_supervision)
    return UNet(**io, **arch, pos_embed=pos_embed, pos_dropout=dropout)


class MonaiNet(nn.Module):
    """A MONAI network with this package's input checks (channels, dims, size multiple)."""

    def __init__(
        self,
        net: nn.Module,
        *,
        in_channels: int,
        out_channels: int,
        spatial_size: Sequence[int],
        size_multiple: int,
        fixed_size: bool,
    ):
        super().__init__()
        self.net = net
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.spatial_size = tuple(spatial_size)
        self.spatial_dims = len(self.spatial_size)
        self.size_multiple = size_multiple
        self.fixed_size = fixed_size
        self.check_input(torch.empty(1, in_channels, *self.spatial_size, device="meta"))

    def check_input(self, x: torch.Tensor) -> None:
        nd = self.spatial_dims
        if x.dim() != nd + 2:
            raise ValueError(f"expected a {nd}D input (B, C, *S), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels (dim 1), got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        q = self.size_multiple
        for d, s in enumerate(x.shape[2:]):
            if s % q or s == 0:
                lower = s - s % q
                ok = " or ".join(str(v) for v in (lower, lower + q) if v > 0)
                raise ValueError(
                    f"input spatial size {tuple(x.shape[2:])}: dim {d} has size {s}, not a "
                    f"multiple of {q}; nearest sizes that work: {ok}"
                )
        if self.fixed_size and tuple(x.shape[2:]) != self.spatial_size:
            raise ValueError(
                f"input spatial size {tuple(x.shape[2:])} differs from this network's "
                f"img_size {self.spatial_size}; use sliding-window inference with that roi size"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_dtype_device(self, x)
        self.check_input(x)
        return self.net(x)


def _monai(
    cls, *, in_channels: int, out_channels: int, spatial_size: Sequence[int], size_multiple: int,
    fixed_size: bool, **kwargs,
) -> MonaiNet:
    """MONAI's ``cls(in_channels, out_channels, spatial_dims, **kwargs)`` in a MonaiNet."""
    io = dict(in_channels=in_channels, out_channels=out_channels)
    net = cls(**io, spatial_dims=len(spatial_size), **kwargs)
    return MonaiNet(
        net, **io, spatial_size=spatial_size, size_multiple=size_multiple, fixed_size=fixed_size
    )


def unetr(
    *,
    in_channels: int,
    out_channels: int,
    spatial_size: Sequence[int],
    feature_size: int = 32,
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_heads: int = 12,
    dropout: float = 0.0,
) -> MonaiNet:
    """MONAI UNETR (16^d patches, ViT-B encoder); the original BraTS config uses feature_size 32."""
    io = dict(in_channels=in_channels, out_channels=out_channels, spatial_size=spatial_size)
    return _monai(
        UNETR, **io, size_multiple=16, fixed_size=True, img_size=tuple(spatial_size),
        feature_size=feature_size, hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads,
        dropout_rate=dropout,
    )  # fmt: skip


def swin_unetr(
    *,
    in_channels: int,
    out_channels: int,
    spatial_size: Sequence[int],
    feature_size: int = 48,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int = 7,
    dropout: float = 0.0,
) -> MonaiNet:
    """MONAI SwinUNETR; the original BraTS config uses feature_size 48, depths (2, 2, 2, 2)."""
    io = dict(in_channels=in_channels, out_channels=out_channels, spatial_size=spatial_size)
    return _monai(
        SwinUNETR, **io, size_multiple=32, fixed_size=False, feature_size=feature_size,
        depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
        drop_rate=dropout,
    )  # fmt: skip


def segresnet(
    *,
    in_channels: int,
    out_channels: int,
    spatial_size: Sequence[int],
    init_filters: int = 32,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] = (1, 1, 1),
    dropout: float | None = None,
) -> MonaiNet:
    """MONAI SegResNet in Myronenko's BraTS configuration (init_filters 32)."""
    io = dict(in_channels=in_channels, out_channels=out_channels, spatial_size=spatial_size)
    return _monai(
        SegResNet, **io, size_multiple=2 ** (len(blocks_down) - 1), fixed_size=False,
        init_filters=init_filters, dropout_prob=dropout, blocks_down=tuple(blocks_down),
        blocks_up=tuple(blocks_up),
    )  # fmt: skip
