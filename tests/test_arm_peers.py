"""benchmarks/arm_count.py's LiteRT peer: which PyTorch weights it converts for an ONNX file, read from sbcrt's
metadata. (The conversion and the emulated count themselves need litert-torch's 2 GB venv and QEMU: they run
in `ARM_COUNT_ARGS="--peers litert" make arm-count`, not here.)"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from benchmarks.arm_count import parse_peers, peers
from sbcrt.models.registry import get_architecture
from sbcrt.runtime.metadata import ModelConfig


def tiny_export(path: Path, config: ModelConfig | None) -> Path:
    """A real ONNX file with sbcrt's metadata (or none); the graph itself does not matter to the weight lookup."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["scores"])],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in (config.to_props() if config else {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


def test_litert_is_a_peer_and_unknown_names_are_refused() -> None:
    assert parse_peers("ncnn,litert") == ["ncnn", "litert"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown peer tflite"):
        parse_peers("litert,tflite")


def test_seeded_exports_convert_with_the_seed_and_lite0_with_its_default_weights(tmp_path: Path) -> None:
    seeded = tiny_export(tmp_path / "xs.onnx", ModelConfig(architecture="sbcformer_xs", untrained=True))
    assert peers.litert_weights(seeded) == ("sbcformer_xs", ["--seed", "0"])

    weights = get_architecture("efficientnet_lite0").default_weights()
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    lite0 = tiny_export(tmp_path / "lite0.onnx", ModelConfig(architecture="efficientnet_lite0", checkpoint_sha256=sha))
    assert peers.litert_weights(lite0) == ("efficientnet_lite0", ["--checkpoint", str(weights)])


def test_weights_it_cannot_know_are_a_clear_error(tmp_path: Path) -> None:
    tuned = ModelConfig(architecture="efficientnet_lite0", checkpoint_sha256="ab" * 32)
    with pytest.raises(SystemExit, match="not the default ones"):
        peers.litert_weights(tiny_export(tmp_path / "tuned.onnx", tuned))
    with pytest.raises(SystemExit, match="needs an sbcrt export"):
        peers.litert_weights(tiny_export(tmp_path / "foreign.onnx", None))
