"""What the benchmarks share: the machine they ran on, and (from tests/support) the shared photos and the key
under which exports are cached."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tests.support.data import REPO, export_cache_key, shared_photos

__all__ = ["BUILD", "REPO", "SelfTimed", "export_cache_key", "machine_info", "photos", "shared_photos", "take_turns"]

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


@dataclass(frozen=True)
class SelfTimed:
    """A run that times `n` iterations itself (e.g. in a worker process) and returns their times in ms."""

    time_ms: Callable[[int], list[float]]


def take_turns(
    runs: dict[str, Callable[[int], object] | SelfTimed],
    turns: int,
    *,
    block: int = 1,
    untimed: int = 0,
    warmup: int = 0,
    settle_s: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Times `runs` taking turns, so a busy machine's slow spells hit them all alike (their ratios stay
    meaningful when absolute times wander). First `warmup` untimed calls of each (lazy imports, allocators);
    then `turns` rounds in which each run, in order, gets a `settle_s` pause (the previous run's idle threads
    stop spinning), `untimed` calls (they absorb the switch: caches, thread wake-up) and `block` timed calls.
    Each call gets the turn's index (which frame to use, say). `clock` may be time.thread_time, for CPU time when
    all work stays on the calling thread. Returns the times in ms per run."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        for _ in range(warmup):
            run.time_ms(1) if isinstance(run, SelfTimed) else run(0)
    for turn in range(turns):
        for name, run in runs.items():
            if settle_s:
                time.sleep(settle_s)
            if isinstance(run, SelfTimed):
                if untimed:
                    run.time_ms(untimed)
                times[name] += run.time_ms(block)
                continue
            for _ in range(untimed):
                run(turn)
            for _ in range(block):
                start = clock()
                run(turn)
                times[name].append((clock() - start) * 1000)
    return times
