"""The lock files (tools/lock.py, `make lock`): current with their inputs, the same versions and files on every
platform, and the venv these tests run in is exactly the x86 lock. Offline: a new upstream release changes nothing
here, only a change to setup.cfg's requirements, pyproject.toml's build requirements or constraints.in does."""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

import pytest

from tools import lock

REPO = Path(__file__).resolve().parents[1]
X86, RUNTIME, ARM64_TEST = (REPO / entry.path for entry in lock.LOCKS)


@pytest.fixture(scope="module")
def pins() -> dict[Path, dict[str, tuple[str, frozenset[str]]]]:
    return {path: lock.read_lock(path) for path in (X86, RUNTIME, ARM64_TEST)}


def test_the_lock_files_match_their_inputs() -> None:
    assert lock.stale() == [], "the lock is stale: run `make lock` and commit the lock files"


def copy_inputs(folder: Path) -> Path:
    for name in ("setup.cfg", "pyproject.toml", "constraints.in"):
        shutil.copy(REPO / name, folder / name)
    return folder


def test_a_changed_requirement_or_pin_stales_the_lock_and_nothing_else_does(tmp_path: Path) -> None:
    """The digest the check compares covers what the lock is compiled from, and only that."""
    current = lock.input_digest(REPO)
    assert lock.input_digest(copy_inputs(tmp_path)) == current
    setup = tmp_path / "setup.cfg"
    setup.write_text(setup.read_text().replace("description = ", "description = Now "))  # packaging, not deps
    assert lock.input_digest(tmp_path) == current
    setup.write_text(setup.read_text().replace("paho-mqtt>=2.0,<3", "paho-mqtt>=2.1,<3"))
    assert lock.input_digest(tmp_path) != current
    copy_inputs(tmp_path)
    constraints = tmp_path / "constraints.in"
    constraints.write_text(constraints.read_text() + "numpy<2.5\n")
    assert lock.input_digest(tmp_path) != current
    copy_inputs(tmp_path)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"setuptools>=68"', '"setuptools>=70"'))
    assert lock.input_digest(tmp_path) != current


def test_every_package_is_pinned_with_hashes(pins: dict) -> None:
    for path, locked in pins.items():
        assert locked, path
        for name, (version, hashes) in locked.items():
            assert version and hashes and all(h.startswith("sha256:") for h in hashes), (path.name, name)


def test_the_platforms_share_versions_and_files(pins: dict) -> None:
    """aarch64 installs what x86 was tested with: same versions, the same files' hashes (uv hashes every file
    of a version, so the x86 lock also lists the aarch64 wheels)."""
    x86 = pins[X86]
    for path in (RUNTIME, ARM64_TEST):
        for name, entry in pins[path].items():
            assert name in x86 and entry == x86[name], f"{path.name}: {name} {entry[0]}, x86 {x86.get(name, ('-',))[0]}"
    assert pins[RUNTIME].keys() <= pins[ARM64_TEST].keys()
    # The runtime set is torch-free and test-free: what the image carries.
    assert not pins[RUNTIME].keys() & {"torch", "onnx", "pytest", "pip", "setuptools", "uv"}
    assert {"onnxruntime", "numpy", "pillow", "opencv-python-headless"} <= pins[RUNTIME].keys()


def test_torch_is_the_cpu_build() -> None:
    """PyPI's x86 torch is a CUDA build pulling gigabytes of nvidia-* wheels; the lock holds the CPU-only one."""
    x86 = lock.read_lock(X86)
    version, hashes = x86["torch"]
    assert version.endswith("+cpu") and len(hashes) == 1, (version, hashes)
    assert not [name for name in x86 if name.startswith("nvidia-") or name == "triton"]


def test_the_venv_is_exactly_the_x86_lock() -> None:
    """`make setup` installs requirements.lock and nothing else (then sbcrt itself, editable)."""
    installed = {lock.canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    installed.pop("sbcrt", None)
    locked = {name: version for name, (version, _) in lock.read_lock(X86).items()}
    names = sorted(installed.keys() | locked.keys())
    differences = [f"{n}: installed {installed.get(n)}, locked {locked.get(n)}" for n in names
                   if installed.get(n) != locked.get(n)]  # fmt: skip
    assert not differences, f"the venv is not requirements.lock (rm -rf .venv; make setup): {differences}"


def test_lock_files_that_are_not_pinned_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.lock"
    bad.write_text("numpy>=2 \\\n    --hash=sha256:00\n")
    with pytest.raises(lock.LockError, match="not pinned"):
        lock.read_lock(bad)
