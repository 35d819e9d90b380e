"""Writing the trained model: the base graph up to its features, the new head, and self-describing metadata.

The head's input standardisation is folded into its weights, so the file holds only standard default-domain
ops (Gemm; for a prior head Div, Softmax, MatMul, Mul, Add, Log) and ends in one `logits` output of shape
[batch, classes] like an exported model: `Classifier` applies its softmax to it as to any exported model. A head
with a prior outputs scale * log(probabilities), whose softmax is the head's probabilities sharpened by `scale`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sbcrt import __version__
from sbcrt.errors import SbcrtError, UsageError
from sbcrt.runtime.atomic import write_atomically
from sbcrt.train import onnx_wire as wire
from sbcrt.train.features import FEATURES_KEY, BaseModel

OUTPUT_NAME = "logits"
BASE_SCORES = "sbcrt_base_logits"  # the base classifier's output, renamed so the new head can own `logits`


@dataclass
class FoldedHead:
    """The head in terms of raw inputs (features f, base logits z), as the file computes it:
    - features only: logits = scale * (f @ feature_weight.T + bias);
    - with a prior: logits = scale * log(w * softmax(z / T) @ prior_matrix + (1 - w) * softmax(f @ W.T + b)),
      the second term only when feature_weight is set (w = prior_weight)."""

    bias: np.ndarray  # (K,)
    feature_weight: np.ndarray | None = None  # (K, D)
    prior_matrix: np.ndarray | None = None  # (C, K): P(label | base class)
    temperature: float = 1.0
    prior_weight: float = 1.0
    scale: float = 1.0


LOG_FLOOR = 1e-12  # added before the Log: a probability that underflowed to 0 gives a large negative logit, not -inf


def head_logits(head: FoldedHead, features: np.ndarray, base_logits: np.ndarray) -> np.ndarray:
    """The logits the written file gives, in numpy (float64): the trainer checks the file against it."""
    feature_scores = None
    if head.feature_weight is not None:
        feature_scores = features.astype(np.float64) @ head.feature_weight.T.astype(np.float64) + head.bias
    if head.prior_matrix is None:
        return head.scale * feature_scores
    z = base_logits.astype(np.float64) / head.temperature
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    probabilities = head.prior_weight * (p / p.sum(axis=1, keepdims=True)) @ head.prior_matrix.astype(np.float64)
    if feature_scores is not None:
        e = np.exp(feature_scores - feature_scores.max(axis=1, keepdims=True))
        probabilities += (1 - head.prior_weight) * e / e.sum(axis=1, keepdims=True)
    return head.scale * np.log(probabilities + LOG_FLOOR)


def read_initializer(base: BaseModel, name: str) -> np.ndarray | None:
    """A float32 initializer of the base model as an array, or None if it is not a plain float tensor."""
    raw = next((r for n, r in base.parsed.graph.initializers if n == name), None)
    if raw is None:
        return None
    payload = next(wire.fields(raw)).value
    dims, data_type, data, floats = [], None, None, []
    for f in wire.fields(payload):
        if f.number == wire.TENSOR_DIMS:
            if f.wire_type == wire.LENGTH:  # packed
                view, pos = f.value, 0
                while pos < len(view):
                    value, pos = wire._varint(view, pos)
                    dims.append(value)
            else:
                dims.append(int(f.value))
        elif f.number == wire.TENSOR_DATA_TYPE:
            data_type = int(f.value)
        elif f.number == wire.TENSOR_RAW_DATA:
            data = bytes(f.value)
        elif f.number == 4:  # float_data: packed float32, or one fixed32 per value
            if f.wire_type == wire.LENGTH:
                floats.append(np.frombuffer(bytes(f.value), dtype="<f4"))
            else:
                floats.append(np.array([f.value], dtype="<u4").view("<f4"))
    if data_type != wire.FLOAT:
        return None
    values = np.frombuffer(data, dtype="<f4") if data is not None else np.concatenate(floats or [np.zeros(0, "<f4")])
    if values.size != int(np.prod(dims)):
        return None
    return values.reshape(dims).astype(np.float32)


def classifier_weights(base: BaseModel) -> np.ndarray | None:
    """The base classifier's weight rows (C x D, one per base class) if the base model ends in a plain
    Gemm/MatMul on its features whose output is the model's output; else None (no prior head possible)."""
    node = base.classifier_node
    if node is None or node.op_type not in ("Gemm", "MatMul") or node.outputs != [base.scores_name]:
        return None
    if len(node.inputs) < 2:
        return None
    weight = read_initializer(base, node.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    transposed_b = node.op_type == "Gemm" and _int_attribute(node, "transB") == 1
    return weight if transposed_b else weight.T


def _int_attribute(node: wire.Node, name: str) -> int:
    payload = next(wire.fields(node.raw)).value
    for f in wire.fields(payload):
        if f.number == wire.NODE_ATTRIBUTE:
            attr = {a.number: a.value for a in wire.fields(f.value)}
            if wire._text(attr.get(wire.ATTR_NAME, b"")) == name:
                return int(attr.get(wire.ATTR_I, 0))
    return 0


def _renamed_node(node: wire.Node, outputs: dict[str, str]) -> bytes:
    """The node with some outputs renamed; every other field copied as stored."""
    payload = next(wire.fields(node.raw)).value
    parts = []
    for f in wire.fields(payload):
        if f.number == wire.NODE_OUTPUT and wire._text(f.value) in outputs:
            parts.append(wire.encode_bytes(wire.NODE_OUTPUT, outputs[wire._text(f.value)]))
        else:
            parts.append(bytes(f.raw))
    return wire.encode_bytes(wire.GRAPH_NODE, b"".join(parts))


def build_trained_model(base: BaseModel, head: FoldedHead, metadata: dict[str, str]) -> bytes:
    """The trained model's bytes: base graph to the features (and, for a prior head, its classifier) + head."""
    graph = base.parsed.graph
    classes = int(head.bias.shape[0])
    features = base.features_name
    needs_scores = head.prior_matrix is not None
    kept = wire.needed_nodes(graph, [features] + ([base.scores_name] if needs_scores else []))
    if OUTPUT_NAME in {o for n in kept for o in n.outputs} - {base.scores_name}:
        raise UsageError(f"model {base.path}: an inner tensor is named {OUTPUT_NAME!r}; cannot add the new head")
    nodes: list[wire.Node] = []
    extra_nodes: list[bytes] = []
    for n in kept:
        if needs_scores and base.scores_name in n.outputs:
            raw = _renamed_node(n, {base.scores_name: BASE_SCORES})
            n = wire.parse_node(memoryview(raw), next(wire.fields(raw)).value)
        nodes.append(n)
    initializers: list[bytes] = []
    if not needs_scores:
        initializers += [
            wire.initializer("sbcrt_head_weight", (head.feature_weight * head.scale).astype(np.float32)),
            wire.initializer("sbcrt_head_bias", (head.bias * head.scale).astype(np.float32)),
        ]
        extra_nodes.append(
            wire.node(
                "Gemm",
                [features, "sbcrt_head_weight", "sbcrt_head_bias"],
                [OUTPUT_NAME],
                "sbcrt_head",
                wire.attribute_int("transB", 1),
            )
        )
    else:
        initializers += [
            wire.initializer("sbcrt_prior_temperature", np.array(head.temperature, np.float32)),
            wire.initializer("sbcrt_prior_matrix", (head.prior_matrix * head.prior_weight).astype(np.float32)),
            wire.initializer("sbcrt_log_floor", np.array(LOG_FLOOR, np.float32)),
            wire.initializer("sbcrt_head_scale", np.array(head.scale, np.float32)),
        ]
        extra_nodes += [
            wire.node("Div", [BASE_SCORES, "sbcrt_prior_temperature"], ["sbcrt_base_tempered"], "sbcrt_prior_div"),
            wire.node(
                "Softmax",
                ["sbcrt_base_tempered"],
                ["sbcrt_base_probs"],
                "sbcrt_prior_softmax",
                wire.attribute_int("axis", 1),
            ),
            wire.node("MatMul", ["sbcrt_base_probs", "sbcrt_prior_matrix"], ["sbcrt_prior_probs"], "sbcrt_prior"),
        ]
        mixed = "sbcrt_prior_probs"
        if head.feature_weight is not None:
            initializers += [
                wire.initializer("sbcrt_head_weight", head.feature_weight.astype(np.float32)),
                wire.initializer("sbcrt_head_bias", head.bias.astype(np.float32)),
                wire.initializer("sbcrt_feature_share", np.array(1 - head.prior_weight, np.float32)),
            ]
            extra_nodes += [
                wire.node(
                    "Gemm",
                    [features, "sbcrt_head_weight", "sbcrt_head_bias"],
                    ["sbcrt_feature_scores"],
                    "sbcrt_head",
                    wire.attribute_int("transB", 1),
                ),
                wire.node(
                    "Softmax",
                    ["sbcrt_feature_scores"],
                    ["sbcrt_feature_probs"],
                    "sbcrt_feature_softmax",
                    wire.attribute_int("axis", 1),
                ),
                wire.node("Mul", ["sbcrt_feature_probs", "sbcrt_feature_share"], ["sbcrt_feature_part"], "sbcrt_mix"),
                wire.node("Add", ["sbcrt_prior_probs", "sbcrt_feature_part"], ["sbcrt_mixed_probs"], "sbcrt_mix_sum"),
            ]
            mixed = "sbcrt_mixed_probs"
        extra_nodes += [
            wire.node("Add", [mixed, "sbcrt_log_floor"], ["sbcrt_probs_floored"], "sbcrt_floor"),
            wire.node("Log", ["sbcrt_probs_floored"], ["sbcrt_log_probs"], "sbcrt_log"),
            wire.node("Mul", ["sbcrt_log_probs", "sbcrt_head_scale"], [OUTPUT_NAME], "sbcrt_scale"),
        ]
    output = wire.value_info(wire.GRAPH_OUTPUT, OUTPUT_NAME, ["batch", classes])
    props = {k: v for k, v in base.parsed.metadata.items() if not k.startswith("pkg.")}
    props.update(metadata)
    props[FEATURES_KEY] = json.dumps(features)
    replace = {
        wire.MODEL_PRODUCER_NAME: wire.encode_bytes(wire.MODEL_PRODUCER_NAME, "sbcrt train"),
        wire.MODEL_PRODUCER_VERSION: wire.encode_bytes(wire.MODEL_PRODUCER_VERSION, __version__),
        wire.MODEL_DOC: wire.encode_bytes(
            wire.MODEL_DOC, f"head trained by sbcrt {__version__} on {base.path.name}; see metadata_props"
        ),
    }
    return wire.serialize(
        base.parsed,
        nodes=nodes,
        extra_nodes=extra_nodes,
        extra_initializers=initializers,
        outputs=[output],
        metadata=props,
        replace_top=replace,
    )


def write_model(output: Path, payload: bytes) -> None:
    """The file appears complete or not at all (a service may be reading the old model meanwhile), with the
    umask's permissions like an exported model (sbcrt.runtime.atomic: a service user must be able to read it)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(output, payload)
    except OSError as exc:
        raise SbcrtError(f"cannot write {output}: {exc.strerror or exc}") from None
