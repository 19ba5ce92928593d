"""Benchmark cases, runners and the profiling report (``fastnmf profile``, issue 6).

One place defines what is measured; both the pytest-benchmark suites (``bench/bench_layers.py``,
``bench/bench_models.py``) and ``fastnmf profile`` take their cases and their code from here.

Layer suite: context mixers at equal input ``(B, C, *S)`` and head dim E (output the same shape).
Two scopes, named in every row:

- ``core``: the context-mixing core alone, no projections. ``nmf-swin`` / ``nmf-local`` /
  ``nmf-global``: ``fastnmf.matricized_nmf`` (ReLU, matricize, rank-one NMF with T = 5,
  dematricize; swin = 8^3 windows averaged over the shifts ``[None, 4]``, local = the same
  windows unshifted, global = one E x prod(S) matrix per head), one row per kernel (triton, torch,
  reference, compiled-reference = ``torch.compile`` of the literal loop). ``sdpa-window``:
  self-attention in the same non-overlapping 8^3 windows (one window configuration: a Swin layer
  shifts every other layer, so the NMF's two shifts do twice its work) with C / E heads of dim E,
  ``q = k = v`` = the windowed heads of x (no projections), through
  ``torch.nn.functional.scaled_dot_product_attention`` under one ``sdpa_kernel`` backend per row
  (flash, efficient, math, cudnn). Sharing q, k and v is a lower bound on what attention keeps
  for backward (with projections q, k, v are three tensors), so the comparison favours attention.
  ``sdpa-global``: the same over all voxels (N = prod(S)), run only where the estimate of its
  memory and work fits (the row says why not otherwise).
- ``layer``: the whole context sub-block with its projections. ``nmf-swin-layer``: fastnmf's
  ``WrappedNMF`` (pointwise W_in, swin NMF, pointwise W_out). ``sdpa-window-layer``: pointwise
  qkv (C -> 3C) and output convs around windowed SDPA. ``monai-window``: MONAI SwinUNETR's
  ``WindowAttention`` (qkv and output linear layers, relative position bias, eager softmax) on the
  same windows. ``favor``: FAVOR+ (Performer; global, linear in N) from
  :class:`fastnmf.models.FavorAttention` with its projections.

Passes: ``fwd`` (no grad) and ``fwdbwd`` (forward, then backward of a random cotangent into the
input and the parameters). Figures: median time (synchronised: CUDA events on a GPU), voxels/s,
peak memory above what was allocated before the call (input, cotangent and weights excluded;
GPU only), memory kept for backward (the distinct storages autograd saves), and for the NMF core
GB/s (input read once and output written once per pass; five tensor passes for fwd+bwd) as % of
the device's copy bandwidth.

Model suite: a training step (forward, deep-supervision BCE loss, backward, AdamW step) at the
model's patch (GPU: 128^3, batch 2) and sliding-window inference (MONAI, 50 % overlap, gaussian
blending) over one 4 x 240 x 240 x 155 volume; CPU: small models at 16^3 - 32^3. Figures: step
time, samples/s (training patches or inferred volumes per second), peak memory (absolute,
``torch.cuda.max_memory_allocated`` after a reset; GPU only), parameters and forward FLOPs at
batch 1 (:func:`fastnmf.models.count_flops`, NMF counted as the literal loop).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LayerCase",
    "ModelCase",
    "Unsupported",
    "pick_device",
    "layer_cases",
    "model_cases",
    "prepare_layer",
    "prepare_model",
    "run_layer_case",
    "run_model_case",
    "run_suite",
    "figures",
    "environment",
    "write_report",
    "sync",
    "median_ms",
    "copy_bandwidth_gbs",
    "saved_bytes",
    "peak_bytes",
]

HEAD_DIM = 8
WINDOW = 8
ITERS = 5
NMF_KERNELS = ("triton", "torch", "reference", "compiled-reference")
SDPA_BACKENDS = ("flash", "efficient", "math", "cudnn")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("fwd", "fwdbwd")
MODEL_TASKS = ("train", "infer")
INFER_VOLUME = (240, 240, 155)


class Unsupported(Exception):
    """A case that cannot run here (backend, dtype or device missing, too big): skip it."""


# ----------------------------------------------------------------------------------------------
# timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 10, warmup: int = 2):
    """Median wall time of ``fn`` in ms, synchronised (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Device copy bandwidth (read + write bytes per second) of a large clone, GB/s."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    ms = median_ms(lambda: x.clone(), device, repeats=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


@functools.cache
def _copy_bw(device: torch.device) -> float:
    return copy_bandwidth_gbs(device, 256 * 2**20 if device.type == "cuda" else 32 * 2**20)


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd keeps for backward while running ``fn``."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def peak_bytes(fn: Callable[[], object], device: torch.device, *, absolute: bool = False):
    """Peak memory allocated while ``fn`` runs on a GPU (None on CPU); above the memory already
    allocated before the call unless ``absolute``."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = 0 if absolute else torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    """Device name, versions and the git commit: recorded with every result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    root = Path(__file__).resolve().parents[2]
    commit, dirty = os.environ.get("FASTNMF_COMMIT") or None, None  # e.g. a copy without .git
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if head:
            commit = head
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            dirty = bool(status.strip())
    from .. import __version__

    return {
        "device": _device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "fastnmf": __version__,
        "commit": commit,
        "dirty": dirty,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ----------------------------------------------------------------------------------------------
# layer cases


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """One context mixer at one input shape, dtype and pass."""

    mixer: str  # see MIXERS
    impl: str  # NMF kernel or SDPA backend ("-" where there is one implementation)
    batch: int
    channels: int
    size: int  # cubic spatial edge S
    dtype: str  # "fp32" | "bf16" | "fp16"
    pass_: str  # "fwd" | "fwdbwd"
    head_dim: int = HEAD_DIM
    window: int = WINDOW

    @property
    def scope(self) -> str:
        return MIXERS[self.mixer][0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, self.channels, self.size, self.size, self.size)

    @property
    def voxels(self) -> int:
        return self.batch * self.size**3

    @property
    def id(self) -> str:
        return (
            f"{self.mixer}-{self.impl}-b{self.batch}-c{self.channels}-s{self.size}-"
            f"{self.dtype}-{self.pass_}"
        )


MIXERS: dict[str, tuple[str, tuple[str, ...], str]] = {
    # name: (scope, implementations, what it is)
    "nmf-swin": ("core", NMF_KERNELS, "matricized_nmf, 8^3 windows, shifts [None, 4]"),
    "nmf-local": ("core", NMF_KERNELS, "matricized_nmf, 8^3 windows, no shift"),
    "nmf-global": ("core", NMF_KERNELS, "matricized_nmf, one E x N matrix per head"),
    "sdpa-window": ("core", SDPA_BACKENDS, "SDPA in 8^3 windows, q = k = v"),
    "sdpa-global": ("core", SDPA_BACKENDS, "SDPA over all voxels, q = k = v"),
    "nmf-swin-layer": ("layer", ("triton", "torch"), "WrappedNMF: W_in, swin NMF, W_out"),
    "sdpa-window-layer": ("layer", SDPA_BACKENDS, "qkv conv, windowed SDPA, out conv"),
    "monai-window": ("layer", ("eager",), "MONAI SwinUNETR WindowAttention (eager)"),
    "favor": ("layer", ("torch",), "FAVOR+ (Performer) with projections"),
}

GPU_LAYER_SHAPES = [
    (2, 32, 16),
    (2, 32, 32),
    (2, 32, 64),
    (2, 32, 128),  # resolution series at C = 32
    (2, 64, 64),
    (2, 128, 32),
    (2, 256, 16),
    (2, 512, 8),  # the deeper stages of the BraTS U-Net
]
CPU_SIZES = (8, 16, 24)
CPU_DEEP = [(1, 64, 16)]


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r}; valid: auto, cpu, cuda, cuda:N")
    return dev


def default_impls(device: torch.device) -> tuple[str, ...]:
    """Kernels and backends timed by default. GPU: all. CPU (a quick run): torch, reference,
    SDPA flash (PyTorch's CPU flash kernel) and the eager mixers; not triton (the interpreter),
    torch.compile (compilation would dominate), SDPA math (seconds per case) or the CUDA-only
    backends."""
    if device.type == "cuda":
        return (*NMF_KERNELS, *SDPA_BACKENDS, "eager")
    return ("torch", "reference", "flash", "eager")


def layer_cases(
    device: str | torch.device | None = None,
    *,
    shapes: Sequence[tuple[int, int, int]] | None = None,
    sizes: Sequence[int] | None = None,
    deep: bool | None = None,
    mixers: Sequence[str] | None = None,
    impls: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    passes: Sequence[str] = PASSES,
) -> list[LayerCase]:
    """The layer suite's cases. Defaults: the issue's shapes (C = 32 at 16^3 - 128^3 and the
    deeper stages), batch 2, fp32 + bf16 on a GPU; on the CPU batch 1, C = 32 at ``CPU_SIZES``,
    fp32.

    ``sizes`` replaces the resolution series (C = 32); ``deep`` adds the deeper-stage shapes
    (default: on a GPU).
    """
    dev = pick_device(device)
    gpu = dev.type == "cuda"
    if shapes is None:
        batch = 2 if gpu else 1
        series = sizes if sizes is not None else (16, 32, 64, 128) if gpu else CPU_SIZES
        shapes = [(batch, 32, s) for s in series]
        if deep if deep is not None else gpu:
            shapes += GPU_LAYER_SHAPES[4:] if gpu else CPU_DEEP
    dtypes = list(dtypes or (["fp32", "bf16"] if gpu else ["fp32"]))
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; valid: {', '.join(DTYPES)}")
    mixers = list(mixers or MIXERS)
    for m in mixers:
        if m not in MIXERS:
            raise ValueError(f"unknown mixer {m!r}; valid: {', '.join(MIXERS)}")
    allowed = set(impls or default_impls(dev))
    cases = []
    for b, c, s in shapes:
        if s % WINDOW:
            raise ValueError(f"size {s} is not a multiple of the window {WINDOW}")
        for dtype in dtypes:
            for pass_ in passes:
                for mixer in mixers:
                    for impl in MIXERS[mixer][1]:
                        if impl in allowed or len(MIXERS[mixer][1]) == 1:
                            cases.append(LayerCase(mixer, impl, b, c, s, dtype, pass_))
    return cases


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
            self.kw.update(patch_size=None, shifts=None)
            n = math.prod(size)
        else:
            self.kw.update(
                patch_size=window, shifts=[None, window // 2] if variant == "swin" else None
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
            return self.fn(x, self.v0, kw["head_dim"], kw["patch_size"], kw["shifts"], None, ITERS)
        return matricized_nmf(x, self.v0, kernel=self.kernel, check=False, **self.kw)


def _raise_compile_limits() -> None:
    # Every shape, dtype and grad mode is a recompilation of the same function: keep them all.
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


def _global_fits(case: LayerCase, device: torch.device) -> str | None:
    """Reason to skip global SDPA (too much memory or work), None if it fits."""
    n = case.size**3
    bh = case.batch * case.channels // case.head_dim
    elt = DTYPES[case.dtype].itemsize
    if case.impl == "math":  # scores, softmax and their gradients: (B H, N, N) each
        mem = (4 if case.pass_ == "fwdbwd" else 2) * bh * n * n * max(elt, 4)
    else:
        mem = 16 * bh * n * case.head_dim * 4
    work = 4 * bh * n * n * case.head_dim * (3.5 if case.pass_ == "fwdbwd" else 1.0)
    limit_mem = (
        0.5 * torch.cuda.get_device_properties(device).total_memory
        if device.type == "cuda"
        else 2 * 2**30
    )
    limit_work = 3e13 if device.type == "cuda" else 3e9
    if mem > limit_mem:
        return (
            f"global SDPA ({case.impl}) needs ~{mem / 2**30:.1f} GiB > {limit_mem / 2**30:.0f} GiB"
        )
    if work > limit_work:
        return f"global SDPA needs ~{work:.1e} FLOPs (N^2 = {n * n:.1e}): too slow to time here"
    return None


def build_mixer(case: LayerCase, device: torch.device) -> nn.Module:
    """The module of a case on ``device`` in its dtype; raises :class:`Unsupported`."""
    dtype = DTYPES[case.dtype]
    e, p, c = case.head_dim, case.window, case.channels
    size = (case.size,) * 3
    if case.impl == "triton" and device.type != "cuda":
        raise Unsupported("triton kernels are timed on CUDA only (the CPU runs the interpreter)")
    if case.impl == "compiled-reference" and case.dtype != "fp32" and device.type != "cuda":
        raise Unsupported("torch.compile of the reference in low precision: CUDA only")
    if case.mixer.startswith("nmf-") and case.impl in ("reference", "compiled-reference"):
        if case.mixer == "nmf-global" and case.size > 64:
            raise Unsupported("the literal global loop at this size is too slow to be worth timing")
    if case.impl in SDPA_BACKENDS:
        reason = _sdpa_supported(case.impl, device, dtype, e)
        if reason:
            raise Unsupported(reason)
    if case.mixer == "sdpa-global":
        reason = _global_fits(case, device)
        if reason:
            raise Unsupported(reason)
    if case.mixer in ("nmf-swin", "nmf-local", "nmf-global"):
        module = NMFCore(case.mixer[4:], case.impl, size=size, head_dim=e, window=p)
    elif case.mixer == "sdpa-window":
        module = WindowSDPA(c, head_dim=e, window=p, backend=case.impl)
    elif case.mixer == "sdpa-global":
        module = WindowSDPA(c, head_dim=e, window=None, backend=case.impl)
    elif case.mixer == "sdpa-window-layer":
        module = WindowSDPA(c, head_dim=e, window=p, backend=case.impl, project=True)
    elif case.mixer == "nmf-swin-layer":
        from fastnmf.models import WrappedNMF

        module = WrappedNMF(
            c,
            spatial_dims=3,
            head_dim=e,
            patch_size=p,
            spatial_size=size,
            shifts="default",
            rank=1,
            iters=ITERS,
            solver="hals",
            kernel=case.impl,
            dropout=0.0,
            seed=0,
        )
    elif case.mixer == "monai-window":
        module = MonaiWindowAttention(c, head_dim=e, window=p)
    elif case.mixer == "favor":
        from fastnmf.models import FavorAttention

        module = FavorAttention(c, spatial_dims=3, head_dim=e, dropout=0.0, seed=0)
    else:
        raise ValueError(f"unknown mixer {case.mixer!r}; valid: {', '.join(MIXERS)}")
    return module.to(device=device, dtype=dtype)


@dataclasses.dataclass
class Prepared:
    """A case ready to time: ``run()`` does one synchronised repetition; ``info`` holds the
    figures that do not need timing; ``work`` is what one repetition processes (voxels for the
    layers, samples for the models)."""

    run: Callable[[], None]
    info: dict
    work: int
    moved_bytes: int | None = None


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)


def prepare_layer(case: LayerCase, device: torch.device | str | None = None) -> Prepared:
    """Build the mixer and inputs of a case and check that it runs; raises :class:`Unsupported`
    when it cannot run here."""
    dev = pick_device(device)
    module = build_mixer(case, dev)
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=gen).to(dev, dtype)
    grad = case.pass_ == "fwdbwd"
    x.requires_grad_(grad)
    dy = torch.randn(case.shape, generator=gen).to(dev, dtype) if grad else None
    params = [p for p in module.parameters() if p.requires_grad]

    if grad:

        def run():
            x.grad = None
            for p in params:
                p.grad = None
            module(x).backward(dy)
            sync(dev)

    else:

        def run():
            with torch.no_grad():
                module(x)
            sync(dev)

    try:
        run()  # first call: compiles, autotunes, and fails here if it cannot run
    except Unsupported:
        raise
    except RuntimeError as err:
        if _is_oom(err):
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            raise Unsupported(f"out of memory: {str(err).splitlines()[0][:120]}") from err
        if case.impl in SDPA_BACKENDS:  # e.g. a grid limit of one backend at this size
            raise Unsupported(f"SDPA {case.impl}: {str(err).splitlines()[0][:160]}") from err
        raise
    nbytes = x.numel() * x.element_size()
    info = {"input_bytes": nbytes}
    if grad:
        info["saved_bytes"] = saved_bytes(lambda: module(x))
    moved = None
    if case.scope == "core" and case.mixer.startswith("nmf-"):
        moved = (5 if grad else 2) * nbytes
    return Prepared(run=run, info=info, work=case.voxels, moved_bytes=moved)


def _row_base(suite: str, case_id: str, dev: torch.device) -> dict:
    return {"suite": suite, "id": case_id, "device": _device_name(dev)}


def figures(prep: Prepared, ms: float, device: torch.device, peak: int | None) -> dict:
    """The figures of a timed case: median ms, work per second (voxels/s or samples/s), GB/s and
    % of copy bandwidth (NMF core), peak memory, and the case's static figures."""
    out = dict(prep.info, median_ms=ms, per_s=prep.work / (ms * 1e-3), peak_bytes=peak)
    if prep.moved_bytes is not None:
        gbs = prep.moved_bytes / (ms * 1e-3) / 1e9
        out["gb_per_s"] = gbs
        out["copy_bandwidth_gb_per_s"] = _copy_bw(device)
        out["pct_copy_bandwidth"] = 100 * gbs / _copy_bw(device)
    return out


def _finish(row: dict, prep: Prepared, ms: float, dev: torch.device, peak: int | None) -> dict:
    return row | figures(prep, ms, dev, peak)


def layer_row(case: LayerCase) -> dict:
    return {
        "subject": case.mixer,
        "impl": case.impl,
        "scope": case.scope,
        "shape": "x".join(map(str, case.shape[:2])) + f"x{case.size}^3",
        "size": case.size,
        "channels": case.channels,
        "batch": case.batch,
        "dtype": case.dtype,
        "task": case.pass_,
    }


def run_layer_case(case: LayerCase, device=None, *, repeats: int = 10, warmup: int = 1) -> dict:
    """Time one layer case; returns a row (``status`` ok, or unsupported with ``reason``)."""
    dev = pick_device(device)
    row = _row_base("layer", case.id, dev) | layer_row(case)
    try:
        prep = prepare_layer(case, dev)
        ms = median_ms(prep.run, dev, repeats=repeats, warmup=max(warmup - 1, 0))
        peak = peak_bytes(prep.run, dev)
    except Unsupported as why:
        return row | {"status": "unsupported", "reason": str(why)}
    except RuntimeError as err:
        if not _is_oom(err):
            raise
        torch.cuda.empty_cache()
        return row | {"status": "unsupported", "reason": "out of memory"}
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return _finish(row | {"status": "ok", "reason": ""}, prep, ms, dev, peak)


# ----------------------------------------------------------------------------------------------
# model cases


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One model, kernel, task and precision."""

    model: str
    kernel: str  # NMF kernel for Factorizers, "-" otherwise
    task: str  # "train" | "infer"
    dtype: str  # "fp32" | "bf16" (bf16 = autocast)
    batch: int
    patch: int  # training patch / inference window edge
    volume: tuple[int, int, int] = INFER_VOLUME
    tiny: bool = False
    skip: str = ""  # reason to leave the case out of this run (a row says so)
    checkpoint: bool = False  # Factorizers: activation checkpointing of every block

    @property
    def id(self) -> str:
        where = (
            f"b{self.batch}-s{self.patch}"
            if self.task == "train"
            else "v" + "x".join(map(str, self.volume))
        )
        ckpt = "-ckpt" if self.checkpoint else ""
        return f"{self.model}-{self.kernel}{ckpt}-{self.task}-{where}-{self.dtype}"


FACTORIZERS = ("swin_factorizer", "local_factorizer", "global_factorizer")
BASELINES = ("nnunet", "resunet", "performer", "unetr", "swin_unetr", "segresnet")

# small models for the CPU (and the tests): every architecture, a few M FLOPs
_TINY = {
    "factorizer": dict(
        widths=(8, 16, 32), head_dim=4, window=4, shifts="default", deep_supervision=2
    ),
    "performer": dict(widths=(8, 16, 32), head_dim=4, deep_supervision=2),
    "nnunet": dict(widths=(8, 16, 32), deep_supervision=2),
    "resunet": dict(widths=(8, 16, 32), deep_supervision=2),
    "unetr": dict(feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4),
    "swin_unetr": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4),
    "segresnet": dict(init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1)),
}
TINY_PATCH = 16
TINY_VOLUME = (24, 24, 16)


def _tiny_patch(model: str) -> int:
    # SwinUNETR: multiples of 32, and more than one voxel at its bottleneck (instance norm), so
    # 64^3; UNETR: 16^3 patches, so 32^3
    return {"swin_unetr": 64, "unetr": 32}.get(model, TINY_PATCH)


def model_cases(
    device: str | torch.device | None = None,
    *,
    models: Sequence[str] | None = None,
    kernels: Sequence[str] | None = None,
    tasks: Sequence[str] = MODEL_TASKS,
    dtypes: Sequence[str] | None = None,
    tiny: bool | None = None,
    batch: int | None = None,
    patch: int | None = None,
    checkpoint: bool = False,
) -> list[ModelCase]:
    """The model suite's cases: GPU: brats models at 128^3, batch 2, fp32 + bf16 autocast,
    inference over 240 x 240 x 155; CPU (``tiny``): small models at 16^3 (SwinUNETR 32^3),
    batch 1, inference over 24 x 24 x 16; SwinUNETR (64^3, its smallest size: seconds per step
    on a CPU) only when ``models`` names it. ``patch`` overrides every model's
    patch edge; ``checkpoint`` turns on the Factorizers' activation checkpointing (the
    baselines are run as they are)."""
    dev = pick_device(device)
    gpu = dev.type == "cuda"
    tiny = (not gpu) if tiny is None else tiny
    names = list(models or (*FACTORIZERS, *BASELINES))
    for m in names:
        if m not in (*FACTORIZERS, *BASELINES):
            raise ValueError(f"unknown model {m!r}; valid: {', '.join((*FACTORIZERS, *BASELINES))}")
    kernels = list(kernels or (["triton", "torch", "reference"] if gpu else ["torch", "reference"]))
    dtypes = list(dtypes or (["fp32", "bf16"] if gpu else ["fp32"]))
    b = batch or (1 if tiny else 2)
    cases = []
    for task in tasks:
        if task not in MODEL_TASKS:
            raise ValueError(f"unknown task {task!r}; valid: {', '.join(MODEL_TASKS)}")
        for dtype in dtypes:
            for name in names:
                edge = patch or (_tiny_patch(name) if tiny else 128)
                volume = TINY_VOLUME if tiny else INFER_VOLUME
                skip = ""
                if tiny and models is None and name == "swin_unetr":
                    skip = "left out of the quick CPU run (its smallest size, 64^3: seconds)"
                fact = name in FACTORIZERS
                for k in kernels if fact else ["-"]:
                    cases.append(
                        ModelCase(name, k, task, dtype, b, edge, volume, tiny, skip,
                                  checkpoint=checkpoint and fact)
                    )  # fmt: skip
    return cases


def build_model(case: ModelCase) -> nn.Module:
    from fastnmf import models

    over = {}
    if case.tiny:
        key = "factorizer" if case.model in FACTORIZERS else case.model
        over = dict(_TINY[key], spatial_size=(case.patch,) * 3)
    elif case.patch != 128:
        over = {"spatial_size": (case.patch,) * 3}
    if case.model in FACTORIZERS:
        if case.checkpoint:
            over["checkpoint"] = True
        return models.build(case.model, "brats", kernel=case.kernel, seed=0, **over)
    return models.build(case.model, "brats", **over)


def _static_figures(case: ModelCase) -> tuple[int, int]:
    """(parameters, forward FLOPs) at batch 1 and the case's patch (kernel independent)."""
    return _static_figures_of(
        dataclasses.replace(
            case, kernel="torch" if case.kernel != "-" else "-", task="train", dtype="fp32"
        )
    )


