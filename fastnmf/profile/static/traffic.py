"""Memory traffic of the NMF layer's kernels without a GPU (issue 14, part 2).

Per launch and per call (forward = the training forward, backward, forward + backward): bytes
loaded and stored, unique bytes, 32-byte sectors, launches, host-to-device copies, and a DRAM
estimate, each also as a ratio to the ideal (forward: read x once, write y once; backward: read
x and dy once, write dx once).

- At the benchmark shape the figures come from the analytic model (:mod:`.traffic_model`);
  the same case at a small shape (``small_side``^d, batch 1, one head) is run under Triton's
  interpreter by the counter (:mod:`.counter`) with the GPU's launch geometry, and the model is
  checked against it launch by launch, tensor by tensor (``model_check``: "equal" or
  "DIFFERS"). Cases the model does not cover (rank > 1) take the counter's figures scaled by the
  ratio of the shapes (``source`` "counter-scaled").
- ``dram_estimate_bytes``: the counted small-shape trace replayed through an LRU model of the
  target's L2 (:mod:`.l2`), capacity and wave scaled by the ratio of the shapes, scaled back.
  An estimate: see :mod:`.l2` for what it leaves out.
- ``volume_sectors``: the sectors of the volume-sized tensors only (x, y, dy, dx): DESIGN.md
  section 6's "sectors / ideal" column counted these.

The counter needs ``TRITON_INTERPRET=1`` before the kernels are imported; in a process without
it (e.g. the suite, which compiles the kernels for sm_90a) the counting runs in a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np

from . import l2
from .cases import PASSES, StaticCase, case_to_json, ideal_bytes, small_case
from .traffic_model import ModelUnsupported, model_launches

__all__ = ["launch_rows", "call_rows", "model_call", "markdown", "counted_case",
           "DEFAULT_RESIDENT", "VOLUME_TENSORS"]  # fmt: skip

KEYS = ("bytes_loaded", "bytes_stored", "unique_bytes", "sectors")
VOLUME_TENSORS = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "dy_ptr/x_ptr")
# Resident programs per SM for the wave order of the DRAM estimate: DESIGN.md section 6's sm_90a
# occupancy of commit 747987a (stats fwd 18 one-warp programs, stats bwd 12; tiled apply with 4^3
# tiles: 40 / 20 resident warps of 4-warp programs); others: 16. The suite passes the kernel
# report's figures instead.
DEFAULT_RESIDENT = {"_stats_fwd_kernel": 18, "_stats_bwd_kernel": 12,
                    "_apply_fwd_tile_kernel": 10, "_apply_bwd_tile_kernel": 5}  # fmt: skip
FALLBACK_RESIDENT = 16
# Persistent kernels (kernels/window_nmf3.py): their reuse distances scale with a plane of the
# volume, not with the launch's programs in flight or the whole shape, so the small-shape replay's
# capacities (:func:`l2.capacities`) do not apply; their DRAM estimate is the block-level model of
# the plane schedule at the case's own shape (:mod:`.pipeline_dram`)
PERSISTENT = ("_fused_kernel", "_fused_bwd_kernel")
# Arguments a persistent kernel reads once per program, before its ticket loop (the forward's g0
# and its shifted copies, the row mask): scaled to the benchmark shape by the programs the target
# launches there, not by the volume (the backward reads them once per ticket: volume-scaled; the
# forward's ticket tile, on by default, reads g0 again once a ticket, from L1: those asked bytes
# are under-counted here, none of them DRAM bytes)
PER_PROGRAM = {"_fused_kernel": ("g0_ptr", "rowmask_ptr")}
# The second design's window passes read them once per program too, before their window loop
# (the count at 16^d takes the benchmark shape's windows a program, ``counted_case``: one program
# there where the benchmark shape launches thousands)
DESIGN2_PASSES = ("_parts_kernel", "_apply_kernel", "_parts_bwd_kernel", "_apply_bwd_kernel2")
PER_PROGRAM.update(dict.fromkeys(DESIGN2_PASSES, ("g0_ptr", "rowmask_ptr")))


def counted_case(case: StaticCase, side: int = 16) -> StaticCase:
    """The case the counter runs for ``case``: ``side``^d, batch 1, one head (C = E); two heads
    for a global matricization (several matrices, as at the benchmark shape); the third
    window design's last axis a ticket's row of windows (:func:`_counted_row`)."""
    if case.mode == "window" and side % case.window:
        raise ValueError(
            f"small_side={side} is not a multiple of the window {case.window} of {case.id}; "
            f"use a multiple of {case.window}"
        )
    heads = 2 if case.mode == "global" and case.channels > case.head_dim else 1
    small = dataclasses.replace(small_case(case, side), channels=heads * case.head_dim)
    if case.mode == "window" and case.design == 3:
        small = dataclasses.replace(small, spatial=(*small.spatial[:-1], _counted_row(case, side)))
    if case.mode == "window" and case.design == 2 and case.rank == 1 and not case.wpp:
        small = dataclasses.replace(small, wpp=_design2_geometry(case).wpp)
    return small


def _design2_geometry(case: StaticCase):
    """The second design's geometry of ``case`` at its own shape (its windows a program, grid)."""
    import torch

    from fastnmf.kernels._window2_common import _Geometry2

    from .cases import selected_design

    x = torch.empty(case.shape, device="meta")
    with selected_design(case):
        return _Geometry2(x, case.head_dim, (case.window,) * len(case.spatial), list(case.shifts))


