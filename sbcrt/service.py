"""`sbcrt service`: run a `sbcrt watch` command line as a systemd service, so a board watches its pen from boot,
restarts after a crash and logs to the journal.

The unit (`/etc/systemd/system/sbcrt-<name>.service`) runs the command as a dedicated system user (created if
missing, in the `video` group for cameras) with `Restart=always`, never giving up, and a read-only view of the
system except its own state and cache folders and the folders the command writes (--jsonl, --save,
--heartbeat). Secrets (the MQTT password) go in the optional `/etc/sbcrt/<name>.env`, not on the command line.

This module is the library side: a typed ServiceSpec in, the unit file, systemctl and the sysusers.d entry out;
it never parses a command line and never prints. `sbcrt/commands/service.py` parses and checks the watch command
line (with watch's own parser) and says what was done.
"""

from __future__ import annotations

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
# Where an image's first boot creates the service user from (systemd-sysusers runs early at every boot).
SYSUSERS_DIR = Path("/usr/lib/sysusers.d")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
DEFAULT_USER = "sbcrt"
HOME = "/var/lib/sbcrt"  # the service user's home: its state folders live here
# PrivateTmp=yes gives the service its own empty /tmp and /var/tmp: nothing there is visible to it.
PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))
SYSTEMCTL_TIMEOUT_S = 60


@dataclass
class ServiceSpec:
    name: str
    command: list[str]  # the sbcrt arguments, paths absolute: ["watch", "0", "--model", "/opt/m.onnx", ...]
    user: str = DEFAULT_USER
    executable: list[str] = field(default_factory=list)  # how to run sbcrt: [/path/to/sbcrt] or [python, -m, sbcrt]
    writable: list[Path] = field(default_factory=list)  # folders the command writes into
    video_group: bool = True
    reads: list[Path] = field(default_factory=list)  # files and folders the command reads (model, labels, ...)

    @property
    def unit_name(self) -> str:
        return f"sbcrt-{self.name}.service"

    @property
    def env_file(self) -> Path:
        return Path("/etc/sbcrt") / f"{self.name}.env"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise UsageError(f"service name {name!r}: letters, digits, '.', '_' and '-' only (up to 64), e.g. pen3")
    return name


def check_user(user: str) -> str:
    if not USER.fullmatch(user):
        raise UsageError(f"user {user!r}: not a valid system user name")
    return user


def has_video_group() -> bool:
    try:
        grp.getgrnam("video")
    except KeyError:
        return False
    return True


def hidden_by_private_tmp(spec: ServiceSpec) -> list[Path]:
    """The paths the service needs (its sbcrt, what it reads, where it writes) that PrivateTmp=yes hides from
    it: the service would fail at every start, or write where nobody looks and lose it at every stop."""
    needed = [Path(spec.executable[0])] if spec.executable else []
    needed += [*spec.reads, *spec.writable]

    def hidden(path: Path) -> bool:
        normal = Path(os.path.normpath(path))  # `..` must not walk past the check: /var/../tmp is /tmp
        return any(normal == tmp or tmp in normal.parents for tmp in PRIVATE_TMP)

    return [p for p in dict.fromkeys(needed) if hidden(p)]


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


class NeedsRoot(UsageError):
    """The action changes the system's units: root only."""


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
        raise NeedsRoot(f"{action} needs root: run it with sudo")


def sysusers_entry(spec: ServiceSpec) -> str:
    """systemd-sysusers' lines for the service user (and its video membership): an image made with --root has
    no such user, and systemd-sysusers creates it at first boot, before the unit starts."""
    lines = [
        f"# Written by `sbcrt service install` (sbcrt {__version__}) for {spec.unit_name}: its User={spec.user}.",
        f'u {spec.user} - "sbcrt service" {HOME} /usr/sbin/nologin',
    ]
    if spec.video_group:
        lines.append(f"m {spec.user} video")
    return "\n".join(lines) + "\n"


def sysusers_path(name: str, root: Path) -> Path:
    return root / SYSUSERS_DIR.relative_to("/") / f"sbcrt-{name}.conf"


def _write(path: Path, text: str) -> None:
    """Atomically, world-readable (systemd and the image's tools read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.chmod(0o644)
    os.replace(partial, path)


def install(spec: ServiceSpec, *, root: Path | None = None) -> list[str]:
    """Write and enable the unit; on the live system also create the user and folders and start it now; under
    `root` (an image) also write the sysusers.d entry that creates the user at its first boot. Returns what was
    done, one line each."""
    if root is None:
        require_root("sbcrt service install")
    folder = unit_dir(root)
    path = folder / spec.unit_name
    done: list[str] = []
    if root is None:
        ensure_user(spec.user)
        for directory in spec.writable:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.chown(directory, spec.user, None)
    else:
        users = sysusers_path(spec.name, root)
        _write(users, sysusers_entry(spec))
        done.append(f"wrote {users} (creates the user {spec.user} at the first boot)")
    _write(path, render_unit(spec))
    done.append(f"wrote {path}")
    try:
        if root is not None:
            systemctl("enable", spec.unit_name, root=root)
            done.append(f"enabled {spec.unit_name} under {root} (starts at the next boot of that system)")
        else:
            systemctl("daemon-reload")
            systemctl("enable", "--now", spec.unit_name)
            done.append(f"enabled and started {spec.unit_name}; logs: journalctl -u {spec.unit_name} -f")
    except SystemctlError as exc:
        raise SystemctlError(f"{exc}; the unit is written to {path} but not enabled") from None
    return done


def uninstall(name: str, *, root: Path | None = None) -> list[str]:
    """Stop, disable and remove the unit (and under `root` its sysusers.d entry); returns what was done."""
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
        return [f"stopped, disabled and removed {path}"]
    done = [f"disabled and removed {path}"]
    users = sysusers_path(name, root)
    if users.exists():  # the user itself stays: files it owns may remain in the image
        users.unlink()
        done.append(f"removed {users}")
    return done


@dataclass
class Status:
    code: int  # 0 running (or enabled, under a root), 3 not running, 4 not installed
    text: str  # what to show, lines ending in newlines


def status(name: str, *, root: Path | None = None) -> Status:
    """The unit file, whether it is enabled, and (live) systemctl status."""
    check_name(name)
    unit = f"sbcrt-{name}.service"
    path = unit_dir(root) / unit
    if not path.exists():
        return Status(4, f"{unit}: not installed (no {path})\n")
    text = f"{unit}: {path}\n"
    if root is not None:
        done = systemctl("is-enabled", unit, root=root, check=False)
        text += f"{unit}: {done.stdout.strip() or done.stderr.strip()}\n"
        return Status(0 if done.returncode == 0 else 3, text)
    systemctl("is-system-running", check=False)  # raises nothing; the status call below says what is wrong
    done = systemctl("status", "--no-pager", "--lines=20", unit, check=False)
    if done.returncode == 4 or "not been booted with systemd" in done.stderr or "Failed to connect" in done.stderr:
        raise SystemctlError(f"systemctl status {unit}: systemd is not running on this system (no PID 1 systemd)")
    return Status(done.returncode, text + done.stdout)


def ensure_user(user: str) -> None:
    """A system user with no login and no home of its own (its files are the state folder)."""
    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    command = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", HOME,
               "--shell", "/usr/sbin/nologin", user]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SbcrtError(f"cannot create the user {user!r}: {done.stderr.strip() or done.returncode}")