@functools.cache
def _static_figures_of(case: ModelCase) -> tuple[int, int]:
    from fastnmf.models import count_flops, count_parameters

    net = build_model(case)
    flops = count_flops(net, (1, net.in_channels, *(case.patch,) * 3))
    return count_parameters(net), flops


def prepare_model(case: ModelCase, device: torch.device | str | None = None) -> Prepared:
    """Build the model, optimiser and data of a case and run it once; raises
    :class:`Unsupported` where it cannot run here."""
    dev = pick_device(device)
    if case.kernel == "triton" and dev.type != "cuda":
        raise Unsupported("triton kernels are timed on CUDA only (the CPU runs the interpreter)")
    amp = DTYPES[case.dtype] if case.dtype != "fp32" else None
    if amp is not None and dev.type != "cuda":
        raise Unsupported(f"{case.dtype} autocast is timed on CUDA only")
    if case.skip:
        raise Unsupported(case.skip)
    torch.manual_seed(0)
    net = build_model(case).to(dev)
    gen = torch.Generator().manual_seed(0)
    cin = net.in_channels

    def autocast():
        return torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None)

    if case.task == "train":
        net.train()
        x = torch.randn(case.batch, cin, *(case.patch,) * 3, generator=gen).to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        with torch.no_grad(), autocast():
            outs = net(x)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        targets = [(torch.rand(o.shape, generator=gen) > 0.5).float().to(dev) for o in outs]

        def run():
            opt.zero_grad(set_to_none=True)
            with autocast():
                out = net(x)
            out = out if isinstance(out, (list, tuple)) else [out]
            loss = sum(
                F.binary_cross_entropy_with_logits(o.float(), t)
                for o, t in zip(out, targets, strict=True)
            )
            loss.backward()
            opt.step()
            sync(dev)

        work = case.batch
    else:
        from ..infer import sliding_window_logits

        image = torch.randn(1, cin, *case.volume, generator=gen).to(dev)

        def run():
            sliding_window_logits(net, image, overlap=0.5, sw_batch_size=4, amp=case.dtype)
            sync(dev)

        work = 1
    try:
        run()
    except RuntimeError as err:
        if _is_oom(err):
            del net
            torch.cuda.empty_cache()
            raise Unsupported(f"out of memory: {str(err).splitlines()[0][:120]}") from err
        raise
    params, flops = _static_figures(case)
    info = {"params": params, "gflops": flops / 1e9}
    return Prepared(run=run, info=info, work=work)


