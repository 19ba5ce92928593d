"""Building blocks of the Factorizer networks and the Performer baseline.

- :class:`ChannelLayerNorm`: LayerNorm over the channels of a (B, C, *S) tensor.
- :class:`SkipAdapter`: a decoder block's pointwise conv of cat([skip, x]) as two convs.
- :class:`MLP`: pointwise conv -> GELU -> dropout -> pointwise conv -> dropout (Eq. 5).
- :class:`WrappedNMF`: pointwise conv in -> matricized NMF -> pointwise conv out -> dropout
  (paper Eq. 6), the context sub-block of a Factorizer.
- :class:`FavorAttention`: multi-head self-attention over all voxels with FAVOR+ (positive
  orthogonal random features, Choromanski et al. 2020), the context sub-block of the Performer.
- :class:`FactorizerBlock`: [adapter] -> x + mixer(LN(x)) -> x + MLP(LN(x)) (Eq. 4-5); with a
  :class:`FavorAttention` mixer it is the ViT block of the Performer baseline.
- :class:`PositionEmbedding`: a learnable (1, C, *S) tensor added to the input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from monai.networks.layers.factories import Conv
from torch import nn

from fastnmf import MatricizedNMF
from fastnmf._checks import check_heads, renamed_argument
from fastnmf.channel_norm import channel_layer_norm

from .fused import (
    fused_adapter,
    fused_adapter_ok,
    fused_context,
    fused_context_ok,
    fused_mlp,
    fused_mlp_ok,
)
from .recompute import lean_mlp_supported, mlp_branch, norm_conv, use_lean

__all__ = [
    "pointwise_conv",
    "ChannelLayerNorm",
    "SkipAdapter",
    "MLP",
    "WrappedNMF",
    "FavorAttention",
    "FactorizerBlock",
    "PositionEmbedding",
    "orthogonal_random_features",
]


def pointwise_conv(
    in_channels: int, out_channels: int, *, spatial_dims: int, bias: bool
) -> nn.Module:
    """A 1 x 1 (x 1) convolution: a per-voxel linear map of the channels."""
    return Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=1, bias=bias)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dim of a channels-first (B, C, *S) tensor, in place of layout:
    :func:`fastnmf.channel_norm.channel_layer_norm` (a Triton kernel on CUDA) reads x and
    writes y as (B, C, *S), so nothing is transposed or copied and the next pointwise conv gets a
    contiguous tensor. The parameters stay those of ``self.norm`` (an ``nn.LayerNorm(C)``: the
    same names and shapes as before, so old checkpoints load)."""

    def __init__(self, channels: int, *, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps)


class SkipAdapter(nn.Module):
    """The decoder blocks' adapter: a pointwise conv without bias of ``cat([skip, x], dim=1)``
    (C_skip + C_x -> C_out), its weight held as two parameters, ``weight_skip`` (C_out, C_skip,
    1, ...) and ``weight_x`` (C_out, C_x, 1, ...). :meth:`pair` runs one conv per input and sums
    them: neither forward nor backward slices or concatenates anything (a sliced weight's
    gradient is written into a zero-filled full-size tensor, once per slice, then summed).

    The state dict holds the one weight of the ``nn.Conv`` this replaces (``weight``, (C_out,
    C_skip + C_x, 1, ...)): merged when saved, split when loaded, so old and new checkpoints
    load alike. The parameters start as that conv's weight would (the same random draws).
    """

    def __init__(self, skip_channels: int, x_channels: int, out_channels: int, *,
                 spatial_dims: int):  # fmt: skip
        super().__init__()
        full = pointwise_conv(skip_channels + x_channels, out_channels, spatial_dims=spatial_dims,
                              bias=False).weight.detach()  # fmt: skip
        self.weight_skip = nn.Parameter(full[:, :skip_channels].clone())  # (C_out, C_skip, 1..)
        self.weight_x = nn.Parameter(full[:, skip_channels:].clone())  # (C_out, C_x, 1, ...)
        self.register_state_dict_post_hook(_merge_adapter_weight)
        self.register_load_state_dict_pre_hook(_split_adapter_weight)

    @property
    def split(self) -> tuple[int, int]:
        return self.weight_skip.shape[1], self.weight_x.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The conv of an already concatenated (B, C_skip + C_x, *S) input."""
        weight = torch.cat([self.weight_skip, self.weight_x], dim=1)  # (C_out, C_in, 1, ...)
        return _pointwise(x)(x, weight)

    def pair(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``forward(torch.cat([skip, x], dim=1))`` without the concatenation."""
        if (skip.shape[1], x.shape[1]) != self.split:
            raise ValueError(
                f"the adapter takes (skip, x) with {self.split[0]} and {self.split[1]} channels, "
                f"got {skip.shape[1]} and {x.shape[1]} (shapes {tuple(skip.shape)}, "
                f"{tuple(x.shape)})"
            )
        return _pointwise(skip)(skip, self.weight_skip) + _pointwise(x)(x, self.weight_x)

    def extra_repr(self) -> str:
        return f"skip={self.split[0]}, x={self.split[1]}, out={self.weight_x.shape[0]}"


