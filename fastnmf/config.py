"""Training configuration: one JSON-able dataclass, presets, and overrides.

A run is described by a :class:`TrainConfig`. It is built from a run preset (:data:`RUN_PRESETS`;
``PRESETS`` is its old name, kept importable):

==========  ==========================================================================  ======
preset      what                                                                        data
==========  ==========================================================================  ======
``demo``    the main job: a small swin Factorizer (widths 16…128, crop 32³, window 4)    demo
            trained for 300 steps on the built-in demo set, learns within minutes on
            2 CPU cores
``brats``   the paper's BraTS setting (section 4.2): swin Factorizer, crop 128³,          (path)
            100k steps, 2k warmup, batch 2, AdamW lr 1e-4, weight decay 1e-2
``isles``   the paper's ISLES'22 setting: crop 64³, E = 4, window 4, mlp ratio 4         (path)
==========  ==========================================================================  ======

then updated with explicit overrides (:func:`resolve`). A preset describes a model and a
schedule, not a data set: given ``steps`` but no ``warmup``, the preset's warm-up keeps its
fraction of the run (demo: 30 of 300 steps → 2 of 20); a warm-up longer than the run is refused.
Non-demo data gets lesion-centred crops by default (``crop="posneg"``, one patch in three centred
on foreground, as nnU-Net) and no demo settings. The resolved config is printed at the start of
training and saved as ``config.json`` beside the checkpoints (both show only the settings that
apply, :meth:`TrainConfig.applicable`), and stored (as plain JSON data) inside every checkpoint,
so :mod:`fastnmf.infer` can rebuild the model from a checkpoint alone.

Names: the training *crop* (``crop_size``, ``--crop-size``; ``crop`` is its kind) is the volume a
training step sees; the NMF *window* is a model option (``model_options["window"]``). The crop
size was called ``patch`` before; that key (in old ``config.json`` files and checkpoints) and the
``--patch`` flag still work for one release, with a :class:`DeprecationWarning`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import _checks as C

__all__ = [
    "TrainConfig", "RUN_PRESETS", "PRESETS", "AMP_MODES", "COMPILE_BACKENDS", "resolve",
    "model_preset_for",
]  # fmt: skip

AMP_MODES = ("none", "bf16", "fp16")
# torch.compile backends of ``compile`` ("none": eager); aot_eager / eager: CPU tests, debugging
COMPILE_BACKENDS = ("none", "inductor", "aot_eager", "eager")
CROPS = ("random", "posneg")
# nnU-Net centres one patch in three on foreground: small lesions are seen without a bias to them
DEFAULT_POS_RATIO = 1 / 3


@dataclass
class TrainConfig:
    """Everything that defines a training run (all fields JSON-able).

    Attributes:
        preset: the preset this config started from.
        model: a name of :func:`fastnmf.models.available`.
        model_preset: the :func:`fastnmf.models.build` preset (``"brats"`` or ``"isles"``); by
            default chosen from the data kind.
        model_options: extra keyword arguments of the model builder (e.g. ``widths``).
        kernel: NMF kernel: ``auto`` | ``triton`` | ``torch`` | ``reference``.
        data: ``"demo"``, a data-set folder or a JSON datalist.
        demo: :func:`fastnmf.data.make_demo` arguments when ``data == "demo"``.
        fold, n_folds, split_seed: cross-validation split (:func:`fastnmf.data.split`).
        steps: total optimiser steps (the LR schedule spans them).
        warmup: linear warm-up steps, then cosine decay to 0 at ``steps``.
        batch_size: patches per step and per process (DDP: the global batch is
            ``batch_size × world size``).
        crop_size: training crop edge (cubic); also the model's ``spatial_size`` and the
            sliding-window size at inference (formerly ``patch``).
        lr, weight_decay: AdamW.
        grad_clip: max gradient norm (0: off).
        amp: ``none`` | ``bf16`` (autocast) | ``fp16`` (autocast + GradScaler, CUDA).
        compile: ``torch.compile`` backend of the training step (:data:`COMPILE_BACKENDS`;
            ``none``: eager). Checkpoints hold the plain model's weights either way.
        gpu_memory: plan the run for a GPU of this size (``"24GB"``, ``"24GiB"``, ``"8000MB"``;
            :func:`fastnmf.plan.parse_memory`): :func:`fastnmf.plan.plan_run` picks
            ``batch_size``, ``crop_size`` (the values given are the largest tried) and
            activation checkpointing from the training-step account; ``None``: no plan.
        plan: what the planner chose (batch, crop, checkpoint, predicted peak, budget), filled
            in when the run starts; empty without ``gpu_memory``.
        deep_supervision: loss weights of the outputs [full, 1/2, 1/4, ...] (paper 1, .5, .25);
            normalised to sum to one.
        crop: training patch sampling: ``random`` (uniform, the paper's BraTS setting; the demo
            preset) or ``posneg`` (a ``pos_ratio`` share of patches centred on a foreground
            voxel, the rest on background; the default for non-demo data).
        pos_ratio: share of ``posneg`` patches centred on foreground, in [0, 1].
        augment: the paper's random augmentations.
        val_every: validate (sliding-window Dice) and checkpoint every this many steps.
        val_cases: validate on at most this many cases of the validation fold (0: all).
        overlap, sw_batch_size: sliding-window inference (50 % overlap, gaussian blending).
        seed: seeds torch, numpy and random at the start of the run, the model's NMF factors and
            the data sampling.
        deterministic: :func:`fastnmf.determinism.set_deterministic` at the start of the run
            (deterministic algorithms, cuDNN and cuBLAS settings): bitwise-repeatable on CUDA too.
        num_workers: DataLoader worker processes.
        device: ``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:1``...
        log_every: CSV / TensorBoard logging interval (steps).
        evaluate: after training, infer and evaluate the validation fold with the best checkpoint.
    """

    preset: str = "demo"
    model: str = "swin_factorizer"
    model_preset: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    kernel: str = "auto"
    data: str = "demo"
    demo: dict[str, Any] = field(default_factory=dict)
    fold: int = 0
    n_folds: int = 5
    split_seed: int = 0
    steps: int = 100_000
    warmup: int = 2_000
    batch_size: int = 2
    crop_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    amp: str = "none"
    compile: str = "none"
    gpu_memory: str | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    deep_supervision: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    crop: str = "random"
    pos_ratio: float = DEFAULT_POS_RATIO
    augment: bool = True
    val_every: int = 1_000
    val_cases: int = 0
    overlap: float = 0.5
    sw_batch_size: int = 4
    seed: int = 0
    deterministic: bool = False
    num_workers: int = 2
    device: str = "auto"
    log_every: int = 10
    evaluate: bool = True

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = renamed_keys(d)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown config key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
            )
        return validate(cls(**d))

    def applicable(self) -> dict[str, Any]:
        """:meth:`to_dict` without the settings that do not apply to this run (the demo data set's
        for other data, ``pos_ratio`` for random crops); :meth:`from_dict` restores them."""
        d = self.to_dict()
        if self.data != "demo":
            d.pop("demo")
        if self.crop != "posneg":
            d.pop("pos_ratio")
        if self.gpu_memory is None:
            d.pop("gpu_memory")
            d.pop("plan")
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.applicable(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> str:
        """The config as aligned ``key: value`` lines."""
        d = self.applicable()
        width = max(map(len, d))
        return "\n".join(f"  {k:<{width}} : {json.dumps(v)}" for k, v in d.items())


_DEMO_MODEL = {
    "widths": [16, 32, 64, 128],
    "head_dim": 8,
    "window": 4,
    "shifts": "default",
    "mlp_ratio": 2.0,
    "dropout": 0.0,
}

RUN_PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "model_options": _DEMO_MODEL,
        "data": "demo",
        "demo": {"n_cases": 16, "size": 48, "seed": 0},
        "steps": 300,
        "warmup": 30,
        "batch_size": 2,
        "crop_size": 32,
        "lr": 3e-3,
        "val_every": 100,
        "num_workers": 0,
        "log_every": 10,
    },
    "brats": {"crop_size": 128, "val_every": 1000},
    "isles": {"crop_size": 64, "val_every": 1000, "model_preset": "isles"},
}
PRESETS = RUN_PRESETS  # the old name (fastnmf.models.ARCH_PRESETS are the architecture presets)

# old config keys -> their names now (read with a DeprecationWarning, for one release)
RENAMED_KEYS = {"patch": "crop_size"}


def renamed_keys(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with old key spellings (:data:`RENAMED_KEYS`) replaced, warning once per key."""
    old = [k for k in RENAMED_KEYS if k in d]
    if not old:
        return d
    d = dict(d)
    for k in old:
        new = RENAMED_KEYS[k]
        warnings.warn(
            f"config key {k!r} is now {new!r}; the old name will be removed in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
        if new in d:
            raise ValueError(f"config has both {k!r} (old name) and {new!r}; keep {new!r} only")
        d[new] = d.pop(k)
    return d


def model_preset_for(kind: str) -> str:
    """The :func:`fastnmf.models.build` preset for a data kind (ISLES → ``isles``)."""
    return "isles" if kind == "isles" else "brats"


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check values; raise ``ValueError`` naming the field and the valid options."""
    from fastnmf import models

    if cfg.preset not in RUN_PRESETS:
        raise ValueError(
            f"unknown preset {cfg.preset!r}; valid presets: {', '.join(RUN_PRESETS)}"
        )
    if cfg.model not in models.available():
        raise ValueError(
            f"unknown model {cfg.model!r}; available models: {', '.join(models.available())}"
        )
    if cfg.model_preset is not None and cfg.model_preset not in models.presets():
        raise ValueError(
            f"unknown model_preset {cfg.model_preset!r}; valid: {', '.join(models.presets())}"
        )
    C.check_choice("kernel", cfg.kernel, C.KERNELS)
    if cfg.amp not in AMP_MODES:
        raise ValueError(f"unknown amp mode {cfg.amp!r}; valid: {', '.join(AMP_MODES)}")
    C.check_choice("compile", cfg.compile, COMPILE_BACKENDS)
    if cfg.gpu_memory is not None:
        from .plan import parse_memory

        parse_memory(cfg.gpu_memory)  # a clear error for a bad size string
    if cfg.crop not in CROPS:
        raise ValueError(f"unknown crop {cfg.crop!r}; valid: {', '.join(CROPS)}")
    for name in ("steps", "batch_size", "crop_size", "val_every", "log_every", "sw_batch_size"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    for name in ("warmup", "num_workers", "val_cases", "fold", "seed"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    if cfg.warmup > cfg.steps:
        raise ValueError(
            f"warmup ({cfg.warmup} steps) is longer than the run (steps {cfg.steps}): the "
            "learning rate would never reach its peak; give --warmup <= --steps (0: none)"
        )
    if isinstance(cfg.pos_ratio, bool) or not isinstance(cfg.pos_ratio, (int, float)):
        raise ValueError(f"pos_ratio must be a number in [0, 1], got {cfg.pos_ratio!r}")
    if not 0 <= cfg.pos_ratio <= 1:
        raise ValueError(f"pos_ratio must be in [0, 1], got {cfg.pos_ratio}")
    if not isinstance(cfg.deterministic, bool):
        raise ValueError(f"deterministic must be true or false, got {cfg.deterministic!r}")
    if not 0 <= cfg.fold < cfg.n_folds:
        raise ValueError(f"fold must be in 0..{cfg.n_folds - 1}, got {cfg.fold}")
    if not cfg.lr > 0 or cfg.weight_decay < 0 or cfg.grad_clip < 0:
        raise ValueError("lr must be > 0, weight_decay and grad_clip >= 0")
    if not 0 <= cfg.overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {cfg.overlap}")
    if not cfg.deep_supervision or any(w < 0 for w in cfg.deep_supervision):
        raise ValueError(
            f"deep_supervision must be a non-empty list of weights >= 0, got {cfg.deep_supervision}"
        )
    if not isinstance(cfg.model_options, dict):
        raise ValueError("model_options must be a dict")
    builder = models.MODELS.get(cfg.model, models.MODELS["swin_factorizer"])  # or its alias
    params = inspect.signature(builder).parameters
    unknown = sorted(k for k in cfg.model_options if k not in params)
    if unknown:
        raise ValueError(
            f"model {cfg.model!r} has no option(s) {', '.join(unknown)} (--model-opt); valid "
            f"options: {', '.join(params)}"
        )
    return cfg


def resolve(
    preset: str = "demo", *, notes: list[str] | None = None, **overrides: Any
) -> TrainConfig:
    """The config of ``preset`` with ``overrides`` applied (``None`` values are ignored).

    ``model_options`` given here update the preset's (they do not replace them); overriding the
    model drops the preset's model options (they belong to the preset's model). ``steps`` without
    ``warmup`` scales the preset's warm-up to the same fraction of the run; data other than the
    demo drops the demo settings and, without ``crop``, samples ``posneg`` patches. What was
    adapted is appended to ``notes`` (one line each), for the caller to print.
    """
    if preset not in RUN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(RUN_PRESETS)}")
    base: dict[str, Any] = {"preset": preset, **json.loads(json.dumps(RUN_PRESETS[preset]))}
    overrides = renamed_keys({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
        )
    if "model" in overrides and overrides["model"] != base.get("model", "swin_factorizer"):
        base.pop("model_options", None)
    given = overrides.pop("model_options", {}) or {}
    if not isinstance(given, dict):
        raise ValueError(f"model_options must be a dict, got {given!r}")
    opts = dict(base.get("model_options", {}))
    opts.update(given)
    base["model_options"] = opts
    _adapt_schedule(base, overrides, notes if notes is not None else [])
    base.update(overrides)
    if "pos_ratio" in overrides and base.get("crop") != "posneg":
        raise ValueError(
            f"pos_ratio applies to crop='posneg' only, but the crop is {base.get('crop')!r}; "
            "drop --pos-ratio or pass --crop posneg"
        )
    return TrainConfig.from_dict(base)


def _adapt_schedule(base: dict[str, Any], overrides: dict[str, Any], notes: list[str]) -> None:
    """Fit the preset ``base`` to the run the overrides ask for (see :func:`resolve`)."""
    default = TrainConfig()
    if "steps" in overrides and "warmup" not in overrides:
        steps, warmup = base.get("steps", default.steps), base.get("warmup", default.warmup)
        scaled = round(warmup * overrides["steps"] / steps)
        scaled = min(scaled, overrides["steps"] - 1)
        if scaled != warmup:
            base["warmup"] = scaled
            notes.append(
                f"warm-up scaled with the run: the {base['preset']} preset warms up for {warmup} "
                f"of {steps} steps, this run for {scaled} of {overrides['steps']}"
            )
    val_every = base.get("val_every", default.val_every)
    if "steps" in overrides and "val_every" not in overrides and val_every > overrides["steps"]:
        base["val_every"] = overrides["steps"]
        notes.append(f"validation at the end of the run (the preset validates every {val_every})")
    if overrides.get("data", base.get("data", default.data)) != "demo":
        base["demo"] = {}
        if "crop" not in overrides and base.get("crop", default.crop) != "posneg":
            base["crop"] = "posneg"
            ratio = overrides.get("pos_ratio", base.get("pos_ratio", default.pos_ratio))
            notes.append(
                f"crop: posneg ({ratio:.2f} of the patches centred on a lesion voxel; "
                "--crop random for uniform patches)"
            )