def model_row(case: ModelCase) -> dict:
    shape = (
        f"{case.batch}x{case.patch}^3" if case.task == "train" else "x".join(map(str, case.volume))
    )
    return {
        "subject": case.model,
        "impl": case.kernel,
        "scope": "model",
        "shape": shape,
        "size": case.patch,
        "batch": case.batch,
        "dtype": case.dtype,
        "task": case.task,
        "checkpoint": case.checkpoint,
    }


def run_model_case(case: ModelCase, device=None, *, repeats: int = 5, warmup: int = 1) -> dict:
    """Time one model case; returns a row (``status`` ok, or unsupported with ``reason``)."""
    dev = pick_device(device)
    row = _row_base("model", case.id, dev) | model_row(case)
    try:
        prep = prepare_model(case, dev)
        ms = median_ms(prep.run, dev, repeats=repeats, warmup=max(warmup - 1, 0))
        peak = peak_bytes(prep.run, dev, absolute=True)
    except Unsupported as why:
        return row | {"status": "unsupported", "reason": str(why)}
    except RuntimeError as err:
        if not _is_oom(err):
            raise
        torch.cuda.empty_cache()
        return row | {"status": "unsupported", "reason": "out of memory"}
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return _finish(row | {"status": "ok", "reason": ""}, prep, ms, dev, peak)