def _counted_row(case: StaticCase, side: int) -> int:
    """The counted length of the last axis for the third design: a ticket's windows
    (kernels/_window3_sched.wpp) where the case's own rows hold whole tickets, as at the
    benchmark shape; then the merged forward merges 3 of a ticket's 4 windows as there (rows of
    2 windows, 16^3, would hold no whole ticket and merge nothing: ``merge_on``)."""
    from fastnmf.kernels._window3_sched import wpp

    row = case.window * wpp()
    return row if side < row and case.spatial[-1] % row == 0 else side


_COUNTS: dict = {}


def _count(cases: list[StaticCase]) -> list[dict]:
    """counter.count_call for each case (cached), in a subprocess when not interpreting."""
    todo = [c for c in dict.fromkeys(cases) if c not in _COUNTS]
    if todo:
        from .counter import count_call, interpreting, read_counts

        if interpreting():
            for c in todo:
                _COUNTS[c] = count_call(c)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                src, dst = os.path.join(tmp, "cases.json"), os.path.join(tmp, "counts.json")
                with open(src, "w") as f:
                    json.dump([case_to_json(c) for c in todo], f)
                env = dict(os.environ, TRITON_INTERPRET="1")
                subprocess.run([sys.executable, "-m", "fastnmf.profile.static.counter", src, dst],
                               env=env, check=True)  # fmt: skip
                for c, r in zip(todo, read_counts(dst), strict=True):
                    _COUNTS[c] = r
    return [_COUNTS[c] for c in cases]


def _as_model(launch) -> dict:
    return dict(kind=launch.kind, kernel=launch.kernel, grid=launch.grid, args=launch.args)


def _dram(call, ratio: float, target: str, resident: dict) -> list[int]:
    """DRAM bytes per launch of a counted call (at the small shape)."""
    l2_bytes, sms = l2.TARGETS[target]
    sectors, stores, owner, programs, waves = [], [], [], [], []
    for i, launch in enumerate(call.launches):
        wave = resident.get(launch.kernel, FALLBACK_RESIDENT) * sms
        order = l2.interleave(launch.prog, wave)
        sectors.append(launch.sector[order])
        stores.append(launch.store[order])
        owner.append(np.full(order.size, i))
        programs.append(math.prod(launch.grid) if launch.grid else 1)
        waves.append(wave)
    if not sectors:
        return []
    owner = np.concatenate(owner)
    intra, inter = l2.capacities(l2_bytes, programs, waves, ratio)
    read, write = l2.replay(np.concatenate(sectors), np.concatenate(stores), owner,
                            intra_lines=intra, inter_lines=inter)  # fmt: skip
    return np.bincount(owner, weights=read + write, minlength=len(call.launches)).tolist()


