"""Turning a prepared PyTorch model into an ONNX ModelProto, and reading figures off ONNX graphs."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections import Counter

import onnx
import torch
from onnx import shape_inference
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter narrates every step on stdout and logs warnings we cannot act on (torchvision ops)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._export", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def to_onnx(model: nn.Module, input_size: tuple[int, int, int], opset: int, optimize: bool = True) -> onnx.ModelProto:
    """Export with a dynamic batch dimension. `optimize` runs the exporter's own graph clean-up
    (constant folding, dead code, shape-op simplification); off, it shows the raw translation."""
    example = torch.randn(2, *input_size)  # not 1: torch.export specialises size-1 dimensions
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            optimize=optimize,
            external_data=False,
            verbose=False,
        )
    return program.model_proto


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def count_macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, MatMul and Gemm at batch 1 (the paper's count)."""
    inferred = shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    for value in values:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)

    macs = 0
    for node in inferred.graph.node:
        out = shapes.get(node.output[0])
        if out is None:
            continue
        if node.op_type == "Conv":
            weight = shapes[node.input[1]]  # (out, in / groups, kh, kw)
            macs += math.prod(out) * math.prod(weight[1:])
        elif node.op_type == "ConvTranspose":
            weight = shapes[node.input[1]]  # (in, out / groups, kh, kw): each input pixel feeds k*k*out/g
            macs += math.prod(shapes[node.input[0]]) * math.prod(weight[1:])
        elif node.op_type in ("MatMul", "Gemm"):
            a = shapes[node.input[0]]
            transposed = any(att.name == "transA" and att.i for att in node.attribute)
            macs += math.prod(out) * (a[-2] if transposed else a[-1])
    return macs