# ----------------------------------------------------------------------------------------------
# suites and the report


def run_suite(
    suite: str,
    device=None,
    *,
    repeats: int | None = None,
    only: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
    keep_going: bool = True,
    **case_options,
) -> list[dict]:
    """Run every case of ``suite`` ("layer" | "model") whose id contains all of ``only``.

    A case that cannot run here gives a row with status ``unsupported``; one that fails with
    ``keep_going`` a row with status ``error`` (both with the reason)."""
    dev = pick_device(device)
    if suite == "layer":
        cases, runner = layer_cases(dev, **case_options), run_layer_case
        reps = repeats or (10 if dev.type == "cuda" else 2)
    elif suite == "model":
        cases, runner = model_cases(dev, **case_options), run_model_case
        reps = repeats or (5 if dev.type == "cuda" else 2)
        case_options.setdefault("tiny", None)
    else:
        raise ValueError(f"unknown suite {suite!r}; valid: layer, model")
    cases = [c for c in cases if all(o in c.id for o in only)]
    rows = []
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        try:
            row = runner(case, dev, repeats=reps)
        except Exception as err:  # one broken case must not lose a long GPU run: a row says why
            if not keep_going:
                raise
            base = _row_base(suite, case.id, dev)
            info = layer_row(case) if suite == "layer" else model_row(case)
            msg = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            row = base | info | {"status": "error", "reason": msg}
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        if progress:
            what = f"{row['median_ms']:.2f} ms" if row["status"] == "ok" else row["reason"]
            progress(f"[{i + 1}/{len(cases)}] {case.id}: {what} ({time.perf_counter() - t0:.1f} s)")
    return rows


