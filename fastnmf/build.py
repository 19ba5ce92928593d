"""What training, inference and bundles share to set a run up: the device and the model.

:func:`resolve_device` turns a ``--device`` string into a :class:`torch.device`;
:func:`build_model` builds the model a :class:`~fastnmf.config.TrainConfig` describes, sized for
the data (channels) and the training crop. :mod:`fastnmf.train`, :mod:`fastnmf.infer` and
:mod:`fastnmf.bundle` import them from here.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import nn

from . import data as fdata
from .config import TrainConfig

__all__ = ["resolve_device", "build_model"]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → ``cuda`` (the local rank's GPU under torchrun) if available, else ``cpu``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "cuda" and dev.index is None:  # this process's GPU, by index (set_device)
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return dev


def build_model(cfg: TrainConfig, info: fdata.DatasetInfo) -> nn.Module:
    """The model a config describes, sized for the data (channels) and the training crop."""
    from fastnmf import models
    from fastnmf.config import model_preset_for

    preset = cfg.model_preset or model_preset_for(info.kind)
    opts: dict[str, Any] = dict(cfg.model_options)
    opts.setdefault("spatial_size", (cfg.crop_size,) * 3)
    opts.setdefault("in_channels", info.in_channels)
    opts.setdefault("out_channels", info.out_channels)
    for key in ("widths", "spatial_size"):
        if key in opts and isinstance(opts[key], list):
            opts[key] = tuple(opts[key])
    fn = models.MODELS.get(cfg.model, models.MODELS.get("swin_factorizer"))
    params = inspect.signature(fn).parameters
    if "seed" in params and "seed" not in opts:
        opts["seed"] = cfg.seed
    return models.build(cfg.model, preset=preset, kernel=cfg.kernel, **opts)
