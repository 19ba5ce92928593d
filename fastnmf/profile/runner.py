"""Running one case: the prepared case, its figures and the one case runner."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .timing import copy_bw, device_name, median_ms, peak_bytes


class Unsupported(Exception):
    """A case that cannot run here (backend, dtype or device missing, too big): skip it."""


@dataclasses.dataclass
class Prepared:
    """A case ready to time: ``run()`` does one synchronised repetition; ``info`` holds the
    figures that do not need timing; ``work`` is what one repetition processes (voxels for the
    layers, samples for the models)."""

    run: Callable[[], None]
    info: dict
    work: int
    moved_bytes: int | None = None


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)


def figures(prep: Prepared, ms: float, device: torch.device, peak: int | None) -> dict:
    """The figures of a timed case: median ms, work per second (voxels/s or samples/s), GB/s and
    % of copy bandwidth (NMF core), peak memory, and the case's static figures."""
    out = dict(prep.info, median_ms=ms, per_s=prep.work / (ms * 1e-3), peak_bytes=peak)
    if prep.moved_bytes is not None:
        gbs = prep.moved_bytes / (ms * 1e-3) / 1e9
        out["gb_per_s"] = gbs
        out["copy_bandwidth_gb_per_s"] = copy_bw(device)
        out["pct_copy_bandwidth"] = 100 * gbs / copy_bw(device)
    return out


def row_base(suite: str, case_id: str, dev: torch.device) -> dict:
    """The columns every row starts with."""
    return {"suite": suite, "id": case_id, "device": device_name(dev)}


def case_columns(*, subject: str, impl: str, scope: str, shape: str, size: int, batch: int,
                 dtype: str, task: str, **extra) -> dict:  # fmt: skip
    """The columns that say what a layer or model case is (the report labels and groups rows by
    them), then the suite's ``extra`` ones."""
    return dict(subject=subject, impl=impl, scope=scope, shape=shape, size=size, batch=batch,
                dtype=dtype, task=task, **extra)  # fmt: skip


def run_case(
    row: dict,
    prepare: Callable[[], Prepared],
    dev: torch.device,
    *,
    repeats: int,
    warmup: int = 1,
    absolute_peak: bool = False,
) -> dict:
    """Prepare and time one case (layer or model): ``row`` plus ``status`` ok and the figures,
    or ``status`` unsupported with the ``reason`` (the case cannot run here, or out of memory).

    ``warmup`` counts the preparing call; ``absolute_peak``: peak memory absolute (models), else
    above what was allocated before the call (layers).
    """
    try:
        prep = prepare()
        ms = median_ms(prep.run, dev, repeats=repeats, warmup=max(warmup - 1, 0))
        peak = peak_bytes(prep.run, dev, absolute=absolute_peak)
    except Unsupported as why:
        return row | {"status": "unsupported", "reason": str(why)}
    except RuntimeError as err:
        if not is_oom(err):
            raise
        torch.cuda.empty_cache()
        return row | {"status": "unsupported", "reason": "out of memory"}
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row | {"status": "ok", "reason": ""} | figures(prep, ms, dev, peak)
