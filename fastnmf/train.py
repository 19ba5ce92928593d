"""Training: DiceCE with deep supervision, AdamW + warm-up/cosine, validation, checkpoints, DDP.

:func:`train` runs one training job described by a :class:`~fastnmf.config.TrainConfig`:

- data: :func:`fastnmf.data.open_dataset`, fold ``cfg.fold`` of a deterministic k-fold split,
  the paper's MONAI pipelines; the deterministic part of each case is cached
  (:class:`monai.data.CacheDataset`).
- sampling is a pure function of ``(seed, step)`` (:mod:`fastnmf.data.sampling`): a resumed run
  sees exactly the crops the uninterrupted run would have, whatever the number of workers.
- loss: Dice (MONAI :class:`DiceLoss`, sigmoid) + binary cross-entropy per region channel
  (Eq. 15-17; one sigmoid channel per region) on each
  deep-supervision output against the label resized (nearest) to it, weighted 1, 0.5, 0.25
  (normalised);
- AdamW (lr 1e-4, weight decay 1e-2 by default), linear warm-up then cosine decay to zero,
  gradient clipping, optional bf16 autocast (fp16 with a GradScaler);
- validation every ``val_every`` steps: sliding-window Dice per region and the validation loss on
  the validation fold (split across ranks by a :class:`DistributedSampler`); ``best.pt`` (the
  model :func:`is_better` picks: higher mean Dice, ties broken by the lower validation loss) and
  ``last.pt``, written atomically in the format of :mod:`fastnmf.checkpoints` (which also holds
  the resume rules), so ``torch.load(weights_only=True)`` reads them and a resumed run continues
  bit for bit;
- logs: ``train.csv`` / ``val.csv``, TensorBoard (``tb/``), progress with loss, steps/s, ETA
  (a tqdm bar on a terminal, whole lines otherwise: :class:`fastnmf.logs.Progress`);
- a non-finite loss stops the run with :class:`TrainingDiverged`, after saving the last good
  state (before the bad step) as ``last.pt``.
- multi-GPU / multi-process: under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in
  DDP (NCCL on GPUs, gloo on CPUs); rank 0 logs and writes checkpoints.
- at the end (``cfg.evaluate``) rank 0 segments the validation fold with ``best.pt``
  (:func:`fastnmf.infer.infer`) and scores it (:func:`fastnmf.evaluate.evaluate`).

The run itself is a :class:`TrainRun`: set-up (``__init__``), restore, step,
validate-and-checkpoint, each a method over the run's state; :func:`train` builds one and runs it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.data import MetaTensor
from torch import nn

from . import data as fdata
from .build import build_model, resolve_device
from .checkpoints import (
    CHECKPOINT_FORMAT,
    _rng_state,
    _seed_everything,
    _set_rng_state,
    check_resume,
    info_to_dict,
    load_checkpoint,
    save_checkpoint,
    upgrade_optimizer_state,
)
from .config import TrainConfig
from .data.sampling import CropStream, StepBatches, case_seed
from .distributed import any_rank, dist_env, gather
from .infer import sliding_window_logits
from .logs import Progress, TrainLogs, print_line

__all__ = [
    "TrainingDiverged",
    "TrainResult",
    "TrainRun",
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
    merged = {cid: v for part in gather(per_case, world) for cid, v in part}
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
            its config must equal ``cfg`` (:func:`fastnmf.checkpoints.check_resume`).
        stop_at: stop after this global step (saving ``last.pt``) without finishing the schedule,
            e.g. to split a long run into chunks; ``resume`` continues it.
        progress: show the tqdm bar (rank 0).
        verbose: print the config, validation results and the outputs (rank 0).

    Raises:
        TrainingDiverged: a non-finite loss (``last.pt`` holds the state before the bad step).
    """
    run = TrainRun(cfg, out=out, resume=resume, stop_at=stop_at, verbose=verbose)
    return run.run(progress=progress)


