"""Training: DiceCE with deep supervision, AdamW + warm-up/cosine, validation, checkpoints, DDP.

:func:`train` runs one training job described by a :class:`~fastnmf.config.TrainConfig`:

- data: :func:`fastnmf.data.open_dataset`, fold ``cfg.fold`` of a deterministic k-fold split,
  the paper's MONAI pipelines; the deterministic part of each case is cached
  (:class:`monai.data.CacheDataset`).
- sampling is a pure function of ``(seed, step)``: patch ``g`` of the run is case
  ``perm_e[g mod n]`` (``perm_e`` a permutation drawn from ``(seed, epoch e)``) augmented with
  random state seeded by ``(seed, g)``; step ``s`` of rank ``r`` takes
  ``g = (s·world + r)·batch + i`` (:class:`DistributedSampler`'s interleaving). So a resumed run
  sees exactly the patches the uninterrupted run would have, whatever the number of workers.
- loss: Dice (MONAI :class:`DiceLoss`, sigmoid) + binary cross-entropy per region channel
  (Eq. 15-17; one sigmoid channel per region) on each
  deep-supervision output against the label resized (nearest) to it, weighted 1, 0.5, 0.25
  (normalised);
- AdamW (lr 1e-4, weight decay 1e-2 by default), linear warm-up then cosine decay to zero,
  gradient clipping, optional bf16 autocast (fp16 with a GradScaler);
- validation every ``val_every`` steps: sliding-window Dice per region and the validation loss on
  the validation fold (split across ranks by a :class:`DistributedSampler`); ``best.pt`` (the
  model :func:`is_better` picks: higher mean Dice, ties broken by the lower validation loss) and
  ``last.pt``,
  written atomically, with the model, optimiser, scheduler, scaler, per-rank RNG states, step and
  the config as plain data, so ``torch.load(weights_only=True)`` reads them and a resumed run
  continues bit for bit;
- logs: ``train.csv`` / ``val.csv``, TensorBoard (``tb/``), progress with loss, steps/s, ETA
  (a tqdm bar on a terminal, whole lines otherwise: :class:`fastnmf.logs.Progress`);
- a non-finite loss stops the run with :class:`TrainingDiverged`, after saving the last good
  state (before the bad step) as ``last.pt``.
- multi-GPU / multi-process: under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
  DDP (NCCL on GPUs, gloo on CPUs); rank 0 logs and writes checkpoints.
- at the end (``cfg.evaluate``) rank 0 segments the validation fold with ``best.pt``
  (:func:`fastnmf.infer.infer`) and scores it (:func:`fastnmf.evaluate.evaluate`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import data as fdata
from .checkpoints import _rng_state, _seed_everything, _set_rng_state, save_checkpoint
from .config import TrainConfig
from .infer import build_model, info_to_dict, resolve_device, sliding_window_logits
from .logs import Progress, TrainLogs, print_line

__all__ = [
    "TrainingDiverged",
    "TrainResult",
    "train",
    "DeepSupervisionLoss",
    "warmup_cosine",
    "save_checkpoint",
    "validate",
    "case_seed",
    "is_better",
]

# mean Dice values closer than this are a tie (e.g. 0 = 0 before a small lesion is found)
DICE_TIE = 1e-6

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    """What :func:`train` returns (rank 0 has the metrics; other ranks get ``None`` there)."""

    out: Path
    step: int
    finished: bool
    baseline: dict[str, float] | None = None
    best: dict[str, Any] | None = None
    last_val: dict[str, float] | None = None
    seconds: float = 0.0
    evaluation: dict[str, Any] | None = None
    predictions: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Loss and schedule


class DeepSupervisionLoss(nn.Module):
    """Weighted DiceCE over deep-supervision outputs [full, 1/2, 1/4, ...].

    Each output's target is the full-resolution label resized (nearest) to the output's size.
    ``weights`` (default 1, 0.5, 0.25) are normalised over the outputs present.
    """

    def __init__(self, *, weights: list[float] | tuple[float, ...] = (1.0, 0.5, 0.25)) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.weights = [float(w) for w in weights]
        # Dice (sigmoid) + binary CE per region channel. MONAI's DiceCELoss(sigmoid=True) is not
        # used: with more than one output channel its CE term is a softmax cross-entropy across
        # the channels, wrong for nested (multi-label) regions.
        self.dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.bce = nn.BCEWithLogitsLoss()

    def dicece(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dice + BCE of one output (paper Eq. 15-17)."""
        return self.dice(logits, target) + self.bce(logits, target)

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], label: torch.Tensor):
        outs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        weights = self.weights[: len(outs)] + [0.0] * max(0, len(outs) - len(self.weights))
        total = sum(weights)
        loss = outs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outs, strict=True):
            if w == 0:
                continue
            target = label
            if tuple(out.shape[2:]) != tuple(label.shape[2:]):
                target = F.interpolate(label, size=tuple(out.shape[2:]), mode="nearest")
            loss = loss + (w / total) * self.dicece(out.float(), target)
        return loss


