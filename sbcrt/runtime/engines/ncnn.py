"""The ncnn engine: an .ncnn model file (sbcrt/runtime/ncnn_file.py) run by ncnn from PyPI (`sbcrt[ncnn]`).

ncnn's ARM kernels (direct NEON depthwise convolutions, packed GEMMs, little per-layer overhead) execute
0.48-0.80x the instructions of onnxruntime's CPU provider on a Pi (README, "ARM"). Here it runs the model exactly
as it was verified against PyTorch at export: fp32 storage and arithmetic, unless fp16 is asked for and the CPU
has half-precision arithmetic (asimdhp: a Pi 5's Cortex-A76, not a Pi 4's A72).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from sbcrt.errors import SettingError, UsageError
from sbcrt.runtime.engines import TensorSpec
from sbcrt.runtime.ncnn_file import NcnnModel, source_digest
from sbcrt.runtime.session import SessionInfo, cpu_info, physical_cores

FP16_OPTIONS = ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic")
FP16_FEATURE = "asimdhp"  # ARMv8.2 half-precision arithmetic (Pi 5)


def fp16_supported() -> bool:
    return FP16_FEATURE in cpu_info().features


class NcnnEngine:
    name = "ncnn"

    def __init__(
        self,
        path: Path,
        *,
        threads: int | None = None,
        spin: bool = True,
        fp16: bool = False,
        source: Path | None = None,
        model: NcnnModel | None = None,
    ) -> None:
        """`source`: the path the user named; when it is the .onnx file, the .ncnn beside it must have been
        converted from exactly that file. `model`: an already-read model (the export's check of its bytes)."""
        started = time.perf_counter()
        self.path = path
        threads = physical_cores() if threads is None else threads
        if threads < 1:
            raise UsageError(f"threads must be at least 1, not {threads}")
        notes: list[str] = []
        # Not kept: ncnn copies the weights as it loads them, and a Pi should not hold a second copy (55 MB on B).
        model = NcnnModel.read(path) if model is None else model
        if source is not None and source.suffix == ".onnx" and source.is_file():
            self._check_source(source, model)
        digest_ms = (time.perf_counter() - started) * 1000
        if fp16 and not fp16_supported():
            notes.append(f"fp16 asked for, but this CPU has no half-precision arithmetic ({FP16_FEATURE}): fp32")
            fp16 = False
        self.fp16 = fp16
        self.net = load_net(model, path, threads=threads, spin=spin, fp16=fp16)
        import ncnn

        self._mat = ncnn.Mat
        self._input_name, self._output_name = model.input_name, model.output_name
        self.inputs = [TensorSpec(model.input_name, "tensor(float)", list(model.input_shape))]
        self.outputs = [TensorSpec(model.output_name, "tensor(float)", list(model.output_shape))]
        self.metadata = dict(model.metadata)
        load_ms = (time.perf_counter() - started) * 1000
        providers = [f"ncnn {ncnn.__version__} {'fp16' if fp16 else 'fp32'}"]
        self.info = SessionInfo(providers, threads, spin, None, False, load_ms, notes, digest_ms)

    def _check_source(self, source: Path, model: NcnnModel) -> None:
        size, digest = source_digest(source)
        if (size, digest) != (model.source_size, model.source_sha256):
            raise SettingError(
                "engine",
                f"model {self.path} was not converted from {source} (that file changed since): export both again "
                "with {engine} ncnn, or run the .onnx alone with {engine} onnxruntime",
                "ncnn",
                cites=["engine"],
            )

    def run(self, tensor: np.ndarray) -> np.ndarray:
        # Per image: a new extractor (ncnn keeps every blob it computed in one), the input as an ncnn Mat that
        # shares the array's memory (no copy), extract. Kept to a few calls: on a Pi this wrapper is the only
        # work beyond ncnn's own (~70-100 K instructions per inference, 0.02-0.05 % of Lite0's).
        batch = (
            tensor
            if tensor.dtype == np.float32 and tensor.flags.c_contiguous
            else np.ascontiguousarray(tensor, dtype=np.float32)
        )
        rows = [self._one(image) for image in batch]
        return rows[0][None] if len(rows) == 1 else np.stack(rows)

    def _one(self, image: np.ndarray) -> np.ndarray:
        extractor = self.net.create_extractor()
        extractor.input(self._input_name, self._mat(image))
        status, out = extractor.extract(self._output_name)
        if status != 0:
            raise RuntimeError(f"ncnn could not run {self.path} (extract returned {status})")
        return np.array(out).reshape(-1)


def load_net(model: NcnnModel, path: Path, *, threads: int, spin: bool, fp16: bool):
    """An ncnn.Net of `model` with sbcrt's options (fp32 unless `fp16`); `path` names it in errors."""
    import ncnn

    net = ncnn.Net()
    # Options before loading: ncnn picks each layer's kernels (and packs the weights for them) as it loads.
    net.opt.num_threads = threads
    if not spin:
        net.opt.openmp_blocktime = 0  # OpenMP workers sleep at once instead of spinning 20 ms after each layer
    if not fp16:
        for option in (*FP16_OPTIONS, "use_bf16_storage"):
            setattr(net.opt, option, False)
    try:
        param = model.param.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"model {path}: its ncnn param is not text") from None
    if net.load_param_mem(param) != 0:
        raise UsageError(f"model {path}: ncnn cannot parse its param (an ncnn older than the converter's?)")
    # ncnn reads weights from a path or from memory it keeps referencing; the binding's memory variant cannot
    # keep Python's bytes alive, so the weights go through an anonymous in-memory file (never onto the disk).
    with _weights_file(model.weights) as weights_path:
        status = net.load_model(weights_path)
    if status != 0:
        raise UsageError(f"model {path}: ncnn cannot load its weights (status {status})")
    return net


@contextlib.contextmanager
def _weights_file(data: bytes):
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("sbcrt-ncnn-weights", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as fh:
                fh.write(data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(suffix=".bin") as fh:  # not Linux: a private temporary file
        fh.write(data)
        fh.flush()
        yield fh.name
