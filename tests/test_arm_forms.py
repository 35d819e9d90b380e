"""sbcrt/export/arm_forms.py: every depthwise form computes what the grouped Conv computes, in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sbcrt.export.arm_forms import choose_form, depthwise_nodes, rewrite_depthwise


def _conv_model(shapes: list[tuple[int, int, int, tuple[int, int]]], size: int, channels: int, seed: int = 0):
    """A chain of depthwise Convs (kernel, stride, dilation, (pad before, pad after)) on a dynamic batch."""
    rng = np.random.default_rng(seed)
    nodes, inits, name, h = [], [], "x", size
    for i, (kernel, stride, dilation, (before, after)) in enumerate(shapes):
        inits += [
            numpy_helper.from_array(rng.standard_normal((channels, 1, kernel, kernel)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), f"b{i}"),
        ]
        nodes.append(
            helper.make_node(
                "Conv", [name, f"w{i}", f"b{i}"], [f"y{i}"], group=channels, kernel_shape=[kernel, kernel],
                strides=[stride] * 2, dilations=[dilation] * 2, pads=[before, before, after, after],
            )
        )  # fmt: skip
        name = f"y{i}"
        h = (h + before + after - dilation * (kernel - 1) - 1) // stride + 1
    graph = helper.make_graph(
        nodes,
        "dw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, size, size])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", channels, h, h])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    ("form", "kernel", "stride", "pad", "size"),
    [
        ("taps", 5, 1, (2, 2), 7),
        ("taps", 5, 2, (1, 2), 14),  # TF "same" padding at stride 2 (EfficientNet-Lite)
        ("taps", 3, 2, (0, 1), 28),
        ("taps", 5, 2, (2, 2), 14),  # PyTorch's symmetric padding
        ("phases", 5, 2, (1, 2), 56),
        ("phases", 5, 2, (2, 2), 16),
        ("phases", 3, 2, (1, 1), 16),
        ("strided", 3, 2, (0, 1), 28),
        ("strided", 3, 2, (1, 1), 28),
    ],
)
def test_form_matches_the_grouped_conv(form, kernel, stride, pad, size):
    channels = 12
    reference = _conv_model([(kernel, stride, 1, pad)], size, channels)
    weight = numpy_helper.to_array(reference.graph.initializer[0])
    bias = numpy_helper.to_array(reference.graph.initializer[1])
    nodes, inits = depthwise_nodes(form, "x", "y0", weight, bias, stride, pad, (size, size), "dw")
    graph = helper.make_graph(nodes, "form", list(reference.graph.input), list(reference.graph.output), inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, channels, size, size)).astype(np.float32)
    expected, got = _run(reference, x), _run(model, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_choose_form_follows_the_counts():
    assert choose_form(3, 1, (1, 1), 56) is None  # onnxruntime's direct kernel: kept
    assert choose_form(3, 1, (1, 1), 7) is None
    assert choose_form(5, 1, (2, 2), 28) is None  # the grouped Conv counted fewer than the taps at 28x28
    assert choose_form(5, 1, (2, 2), 7) == "taps"
    assert choose_form(5, 2, (1, 2), 56) == "phases"
    assert choose_form(3, 2, (0, 1), 112) == "strided"
    assert choose_form(3, 2, (0, 1), 28) == "taps"
    assert choose_form(5, 1, (1, 3), 7) is None  # padding it has no form for
    assert choose_form(7, 1, (3, 3), 7) is None


def test_rewrite_depthwise_keeps_the_function_and_skips_what_it_cannot_do():
    chain = [
        (3, 2, 1, (0, 1)),  # 56 -> 28: strided
        (5, 1, 1, (2, 2)),  # 5x5 on 28x28: kept (fewer instructions as it is)
        (3, 1, 1, (1, 1)),  # kept (direct kernel)
        (3, 1, 2, (2, 2)),  # dilated: kept
        (5, 2, 1, (1, 2)),  # 28 -> 14: taps
        (5, 1, 1, (2, 2)),  # 5x5 on 14x14: taps
    ]
    model = _conv_model(chain, 56, 8)
    x = np.random.default_rng(2).standard_normal((3, 8, 56, 56)).astype(np.float32)
    expected = _run(model, x)
    rewritten, counts = rewrite_depthwise(model)
    onnx.checker.check_model(rewritten, full_check=True)
    assert counts == {"strided": 1, "taps": 2}
    convs = [n for n in rewritten.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4  # the kept three and the strided form's stride-1 Conv
    used = {name for node in rewritten.graph.node for name in node.input}
    assert all(t.name in used for t in rewritten.graph.initializer)  # replaced weights are gone
    # Six convolutions deep the values reach the hundreds: float summation order shows relative to that scale.
    assert np.abs(_run(rewritten, x) - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_weight_another_node_reads_stays_in_the_graph():
    model = _conv_model([(5, 1, 1, (2, 2))], 7, 4)  # taps: the Conv goes, its weight w0 would too
    model.graph.node.append(helper.make_node("Identity", ["w0"], ["w_out"]))
    model.graph.output.append(helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [4, 1, 5, 5]))
    rewritten, counts = rewrite_depthwise(model)
    assert counts == {"taps": 1}
    onnx.checker.check_model(rewritten, full_check=True)
    assert "w0" in {t.name for t in rewritten.graph.initializer}
    assert "b0" not in {t.name for t in rewritten.graph.initializer}
