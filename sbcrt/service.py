"""`sbcrt service`: run a `sbcrt watch` command line as a systemd service, so a board watches its pen from boot,
restarts after a crash and logs to the journal.

The unit (`/etc/systemd/system/sbcrt-<name>.service`) runs the command as a dedicated system user (created if
missing, in the `video` group for cameras) with `Restart=always`, never giving up, and a read-only view of the
system except its own state and cache folders and the folders the command writes (--jsonl, --save,
--heartbeat). Secrets (the MQTT password) go in the optional `/etc/sbcrt/<name>.env`, not on the command line.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sbcrt import __version__
from sbcrt.errors import SbcrtError, UsageError

UNIT_DIR = Path("/etc/systemd/system")
UNIT_DIR_ENV = "SBCRT_SYSTEMD_UNIT_DIR"  # another folder for the unit file (image builds, tests); systemctl still runs
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_USER = "sbcrt"
# Options of `watch` whose value is a path: made absolute (the service runs in its state folder).
PATH_OPTIONS = ("-m", "--model", "--labels", "--jsonl", "--save", "--heartbeat", "--mqtt-ca")
WRITTEN_FILES = ("jsonl", "heartbeat")  # the folder holding these must be writable
WRITTEN_DIRS = ("save",)
SYSTEMCTL_TIMEOUT_S = 60


@dataclass
class ServiceSpec:
    name: str
    command: list[str]  # the sbcrt arguments: ["watch", "0", "--model", ...]
    user: str = DEFAULT_USER
    executable: list[str] = field(default_factory=list)  # how to run sbcrt: [/path/to/sbcrt] or [python, -m, sbcrt]
    writable: list[Path] = field(default_factory=list)
    video_group: bool = True

    @property
    def unit_name(self) -> str:
        return f"sbcrt-{self.name}.service"

    @property
    def env_file(self) -> Path:
        return Path("/etc/sbcrt") / f"{self.name}.env"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise UsageError(f"--name {name!r}: letters, digits, '.', '_' and '-' only (up to 64), e.g. pen3")
    return name


def sbcrt_executable() -> list[str]:
    """The sbcrt of this installation, by absolute path (systemd needs one): the console script beside the
    running Python (a venv's bin/), else the Python itself with -m sbcrt."""
    beside = Path(sys.executable).parent / "sbcrt"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [str(Path(sys.executable).absolute()), "-m", "sbcrt"]


def systemd_quote(word: str, *, command: bool = True) -> str:
    """One argument as systemd parses it: quoted when needed (C escapes inside double quotes), with `%`
    (specifiers) and, in a command line, `$` (environment expansion) doubled so they reach sbcrt unchanged."""
    escaped = word.replace("%", "%%").replace("$", "$$") if command else word.replace("%", "%%")
    if word == ";":
        return "\\;"  # a lone semicolon would separate two commands
    if word and not re.search(r"[\s\"'\\]", word):
        return escaped
    escaped = escaped.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def prepare(name: str, command: list[str], *, user: str = DEFAULT_USER, cwd: Path | None = None) -> ServiceSpec:
    """Checks the watch command line with watch's own parser (a typo fails now, not at boot) and makes its
    paths absolute."""
    check_name(name)
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user):
        raise UsageError(f"--user {user!r}: not a valid system user name")
    if command[:1] == ["--"]:
        command = command[1:]
    if not command or command[0] != "watch":
        raise UsageError("give the watch command line after --: sbcrt service install --name pen3 -- watch 0 ...")
    from sbcrt.cli import build_parser

    try:
        args = build_parser().parse_args(command)
    except SystemExit:  # argparse has printed what is wrong
        raise UsageError("the watch command line above is not valid") from None
    if not args.model and not os.environ.get("SBCRT_MODEL"):
        raise UsageError("the watch command needs --model (the service does not see your $SBCRT_MODEL)")
    cwd = cwd or Path.cwd()
    command = absolute_paths(command, args.source, cwd)
    args = build_parser().parse_args(command)
    writable = [Path(getattr(args, option)).parent for option in WRITTEN_FILES if getattr(args, option)]
    writable += [Path(getattr(args, option)) for option in WRITTEN_DIRS if getattr(args, option)]
    try:
        grp.getgrnam("video")
        video = True
    except KeyError:
        video = False
    unique = list(dict.fromkeys(writable))
    return ServiceSpec(name, command, user, sbcrt_executable(), unique, video)


def absolute_paths(command: list[str], source: str, cwd: Path) -> list[str]:
    out = list(command)
    for i, word in enumerate(out):
        for option in PATH_OPTIONS:
            if word == option and i + 1 < len(out):
                out[i + 1] = str(cwd / out[i + 1])  # cwd / an absolute path is that path
            elif option.startswith("--") and word.startswith(option + "="):
                out[i] = f"{option}={cwd / word.split('=', 1)[1]}"
    is_local = not (source.isdigit() or "://" in source or source.startswith(("picamera2", "/")))
    if is_local and source in out:
        out[out.index(source, 1)] = str(cwd / source)
    return out


