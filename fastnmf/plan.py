"""Memory planner: the batch size, crop and checkpointing whose training step fits a GPU.

``plan(model=..., preset=..., gpu_memory="24GB", amp="bf16")`` asks issue 14's training-step
account (:func:`fastnmf.profile.static.step_account.account_step`: one fake-tensor step on the
CPU, ``predicted_peak_bytes``) about candidate settings, in order of preference, and returns the
first whose predicted peak fits the budget ``gpu_memory × (1 - headroom)``:

1. the largest crop first (the preset's training patch, then smaller cubes in steps of 16
   voxels that the model can take — a Swin Factorizer needs multiples of 16 × window);
2. for a crop, the largest batch first (``max_batch`` down to 1);
3. for a batch, without activation checkpointing first (faster), then with it (Factorizers).

The headroom (default 15 %) covers what the account leaves out: the CUDA context, the caching
allocator's rounding and fragmentation, library workspaces (its errors against the H200 peaks were
10–25 %, DESIGN.md §6). ``amp="fp16"`` is accounted as bf16 (same element size). The account
runs the blocks as a GPU does: with the fused glue ops (fastnmf/models/fused.py), unless
``FASTNMF_FUSED_GLUE=0`` switches them off (then the lean branches, and checkpointing pays off
sooner).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from . import _checks as C

__all__ = ["Plan", "plan", "parse_memory", "format_size", "AMP_DTYPES", "plan_run", "check_peak"]

# amp mode of TrainConfig -> the step account's dtype (fp16 has bf16's element size)
AMP_DTYPES = {"none": "fp32", "bf16": "bf16", "fp16": "bf16"}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_FACTORIZERS = ("swin_factorizer", "local_factorizer", "global_factorizer", "factorizer")
_STEP = 16  # crops are tried in steps of 16 voxels (four stride-2 downsamplings)


def parse_memory(text: str | int | float) -> int:
    """``"24GB"`` (10^9), ``"24GiB"`` (2^30), ``"80 GB"``, ``"512MiB"`` or a byte count -> bytes."""
    if isinstance(text, bool):
        raise TypeError(f"gpu memory must be a size like '24GB', got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not m:
            raise ValueError(f"gpu memory must be a size like '24GB' or '80GiB', got {text!r}")
        value, unit = float(m.group(1)), m.group(2).lower()
        unit = unit if unit in _UNITS else unit + "b"  # "24G" -> "24GB"
        if unit not in _UNITS:
            raise ValueError(
                f"unknown memory unit {m.group(2)!r} in {text!r}; valid: B, KB, MB, GB, TB, "
                "KiB, MiB, GiB, TiB"
            )
    if not value > 0:
        raise ValueError(f"gpu memory must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def format_size(nbytes: int | float) -> str:
    """``20.08 GB`` (10^9 bytes); below 0.1 GB in MB (``9.6 MB``), so small sizes stay legible."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


@dataclass(frozen=True)
class Plan:
    """The chosen settings, the predicted peak and every candidate asked (in order)."""

    model: str
    preset: str
    amp: str
    batch: int
    crop: int
    checkpoint: bool
    predicted_peak_bytes: int
    budget_bytes: int
    gpu_memory_bytes: int
    tried: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.model} ({self.preset}, amp {self.amp}): batch {self.batch}, crop "
            f"{self.crop}^3, checkpointing {'on' if self.checkpoint else 'off'}; predicted peak "
            f"{format_size(self.predicted_peak_bytes)} of a {format_size(self.budget_bytes)} "
            f"budget ({format_size(self.gpu_memory_bytes)} GPU)"
        )


def _crops(model: str, preset: str, crop: int | None) -> list[int]:
    from fastnmf import models

    top = crop if crop is not None else int(models.PRESETS[preset]["spatial_size"][0])
    C.check_int("crop", top, _STEP)
    return list(range(top - top % _STEP, _STEP - 1, -_STEP))


# builder options the account sets itself (crop, checkpointing) or that do not change memory
_ACCOUNT_SETS = ("spatial_size", "checkpoint", "kernel", "seed")


def _preset_overrides(model: str, preset: str, model_options: dict | None = None) -> dict:
    """The preset's model settings the builder takes (the account builds on brats' defaults),
    updated with ``model_options`` (a run's ``--model-opt``; lists become tuples)."""
    from fastnmf import models

    name = "swin_factorizer" if model == "factorizer" else model
    params = inspect.signature(models.MODELS[name]).parameters
    given = {**models.PRESETS[preset], **(model_options or {})}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()
            if k in params and k not in _ACCOUNT_SETS}  # fmt: skip


def _default_account(model, *, dtype, checkpoint, size, batch, overrides):
    from .profile.static.step_account import account_step

    return account_step(model, dtype=dtype, checkpoint=checkpoint, size=size, batch=batch,
                        overrides=overrides)  # fmt: skip


