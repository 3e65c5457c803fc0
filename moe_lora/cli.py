"""The ``moe-lora`` command. Each subcommand lives in ``moe_lora/commands/<name>.py`` and provides

HELP: str                                   one line for the command list
def add_arguments(parser) -> None           its options (every option with a help string)
def run(args: argparse.Namespace) -> int    the job; returns the exit code
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from .errors import RunError
from .version import __version__

COMMANDS = ("info", "convert", "train", "analyze", "export", "cluster", "bench", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lora",
        description="LoRA mixture-of-experts: convert models, train, analyse routers.",
    )
    parser.add_argument("--version", action="version", version=f"moe-lora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if importlib.util.find_spec(f"moe_lora.commands.{name}") is None:
            continue
        module = importlib.import_module(f"moe_lora.commands.{name}")
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=(module.__doc__ or module.HELP).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear message, no traceback
        print(f"moe-lora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # moe_lora.numerics.NonFiniteError: NaN/inf, with where it appeared
        print(f"moe-lora {args.command}: error: {e}", file=sys.stderr)
        return 3
    except RunError as e:  # output_dir locked (2), disk full (1), training did not happen or diverged (4)
        print(f"moe-lora {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