def _persistent_dram(case: StaticCase, pass_: str, call, target: str) -> list[int]:
    """DRAM bytes per launch of a call with a persistent kernel, at the case's shape: the
    kernel's from :func:`.pipeline_dram.pipeline_dram`, the other launches' (fills of a few
    bytes) their bytes at the small shape."""
    from .pipeline_dram import pipeline_dram

    out = []
    for launch in call.launches:
        if launch.kernel in PERSISTENT:
            out.append(pipeline_dram(case, pass_, target=target)["dram_bytes"])
        else:
            out.append(launch.total("bytes_loaded") + launch.total("bytes_stored"))
    return out


def _check(model: list[dict], counted: list[dict]) -> str:
    return "equal" if model == counted else "DIFFERS"


def launch_rows(cases, *, target: str = "sm_90a", small_side: int = 16,
                resident: dict | None = None) -> list[dict]:  # fmt: skip
    """One row per launch of each case's forward and backward call (see the module docstring).

    ``resident``: resident programs per SM by kernel name (the kernel report's occupancy), for
    the wave order of the DRAM estimate; kernels not named take :data:`DEFAULT_RESIDENT`, then
    :data:`FALLBACK_RESIDENT`. Rows of the torch ops between launches have kind "torch".
    """
    if target not in l2.TARGETS:
        raise ValueError(f"unknown target {target!r}; valid: {', '.join(l2.TARGETS)}")
    resident = {**DEFAULT_RESIDENT, **(resident or {})}
    cases = list(cases)
    small = [counted_case(c, small_side) for c in cases]
    rows = []
    for case, sc, counts in zip(cases, small, _count(small), strict=True):
        ratio = sc.numel / case.numel
        for pass_ in PASSES:
            if pass_ not in counts:
                continue
            call = counts[pass_]
            counted = [_as_model(launch) for launch in call.launches]
            try:
                launches, source = model_launches(case, pass_), "model"
                check = _check(model_launches(sc, pass_), counted)
            except ModelUnsupported:
                launches = _scaled(counted, 1 / ratio, _programs(case, counted, target))
                source, check = "counter-scaled", "-"
            if len(launches) != len(call.launches):
                raise RuntimeError(f"{case.id} {pass_}: model and counter launch lists differ")
            persistent = any(launch.kernel in PERSISTENT for launch in call.launches)
            dram = _persistent_dram(case, pass_, call, target) if persistent else (
                _dram(call, ratio, target, resident))  # fmt: skip
            for i, (launch, small_launch) in enumerate(zip(launches, counted, strict=True)):
                # scaled back by the launch's own ratio of bytes (a fixed-size op stays put)
                big, small = _bytes(launch), _bytes(small_launch)
                est = dram[i] if persistent else int(round(dram[i] * (big / small if small
                                                                      else 1 / ratio)))
                rows.append(_row(case, pass_, i, launch, est, source, check, call, target))
    return rows


def _bytes(launch: dict) -> int:
    return sum(a["bytes_loaded"] + a["bytes_stored"] for a in launch["args"].values())


def _programs(case: StaticCase, counted: list[dict], target: str) -> dict[str, int]:
    """Programs at the case's own shape on ``target`` of each counted launch with
    :data:`PER_PROGRAM` arguments, by kernel: the persistent launch's, the second design's window
    passes' (empty: the call has none)."""
    kernels = {launch["kernel"] for launch in counted} & set(PER_PROGRAM)
    design2 = kernels & set(DESIGN2_PASSES) if case.mode == "window" and case.rank == 1 else set()
    out = {}
    if design2:  # (global rank > 1 has an _apply_kernel of its own, without these arguments)
        out.update(dict.fromkeys(design2, math.prod(_design2_geometry(case).grid)))
    if kernels - set(DESIGN2_PASSES):
        from .pipeline_dram import persistent_programs

        out.update(dict.fromkeys(kernels - set(DESIGN2_PASSES), persistent_programs(case, target)))
    return out


