"""`sbcrt service install|uninstall|status`: a `sbcrt watch` command line as a systemd service (sbcrt/service.py).

This side parses: the watch command line is read by watch's own parser, checked exactly as `watch` checks it at
start (without opening the source), its paths made absolute from what argparse parsed (so `-mFILE`, `--mod FILE`
and `--heart=FILE` are found like `--model FILE`), and written back in the user's order."""

from __future__ import annotations

import argparse
import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from sbcrt.errors import UsageError

if TYPE_CHECKING:
    from sbcrt.service import ServiceSpec

INSTALL_HINT = "give the watch command line after --: sbcrt service install --name pen3 -- watch 0 ..."


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="the service's name: the unit is sbcrt-NAME.service")
    parser.add_argument(
        "--root", type=Path, metavar="DIR", help="act on the system image under DIR (systemctl --root), offline"
    )


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "service",
        help="run a watch command line as a systemd service",
        description="Write, enable and start a systemd unit (sbcrt-NAME.service) running a `sbcrt watch` command "
        "line from boot: Restart=always, a dedicated system user, logs in the journal. Needs root (sudo), except "
        "--dry-run, which prints the unit. With --root, the image also gets a sysusers.d entry creating the user "
        "at its first boot.",
        epilog="example: sudo sbcrt service install --name pen3 -- watch 0 --model /opt/models/barn.onnx "
        "--mqtt mqtt://broker.local",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    from sbcrt.service import DEFAULT_USER

    install = actions.add_parser("install", help="write, enable and start the unit for a watch command line")
    add_common(install)
    install.add_argument("--user", default=DEFAULT_USER, help=f"run as this system user (default {DEFAULT_USER})")
    install.add_argument("--dry-run", action="store_true", help="print the unit and change nothing")
    install.add_argument(
        "--executable",
        type=Path,
        metavar="FILE",
        help="the sbcrt the unit runs (default: this one, the console script beside the running Python); "
        "with --root, a path inside the image",
    )
    install.add_argument(
        "watch_line", nargs=argparse.REMAINDER, metavar="-- watch ...", help="the watch command line"
    )  # not "command": the top-level parser keeps the subcommand's name there, for its error lines
    uninstall = actions.add_parser("uninstall", help="stop, disable and remove the unit")
    add_common(uninstall)
    status = actions.add_parser("status", help="show the unit and its systemctl status")
    add_common(status)
    return p


def run(args: argparse.Namespace) -> int:
    from sbcrt import service

    root: Path | None = args.root.absolute() if args.root else None
    if args.action == "install":
        service.check_name(args.name)
        service.check_user(args.user)
        if root is None and not args.dry_run:
            try:  # before checking the model: sudo is the first fix
                service.require_root("sbcrt service install")
            except service.NeedsRoot as exc:
                raise UsageError(f"{exc} (or use --dry-run to see the unit)") from None
        spec = prepare(args.name, args.watch_line, user=args.user, root=root, executable=args.executable)
        if not any(word == "--jsonl" or word.startswith("--jsonl=") for word in spec.command):
            print("sbcrt service: note: no --jsonl: every record goes to the journal", file=sys.stderr)
        if args.dry_run:
            sys.stdout.write(service.render_unit(spec))
            return 0
        for line in service.install(spec, root=root):
            print(line)
        return 0
    if args.action == "uninstall":
        for line in service.uninstall(args.name, root=root):
            print(line)
        return 0
    state = service.status(args.name, root=root)
    sys.stdout.write(state.text)
    return state.code


# -- the watch command line -------------------------------------------------------------------------------------


class _WatchParser(argparse.ArgumentParser):
    """watch's parser whose errors are one UsageError line, not argparse's usage text and exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"the watch command line: {message}")


@dataclass
class Given:
    """One argument as argparse resolved it: the option ('' for the source), its words, and its declared type."""

    option: str
    values: list[str]
    kind: Any


def _recording(given: list[Given]) -> dict[str | None, type[argparse.Action]]:
    """Action classes that record every argument, in command-line order, with its raw words instead of storing
    it: argparse itself resolves `-mFILE`, `--mod FILE`, `--heart=FILE` and `--` to the action they belong to.
    watch's options use the store, store_true and append actions only; an unknown one fails loudly here."""

    class RecordValues(argparse.Action):
        def __init__(self, option_strings: list[str], dest: str, type: Any = None, **kwargs: Any) -> None:  # noqa: A002
            kwargs.pop("choices", None)  # the words as typed: watch's own parse checks them
            super().__init__(option_strings, dest, **kwargs)
            self.kind = type

        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
            words = values if isinstance(values, list) else [] if values is None else [values]
            given.append(Given(option_string or "", [str(word) for word in words], self.kind))

    class RecordFlag(RecordValues):
        def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
            super().__init__(option_strings, dest, nargs=0, **kwargs)

    class Unrecorded(argparse.Action):
        def __init__(self, option_strings: list[str], *args: Any, **kwargs: Any) -> None:
            raise TypeError(f"watch option {option_strings}: an action the service's recorder does not know")

    recorders: dict[str | None, type[argparse.Action]] = {
        name: Unrecorded for name in ("store_const", "store_false", "append_const", "count", "extend")
    }
    return recorders | {None: RecordValues, "store": RecordValues, "append": RecordValues, "store_true": RecordFlag}


