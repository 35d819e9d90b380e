"""The few ONNX graph edits `sbcrt train` needs, done on the protobuf wire format with the standard library.

The runtime install has no `onnx` package and onnxruntime writes no models, so a trained file is written here:
the base model's bytes are split into fields, the fields this module understands (graph nodes, initializers,
outputs, metadata) are edited, and every other field is copied byte for byte. That keeps whatever the base
exporter wrote (opset imports, IR version, value_info, doc strings) exactly as it was, with no schema to vendor.

Only the protobuf encoding is used: a field is a varint key `(number << 3) | wire type` followed by a varint
(type 0), 8 bytes (1), a varint length and that many bytes (2), or 4 bytes (5). Field numbers are onnx.proto's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from sbcrt.errors import UsageError

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

# ModelProto
MODEL_IR_VERSION, MODEL_PRODUCER_NAME, MODEL_PRODUCER_VERSION, MODEL_DOC = 1, 2, 3, 6
MODEL_GRAPH, MODEL_OPSET_IMPORT, MODEL_METADATA = 7, 8, 14
# GraphProto
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VALUE_INFO = 1, 5, 11, 12, 13
# NodeProto
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 1, 2, 3, 4, 5, 7
# AttributeProto: name, f, i, g (one graph), graphs, type; AttributeType values
ATTR_NAME, ATTR_F, ATTR_I, ATTR_G, ATTR_GRAPHS, ATTR_TYPE = 1, 2, 3, 6, 11, 20
ATTR_TYPE_FLOAT, ATTR_TYPE_INT = 1, 2
# TensorProto: dims, data_type, name, raw_data, data_location (1 = EXTERNAL); its DataType values
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_RAW_DATA, TENSOR_DATA_LOCATION = 1, 2, 8, 9, 14
FLOAT = 1
# ValueInfoProto -> TypeProto.tensor_type -> elem_type, shape -> TensorShapeProto.dim -> dim_value | dim_param
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR, TENSOR_TYPE_ELEM, TENSOR_TYPE_SHAPE, SHAPE_DIM, DIM_VALUE, DIM_PARAM = 1, 1, 2, 1, 1, 2
# OperatorSetIdProto, StringStringEntryProto
OPSET_DOMAIN, OPSET_VERSION, ENTRY_KEY, ENTRY_VALUE = 1, 2, 1, 2


class WireError(UsageError):
    """Bytes that are not a well-formed protobuf message (a damaged or non-ONNX file)."""


# -- reading --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    number: int
    wire_type: int
    value: int | memoryview  # the varint or fixed value, or a length-delimited field's payload
    raw: memoryview  # the whole field, key included, to copy it unchanged


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated protobuf varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("protobuf varint longer than 10 bytes")


def fields(data: bytes | memoryview) -> Iterator[Field]:
    """The fields of one message, in the order they are stored."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        start = pos
        key, pos = _varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            value, pos = _varint(view, pos)
        elif wire_type == LENGTH:
            size, pos = _varint(view, pos)
            if pos + size > len(view):
                raise WireError("protobuf field runs past the end of its message")
            value, pos = view[pos : pos + size], pos + size
        elif wire_type in (FIXED64, FIXED32):
            width = 8 if wire_type == FIXED64 else 4
            if pos + width > len(view):
                raise WireError("truncated protobuf fixed-width field")
            value, pos = int.from_bytes(view[pos : pos + width], "little"), pos + width
        else:  # 3/4 are the long-deprecated groups, which onnx.proto never uses
            raise WireError(f"unsupported protobuf wire type {wire_type}")
        if number == 0:
            raise WireError("protobuf field number 0")
        yield Field(number, wire_type, value, view[start:pos])


def _text(value: int | memoryview) -> str:
    return bytes(value).decode("utf-8", errors="replace") if isinstance(value, memoryview) else ""


def _strings(message: memoryview, number: int) -> list[str]:
    return [_text(f.value) for f in fields(message) if f.number == number and f.wire_type == LENGTH]


def _first_string(message: memoryview, number: int) -> str:
    found = _strings(message, number)
    return found[0] if found else ""


@dataclass
class Node:
    inputs: list[str]
    outputs: list[str]
    op_type: str
    domain: str
    has_subgraph: bool  # If/Loop/Scan bodies may read outer tensors by name: keep every initializer then
    raw: memoryview


