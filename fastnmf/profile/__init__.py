"""Benchmark cases, runners and the profiling report (``fastnmf profile``, issue 6).

Modules by concern: :mod:`.timing` (timing, memory, bandwidth, environment), :mod:`.competitors`
(the attention mixers and the NMF core as modules), :mod:`.layer_suite` and :mod:`.model_suite`
(the cases and how each is prepared), :mod:`.runner` (one case runner for both), :mod:`.suite`
(a whole suite), :mod:`.report` (table, plots), :mod:`.static` (the no-GPU suite, issue 14).
The issue targets checked on the rows live with the benchmarks (``bench/targets.py``).

One place defines what is measured; both the pytest-benchmark suites (``bench/bench_layers.py``,
``bench/bench_models.py``) and ``fastnmf profile`` take their cases and their code from here.

Layer suite: context mixers at equal input ``(B, C, *S)`` and head dim E (output the same shape).
Two scopes, named in every row:

- ``core``: the context-mixing core alone, no projections. ``nmf-swin`` / ``nmf-local`` /
  ``nmf-global``: ``fastnmf.matricized_nmf`` (ReLU, matricize, rank-one NMF with T = 5,
  dematricize; swin = 8^3 windows averaged over the shifts ``[None, 4]``, local = the same
  windows unshifted, global = one E x prod(S) matrix per head), one row per kernel (triton, torch,
  reference, compiled-reference = ``torch.compile`` of the literal loop). ``sdpa-window``:
  self-attention in the same non-overlapping 8^3 windows (one window configuration: a Swin layer
  shifts every other layer, so the NMF's two shifts do twice its work) with C / E heads of dim E,
  ``q = k = v`` = the windowed heads of x (no projections), through
  ``torch.nn.functional.scaled_dot_product_attention`` under one ``sdpa_kernel`` backend per row
  (flash, efficient, math, cudnn). Sharing q, k and v is a lower bound on what attention keeps
  for backward (with projections q, k, v are three tensors), so the comparison favours attention.
  ``sdpa-global``: the same over all voxels (N = prod(S)), run only where the estimate of its
  memory and work fits (the row says why not otherwise).
- ``layer``: the whole context sub-block with its projections. ``nmf-swin-layer``: fastnmf's
  ``WrappedNMF`` (pointwise W_in, swin NMF, pointwise W_out). ``sdpa-window-layer``: pointwise
  qkv (C -> 3C) and output convs around windowed SDPA. ``monai-window``: MONAI SwinUNETR's
  ``WindowAttention`` (qkv and output linear layers, relative position bias, eager softmax) on the
  same windows. ``favor``: FAVOR+ (Performer; global, linear in N) from
  :class:`fastnmf.models.FavorAttention` with its projections.

Passes: ``fwd`` (no grad) and ``fwdbwd`` (forward, then backward of a random cotangent into the
input and the parameters). Figures: median time (synchronised: CUDA events on a GPU), voxels/s,
peak memory above what was allocated before the call (input, cotangent and weights excluded;
GPU only), memory kept for backward (the distinct storages autograd saves), and for the NMF core
GB/s (input read once and output written once per pass; five tensor passes for fwd+bwd) as % of
the device's copy bandwidth.

Model suite: a training step (forward, deep-supervision BCE loss, backward, AdamW step) at the
model's patch (GPU: 128^3, batch 2) and sliding-window inference (MONAI, 50 % overlap, gaussian
blending) over one 4 x 240 x 240 x 155 volume; CPU: small models at 16^3 - 32^3. Figures: step
time, samples/s (training patches or inferred volumes per second), peak memory (absolute,
``torch.cuda.max_memory_allocated`` after a reset; GPU only), parameters and forward FLOPs at
batch 1 (:func:`fastnmf.models.count_flops`, NMF counted as the literal loop).
"""

from __future__ import annotations

from .competitors import (
    SDPA_BACKENDS,
    MonaiWindowAttention,
    NMFCore,
    WindowSDPA,
    from_windows,
    to_windows,
)
from .layer_suite import (
    CPU_DEEP,
    CPU_SIZES,
    GPU_LAYER_SHAPES,
    MIXERS,
    PASSES,
    LayerCase,
    build_mixer,
    default_impls,
    layer_cases,
    layer_row,
    prepare_layer,
    run_layer_case,
)
from .model_suite import (
    BASELINES,
    FACTORIZERS,
    INFER_VOLUME,
    MODEL_TASKS,
    ModelCase,
    build_model,
    model_cases,
    model_row,
    prepare_model,
    run_model_case,
)
from .report import COLUMNS, write_report
from .runner import Prepared, Unsupported, figures, run_case
from .suite import run_suite
from .timing import (
    DTYPES,
    copy_bandwidth_gbs,
    environment,
    median_ms,
    peak_bytes,
    pick_device,
    saved_bytes,
    sync,
)

__all__ = [
    "SDPA_BACKENDS",
    "MonaiWindowAttention",
    "NMFCore",
    "WindowSDPA",
    "from_windows",
    "to_windows",
    "CPU_DEEP",
    "CPU_SIZES",
    "GPU_LAYER_SHAPES",
    "MIXERS",
    "PASSES",
    "LayerCase",
    "build_mixer",
    "default_impls",
    "layer_cases",
    "layer_row",
    "prepare_layer",
    "run_layer_case",
    "BASELINES",
    "FACTORIZERS",
    "INFER_VOLUME",
    "MODEL_TASKS",
    "ModelCase",
    "build_model",
    "model_cases",
    "model_row",
    "prepare_model",
    "run_model_case",
    "COLUMNS",
    "write_report",
    "Prepared",
    "Unsupported",
    "figures",
    "run_case",
    "run_suite",
    "DTYPES",
    "copy_bandwidth_gbs",
    "environment",
    "median_ms",
    "peak_bytes",
    "pick_device",
    "saved_bytes",
    "sync",
]
