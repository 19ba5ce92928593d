"""Registers, spills and occupancy of the fused glue kernels (fastnmf/kernels/_glue.py users),
compiled for a GPU target without one, at the BraTS step's widths (2 x C x 128^3; fp32, fp32
under bf16 autocast, bf16; dropout on): the MLP branch (kernels/mlp_branch.py) at C = 32 and 64
(the stages it takes), the context branch's projections (kernels/proj_glue.py: norm_proj and
proj_residual, Cout = C) at C = 32, 64 and 128, the decoder's skip adapter (kernels/pair_proj.py,
Cs = Cx = Cout = C) at C = 32 and 64.

``python -m fastnmf.profile.static.glue_report [--target sm_90a]`` prints one JSON row per
compiled kernel (it must run without ``TRITON_INTERPRET``: the tests call it in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

__all__ = ["glue_rows", "glue_report", "glue_markdown", "GLUE_CASES"]

_DTYPES = ((torch.float32, None), (torch.float32, torch.bfloat16), (torch.bfloat16, None))
_WIDTHS = {"mlp": (32, 64), "norm_proj": (32, 64, 128), "proj_residual": (32, 64, 128),
           "pair_proj": (32, 64)}  # fmt: skip
# (op, C, width: the MLP's hidden channels or a projection's Cout, input dtype, autocast dtype
# or None); each case launches one forward and one backward kernel (norm_proj two backwards:
# without and with the residual's gradient dres, RES, as the fused context branch runs it)
GLUE_CASES = [(op, c, 2 * c if op == "mlp" else c, dt, amp)
              for op, widths in _WIDTHS.items() for c in widths for dt, amp in _DTYPES]  # fmt: skip


def _act(c: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(2, c, 128, 128, 128, dtype=dtype, device="meta")  # (B, C, *S)


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def _launch_mlp(c, h, dtype, amp):
    from fastnmf.kernels import mlp_branch

    x = _act(c, dtype)
    p = [_meta(*s) for s in [(c,), (c,), (h, c), (h,), (c, h), (c,)]]
    mlp_branch.mlp_forward(x, p[0], p[1], 1e-5, *p[2:], 0.1, 1, dot=amp)
    mlp_branch.mlp_backward(x, x, p[0], p[1], 1e-5, p[2], p[3], p[4], 0.1, 1, dot=amp)


def _launch_norm_proj(c, cout, dtype, amp):
    from fastnmf.kernels import proj_glue

    x, z, one, w = _act(c, dtype), _act(cout, dtype), _meta(c), _meta(cout, c)
    proj_glue.norm_proj_forward(x, one, one, 1e-5, w, dot=amp)
    proj_glue.norm_proj_backward(z, x, one, one, 1e-5, w, dot=amp)
    proj_glue.norm_proj_backward(z, x, one, one, 1e-5, w, dres=x, dot=amp)  # the context branch's


def _launch_proj_residual(c, cout, dtype, amp):
    from fastnmf.kernels import proj_glue

    z, x, w, b = _act(c, dtype), _act(cout, dtype), _meta(cout, c), _meta(cout)
    proj_glue.proj_residual_forward(z, x, w, b, 0.1, 1, dot=amp)
    proj_glue.proj_residual_backward(x, z, w, 0.1, 1, dot=amp)


def _launch_pair_proj(c, cout, dtype, amp):
    from fastnmf.kernels import pair_proj

    s, a, w = _act(c, dtype), _act(cout, dtype), _meta(cout, c)
    pair_proj.pair_proj_forward(s, s, w, w, 0.1, 1, dot=amp)
    pair_proj.pair_proj_backward(a, s, s, w, w, 0.1, 1, dot=amp)


_LAUNCHERS = {"mlp": _launch_mlp, "norm_proj": _launch_norm_proj,
              "proj_residual": _launch_proj_residual, "pair_proj": _launch_pair_proj}  # fmt: skip


def glue_rows(target: str = "sm_90a") -> list[dict]:
    """One row per kernel launch of every case in :data:`GLUE_CASES` the model takes on
    ``target`` (sm_80: the MLP branch at C <= 32 only, ``mlp_branch.supported``)."""
    from fastnmf.kernels import mlp_branch

    from .driver import TARGETS, stub_driver
    from .ptx_tools import occupancy, ptxas_info

    rows = []
    for op, c, width, dtype, amp in GLUE_CASES:
        if op == "mlp" and not mlp_branch.supported(c, width, TARGETS[target][0]):
            continue
        with stub_driver(target) as stub:
            _LAUNCHERS[op](c, width, dtype, amp)
        for launch in stub.launches:
            compiled = launch.compiled
            meta = compiled.metadata
            info = ptxas_info(compiled.asm["ptx"], target, fp_fusion=meta.enable_fp_fusion,
                              ptx_options=meta.ptx_options)  # fmt: skip
            occ = occupancy(regs=info["regs"], warps=launch.num_warps,
                            smem=launch.shared + info["static_smem_bytes"], target=target)
            rows.append({
                "op": op, "kernel": f"{launch.module}.{launch.kernel}", "channels": c,
                "width": width, "dtype": str(dtype).removeprefix("torch."),
                "autocast": None if amp is None else str(amp).removeprefix("torch."),
                "res": bool(launch.constexprs.get("RES", False)),
                "warps": launch.num_warps, "block_v": launch.constexprs["BLOCK_V"],
                "regs": info["regs"],
                "spill_bytes": info["spill_store_bytes"] + info["spill_load_bytes"],
                "resident_warps_per_sm": occ["resident_warps_per_sm"],
            })  # fmt: skip
    return rows


def glue_report(targets=("sm_90a",)) -> list[dict]:
    """:func:`glue_rows` for every target (``target`` added to each row), compiled here, or in a
    subprocess where this process runs Triton's interpreter."""
    from .kernel_report import _compiling_here

    rows = []
    for target in targets:
        if _compiling_here():
            got = glue_rows(target)
        else:
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            cmd = [sys.executable, "-m", "fastnmf.profile.static.glue_report", "--target", target]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"the glue report's compiling process failed "
                                   f"({done.returncode}):\n{done.stderr[-4000:]}")  # fmt: skip
            got = json.loads(done.stdout)
        rows += [{**r, "target": target} for r in got]
    return rows


def glue_markdown(rows: list[dict]) -> list[str]:
    """The rows as a markdown section."""
    lines = ["## Fused glue kernels (fastnmf/kernels/_glue.py users; compiled, not run)", "",
             "At 2 x C x 128^3, dropout on; one row per kernel and variant.", "",
             "| target | kernel | C | width | dtype | autocast | warps | BLOCK_V | registers | "
             "spill B | resident warps / SM |",
             "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["kernel"].removeprefix("fastnmf.kernels.") + (" (dres)" if r.get("res") else "")
        lines.append(f"| {r['target']} | {name} | {r['channels']} | {r['width']} | {r['dtype']} | "
                     f"{r['autocast'] or '-'} | {r['warps']} | {r['block_v']} | {r['regs']} | "
                     f"{r['spill_bytes']} | {r['resident_warps_per_sm']} |")  # fmt: skip
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="fused glue kernels: registers and spills")
    parser.add_argument("--target", default="sm_90a", choices=["sm_90a", "sm_80"])
    args = parser.parse_args(argv)
    print(json.dumps(glue_rows(args.target)))


if __name__ == "__main__":
    main()
