"""The body of test_compile_options.test_kernels_compile_with_fp_fusion_where_the_default_is_off,
run as a script in a compiling subprocess (Triton's interpreter off) with
TRITON_DEFAULT_FP_FUSION=0, Triton 3.10's announced default: the layer's kernels, compiled for
sm_90a through the static suite's stub driver, must still be compiled with FMA contraction, the
option they were written, tested and counted with. Prints one line a compiled kernel: its name,
the option, and whether its PTX holds a fused multiply-add."""

from __future__ import annotations

import os

import torch


def main() -> None:
    import fastnmf
    from fastnmf.profile.static.capture import persistent_grid
    from fastnmf.profile.static.driver import stub_driver

    assert os.environ.get("TRITON_DEFAULT_FP_FUSION") == "0"
    with stub_driver("sm_90a") as stub, persistent_grid("sm_90a"):
        # the global path, then each window design's default shifts (3: [None, 2, 4, 6],
        # 2: [None, 4], 1: local windows)
        for shifts in ("global", [None, 2, 4, 6], [None, 4], None):
            x = torch.empty(1, 16, 16, 16, 16, device="meta", requires_grad=True)
            cols = 16**3 if shifts == "global" else 8**3
            v0 = torch.empty(cols, 1, device="meta")
            kw = dict(head_dim=8, iters=2, kernel="triton", check=False)
            if shifts != "global":
                kw.update(window=8, shifts=shifts)
            y = fastnmf.matricized_nmf(x, v0, **kw)
            y.backward(torch.empty_like(y))
    for launch in stub.launches:
        ptx = launch.compiled.asm["ptx"]
        print("KERNEL", launch.kernel, launch.compiled.metadata.enable_fp_fusion, "fma.rn" in ptx)


if __name__ == "__main__":
    main()
