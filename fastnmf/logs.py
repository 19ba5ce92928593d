"""Training output: CSV / TensorBoard logs and progress lines that keep to their own lines."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["TrainLogs", "Progress", "print_line", "duration"]


class TrainLogs:
    """Rank-0 CSV and TensorBoard logging (TensorBoard only if installed)."""

    def __init__(
        self, out: Path, *, enabled: bool, regions: tuple[str, ...], resume_step: int | None = None
    ) -> None:
        self.enabled = enabled
        self.out = out
        self.regions = regions
        self.tb = None
        if enabled and resume_step is not None:
            self._truncate(resume_step)
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self.tb = SummaryWriter(str(out / "tb"), purge_step=purge)
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.tb = None

    def _truncate(self, step: int) -> None:
        """Drop CSV rows logged after ``step`` by a run that was stopped or killed before its
        next checkpoint: the resumed run logs those steps again."""
        for name in ("train.csv", "val.csv"):
            path = self.out / name
            if not path.is_file():
                continue
            rows = list(csv.reader(path.read_text().splitlines()))
            keep = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
            if len(keep) != len(rows):
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerows(keep)

    def _append(self, name: str, header: list[str], row: list[Any]) -> None:
        path = self.out / name
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(header)
            w.writerow(row)

    def train(self, step: int, loss: float, lr: float, grad_norm: float, sps: float) -> None:
        if not self.enabled:
            return
        self._append(
            "train.csv",
            ["step", "loss", "lr", "grad_norm", "steps_per_s"],
            [step, f"{loss:.6f}", f"{lr:.6g}", f"{grad_norm:.4f}", f"{sps:.3f}"],
        )
        if self.tb is not None:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/grad_norm", grad_norm, step)

    def val(self, step: int, scores: dict[str, float]) -> None:
        if not self.enabled:
            return
        keys = [*self.regions, "mean", *(["loss"] if "loss" in scores else [])]
        self._append("val.csv", ["step", *keys], [step, *(f"{scores[k]:.6f}" for k in keys)])
        if self.tb is not None:
            for k in keys:
                self.tb.add_scalar(f"val/dice_{k}", scores[k], step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def print_line(msg: str, rank: int = 0) -> None:
    """Print a message on lines of its own (rank 0): above a live progress bar, if any."""
    if rank == 0:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def duration(seconds: float) -> str:
    """``'3 min 07 s'`` or ``'42 s'``."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


class Progress:
    """Training progress that never shares a line with a message.

    On a terminal: a tqdm bar on stderr, messages written above it (:func:`print_line`). Anywhere
    else (a pipe, a log file, a notebook's captured output), where a bar's carriage returns glue
    it to the next message: whole lines ``train: step 40/300 (13 %), loss ..., ETA ...`` on
    stdout, at most one every ``every_s`` seconds, and one at the end.
    """

    def __init__(
        self, *, total: int, initial: int, enabled: bool, tty: bool | None = None,
        every_s: float = 10.0,
    ) -> None:  # fmt: skip
        self.total, self.step, self.enabled = total, initial, enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.every_s = every_s
        self.t0 = self.t_line = time.perf_counter()
        self.s0 = initial
        self.postfix = ""
        self.bar = None
        if enabled and self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                            mininterval=0.5, unit="step")  # fmt: skip

    def update(self, *, loss: float, lr: float) -> None:
        self.step += 1
        self.postfix = f"loss {loss:.4f}, lr {lr:.2e}"
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if self.enabled and (now - self.t_line >= self.every_s or self.step == self.total):
            self.t_line = now
            print_line(self.line(now))

    def line(self, now: float) -> str:
        rate = (self.step - self.s0) / max(now - self.t0, 1e-9)
        eta = (self.total - self.step) / rate if rate > 0 else float("nan")
        pct = 100 * self.step / max(self.total, 1)
        return (
            f"train: step {self.step}/{self.total} ({pct:.0f} %), {self.postfix}, "
            f"{rate:.2f} steps/s, ETA {duration(eta) if eta == eta else '?'}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
