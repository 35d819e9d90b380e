"""What a careless or hostile user does to the command line (issue #12): file names the locale cannot encode,
`service install` lines that `watch` would refuse at every restart, abbreviated and glued options, paths the
unit's PrivateTmp hides, an image with no service user, and Ctrl-C during `eval`. Real processes, real files,
the real systemd tools."""

from __future__ import annotations

import os
import pty
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service_helpers import barn_model, sbcrt_script, scratch_folder

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sbcrt" / "data" / "samples"


def sbcrt(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("SBCRT_MODEL", "SBCRT_HEARTBEAT")}
    return subprocess.run([sys.executable, "-m", "sbcrt", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=environment | (env or {}))  # fmt: skip


def exec_start(unit: str) -> list[str]:
    line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    return [word.replace("$$", "$").replace("%%", "%") for word in shlex.split(line.removeprefix("ExecStart="))]


def unit_settings(unit: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with scratch_folder() as folder:
        yield folder


@pytest.fixture(scope="module")
def barn(scratch: Path) -> Path:
    return barn_model(scratch / "models" / "barn.onnx")


@pytest.fixture(scope="module")
def install(scratch: Path) -> list[str]:
    """`service install --name pen3` with an sbcrt outside /tmp for the unit (this checkout's may be under /tmp,
    which install refuses: tested by test_a_venv_under_tmp_is_refused)."""
    return ["service", "install", "--name", "pen3", "--executable", str(sbcrt_script(scratch))]


# -- D6: a file name the locale cannot encode ------------------------------------------------------------------


@pytest.fixture(scope="module")
def en_gb_utf8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of Raspberry Pi OS's default locale, en_GB.UTF-8 (compiled into a private LOCPATH if the
    system lacks it). Not C.UTF-8: Python treats that one like C, whose stdout already escapes odd names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIO", "PYTHONUTF8"))}
    env |= {"LC_ALL": "en_GB.UTF-8"}
    probe = [sys.executable, "-c", "import sys, locale; locale.setlocale(locale.LC_ALL, ''); print(sys.stdout.errors)"]
    if subprocess.run(probe, capture_output=True, text=True, env=env).stdout.strip() != "strict":
        localedef = shutil.which("localedef")
        if localedef is None or not Path("/usr/share/i18n/locales/en_GB").is_file():
            pytest.skip("no en_GB.UTF-8 locale and no locale sources to build it (Debian package locales)")
        folder = tmp_path_factory.mktemp("locale")
        subprocess.run([localedef, "-i", "en_GB", "-f", "UTF-8", str(folder / "en_GB.UTF-8")], timeout=120)
        env["LOCPATH"] = str(folder)
    assert subprocess.run(probe, capture_output=True, text=True, env=env).stdout.strip() == "strict"
    return env


def test_a_file_name_invalid_in_the_locale_is_printed_and_the_rest_still_classified(
    tmp_path: Path, runtime_models: dict[str, Path], en_gb_utf8: dict[str, str]
) -> None:
    latin1 = os.fsencode(tmp_path) + b"/caf\xe9.png"  # a Latin-1 name: not valid UTF-8
    shutil.copy(SAMPLES / "chelsea.png", latin1)
    shutil.copy(SAMPLES / "coffee.png", tmp_path / "zz.png")
    env = en_gb_utf8
    command = [sys.executable, "-m", "sbcrt", "classify", str(tmp_path), "-m", str(runtime_models["tiny"]), "-k", "1"]
    done = subprocess.run(command, capture_output=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    # Both inputs classified, the odd name written back byte for byte (as `ls` shows it).
    assert [line.split(b": ")[0] for line in lines if b": " in line and not line.startswith(b"Speed")] == [
        latin1,
        os.fsencode(tmp_path / "zz.png"),
    ]
    as_json = subprocess.run([*command, "--json"], capture_output=True, timeout=120, env=env)
    assert as_json.returncode == 0 and as_json.stdout.count(b"\n") == 2, as_json.stderr


# -- D9, D12: install refuses what watch would refuse, in one line ---------------------------------------------


def test_install_refuses_every_line_watch_would_refuse_at_start_in_one_line(
    barn: Path, scratch: Path, install: list[str]
) -> None:
    good = ["watch", "0", "--model", str(barn), "--when", "fox>=0.6"]
    done = sbcrt(*install, "--dry-run", "--", *good)
    assert done.returncode == 0, done.stderr  # the refusals below are about what changed, not the rest
    refused = {
        ("--when", "fox>=2"): "the probability must be above 0 and at most 1",
        ("--when", "wolf>=0.5"): "the model has no class 'wolf'",
        ("--mqtt", "mqtt://broker:99999"): "the port must be a number from 1 to 65535",
        ("--save", str(scratch / "alerts"), "--save-max", "10XB"): "--save-max '10XB'",
        ("--mqtt-topic", "farm/pen3"): "need --mqtt URL",
        ("--fps", "2", "--stride", "3"): "use one",
        ("--threads", "0"): "must be at least 1",
        ("--modle", "x.onnx"): "unrecognized arguments: --modle",
    }
    for extra, message in refused.items():
        done = sbcrt(*install, "--dry-run", "--", *good, *extra)
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr)
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        # D12: one line, named after the command, not after the argv list argparse was handed.
        assert len(errors) == 1 and errors[0].startswith("sbcrt service: error: "), (extra, done.stderr)
        assert "['--'" not in done.stderr and "usage:" not in done.stderr and "Traceback" not in done.stderr
    stream = ["watch", "rtps://camera/stream", "--model", str(barn)]
    done = sbcrt(*install, "--dry-run", "--", *stream)
    assert done.returncode == 2 and "unsupported stream rtps://" in done.stderr, done.stderr
    missing = ["watch", "0", "--model", str(scratch / "models" / "gone.onnx")]
    done = sbcrt(*install, "--dry-run", "--", *missing)
    assert done.returncode == 2 and "gone.onnx: no such file" in done.stderr, done.stderr
    not_a_model = scratch / "models" / "notes.onnx"
    not_a_model.write_text("not a model\n")
    done = sbcrt(*install, "--dry-run", "--", "watch", "0", "--model", str(not_a_model))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    # The same lines are what `watch` itself refuses, with the same words (checked for two of them).
    for extra, message in [(("--when", "wolf>=0.5"), "no class 'wolf'"), (("--save-max", "10XB"), "10XB")]:
        watch = sbcrt(*good, "--save", str(scratch / "alerts"), *extra)
        assert watch.returncode == 2 and message in watch.stderr, watch.stderr


def test_install_nothing_is_written_for_a_refused_line_on_an_image(tmp_path: Path, scratch: Path, barn: Path) -> None:
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl is not installed")
    root = tmp_path / "image"
    exe = sbcrt_script(scratch, root)
    done = sbcrt("service", "install", "--name", "pen3", "--root", str(root), "--executable", str(exe), "--", "watch",
                 "0", "--model", str(barn), "--when", "fox>=0.6")  # fmt: skip
    # Under --root the model is the image's: this one exists only on the host.
    assert done.returncode == 2 and "no such file" in done.stderr, done.stderr
    assert not (root / "etc/systemd/system/sbcrt-pen3.service").exists()


# -- D10: glued and abbreviated options become absolute too ----------------------------------------------------


def test_glued_and_abbreviated_path_options_become_absolute(scratch: Path, barn: Path, install: list[str]) -> None:
    work = scratch / "d10"
    barn_model(work / "barn.onnx")
    (work / "labels.txt").write_text("hen\nfox\nrat\ncat\n")
    line = ["watch", "0", "-mbarn.onnx", "--lab", "labels.txt", "--heart", "hb/beat", "--json=out/r.jsonl",
            "--when", "fox>=0.6", "--save=alerts"]  # fmt: skip
    done = sbcrt(*install, "--dry-run", "--", *line, cwd=work)
    assert done.returncode == 0, done.stderr
    argv = exec_start(done.stdout)
    assert argv[argv.index("watch") :] == [
        "watch", "0", "-m", f"{work}/barn.onnx", "--labels", f"{work}/labels.txt", "--heartbeat",
        f"{work}/hb/beat", "--jsonl", f"{work}/out/r.jsonl", "--when", "fox>=0.6", "--save", f"{work}/alerts",
    ]  # fmt: skip
    written = unit_settings(done.stdout)["ReadWritePaths"].split()
    assert sorted(written) == sorted([f"{work}/hb", f"{work}/out", f"{work}/alerts"])


# -- D11: PrivateTmp hides /tmp from the service -----------------------------------------------------------------


def test_paths_under_tmp_are_refused_because_the_unit_hides_them(
    tmp_path: Path, barn: Path, install: list[str]
) -> None:
    hidden = barn_model(tmp_path / "barn.onnx")
    done = sbcrt(*install, "--dry-run", "--", "watch", "0", "--model", str(hidden))
    assert done.returncode == 2 and str(hidden) in done.stderr and "PrivateTmp" in done.stderr, done.stderr
    done = sbcrt(*install, "--dry-run", "--", "watch", "0", "--model", str(barn),
                 "--jsonl", "/var/tmp/pen3.jsonl")  # fmt: skip
    assert done.returncode == 2 and "/var/tmp" in done.stderr and "PrivateTmp" in done.stderr, done.stderr


def test_a_venv_under_tmp_is_refused(tmp_path: Path, barn: Path) -> None:
    """The sbcrt the unit runs is the installing one: a venv under /tmp is invisible to the service."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), *site])}
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "sbcrt", "service", "install", "--name", "pen3", "--dry-run", "--",
                           "watch", "0", "--model", str(barn)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})  # fmt: skip
    assert done.returncode == 2 and str(python) in done.stderr and "PrivateTmp" in done.stderr, done.stderr


# -- D14: an image gets the service user at its first boot -----------------------------------------------------


def test_an_image_gets_a_sysusers_entry_that_creates_the_service_user(tmp_path: Path, scratch: Path) -> None:
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl is not installed")
    root = tmp_path / "image"
    model = Path("/opt/models/barn.onnx")
    barn_model(root / model.relative_to("/"))
    exe = sbcrt_script(scratch, root)
    done = sbcrt("service", "install", "--name", "pen3", "--root", str(root), "--executable", str(exe), "--", "watch",
                 "0", "--model", str(model), "--when", "fox>=0.6", "--jsonl", "/srv/pen3/out.jsonl")  # fmt: skip
    assert done.returncode == 0, done.stderr
    unit = (root / "etc/systemd/system/sbcrt-pen3.service").read_text()
    user = unit_settings(unit)["User"]
    entry = root / "usr/lib/sysusers.d/sbcrt-pen3.conf"
    assert entry.is_file() and f"u {user} " in entry.read_text(), done.stdout
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed (Debian package systemd)")
    # What the image's first boot does: systemd-sysusers reads the entry and creates the user.
    created = subprocess.run([sysusers, f"--root={root}"], capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    assert user in passwd and passwd[user][6] == "/usr/sbin/nologin" and int(passwd[user][2]) < 1000
    if "SupplementaryGroups=video" in unit:
        groups = {line.split(":")[0]: line.split(":")[3] for line in (root / "etc/group").read_text().splitlines()}
        assert user in groups["video"].split(","), groups
    done = sbcrt("service", "uninstall", "--name", "pen3", "--root", str(root))
    assert done.returncode == 0 and not entry.exists(), done.stderr


# -- eval interrupted ---------------------------------------------------------------------------------------------


def test_eval_interrupted_prints_the_summary_of_what_it_evaluated(
    tmp_path: Path, runtime_models: dict[str, Path]
) -> None:
    """Ctrl-C during a long evaluation: the figures so far, marked interrupted, exit 130. The progress bar
    (drawn when stderr is a terminal: a pty here) says when the evaluation is under way."""
    total = 400
    for label in ("ant", "bee"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(total // 2):
            os.link(SAMPLES / "chelsea.png", tmp_path / "photos" / label / f"{i:03}.png")
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "sbcrt", "eval", str(tmp_path / "photos"), "-m", str(runtime_models["tiny"])],
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    while b"] 3/" not in seen and time.monotonic() < deadline and process.poll() is None:
        if select.select([master], [], [], 1)[0]:
            seen += os.read(master, 4096)
    assert b"] 3/" in seen, seen
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    os.close(master)
    assert process.returncode == 130, out
    first = out.splitlines()[0]
    evaluated = int(first.split()[0])
    assert 3 <= evaluated < total and "INTERRUPTED" in first, out
    assert "top-1" in out and f"({evaluated} " not in first  # the figures are of the images done so far
    assert f"/{evaluated})" in out, out


# -- export on a runtime-only install (issue #13 item 1) ----------------------------------------------------------


def runtime_only_site(folder: Path, *, drop: tuple[str, ...]) -> Path:
    """This venv's packages minus `drop` (by top-level name): what a Pi's runtime-only install holds."""
    site = next(Path(p) for p in sys.path if p.endswith("site-packages") and (Path(p) / "numpy").is_dir())
    folder.mkdir()
    for entry in site.iterdir():
        if entry.name.split("-")[0].split(".")[0].lower() not in drop and not entry.name.endswith(".pth"):
            (folder / entry.name).symlink_to(entry)
    return folder


def test_export_without_torch_says_what_to_install_and_other_import_errors_show_as_themselves(
    tmp_path: Path,
) -> None:
    site = runtime_only_site(tmp_path / "site", drop=("torch", "torchgen", "functorch"))
    command = [sys.executable, "-S", "-m", "sbcrt", "export", "sbcformer_xs", "--random-init", "-o",
               str(tmp_path / "m.onnx")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and 'pip install "sbcrt[export]"' in done.stderr, done.stderr
    assert "(torch is missing)" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    # A broken dependency (here onnx importing a module that does not exist) is not "install the extra":
    # its own traceback names it.
    broken = tmp_path / "broken"
    (broken / "onnx").mkdir(parents=True)
    (broken / "onnx" / "__init__.py").write_text("import sbcrt_no_such_module\n")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(broken), str(site)])
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and "No module named 'sbcrt_no_such_module'" in done.stderr, done.stderr
    assert "sbcrt[export]" not in done.stderr
