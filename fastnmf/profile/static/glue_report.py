"""Registers, spills and occupancy of the fused glue kernels (fastnmf/kernels/_glue.py users),
compiled for a GPU target without one, at the BraTS step's widths (2 x C x 128^3; C = 32 and 64,
the stages the fused MLP branch takes; fp32, fp32 under bf16 autocast, bf16; dropout on).

``python -m fastnmf.profile.static.glue_report [--target sm_90a]`` prints one JSON row per
compiled kernel (it must run without ``TRITON_INTERPRET``: the tests call it in a subprocess).
"""

from __future__ import annotations

import argparse
import json

import torch

__all__ = ["glue_rows", "GLUE_CASES"]

# (C, hidden, input dtype, autocast dtype or None)
GLUE_CASES = [(c, 2 * c, dt, amp) for c in (32, 64)
              for dt, amp in ((torch.float32, None), (torch.float32, torch.bfloat16),
                              (torch.bfloat16, None))]  # fmt: skip


def _launch_mlp(c, h, dtype, amp):
    from fastnmf.kernels import mlp_branch

    x = torch.empty(2, c, 128, 128, 128, dtype=dtype, device="meta")
    p = [torch.empty(s, device="meta") for s in [(c,), (c,), (h, c), (h,), (c, h), (c,)]]
    mlp_branch.mlp_forward(x, p[0], p[1], 1e-5, *p[2:], 0.1, 1, dot=amp)
    mlp_branch.mlp_backward(x, x, p[0], p[1], 1e-5, p[2], p[3], p[4], 0.1, 1, dot=amp)


def glue_rows(target: str = "sm_90a") -> list[dict]:
    """One row per kernel launch of every case in :data:`GLUE_CASES`."""
    from .driver import stub_driver
    from .ptx_tools import occupancy, ptxas_info

    rows = []
    for c, h, dtype, amp in GLUE_CASES:
        with stub_driver(target) as stub:
            _launch_mlp(c, h, dtype, amp)
        for launch in stub.launches:
            compiled = launch.compiled
            meta = compiled.metadata
            info = ptxas_info(compiled.asm["ptx"], target, fp_fusion=meta.enable_fp_fusion,
                              ptx_options=meta.ptx_options)  # fmt: skip
            occ = occupancy(regs=info["regs"], warps=launch.num_warps,
                            smem=launch.shared + info["static_smem_bytes"], target=target)
            rows.append({
                "kernel": f"{launch.module}.{launch.kernel}", "channels": c, "hidden": h,
                "dtype": str(dtype).removeprefix("torch."),
                "autocast": None if amp is None else str(amp).removeprefix("torch."),
                "warps": launch.num_warps, "block_v": launch.constexprs["BLOCK_V"],
                "regs": info["regs"],
                "spill_bytes": info["spill_store_bytes"] + info["spill_load_bytes"],
                "resident_warps_per_sm": occ["resident_warps_per_sm"],
            })  # fmt: skip
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="fused glue kernels: registers and spills")
    parser.add_argument("--target", default="sm_90a", choices=["sm_90a", "sm_80"])
    args = parser.parse_args(argv)
    print(json.dumps(glue_rows(args.target)))


if __name__ == "__main__":
    main()
