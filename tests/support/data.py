"""Where the shared photos are, and the key of cached exports: the same answer for tests and benchmarks."""

from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """The shared data folder: $SBCRT_SHARED, else ../shared beside the checkout (it holds data/, spec/)."""
    return Path(os.environ.get("SBCRT_SHARED") or REPO.parent / "shared")


def shared_photos() -> Path:
    """The 250 shared ImageNet photos (read in place, never copied)."""
    return shared_dir() / "data" / "imagenet-samples"


def export_cache_key(*extra: str) -> str:
    """12 hex digits that change whenever an exported file could: the export and model code, the metadata format
    the files carry, the locked versions and the installed torch/onnx, and what the caller adds (e.g. the
    calibration count)."""
    sources = sorted((REPO / "sbcrt" / "export").glob("*.py")) + sorted((REPO / "sbcrt" / "models").glob("*.py"))
    digest = hashlib.sha256()
    for path in [*sources, REPO / "sbcrt" / "runtime" / "metadata.py", REPO / "requirements.lock"]:
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    for package in ("torch", "onnx", "onnxruntime"):
        try:
            digest.update(f"{package}=={metadata.version(package)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{package} missing".encode())
    for part in extra:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:12]
