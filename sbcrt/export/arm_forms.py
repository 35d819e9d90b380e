"""Depthwise convolutions in forms onnxruntime's aarch64 kernels run faster: the same function, other ONNX ops.

Why: onnxruntime 1.32's aarch64 build has no NCHWc path (x86 only) and a direct NEON depthwise kernel for
3x3, stride 1, padding 1 alone; every other depthwise convolution is im2col plus a one-row GEMM per channel,
whose copies, integer bookkeeping and branches cost several times the arithmetic, and whose per-channel
overhead dominates on small maps. Counted on an emulated Cortex-A72 (benchmarks/arm_dw_forms.py, M aarch64
instructions per single-op model, EfficientNet-Lite0's shapes):

    depthwise conv          grouped Conv   chosen form
    5x5 s1 1152ch 7x7           14.9        6.6  taps, channels-last
    5x5 s2 144ch 56x56          23.3       16.3  phases (taps 17.0)
    3x3 s2 96ch 112x112         21.5       19.7  stride-1 Conv + strided Slice (taps 20.1, phases 37.5)
    3x3 s2 240ch 28x28           4.0        2.7  taps (strided 4.4)
    5x5 s1 672ch 14x14          18.6       14.9  taps
    5x5 s2 672ch 14x14           9.5        4.4  taps (phases 8.9)
    5x5 s1 240ch 28x28          18.2       (kept: taps 23.0, four 3x3 windows 26.4)
    3x3 s1 144ch 56x56           6.6       (kept: the direct kernel; taps 22.7)
    3x3 s1 480ch 14x14           2.3       (kept: taps 4.2)

EfficientNet-Lite0 as a whole: 325.7 M -> 273.9 M on both Pi CPUs (README, ARM).

The forms (default-domain ops only; weights rearranged exactly, so results differ from the grouped Conv only
by float summation order):
- taps: channels-last, one Slice, Mul and Add per tap (`taps_nodes`); every op runs over long contiguous rows.
- phases (stride 2): SpaceToDepth(2) splits the input into its four phase images; each output then needs at
  most 3x3 taps of each phase: one 3x3 stride-1 depthwise Conv over the 4C phase channels (the direct kernel)
  and a ReduceSum over the phases.
- strided (3x3 stride 2): the 3x3 stride-1 Conv (direct kernel) at full resolution, then every second pixel.

`rewrite_depthwise(model)` applies the measured choice (`choose_form`) to every depthwise Conv of a graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper, numpy_helper, shape_inference

# Outputs at most this size (height) take the channels-last taps form, unless 3x3 stride 1: fewer instructions
# at 7x7 and 14x14 (above); at 28x28 the grouped Conv is cheaper.
TAPS_MAX_SIZE = 14


def choose_form(kernel: int, stride: int, pad: tuple[int, int], size: int) -> str | None:
    """The form that counted fewest instructions for this depthwise convolution, or None to keep the Conv.

    `pad` is (before, after), the same on both axes: symmetric k // 2 (PyTorch) or TF's "same" at stride 2,
    one less before than after. `size` is the input map's height (= width)."""
    symmetric = pad == (kernel // 2, kernel // 2)
    tf_same = stride == 2 and pad == (kernel // 2 - 1, kernel // 2)
    if kernel not in (3, 5) or stride not in (1, 2) or not (symmetric or tf_same):
        return None
    if size // stride <= TAPS_MAX_SIZE and (kernel, stride) != (3, 1):
        return "taps"
    if stride == 2 and size % 2 == 0:
        return "phases" if kernel == 5 else "strided"
    return None


def depthwise_nodes(
    form: str,
    x: str,
    y: str,
    weight: np.ndarray,
    bias: np.ndarray | None,
    stride: int,
    pad: tuple[int, int],
    in_size: tuple[int, int],
    prefix: str,
) -> tuple[list[NodeProto], list[TensorProto]]:
    """Nodes computing y = depthwise Conv(x, weight (C, 1, k, k), bias, stride, pads) of an `in_size` map in
    `form`; `pad` is (before, after) on both axes. `prefix` makes the new tensor names unique in the graph.
    """
    if form == "taps":
        return taps_nodes(x, y, weight, bias, stride, pad, in_size, prefix)
    bias = np.zeros(weight.shape[0], np.float32) if bias is None else bias.astype(np.float32)
    if form == "phases":
        return _phases(x, y, weight, bias, pad, (in_size[0] // 2, in_size[1] // 2), prefix)
    if form == "strided":
        return _strided(x, y, weight, bias, pad, in_size, prefix)
    raise ValueError(f"unknown depthwise form {form!r}")


def _strided(x, y, weight, bias, pad, in_size, prefix):
    k = weight.shape[2]
    # The stride-1 Conv pads k // 2 on both sides; TF's padding (one less before) starts one pixel later.
    first = k // 2 - pad[0]
    inits = [
        numpy_helper.from_array(weight.astype(np.float32), f"{prefix}/w"),
        numpy_helper.from_array(bias, f"{prefix}/b"),
        numpy_helper.from_array(np.array([first, first], np.int64), f"{prefix}/starts"),
        numpy_helper.from_array(np.array(in_size, np.int64), f"{prefix}/ends"),
        numpy_helper.from_array(np.array([2, 3], np.int64), f"{prefix}/axes"),
        numpy_helper.from_array(np.array([2, 2], np.int64), f"{prefix}/steps"),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            [x, f"{prefix}/w", f"{prefix}/b"],
            [f"{prefix}/full"],
            group=weight.shape[0],
            kernel_shape=[k, k],
            pads=[k // 2] * 4,
        ),  # fmt: skip
        helper.make_node(
            "Slice",
            [f"{prefix}/full", f"{prefix}/starts", f"{prefix}/ends", f"{prefix}/axes", f"{prefix}/steps"],
            [y],
        ),
    ]
    return nodes, inits


def _phases(x, y, weight, bias, pad, out_size, prefix):
    channels = weight.shape[0]
    # Output (i, j) reads input rows 2i + u, u in [-before, k - 1 - before]: phase r = u mod 2, row i + d of
    # that phase with
    # d = (u - r) / 2 in [-1, 1]. SpaceToDepth puts phase (r, s) of channel c at channel (2r + s) C + c.
    phase_weight = np.zeros((4 * channels, 1, 3, 3), np.float32)
    kernel = weight.shape[2]
    for u in range(-pad[0], kernel - pad[0]):
        r, d = u % 2, (u - u % 2) // 2
        for v in range(-pad[0], kernel - pad[0]):
            s, e = v % 2, (v - v % 2) // 2
            start = (2 * r + s) * channels
            phase_weight[start : start + channels, 0, d + 1, e + 1] = weight[:, 0, u + pad[0], v + pad[0]]
    phase_bias = np.zeros(4 * channels, np.float32)
    phase_bias[:channels] = bias
    names = {k: f"{prefix}/{k}" for k in ("s2d", "w", "b", "conv", "shape", "split", "axes")}
    inits = [
        numpy_helper.from_array(phase_weight, names["w"]),
        numpy_helper.from_array(phase_bias, names["b"]),
        numpy_helper.from_array(np.array([-1, 4, channels, *out_size], np.int64), names["shape"]),
        numpy_helper.from_array(np.array([1], np.int64), names["axes"]),
    ]
    nodes = [
        helper.make_node("SpaceToDepth", [x], [names["s2d"]], blocksize=2),
        helper.make_node(
            "Conv",
            [names["s2d"], names["w"], names["b"]],
            [names["conv"]],
            group=4 * channels,
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),  # fmt: skip
        # (N, 4C, h, w) -> (N, 4, C, h, w), a view: the sum over the phases is one ReduceSum.
        helper.make_node("Reshape", [names["conv"], names["shape"]], [names["split"]]),
        helper.make_node("ReduceSum", [names["split"], names["axes"]], [y], keepdims=0),
    ]
    return nodes, inits


def taps_nodes(
    x: str,
    y: str,
    weight: np.ndarray,
    bias: np.ndarray | None,
    stride: int,
    pad: int,
    in_size: tuple[int, int],
    prefix: str,
) -> tuple[list[NodeProto], list[TensorProto]]:
    """Depthwise convolution channels-last, one Mul and Add per tap: y = sum over taps of w[tap] * shifted x.

    In (N, H, W, C) every op runs over long contiguous rows (a tap's slice is H runs of W*C floats; its weight
    broadcasts along the last axis), where channels-first spans are one small map per channel. The layout
    changes go through a 3-D Reshape/Transpose/Reshape, which onnxruntime's transpose optimizer leaves in place
    (a plain 4-D Transpose it would push through the taps and cancel, back to channels-first).
    """
    channels, _, kernel, _ = weight.shape
    h, w = in_size
    oh, ow = (h + sum(pad) - kernel) // stride + 1, (w + sum(pad) - kernel) // stride + 1

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, f"{prefix}/{name}"))
        return f"{prefix}/{name}"

    nodes: list[NodeProto] = []
    inits: list[TensorProto] = []
    i64 = np.int64
    nodes += [
        helper.make_node("Reshape", [x, const("nc_hw", np.array([0, channels, h * w], i64))], [f"{prefix}/a"]),
        helper.make_node("Transpose", [f"{prefix}/a"], [f"{prefix}/b"], perm=[0, 2, 1]),
        helper.make_node(
            "Reshape", [f"{prefix}/b", const("nhwc", np.array([0, h, w, channels], i64))], [f"{prefix}/c"]
        ),
        helper.make_node(
            "Pad",
            [f"{prefix}/c", const("pads", np.array([0, *pad[:1] * 2, 0, 0, *pad[1:] * 2, 0], i64))],
            [f"{prefix}/padded"],
        ),
    ]
    axes, steps = const("axes", np.array([1, 2], i64)), const("steps", np.array([stride, stride], i64))
    acc = None
    for a in range(kernel):
        for b in range(kernel):
            t = f"t{a}{b}"
            starts = const(f"{t}/starts", np.array([a, b], i64))
            ends = const(f"{t}/ends", np.array([a + (oh - 1) * stride + 1, b + (ow - 1) * stride + 1], i64))
            tap_weight = const(f"{t}/w", weight[:, 0, a, b].astype(np.float32))
            nodes += [
                helper.make_node("Slice", [f"{prefix}/padded", starts, ends, axes, steps], [f"{prefix}/{t}/s"]),
                helper.make_node("Mul", [f"{prefix}/{t}/s", tap_weight], [f"{prefix}/{t}/m"]),
            ]
            if acc is None:
                acc = f"{prefix}/{t}/m"
            else:
                nodes.append(helper.make_node("Add", [acc, f"{prefix}/{t}/m"], [f"{prefix}/{t}/acc"]))
                acc = f"{prefix}/{t}/acc"
    if bias is not None:
        nodes.append(helper.make_node("Add", [acc, const("bias", bias.astype(np.float32))], [f"{prefix}/biased"]))
        acc = f"{prefix}/biased"
    nodes += [
        helper.make_node("Reshape", [acc, const("n_hw_c", np.array([0, oh * ow, channels], i64))], [f"{prefix}/d"]),
        helper.make_node("Transpose", [f"{prefix}/d"], [f"{prefix}/e"], perm=[0, 2, 1]),
        helper.make_node("Reshape", [f"{prefix}/e", const("nchw", np.array([0, channels, oh, ow], i64))], [y]),
    ]
    return nodes, inits


def _attributes(node: NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def rewrite_depthwise(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """`model` with every depthwise Conv that has a cheaper form (choose_form) rewritten; returns it and how
    many convolutions took each form. Needs static spatial sizes (the batch may be dynamic)."""
    inferred = shape_inference.infer_shapes(model)
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input]:
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    inits = {t.name: t for t in model.graph.initializer}
    # Inputs' users, so a weight another node shares stays in the graph when one of its Convs is rewritten.
    used: dict[str, int] = {}
    for name in (n for node in model.graph.node for n in node.input):
        used[name] = used.get(name, 0) + 1
    nodes, added, removed, counts = [], [], set(), {}
    for index, node in enumerate(model.graph.node):
        attrs = _attributes(node)
        weight = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        shape = shapes.get(node.input[0]) if weight is not None else None
        form = None
        if weight is not None and shape and len(shape) == 4 and shape[2] > 0 and shape[3] == shape[2]:
            w = numpy_helper.to_array(weight)
            channels, kernel = shape[1], w.shape[-1]
            pads = attrs.get("pads", [0] * 4)
            strides = attrs.get("strides", [1, 1])
            depthwise = attrs.get("group", 1) == channels == w.shape[0] and w.shape[1:] == (1, kernel, kernel)
            same_axes = pads[0] == pads[1] and pads[2] == pads[3] and strides[0] == strides[1]
            plain = attrs.get("dilations", [1, 1]) == [1, 1] and same_axes
            plain = plain and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
            if depthwise and plain:
                form = choose_form(kernel, strides[0], (pads[0], pads[2]), shape[2])
        if form is None:
            nodes.append(node)
            continue
        bias = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        new_nodes, new_inits = depthwise_nodes(
            form,
            node.input[0],
            node.output[0],
            w,
            bias,
            strides[0],
            (pads[0], pads[2]),
            (shape[2], shape[3]),
            f"arm_dw{index}",
        )
        nodes += new_nodes
        added += new_inits
        for name in filter(None, node.input[1:]):
            used[name] -= 1
            if not used[name]:
                removed.add(name)
        counts[form] = counts.get(form, 0) + 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name not in removed]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, *added])
    return model, counts
