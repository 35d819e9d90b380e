"""Depthwise convolutions in different ONNX forms, counted on ARM: which form onnxruntime's aarch64 kernels run well.

    python benchmarks/arm_dw_forms.py [--cpu cortex-a72] [--only NAME]

Each case is one depthwise convolution of EfficientNet-Lite0 (batch 1) as a single-op model (`plain`: the
grouped Conv the exporter writes) and the same function in other default-domain forms
(sbcrt/export/arm_forms.py builds them; checked here against `plain` on the host's onnxruntime, within 1e-5),
each counted with benchmarks/arm_count.py (aarch64 instructions per inference, cached). Why forms matter:
onnxruntime's MLAS has a direct NEON depthwise kernel only for 3x3, stride 1, padding <= 1 (MlasConvPrepare);
every other depthwise convolution is im2col + a one-row GEMM per channel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import arm_count  # noqa: E402
from sbcrt.export.arm_forms import depthwise_nodes  # noqa: E402

# (label, channels, size, kernel, stride): the kinds of depthwise convolution EfficientNet-Lite0 has.
CASES = [
    ("dw3s1_144x56", 144, 56, 3, 1),
    ("dw3s2_96x112", 96, 112, 3, 2),
    ("dw5s1_240x28", 240, 28, 5, 1),
    ("dw5s2_144x56", 144, 56, 5, 2),
    ("dw5s1_1152x7", 1152, 7, 5, 1),
    ("dw3s1_240x28", 240, 28, 3, 1),
    ("dw3s2_240x28", 240, 28, 3, 2),
    ("dw3s1_480x14", 480, 14, 3, 1),
    ("dw5s1_672x14", 672, 14, 5, 1),
    ("dw5s2_672x14", 672, 14, 5, 2),
    ("dw3s1_1152x7", 1152, 7, 3, 1),
]
FORMS = ("plain", "taps", "phases", "strided")
OUT = REPO / "build" / "arm-dw-forms"


def single_op_model(channels: int, size: int, kernel: int, stride: int, form: str, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((channels, 1, kernel, kernel)).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    if form == "plain":
        nodes = [
            helper.make_node(
                "Conv", ["x", "w", "b"], ["y"], group=channels, kernel_shape=[kernel, kernel],
                pads=[kernel // 2] * 4, strides=[stride, stride],
            )
        ]  # fmt: skip
    else:
        nodes, extra = depthwise_nodes(form, "x", "y", weight, bias, stride, (kernel // 2,) * 2, (size, size), "dw")
        inits += extra
    graph = helper.make_graph(
        nodes,
        "dw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, out, out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="append", choices=sorted(arm_count.CPUS))
    parser.add_argument("--only", action="append", help="case label (repeat)")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    models = []
    for label, channels, size, kernel, stride in CASES:
        if args.only and label not in args.only:
            continue
        x = np.random.default_rng(1).standard_normal((1, channels, size, size)).astype(np.float32)
        reference = None
        for form in FORMS:
            if (form == "phases" and stride != 2) or (form == "strided" and (stride, kernel) != (2, 3)):
                continue
            path = OUT / f"{label}.{form}.onnx"
            onnx.save(single_op_model(channels, size, kernel, stride, form), path)
            y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            if reference is None:
                reference = y
            elif not np.allclose(y, reference, atol=1e-5, rtol=1e-5):
                raise SystemExit(f"{label}.{form}: max diff {np.abs(y - reference).max():.2e} vs plain")
            models += ["--model", f"{label}.{form}={path}"]
    cpus = [a for cpu in (args.cpu or ["cortex-a72"]) for a in ("--cpu", cpu)]
    return arm_count.main([*models, *cpus, "--json", str(OUT / "counts.json")])


if __name__ == "__main__":
    raise SystemExit(main())
