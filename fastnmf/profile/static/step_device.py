"""The H200 figures the training-step account predicts against (issue 14, part 3).

- Copy bandwidth: the H200's *measured* device copy bandwidth (a large clone, read + write bytes
  per second), read from ``bench/results/nmf_h200.json`` (every layer row records the figure its
  session measured; the median of the distinct values is used).
- Peak FLOP rates: NVIDIA's H200 SXM datasheet, dense (the datasheet's tensor-core figures are
  "with sparsity": halved here). Which peak an op gets follows PyTorch's defaults on CUDA:
  convolutions in fp32 run on TF32 tensor cores (``torch.backends.cudnn.allow_tf32`` is True by
  default), fp32 matrix products do not (``torch.backends.cuda.matmul.allow_tf32`` is False by
  default: FP32 CUDA cores), bf16 / fp16 products use the BF16/FP16 tensor cores, everything else
  (elementwise, norms, reductions) the FP32 CUDA cores.
- Measured training steps: ``bench/results/model_h200/meta.json`` (``fastnmf profile --suite model
  --tasks train --dtypes fp32``): step time and absolute peak memory per model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
from pathlib import Path

import torch

__all__ = ["DeviceFigures", "h200", "measured_steps", "RESULTS"]

RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results"
NMF_RESULTS = RESULTS / "nmf_h200.json"
MODEL_RESULTS = RESULTS / "model_h200" / "meta.json"

# NVIDIA H200 SXM datasheet (TFLOPS); tensor-core entries are quoted with 2:4 sparsity.
_H200_DATASHEET_TFLOPS = {"fp32": 67.0, "tf32_sparse": 989.0, "bf16_sparse": 1979.0}


@dataclasses.dataclass(frozen=True)
class DeviceFigures:
    """A device's copy bandwidth (bytes/s, read + write) and peak FLOP rates (FLOP/s)."""

    name: str
    copy_bytes_per_s: float
    copy_source: str
    simt_flops: float  # FP32 CUDA cores
    tf32_flops: float  # TF32 tensor cores, dense
    half_flops: float  # BF16 / FP16 tensor cores, dense

    def peak_flops(self, kind: str, dtype: torch.dtype | None) -> float:
        """FLOP/s of an op: ``kind`` "conv" / "matmul" (tensor-core capable) or "simt"."""
        if kind not in ("conv", "matmul", "simt"):
            raise ValueError(f"kind must be 'conv', 'matmul' or 'simt', got {kind!r}")
        if kind == "simt":
            return self.simt_flops
        if dtype in (torch.bfloat16, torch.float16):
            return self.half_flops
        return self.tf32_flops if kind == "conv" else self.simt_flops

    def op_seconds(self, nbytes: int, flops: int, kind: str, dtype: torch.dtype | None) -> float:
        """Roofline lower bound of one op: max(bytes / copy bandwidth, FLOPs / peak)."""
        return max(nbytes / self.copy_bytes_per_s, flops / self.peak_flops(kind, dtype))

    def describe(self) -> str:
        return (
            f"{self.name}: copy bandwidth {self.copy_bytes_per_s / 1e9:.1f} GB/s "
            f"({self.copy_source}); peaks FP32 {self.simt_flops / 1e12:.1f}, TF32 "
            f"{self.tf32_flops / 1e12:.1f}, BF16 {self.half_flops / 1e12:.1f} TFLOP/s (datasheet, "
            "dense)"
        )


def _load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the step account needs the H200 measurements committed in "
            "bench/results/ (run it from a checkout of the repository)"
        )
    return json.loads(path.read_text())


@functools.cache
def h200() -> DeviceFigures:
    """The H200: measured copy bandwidth (bench/results/nmf_h200.json) + datasheet peaks."""
    rows = _load(NMF_RESULTS)["rows"]
    values = sorted(
        {r["copy_bandwidth_gb_per_s"] for r in rows if r.get("copy_bandwidth_gb_per_s")}
    )
    if not values:
        raise ValueError(f"{NMF_RESULTS} holds no copy_bandwidth_gb_per_s figure")
    gbs = statistics.median(values)
    src = f"median of {len(values)} session measurements {values} GB/s in {NMF_RESULTS.name}"
    t = _H200_DATASHEET_TFLOPS
    return DeviceFigures(
        name="NVIDIA H200",
        copy_bytes_per_s=gbs * 1e9,
        copy_source=src,
        simt_flops=t["fp32"] * 1e12,
        tf32_flops=t["tf32_sparse"] / 2 * 1e12,
        half_flops=t["bf16_sparse"] / 2 * 1e12,
    )


@functools.cache
def measured_steps() -> dict[tuple[str, str, bool, int, int], dict]:
    """(model, dtype, checkpoint, size, batch) -> {"ms", "peak_bytes", "impl"} of the H200's
    training steps (Factorizers: the Triton kernel's row, the one the account models)."""
    out = {}
    for r in _load(MODEL_RESULTS)["rows"]:
        if (
            r.get("task") != "train"
            or r.get("status") != "ok"
            or r.get("impl") not in ("triton", "-")
        ):
            continue
        key = (r["subject"], r["dtype"], bool(r.get("checkpoint", False)), r["size"], r["batch"])
        out[key] = {"ms": r["median_ms"], "peak_bytes": r["peak_bytes"], "impl": r["impl"]}
    return out