def parse_node(raw: memoryview, payload: memoryview) -> Node:
    inputs, outputs, op_type, domain, subgraph = [], [], "", "", False
    for f in fields(payload):
        if f.number == NODE_INPUT:
            inputs.append(_text(f.value))
        elif f.number == NODE_OUTPUT:
            outputs.append(_text(f.value))
        elif f.number == NODE_OP_TYPE:
            op_type = _text(f.value)
        elif f.number == NODE_DOMAIN:
            domain = _text(f.value)
        elif f.number == NODE_ATTRIBUTE and isinstance(f.value, memoryview):
            subgraph = subgraph or any(a.number in (ATTR_G, ATTR_GRAPHS) for a in fields(f.value))
    return Node(inputs, outputs, op_type, domain, subgraph, raw)


@dataclass
class Graph:
    """A GraphProto split into the parts `sbcrt train` edits; `other` keeps the rest, in order."""

    nodes: list[Node] = field(default_factory=list)
    initializers: list[tuple[str, memoryview]] = field(default_factory=list)  # (name, whole field)
    inputs: list[tuple[str, memoryview]] = field(default_factory=list)
    outputs: list[tuple[str, memoryview]] = field(default_factory=list)
    value_info: list[tuple[str, memoryview]] = field(default_factory=list)
    other: list[memoryview] = field(default_factory=list)


@dataclass
class Model:
    """A ModelProto: its graph, its metadata entries, its opset imports, and every other field as stored."""

    graph: Graph
    metadata: dict[str, str]
    opsets: dict[str, int]  # domain ("" = the default domain) -> version
    other: list[memoryview]  # top-level fields other than graph and metadata_props, unchanged


def parse_model(data: bytes) -> Model:
    """Split a serialised ModelProto. Raises UsageError for bytes that are not one."""
    graph_payload: memoryview | None = None
    metadata: dict[str, str] = {}
    opsets: dict[str, int] = {}
    other: list[memoryview] = []
    for f in fields(data):
        if f.number == MODEL_GRAPH and f.wire_type == LENGTH:
            graph_payload = f.value
            continue
        if f.number == MODEL_METADATA and f.wire_type == LENGTH:
            entry = {e.number: _text(e.value) for e in fields(f.value) if e.wire_type == LENGTH}
            metadata[entry.get(ENTRY_KEY, "")] = entry.get(ENTRY_VALUE, "")
            continue
        if f.number == MODEL_OPSET_IMPORT and f.wire_type == LENGTH:
            entry_fields = list(fields(f.value))
            domain = next((_text(e.value) for e in entry_fields if e.number == OPSET_DOMAIN), "")
            version = next((int(e.value) for e in entry_fields if e.number == OPSET_VERSION), 0)
            opsets[domain] = version
        other.append(f.raw)
    if graph_payload is None:
        raise WireError("not an ONNX model (no graph)")
    return Model(_parse_graph(graph_payload), metadata, opsets, other)


def _parse_graph(payload: memoryview) -> Graph:
    graph = Graph()
    for f in fields(payload):
        if f.wire_type != LENGTH:
            graph.other.append(f.raw)
        elif f.number == GRAPH_NODE:
            graph.nodes.append(parse_node(f.raw, f.value))
        elif f.number == GRAPH_INITIALIZER:
            tensor = list(fields(f.value))
            if any(t.number == TENSOR_DATA_LOCATION and t.value == 1 for t in tensor):
                raise UsageError("the model keeps its weights in external data files; sbcrt train needs one .onnx file")
            name = next((_text(t.value) for t in tensor if t.number == TENSOR_NAME), "")
            graph.initializers.append((name, f.raw))
        elif f.number in (GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VALUE_INFO):
            name = _first_string(f.value, VALUE_NAME)
            {GRAPH_INPUT: graph.inputs, GRAPH_OUTPUT: graph.outputs, GRAPH_VALUE_INFO: graph.value_info}[
                f.number
            ].append((name, f.raw))
        else:
            graph.other.append(f.raw)
    return graph


# -- writing --------------------------------------------------------------------------------------------------


def _encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 fields store negatives as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_int(number: int, value: int) -> bytes:
    return _encode_varint(number << 3 | VARINT) + _encode_varint(value)


def encode_bytes(number: int, payload: bytes | str) -> bytes:
    data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
    return _encode_varint(number << 3 | LENGTH) + _encode_varint(len(data)) + data


def attribute_int(name: str, value: int) -> bytes:
    return encode_bytes(ATTR_NAME, name) + encode_int(ATTR_I, value) + encode_int(ATTR_TYPE, ATTR_TYPE_INT)