def watch_parser(given: list[Given] | None = None) -> argparse.ArgumentParser:
    from sbcrt.commands import watch

    parser = _WatchParser(prog="sbcrt watch", add_help=False)
    if given is not None:
        for name, action in _recording(given).items():
            parser.register("action", name, action)
    watch.add_arguments(parser)
    parser.set_defaults(heartbeat=None)  # the service does not see the installer's $SBCRT_HEARTBEAT
    return parser


def is_local_source(source: str) -> bool:
    """A folder, video file or glob (a path), not a camera or a stream."""
    return not (source.isdigit() or "://" in source or source.lower().startswith(("picamera2", "/dev/")))


def prepare(
    name: str,
    command: list[str],
    *,
    user: str,
    root: Path | None = None,
    cwd: Path | None = None,
    executable: Path | None = None,
) -> ServiceSpec:
    """The ServiceSpec for a watch command line: checked as `watch` checks it at start (a typo, a missing model
    or an unknown label fails now, not at every restart), paths absolute (the service runs in its state folder),
    the folders it writes made writable. Under `root` the paths it reads are checked inside that image.
    `executable` is the sbcrt the unit runs (default: this installation's), checked like a path it reads."""
    from sbcrt import service
    from sbcrt.commands import arguments, watch

    service.check_name(name)
    service.check_user(user)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command or command[0] != "watch":
        raise UsageError(INSTALL_HINT)
    words = command[1:]
    cwd = cwd or Path.cwd()

    args = watch_parser().parse_args(words)  # the parser's own errors first: an unknown flag, a bad number
    if not args.model and not os.environ.get("SBCRT_MODEL"):
        raise UsageError("the watch command needs --model (the service does not see your $SBCRT_MODEL)")
    given: list[Given] = []
    watch_parser(given).parse_args(words)

    out: list[str] = []
    checked: list[str] = []  # the same line with the paths it reads inside `root`, for the check
    reads: list[Path] = []
    writable: list[Path] = []
    for item in given:
        values = inside = item.values
        source = item.option == ""
        if item.kind in arguments.PATH_TYPES or (source and is_local_source(values[0])):
            # cwd / an absolute path is that path; a relative source starting with "-" stops doing so here
            values = inside = [str(cwd / value) for value in values]
            path = Path(values[0])
            if item.kind is arguments.output_file:
                writable.append(path.parent)
            elif item.kind is arguments.output_folder:
                writable.append(path)
            else:  # read at start: checked inside the image under `root` (written folders are made at boot)
                reads.append(_glob_base(path) if source and glob.has_magic(values[0]) else path)
                if root is not None:
                    inside = [str(root / Path(value).relative_to("/")) for value in values]
        if source:
            out += values
            checked += inside
        else:
            out += _option_words(item.option, values)
            checked += _option_words(item.option, inside)

    spec = service.ServiceSpec(
        name,
        ["watch", *out],
        user,
        [str(_checked_executable(executable, cwd, root))] if executable else service.sbcrt_executable(),
        list(dict.fromkeys(writable)),
        service.has_video_group(),
        reads,
    )
    hidden = service.hidden_by_private_tmp(spec)
    if hidden:
        raise UsageError(
            f"{', '.join(map(str, hidden))}: under /tmp or /var/tmp, which the service cannot see (its unit has "
            "PrivateTmp=yes: its own empty /tmp); move it, e.g. models to /opt or /var/lib/sbcrt"
        )
    # Exactly the checks `watch` makes at start, on the command line the service will run.
    watch.check(watch_parser().parse_args(checked))
    return spec


def _checked_executable(executable: Path, cwd: Path, root: Path | None) -> Path:
    """--executable as the unit names it (absolute), once it is an executable file (inside the image under
    `root`): systemd would otherwise fail the unit at every start."""
    path = Path(os.path.normpath(cwd / executable))  # no `..` past the /tmp check
    inside = root / path.relative_to("/") if root is not None else path
    if not inside.is_file() or not os.access(inside, os.X_OK):
        raise UsageError(f"--executable {inside}: not an executable file")
    return path


def _option_words(option: str, values: list[str]) -> list[str]:
    if not values:
        return [option]
    if len(values) == 1 and values[0].startswith("-"):  # a value argparse would otherwise read as an option
        return [f"{option}={values[0]}" if option.startswith("--") else f"{option}{values[0]}"]
    return [option, *values]


def _glob_base(path: Path) -> Path:
    """The folder a glob pattern lives in: its longest leading part without wildcards."""
    base = Path(path.anchor)
    for part in path.parts[1:]:
        if glob.has_magic(part):
            break
        base = base / part
    return base
