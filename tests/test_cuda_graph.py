"""The NMF layer's Triton path inside a CUDA graph (GPU only; the `winop` phase of
bench/gpu_session.sh runs it): nothing of a call reads device values on the host or copies host
data to the device (the shift tables are compile-time constants), so forward and backward can be
captured once and replayed, and a replay on new input equals an eager call on it bit for bit.

Without a GPU these tests skip; what they rely on is checked on the CPU by the static counter
(no host->device copy per call in any path: tests/test_static_traffic.py)."""

import pytest
import torch
from fastnmf.kernels import design_for

import fastnmf

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (window, shifts, rank, rank-one window design): each Triton path of the layer, the window
# designs those the layer picks at 64^3 (kernels.design_for; asserted below)
PATHS = {
    "local-d1": (8, [None], 1, 1),
    "swin-d2": (8, [None, 4], 1, 2),
    "brats-d3": (8, [None, 2, 4, 6], 1, 3),
    "global": (None, None, 1, None),
    "window-rank2": (8, [None, 4], 2, None),
}


def _layer(x, v0, dy, window, shifts):
    """(y, dx) of one layer call, as training runs it."""
    y = fastnmf.matricized_nmf(x, v0, head_dim=8, window=window, shifts=shifts, kernel="triton",
                               check=False)  # fmt: skip
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx


@needs_cuda
@pytest.mark.parametrize("path", list(PATHS))
def test_layer_replays_in_a_cuda_graph_as_eager(path):
    window, shifts, rank, design = PATHS[path]
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 16, 64, 64, 64)
    x = torch.randn(shape, device="cuda", generator=g).requires_grad_()
    if design is not None:
        patch, rolls = (window,) * 3, [None if s is None else (s,) * 3 for s in shifts]
        assert design_for(x, 8, patch, rolls) == design
    dy = torch.randn(shape, device="cuda", generator=g)
    n = 8**3 if window else 64**3
    v0 = torch.rand(n, rank, device="cuda", generator=g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: compiles the kernels
        _layer(x, v0, dy, window, shifts)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, dx = _layer(x, v0, dy, window, shifts)
    with torch.no_grad():
        x.copy_(torch.randn(shape, device="cuda", generator=g))
        dy.copy_(torch.randn(shape, device="cuda", generator=g))
    graph.replay()
    torch.cuda.synchronize()
    y_eager, dx_eager = _layer(x, v0, dy, window, shifts)
    assert torch.equal(y, y_eager) and torch.equal(dx, dx_eager)
