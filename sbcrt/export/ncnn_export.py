"""The ncnn model beside the ONNX file (`sbcrt export --engine ncnn`): pnnx converts the verified ONNX graph,
the result is packed with the same metadata into one .ncnn file (sbcrt/runtime/ncnn_file.py) and checked
against PyTorch, through the runtime's own ncnn engine, before anything is written.

pnnx is the converter ncnn itself ships (pinned in constraints.in: a new pnnx may emit other layers). It runs
as its own executable, from the pnnx wheel, in a private temporary folder.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import tempfile
from pathlib import Path

from sbcrt.errors import SbcrtError, UsageError
from sbcrt.runtime.metadata import ModelConfig
from sbcrt.runtime.ncnn_file import NcnnModel

PNNX_NEEDS = 'converting to ncnn needs pnnx and ncnn: pip install "sbcrt[export]"'
PNNX_TIMEOUT_S = 1800
# pnnx names the graph's blobs in0.. and out0..; the param's Input layer line is "Input <name> 0 1 <blob>".
INPUT_LINE = re.compile(r"^Input\s+\S+\s+0\s+1\s+(\S+)", re.MULTILINE)
# The classifier's global average pool (ONNX ReduceMean over H and W, or GlobalAveragePool + Flatten) comes out of
# pnnx as a generic Reduction (mean, axes 1 and 2, no kept dims), which ncnn runs unpacked and scalar. ncnn's
# global average Pooling computes the same 1-D mean per channel with its packed NEON kernel.
GLOBAL_MEAN = re.compile(r"^Reduction(\s+)(\S+)(\s+)1 1 (\S+) (\S+) 0=3 1=0 -23303=2,1,2 4=0 5=1[ \t]*$", re.MULTILINE)


def pnnx_executable() -> Path:
    spec = importlib.util.find_spec("pnnx")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        binary = Path(folder) / "pnnx"
        if binary.is_file():
            return binary
    raise UsageError(PNNX_NEEDS + " (pnnx is missing)")


def pnnx_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pnnx")
    except metadata.PackageNotFoundError:
        return "unknown"


def convert(onnx_payload: bytes, input_shape: list[int], config: ModelConfig, source: bytes) -> NcnnModel:
    """pnnx's fp32 ncnn conversion of `onnx_payload` (batch 1) with `config` as its metadata; `source` is the
    ONNX file written beside it (its digest ties the two together). Raises SbcrtError when pnnx fails."""
    import hashlib

    binary = pnnx_executable()
    shape = [1, *input_shape]
    with tempfile.TemporaryDirectory(prefix="sbcrt-pnnx-") as work:
        folder = Path(work)
        (folder / "model.onnx").write_bytes(onnx_payload)
        # fp16=0: the weights stay fp32 in the .bin (pnnx's default halves them), so the file is what was verified.
        command = [str(binary), "model.onnx", "inputshape=[" + ",".join(map(str, shape)) + "]", "fp16=0"]
        try:
            done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=PNNX_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SbcrtError(f"pnnx did not run: {exc}") from None
        param, weights = folder / "model.ncnn.param", folder / "model.ncnn.bin"
        if done.returncode != 0 or not param.is_file() or not weights.is_file():
            last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no output")
            raise SbcrtError(f"pnnx could not convert the model to ncnn (exit {done.returncode}): {last[:300]}")
        param_bytes, weights_bytes = param.read_bytes(), weights.read_bytes()
    text = param_bytes.decode("utf-8", errors="replace")
    text = GLOBAL_MEAN.sub(r"Pooling\1\2\g<3>1 1 \4 \5 0=1 4=1", text)
    param_bytes = text.encode()
    inputs = INPUT_LINE.findall(text)
    if len(inputs) != 1:
        raise SbcrtError(f"pnnx's ncnn model has {len(inputs)} inputs; sbcrt needs one image input")
    output = "out0"
    if not re.search(rf"\s{output}(\s|$)", text):
        raise SbcrtError(f"pnnx's ncnn model has no blob {output!r} (its output)")
    return NcnnModel(
        param=param_bytes,
        weights=weights_bytes,
        metadata=config.to_props(),
        input_name=inputs[0],
        input_shape=shape,
        output_name=output,
        output_shape=[1, config.num_classes],
        source_size=len(source),
        source_sha256=hashlib.sha256(source).hexdigest(),
        converter=f"pnnx {pnnx_version()}",
    )


def require_ncnn() -> None:
    from sbcrt.runtime.engines import NCNN_NEEDS, ncnn_available

    if not ncnn_available():
        raise UsageError(f"{NCNN_NEEDS}: the export checks the ncnn model against PyTorch")


def engine_for(data: bytes, output: Path):
    """The runtime's own ncnn engine on the bytes about to be written (read back, digests and all): fp32,
    1 thread."""
    from sbcrt.runtime.engines.ncnn import NcnnEngine

    require_ncnn()
    return NcnnEngine(output, threads=1, model=NcnnModel.from_bytes(data, str(output)))