class TrainRun:
    """The state of one training job, and its phases as methods.

    ``__init__`` sets the run up (process group, seeds, data, model, optimiser, and the state of
    ``resume`` if given: :meth:`_restore`), :meth:`run` validates the untrained model, then
    :meth:`_step` per batch and :meth:`_validate_and_checkpoint` every ``val_every`` steps.
    The order of these phases is part of the result: nothing may draw random numbers between the
    seeding and the data set-up, nor between restoring the RNG states and the first step.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        out: str | Path,
        resume: str | Path | None = None,
        stop_at: int | None = None,
        verbose: bool = True,
    ) -> None:
        self.cfg, self.out = cfg, Path(out)
        self.rank, self.world, _ = dist_env()
        self.distributed = self.world > 1
        self.is_main = self.rank == 0
        self.device = resolve_device(cfg.device)
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.verbose = verbose
        self.ckpt = None
        if resume is not None:
            self.ckpt = load_checkpoint(resume)
            check_resume(self.ckpt, cfg, path=resume)
        self.start = time.perf_counter()
        if cfg.deterministic:
            from .determinism import set_deterministic

            set_deterministic(cfg.seed + self.rank)
        else:
            _seed_everything(cfg.seed + self.rank)
        self.end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
        self._set_up_data()
        self._set_up_model()
        self.step = 0
        self.best: dict[str, Any] = {"step": 0, "dice": -1.0, "loss": math.inf, "scores": None}
        self.baseline: dict[str, float] | None = None
        self.last_val: dict[str, float] | None = None
        if self.ckpt is not None:
            self._restore(self.ckpt)
        self._set_up_outputs()

    def say(self, message: str) -> None:
        if self.verbose:
            print_line(message, self.rank)

    # -- set-up

    def _set_up_data(self) -> None:
        from monai.data import CacheDataset, DataLoader

        cfg = self.cfg
        demo_kwargs = dict(cfg.demo) if cfg.data == "demo" else {}
        self.ds = fdata.open_dataset(cfg.data, **demo_kwargs)
        self.info = self.ds.info
        if cfg.gpu_memory is not None and not cfg.plan:  # --gpu-memory: batch, crop, checkpoint
            from .plan import plan_run

            self.cfg = cfg = plan_run(cfg, self.info)
        self.train_cases, self.val_cases = fdata.split(
            self.ds.cases, cfg.fold, n_folds=cfg.n_folds, seed=cfg.split_seed
        )
        if cfg.val_cases:
            self.val_cases = self.val_cases[: cfg.val_cases]
        tr_tf = fdata.train_transforms(self.info, crop_size=cfg.crop_size, crop=cfg.crop,
                                       pos_ratio=cfg.pos_ratio, augment=cfg.augment)  # fmt: skip
        va_tf = fdata.val_transforms(self.info, resample=True)
        tr_cache = CacheDataset(self.train_cases, tr_tf, progress=False, num_workers=0)
        va_ds = CacheDataset(self.val_cases, va_tf, progress=False, num_workers=0)
        self.stream = CropStream(tr_cache, tr_tf, seed=cfg.seed)
        va_sampler = None
        if self.distributed:
            va_sampler = torch.utils.data.distributed.DistributedSampler(
                va_ds, num_replicas=self.world, rank=self.rank, shuffle=False
            )
        # a private generator: MONAI's DataLoader with num_workers=0 otherwise draws from, and
        # then re-seeds, torch's global generator
        self.va_loader = DataLoader(
            va_ds, batch_size=1, sampler=va_sampler, num_workers=0, generator=torch.Generator()
        )

    def _set_up_model(self) -> None:
        cfg, device = self.cfg, self.device
        self.raw_model = build_model(cfg, self.info).to(device)
        self.model = self.raw_model
        if self.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.raw_model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if cfg.compile != "none":  # the training step only; checkpoints hold raw_model's weights
            from .custom_op import maybe_compile

            self.model = maybe_compile(self.model, enabled=True, backend=cfg.compile)
        self.loss_fn = DeepSupervisionLoss(weights=cfg.deep_supervision)
        self.opt = torch.optim.AdamW(
            self.raw_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, warmup_cosine(cfg.warmup, cfg.steps)
        )
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        """Model, optimiser, schedule, scaler, step and validation results of a checkpoint (its
        RNG states come last, in :meth:`_restore_rng`)."""
        self.raw_model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(upgrade_optimizer_state(self.raw_model, ckpt["optimizer"]))
        self.sched.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.best = dict(ckpt.get("best") or self.best)
        self.baseline = ckpt.get("baseline")

    def _restore_rng(self) -> None:
        rngs = (self.ckpt or {}).get("rng") or []
        if len(rngs) == self.world:
            _set_rng_state(rngs[self.rank])
        else:
            self.say(f"note: checkpoint has RNG states of {len(rngs)} rank(s), running "
                     f"{self.world}")  # fmt: skip

    def _set_up_outputs(self) -> None:
        from fastnmf.models import count_parameters

        cfg, out = self.cfg, self.out
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            cfg.save(out / "config.json")
        if self.distributed:
            dist.barrier()
        self.say(f"fastnmf train: config (saved to {out / 'config.json'})\n{cfg.summary()}")
        if cfg.plan:
            self.say(f"memory plan for {cfg.gpu_memory}: {cfg.plan['summary']}")
        self.say(
            f"data: {self.ds.kind} at {self.ds.root}: {len(self.train_cases)} training / "
            f"{len(self.val_cases)} validation cases (fold {cfg.fold} of {cfg.n_folds}); model "
            f"{cfg.model}: {count_parameters(self.raw_model) / 1e6:.3f}M parameters; device "
            f"{self.device}, {self.world} process(es)"
        )
        self.logs = TrainLogs(
            out,
            enabled=self.is_main,
            regions=self.info.regions,
            resume_step=self.step if self.ckpt is not None else None,
        )

    # -- checkpoints

    def state(self, rng: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint of the run now (collective under DDP: it gathers every rank's RNG)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "info": info_to_dict(self.info),
            "step": self.step,
            "model": self.raw_model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": gather(rng, self.world),
            "best": self.best,
            "baseline": self.baseline,
        }

    def checkpoint(self, name: str, rng: dict[str, Any]) -> Path:
        """Write ``out/name`` (rank 0; every rank must call it)."""
        s = self.state(rng)
        path = self.out / name
        if self.is_main:
            save_checkpoint(s, path)
        if self.distributed:
            dist.barrier()
        return path

    # -- the loop

    def run(self, *, progress: bool = True) -> TrainResult:
        """Train from the current step to the end (``stop_at`` or ``steps``); evaluate."""
        from monai.data import DataLoader

        cfg = self.cfg
        if self.baseline is None:
            rng_before = _rng_state()
            self.baseline = self._validate()
            _set_rng_state(rng_before)  # validation draws nothing, but keep the stream exact
            self.logs.val(0, self.baseline)
            self.say(f"step 0 (untrained) validation Dice: {_fmt(self.baseline)}")
        loader = DataLoader(
            self.stream,
            batch_sampler=StepBatches(
                start=self.step, stop=self.end, batch=cfg.batch_size, rank=self.rank,
                world=self.world,
            ),  # fmt: skip
            num_workers=cfg.num_workers,
            persistent_workers=False,
            generator=torch.Generator(),  # keeps the global torch RNG untouched
            pin_memory=self.device.type == "cuda",
        )
        if self.ckpt is not None:  # restored last, so that nothing above can disturb the streams
            self._restore_rng()
        self.model.train()
        bar = Progress(total=cfg.steps, initial=self.step, enabled=progress and self.is_main)
        self._t_log, self._s_log = time.perf_counter(), self.step
        try:
            for batch in loader:
                loss, gnorm = self._step(batch)
                bar.update(loss=loss, lr=self.sched.get_last_lr()[0])
                self._log_step(loss, gnorm)
                if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                    self._validate_and_checkpoint()
            if self.step == self.end and (
                self.step % cfg.val_every != 0 and self.step != cfg.steps
            ):
                self.checkpoint("last.pt", _rng_state())
        finally:
            bar.close()
            self.logs.close()
        from .plan import check_peak

        line = check_peak(self.cfg, self.device, self.out if self.is_main else None)
        if line:
            self.say(line)
        return self._finish()

    def _step(self, batch: dict[str, Any]) -> tuple[float, float]:
        """One optimiser step; ``(loss, gradient norm)``. A non-finite loss (on any rank) saves
        the state before the step as ``last.pt`` and raises :class:`TrainingDiverged`."""
        cfg, device, params = self.cfg, self.device, self.raw_model.parameters
        rng_at_start = _rng_state()
        image = batch["image"].to(device, non_blocking=True)
        if isinstance(image, MetaTensor):  # a plain tensor: torch.compile does not take MONAI's
            image = image.as_tensor()
        label = batch["label"].to(device, non_blocking=True)
        dtype = self.amp_dtype
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = self.model(image)
        loss = self.loss_fn(outputs, label)
        if any_rank(not torch.isfinite(loss).item(), self.world, device):
            path = self.checkpoint("last.pt", rng_at_start)
            raise TrainingDiverged(
                f"non-finite loss ({loss.item()}) at step {self.step + 1}: training stopped; the "
                f"last good state (after step {self.step}) is in {path}"
            )
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        if cfg.grad_clip > 0:
            gnorm = float(nn.utils.clip_grad_norm_(params(), cfg.grad_clip))
        else:
            norms = [p.grad.norm() for p in params() if p.grad is not None]
            gnorm = float(torch.norm(torch.stack(norms)))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.step += 1
        return float(loss.item()), gnorm

    def _log_step(self, loss: float, gnorm: float) -> None:
        if self.step % self.cfg.log_every == 0 or self.step == self.end:
            now = time.perf_counter()
            sps = (self.step - self._s_log) / max(now - self._t_log, 1e-9)
            self._t_log, self._s_log = now, self.step
            self.logs.train(self.step, loss, self.sched.get_last_lr()[0], gnorm, sps)

    def _validate(self) -> dict[str, float]:
        return validate(
            self.raw_model,
            self.va_loader,
            regions=self.info.regions,
            overlap=self.cfg.overlap,
            sw_batch_size=self.cfg.sw_batch_size,
            amp=self.cfg.amp,
            world=self.world,
            loss_fn=self.loss_fn,
        )

    def _validate_and_checkpoint(self) -> None:
        """Validate; write ``best.pt`` if the model is the best so far, and ``last.pt``."""
        step = self.step
        self.last_val = scores = self._validate()
        self.logs.val(step, scores)
        improved = is_better(scores, self.best)
        if improved:
            self.best = {"step": step, "dice": scores["mean"], "loss": scores["loss"],
                         "scores": scores}  # fmt: skip
        self.say(f"step {step} validation Dice: {_fmt(scores)}" + ("  (best)" if improved else ""))
        rng_now = _rng_state()
        if improved:
            self.checkpoint("best.pt", rng_now)
        self.checkpoint("last.pt", rng_now)

    def _finish(self) -> TrainResult:
        """The result; the final inference and evaluation (rank 0) if the run is complete."""
        cfg = self.cfg
        finished = self.step >= cfg.steps
        result = TrainResult(
            out=self.out,
            step=self.step,
            finished=finished,
            baseline=self.baseline,
            best=self.best,
            last_val=self.last_val,
        )
        if finished and cfg.evaluate and self.is_main:
            result.evaluation, result.predictions = _final_evaluation(
                self.out, self.val_cases, self.info, cfg, self.say
            )
        if self.distributed:
            dist.barrier()
        result.seconds = time.perf_counter() - self.start
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
