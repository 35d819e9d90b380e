"""CI check of the aarch64 instruction counter (benchmarks/arm_count.py) on a tiny model: it runs, it counts
only the marked inference, and two separate emulated processes give the same SIMD counts.

Not part of `make test` (the file name does not match test_*.py): `make test-arm64` runs it after the userland
exists, as `pytest tests/arm64/arm_count_check.py`. ~30-60 s: two emulations of a tiny model at once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from benchmarks import arm_count

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "sbcrt" / "data" / "samples"  # the repo's own CC0 photos: calibration needs no shared data
CPU = "cortex-a76"  # Pi 5: has the dot product, so the int8 kernels exercise that class too
SIZE = 16


def build_tiny_int8_model(out: Path) -> None:
    """Conv (stem) -> Relu -> Conv -> Relu -> Conv -> global pool -> MatMul (classifier), quantised by the export
    stage's own quantize_int8 (the stem and the classifier stay fp32, as in sbcrt's int8 exports), calibrated on
    the repo's sample photos: onnxruntime runs the middle convs with its int8 GEMM kernels (dot product on a
    Cortex-A76)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sbcrt.export.quantize import quantize_int8
    from sbcrt.runtime.metadata import ModelConfig

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((32, 3, 3, 3)).astype(np.float32),
        "w2": (rng.standard_normal((32, 32, 3, 3)) / 10).astype(np.float32),
        "w3": (rng.standard_normal((32, 32, 3, 3)) / 10).astype(np.float32),
        "fc": rng.standard_normal((32, 16)).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1], name="stem"),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
            helper.make_node("Relu", ["c2"], ["r2"]),
            helper.make_node("Conv", ["r2", "w3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
            helper.make_node("GlobalAveragePool", ["c3"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "fc"], ["scores"], name="classifier"),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    config = ModelConfig(architecture="tiny", num_classes=16, input_size=[3, SIZE, SIZE], crop_size=SIZE,
                         resize_size=SIZE)  # fmt: skip
    photos = sorted(SAMPLES.glob("*.png"))
    assert photos, SAMPLES
    quantized = quantize_int8(model, config, photos)
    assert sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node) > 0
    onnx.save(quantized, out)


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
