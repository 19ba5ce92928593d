"""The ``fastnmf`` command. ``fastnmf --help`` lists the subcommands.

- ``fastnmf train``: with no arguments, the main job: a small swin Factorizer trained on the demo
  set (fold 0), then inference and evaluation of the validation fold; ``--preset brats|isles``
  with ``--data PATH`` for the paper's settings. Works under ``torchrun`` (DDP).
- ``fastnmf infer``: sliding-window segmentation → NIfTI (input's affine/header) + overlay PNG.
- ``fastnmf evaluate``: Dice and HD95 per region → per-case CSV and summary.
- ``fastnmf export``: a MONAI bundle of a checkpoint, for ``python -m monai.bundle run``.
- ``fastnmf compare``: paired Wilcoxon signed-rank tests between two runs' per-case CSVs.
- ``fastnmf components``: NMF component maps of one block for one case (NIfTI + PNG).
- ``fastnmf info``: versions, devices, kernels; ``fastnmf bench-layer``: time the NMF layer.
- ``fastnmf profile``: layer and model suites vs attention and CNN baselines → table + plots.

Bad input (missing or corrupt files, wrong channels or labels, bad options) is reported as one
line ``fastnmf <command>: error: ...`` with exit status 2, no traceback; a diverged training run
exits with status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
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
        head_dim=args.head_dim, patch_size=args.window, shifts="default", iters=args.iters, seed=0
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


def cmd_info(_args: argparse.Namespace) -> int:
    """Print versions and the devices and kernels available here."""
    from . import __version__

    print(f"fastnmf {__version__}, python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}")
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
    from .config import TrainConfig, resolve
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
        "patch": args.patch,
        "amp": args.amp,
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
        if args.resume == "last":
            if args.out is None:
                raise ValueError("--resume without a checkpoint needs --out RUN_DIR")
            resume = Path(args.out) / "last.pt"
        else:
            resume = Path(args.resume)
            if resume.is_dir():
                resume = resume / "last.pt"
        out = Path(args.out) if args.out else resume.parent
        from .infer import load_checkpoint

        cfg = TrainConfig.from_dict(load_checkpoint(resume)["config"])
        given = {k: v for k, v in overrides.items() if v is not None}
        if args.preset is not None and args.preset != cfg.preset:
            given["preset"] = args.preset
        if "model_options" in given:
            given["model_options"] = {**cfg.model_options, **given["model_options"]}
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **given})
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
    wall = time.perf_counter() - t0
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
    return 0


# ----------------------------------------------------------------------------------------------
# infer / evaluate / compare / components


def _checkpoint_path(path: str) -> Path:
    p = Path(path)
    return p / "best.pt" if p.is_dir() else p


def cmd_infer(args: argparse.Namespace) -> int:
    """Segment cases with a checkpoint; write NIfTI label maps and overlay PNGs."""
    from .config import TrainConfig
    from .infer import cases_for, infer, load_checkpoint

    ckpt = _checkpoint_path(args.checkpoint)
    cfg = TrainConfig.from_dict(load_checkpoint(ckpt)["config"])
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
        print(f"{w['id']}: {w['prediction']}" + (f", {w['png']}" if w["png"] != "None" else ""))
    print(f"{len(written)} case(s) segmented into {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Dice and HD95 per region of saved predictions against the labels."""
    from .config import TrainConfig
    from .evaluate import evaluate, format_summary
    from .infer import cases_for, load_checkpoint

    cfg = None
    if args.checkpoint:
        cfg = TrainConfig.from_dict(load_checkpoint(_checkpoint_path(args.checkpoint))["config"])
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

    ckpt = _checkpoint_path(args.checkpoint)
    root = export_bundle(ckpt, args.bundle, overwrite=args.overwrite)
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
    from .config import TrainConfig
    from .infer import cases_for, load_checkpoint

    ckpt = _checkpoint_path(args.checkpoint)
    cfg = TrainConfig.from_dict(load_checkpoint(ckpt)["config"])
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
                     only=args.only or (), progress=None if args.quiet else print)  # fmt: skip
    spills = sorted({r["kernel"] for r in doc["launches"] if r.get("spill_bytes")})
    print(f"{len(doc['launches'])} launch(es), {len(doc['calls'])} call row(s), "
          f"{len(doc['steps'])} step row(s) in {_duration(time.perf_counter() - t0)}; "
          f"kernels that spill: {', '.join(spills) or 'none'}")  # fmt: skip
    return 0