def node(op_type: str, inputs: Iterable[str], outputs: Iterable[str], name: str, *attributes: bytes) -> bytes:
    """A NodeProto in the default domain, as a GraphProto `node` field."""
    body = b"".join(encode_bytes(NODE_INPUT, i) for i in inputs)
    body += b"".join(encode_bytes(NODE_OUTPUT, o) for o in outputs)
    body += encode_bytes(NODE_NAME, name) + encode_bytes(NODE_OP_TYPE, op_type)
    body += b"".join(encode_bytes(NODE_ATTRIBUTE, a) for a in attributes)
    return encode_bytes(GRAPH_NODE, body)


def initializer(name: str, array: np.ndarray) -> bytes:
    """A float32 TensorProto (little-endian raw_data), as a GraphProto `initializer` field."""
    values = np.ascontiguousarray(array, dtype="<f4")
    body = b"".join(encode_int(TENSOR_DIMS, d) for d in values.shape)
    body += encode_int(TENSOR_DATA_TYPE, FLOAT) + encode_bytes(TENSOR_NAME, name)
    body += encode_bytes(TENSOR_RAW_DATA, values.tobytes())
    return encode_bytes(GRAPH_INITIALIZER, body)


def value_info(number: int, name: str, dims: Iterable[int | str] | None) -> bytes:
    """A float tensor ValueInfoProto as a graph `input`/`output`/`value_info` field; dims None: shape unknown;
    a str dim is symbolic (the batch)."""
    tensor = encode_int(TENSOR_TYPE_ELEM, FLOAT)
    if dims is not None:
        shape = b"".join(
            encode_bytes(SHAPE_DIM, encode_bytes(DIM_PARAM, d) if isinstance(d, str) else encode_int(DIM_VALUE, d))
            for d in dims
        )
        tensor += encode_bytes(TENSOR_TYPE_SHAPE, shape)
    return encode_bytes(
        number, encode_bytes(VALUE_NAME, name) + encode_bytes(VALUE_TYPE, encode_bytes(TYPE_TENSOR, tensor))
    )


def needed_nodes(graph: Graph, outputs: Iterable[str]) -> list[Node]:
    """The nodes `outputs` depend on, in the graph's (topological) order."""
    producer = {out: i for i, n in enumerate(graph.nodes) for out in n.outputs}
    keep: set[int] = set()
    pending = [producer[o] for o in outputs if o in producer]
    while pending:
        index = pending.pop()
        if index in keep:
            continue
        keep.add(index)
        pending += [producer[i] for i in graph.nodes[index].inputs if i in producer]
    return [n for i, n in enumerate(graph.nodes) if i in keep]


def serialize(
    model: Model,
    *,
    nodes: list[Node],
    extra_nodes: list[bytes] = (),
    extra_initializers: list[bytes] = (),
    outputs: list[bytes],
    metadata: dict[str, str],
    replace_top: dict[int, bytes] | None = None,
) -> bytes:
    """The model with these nodes (base nodes kept, then new ones), only the initializers and value_info they
    use, these graph outputs and this metadata. `replace_top` swaps top-level fields by number (e.g. the
    producer name); every other field is copied unchanged."""
    used = {i for n in nodes for i in n.inputs}
    produced = {o for n in nodes for o in n.outputs}
    if any(n.has_subgraph for n in nodes):  # subgraph bodies may use initializers by name: keep them all
        used |= {name for name, _ in model.graph.initializers}
    parts: list[bytes] = [bytes(n.raw) for n in nodes]
    parts += list(extra_nodes)
    parts += [bytes(raw) for name, raw in model.graph.initializers if name in used]
    parts += list(extra_initializers)
    weights = {name for name, _ in model.graph.initializers}
    # Real inputs stay even if unused; old IR versions also list initializers as inputs: only the used ones.
    parts += [bytes(raw) for name, raw in model.graph.inputs if name in used or name not in weights]
    parts += list(outputs)
    parts += [bytes(raw) for name, raw in model.graph.value_info if name in produced]
    parts += [bytes(raw) for raw in model.graph.other]
    graph_bytes = b"".join(parts)

    replace_top = replace_top or {}
    top: list[bytes] = []
    seen: set[int] = set()
    for raw in model.other:
        number = next(fields(raw)).number
        if number in replace_top:
            if number not in seen:
                top.append(replace_top[number])
                seen.add(number)
            continue
        top.append(bytes(raw))
    top += [value for number, value in replace_top.items() if number not in seen]
    top.append(encode_bytes(MODEL_GRAPH, graph_bytes))
    for key, value in metadata.items():
        top.append(encode_bytes(MODEL_METADATA, encode_bytes(ENTRY_KEY, key) + encode_bytes(ENTRY_VALUE, value)))
    return b"".join(top)
