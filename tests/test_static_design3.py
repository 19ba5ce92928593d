"""Design 3's static properties that take kernels of their own (issue 16): the fused kernels
compiled for sm_90a with one knob of ``_window3_sched.TUNING`` changed at a time against the
coverage suite's tiled BraTS case, and what each knob must save (CTA barrier sites) or keep (no
spill). The coverage suite's own design-3 checks (barrier ceilings, evict-first marks) are in
tests/test_static_kernels.py.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from conftest import PTX_MISSING, needs_ptxas

from fastnmf.profile.static.cases import coverage_cases
from fastnmf.profile.static.kernel_report import kernel_report

TRITON_VERSION = importlib.import_module("fastnmf.kernels._common").TRITON_VERSION


def _brats_design3(**change):
    """The coverage suite's design-3 BraTS case (tiled), with ``change`` applied (skipped without
    ptxas)."""
    if PTX_MISSING:
        pytest.skip("; ".join(PTX_MISSING))
    brats = [c for c in coverage_cases() if c.design == 3 and not c.untiled
             and c.shifts == (None, 2, 4, 6)]  # fmt: skip
    assert len(brats) == 1
    return dataclasses.replace(brats[0], **change)


# The CTA barrier sites that a stage's counts read at once (``_window3_sched.TUNING
# ["count_waits"]``, the default before Triton 3.7) leave out of each fused kernel at least,
# against plane by plane: sm_90a, Triton 3.9, BraTS fp32: forward 66 -> 51, backward 97 -> 89
# (the wait then a function of its own: each of its two instances 4 sites, where each inlined
# wait had 8)
COUNT_WAIT_SITES = {"_fused_kernel": 8, "_fused_bwd_kernel": 8}


@pytest.fixture(scope="module")
def count_wait_report():
    return kernel_report([_brats_design3(count_waits=v) for v in (False, True)],
                         targets=("sm_90a",))  # fmt: skip


# The CTA barrier sites that design 3's waits with counts read in every thread
# (``_window3_sched.TUNING["thread_waits"]``, TWAIT 1) leave out of each fused kernel at least,
# against one thread reading a count and sharing it through shared memory, plane after plane
# (TWAIT 0: 2 barriers a read, two reads a wait); sm_90a, BraTS fp32: forward 66 -> 42, backward
# 97 -> 81 with Triton 3.9 (the forward's six waits and the backward's four, 4 sites each), forward
# 63 -> 39 with Triton 3.6. The baseline is TWAIT 0 whatever the installed Triton's default (2,
# counts read at once, before Triton 3.7: the test compared with that and failed under 3.6).
THREAD_WAIT_SITES = {"_fused_kernel": 24, "_fused_bwd_kernel": 16}


@pytest.fixture(scope="module")
def thread_wait_report():
    return kernel_report([_brats_design3(thread_waits=True)], targets=("sm_90a",))


@needs_ptxas
def test_design3_thread_waits_drop_the_waits_cta_barriers(count_wait_report, thread_wait_report):
    """With the waits' counts read in every thread (an acquire load each, PTX
    ``ld.global.acquire.gpu``) the fused kernels keep no barrier for them; nothing else
    changes (no spill). Under the interpreter the waits take the atomic either way, so what the
    GPU does with them is for a GPU to test (bench/check_design3.py)."""
    rows = {(r["kernel"], r["constexprs"]["TWAIT"]): r
            for rep in (count_wait_report, thread_wait_report) for r in rep["launches"]
            if r["kernel"] in THREAD_WAIT_SITES}  # fmt: skip
    assert set(rows) >= {(k, m) for k in THREAD_WAIT_SITES for m in (0, 1)}, set(rows)
    for name, fewer in THREAD_WAIT_SITES.items():
        plane, waits = rows[(name, 0)], rows[(name, 1)]
        assert waits["barriers"] <= plane["barriers"] - fewer, (
            f"{name}: {plane['barriers']} -> {waits['barriers']} CTA barrier sites")
        assert waits["spill_bytes"] == 0


@needs_ptxas
def test_design3_count_waits_drop_cta_barriers(count_wait_report):
    """A stage's counts read at once (TWAIT 2: one thread a count, one broadcast) keep fewer
    barrier sites than one plane after another (TWAIT 0). Spills: none with Triton 3.6, the GPU
    machine's (bench/results/static_designs_triton36/waits_2026-12-06.md); Triton 3.9's backward
    spills 16 B with it, which is why it is off from 3.7 (kernels/DESIGNS.md)."""
    rows = {(r["kernel"], r["constexprs"]["TWAIT"]): r for r in count_wait_report["launches"]
            if r["kernel"] in COUNT_WAIT_SITES}  # fmt: skip
    assert set(rows) == {(k, m) for k in COUNT_WAIT_SITES for m in (0, 2)}, set(rows)
    for name, fewer in COUNT_WAIT_SITES.items():
        plane, once = rows[(name, 0)], rows[(name, 2)]
        assert once["barriers"] <= plane["barriers"] - fewer, (
            f"{name}: {plane['barriers']} -> {once['barriers']} CTA barrier sites")
        if TRITON_VERSION < (3, 7):
            assert once["spill_bytes"] == 0


@pytest.fixture(scope="module")
def joined_report():
    return kernel_report([_brats_design3(bwd_parts_joined=v) for v in (False, True)],
                         targets=("sm_90a",))  # fmt: skip


@needs_ptxas
def test_design3_bwd_parts_joined_drops_cta_barriers(joined_report):
    """The backward parts tile with every shift in one product (one operand staged, one store
    conversion for all four BraTS shifts, not one of each a shift): at least 20 fewer CTA
    barrier sites in the fused backward (Triton 3.6: 100 -> 76, no spill, its default there;
    3.9 alike in barriers, but it spills, so off by default there)."""
    rows = {r["case"].rsplit("-", 1)[-1]: r for r in joined_report["launches"]
            if r["kernel"] == "_fused_bwd_kernel"}  # fmt: skip
    assert set(rows) == {"joined", "shift"}, set(rows)
    assert rows["joined"]["constexprs"]["PJOIN"] and not rows["shift"]["constexprs"]["PJOIN"]
    assert rows["joined"]["barriers"] <= rows["shift"]["barriers"] - 20, (
        f"{rows['shift']['barriers']} -> {rows['joined']['barriers']} CTA barrier sites")