# ----------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    from .config import AMP_MODES, CROPS, PRESETS

    parser = argparse.ArgumentParser(
        prog="fastnmf", description="Factorizer segmentation with fused NMF kernels."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tr = sub.add_parser(
        "train",
        help="train a model (no arguments: the demo main job: train, infer, evaluate)",
        description="Train a segmentation model. With no arguments: the main job (preset "
        "'demo': a small swin Factorizer on the built-in demo data, fold 0, then inference and "
        "evaluation of the validation fold). Unset options come from the preset.",
    )
    tr.add_argument("--preset", choices=sorted(PRESETS), help="config preset (default demo)")
    tr.add_argument("--model", help="model name (fastnmf.models.available())")
    tr.add_argument("--data", help="'demo', a data-set folder or a JSON datalist")
    tr.add_argument("--kernel", choices=C.KERNELS, help="NMF kernel (default auto)")
    tr.add_argument("--fold", type=int, help="cross-validation fold 0..4 (default 0)")
    tr.add_argument("--folds", type=int, help="number of cross-validation folds (default 5)")
    tr.add_argument("--steps", type=int, help="total training steps")
    tr.add_argument("--batch-size", type=int, help="patches per step and process")
    tr.add_argument("--patch", type=int, help="cubic training patch edge (model spatial size)")
    tr.add_argument("--amp", choices=AMP_MODES, help="mixed precision (default none)")
    tr.add_argument("--out", help="run folder (default runs/<preset>-<time>)")
    tr.add_argument(
        "--resume",
        nargs="?",
        const="last",
        metavar="CKPT",
        help="continue a run: its last.pt (in --out) or the checkpoint/run folder given",
    )
    tr.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    tr.add_argument("--lr", type=float)
    tr.add_argument("--weight-decay", type=float)
    tr.add_argument("--warmup", type=int, help="linear warm-up steps")
    tr.add_argument("--val-every", type=int, help="validate and checkpoint every N steps")
    tr.add_argument("--val-cases", type=int, help="validate on at most N cases (0: all)")
    tr.add_argument("--grad-clip", type=float, help="max gradient norm (0: off)")
    tr.add_argument(
        "--crop",
        choices=CROPS,
        help="patch sampling: random (uniform; demo default) or posneg (a --pos-ratio share "
        "centred on lesion voxels; default for other data)",
    )
    tr.add_argument(
        "--pos-ratio",
        type=float,
        help="posneg: share of patches centred on foreground (default 1/3, as nnU-Net)",
    )
    tr.add_argument("--seed", type=int, help="run seed (default 0)")
    tr.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms (torch, cuDNN, cuBLAS): bitwise-repeatable runs",
    )
    tr.add_argument("--workers", type=int, help="DataLoader workers")
    tr.add_argument(
        "--model-opt",
        action="append",
        metavar="KEY=VALUE",
        help="model builder option, VALUE as JSON (e.g. widths=[8,16,32,64]); repeatable",
    )
    tr.add_argument("--demo-cases", type=int, help="number of demo cases (default 16)")
    tr.add_argument("--demo-size", type=int, help="demo volume edge (default 48)")
    tr.add_argument("--stop-at", type=int, help="stop after this step (resume later)")
    tr.add_argument("--no-eval", action="store_true", help="skip the final infer + evaluate")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    inf = sub.add_parser("infer", help="segment volumes: NIfTI label maps + overlay PNGs")
    inf.add_argument("--checkpoint", required=True, help="checkpoint or run folder (best.pt)")
    inf.add_argument("--data", help="data set, 'demo' or one NIfTI image (default: training's)")
    inf.add_argument("--cases", default="val", help="val (default) | all | ID,ID,...")
    inf.add_argument("--fold", type=int, help="fold for --cases val (default: training's)")
    inf.add_argument("--out", help="output folder (default <run>/predictions)")
    inf.add_argument("--device", default="auto")
    inf.add_argument("--kernel", choices=C.KERNELS, help="NMF kernel at inference")
    inf.add_argument("--iters", type=int, help="NMF iterations T at inference")
    inf.add_argument(
        "--skip", type=int, nargs="+", metavar="BLOCK", help="short-circuit these NMF blocks"
    )
    inf.add_argument("--overlap", type=float, default=0.5)
    inf.add_argument("--no-png", action="store_true")
    inf.set_defaults(func=cmd_infer)

    ev = sub.add_parser("evaluate", help="Dice and HD95 per region: per-case CSV and summary")
    ev.add_argument("--pred", required=True, help="folder of <id>.nii.gz predictions")
    ev.add_argument("--data", help="data set with labels (default: the checkpoint's, or demo)")
    ev.add_argument("--checkpoint", help="take data and fold from this checkpoint / run folder")
    ev.add_argument("--cases", default="val", help="val (default) | all | ID,ID,...")
    ev.add_argument("--fold", type=int)
    ev.add_argument("--out", help="where metrics.csv and summary.json go (default --pred)")
    ev.add_argument(
        "--ignore-affine",
        action="store_true",
        help="score predictions whose affine differs from the label's (same shape needed)",
    )
    ev.set_defaults(func=cmd_evaluate)

    exp = sub.add_parser(
        "export",
        help="export a checkpoint as a MONAI bundle (python -m monai.bundle run ...)",
        description="Write a MONAI bundle: configs/metadata.json, configs/inference.json, "
        "models/model.pt, docs/README.md, LICENSE. Its network is built by fastnmf, so running it "
        "needs fastnmf installed. (An exported program, .pt2, is not written yet.)",
    )
    exp.add_argument("--checkpoint", required=True, help="checkpoint or run folder (best.pt)")
    exp.add_argument("--bundle", required=True, help="bundle folder to write (new or empty)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    exp.set_defaults(func=cmd_export)

    cmp = sub.add_parser("compare", help="paired Wilcoxon tests between two runs' metrics")
    cmp.add_argument("a", help="metrics.csv (or its folder) of run A")
    cmp.add_argument("b", help="metrics.csv (or its folder) of run B")
    cmp.add_argument("--out", help="write the table as CSV")
    cmp.set_defaults(func=cmd_compare)

    co = sub.add_parser("components", help="NMF component maps of a block for one case")
    co.add_argument("--checkpoint", required=True, help="checkpoint or run folder (best.pt)")
    co.add_argument("--block", type=int, required=True, help="NMF block index (0 = first)")
    co.add_argument("--data", help="data set, 'demo' or one NIfTI image (default: training's)")
    co.add_argument("--case", default="val", help="case id (default: first validation case)")
    co.add_argument("--fold", type=int)
    co.add_argument("--iters", type=int, help="NMF iterations T")
    co.add_argument("--out", help="output folder (default <run>/components)")
    co.add_argument("--device", default="auto")
    co.set_defaults(func=cmd_components)

    info = sub.add_parser("info", help="print versions, devices and kernels")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser(
        "bench-layer",
        aliases=["demo"],  # the name the README used before the training pipeline
        help="run the swin NMF layer over a volume and time it",
    )
    bench.add_argument("--size", type=int, default=32, help="cubic volume side (default 32)")
    bench.add_argument("--channels", type=int, default=32)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--head-dim", type=int, default=8)
    bench.add_argument("--window", type=int, default=8)
    bench.add_argument("--iters", type=int, default=5)
    bench.add_argument("--kernels", nargs="+", default=["torch", "reference"], choices=C.KERNELS)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--seed", type=int, default=0)
    bench.set_defaults(func=cmd_bench_layer)

    pr = sub.add_parser(
        "profile",
        help="NMF layer and Factorizers vs attention and CNN baselines: table + plots",
        description="Run the layer suite (context mixers: NMF vs windowed/global SDPA, MONAI "
        "window attention, FAVOR+) and/or the model suite (training step, sliding-window "
        "inference) and write table.md, table.csv, meta.json and PNG plots. On a GPU the "
        "issue's shapes (128^3 batch 2, fp32 and bf16); on a CPU tiny shapes (seconds).",
    )
    pr.add_argument(
        "--suite",
        choices=["layer", "model", "all", "static"],
        default="all",
        help="all = layer + model (timed). static (not part of all: no GPU, no timing) compiles "
        "every NMF kernel for --target and writes static.md / static.json: registers, spills, "
        "occupancy, SASS counts, bytes moved, training-step account (default all)",
    )
    pr.add_argument("--target", choices=["sm_90a", "sm_80"], help="static: GPU (default both)")
    pr.add_argument("--parts", nargs="+", choices=["kernels", "traffic", "steps"],
                    help="static: parts to run (default all)")  # fmt: skip
    pr.add_argument("--quick", action="store_true", help="static: rank one fp32 at 128^3 only")
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    pr.add_argument("--out", help="output folder (default runs/profile-<time>, static-<time>)")
    pr.add_argument("--repeats", type=int, help="timed repetitions per case (median)")
    pr.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="run only cases whose id contains TEXT (repeatable: all must match)",
    )
    pr.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16", "fp16"])
    pr.add_argument("--sizes", nargs="+", type=int, help="layer: cubic sizes at C=32")
    pr.add_argument(
        "--deep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="layer: add the deeper-stage shapes (default: on a GPU)",
    )
    pr.add_argument("--mixers", nargs="+", help="layer: mixers (default all)")
    pr.add_argument("--impls", nargs="+", help="layer: kernels / SDPA backends")
    pr.add_argument("--models", nargs="+", help="model: models (default all)")
    pr.add_argument("--kernels", nargs="+", choices=C.KERNELS, help="model: Factorizer kernels")
    pr.add_argument("--tasks", nargs="+", choices=["train", "infer"], help="model: tasks")
    pr.add_argument("--patch", type=int, help="model: patch edge (default 128 GPU, tiny CPU)")
    pr.add_argument("--batch", type=int, help="model: training batch (default 2 GPU, 1 CPU)")
    pr.add_argument(
        "--checkpoint",
        action="store_true",
        default=None,
        help="model: Factorizers with activation checkpointing (less memory, one more forward)",
    )
    pr.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default on a CPU: 1; tiny shapes gain little from more, "
        "and OpenMP threads on a busy machine stall)",
    )
    pr.add_argument("--quiet", action="store_true", help="no line per case")
    pr.set_defaults(func=cmd_profile)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .infer import CheckpointError
    from .train import TrainingDiverged

    try:
        return args.func(args)
    except TrainingDiverged as err:
        print(f"fastnmf {args.command}: {err}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, NotImplementedError, OSError, CheckpointError) as err:
        # OSError: missing files, unwritable or non-directory output paths, full disks
        print(f"fastnmf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastnmf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
