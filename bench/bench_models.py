"""Whole models: a training step and sliding-window inference (issue 6).

    pytest bench/bench_models.py --benchmark-only --benchmark-json=models.json
    pytest bench/bench_models.py --benchmark-only -k "swin_factorizer and train"

The cases (ids ``<model>-<kernel>-<task>-<shape>-<dtype>``) and the code come from
:mod:`fastnmf.profile`, which ``fastnmf profile --suite model`` runs too. Models: swin / local /
global Factorizer with each kernel (triton, torch, reference), nnunet, resunet, performer, unetr,
swin_unetr, segresnet (brats preset: 4 -> 3 channels). ``train``: forward, deep-supervision BCE,
backward, AdamW step at the patch (GPU: 128^3, batch 2; fp32 and bf16 autocast). ``infer``:
MONAI sliding-window inference (windows of the patch, 50 % overlap, gaussian blending) over one
4 x 240 x 240 x 155 volume. On the CPU small versions of the models at 16^3 - 32^3, batch 1,
inference over 24 x 24 x 16 (SwinUNETR, 64^3 at the least, skips there).

extra_info: step time (median ms), samples/s (training patches or volumes per second), peak
memory (absolute, GPU), parameters, forward GFLOPs at batch 1, device, versions, commit.
"""

from __future__ import annotations

import pytest
from _util import Suite, bench_case

from fastnmf import profile as P

DEVICE = P.pick_device(None)
CASES = P.model_cases(DEVICE)
SUITE = Suite(
    prepare=P.prepare_model, row=P.model_row, cuda_rounds=5, rate_key="samples_per_s",
    group=lambda case, row: f"{case.task} {row['shape']} {case.dtype}", absolute_peak=True,
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_model(benchmark, case):
    figures = bench_case(benchmark, case, suite=SUITE, device=DEVICE)
    assert figures["params"] > 0
