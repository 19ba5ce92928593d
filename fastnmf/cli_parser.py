"""The argument parser of the ``fastnmf`` command: one helper per subcommand.

:func:`build_parser` assembles them; each ``_add_<command>`` adds the subcommand and its options
and sets ``func`` to the ``cmd_<command>`` function of :mod:`fastnmf.cli` that runs it.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from . import _checks as C

__all__ = ["build_parser"]


def build_parser(commands) -> argparse.ArgumentParser:
    """The parser; ``commands`` maps a subcommand name to its ``cmd_*`` function."""
    parser = argparse.ArgumentParser(
        prog="fastnmf", description="Factorizer segmentation with fused NMF kernels."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of any error (by default bad input is one line)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_train, _add_plan, _add_infer, _add_evaluate, _add_export, _add_compare,
                _add_components, _add_info, _add_bench_layer, _add_profile):  # fmt: skip
        add(sub, commands)
    for command in {id(p): p for p in sub.choices.values()}.values():  # also after the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of any error")  # fmt: skip
    return parser


# help (the command list) and description (its --help) of each subcommand
_TEXTS: dict[str, dict[str, str]] = {
    "train": {
        "help": "train a model (no arguments: the demo main job: train, infer, evaluate)",
        "description": "Train a segmentation model. With no arguments: the main job (preset "
            "'demo': a small swin Factorizer on the built-in demo data, fold 0, then inference "
            "and evaluation of the validation fold). Unset options come from the preset.",
    },
    "plan": {
        "help": "the batch size, crop and checkpointing whose training step fits a GPU",
        "description": "Ask the training-step account (fake tensors on the CPU, no GPU "
            "needed) about crops from the preset's patch down, batches from --max-batch down, "
            "without and then with activation checkpointing; print the first that fits the GPU "
            "memory minus the headroom, and its predicted peak.",
    },
    "infer": {
        "help": "segment volumes: NIfTI label maps + overlay PNGs",
    },
    "evaluate": {
        "help": "Dice and HD95 per region: per-case CSV and summary",
    },
    "export": {
        "help": "export a checkpoint as a MONAI bundle (python -m monai.bundle run ...)",
        "description": "Write a MONAI bundle: configs/metadata.json, configs/inference.json, "
            "models/model.pt, models/model.pt2 (the eval network as a torch.export program), "
            "docs/README.md, LICENSE. Its network is built by fastnmf, so running it needs "
            "fastnmf installed.",
    },
    "compare": {
        "help": "paired Wilcoxon tests between two runs' metrics",
    },
    "components": {
        "help": "NMF component maps of a block for one case",
    },
    "info": {
        "help": "print versions, devices and kernels",
    },
    "bench-layer": {
        "help": "run the swin NMF layer over a volume and time it",
    },
    "profile": {
        "help": "NMF layer and Factorizers vs attention and CNN baselines: table + plots",
        "description": "Run the layer suite (context mixers: NMF vs windowed/global SDPA, MONAI "
            "window attention, FAVOR+) and/or the model suite (training step, sliding-window "
            "inference) and write table.md, table.csv, meta.json and PNG plots. On a GPU the "
            "issue's shapes (128^3 batch 2, fp32 and bf16); on a CPU tiny shapes (seconds).",
    },
}


def _command(sub, commands, name: str, **kwargs) -> argparse.ArgumentParser:
    """The subcommand ``name`` with its :data:`_TEXTS` (and ``add_parser`` keyword arguments),
    run by ``commands[name]``."""
    parser = sub.add_parser(name, **_TEXTS[name], **kwargs)
    parser.set_defaults(func=commands[name])
    return parser


def _checkpoint_inputs(p, *, case_flag: str = "--cases", case_help: str) -> None:
    """--checkpoint, --data, --cases / --case, --fold: a trained run and the cases it reads."""
    p.add_argument("--checkpoint", required=True, help="checkpoint or run folder (best.pt)")
    p.add_argument("--data", help="data set, 'demo' or one NIfTI image (default: training's)")
    p.add_argument(case_flag, default="val", help=case_help)
    p.add_argument("--fold", type=int, help="fold for val (default: training's)")


def _design_arg(text: str):
    """``--designs`` item: "auto" or a window design number 1, 2, 3."""
    if text == "auto":
        return text
    if text in ("1", "2", "3"):
        return int(text)
    raise argparse.ArgumentTypeError(f"invalid design {text!r} (choose from auto, 1, 2, 3)")


def _repeatable(p, flag: str, metavar: str, help: str) -> None:
    """An option that may be given more than once (a list, in order)."""
    p.add_argument(flag, action="append", metavar=metavar, help=f"{help}; repeatable")


def _amp_option(p, *, help: str) -> None:
    """--amp [MODE]: mixed precision; the flag alone is bf16 (train and plan)."""
    from .config import AMP_MODES

    p.add_argument("--amp", choices=AMP_MODES, nargs="?", const="bf16", help=help)


def _compile_option(p, *, help: str) -> None:
    """--compile [BACKEND]: torch.compile; the flag alone is inductor (train and profile)."""
    from .config import COMPILE_BACKENDS

    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   choices=[b for b in COMPILE_BACKENDS if b != "none"],
                   help=f"{help} (the flag alone: inductor; aot_eager / eager: no C++ "
                   "compiler needed)")  # fmt: skip


def _gpu_memory_option(p, *, required: bool, help: str) -> None:
    p.add_argument("--gpu-memory", required=required, metavar="SIZE", help=help)


class _DeprecatedPatch(argparse.Action):
    """``--patch N``: the old spelling of ``--crop-size N`` (a DeprecationWarning)."""

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(
            "--patch is now --crop-size (the training crop edge); --patch will be removed in "
            "the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        print("fastnmf train: note: --patch is deprecated; use --crop-size", file=sys.stderr)
        namespace.crop_size = values


def _add_train(sub, commands) -> None:
    from .config import CROPS, RUN_PRESETS

    tr = _command(sub, commands, "train")
    tr.add_argument("--preset", choices=sorted(RUN_PRESETS), help="run preset (default demo)")
    tr.add_argument("--model", help="model name (fastnmf.models.available())")
    tr.add_argument("--data", help="'demo', a data-set folder or a JSON datalist")
    tr.add_argument("--kernel", choices=C.KERNELS, help="NMF kernel (default auto)")
    tr.add_argument("--fold", type=int, help="cross-validation fold 0..4 (default 0)")
    tr.add_argument("--folds", type=int, help="number of cross-validation folds (default 5)")
    tr.add_argument("--steps", type=int, help="total training steps")
    tr.add_argument("--batch-size", type=int, help="crops per step and process")
    tr.add_argument(
        "--crop-size", type=int, help="cubic training crop edge (the model's spatial size)"
    )
    tr.add_argument("--patch", type=int, action=_DeprecatedPatch, help=argparse.SUPPRESS)
    _amp_option(tr, help="mixed precision: none (default), bf16 (the flag alone), fp16")
    _compile_option(tr, help="torch.compile the training step")
    _gpu_memory_option(tr, required=False, help="plan batch size, crop and checkpointing for a "
                       "GPU of this size (24GB, 24GiB, 8000MB); --batch-size / --crop-size are "
                       "then the largest tried")  # fmt: skip
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
        help="crop sampling: random (uniform; demo default) or posneg (a --pos-ratio share "
        "centred on lesion voxels; default for other data)",
    )
    tr.add_argument(
        "--pos-ratio",
        type=float,
        help="posneg: share of crops centred on foreground (default 1/3, as nnU-Net)",
    )
    tr.add_argument("--seed", type=int, help="run seed (default 0)")
    tr.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms (torch, cuDNN, cuBLAS): bitwise-repeatable runs",
    )
    tr.add_argument("--workers", type=int, help="DataLoader workers")
    _repeatable(tr, "--model-opt", "KEY=VALUE",
                "model builder option, VALUE as JSON (e.g. widths=[8,16,32,64])")  # fmt: skip
    tr.add_argument("--demo-cases", type=int, help="number of demo cases (default 16)")
    tr.add_argument("--demo-size", type=int, help="demo volume edge (default 48)")
    tr.add_argument("--stop-at", type=int, help="stop after this step (resume later)")
    tr.add_argument("--no-eval", action="store_true", help="skip the final infer + evaluate")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_plan(sub, commands) -> None:
    pl = _command(sub, commands, "plan")
    # checked by fastnmf.plan.plan (an unknown name is an error listing the valid ones)
    pl.add_argument("--model", required=True, help="model name (fastnmf.models.available())")
    pl.add_argument("--preset", default="brats",
                    help="model preset: channels, E, window, shifts, patch (default brats)")
    _gpu_memory_option(pl, required=True, help="GPU memory: 24GB (10^9), 24GiB (2^30), 8000MB")
    _amp_option(pl, help="mixed precision: none (default), bf16 (the flag alone), fp16")
    pl.add_argument("--max-batch", type=int, default=2, help="largest batch to try (default 2)")
    pl.add_argument("--crop", type=int, help="largest cubic crop to try (default: the preset's)")
    pl.add_argument("--headroom", type=float, default=0.15,
                    help="share of the memory kept free for what the account leaves out "
                    "(allocator, CUDA context, workspaces; default 0.15)")  # fmt: skip


def _add_infer(sub, commands) -> None:
    inf = _command(sub, commands, "infer")
    _checkpoint_inputs(inf, case_help="val (default) | all | ID,ID,...")
    inf.add_argument("--out", help="output folder (default <run>/predictions)")
    inf.add_argument("--device", default="auto")
    inf.add_argument("--kernel", choices=C.KERNELS, help="NMF kernel at inference")
    inf.add_argument("--iters", type=int, help="NMF iterations T at inference")
    inf.add_argument(
        "--skip", type=int, nargs="+", metavar="BLOCK", help="short-circuit these NMF blocks"
    )
    inf.add_argument("--overlap", type=float, default=0.5)
    inf.add_argument("--no-png", action="store_true")


def _add_evaluate(sub, commands) -> None:
    ev = _command(sub, commands, "evaluate")
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


def _add_export(sub, commands) -> None:
    exp = _command(sub, commands, "export")
    exp.add_argument("--checkpoint", required=True, help="checkpoint or run folder (best.pt)")
    exp.add_argument("--bundle", required=True, help="bundle folder to write (new or empty)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    exp.add_argument(
        "--no-program", action="store_true", help="skip models/model.pt2 (the exported program)"
    )


def _add_compare(sub, commands) -> None:
    cmp = _command(sub, commands, "compare")
    cmp.add_argument("a", help="metrics.csv (or its folder) of run A")
    cmp.add_argument("b", help="metrics.csv (or its folder) of run B")
    cmp.add_argument("--out", help="write the table as CSV")


def _add_components(sub, commands) -> None:
    co = _command(sub, commands, "components")
    _checkpoint_inputs(co, case_flag="--case", case_help="case id (default: first val case)")
    co.add_argument("--block", type=int, required=True, help="NMF block index (0 = first)")
    co.add_argument("--iters", type=int, help="NMF iterations T")
    co.add_argument("--out", help="output folder (default <run>/components)")
    co.add_argument("--device", default="auto")


def _add_info(sub, commands) -> None:
    _command(sub, commands, "info")


def _add_bench_layer(sub, commands) -> None:
    # "demo": the name the README used before the training pipeline
    bench = _command(sub, commands, "bench-layer", aliases=["demo"])
    bench.add_argument("--size", type=int, default=32, help="cubic volume side (default 32)")
    bench.add_argument("--channels", type=int, default=32)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--head-dim", type=int, default=8)
    bench.add_argument("--window", type=int, default=8, help="NMF window edge (default 8)")
    bench.add_argument("--iters", type=int, default=5)
    bench.add_argument("--kernels", nargs="+", default=["torch", "reference"], choices=C.KERNELS)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--seed", type=int, default=0)


def _add_profile(sub, commands) -> None:
    pr = _command(sub, commands, "profile")
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
    pr.add_argument("--designs", nargs="+", type=_design_arg, default=["auto"],
                    metavar="{auto,1,2,3}",
                    help="static: window kernel designs of the rank-one window cases (auto: the "
                         "one the layer runs for the shifts; 1: window_nmf, 2: window_nmf2, 3: "
                         "window_nmf3, persistent; default auto)")  # fmt: skip
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    pr.add_argument("--out", help="output folder (default runs/profile-<time>, static-<time>)")
    pr.add_argument("--repeats", type=int, help="timed repetitions per case (median)")
    _repeatable(pr, "--only", "TEXT", "run only cases whose id contains TEXT (all must match)")
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
    _compile_option(pr, help="model: torch.compile every model")
    pr.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default on a CPU: 1; tiny shapes gain little from more, "
        "and OpenMP threads on a busy machine stall)",
    )
    pr.add_argument("--quiet", action="store_true", help="no line per case")