def plan(
    *,
    model: str,
    preset: str = "brats",
    gpu_memory: str | int | float,
    amp: str = "none",
    max_batch: int = 2,
    crop: int | None = None,
    headroom: float = 0.15,
    model_options: dict | None = None,
    account: Callable[..., dict] | None = None,
) -> Plan:
    """The first setting (order in the module docstring) whose predicted peak fits.

    Args:
        model: a registry model name.
        preset: model preset (in/out channels, E, window, shifts; its patch is the largest crop).
        gpu_memory: the GPU's memory, e.g. ``"24GB"`` (see :func:`parse_memory`).
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (TrainConfig's amp modes).
        max_batch: the largest batch to try.
        crop: the largest cube side to try (None: the preset's patch).
        headroom: fraction of ``gpu_memory`` kept free for what the account leaves out.
        model_options: builder options over the preset's (a run's widths, window, channels...).
        account: ``account_step``-like callable (tests); default the real step account.

    Raises:
        ValueError: nothing fits (the smallest peak seen is named) or an argument is invalid.
    """
    from fastnmf import models

    C.check_choice("model", model, models.available(), listing="available models")
    C.check_choice("preset", preset, models.presets(), listing="valid presets")
    C.check_choice("amp", amp, tuple(AMP_DTYPES))
    C.check_int("max_batch", max_batch, 1)
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom!r}")
    total = parse_memory(gpu_memory)
    budget = int(total * (1 - headroom))
    account = account or _default_account
    overrides = _preset_overrides(model, preset, model_options)
    ckpts = (False, True) if model in _FACTORIZERS else (False,)
    tried: list[dict] = []
    for size in _crops(model, preset, crop):
        for batch in range(max_batch, 0, -1):
            for ckpt in ckpts:
                entry = dict(crop=size, batch=batch, checkpoint=ckpt)
                try:
                    row = account(model, dtype=AMP_DTYPES[amp], checkpoint=ckpt, size=size,
                                  batch=batch, overrides=overrides)  # fmt: skip
                except ValueError as err:  # a crop the model cannot take
                    tried.append({**entry, "error": str(err)})
                    break
                peak = int(row["predicted_peak_bytes"])
                tried.append({**entry, "predicted_peak_bytes": peak})
                if peak <= budget:
                    return Plan(model, preset, amp, batch, size, ckpt, peak, budget, total, tried)
            if tried and "error" in tried[-1]:
                break  # this crop cannot be built: the next crop
    peaks = [t["predicted_peak_bytes"] for t in tried if "predicted_peak_bytes" in t]
    smallest = f"the smallest predicted peak was {format_size(min(peaks))}" if peaks else (
        "no candidate crop could be built for this model")  # fmt: skip
    raise ValueError(
        f"no batch / crop / checkpointing of {model} ({preset}, amp {amp}) fits "
        f"{format_size(budget)} ({format_size(total)} minus {headroom:.0%} headroom): {smallest}"
    )


def plan_run(cfg, info):
    """``cfg`` (a :class:`~fastnmf.config.TrainConfig` with ``gpu_memory``) with the plan for its
    model, preset, amp and data channels applied: ``batch_size`` and ``crop_size`` (the config's
    values are the largest tried), ``model_options["checkpoint"]`` (Factorizers) and ``plan``
    (the choice, the predicted peak and the budget, saved in config.json and every checkpoint).
    A config that already holds a plan (a resumed run) is returned as it is."""
    import dataclasses

    from .config import model_preset_for

    if cfg.gpu_memory is None or cfg.plan:
        return cfg
    preset = cfg.model_preset or model_preset_for(info.kind)
    opts = {**cfg.model_options, "out_channels": info.out_channels}
    if info.in_channels is not None:
        opts["in_channels"] = info.in_channels
    p = plan(model=cfg.model, preset=preset, gpu_memory=cfg.gpu_memory, amp=cfg.amp,
             max_batch=cfg.batch_size, crop=cfg.crop_size, model_options=opts)  # fmt: skip
    model_options = dict(cfg.model_options)
    if cfg.model in _FACTORIZERS:
        model_options["checkpoint"] = p.checkpoint
    chosen = {k: getattr(p, k) for k in ("batch", "crop", "checkpoint", "predicted_peak_bytes",
                                         "budget_bytes", "gpu_memory_bytes")}  # fmt: skip
    chosen["summary"] = p.summary()
    return dataclasses.replace(cfg, batch_size=p.batch, crop_size=p.crop,
                               model_options=model_options, plan=chosen)  # fmt: skip


def check_peak(cfg, device, out=None) -> str | None:
    """After training on a GPU: the measured peak (``torch.cuda.max_memory_allocated``) beside
    the planner's prediction, as a line, also written to ``out/memory.json`` when ``out`` is
    given; ``None`` without a plan or off CUDA."""
    import json
    from pathlib import Path

    import torch

    if not cfg.plan or device.type != "cuda":
        return None
    measured = int(torch.cuda.max_memory_allocated(device))
    predicted = int(cfg.plan["predicted_peak_bytes"])
    error = predicted / measured - 1 if measured else None
    if out is not None:
        doc = {"predicted_peak_bytes": predicted, "measured_peak_bytes": measured,
               "error": error, "plan": cfg.plan, "device": torch.cuda.get_device_name(device)}
        (Path(out) / "memory.json").write_text(json.dumps(doc, indent=2) + "\n")  # fmt: skip
    err = f"{error:+.0%}" if error is not None else "n/a"
    return (f"GPU peak memory: measured {format_size(measured)} (max allocated), planner "
            f"predicted {format_size(predicted)} ({err}); memory.json")  # fmt: skip