def warmup_cosine(warmup: int, total: int):
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ----------------------------------------------------------------------------------------------
# Data


def case_seed(seed: int, index: int) -> int:
    """A 32-bit seed for patch ``index`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class PatchStream(torch.utils.data.Dataset):
    """Training patch ``g`` of a run (see the module docstring): deterministic in (seed, g)."""

    def __init__(self, cached, transform, *, seed: int) -> None:
        self.cached = cached  # CacheDataset over the training cases
        self.transform = transform
        self.seed = seed
        self.n = len(cached)
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return 2**62

    def case_index(self, g: int) -> int:
        epoch = g // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][g % self.n])

    def __getitem__(self, g: int) -> dict[str, Any]:
        self.transform.set_random_state(seed=case_seed(self.seed, g))
        item = self.cached[self.case_index(g)]
        if isinstance(item, list):  # RandCropByPosNegLabeld returns a list of samples
            item = item[0]
        return {"image": torch.as_tensor(item["image"]), "label": torch.as_tensor(item["label"])}


class StepBatches(torch.utils.data.Sampler):
    """Batches of patch indices for steps ``start..stop-1`` of rank ``rank`` of ``world``."""

    def __init__(self, *, start: int, stop: int, batch: int, rank: int, world: int) -> None:
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for s in range(self.start, self.stop):
            base = (s * self.world + self.rank) * self.batch
            yield list(range(base, base + self.batch))


# ----------------------------------------------------------------------------------------------
# Distributed helpers


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _any(flag: bool, world: int, device: torch.device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


# ----------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validate(
    model: nn.Module,
    loader,
    *,
    regions: tuple[str, ...],
    overlap: float,
    sw_batch_size: int,
    amp: str = "none",
    world: int = 1,
    loss_fn: DeepSupervisionLoss | None = None,
) -> dict[str, float]:
    """Sliding-window Dice per region (sigmoid > 0.5; empty truth and prediction = 1), averaged
    over the validation cases (gathered across ranks, each case once); adds ``"mean"`` and, with
    ``loss_fn``, ``"loss"`` (its Dice + BCE on the whole volume's logits, mean over cases)."""
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    loss_fn = loss_fn or DeepSupervisionLoss()
    per_case: list[tuple[str, list[float]]] = []
    for batch in loader:
        logits = sliding_window_logits(
            model, batch["image"], overlap=overlap, sw_batch_size=sw_batch_size, amp=amp
        )
        pred = (torch.sigmoid(logits) > 0.5).float().cpu()
        label = torch.as_tensor(batch["label"]).cpu()
        d = metric(pred, label)  # (B, R)
        for i in range(d.shape[0]):
            loss = loss_fn.dicece(logits[i : i + 1].float().cpu(), label[i : i + 1].float())
            per_case.append((str(batch["id"][i]), [*d[i].tolist(), float(loss)]))
    merged = {cid: v for part in _gather(per_case, world) for cid, v in part}
    scores = np.array(list(merged.values()), dtype=np.float64).reshape(-1, len(regions) + 1)
    result = {name: float(scores[:, k].mean()) for k, name in enumerate(regions)}
    result["mean"] = float(np.mean([result[r] for r in regions]))
    result["loss"] = float(scores[:, -1].mean())
    return result


def is_better(scores: dict[str, float], best: dict[str, Any]) -> bool:
    """Whether a validation result (``mean`` Dice, ``loss``) beats the best so far (``dice``,
    ``loss``, ``scores``): a higher mean Dice (by more than :data:`DICE_TIE`) wins; a tie goes to
    the lower validation loss, and an equal loss to the newer model. So a run whose Dice is stuck
    at 0 keeps the model that is closest to finding the lesion, not the first one."""
    if best.get("scores") is None:
        return True
    diff = scores["mean"] - best["dice"]
    if abs(diff) > DICE_TIE:
        return diff > 0
    return scores.get("loss", math.inf) <= best.get("loss", math.inf)


def _fmt(d: dict[str, float] | None) -> str:
    if not d:
        return "n/a"
    dice = "  ".join(f"{k} {v:.4f}" for k, v in d.items() if k != "loss")
    return dice + (f";  validation loss {d['loss']:.4f}" if "loss" in d else "")


# ----------------------------------------------------------------------------------------------
# Training


def train(
    cfg: TrainConfig,
    *,
    out: str | Path,
    resume: str | Path | None = None,
    stop_at: int | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> TrainResult:
    """Run (or resume) the training job ``cfg``; write everything under ``out``.

    Args:
        cfg: the resolved configuration (saved as ``out/config.json``).
        out: run folder: ``last.pt``, ``best.pt``, ``config.json``, ``train.csv``, ``val.csv``,
            ``tb/``, and after evaluation ``predictions/`` (NIfTI, PNG, ``metrics.csv``).
        resume: a checkpoint to continue from (model, optimiser, scheduler, scaler, RNG, step);
            its config must equal ``cfg``.
        stop_at: stop after this global step (saving ``last.pt``) without finishing the schedule,
            e.g. to split a long run into chunks; ``resume`` continues it.
        progress: show the tqdm bar (rank 0).
        verbose: print the config, validation results and the outputs (rank 0).

    Raises:
        TrainingDiverged: a non-finite loss (``last.pt`` holds the state before the bad step).
    """
    from monai.data import CacheDataset, DataLoader

    from .infer import load_checkpoint

    rank, world, local = _dist_env()
    distributed = world > 1
    device = resolve_device(cfg.device)
    if distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(out)
    is_main = rank == 0
    say = (lambda m: print_line(m, rank)) if verbose else (lambda m: None)

    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        saved = TrainConfig.from_dict(ckpt["config"])
        runtime = {"device", "num_workers", "evaluate", "log_every", "deterministic"}
        diff = [
            k for k, v in saved.to_dict().items() if k not in runtime and cfg.to_dict().get(k) != v
        ]
        if diff:
            raise ValueError(
                f"{resume}: the checkpoint's config differs in {', '.join(diff)}; resume with the "
                "same settings (they are read from the checkpoint when not given)"
            )
    start = time.perf_counter()
    if cfg.deterministic:
        from .determinism import set_deterministic

        set_deterministic(cfg.seed + rank)
    else:
        _seed_everything(cfg.seed + rank)

    # data
    demo_kwargs = dict(cfg.demo) if cfg.data == "demo" else {}
    ds = fdata.open_dataset(cfg.data, **demo_kwargs)
    info = ds.info
    train_cases, val_cases = fdata.split(
        ds.cases, cfg.fold, n_folds=cfg.n_folds, seed=cfg.split_seed
    )
    if cfg.val_cases:
        val_cases = val_cases[: cfg.val_cases]
    tr_tf = fdata.train_transforms(
        info, patch_size=cfg.patch, crop=cfg.crop, pos_ratio=cfg.pos_ratio, augment=cfg.augment
    )
    va_tf = fdata.val_transforms(info, resample=True)
    tr_cache = CacheDataset(train_cases, tr_tf, progress=False, num_workers=0)
    va_ds = CacheDataset(val_cases, va_tf, progress=False, num_workers=0)
    stream = PatchStream(tr_cache, tr_tf, seed=cfg.seed)

    # model, optimiser, schedule
    model = build_model(cfg, info).to(device)
    raw_model = model
    if distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    loss_fn = DeepSupervisionLoss(weights=cfg.deep_supervision)
    opt = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    step = 0
    best: dict[str, Any] = {"step": 0, "dice": -1.0, "loss": math.inf, "scores": None}
    baseline = None
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        best = dict(ckpt.get("best") or best)
        baseline = ckpt.get("baseline")

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
    if distributed:
        dist.barrier()
    say(f"fastnmf train: config (saved to {out / 'config.json'})\n{cfg.summary()}")
    from fastnmf.models import count_parameters

    say(
        f"data: {ds.kind} at {ds.root}: {len(train_cases)} training / {len(val_cases)} validation "
        f"cases (fold {cfg.fold} of {cfg.n_folds}); model {cfg.model}: "
        f"{count_parameters(raw_model) / 1e6:.3f}M parameters; device {device}, "
        f"{world} process(es)"
    )
    logs = TrainLogs(
        out, enabled=is_main, regions=info.regions, resume_step=step if ckpt is not None else None
    )
    va_sampler = (
        torch.utils.data.distributed.DistributedSampler(
            va_ds, num_replicas=world, rank=rank, shuffle=False
        )
        if distributed
        else None
    )
    # a private generator: MONAI's DataLoader with num_workers=0 otherwise draws from, and then
    # re-seeds, torch's global generator
    va_loader = DataLoader(
        va_ds, batch_size=1, sampler=va_sampler, num_workers=0, generator=torch.Generator()
    )

    def run_validation() -> dict[str, float]:
        return validate(
            raw_model,
            va_loader,
            regions=info.regions,
            overlap=cfg.overlap,
            sw_batch_size=cfg.sw_batch_size,
            amp=cfg.amp,
            world=world,
            loss_fn=loss_fn,
        )

    def state(at_step: int, rng: dict[str, Any]) -> dict[str, Any]:
        rngs = _gather(rng, world)
        return {
            "format": CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),
            "info": info_to_dict(info),
            "step": at_step,
            "model": raw_model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rngs,
            "best": best,
            "baseline": baseline,
        }

    def checkpoint(name: str, at_step: int, rng: dict[str, Any]) -> Path:
        s = state(at_step, rng)  # collective under DDP: every rank calls it
        path = out / name
        if is_main:
            save_checkpoint(s, path)
        if distributed:
            dist.barrier()
        return path

    if baseline is None:
        rng_before = _rng_state()
        baseline = run_validation()
        _set_rng_state(rng_before)  # validation draws nothing, but keep the stream exact anyway
        logs.val(0, baseline)
        say(f"step 0 (untrained) validation Dice: {_fmt(baseline)}")

    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    loader = DataLoader(
        stream,
        batch_sampler=StepBatches(
            start=step, stop=end, batch=cfg.batch_size, rank=rank, world=world
        ),
        num_workers=cfg.num_workers,
        persistent_workers=False,
        generator=torch.Generator(),  # keeps the global torch RNG untouched
        pin_memory=device.type == "cuda",
    )
    if ckpt is not None:  # restored last, so that nothing above can disturb the streams
        rngs = ckpt.get("rng") or []
        if len(rngs) == world:
            _set_rng_state(rngs[rank])
        else:
            say(f"note: checkpoint has RNG states of {len(rngs)} rank(s), running {world}")
    model.train()
    bar = Progress(total=cfg.steps, initial=step, enabled=progress and is_main)
    last_val = None
    t_log, s_log = time.perf_counter(), step
    try:
        for batch in loader:
            rng_at_start = _rng_state()
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                outputs = model(image)
            loss = loss_fn(outputs, label)
            if _any(not torch.isfinite(loss).item(), world, device):
                path = checkpoint("last.pt", step, rng_at_start)
                raise TrainingDiverged(
                    f"non-finite loss ({loss.item()}) at step {step + 1}: training stopped; the "
                    f"last good state (after step {step}) is in {path}"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if cfg.grad_clip > 0:
                gnorm = float(nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip))
            else:
                gnorm = float(
                    torch.norm(
                        torch.stack(
                            [p.grad.norm() for p in raw_model.parameters() if p.grad is not None]
                        )
                    )
                )
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            lv = float(loss.item())
            bar.update(loss=lv, lr=sched.get_last_lr()[0])
            if step % cfg.log_every == 0 or step == end:
                now = time.perf_counter()
                sps = (step - s_log) / max(now - t_log, 1e-9)
                t_log, s_log = now, step
                logs.train(step, lv, sched.get_last_lr()[0], gnorm, sps)
            if step % cfg.val_every == 0 or step == cfg.steps:
                last_val = run_validation()
                logs.val(step, last_val)
                improved = is_better(last_val, best)
                if improved:
                    best = {
                        "step": step,
                        "dice": last_val["mean"],
                        "loss": last_val["loss"],
                        "scores": last_val,
                    }
                say(
                    f"step {step} validation Dice: {_fmt(last_val)}"
                    + ("  (best)" if improved else "")
                )
                rng_now = _rng_state()
                if improved:
                    checkpoint("best.pt", step, rng_now)
                checkpoint("last.pt", step, rng_now)
        if step == end and (step % cfg.val_every != 0 and step != cfg.steps):
            checkpoint("last.pt", step, _rng_state())
    finally:
        bar.close()
        logs.close()

    finished = step >= cfg.steps
    result = TrainResult(
        out=out,
        step=step,
        finished=finished,
        baseline=baseline,
        best=best,
        last_val=last_val,
        seconds=time.perf_counter() - start,
    )
    if finished and cfg.evaluate and is_main:
        result.evaluation, result.predictions = _final_evaluation(out, val_cases, info, cfg, say)
    if distributed:
        dist.barrier()
    result.seconds = time.perf_counter() - start
    return result


def _final_evaluation(out: Path, cases, info, cfg: TrainConfig, say):
    from .evaluate import evaluate, format_summary
    from .infer import infer

    pred_dir = out / "predictions"
    say(f"inference on the {len(cases)} validation case(s) with {out / 'best.pt'} ...")
    infer(
        out / "best.pt",
        cases,
        pred_dir,
        device=cfg.device,
        overlap=cfg.overlap,
        sw_batch_size=cfg.sw_batch_size,
    )
    rows, summary = evaluate(pred_dir, cases, info)
    say(
        f"evaluation of the saved predictions ({pred_dir / 'metrics.csv'}):\n"
        + format_summary(summary)
    )
    return summary, pred_dir
