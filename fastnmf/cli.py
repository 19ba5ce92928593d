"""The ``fastnmf`` command. ``fastnmf --help`` lists the subcommands.

- ``fastnmf train``: with no arguments, the main job: a small swin Factorizer trained on the demo
  set (fold 0), then inference and evaluation of the validation fold; ``--preset brats|isles``
  with ``--data PATH`` for the paper's settings. Works under ``torchrun`` (DDP).
- ``fastnmf plan``: the batch size, crop and checkpointing whose training step fits a GPU.
- ``fastnmf infer``: sliding-window segmentation → NIfTI (input's affine/header) + overlay PNG.
- ``fastnmf evaluate``: Dice and HD95 per region → per-case CSV and summary.
- ``fastnmf export``: a MONAI bundle of a checkpoint, for ``python -m monai.bundle run``.
- ``fastnmf compare``: paired Wilcoxon signed-rank tests between two runs' per-case CSVs.
- ``fastnmf components``: NMF component maps of one block for one case (NIfTI + PNG).
- ``fastnmf info``: versions, devices, kernels; ``fastnmf bench-layer``: time the NMF layer.
- ``fastnmf profile``: layer and model suites vs attention and CNN baselines → table + plots.

Bad input (missing or corrupt files, wrong channels or labels, bad options: the error types of
:func:`user_errors`) is reported as one line ``fastnmf <command>: error: ...`` with exit status 2,
no traceback; a diverged training run exits with status 3; any other error is a bug and keeps its
traceback. ``fastnmf --debug <command> ...`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from . import _checks as C


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


# ----------------------------------------------------------------------------------------------
# bench-layer / info


def cmd_bench_layer(args: argparse.Namespace) -> int:
    """Run the swin NMF layer over a volume with each kernel and print shapes and times."""
    from . import MatricizedNMF

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    size = (args.batch, args.channels, *(args.size,) * 3)
    x = torch.randn(size, generator=gen).to(device).requires_grad_(True)
    layer = MatricizedNMF(
        head_dim=args.head_dim, window=args.window, shifts="default", iters=args.iters, seed=0
    ).to(device)
    print(f"fastnmf bench-layer: swin NMF layer, input {tuple(x.shape)} on {device}")
    print(f"  head_dim={args.head_dim} window={args.window} shifts={layer.resolved_shifts(3)}")
    print(f"  rank={layer.rank} iters={layer.iters} solver={layer.solver}")
    outputs = {}
    for kernel in args.kernels:
        layer.kernel = kernel

        def step(layer=layer):
            x.grad = None
            y = layer(x)
            y.square().mean().backward()
            return y

        y = step()
        outputs[kernel] = (y.detach(), x.grad.detach().clone())
        seconds = _time(step, args.repeats)
        ms = seconds * 1e3
        print(f"  kernel={kernel:<9} output {tuple(y.shape)}  forward+backward {ms:8.1f} ms")
    names = list(outputs)
    for other in names[1:]:
        dy = (outputs[other][0] - outputs[names[0]][0]).abs().max().item()
        dg = (outputs[other][1] - outputs[names[0]][1]).abs().max().item()
        print(f"  max |{other} - {names[0]}|: output {dy:.2e}, gradient {dg:.2e}")
    return 0


def _cuda_device() -> str:
    """The first CUDA device, with what the kernels' static model assumes of it (SMs, L2: the
    DRAM estimate's capacity, kernels/DESIGNS.md), or "none"."""
    if not torch.cuda.is_available():
        return "none"
    p = torch.cuda.get_device_properties(0)
    l2 = getattr(p, "L2_cache_size", 0)
    return (f"{torch.cuda.get_device_name(0)} (sm_{p.major}{p.minor}, {p.multi_processor_count} "
            f"SMs, L2 {l2 / 2**20:g} MiB, {p.total_memory / 2**30:.0f} GiB)")  # fmt: skip


