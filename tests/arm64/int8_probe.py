"""A tiny int8 model that shows which integer GEMM kernel onnxruntime picks on a CPU.

    python3 int8_probe.py build PROBE.onnx      (x86 test venv: needs onnx and onnxruntime.quantization)
    python3 int8_probe.py run PROBE.onnx OUT.npy  (anywhere: onnxruntime only)

The probe is one MatMul quantised dynamically (MatMulInteger, uint8 x uint8), which onnxruntime runs with
MLAS's U8X8 GEMM: on arm64 the UDOT kernel when the CPU has the dot-product extension (Cortex-A76, Pi 5) and
the UMULL/UADALP NEON kernel when it has not (Cortex-A72, Pi 4). Which one ran shows in QEMU's instruction log
(tools/arm64/isa_census.py). It stands in for a real int8 model until the quantisation issue lands.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROWS, DEPTH, COLS = 64, 256, 256


def probe_input() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((ROWS, DEPTH)).astype(np.float32)


def build(out: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight = np.random.default_rng(0).standard_normal((DEPTH, COLS)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "int8_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, DEPTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, COLS])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        onnx.save(model, fp32)
        out.parent.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(fp32, out, weight_type=QuantType.QUInt8)


def run(model: Path, out: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # explicit: no thread affinity to set for the emulated CPU count
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    np.save(out, session.run(None, {"x": probe_input()})[0])


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "build":
        build(Path(argv[2]))
    elif len(argv) == 4 and argv[1] == "run":
        run(Path(argv[2]), Path(argv[3]))
    else:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
