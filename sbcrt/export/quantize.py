"""Static int8 quantisation (QDQ) calibrated on real photos through the model's own preprocessing.

Choices, and why (measured here; shared/notes/perf-findings.md):
- QDQ format with per-channel symmetric int8 weights: onnxruntime fuses DQ -> Conv -> Q into its int8 kernels
  on every CPU, and chooses dot-product kernels at run time where the CPU has them (Pi 5's A76; Pi 4's A72 has
  none, and gains less).
- Unsigned (QUInt8) activations: signed activations ran ~1.5x slower on x86 without VNNI.
- Every operator onnxruntime can quantise is (its default list): quantising only Conv/MatMul/Gemm cost
  EfficientNet-Lite0 2 points of top-1 on the shared photos (the residual Adds and ReLU6 clips then keep
  re-quantising at slightly different scales) and was no faster on SBCFormer-B.
- The stem convolution (it sees raw pixels) and the classifier stay fp32 by default: with them quantised,
  EfficientNet-Lite0 lost 2.8 points of top-1 on the shared photos; with them in fp32 it is within a point.
- GELU has no int8 kernel in onnxruntime, so each one costs a dequantise, an fp32 erf and a requantise: about a
  quarter of SBCFormer-B's int8 time. `gelu_as_int8_sigmoid` swaps it for x * sigmoid(1.702 x), which
  onnxruntime runs as a 256-entry lookup (QLinearSigmoid) and an int8 multiply: int8 B 20.7 -> 18.1 ms at one
  thread, logit cosine to fp32 0.9931 -> 0.9930 (the approximation's error, < 0.021 absolute, is below the
  int8 step of these activations).
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
from collections import defaultdict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from sbcrt.errors import SettingError
from sbcrt.runtime.evaluation import LogitComparison
from sbcrt.runtime.image_files import IMAGE_EXTENSIONS
from sbcrt.runtime.images import open_image
from sbcrt.runtime.metadata import ModelConfig
from sbcrt.runtime.preprocess import Preprocessing, preprocess_image

MATRIX_OPS = ("Conv", "MatMul", "Gemm")  # the compute; the stem and the classifier are the first and last
GELU_SIGMOID_SLOPE = 1.702  # GELU(x) ~ x * sigmoid(1.702 x), the GELU paper's own approximation
MAX_HOLDOUT = 100
SPLIT_SEED = 0  # the calibration/holdout split is reproducible


@dataclass
class Int8Agreement:
    """fp32 vs int8 on photos the calibration did not see."""

    photos: int
    top1_agreement: float
    cosine: float  # mean over photos of the logits' cosine similarity
    relative_l2_error: float  # mean over photos of ||int8 - fp32|| / ||fp32|| (LogitComparison.relative_l2)

    def render(self) -> str:
        if not self.photos:
            return "no holdout photos: every calibration photo was used to calibrate"
        return (
            f"{self.photos} holdout photos: top-1 agreement {self.top1_agreement:.3f}, "
            f"logit cosine {self.cosine:.4f}, relative L2 error {self.relative_l2_error:.3f}"
        )


def split_photos(folder: Path, count: int) -> tuple[list[Path], list[Path]]:
    """A seeded shuffle of the folder's images: the first `count` calibrate, up to MAX_HOLDOUT of the rest check."""
    if not Path(folder).is_dir():
        raise SettingError("calib_dir", f"{folder} is not a folder of photos")
    if count < 1:
        raise SettingError("calib_count", "must be at least 1", count)
    photos = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not photos:
        raise SettingError("calib_dir", f"no photos (.jpg, .png, ...) in {folder}")
    random.Random(SPLIT_SEED).shuffle(photos)
    return photos[:count], photos[count : count + MAX_HOLDOUT]


def default_fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """The stem (the quantisable node reading the graph input) and the classifier (the last quantisable node)."""
    quantisable = [n for n in model.graph.node if n.op_type in MATRIX_OPS]
    graph_inputs = {i.name for i in model.graph.input}
    stem = [n.name for n in quantisable if graph_inputs & set(n.input)]
    return stem + [quantisable[-1].name] if quantisable else stem


