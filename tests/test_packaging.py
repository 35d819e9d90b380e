"""The wheel setup.cfg describes, built for real by the locked setuptools: every module and data file of sbcrt/ is
in it, and the build says nothing (setuptools warned ~80 lines per install when the data folders were left out
of `packages`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = {
    "sbcrt/data/imagenet_classes.txt",
    "sbcrt/data/samples/chelsea.png",
    "sbcrt/data/samples/coffee.png",
    "sbcrt/data/samples/SOURCES.md",
    "sbcrt/watch/page/index.html",
}


def test_the_wheel_holds_every_module_and_data_file_and_the_build_is_quiet(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy: building in the checkout would leave build/ and *.egg-info there
    shutil.copytree(REPO / "sbcrt", source / "sbcrt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("sbcrt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "sbcrt").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert names >= DATA, sorted(DATA - names)
    packaged = {n for n in names if n.startswith("sbcrt/")}
    assert packaged == modules | DATA, sorted(packaged - modules - DATA)  # nothing else, e.g. no __pycache__
