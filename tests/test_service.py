"""`sbcrt service`: the unit it renders (checked by `systemd-analyze verify`), the quoting of the command line,
names it refuses, and install/status/uninstall with the real systemctl: offline on an image root (--root), and on
the live system, where a systemctl that cannot work (no running systemd) is one clear line, not a traceback."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sbcrt.commands.service import prepare
from sbcrt.errors import UsageError
from sbcrt.service import ServiceSpec, check_name, hidden_by_private_tmp, render_unit, systemd_quote
from tests.service_helpers import barn_model, sbcrt_script, scratch_folder


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with scratch_folder() as folder:
        yield folder


@pytest.fixture(scope="module")
def WATCH(scratch: Path) -> list[str]:  # noqa: N802 (was a constant; a fixture now that the model must exist)
    model = barn_model(scratch / "opt/models/barn.onnx")
    return ["watch", "0", "--model", str(model), "--when", "fox>=0.6", "--mqtt", "mqtt://broker.local"]


@pytest.fixture(scope="module")
def exe(scratch: Path) -> Path:
    """The sbcrt the units run (--executable): one outside /tmp, wherever this checkout is."""
    return sbcrt_script(scratch)


def sbcrt(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "SBCRT_MODEL"} | (env or {})
    return subprocess.run([sys.executable, "-m", "sbcrt", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=environment)  # fmt: skip


def exec_start(unit: str) -> list[str]:
    """ExecStart's words as systemd hands them to the process: C-style quoting (shlex's POSIX rules agree for
    what systemd_quote emits), then `$$` -> `$` and `%%` -> `%`."""
    line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    return [word.replace("$$", "$").replace("%%", "%") for word in shlex.split(line.removeprefix("ExecStart="))]


def verify(unit_text: str, folder: Path, name: str = "sbcrt-test.service") -> str:
    """`systemd-analyze verify` on the unit: its complaints (empty when the unit is clean)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    path = folder / name
    path.write_text(unit_text)
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).strip() + ("" if done.returncode == 0 else f"\n(exit {done.returncode})")


def test_dry_run_prints_a_unit_systemd_accepts(tmp_path: Path, exe: Path, WATCH: list[str]) -> None:  # noqa: N803
    done = sbcrt("service", "install", "--name", "pen3", "--dry-run", "--executable", str(exe), "--", *WATCH,
                 "--jsonl", "/srv/pen3/out.jsonl", "--save", "/srv/pen3/alerts")  # fmt: skip
    assert done.returncode == 0, done.stderr
    unit = done.stdout
    assert verify(unit, tmp_path, "sbcrt-pen3.service") == ""
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["Restart"] == "always" and settings["RestartSec"] == "5" and settings["User"] == "sbcrt"
    assert settings["StandardOutput"] == "journal" and settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict" and settings["WorkingDirectory"] == "/var/lib/sbcrt/pen3"
    assert settings["ReadWritePaths"] == "/srv/pen3 /srv/pen3/alerts"
    assert settings["WantedBy"] == "multi-user.target" and settings["After"] == "network-online.target"
    argv = exec_start(unit)
    assert argv[0] == str(exe)
    assert argv[argv.index("watch") :] == [*WATCH, "--jsonl", "/srv/pen3/out.jsonl", "--save", "/srv/pen3/alerts"]