def quantize_int8(
    fp32: onnx.ModelProto, config: ModelConfig, calibration: list[Path], keep_fp32: list[str] | None = None
) -> onnx.ModelProto:
    """Statically quantise `fp32`, calibrating on `calibration` photos; `keep_fp32` adds node names to leave alone."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    preprocessing = Preprocessing.from_config(config)
    input_name = fp32.graph.input[0].name
    node_names = {n.name for n in fp32.graph.node}
    unknown = [name for name in keep_fp32 or [] if name not in node_names]
    if unknown:
        raise SettingError("keep_fp32", "no such node in the model", ", ".join(unknown))

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self.pending = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            path = next(self.pending, None)
            return None if path is None else {input_name: preprocess_image(open_image(path), preprocessing)}

    with tempfile.TemporaryDirectory(prefix="sbcrt-int8-") as tmp, _quiet_root_logger():
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(fp32, source)
        quantize_static(
            source,
            target,
            Photos(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=default_fp32_nodes(fp32) + list(keep_fp32 or []),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True},
        )
        quantized = onnx.load(target)
    gelu_as_int8_sigmoid(quantized, skip=keep_fp32 or ())
    return quantized


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantiser warns on the root logger about things that do not apply here (1-D per-channel
    axes of LayerNorm weights, a pre-processing step meant for other models), dozens of lines per export."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def gelu_as_int8_sigmoid(model: onnx.ModelProto, skip: Collection[str] = ()) -> None:
    """Rewrite each DQ -> Gelu -> Q as x * sigmoid(1.702 x) in QDQ form, in place.

    The sigmoid reads the same int8 tensor as x through its own DequantizeLinear with the scale multiplied by
    1.702 (the same integers mean 1.702 x), so no extra multiply is needed: onnxruntime fuses DQ -> Sigmoid -> Q
    into a lookup table and DQ, DQ -> Mul -> Q into an int8 multiply. Gelu nodes named in `skip` stay exact.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    for gelu in [n for n in graph.node if n.op_type == "Gelu" and n.name not in skip]:
        dequantize = producer.get(gelu.input[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.input[1] not in initializers:
            continue
        consumers = readers[gelu.output[0]]
        if len(consumers) != 1 or consumers[0].op_type != "QuantizeLinear":
            continue
        prefix = gelu.name or gelu.output[0]
        x_scale = numpy_helper.to_array(initializers[dequantize.input[1]])
        names = {
            k: f"{prefix}_{k}" for k in ("slope_scale", "sigmoid_scale", "sigmoid_zero", "x", "sigmoid", "q", "dq")
        }
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.asarray(x_scale * GELU_SIGMOID_SLOPE, np.float32), names["slope_scale"]),
                numpy_helper.from_array(np.asarray(1 / 255, np.float32), names["sigmoid_scale"]),  # [0, 1] in uint8
                numpy_helper.from_array(np.asarray(0, np.uint8), names["sigmoid_zero"]),
            ]
        )
        zero_point = dequantize.input[2:3]
        sigmoid_q = [names["sigmoid_scale"], names["sigmoid_zero"]]
        replacement = [
            helper.make_node(
                "DequantizeLinear",
                [dequantize.input[0], names["slope_scale"], *zero_point],
                [names["x"]],
                name=f"{prefix}_dequantize_slope",
            ),
            helper.make_node("Sigmoid", [names["x"]], [names["sigmoid"]], name=f"{prefix}_sigmoid"),
            helper.make_node("QuantizeLinear", [names["sigmoid"], *sigmoid_q], [names["q"]], name=f"{prefix}_quantize"),
            helper.make_node("DequantizeLinear", [names["q"], *sigmoid_q], [names["dq"]], name=f"{prefix}_dequantize"),
            helper.make_node("Mul", [gelu.input[0], names["dq"]], [gelu.output[0]], name=f"{prefix}_mul"),
        ]
        position = list(graph.node).index(gelu)
        graph.node.remove(gelu)
        for offset, node in enumerate(replacement):
            graph.node.insert(position + offset, node)


def measure_agreement(fp32: bytes, int8: bytes, config: ModelConfig, holdout: list[Path]) -> Int8Agreement:
    if not holdout:
        return Int8Agreement(0, float("nan"), float("nan"), float("nan"))
    import onnxruntime as ort

    preprocessing = Preprocessing.from_config(config)
    batch = np.concatenate([preprocess_image(open_image(p), preprocessing) for p in holdout])
    outputs = []
    for payload in (fp32, int8):
        session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: batch})[0])
    comparison = LogitComparison()
    for fp32_logits, int8_logits in zip(*outputs, strict=True):
        comparison.add(fp32_logits, int8_logits)
    return Int8Agreement(
        photos=len(holdout),
        top1_agreement=float(np.mean(comparison.top1_agree)),
        cosine=float(np.mean(comparison.cosine)),
        relative_l2_error=float(np.mean(comparison.relative_l2)),
    )