def cmd_info(_args: argparse.Namespace) -> int:
    """Print versions and the devices and kernels available here."""
    from . import __version__

    print(f"fastnmf {__version__}, python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"CUDA device: {_cuda_device()}")
    print(f"kernels: {', '.join(C.KERNELS)} (auto = triton on CUDA, torch otherwise)")
    return 0


# ----------------------------------------------------------------------------------------------
# train


def _model_opts(items: list[str] | None) -> dict:
    opts = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--model-opt expects KEY=VALUE (VALUE as JSON), got {item!r}")
        key, value = item.split("=", 1)
        try:
            opts[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            opts[key.strip()] = value
    return opts


def _duration(seconds: float) -> str:
    from .logs import duration

    return duration(seconds)


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume); then, by default, infer and evaluate the validation fold."""
    from .config import resolve
    from .train import train

    t0 = time.perf_counter()
    overrides = {
        "model": args.model,
        "data": args.data,
        "kernel": args.kernel,
        "fold": args.fold,
        "n_folds": args.folds,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "crop_size": args.crop_size,
        "amp": args.amp,
        "compile": args.compile,
        "gpu_memory": args.gpu_memory,
        "device": args.device,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup": args.warmup,
        "val_every": args.val_every,
        "val_cases": args.val_cases,
        "seed": args.seed,
        "deterministic": True if args.deterministic else None,
        "num_workers": args.workers,
        "grad_clip": args.grad_clip,
        "crop": args.crop,
        "pos_ratio": args.pos_ratio,
        "evaluate": False if args.no_eval else None,
    }
    if args.model_opt:
        overrides["model_options"] = _model_opts(args.model_opt)
    if args.demo_cases is not None or args.demo_size is not None:
        demo = {"n_cases": 16, "size": 48, "seed": 0}
        demo.update(
            {k: v for k, v in (("n_cases", args.demo_cases), ("size", args.demo_size)) if v}
        )
        overrides["demo"] = demo
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    resume = None
    notes: list[str] = []
    if args.resume is not None:
        from .checkpoints import resume_config, resume_target

        resume, out = resume_target(args.resume, args.out)
        cfg = resume_config(resume, overrides, preset=args.preset)
    else:
        cfg = resolve(args.preset or "demo", notes=notes, **overrides)
        if args.out is not None:
            out = Path(args.out)
        elif distributed:
            raise ValueError("under torchrun, give every process the same --out RUN_DIR")
        else:
            out = Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (out / "last.pt").exists():
            raise ValueError(
                f"{out} already holds a run (last.pt); pass --resume to continue it or choose "
                "another --out"
            )
    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(f"note: {note}")
    result = train(cfg, out=out, resume=resume, stop_at=args.stop_at, progress=not args.no_progress)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return 0
    _print_train_summary(result, cfg, out, wall=time.perf_counter() - t0)
    return 0


def _print_train_summary(result, cfg, out: Path, *, wall: float) -> None:
    """What ``fastnmf train`` prints at the end (rank 0): Dice before and after, the outputs."""
    print(f"\n== fastnmf train: {result.step}/{cfg.steps} steps, wall time {_duration(wall)} ==")
    regions = [k for k in (result.baseline or {}) if k not in ("mean", "loss")]
    region = "WT" if "WT" in regions else (regions[0] if len(regions) == 1 else "mean")
    if result.baseline:
        print(
            f"untrained model (step 0), validation {region} Dice: "
            f"{result.baseline.get(region, float('nan')):.4f}"
        )
    if result.best and result.best.get("scores"):
        scores = result.best["scores"]
        print(
            f"trained model (best, step {result.best['step']}), validation {region} Dice: "
            f"{scores.get(region, float('nan')):.4f}   (all: "
            + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            + ")"
        )
    if result.evaluation:
        e = result.evaluation
        line = ", ".join(
            f"{k} {v['mean']:.4f}" for k, v in e.items() if k.startswith(("dice_", "hd95_"))
        )
        print(f"validation fold, saved predictions scored: {line}")
    if not result.finished:
        print(f"stopped at step {result.step}; continue with: fastnmf train --resume --out {out}")
    print(f"outputs in {out}/:")
    print("  config.json, last.pt, best.pt       resolved config, checkpoints")
    print("  train.csv, val.csv, tb/             logs (tensorboard --logdir " + f"{out / 'tb'})")
    if result.predictions is not None:
        print(
            "  predictions/<id>.nii.gz, <id>.png   segmentations and overlays of the "
            "validation fold"
        )
        print("  predictions/metrics.csv, summary.json  Dice and HD95 per case, summary")


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the batch size, crop and checkpointing whose training step fits ``--gpu-memory``."""
    from .plan import format_size, plan

    p = plan(model=args.model, preset=args.preset, gpu_memory=args.gpu_memory,
             amp=args.amp or "none", max_batch=args.max_batch, crop=args.crop,
             headroom=args.headroom)  # fmt: skip
    from .models import fused

    glue = ("the fused glue ops a GPU runs" if any(fused.ENABLED.values())
            else "the lean branches (FASTNMF_FUSED_GLUE=0)")  # fmt: skip
    print(f"candidates asked (training-step account with {glue}; predictions, not "
          "measurements):")  # fmt: skip
    for t in p.tried:
        what = f"crop {t['crop']}^3, batch {t['batch']}, checkpointing " + (
            "on" if t["checkpoint"] else "off")  # fmt: skip
        peak = t.get("predicted_peak_bytes")
        print(f"  {what}: " + (format_size(peak) if peak is not None else t["error"]))
    print(f"plan: {p.summary()}")
    ckpt = f" --model-opt checkpoint={str(p.checkpoint).lower()}" if args.model.endswith(
        "factorizer") else ""  # fmt: skip
    amp = f" --amp {p.amp}" if p.amp != "none" else ""
    print(f"train with: fastnmf train --preset {p.preset} --model {p.model} --batch-size "
          f"{p.batch} --crop-size {p.crop}{amp}{ckpt}  (or: --gpu-memory {args.gpu_memory}"
          f"{amp})")  # fmt: skip
    return 0


# ----------------------------------------------------------------------------------------------
# infer / evaluate / compare / components


def _checkpoint_config(path: str):
    """``(checkpoint file, its TrainConfig)`` of ``--checkpoint`` (a run folder: its best.pt)."""
    from .checkpoints import checkpoint_path, config_of, load_checkpoint

    ckpt = checkpoint_path(path)
    return ckpt, config_of(load_checkpoint(ckpt))


def cmd_infer(args: argparse.Namespace) -> int:
    """Segment cases with a checkpoint; write NIfTI label maps and overlay PNGs."""
    from .infer import cases_for, infer

    ckpt, cfg = _checkpoint_config(args.checkpoint)
    data = args.data or cfg.data
    cases, _ = cases_for(data, cfg=cfg, fold=args.fold, select=args.cases)
    out = Path(args.out) if args.out else ckpt.parent / "predictions"
    written = infer(
        ckpt,
        cases,
        out,
        device=args.device,
        kernel=args.kernel,
        iters=args.iters,
        skip=args.skip,
        overlap=args.overlap,
        png=not args.no_png,
        progress=True,
    )
    for w in written:
        print(f"{w['id']}: {w['prediction']}" + (f", {w['png']}" if w["png"] is not None else ""))
    print(f"{len(written)} case(s) segmented into {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Dice and HD95 per region of saved predictions against the labels."""
    from .evaluate import evaluate, format_summary
    from .infer import cases_for

    cfg = _checkpoint_config(args.checkpoint)[1] if args.checkpoint else None
    data = args.data or (cfg.data if cfg else "demo")
    cases, info = cases_for(data, cfg=cfg, fold=args.fold, select=args.cases)
    if info is None:
        raise ValueError("--data must be a data set (with labels), not a single image")
    pred = Path(args.pred)
    if not pred.is_dir():
        raise FileNotFoundError(f"{pred}: predictions folder not found")
    rows, summary = evaluate(pred, cases, info, out=args.out, ignore_affine=args.ignore_affine)
    out = Path(args.out) if args.out else pred
    print(f"{len(rows)} case(s); per-case metrics: {out / 'metrics.csv'}")
    print(format_summary(summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a MONAI bundle (configs, weights, docs, licence) of a checkpoint."""
    from .bundle import export_bundle
    from .checkpoints import checkpoint_path

    ckpt = checkpoint_path(args.checkpoint)
    root = export_bundle(ckpt, args.bundle, overwrite=args.overwrite, program=not args.no_program)
    print(f"MONAI bundle of {ckpt} written to {root}/")
    print(
        f"run it: python -m monai.bundle run --config_file {root}/configs/inference.json "
        "--dataset_dir NIFTI_FOLDER --output_dir OUT_FOLDER"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Paired Wilcoxon signed-rank tests between two runs' per-case metrics."""
    from .evaluate import compare, format_comparison, write_csv

    rows = compare(args.a, args.b)
    print(f"A = {args.a}\nB = {args.b}\npaired Wilcoxon signed-rank test (two-sided):")
    print(format_comparison(rows))
    if args.out:
        write_csv(rows, args.out)
        print(f"written {args.out}")
    return 0


def cmd_components(args: argparse.Namespace) -> int:
    """NMF component maps (paper Fig. 6) of one block for one case."""
    from .components import save_components
    from .infer import cases_for

    ckpt, cfg = _checkpoint_config(args.checkpoint)
    cases, _ = cases_for(args.data or cfg.data, cfg=cfg, fold=args.fold, select=args.case)
    out = Path(args.out) if args.out else ckpt.parent / "components"
    files = save_components(
        ckpt, cases[0], out, block=args.block, device=args.device, iters=args.iters
    )
    print(f"{cases[0]['id']}, block {args.block}: {files['nifti']}, {files['png']}")
    return 0


# ----------------------------------------------------------------------------------------------
# profile


def cmd_profile(args: argparse.Namespace) -> int:
    """Run the layer and/or model benchmark suites; write table.md, table.csv and PNG plots."""
    if args.suite == "static":
        return _cmd_profile_static(args)
    from . import profile as P

    device = P.pick_device(args.device)
    threads = args.threads if args.threads is not None else 1 if device.type == "cpu" else None
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    out = Path(args.out) if args.out else Path("runs") / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
    suites = ["layer", "model"] if args.suite == "all" else [args.suite]
    env = P.environment(device)
    print(
        f"fastnmf profile: {' + '.join(suites)} suite on {env['device']} (torch {env['torch']}, "
        f"triton {env['triton']}, commit {(env['commit'] or '?')[:10]})"
    )
    t0 = time.perf_counter()
    rows = []
    for suite in suites:
        opts: dict = {"dtypes": args.dtypes}
        if suite == "layer":
            opts.update(sizes=args.sizes, deep=args.deep, mixers=args.mixers, impls=args.impls)
        else:
            opts.update(
                models=args.models,
                kernels=args.kernels,
                tasks=args.tasks,
                patch=args.patch,
                batch=args.batch,
                checkpoint=args.checkpoint,
                compile=args.compile,
            )
        rows += P.run_suite(
            suite,
            device,
            repeats=args.repeats,
            only=args.only or (),
            progress=None if args.quiet else print,
            **{k: v for k, v in opts.items() if v is not None},
        )
    files = P.write_report(rows, out, env)
    ok = sum(r["status"] == "ok" for r in rows)
    failed = [r for r in rows if r["status"] == "error"]
    took = _duration(time.perf_counter() - t0)
    print(f"{ok} case(s) timed, {len(rows) - ok - len(failed)} unsupported here, in {took}")
    for r in failed:
        print(f"ERROR {r['id']}: {r['reason']}")
    print(f"issue targets: python bench/targets.py {out}/meta.json")
    print(f"written to {out}/: " + ", ".join(f.name for f in files))
    return 1 if failed else 0


def _cmd_profile_static(args: argparse.Namespace) -> int:
    """The static suite (no GPU, no timing): write static.md and static.json."""
    from .profile.static.suite import PARTS, run_static

    targets = [args.target] if args.target else ["sm_90a", "sm_80"]
    out = Path(args.out) if args.out else Path("runs") / f"static-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    doc = run_static(targets=targets, out=out, parts=args.parts or PARTS, quick=args.quick,
                     only=args.only or (), designs=tuple(args.designs),
                     progress=None if args.quiet else print)  # fmt: skip
    spills = sorted({r["kernel"] for r in doc["launches"] if r.get("spill_bytes")})
    print(f"{len(doc['launches'])} launch(es), {len(doc['calls'])} call row(s), "
          f"{len(doc['steps'])} step row(s) in {_duration(time.perf_counter() - t0)}; "
          f"kernels that spill: {', '.join(spills) or 'none'}")  # fmt: skip
    return 0


# ----------------------------------------------------------------------------------------------
# parser and errors


COMMANDS = {
    "train": cmd_train,
    "plan": cmd_plan,
    "infer": cmd_infer,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "compare": cmd_compare,
    "components": cmd_components,
    "info": cmd_info,
    "bench-layer": cmd_bench_layer,
    "profile": cmd_profile,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``fastnmf`` parser (:mod:`fastnmf.cli_parser`, one helper per subcommand)."""
    from .cli_parser import build_parser as build

    return build(COMMANDS)


def user_errors() -> tuple[type[BaseException], ...]:
    """The error types that mean bad input, reported as one line (exit status 2):

    - ``ValueError``: the library's checks of values, files and options (``DataError``,
      ``MissingFileError``, ``CheckpointError`` are ValueErrors);
    - ``OSError``: missing files, unwritable or non-directory output paths, a full disk;
    - ``NotImplementedError``: an option combination a kernel does not support, which the
      kernels check and name (e.g. ``num_grad_steps`` with ``kernel='triton'``).

    Anything else (``TypeError``, ``RuntimeError``, ...) is a bug or an environment problem: its
    traceback is shown. ``fastnmf --debug ...`` shows the traceback of every error.
    """
    return (ValueError, OSError, NotImplementedError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .train import TrainingDiverged

    try:
        return args.func(args)
    except TrainingDiverged as err:
        _traceback(args)
        print(f"fastnmf {args.command}: {err}", file=sys.stderr)
        return 3
    except user_errors() as err:
        _traceback(args)
        print(f"fastnmf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastnmf {args.command}: interrupted", file=sys.stderr)
        return 130


def _traceback(args: argparse.Namespace) -> None:
    if args.debug:
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
