"""The ``fastnmf`` command. ``fastnmf --help`` lists the subcommands."""

from __future__ import annotations

import argparse
import platform
import sys
import time

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


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the swin NMF layer over a volume with each kernel and print shapes and times."""
    from . import MatricizedNMF

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    size = (args.batch, args.channels, *(args.size,) * 3)
    x = torch.randn(size, generator=gen).to(device).requires_grad_(True)
    layer = MatricizedNMF(
        head_dim=args.head_dim, patch_size=args.window, shifts="default", iters=args.iters, seed=0
    ).to(device)
    print(f"fastnmf demo: swin NMF layer, input {tuple(x.shape)} on {device}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastnmf", description="Factorizer segmentation with fused NMF kernels."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the swin NMF layer over a volume and time it")
    demo.add_argument("--size", type=int, default=32, help="cubic volume side (default 32)")
    demo.add_argument("--channels", type=int, default=32)
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--head-dim", type=int, default=8)
    demo.add_argument("--window", type=int, default=8)
    demo.add_argument("--iters", type=int, default=5)
    demo.add_argument("--kernels", nargs="+", default=["torch", "reference"], choices=C.KERNELS)
    demo.add_argument("--repeats", type=int, default=3)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="print versions, devices and kernels")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, NotImplementedError, FileNotFoundError) as err:
        print(f"fastnmf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
