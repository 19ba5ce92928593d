"""The model suite: a training step and sliding-window inference of every architecture."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .runner import Prepared, Unsupported, case_columns, is_oom, row_base, run_case
from .timing import DTYPES, pick_device, sync

MODEL_TASKS = ("train", "infer")
INFER_VOLUME = (240, 240, 155)


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
    compile: str | None = None  # torch.compile backend (None: eager)

    @property
    def id(self) -> str:
        where = (
            f"b{self.batch}-s{self.patch}"
            if self.task == "train"
            else "v" + "x".join(map(str, self.volume))
        )
        ckpt = "-ckpt" if self.checkpoint else ""
        comp = f"-compile_{self.compile}" if self.compile else ""
        return f"{self.model}-{self.kernel}{ckpt}{comp}-{self.task}-{where}-{self.dtype}"


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
    compile: str | None = None,
) -> list[ModelCase]:
    """The model suite's cases: GPU: brats models at 128^3, batch 2, fp32 + bf16 autocast,
    inference over 240 x 240 x 155; CPU (``tiny``): small models at 16^3 (SwinUNETR 32^3),
    batch 1, inference over 24 x 24 x 16; SwinUNETR (64^3, its smallest size: seconds per step
    on a CPU) only when ``models`` names it. ``patch`` overrides every model's
    patch edge; ``checkpoint`` turns on the Factorizers' activation checkpointing (the
    baselines are run as they are); ``compile`` (a backend of
    :data:`fastnmf.config.COMPILE_BACKENDS`) times every model under ``torch.compile``."""
    from fastnmf.config import COMPILE_BACKENDS

    if compile is not None and compile not in COMPILE_BACKENDS[1:]:
        raise ValueError(f"unknown compile backend {compile!r}; valid: "
                         f"{', '.join(COMPILE_BACKENDS[1:])}")  # fmt: skip
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
                                  checkpoint=checkpoint and fact, compile=compile)
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
    if case.compile:  # compiled at the first (untimed) run below
        from fastnmf.custom_op import maybe_compile

        net = maybe_compile(net, enabled=True, backend=case.compile)

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
        if is_oom(err):
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
    return case_columns(
        subject=case.model, impl=case.kernel, scope="model", shape=shape, size=case.patch,
        batch=case.batch, dtype=case.dtype, task=case.task, checkpoint=case.checkpoint,
        compile=case.compile or "none",
    )  # fmt: skip


def run_model_case(case: ModelCase, device=None, *, repeats: int = 5, warmup: int = 1) -> dict:
    """Time one model case; returns a row (``status`` ok, or unsupported with ``reason``)."""
    dev = pick_device(device)
    row = row_base("model", case.id, dev) | model_row(case)
    return run_case(row, lambda: prepare_model(case, dev), dev, repeats=repeats, warmup=warmup,
                    absolute_peak=True)  # fmt: skip
