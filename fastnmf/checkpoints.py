"""Checkpoints of a training run: the one place for their format and the resume rules.

A checkpoint is a ``torch.save`` dict of plain data (``torch.load(weights_only=True)`` reads it):

- ``format``: :data:`CHECKPOINT_FORMAT` (a checkpoint without it is read as format 1, the format
  every checkpoint had before the field was checked; an unknown format is refused);
- ``config`` (:meth:`TrainConfig.to_dict`), ``info`` (:func:`info_to_dict` of the data set),
  ``step``, ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``rng`` (one
  :func:`_rng_state` per rank), ``best`` and ``baseline`` (validation results).

Written by :mod:`fastnmf.train` (:func:`save_checkpoint`, atomically), read by
:mod:`fastnmf.infer`, :mod:`fastnmf.bundle` and the CLI (:func:`load_checkpoint`,
:func:`config_of`). The resume rules: :func:`resume_target` (which file and run folder
``--resume`` means), :func:`resume_config` (the checkpoint's config with the options given again)
and :func:`check_resume` (a run resumes only with the config it was started with, runtime settings
aside).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data as fdata
from .config import TrainConfig, renamed_keys

__all__ = [
    "CHECKPOINT_FORMAT",
    "RUNTIME_KEYS",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "config_of",
    "info_to_dict",
    "info_from_dict",
    "checkpoint_path",
    "resume_target",
    "resume_config",
    "check_resume",
]

# the layout of the dict above; bump it (and read the old one, or refuse it clearly) on a change
CHECKPOINT_FORMAT = 1
# config keys a resumed run may change: they do not alter what the run computes
RUNTIME_KEYS = frozenset(
    {"device", "num_workers", "evaluate", "log_every", "deterministic", "compile"}
)


def upgrade_optimizer_state(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state saved before the decoder adapters held two weights (one merged
    (C_out, C_skip + C_x, 1, ...) parameter per adapter, one parameter group) mapped onto
    ``model``'s parameters: each merged entry's tensors split along dim 1 into the adapter's
    ``weight_skip`` and ``weight_x``. Any other state is returned as it is (PyTorch's own
    load_state_dict then checks it)."""
    from .models.layers import SkipAdapter

    params = list(model.parameters())
    groups = state.get("param_groups", [])
    saved = [i for g in groups for i in g["params"]]
    adapters = {id(m.weight_skip): m for m in model.modules() if isinstance(m, SkipAdapter)}
    if len(groups) != 1 or len(saved) == len(params) or len(saved) + len(adapters) != len(params):
        return state
    old, new, j = state["state"], {}, 0
    seconds = {id(m.weight_x) for m in adapters.values()}
    for i, p in enumerate(params):
        if id(p) in seconds:
            continue  # filled with its adapter's first weight
        entry = old.get(saved[j])
        j += 1
        if entry is None:
            continue
        if id(p) not in adapters:
            new[i] = entry
            continue
        cs = adapters[id(p)].split[0]
        merged = (p.shape[0], sum(adapters[id(p)].split), *p.shape[2:])
        for k, part in ((i, slice(None, cs)), (i + 1, slice(cs, None))):
            new[k] = {name: v[:, part].clone() if torch.is_tensor(v) and tuple(v.shape) == merged
                      else v for name, v in entry.items()}  # fmt: skip
    return {"state": new, "param_groups": [dict(groups[0], params=list(range(len(params))))]}


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not a fastnmf checkpoint."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a fastnmf checkpoint safely (``weights_only=True``); check its format."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickling-policy errors
        raise CheckpointError(f"{p}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{p}: not a fastnmf checkpoint (no config/model)")
    fmt = ckpt.get("format", 1)
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{p}: checkpoint format {fmt!r} is unknown to this fastnmf (reads format "
            f"{CHECKPOINT_FORMAT}); use the fastnmf version that wrote it"
        )
    return ckpt


