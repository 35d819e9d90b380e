"""What the benchmarks share: the machine they ran on, and (from tests/support) the shared photos and the key
under which exports are cached."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from tests.support.data import REPO, export_cache_key, shared_photos

__all__ = ["REPO", "BUILD", "export_cache_key", "machine_info", "shared_photos"]

BUILD = REPO / "build" / "benchmarks"
VERSIONS = {"onnxruntime": "onnxruntime", "torch": "torch", "numpy": "numpy", "opencv": "opencv-python-headless",
            "openvino": "openvino"}  # fmt: skip


def machine_info() -> dict[str, Any]:
    """The CPU and the versions a measurement depends on (written next to every benchmark's figures)."""
    from sbcrt.runtime.session import cpu_info, physical_cores

    cpu = cpu_info()
    info: dict[str, Any] = {
        "cpu": cpu.model,
        "machine": platform.machine(),
        "physical_cores": physical_cores(),
        "features": cpu.notable_features,
    }
    for key, package in VERSIONS.items():
        try:
            info[key] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[key] = None
    return info


def photos(limit: int | None = None, folder: Path | None = None) -> list[Path]:
    """The shared photos (or `folder`'s JPEGs), sorted, the first `limit`."""
    found = sorted((folder or shared_photos()).glob("*.JPEG"))
    return found[:limit] if limit is not None else found