COLUMNS = [
    "suite", "id", "subject", "impl", "scope", "shape", "size", "channels", "batch", "dtype",
    "task", "status", "median_ms", "per_s", "peak_bytes", "saved_bytes", "input_bytes",
    "gb_per_s", "pct_copy_bandwidth", "params", "gflops", "device", "reason",
]  # fmt: skip


def _fmt(v, digits: int = 3) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def _mib(v) -> str:
    return "" if v is None or v == "" else f"{v / 2**20:.1f}"


def _layer_md(rows: list[dict]) -> list[str]:
    out = [
        "| mixer | impl | scope | shape | dtype | pass | median ms | Mvoxel/s | peak MiB "
        "| saved MiB | % copy BW | status |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = r["status"] == "ok"
        out.append(
            f"| {r['subject']} | {r['impl']} | {r['scope']} | {r['shape']} | {r['dtype']} | "
            f"{'fwd+bwd' if r['task'] == 'fwdbwd' else r['task']} | "
            f"{_fmt(r.get('median_ms')) if ok else ''} | "
            f"{_fmt(r['per_s'] / 1e6) if ok else ''} | {_mib(r.get('peak_bytes'))} | "
            f"{_mib(r.get('saved_bytes'))} | {_fmt(r.get('pct_copy_bandwidth'))} | "
            f"{r['status'] if ok else r['status'] + ': ' + r['reason']} |"
        )
    return out


def _model_md(rows: list[dict]) -> list[str]:
    out = [
        "| model | kernel | task | shape | dtype | time ms | samples/s | peak MiB | params M "
        "| GFLOPs | status |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = r["status"] == "ok"
        out.append(
            f"| {r['subject']} | {r['impl']}{' + checkpointing' if r.get('checkpoint') else ''} | "
            f"{r['task']} | {r['shape']} | {r['dtype']} | "
            f"{_fmt(r.get('median_ms')) if ok else ''} | {_fmt(r.get('per_s')) if ok else ''} | "
            f"{_mib(r.get('peak_bytes'))} | "
            f"{_fmt(r['params'] / 1e6, 4) if r.get('params') else ''} | "
            f"{_fmt(r.get('gflops'), 4)} | "
            f"{r['status'] if ok else r['status'] + ': ' + r['reason']} |"
        )
    return out


def _get(rows, **match) -> dict | None:
    for r in rows:
        if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked on whatever rows there are (lines of markdown)."""
    out = []
    layer = [r for r in rows if r["suite"] == "layer"]
    pairs = [
        ("nmf-swin", "sdpa-window", "swin NMF"),
        ("nmf-swin-layer", "sdpa-window-layer", "swin NMF layer (projections)"),
    ]
    for nmf, sdpa, name in pairs:
        kernel = "triton" if _get(layer, subject=nmf, impl="triton") else "torch"
        for r in layer:
            if (r["subject"], r["impl"], r["task"], r["status"]) != (nmf, kernel, "fwdbwd", "ok"):
                continue
            what = f"- {name} ({kernel}) vs {sdpa} flash, {r['shape']} {r['dtype']} fwd+bwd"
            att = _get(
                layer, subject=sdpa, impl="flash", shape=r["shape"], dtype=r["dtype"], task="fwdbwd"
            )
            if att is None:
                out.append(f"{what}: no flash row (backend unavailable)")
                continue
            t = att["median_ms"] / r["median_ms"]
            line = (
                f"{what}: time {r['median_ms']:.3g} vs {att['median_ms']:.3g} ms "
                f"(NMF {t:.2f}x as fast: {'met' if t > 1 else f'missed by {1 / t:.2f}x'})"
            )
            key = "peak_bytes" if r.get("peak_bytes") is not None else "saved_bytes"
            if r.get(key) and att.get(key):
                m = att[key] / r[key]
                line += (
                    f"; {key.split('_')[0]} memory {r[key] / 2**20:.1f} vs "
                    f"{att[key] / 2**20:.1f} MiB ({'met' if m > 1 else f'missed by {1 / m:.2f}x'})"
                )
            out.append(line)
    model = [r for r in rows if r["suite"] == "model" and r["task"] == "train"]
    for dtype in ("fp32", "bf16"):
        tri = _get(model, subject="swin_factorizer", impl="triton", dtype=dtype) or _get(
            model, subject="swin_factorizer", impl="torch", dtype=dtype
        )
        if tri is None:
            continue
        k = tri["impl"] + (", checkpointed" if tri.get("checkpoint") else "")
        ref = _get(model, subject="swin_factorizer", impl="reference", dtype=dtype)
        if ref:
            x = tri["per_s"] / ref["per_s"]
            out.append(
                f"- swin Factorizer train {tri['shape']} {dtype}: {k} {x:.2f}x the "
                f"throughput of reference (target >= 3x: "
                f"{'met' if x >= 3 else f'missed by {3 / x:.2f}x'})"
            )
        if tri.get("peak_bytes"):
            gb = tri["peak_bytes"] / 1e9
            out.append(
                f"- swin Factorizer train {tri['shape']} {dtype} ({k}): peak {gb:.2f} GB "
                f"(target <= 8 GB: {'met' if gb <= 8 else f'missed by {gb - 8:.2f} GB'})"
            )
        for other in ("swin_unetr", "nnunet"):
            o = _get(model, subject=other, dtype=dtype)
            if o is None:
                continue
            line = (
                f"- swin Factorizer ({k}) vs {other}, train {tri['shape']} {dtype}: "
                f"{tri['median_ms']:.3g} vs {o['median_ms']:.3g} ms "
                f"({'faster' if tri['median_ms'] < o['median_ms'] else 'slower'})"
            )
            if tri.get("peak_bytes") and o.get("peak_bytes"):
                line += (
                    f", peak {tri['peak_bytes'] / 2**30:.2f} vs "
                    f"{o['peak_bytes'] / 2**30:.2f} GiB "
                    f"({'leaner' if tri['peak_bytes'] < o['peak_bytes'] else 'heavier'})"
                )
            out.append(line)
    return out


def _slope(xs, ys) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def _plot_layers(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # the resolution series: the most common channel count among the rows (C = 32)
    chans = [r["channels"] for r in rows]
    if not chans:
        return written
    c0 = max(set(chans), key=chans.count)
    series = [r for r in rows if r["channels"] == c0 and r["status"] == "ok"]
    dtypes = sorted({r["dtype"] for r in series})
    passes = [p for p in PASSES if any(r["task"] == p for r in series)]

    def lines(metric, ax, keep=lambda r: True):
        keys = sorted({(r["subject"], r["impl"]) for r in series if keep(r)})
        colors = plt.get_cmap("tab20").colors
        for i, (subject, impl) in enumerate(keys):
            pts = sorted(
                (r["size"] ** 3 * r["batch"], r[metric])
                for r in series
                if (r["subject"], r["impl"]) == (subject, impl) and keep(r) and r.get(metric)
            )
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            k = _slope(xs, ys)
            label = f"{subject} {impl}" + (f" (slope {k:.2f})" if k is not None else "")
            style = "-" if subject.startswith("nmf") else "--"
            ax.plot(xs, ys, style, marker="o", ms=3, label=label, color=colors[i % 20])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("voxels (B x S^3)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)

    for metric, name, ylabel in (
        ("median_ms", "layer_time.png", "median time (ms)"),
        (
            "peak_bytes" if any(r.get("peak_bytes") for r in series) else "saved_bytes",
            "layer_memory.png",
            None,
        ),
    ):
        cols = passes if metric == "median_ms" else ["fwdbwd"]
        if metric == "saved_bytes":
            ylabel = "memory kept for backward (bytes)"
        elif metric == "peak_bytes":
            ylabel = "peak memory above input (bytes)"
        fig, axes = plt.subplots(
            len(dtypes), len(cols), figsize=(7 * len(cols), 5 * len(dtypes)), squeeze=False
        )
        for i, dt in enumerate(dtypes):
            for j, p in enumerate(cols):
                ax = axes[i][j]
                lines(metric, ax, lambda r, dt=dt, p=p: r["dtype"] == dt and r["task"] == p)
                ax.set_title(f"C={c0}, {dt}, {'fwd+bwd' if p == 'fwdbwd' else p}")
                ax.set_ylabel(ylabel)
        fig.suptitle(f"context mixers vs resolution ({rows[0]['device']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    bw = [r for r in rows if r["status"] == "ok" and r.get("pct_copy_bandwidth") is not None]
    if bw:
        fig, axes = plt.subplots(1, len(passes), figsize=(7 * len(passes), 5), squeeze=False)
        for j, p in enumerate(passes):
            ax = axes[0][j]
            keys = sorted({(r["subject"], r["impl"], r["dtype"]) for r in bw if r["task"] == p})
            for subject, impl, dt in keys:
                pts = sorted(
                    (r["batch"] * r["channels"] * r["size"] ** 3, r["pct_copy_bandwidth"])
                    for r in bw
                    if (r["subject"], r["impl"], r["dtype"], r["task"]) == (subject, impl, dt, p)
                )
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", ms=3, label=f"{subject} {impl} {dt}")
            ax.set_xscale("log")
            ax.set_xlabel("input elements (B x C x S^3)")
            ax.set_ylabel("% of device copy bandwidth")
            ax.set_title(f"NMF core, {'fwd+bwd' if p == 'fwdbwd' else p}")
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "nmf_bandwidth.png", dpi=110)
        plt.close(fig)
        written.append(out / "nmf_bandwidth.png")
    return written


def _plot_models(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    written = []
    metrics = [("per_s", "model_throughput.png", "samples/s (train: patches, infer: volumes)")]
    if any(r.get("peak_bytes") for r in ok):
        metrics.append(("peak_bytes", "model_memory.png", "peak memory (GiB)"))
    groups = sorted({(r["task"], r["dtype"]) for r in ok}, key=lambda g: (g[0] != "train", g))
    for metric, name, xlabel in metrics:
        fig, axes = plt.subplots(
            1, len(groups), figsize=(6 * len(groups), 0.35 * len(ok) + 2.5), squeeze=False
        )
        for j, (task, dt) in enumerate(groups):
            ax = axes[0][j]
            sel = [r for r in ok if (r["task"], r["dtype"]) == (task, dt) and r.get(metric)]
            labels = [r["subject"] + ("" if r["impl"] == "-" else f" ({r['impl']})") for r in sel]
            vals = [r[metric] / (2**30 if metric == "peak_bytes" else 1) for r in sel]
            colors = [
                "tab:blue" if r["subject"].endswith("factorizer") else "tab:gray" for r in sel
            ]
            ax.barh(range(len(sel)), vals, color=colors)
            ax.set_yticks(range(len(sel)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(xlabel)
            ax.set_title(f"{task} {sel[0]['shape'] if sel else ''} {dt}", fontsize=9)
            ax.grid(True, axis="x", alpha=0.3)
        fig.suptitle(f"models ({rows[0]['device']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written


def write_report(rows: list[dict], out: str | Path, env: dict) -> list[Path]:
    """table.csv, table.md, meta.json and the PNG plots under ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    (out / "meta.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    md = [
        "# fastnmf profile",
        "",
        f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}; fastnmf {env['fastnmf']} at commit {env['commit']}"
        + (" (with local changes)" if env.get("dirty") else "")
        + f"; {env['time']}",
        "",
    ]
    layer = [r for r in rows if r["suite"] == "layer"]
    model = [r for r in rows if r["suite"] == "model"]
    if layer:
        md += [
            "## Layer suite",
            "",
            "Context mixers at equal input (B, C, *S), head dim E = 8, window 8^3; scope core = "
            "the mixing core alone (NMF: ReLU + matricize + rank-one NMF, T = 5 + dematricize; "
            "SDPA: q = k = v = windowed heads), layer = with the projections. peak = above the "
            "memory allocated before the call; saved = memory kept for backward.",
            "",
            *_layer_md(layer),
            "",
        ]
    if model:
        md += [
            "## Model suite",
            "",
            "train = forward + deep-supervision BCE + backward + AdamW step; infer = sliding "
            "window (50 % overlap, gaussian) over one volume. peak = absolute. FLOPs: forward "
            "at batch 1, NMF as the literal loop.",
            "",
            *_model_md(model),
            "",
        ]
    tg = targets(rows)
    if tg:
        md += ["## Targets", "", *tg, ""]
    (out / "table.md").write_text("\n".join(md))
    written = [out / "table.md", out / "table.csv", out / "meta.json"]
    if layer:
        written += _plot_layers(layer, out)
    if model:
        written += _plot_models(model, out)
    return written