def test_awkward_arguments_reach_sbcrt_unchanged(tmp_path: Path, scratch: Path, exe: Path) -> None:
    awkward = ["my models/barn.onnx", 'say "hi"', "back\\slash", "100%", "$HOME", "it's", "", ";", "tab\there"]
    for word in awkward:
        assert exec_start(f"ExecStart=/bin/echo {systemd_quote(word)}")[1:] == [word], word
    cwd = scratch / "opt/sbcrt"
    barn_model(cwd / "my models/barn.onnx")
    line = ["watch", "pens/*.jpg", "--model", "my models/barn.onnx", "--mqtt-topic", "farm/pen 3$", "--mqtt",
            "mqtt://broker", "--jsonl", "out dir/x.jsonl"]  # fmt: skip
    spec = prepare("pen3", line, user="sbcrt", cwd=cwd, executable=exe)
    unit = render_unit(spec)
    assert verify(unit, tmp_path) == ""
    argv = exec_start(unit)
    # (--mqtt: watch refuses --mqtt-topic without it, and so does install now.)
    # Relative paths became absolute: the service runs in its state folder, not where install was typed.
    expected = ["watch", f"{cwd}/pens/*.jpg", "--model", f"{cwd}/my models/barn.onnx", "--mqtt-topic",
                "farm/pen 3$", "--mqtt", "mqtt://broker", "--jsonl", f"{cwd}/out dir/x.jsonl"]  # fmt: skip
    assert argv[argv.index("watch") :] == expected
    assert f'ReadWritePaths="{cwd}/out dir"' in unit


def test_verify_is_a_real_check(tmp_path: Path) -> None:
    # The check above can fail: systemd-analyze does reject a unit with broken quoting or an unknown setting.
    assert "Unbalanced quoting" in verify('[Service]\nExecStart=/bin/echo "open\n', tmp_path)
    assert "Unknown key" in verify("[Service]\nExecStart=/bin/true\nRestartEverySoOften=1\n", tmp_path)


def test_refuses_bad_names_and_command_lines(tmp_path: Path, WATCH: list[str]) -> None:  # noqa: N803
    for bad in ("pen 3", "../pen3", "pen3@x", "", "-pen3", "a" * 65, "pen3/x"):
        with pytest.raises(UsageError):
            check_name(bad)
    check_name("pen3.barn_B-2")
    done = sbcrt("service", "install", "--name", "pen 3", "--dry-run", "--", *WATCH)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "letters, digits" in done.stderr
    done = sbcrt("service", "install", "--name", "pen3", "--dry-run", "--", "classify", "x.jpg")
    assert done.returncode == 2 and "after --: sbcrt service install" in done.stderr
    done = sbcrt("service", "install", "--name", "pen3", "--dry-run", "--", "watch", "0", "--modle", "x.onnx")
    assert done.returncode == 2 and "unrecognized arguments: --modle" in done.stderr
    done = sbcrt("service", "install", "--name", "pen3", "--dry-run", "--", "watch", "0")
    assert done.returncode == 2 and "needs --model" in done.stderr


def test_install_status_uninstall_on_an_image_root(
    tmp_path: Path,
    scratch: Path,
    WATCH: list[str],  # noqa: N803
) -> None:
    """--root: what an image build does; systemctl --root enables the unit offline, for real."""
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl is not installed")
    root = tmp_path / "image"
    barn_model(root / Path(WATCH[3]).relative_to("/"))  # the model the unit names is the image's
    exe = sbcrt_script(scratch, root)
    done = sbcrt("service", "install", "--name", "pen3", "--root", str(root), "--executable", str(exe), "--", *WATCH,
                 "--jsonl", "/srv/x.jsonl")  # fmt: skip
    assert done.returncode == 0, done.stderr
    unit = root / "etc/systemd/system/sbcrt-pen3.service"
    wants = root / "etc/systemd/system/multi-user.target.wants/sbcrt-pen3.service"
    assert unit.is_file() and wants.is_symlink() and verify(unit.read_text(), tmp_path, unit.name) == ""
    status = sbcrt("service", "status", "--name", "pen3", "--root", str(root))
    assert status.returncode == 0 and "sbcrt-pen3.service: enabled" in status.stdout, status.stdout + status.stderr
    done = sbcrt("service", "uninstall", "--name", "pen3", "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert not unit.exists() and not wants.is_symlink()
    status = sbcrt("service", "status", "--name", "pen3", "--root", str(root))
    assert status.returncode == 4 and "not installed" in status.stdout
    again = sbcrt("service", "uninstall", "--name", "pen3", "--root", str(root))
    assert again.returncode == 2 and "not installed" in again.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="installing on the live system needs root")
