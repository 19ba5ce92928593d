"""tests/fast_interpreter.py: the interpreter skips only the patches that change nothing."""

import fast_interpreter
import pytest
import torch
from kernel_helpers import nmf_inputs, run_grad

pytestmark = pytest.mark.skipif(
    not fast_interpreter.install(), reason="no Triton interpreter internals to speed up"
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled kernels do not interpret")
def test_kernel_results_are_the_upstream_interpreters_bitwise(gen, design3):
    """Design 3's fused forward + backward (helpers calling helpers, and tl.sum, which sees
    triton.language.core): the same y and dx with every nested patch made; the skip is in use."""
    x, v0, dy = nmf_inputs(gen, (1, 4, 8, 8, 8), 4, zero_windows=True)
    kw = dict(head_dim=4, window=4, shifts=[None, 2], solver="hals", iters=2)
    skipped, patched = fast_interpreter.counts()
    fast = run_grad("triton", x, v0, dy, torch.float32, "cpu", **kw)
    now = fast_interpreter.counts()
    assert now[0] - skipped > 100 * (now[1] - patched) > 0  # two launches: a few patches each
    with fast_interpreter.upstream():
        slow = run_grad("triton", x, v0, dy, torch.float32, "cpu", **kw)
    assert fast_interpreter.counts() == now  # upstream: our wrapper not called
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
    assert fast[1].abs().sum() > 0