def config_of(ckpt: dict[str, Any]) -> TrainConfig:
    """The training config stored in a checkpoint (old key spellings accepted, with a warning)."""
    return TrainConfig.from_dict(ckpt["config"])


def info_to_dict(info: fdata.DatasetInfo) -> dict[str, Any]:
    """A :class:`~fastnmf.data.DatasetInfo` as plain (JSON-able) data."""
    return {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(info).items()
    }


def info_from_dict(d: dict[str, Any]) -> fdata.DatasetInfo:
    """Inverse of :func:`info_to_dict` (also after a JSON round trip; an old ``patch_size`` key
    is read as ``crop_size``)."""
    kw = dict(d)
    if "patch_size" in kw and "crop_size" not in kw:
        kw["crop_size"] = kw.pop("patch_size")
    for key in ("channel_names", "regions", "label_values", "crop_size", "spacing"):
        if kw.get(key) is not None:
            kw[key] = tuple(kw[key])
    return fdata.DatasetInfo(**kw)


def checkpoint_path(path: str | Path, *, name: str = "best.pt") -> Path:
    """A checkpoint file, or a run folder standing for its ``name`` checkpoint."""
    p = Path(path)
    return p / name if p.is_dir() else p


def resume_target(resume: str, out: str | Path | None) -> tuple[Path, Path]:
    """``(checkpoint, run folder)`` of ``--resume [CKPT]``: ``"last"`` (the flag alone) is
    ``<out>/last.pt``; a folder is its ``last.pt``; the run folder defaults to the checkpoint's."""
    if resume == "last":
        if out is None:
            raise ValueError("--resume without a checkpoint needs --out RUN_DIR")
        ckpt = Path(out) / "last.pt"
    else:
        ckpt = checkpoint_path(resume, name="last.pt")
    return ckpt, Path(out) if out else ckpt.parent


def resume_config(
    ckpt: str | Path, given: dict[str, Any], *, preset: str | None = None
) -> TrainConfig:
    """The config to resume ``ckpt`` with: the checkpoint's, updated with the options ``given``
    again (``None`` values ignored; ``model_options`` merged). :func:`check_resume` then refuses
    any change that is not a runtime setting."""
    cfg = config_of(load_checkpoint(ckpt))
    given = renamed_keys({k: v for k, v in given.items() if v is not None})  # old spellings
    if preset is not None and preset != cfg.preset:
        given["preset"] = preset
    if "model_options" in given:
        given["model_options"] = {**cfg.model_options, **given["model_options"]}
    return TrainConfig.from_dict({**cfg.to_dict(), **given})


def check_resume(ckpt: dict[str, Any], cfg: TrainConfig, *, path: str | Path) -> None:
    """Refuse to resume the checkpoint ``ckpt`` (read from ``path``) with a config that differs
    from its own in anything but :data:`RUNTIME_KEYS`."""
    saved = config_of(ckpt).to_dict()
    now = cfg.to_dict()
    diff = [k for k, v in saved.items() if k not in RUNTIME_KEYS and now.get(k) != v]
    if diff:
        raise ValueError(
            f"{path}: the checkpoint's config differs in {', '.join(diff)}; resume with the "
            "same settings (they are read from the checkpoint when not given)"
        )


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, pstate, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": int(version), "state": list(pstate), "gauss": gauss},
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed: a
    process killed at any moment leaves the previous checkpoint or the new one, never a
    half-written file (a leftover ``.<name>.tmp-<pid>`` may remain; it is never read).

    Test hook: ``FASTNMF_TEST_SLOW_SAVE=<seconds>`` pauses between writing the temporary file and
    the rename, so tests/test_reliability_faults.py can kill a run inside that window. Unset in
    normal use; it changes nothing but timing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        delay = os.environ.get("FASTNMF_TEST_SLOW_SAVE")
        if delay:
            time.sleep(float(delay))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