def _scaled(counted: list[dict], factor: float, programs: dict | None = None) -> list[dict]:
    """The counted launches scaled by ``factor``; the :data:`PER_PROGRAM` arguments of a kernel
    in ``programs`` by its programs there over the programs counted."""
    programs = programs or {}
    out = []
    for launch in counted:
        per_program = PER_PROGRAM.get(launch["kernel"], ()) if launch["kernel"] in programs else ()
        args = {}
        for k, a in launch["args"].items():
            f = (programs[launch["kernel"]] / math.prod(launch["grid"]) if k in per_program
                 else factor)  # fmt: skip
            args[k] = {key: int(round(v * f)) for key, v in a.items()}
        out.append({**launch, "args": args, "grid": None})
    return out


def _row(case, pass_, i, launch, dram, source, check, call, target) -> dict:
    sums = {k: sum(a[k] for a in launch["args"].values()) for k in KEYS}
    vol = sum(a["sectors"] for n, a in launch["args"].items() if n in VOLUME_TENSORS)
    return {
        "case": case.id, "case_id": case.id, "mode": case.mode, "shifts": case.shift_name,
        "dtype": case.dtype, "rank": case.rank, "shape": list(case.shape), "pass": pass_,
        "launch_index": i, "kind": launch["kind"], "kernel": launch["kernel"],
        "grid": launch["grid"], "target": target, **sums, "volume_sectors": vol,
        "dram_estimate_bytes": dram, "ideal_bytes": ideal_bytes(case, pass_), "source": source,
        "model_check": check, "host_device_copies_call": call.host_device_copies,
    }  # fmt: skip


def call_rows(launch_rows: list[dict]) -> list[dict]:
    """Per case and pass ("fwd", "bwd", "fwdbwd"): sums, launches, host_device_copies, ratios.

    ``unique_bytes`` of a call is the sum over its launches of each launch's unique bytes (a
    tensor read by two launches counts twice: once per launch).
    """
    groups: dict = {}
    for r in launch_rows:
        groups.setdefault((r["case"], r["pass"]), []).append(r)
    out = []
    for case in dict.fromkeys(r["case"] for r in launch_rows):
        parts = [p for p in PASSES if (case, p) in groups]
        calls = {p: _sum_call(groups[(case, p)], p) for p in parts}
        out.extend(calls.values())
        if len(parts) == 2:
            both = _sum_call(groups[(case, "fwd")] + groups[(case, "bwd")], "fwdbwd")
            both["ideal_bytes"] = calls["fwd"]["ideal_bytes"] + calls["bwd"]["ideal_bytes"]
            both["host_device_copies"] = sum(c["host_device_copies"] for c in calls.values())
            out.append(_ratios(both))
    return out


def _sum_call(rows: list[dict], pass_: str) -> dict:
    first = rows[0]
    keys = ("case", "case_id", "mode", "shifts", "dtype", "rank", "shape", "target")
    row = {k: first[k] for k in keys}
    row["pass"] = pass_
    for k in (*KEYS, "volume_sectors"):
        row[k] = sum(r[k] for r in rows)
    dram = [r["dram_estimate_bytes"] for r in rows]
    row["dram_estimate_bytes"] = None if None in dram else sum(dram)
    row["launches"] = len(rows)
    row["triton_launches"] = sum(r["kind"] == "triton" for r in rows)
    row["host_device_copies"] = first["host_device_copies_call"]
    row["ideal_bytes"] = first["ideal_bytes"]
    row["source"] = ",".join(sorted({r["source"] for r in rows}))
    row["model_check"] = ",".join(sorted({r["model_check"] for r in rows}))
    return _ratios(row)


