"""The context mixers the NMF layer is timed against, and the NMF core as a module."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .timing import sync

HEAD_DIM = 8
WINDOW = 8
ITERS = 5
NMF_KERNELS = ("triton", "torch", "reference", "compiled-reference")
SDPA_BACKENDS = ("flash", "efficient", "math", "cudnn")


_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
    "cudnn": "CUDNN_ATTENTION",
}


def _sdpa(q: torch.Tensor, backend: str) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, _BACKENDS[backend])):
        return F.scaled_dot_product_attention(q, q, q)  # (..., N, E)


@functools.cache
def _sdpa_supported(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int):
    """None if the backend runs forward and backward here, else the reason."""
    q = torch.randn(2, 2, 64, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _sdpa(q, backend).sum().backward()
        sync(device)
    except RuntimeError as err:
        return (
            f"SDPA backend {backend} unavailable for {str(dtype)[6:]} on {device.type}: "
            + (str(err).splitlines()[0][:120])
        )
    return None


def _window_perm(nd: int) -> list[int]:
    # (B, H, E, n1, P, n2, P, ...) -> (B, n1, n2, ..., H, P, P, ..., E)
    return [0, *(3 + 2 * i for i in range(nd)), 1, *(4 + 2 * i for i in range(nd)), 2]


def to_windows(x: torch.Tensor, head_dim: int, window: int) -> torch.Tensor:
    """(B, C, *S) -> (B * windows, C / E, P^d, E): heads of non-overlapping windows."""
    b, c, *s = x.shape
    split = [b, c // head_dim, head_dim]
    for n in s:
        split += [n // window, window]
    x = x.reshape(split).permute(_window_perm(len(s)))  # (B, n1.., H, P.., E)
    return x.reshape(-1, c // head_dim, window ** len(s), head_dim)  # (B nW, H, P^d, E)


def from_windows(y: torch.Tensor, shape: Sequence[int], head_dim: int, window: int):
    """Inverse of :func:`to_windows`: (B * windows, H, P^d, E) -> (B, C, *S)."""
    b, c, *s = shape
    nd = len(s)
    perm = _window_perm(nd)
    inv = sorted(range(len(perm)), key=perm.__getitem__)
    permuted = [b, *(n // window for n in s), c // head_dim, *([window] * nd), head_dim]
    y = y.reshape(permuted).permute(inv)  # (B, H, E, n1, P, n2, P, ...)
    return y.reshape(b, c, *s)


class WindowSDPA(nn.Module):
    """Self-attention in non-overlapping windows through SDPA with one backend.

    ``project=False``: the core, q = k = v = the windowed heads of the input. ``project=True``:
    pointwise qkv (C -> 3C, no bias) and output (C -> C) convs around it. ``window=None``: global.
    """

    def __init__(
        self,
        channels: int,
        *,
        head_dim: int,
        window: int | None,
        backend: str,
        project: bool = False,
        spatial_dims: int = 3,
    ):
        super().__init__()
        self.head_dim, self.window, self.backend = head_dim, window, backend
        conv = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
        self.qkv = conv(channels, 3 * channels, 1, bias=False) if project else None
        self.out = conv(channels, channels, 1) if project else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        if self.window is None:  # (B, H, N, E)
            return x.reshape(b, c // self.head_dim, self.head_dim, -1).transpose(-1, -2)
        return to_windows(x, self.head_dim, self.window)  # (B nW, H, P^d, E)

    def _merge(self, y: torch.Tensor, shape) -> torch.Tensor:
        if self.window is None:
            return y.transpose(-1, -2).reshape(shape)  # (B, C, *S)
        return from_windows(y, shape, self.head_dim, self.window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qkv is None:
            y = self._merge(_sdpa(self._heads(x).contiguous(), self.backend), x.shape)
            return y
        q, k, v = self.qkv(x).chunk(3, dim=1)  # each (B, C, *S)
        q, k, v = (self._heads(t).contiguous() for t in (q, k, v))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, _BACKENDS[self.backend])):
            y = F.scaled_dot_product_attention(q, k, v)  # (B nW, H, P^d, E)
        return self.out(self._merge(y, x.shape))


class MonaiWindowAttention(nn.Module):
    """MONAI SwinUNETR's ``WindowAttention`` on (B, C, *S): channels-last, window partition,
    attention (qkv, relative position bias, softmax, projection), window reverse."""

    def __init__(self, channels: int, *, head_dim: int, window: int, spatial_dims: int = 3):
        super().__init__()
        from monai.networks.nets.swin_unetr import WindowAttention

        self.window = (window,) * spatial_dims
        self.attn = WindowAttention(channels, channels // head_dim, self.window, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from monai.networks.nets.swin_unetr import window_partition, window_reverse

        b, c, *s = x.shape
        perm = [0, *range(2, x.ndim), 1]
        xl = x.permute(perm).contiguous()  # (B, *S, C)
        w = window_partition(xl, self.window)  # (B nW, P^d, C)
        w = self.attn(w, None)  # (B nW, P^d, C)
        y = window_reverse(w, self.window, [b, *s])  # (B, *S, C)
        return y.permute(0, -1, *range(1, x.ndim - 1))  # (B, C, *S)


class NMFCore(nn.Module):
    """The NMF core (``fastnmf.matricized_nmf``) with one kernel; v0 a fixed buffer."""

    def __init__(
        self, variant: str, kernel: str, *, size: Sequence[int], head_dim: int, window: int
    ):
        super().__init__()
        self.kw = dict(head_dim=head_dim, iters=ITERS)
        if variant == "global":
            self.kw.update(window=None, shifts=None)
            n = math.prod(size)
        else:
            self.kw.update(
                window=window, shifts=[None, window // 2] if variant == "swin" else None
            )
            n = window ** len(size)
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("v0", torch.rand(n, 1, generator=gen))
        self.kernel = kernel
        self.fn = None
        if kernel == "compiled-reference":
            _raise_compile_limits()
            from .. import reference

            self.fn = torch.compile(reference.matricized_nmf, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .. import matricized_nmf

        if self.fn is not None:
            kw = self.kw
            return self.fn(x, self.v0, kw["head_dim"], kw["window"], kw["shifts"], None, ITERS)
        return matricized_nmf(x, self.v0, kernel=self.kernel, check=False, **self.kw)


def _raise_compile_limits() -> None:
    # Every shape, dtype and grad mode is a recompilation of the same function: keep them all.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
