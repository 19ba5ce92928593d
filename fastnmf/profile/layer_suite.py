"""The layer suite: context mixers at equal input shape, built and prepared for timing."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from .competitors import (
    HEAD_DIM,
    ITERS,
    NMF_KERNELS,
    SDPA_BACKENDS,
    WINDOW,
    MonaiWindowAttention,
    NMFCore,
    WindowSDPA,
    _sdpa_supported,
)
from .runner import Prepared, Unsupported, case_columns, is_oom, row_base, run_case
from .timing import DTYPES, pick_device, saved_bytes, sync

PASSES = ("fwd", "fwdbwd")


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
            window=p,
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
        if is_oom(err):
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


def layer_row(case: LayerCase) -> dict:
    shape = "x".join(map(str, case.shape[:2])) + f"x{case.size}^3"
    return case_columns(
        subject=case.mixer, impl=case.impl, scope=case.scope, shape=shape, size=case.size,
        batch=case.batch, dtype=case.dtype, task=case.pass_, channels=case.channels,
    )  # fmt: skip


def run_layer_case(case: LayerCase, device=None, *, repeats: int = 10, warmup: int = 1) -> dict:
    """Time one layer case; returns a row (``status`` ok, or unsupported with ``reason``)."""
    dev = pick_device(device)
    row = row_base("layer", case.id, dev) | layer_row(case)
    return run_case(row, lambda: prepare_layer(case, dev), dev, repeats=repeats, warmup=warmup)
