"""`sbcrt service install|uninstall|status`: a `sbcrt watch` command line as a systemd service (sbcrt/service.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "service",
        help="run a watch command line as a systemd service",
        description="Write, enable and start a systemd unit (sbcrt-NAME.service) running a `sbcrt watch` command "
        "line from boot: Restart=always, a dedicated system user, logs in the journal. Needs root (sudo), except "
        "--dry-run, which prints the unit.",
        epilog="example: sudo sbcrt service install --name pen3 -- watch 0 --model /opt/models/barn.onnx "
        "--mqtt mqtt://broker.local",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    from sbcrt.service import DEFAULT_USER, add_common

    install = actions.add_parser("install", help="write, enable and start the unit for a watch command line")
    add_common(install)
    install.add_argument("--user", default=DEFAULT_USER, help=f"run as this system user (default {DEFAULT_USER})")
    install.add_argument("--dry-run", action="store_true", help="print the unit and change nothing")
    install.add_argument("command", nargs=argparse.REMAINDER, metavar="-- watch ...", help="the watch command line")
    uninstall = actions.add_parser("uninstall", help="stop, disable and remove the unit")
    add_common(uninstall)
    status = actions.add_parser("status", help="show the unit and its systemctl status")
    add_common(status)
    return p


def run(args: argparse.Namespace) -> int:
    import sys

    from sbcrt import service

    root: Path | None = args.root.absolute() if args.root else None
    if args.action == "install":
        spec = service.prepare(args.name, args.command, user=args.user)
        if "--jsonl" not in spec.command and not any(w.startswith("--jsonl=") for w in spec.command):
            print("sbcrt service: note: no --jsonl: every record goes to the journal", file=sys.stderr)
        if args.dry_run:
            sys.stdout.write(service.render_unit(spec))
            return 0
        service.install(spec, root=root)
        return 0
    if args.action == "uninstall":
        service.uninstall(args.name, root=root)
        return 0
    return service.status(args.name, root=root)
