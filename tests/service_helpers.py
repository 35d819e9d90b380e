"""A folder outside /tmp and a small real model, for `sbcrt service` tests: install loads the model as `watch`
would (a missing one is refused) and refuses paths under /tmp (the unit's PrivateTmp=yes hides them)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import build_onnx

SERVICE_SCRATCH = Path("/dev/shm")  # a tmpfs that PrivateTmp does not hide


@contextmanager
def scratch_folder() -> Iterator[Path]:
    if not SERVICE_SCRATCH.is_dir():
        pytest.skip(f"no {SERVICE_SCRATCH}: the service tests need a folder outside /tmp")
    folder = Path(tempfile.mkdtemp(prefix="sbcrt-service-", dir=SERVICE_SCRATCH))
    folder.chmod(0o755)  # the user nobody must read the model (test_not_root_is_told_to_use_sudo)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def barn_model(path: Path) -> Path:
    """A small real model whose classes include "fox"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return build_onnx(path, "conv", config={"architecture": "barn", "labels": ["hen", "fox", "rat", "cat"]})


def sbcrt_script(folder: Path, root: Path | None = None) -> Path:
    """An executable sbcrt outside /tmp, for `service install --executable`: by default a unit runs the installing
    checkout's sbcrt, which install refuses when the checkout is under /tmp (PrivateTmp hides it), so the tests
    name this one and pass wherever the repo is. Under `root` the same path is made inside the image as well:
    install checks it there, systemd-analyze on this machine checks it here."""
    script = folder / "bin" / "sbcrt"
    for path in [script] if root is None else [script, root / script.relative_to("/")]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'#!/bin/sh\nexec {sys.executable} -m sbcrt "$@"\n')
        path.chmod(0o755)
    return script