def test_live_install_says_in_one_line_when_systemctl_cannot_work(
    tmp_path: Path,
    scratch: Path,
    exe: Path,
    WATCH: list[str],  # noqa: N803
) -> None:
    """On the live system sbcrt runs the real systemctl. Where systemd cannot do it (this container has no PID 1
    systemd; elsewhere the unit folder is not one systemd reads) install fails in one line and says where the
    unit is."""
    units = tmp_path / "units"
    env = {"SBCRT_SYSTEMD_UNIT_DIR": str(units)}
    done = sbcrt("service", "install", "--name", "pen3", "--user", "root", "--executable", str(exe), "--", *WATCH,
                 "--jsonl", str(scratch / "out/pen3.jsonl"), env=env)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and re.search(r"systemctl .* failed: .*; the unit is written to", errors[0]), done.stderr
    assert "Traceback" not in done.stderr and (units / "sbcrt-pen3.service").is_file()
    assert (scratch / "out").is_dir()  # the folders the service writes were prepared for its user


def test_not_root_is_told_to_use_sudo(WATCH: list[str]) -> None:  # noqa: N803
    runuser = shutil.which("runuser")
    if os.geteuid() == 0 and runuser is None:
        pytest.skip("cannot drop root here (no runuser)")
    command = [sys.executable, "-m", "sbcrt", "service", "install", "--name", "pen3", "--", *WATCH]
    if os.geteuid() == 0:
        command = [runuser, "-u", "nobody", "--", *command]
        probe = subprocess.run([runuser, "-u", "nobody", "--", sys.executable, "-c", "import sbcrt"],
                               capture_output=True, timeout=60, cwd="/")  # fmt: skip
        if probe.returncode != 0:
            pytest.skip("this Python is not readable by the user nobody")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "sbcrt service: error: sbcrt service install needs root: run it with sudo (or use --dry-run to see the unit)"
    )


def test_the_executable_is_checked_like_a_path_the_unit_reads(scratch: Path, WATCH: list[str]) -> None:  # noqa: N803
    """--executable (the tests' way to run anywhere) keeps install's checks: under /tmp the unit could not see it,
    a missing or non-executable file would fail every start; a relative one is made absolute."""
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # /tmp itself, whatever $TMPDIR says
        under_tmp = sbcrt_script(Path(folder))
        done = sbcrt("service", "install", "--name", "pen3", "--dry-run", "--executable", str(under_tmp), "--", *WATCH)
    assert done.returncode == 2 and f"{under_tmp}: under /tmp" in done.stderr and "PrivateTmp" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    missing = scratch / "bin" / "gone"
    not_executable = scratch / "bin" / "plain"
    not_executable.write_text("#!/bin/sh\n")
    for path in (missing, not_executable, scratch):
        done = sbcrt("service", "install", "--name", "pen3", "--dry-run", "--executable", str(path), "--", *WATCH)
        assert done.returncode == 2 and f"--executable {path}: not an executable file" in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
    exe = sbcrt_script(scratch)
    done = sbcrt("service", "install", "--name", "pen3", "--dry-run", "--executable", "bin/sbcrt", "--", *WATCH,
                 cwd=scratch)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert exec_start(done.stdout)[0] == str(exe)


def test_dot_dot_does_not_walk_past_the_private_tmp_check() -> None:
    """A path that reaches /tmp or /var/tmp through `..` is as hidden from the unit as one that names it."""
    via_var, via_srv, kept = Path("/var/../tmp/barn.onnx"), Path("/srv/x/../../var/tmp/out"), Path("/var/lib/sbcrt")
    spec = ServiceSpec("pen3", ["watch"], reads=[via_var, kept], writable=[via_srv])
    assert hidden_by_private_tmp(spec) == [via_var, via_srv]
