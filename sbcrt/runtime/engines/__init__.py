"""Inference engines behind `Classifier`: onnxruntime (everywhere) and ncnn (optional; chosen on ARM).

An engine opens one model file and runs (N, 3, H, W) float32 batches; preprocessing, labels and everything
else stay the Classifier's, so both engines see the same tensor. `open_engine` picks one:

- `onnxruntime`: the .onnx file (a .ncnn path means the .onnx beside it).
- `ncnn`: the .ncnn file `sbcrt export --engine ncnn` writes beside the .onnx (a .onnx path means that one).
- `auto` (the default): ncnn on aarch64 when the .ncnn file is there and the ncnn package is installed, else
  onnxruntime. Why: on a Pi's Cortex-A72/A76 ncnn's NEON kernels execute 0.48-0.80x the instructions of
  onnxruntime's CPU provider on the same models (README, "ARM"); on x86 onnxruntime's NCHWc kernels are the
  faster ones, so ncnn is only there when asked for.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sbcrt.errors import SettingError, UsageError
from sbcrt.runtime.ncnn_file import SUFFIX as NCNN_SUFFIX
from sbcrt.runtime.session import SessionInfo

if TYPE_CHECKING:  # numpy only for the annotations: the CLI's argument parsers import ENGINES
    import numpy as np

ENGINE_NAMES = ("onnxruntime", "ncnn")  # the engines; `sbcrt export --engine` writes a file for either
ENGINES = ("auto", *ENGINE_NAMES)  # what a run may ask for
NCNN_NEEDS = 'the ncnn engine needs the ncnn package: pip install "sbcrt[ncnn]"'
# Machines where `auto` prefers ncnn (a Raspberry Pi 4/5 and other 64-bit ARM boards).
NCNN_FIRST = ("aarch64", "arm64")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output as the engine declares it: name, ONNX-style type ("tensor(float)") and shape (an int
    per fixed dimension, a str or None for a dynamic one)."""

    name: str
    type: str
    shape: list


class Engine(Protocol):
    name: str  # "onnxruntime" or "ncnn"
    path: Path  # the file it runs
    info: SessionInfo
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, str]  # the sbcrt metadata (ONNX metadata_props), {} for a model without it

    def run(self, tensor: np.ndarray) -> np.ndarray:
        """The first output for a (N, 3, H, W) batch of the input's dtype."""
        ...


def ncnn_available() -> bool:
    return importlib.util.find_spec("ncnn") is not None


def resolve(
    model: Path, engine: str = "auto", *, machine: str | None = None, have_ncnn: bool | None = None
) -> tuple[str, Path]:
    """(engine name, file) for `model` and the requested engine. `machine` and `have_ncnn` default to this
    process's (benchmarks/arm_count.py asks on behalf of the emulated Pi). Raises UsageError (one line)."""
    if engine not in ENGINES:
        raise UsageError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    model = Path(model)
    is_ncnn = model.suffix == NCNN_SUFFIX
    onnx_file = model.with_suffix(".onnx") if is_ncnn else model
    ncnn_file = model if is_ncnn else model.with_suffix(NCNN_SUFFIX)
    if engine == "auto":
        machine = (machine or platform.machine()).lower()
        if is_ncnn:
            engine = "ncnn"
        elif machine in NCNN_FIRST and ncnn_file.is_file():
            have = ncnn_available() if have_ncnn is None else have_ncnn
            engine = "ncnn" if have else "onnxruntime"
        else:
            engine = "onnxruntime"
    if engine == "onnxruntime":
        if is_ncnn and not onnx_file.is_file():
            raise UsageError(f"model {model}: an ncnn model; onnxruntime needs the .onnx file ({onnx_file} is missing)")
        return engine, onnx_file
    if not ncnn_file.is_file() and not is_ncnn:
        raise SettingError(
            "engine",
            f"model {model}: no ncnn model beside it ({ncnn_file.name}); export the model with {{engine}} ncnn too",
            engine,
            cites=["engine"],
        )
    return "ncnn", ncnn_file


def open_engine(
    model: str | os.PathLike,
    *,
    engine: str = "auto",
    threads: int | None = None,
    spin: bool = True,
    cache_dir: str | os.PathLike | None | bool = None,
    providers: list[str] | None = None,
    fp16: bool = False,
) -> Engine:
    """The engine `engine` names (see the module doc) for `model`, ready to run. Raises UsageError."""
    name, path = resolve(Path(model), engine)
    if name == "onnxruntime":
        if fp16:
            raise UsageError("fp16 is an ncnn engine option (onnxruntime runs the model's own precision)")
        from sbcrt.runtime.engines.onnxruntime import OnnxruntimeEngine

        return OnnxruntimeEngine(path, threads=threads, spin=spin, cache_dir=cache_dir, providers=providers)
    if providers:
        raise UsageError("onnxruntime providers do not apply to the ncnn engine")
    if not ncnn_available():
        raise UsageError(f"{NCNN_NEEDS} (model {path})")
    from sbcrt.runtime.engines.ncnn import NcnnEngine

    return NcnnEngine(path, threads=threads, spin=spin, fp16=fp16, source=Path(model))
