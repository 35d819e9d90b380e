"""`sbcrt` command line: one subcommand per module in sbcrt/commands (registered lightly, run lazily)."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import sys

from sbcrt import __version__
from sbcrt.errors import SbcrtError, SettingError, UsageError

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


def _unencodable(error: UnicodeError) -> tuple[str, int]:
    """File names that are not valid in the locale's encoding (a Latin-1 name under en_GB.UTF-8) reach Python as
    surrogates: write their original bytes back (surrogateescape, as `ls` shows them); anything else the encoding
    cannot hold becomes a backslash escape. Printing a name must never end the run."""
    if isinstance(error, UnicodeEncodeError):
        try:
            return codecs.lookup_error("surrogateescape")(error)
        except UnicodeError:
            return codecs.backslashreplace_errors(error)
    raise error


codecs.register_error("sbcrt.names", _unencodable)


def safe_output() -> None:
    """stdout and stderr print any file name (see _unencodable) instead of raising UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and getattr(stream, "errors", None) in ("strict", "backslashreplace"):
            with contextlib.suppress(AttributeError, ValueError):  # not a TextIOWrapper (a test's capture)
                stream.reconfigure(errors="sbcrt.names")


def main(argv: list[str] | None = None) -> int:
    safe_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except SettingError as exc:  # the library names its settings; the user typed flags
        from sbcrt.commands.arguments import flag_of

        print(f"sbcrt {args.command}: error: {exc.describe(flag_of)}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"sbcrt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except SbcrtError as exc:
        print(f"sbcrt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