def _pointwise(x: torch.Tensor):
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"expected a (B, C, *S) input with 1-3 spatial dims, got {tuple(x.shape)}")
    return (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]


def _merge_adapter_weight(module, state_dict, prefix, local_metadata) -> None:
    ws, wx = state_dict.pop(prefix + "weight_skip"), state_dict.pop(prefix + "weight_x")
    state_dict[prefix + "weight"] = torch.cat([ws.detach(), wx.detach()], dim=1)


def _split_adapter_weight(module, state_dict, prefix, local_metadata, strict, missing_keys,
                          unexpected_keys, error_msgs) -> None:  # fmt: skip
    key = prefix + "weight"
    if key not in state_dict:
        return
    w = state_dict.pop(key)
    cs, cx = module.split
    expected = (module.weight_x.shape[0], cs + cx, *module.weight_x.shape[2:])
    if tuple(w.shape) != expected:
        error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                          f"{tuple(w.shape)}, the adapter's weight is {expected}")  # fmt: skip
        return
    state_dict[prefix + "weight_skip"], state_dict[prefix + "weight_x"] = w[:, :cs], w[:, cs:]


class MLP(nn.Module):
    """Pointwise conv (C -> ratio * C), GELU, dropout, pointwise conv (-> C), dropout."""

    def __init__(self, channels: int, *, spatial_dims: int, ratio: float, dropout: float):
        super().__init__()
        hidden = int(ratio * channels)
        if hidden < 1:
            raise ValueError(f"mlp_ratio={ratio} gives {hidden} hidden channels for C={channels}")
        self.fc1 = pointwise_conv(channels, hidden, spatial_dims=spatial_dims, bias=True)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = pointwise_conv(hidden, channels, spatial_dims=spatial_dims, bias=True)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class WrappedNMF(nn.Module):
    """``y = Dropout(W_out Dematricize(NMF(ReLU(Matricize(W_in x)))))`` (paper Eq. 6).

    ``W_in`` is a pointwise conv without bias and ``W_out`` one with bias, both C -> C (the
    original code's ``ratio=1``). The middle is :class:`fastnmf.MatricizedNMF`, kept as
    ``self.nmf`` so that its rank, iters, solver and kernel can be changed at any time.

    ``bypass = True`` short-circuits the factorization (the NMF becomes the identity, leaving
    ``W_out ReLU(W_in x)``), which is how the paper removes the NMF of a block at inference time
    (Fig. 8, "removing one layer" and "keeping up to layer L").
    """

    def __init__(
        self,
        channels: int,
        *,
        spatial_dims: int,
        head_dim: int,
        window: int | Sequence[int] | None = None,
        spatial_size: Sequence[int] | None,
        shifts: Sequence | str | None,
        rank: int,
        iters: int,
        solver: str,
        kernel: str,
        dropout: float,
        seed: int | None = None,
        patch_size: int | Sequence[int] | None = None,
    ):
        super().__init__()
        # patch_size: the old name of window (a DeprecationWarning); window None: global
        window = renamed_argument("window", window, "patch_size", patch_size, where="WrappedNMF")
        check_heads(channels, head_dim)
        self.in_proj = pointwise_conv(channels, channels, spatial_dims=spatial_dims, bias=False)
        self.nmf = MatricizedNMF(
            head_dim=head_dim,
            window=window,
            spatial_size=None if window is not None else spatial_size,
            spatial_dims=spatial_dims,
            shifts=shifts,
            rank=rank,
            iters=iters,
            solver=solver,
            kernel=kernel,
            seed=seed,
        )
        self.out_proj = pointwise_conv(channels, channels, spatial_dims=spatial_dims, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.bypass = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after_in_proj(self.in_proj(x))  # in_proj(x): (B, C, *S)

    def after_in_proj(self, z: torch.Tensor) -> torch.Tensor:
        """The layer after ``in_proj``: NMF (or ReLU when bypassed), ``out_proj``, dropout."""
        z = torch.relu(z) if self.bypass else self.nmf(z)
        return self.dropout(self.out_proj(z))

    def extra_repr(self) -> str:
        return f"bypass={self.bypass}"


def orthogonal_random_features(
    num_features: int, dim: int, *, generator: torch.Generator
) -> torch.Tensor:
    """(num_features, dim): rows orthogonal in blocks of ``dim``, norms chi(dim)-distributed.

    The orthogonal random features of FAVOR+ (Choromanski et al. 2020, section 2.4): each block
    of ``dim`` rows is the Q of a Gaussian matrix's QR decomposition, and every row is rescaled
    to the norm of an independent Gaussian vector so that rows are marginally N(0, I).
    """
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        gauss = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # sign fix: Haar-distributed Q
        blocks.append(q.T)  # (dim, dim), orthonormal rows
    w = torch.cat(blocks, dim=0)[:num_features]  # (m, dim)
    norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return (w * norms.unsqueeze(1)).float()  # (m, dim)


class FavorAttention(nn.Module):
    """Global multi-head self-attention over all voxels, approximated by FAVOR+.

    softmax(q k^T / sqrt(E)) v is replaced by D^-1 phi(q) (phi(k)^T v) with the positive random
    features phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m), x' = x / E^(1/4), W the
    (m, E) orthogonal random features (a buffer drawn once from a private generator; m =
    ``num_features``, default int(E ln E) as in the reference implementation). Cost is linear in
    the number of voxels. Projections: q, k, v pointwise convs without bias (one fused C -> 3C
    conv) and an output pointwise conv with bias, then dropout.
    """

    def __init__(
        self,
        channels: int,
        *,
        spatial_dims: int,
        head_dim: int,
        dropout: float,
        num_features: int | None = None,
        seed: int | None = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        check_heads(channels, head_dim)
        self.head_dim = head_dim
        self.num_heads = channels // head_dim
        m = num_features if num_features is not None else max(1, int(head_dim * math.log(head_dim)))
        gen = torch.Generator()
        gen.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed)
        self.register_buffer("projection", orthogonal_random_features(m, head_dim, generator=gen))
        self.eps = eps
        self.qkv = pointwise_conv(channels, 3 * channels, spatial_dims=spatial_dims, bias=False)
        self.out_proj = pointwise_conv(channels, channels, spatial_dims=spatial_dims, bias=True)
        self.dropout = nn.Dropout(dropout)

    def _features(self, x: torch.Tensor, *, is_query: bool) -> torch.Tensor:
        """Positive random features of x (B, H, N, E) -> (B, H, N, m)."""
        x = x * self.head_dim**-0.25
        proj = x @ self.projection.to(x.dtype).T  # (B, H, N, m)
        diag = 0.5 * (x * x).sum(-1, keepdim=True)  # (B, H, N, 1)
        # A constant shift per query row (or per key matrix) cancels in D^-1; it only prevents
        # overflow of the exponential.
        if is_query:
            stab = proj.amax(dim=-1, keepdim=True).detach()  # (B, H, N, 1)
        else:
            stab = proj.amax(dim=(-2, -1), keepdim=True).detach()  # (B, H, 1, 1)
        m = proj.shape[-1]
        return (torch.exp(proj - diag - stab) + self.eps) / math.sqrt(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        qkv = self.qkv(x).reshape(b, 3, self.num_heads, self.head_dim, -1)  # (B, 3, H, E, N)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, H, N, E)
        qf = self._features(q, is_query=True)  # (B, H, N, m)
        kf = self._features(k, is_query=False)  # (B, H, N, m)
        kv = kf.transpose(-1, -2) @ v  # (B, H, m, E)
        norm = qf @ kf.sum(dim=-2).unsqueeze(-1)  # (B, H, N, 1)
        out = (qf @ kv) / norm  # (B, H, N, E)
        out = out.transpose(-1, -2).reshape(b, c, *spatial)  # (B, C, *S)
        return self.dropout(self.out_proj(out))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, features={self.projection.shape[0]}"
        )


class FactorizerBlock(nn.Module):
    """A Factorizer block (Eq. 4-5): ``x = x + mixer(LN(x)); x = x + MLP(LN(x))``.

    With ``in_channels != out_channels`` (decoder blocks, after the skip concatenation) a
    pointwise conv without bias and a dropout first map the input to ``out_channels``, as in the
    original code (a :class:`SkipAdapter`: ``skip_channels`` of the input come from the skip,
    default ``in_channels - out_channels``, the U-Net's). ``mixer`` is a :class:`WrappedNMF`
    for a Factorizer, a :class:`FavorAttention` for the Performer baseline.

    ``checkpoint=True`` (activation checkpointing, :func:`torch.utils.checkpoint.checkpoint`):
    while training, only the inputs of the two residual branches (adapter + context, MLP) are
    kept for backward and each branch is run again during backward, so activations are held one
    branch at a time. Results and gradients are the same; a training step costs about one more
    forward.

    Without it, eager training still keeps less (:mod:`~fastnmf.models.recompute`): the MLP
    branch and LN1 -> the NMF mixer's in-projection keep only their input and recompute the rest
    in backward (bit for bit the same results; evaluation, torch.compile and export run the
    plain modules). On a GPU the block's glue runs as fused ops instead (:mod:`~fastnmf.models.
    fused`: the MLP branch with its residual; LN1 + in-projection and out-projection + dropout +
    residual around the NMF layer; a decoder block's skip adapter; Philox dropout masks).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        mixer: nn.Module,
        spatial_dims: int,
        mlp_ratio: float,
        dropout: float,
        checkpoint: bool = False,
        skip_channels: int | None = None,
    ):
        super().__init__()
        if in_channels != out_channels:
            if skip_channels is None:  # the U-Net's decoder: skip and x of C_out channels each
                skip_channels = in_channels - out_channels
            if not 0 < skip_channels < in_channels:
                raise ValueError(f"skip_channels={skip_channels} must be in 1..{in_channels - 1}")
            self.adapter = nn.Sequential(
                SkipAdapter(skip_channels, in_channels - skip_channels, out_channels,
                            spatial_dims=spatial_dims),
                nn.Dropout(dropout),
            )  # fmt: skip
        else:
            self.adapter = nn.Identity()
        self.norm1 = ChannelLayerNorm(out_channels)
        self.mixer = mixer
        self.norm2 = ChannelLayerNorm(out_channels)
        self.mlp = MLP(out_channels, spatial_dims=spatial_dims, ratio=mlp_ratio, dropout=dropout)

        self.checkpoint = checkpoint

    def _lean(self, x: torch.Tensor) -> bool:
        """Eager training without block checkpointing: the branches keep less for backward and
        recompute cheap parts there (same results; models/recompute.py); with checkpointing
        the whole branches are recomputed already."""
        return not self.checkpoint and use_lean(self, x)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.mixer, WrappedNMF) and self._lean(x):
            return self.mixer.after_in_proj(norm_conv(x, self.norm1, self.mixer.in_proj))
        return self.mixer(self.norm1(x))

    def _add_mix(self, x: torch.Tensor) -> torch.Tensor:
        """``x + mixer(norm1(x))``: fused ops around the NMF layer in eager training on a GPU."""
        if isinstance(self.mixer, WrappedNMF) and not self.checkpoint and fused_context_ok(x, self):
            return fused_context(x, self.norm1, self.mixer)
        return x + self._mix(x)

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_mix(self.adapter(x))

    def _context_skip(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # the adapter's 1x1 conv of cat([skip, x]) as the sum of its two halves' convs: no
        # concatenated copy is written (or kept for backward), no weight sliced
        if not self.checkpoint and fused_adapter_ok(skip, x, self):  # eager training on a GPU
            return self._add_mix(fused_adapter(skip, x, self.adapter))
        conv, drop = self.adapter
        return self._add_mix(drop(conv.pair(skip, x)))

    def forward_skip(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``forward(torch.cat([skip, x], dim=1))`` of a decoder block, without the
        concatenation (the U-Net calls this)."""
        if isinstance(self.adapter, nn.Identity):
            return self(torch.cat([skip, x], dim=1))  # (B, C_skip + C_x, *S)
        if self.checkpoint and self.training and torch.is_grad_enabled():
            ckpt = torch.utils.checkpoint.checkpoint
            x = ckpt(self._context_skip, skip, x, use_reentrant=False)
            return ckpt(self._mlp, x, use_reentrant=False)
        return self._mlp(self._context_skip(skip, x))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if not self.checkpoint and fused_mlp_ok(x, self.mlp):  # eager training on a GPU
            return fused_mlp(x, self.norm2, self.mlp)
        if self._lean(x) and lean_mlp_supported(self.mlp):
            return x + mlp_branch(x, self.norm2, self.mlp)
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            # each residual branch keeps only its input for backward and is run again there
            # (same dropout masks: the RNG state is restored); two checkpoints rather than one
            # so that a recomputation holds half a block's activations at a time
            ckpt = torch.utils.checkpoint.checkpoint
            x = ckpt(self._context, x, use_reentrant=False)
            return ckpt(self._mlp, x, use_reentrant=False)
        return self._mlp(self._context(x))


class PositionEmbedding(nn.Module):
    """A learnable (1, C, *S) embedding added to the input (init N(0, 1) as in the original)."""

    def __init__(self, channels: int, spatial_size: Sequence[int], *, dropout: float = 0.0):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, channels, *spatial_size))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != self.pos.shape[1:]:
            raise ValueError(
                f"the position embedding has shape {tuple(self.pos.shape[1:])} (C, *S) but the "
                f"bridge input has shape {tuple(x.shape[1:])}"
            )
        return self.dropout(x + self.pos)
