"""Context mixers side by side: the NMF core and layer vs attention (issue 6).

    pytest bench/bench_layers.py --benchmark-only --benchmark-json=layers.json
    pytest bench/bench_layers.py --benchmark-only -k "s128 and fwdbwd and (nmf-swin or window)"

The cases (ids ``<mixer>-<impl>-b<B>-c<C>-s<S>-<dtype>-<pass>``) and the code that builds and
runs them come from :mod:`fastnmf.profile`, which ``fastnmf profile --suite layer`` runs too; its
docstring says exactly what is compared. At equal input (B, C, S^3) and head dim E = 8:
``nmf-swin`` / ``nmf-local`` / ``nmf-global`` (``fastnmf.matricized_nmf`` with each kernel:
triton, torch, reference, compiled-reference), ``sdpa-window`` / ``sdpa-global`` (SDPA in the
same 8^3 windows / over all voxels, each backend: flash, efficient, math, cudnn), and with
projections ``nmf-swin-layer`` (WrappedNMF), ``sdpa-window-layer``, ``monai-window`` (MONAI
SwinUNETR's WindowAttention) and ``favor`` (FAVOR+). GPU: C = 32 at 16^3 - 128^3 and the deeper
stages (64 x 64^3 ... 512 x 8^3), batch 2, fp32 and bf16; CPU: batch 1, C = 32 at 8^3 - 24^3,
fp32. Cases that cannot run here (a backend or dtype missing, global attention too big) skip
with the reason.

extra_info: median ms, voxels/s, peak memory above the input (GPU), memory kept for backward,
GB/s and % of copy bandwidth (NMF core), device, torch/triton versions, commit.
"""

from __future__ import annotations

import pytest
from _util import Suite, bench_case

from fastnmf import profile as P

DEVICE = P.pick_device(None)
CASES = P.layer_cases(DEVICE)
SUITE = Suite(
    prepare=P.prepare_layer, row=P.layer_row, cuda_rounds=10, rate_key="voxels_per_s",
    group=lambda case, row: f"{row['shape']} {case.dtype} {case.pass_}",
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_layer(benchmark, case):
    bench_case(benchmark, case, suite=SUITE, device=DEVICE)
