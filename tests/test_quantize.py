"""The int8 stage on a small generated conv-GELU-conv model, calibrated on the shared photos."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sbcrt.export.graph import op_counts
from sbcrt.export.quantize import quantize_int8
from sbcrt.runtime.images import open_image
from sbcrt.runtime.metadata import ModelConfig
from sbcrt.runtime.preprocess import Preprocessing, preprocess_image

SIZE = 32


def conv_gelu_model() -> onnx.ModelProto:
    """stem conv -> 1x1 conv -> GELU -> 1x1 conv -> GELU -> pool -> classifier: both GELUs sit between int8 convs."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype("f4"), name)

    nodes = [
        helper.make_node("Conv", ["image", "stem_w"], ["stem"], strides=[2, 2], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("Conv", ["stem", "expand_w"], ["expand"], name="expand"),
        helper.make_node("Gelu", ["expand"], ["gelu_a"], name="gelu_a"),
        helper.make_node("Conv", ["gelu_a", "mix_w"], ["mix"], name="mix"),
        helper.make_node("Gelu", ["mix"], ["gelu_b"], name="gelu_b"),
        helper.make_node("GlobalAveragePool", ["gelu_b"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w"], ["scores"], transB=1, name="classifier"),
    ]
    initializers = [weight("stem_w", 16, 3, 3, 3), weight("expand_w", 32, 16, 1, 1), weight("mix_w", 32, 32, 1, 1)]
    initializers.append(weight("fc_w", 10, 32))
    graph = helper.make_graph(
        nodes,
        "conv_gelu",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


@pytest.fixture(scope="module")
def photos(shared_dir: Path) -> list[Path]:
    return sorted((shared_dir / "data" / "imagenet-samples").glob("*.JPEG"))[:40]


def run(model: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"image": image[None]})[0] for image in batch])


def test_int8_gelu_becomes_a_lookup_onnxruntime_runs_in_int8(
    photos: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fp32 = conv_gelu_model()
    config = ModelConfig(num_classes=10, input_size=[3, SIZE, SIZE], resize_size=36, crop_size=SIZE)
    caplog.set_level(logging.WARNING)
    quantized = quantize_int8(fp32, config, photos[:30])
    assert not caplog.records  # onnxruntime's quantiser chatter does not reach the export's output
    exact = quantize_int8(fp32, config, photos[:30], keep_fp32=["gelu_a", "gelu_b"])

    ops = op_counts(quantized)
    assert "Gelu" not in ops and ops["Sigmoid"] == 2 and ops["Mul"] == 2
    assert all(n.domain in ("", "ai.onnx") for n in quantized.graph.node)  # standard ONNX for any runtime
    assert op_counts(exact)["Gelu"] == 2 and "Sigmoid" not in op_counts(exact)  # --keep-fp32 keeps GELU exact

    # What onnxruntime makes of it on load: int8 lookup and multiply, no float GELU left.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimised = op_counts(onnx.load(str(tmp_path / "optimised.onnx")))
    assert optimised["QLinearSigmoid"] == 2 and optimised["QLinearMul"] == 2 and "Gelu" not in optimised

    preprocessing = Preprocessing.from_config(config)
    batch = np.concatenate([preprocess_image(open_image(p), preprocessing) for p in photos[30:]])
    reference, approximated, with_exact_gelu = run(fp32, batch), run(quantized, batch), run(exact, batch)

    def relative_error(a: np.ndarray) -> float:
        return float(np.linalg.norm(a - reference) / np.linalg.norm(reference))

    # The approximation adds less error than int8 itself brings (both measured against fp32 on unseen photos).
    assert relative_error(with_exact_gelu) < 0.1
    assert relative_error(approximated) < relative_error(with_exact_gelu) + 0.02
    assert np.linalg.norm(approximated - with_exact_gelu) / np.linalg.norm(reference) < 0.05


def test_int8_form_is_the_one_that_counts_fewest_on_a_pi4(photos: list[Path]) -> None:
    """uint8 activations, int8 weights per output channel with zero points 0: the form onnxruntime's aarch64
    symmetric-convolution kernels take, and the one that counted fewest instructions on a Cortex-A72 (SBCFormer-B:
    336.3 M; int8 activations 407.4 M, uint8 weights 472.3 M; README, ARM). A change of quantiser defaults or
    options that moves off it costs a Pi 4 up to 1.4x."""
    fp32 = conv_gelu_model()
    config = ModelConfig(num_classes=10, input_size=[3, SIZE, SIZE], resize_size=36, crop_size=SIZE)
    quantized = quantize_int8(fp32, config, photos[:10])
    initializers = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    weights = {}  # weight tensor -> (int8 data, scales, zero points), from the DequantizeLinear nodes reading them
    for node in quantized.graph.node:
        if node.op_type == "DequantizeLinear" and initializers.get(node.input[0], np.empty(0)).ndim == 4:
            weights[node.input[0]] = tuple(initializers[name] for name in node.input[:3])
    assert sorted(weights) == ["expand_w_quantized", "mix_w_quantized"]  # the stem and classifier stay fp32
    for name, (data, scale, zero) in weights.items():
        assert data.dtype == np.int8 and zero.dtype == np.int8 and not zero.any(), name  # symmetric int8
        assert scale.shape == zero.shape == (data.shape[0],), name  # one scale per output channel
    activations = [n for n in quantized.graph.node if n.op_type == "QuantizeLinear"]
    assert len(activations) >= 4
    assert all(initializers[n.input[2]].dtype == np.uint8 for n in activations)