def render_unit(spec: ServiceSpec) -> str:
    exec_start = " ".join(systemd_quote(word) for word in [*spec.executable, *spec.command])
    state = f"/var/lib/sbcrt/{spec.name}"
    writable = " ".join(systemd_quote(str(p), command=False) for p in spec.writable if not str(p).startswith(state))
    lines = [
        f"# Written by `sbcrt service install` (sbcrt {__version__}).",
        f"# Logs: journalctl -u {spec.unit_name} -f    Remove: sudo sbcrt service uninstall --name {spec.name}",
        "[Unit]",
        f"Description=sbcrt watch ({spec.name})",
        "Wants=network-online.target",
        "After=network-online.target",
        "# Restart=always forever: no start-rate limit that would give up on a camera unplugged for a minute",
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=exec",
        f"User={spec.user}",
        *(["SupplementaryGroups=video"] if spec.video_group else []),
        f"ExecStart={exec_start}",
        "Restart=always",
        "RestartSec=5",
        "# SIGTERM finishes the current frame, flushes the records and MQTT queue, then exits 0",
        "TimeoutStopSec=30",
        f"StateDirectory=sbcrt/{spec.name}",
        "CacheDirectory=sbcrt",
        f"WorkingDirectory={state}",
        "Environment=SBCRT_CACHE=/var/cache/sbcrt PYTHONUNBUFFERED=1",
        "# Secrets (SBCRT_MQTT_USERNAME=, SBCRT_MQTT_PASSWORD=) belong here, readable by root only",
        f"EnvironmentFile=-{spec.env_file}",
        "StandardOutput=journal",
        "StandardError=journal",
        f"SyslogIdentifier=sbcrt-{spec.name}",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        *([f"ReadWritePaths={writable}"] if writable else []),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


# -- install / uninstall / status ------------------------------------------------------------------------------------


class SystemctlError(SbcrtError):
    pass


def unit_dir(root: Path | None) -> Path:
    if root is not None:
        return root / UNIT_DIR.relative_to("/")
    return Path(os.environ.get(UNIT_DIR_ENV) or UNIT_DIR)


def systemctl(*args: str, root: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Runs systemctl (offline with --root); a missing or unusable systemctl becomes one line saying so."""
    binary = shutil.which("systemctl")
    if binary is None:
        raise SystemctlError("systemctl not found: this system does not run systemd")
    command = [binary, *([f"--root={root}"] if root else []), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SystemctlError(f"systemctl {' '.join(args)}: no answer within {SYSTEMCTL_TIMEOUT_S} s") from None
    if check and done.returncode != 0:
        detail = (done.stderr.strip() or done.stdout.strip()).splitlines()
        why = detail[-1] if detail else f"exit status {done.returncode}"
        if "not been booted with systemd" in done.stderr or "Failed to connect to bus" in done.stderr:
            why = "systemd is not running on this system (no PID 1 systemd)"
        raise SystemctlError(f"systemctl {' '.join(args)} failed: {why}")
    return done


def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"{action} needs root: run it with sudo (or use --dry-run to see the unit)")


def install(spec: ServiceSpec, *, root: Path | None = None, out=sys.stdout) -> Path:
    """Write and enable the unit; on the live system also create the user and folders and start it now."""
    if root is None:
        require_root("sbcrt service install")
    folder = unit_dir(root)
    path = folder / spec.unit_name
    if root is None:
        ensure_user(spec.user)
        for directory in spec.writable:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.chown(directory, spec.user, None)
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(render_unit(spec))
    partial.chmod(0o644)
    os.replace(partial, path)
    print(f"wrote {path}", file=out)
    try:
        if root is not None:
            systemctl("enable", spec.unit_name, root=root)
            print(f"enabled {spec.unit_name} under {root} (starts at the next boot of that system)", file=out)
        else:
            systemctl("daemon-reload")
            systemctl("enable", "--now", spec.unit_name)
            print(f"enabled and started {spec.unit_name}; logs: journalctl -u {spec.unit_name} -f", file=out)
    except SystemctlError as exc:
        raise SystemctlError(f"{exc}; the unit is written to {path} but not enabled") from None
    return path


def uninstall(name: str, *, root: Path | None = None, out=sys.stdout) -> None:
    check_name(name)
    if root is None:
        require_root("sbcrt service uninstall")
    unit = f"sbcrt-{name}.service"
    path = unit_dir(root) / unit
    if not path.exists():
        raise UsageError(f"{unit} is not installed (no {path})")
    if root is not None:
        systemctl("disable", unit, root=root)
    else:
        systemctl("disable", "--now", unit)
    path.unlink()
    if root is None:
        systemctl("daemon-reload")
    print(f"stopped, disabled and removed {path}" if root is None else f"disabled and removed {path}", file=out)


def status(name: str, *, root: Path | None = None, out=sys.stdout) -> int:
    """The unit file, whether it is enabled, and (live) systemctl status: exit 0 running, 3 not running."""
    check_name(name)
    unit = f"sbcrt-{name}.service"
    path = unit_dir(root) / unit
    if not path.exists():
        print(f"{unit}: not installed (no {path})", file=out)
        return 4
    print(f"{unit}: {path}", file=out)
    if root is not None:
        done = systemctl("is-enabled", unit, root=root, check=False)
        print(f"{unit}: {done.stdout.strip() or done.stderr.strip()}", file=out)
        return 0 if done.returncode == 0 else 3
    systemctl("is-system-running", check=False)  # raises nothing; the status call below says what is wrong
    done = systemctl("status", "--no-pager", "--lines=20", unit, check=False)
    if done.returncode == 4 or "not been booted with systemd" in done.stderr or "Failed to connect" in done.stderr:
        raise SystemctlError(f"systemctl status {unit}: systemd is not running on this system (no PID 1 systemd)")
    print(done.stdout, end="", file=out)
    return done.returncode


def ensure_user(user: str) -> None:
    """A system user with no login and no home of its own (its files are the state folder)."""
    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    command = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/var/lib/sbcrt",
               "--shell", "/usr/sbin/nologin", user]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SbcrtError(f"cannot create the user {user!r}: {done.stderr.strip() or done.returncode}")


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="the service's name: the unit is sbcrt-NAME.service")
    parser.add_argument(
        "--root", type=Path, metavar="DIR", help="act on the system image under DIR (systemctl --root), offline"
    )