def _ratios(row: dict) -> dict:
    ideal = row["ideal_bytes"]
    row["bytes_over_ideal"] = (row["bytes_loaded"] + row["bytes_stored"]) / ideal
    row["unique_over_ideal"] = row["unique_bytes"] / ideal
    row["sector_bytes_over_ideal"] = row["sectors"] * l2.SECTOR / ideal
    row["volume_sector_bytes_over_ideal"] = row["volume_sectors"] * l2.SECTOR / ideal
    dram = row["dram_estimate_bytes"]
    row["dram_over_ideal"] = None if dram is None else dram / ideal
    return row


def model_call(case: StaticCase, pass_: str, target: str = "sm_90a") -> dict:
    """bytes_loaded, bytes_stored, launches (all), triton_launches of one call of ``case``:
    the analytic model, or for cases it does not cover the counter at 16^d scaled (a persistent
    kernel's per-program arguments by the programs it launches on ``target``, as in
    :func:`launch_rows`)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    try:
        launches, source = model_launches(case, pass_, sectors=False), "model"
    except ModelUnsupported:
        sc = counted_case(case)
        (counts,) = _count([sc])
        if pass_ not in counts:
            raise NotImplementedError(f"{case.id}: the Triton path has no {pass_} call") from None
        counted = [_as_model(x) for x in counts[pass_].launches]
        launches = _scaled(counted, case.numel / sc.numel, _programs(case, counted, target))
        source = "counter-scaled"
    loaded = sum(a["bytes_loaded"] for x in launches for a in x["args"].values())
    stored = sum(a["bytes_stored"] for x in launches for a in x["args"].values())
    return dict(bytes_loaded=loaded, bytes_stored=stored, launches=len(launches),
                triton_launches=sum(x["kind"] == "triton" for x in launches), source=source)


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def markdown(call_rows: list[dict]) -> list[str]:
    """A table of the per-call figures (ratios to the ideal) and a note on what they mean."""
    out = [
        "| case | pass | launches (triton) | H2D copies | bytes asked / ideal | unique / ideal "
        "| sectors / ideal (all / volume) | DRAM estimate / ideal | source | model = counter |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in call_rows:
        p = "fwd+bwd" if r["pass"] == "fwdbwd" else r["pass"]
        out.append(
            f"| {r['case']} | {p} | {r['launches']} ({r['triton_launches']}) | "
            f"{r['host_device_copies']} | {_x(r['bytes_over_ideal'])} | "
            f"{_x(r['unique_over_ideal'])} | {_x(r['sector_bytes_over_ideal'])} / "
            f"{_x(r['volume_sector_bytes_over_ideal'])} | {_x(r['dram_over_ideal'])} | "
            f"{r['source']} | {r['model_check']} |"
        )
    out += [
        "",
        "Ideal: forward reads x and writes y once, backward reads x and dy and writes dx once. "
        "Sectors: 32-byte sectors per access, summed (all tensors / the volume-sized ones). "
        "The DRAM column is an estimate, not a measurement: the 16^3 trace replayed in GPU "
        "order, waves of resident programs in lockstep, through a fully associative, sectored "
        "LRU model of the L2 (inside a launch the L2 share of the programs in flight; across "
        "launches the L2 scaled by the shape ratio), cold at the start of each call. It leaves "
        "out set associativity and the real replacement policy, the two L2 partitions, L1 "
        "hits, prefetching, DRAM page effects and what earlier layers left in L2.",
    ]
    return out


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


if __name__ == "__main__":  # python -m fastnmf.profile.static.traffic: the benchmark figures
    from .cases import benchmark_cases

    rows = call_rows(launch_rows(benchmark_cases()))
    print("\n".join(markdown(rows)))
