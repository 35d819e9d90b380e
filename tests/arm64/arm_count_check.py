"""CI check of the aarch64 instruction counter (benchmarks/arm_count.py) on a tiny model: it runs, it counts
only the marked inference, and two separate emulated processes give the same SIMD counts.

Not part of `make test` (the file name does not match test_*.py): `make test-arm64` runs it after the userland
exists, as `pytest tests/arm64/arm_count_check.py`. ~30-60 s: two emulations of a tiny model at once.
"""

from __future__ import annotations

import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import arm_count  # noqa: E402

CPU = "cortex-a76"  # Pi 5: has the dot product, so the int8 kernels exercise that class too
INPUT_SHAPE = (1, 8, 16, 16)


def build_tiny_int8_model(out: Path) -> None:
    """Conv -> Relu -> Conv -> global pool -> MatMul, statically quantised (QDQ) like sbcrt's int8 exports:
    onnxruntime runs it with its int8 GEMM kernels (dot product on a Cortex-A76)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((32, 8, 3, 3)).astype(np.float32),
        "w2": rng.standard_normal((32, 32, 3, 3)).astype(np.float32),
        "fc": rng.standard_normal((32, 16)).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c2"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "fc"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, INPUT_SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)

    class RandomBatches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": rng.standard_normal(INPUT_SHAPE).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "tiny_fp32.onnx"
        onnx.save(model, fp32)
        quantize_static(
            fp32,
            out,
            RandomBatches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("arm_count") / "tiny_int8.onnx"
    build_tiny_int8_model(path)
    return path


def test_two_processes_count_the_same_simd_work(tiny_model: Path) -> None:
    counter = arm_count.Counter.prepare()
    job = arm_count.Job("tiny_int8", tiny_model, CPU, threads=1, warmup=2, repeat=2)
    # Two separate emulated processes (fresh: never the cache), at the same time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.map(lambda _: arm_count.count(counter, job, fresh=True), range(2))

    for result in (first, second):
        assert result["threads"] == 1 and result["instructions"] > 0
        assert result["stable"], f"repeated inferences in one process disagree: {result['spread']}"
        assert sum(result["classes"].values()) == result["instructions"], "the classes must partition the total"
        assert result["classes"]["simd_vector"] > 0 and result["classes"]["simd_load_store"] > 0
        assert result["classes"]["dot_product"] > 0, "onnxruntime's int8 kernels use SDOT/UDOT on a Cortex-A76"
    across = arm_count.spread([first, second])
    print(f"\ntiny int8 on {CPU}: {first['instructions']} and {second['instructions']} instructions; ", end="")
    print(f"SIMD {[first['classes'][n] for n in arm_count.SIMD_CLASSES]} vs", end=" ")
    print(f"{[second['classes'][n] for n in arm_count.SIMD_CLASSES]}; spread {across}")
    assert arm_count.is_stable(across), f"two processes disagree: {across}"
