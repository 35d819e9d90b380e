"""`sbcrt` command line: one subcommand per module in sbcrt/commands (registered lightly, run lazily)."""

from __future__ import annotations

import argparse
import importlib
import sys

from sbcrt import __version__
from sbcrt.errors import SbcrtError, UsageError

# Each module has `register(subparsers)` (argparse only, no heavy imports) and `run(args) -> int`.
COMMANDS = ("export", "classify", "info", "watch", "eval", "bench", "service", "train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sbcrt", description="Edge inference runtime for single-board computers.")
    parser.add_argument("--version", action="version", version=f"sbcrt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"sbcrt.commands.{name}")
        command = module.register(sub)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"sbcrt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except SbcrtError as exc:
        print(f"sbcrt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
