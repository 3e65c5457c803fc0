"""The ``moe-lora`` command: one subcommand per job, each with --help."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

from . import __version__


def _version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    """Versions of the stack and which compute backends are usable here."""
    import torch

    from .kernels import backend_status

    print(f"moe-lora      {__version__}")
    print(f"python        {platform.python_version()}")
    for dist in ("torch", "transformers", "safetensors", "triton", "deepspeed", "peft", "megablocks"):
        print(f"{dist:<13} {_version_of(dist)}")
    cuda = torch.cuda.is_available()
    print(f"cuda          {'available: ' + torch.cuda.get_device_name(0) if cuda else 'not available'}")
    print("backends:")
    for name, (ok, why) in backend_status().items():
        print(f"  {name:<11} {'yes' if ok else 'no '}  {why}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out_dir=args.out, steps=args.steps, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lora",
        description="LoRA mixture-of-experts: convert models, train, analyse routers.",
    )
    parser.add_argument("--version", action="version", version=f"moe-lora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="print versions and usable compute backends",
                       description=cmd_info.__doc__)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="run the built-in demo (what `make demo` runs)",
                       description="Convert a tiny model, train it briefly, write a router report.")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
