"""Shared fixtures: the shared photos (read from ../shared, never copied) and real exported models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.data import shared_dir as shared_root

REPO = Path(__file__).resolve().parents[1]
SHARED = shared_root()
SKIP_REASON = "shared ImageNet photos not found"
ENABLE_HINT = "set SBCRT_SHARED=/path/to/shared (the folder holding data/ and spec/)"


def shared_missing() -> str | None:
    """Why the shared photos cannot be used, or None when they are there."""
    if (SHARED / "data" / "imagenet-samples").is_dir():
        return None
    return f"{SKIP_REASON} at {SHARED}"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder (data/, spec/). Without it the tests that need it skip, except where leaving them out
    would hide something: under CI (which lays the folder beside the clone and must run everything), and when
    SBCRT_SHARED was set by hand to a folder that does not hold them (pointing it at shared/data, say)."""
    problem = shared_missing()
    if problem is None:
        return SHARED
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{problem} (CI=true: these tests must run; {ENABLE_HINT})")
    if os.environ.get("SBCRT_SHARED"):
        pytest.fail(f"{problem}: SBCRT_SHARED must name the folder holding data/imagenet-samples and spec/")
    pytest.skip(problem)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line, before pytest's closing one, when tests skipped for want of the shared photos."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if SKIP_REASON in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"{SKIP_REASON} at {SHARED}: {len(skipped)} tests skipped; {ENABLE_HINT}", yellow=True
        )


@pytest.fixture(scope="session")
def imagenet_samples(shared_dir: Path) -> list[tuple[Path, int]]:
    """The 250 shared ImageNet photos with their class index (synset position in imagenet_classes.txt)."""
    synsets = [
        line.split()[0]
        for line in (shared_dir / "data" / "imagenet_classes.txt").read_text().splitlines()
        if line.strip()
    ]
    index = {s: i for i, s in enumerate(synsets)}
    photos = sorted((shared_dir / "data" / "imagenet-samples").glob("*.JPEG"))
    return [(p, index[p.name.split("_", 1)[0]]) for p in photos]


@pytest.fixture(scope="session")
def lite0_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientNet-Lite0 with its real ImageNet weights, exported once by `sbcrt export` as a user runs it."""
    out = tmp_path_factory.mktemp("lite0") / "efficientnet_lite0.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "sbcrt", "export", "efficientnet_lite0", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    # The report a user sees: sizes, what folding removed, and every parity check passed.
    assert "raw:   BatchNormalization 49" in done.stdout and "final: BatchNormalization 0" in done.stdout
    assert done.stdout.count(" ok") == 3 and "FAILED" not in done.stdout
    return out


# -- small generated models for the runtime's tests (built with onnx.helper; the runtime itself never imports onnx)


def build_onnx(
    path: Path,
    body: str,
    *,
    num_classes: int = 4,
    size: int = 224,
    config: dict | None = None,
) -> Path:
    """Write a small real model. body: "probe" (output = per-channel mean of the input, so a test can read what
    preprocessing fed the model), "conv" (conv + relu + global pool + gemm) or "tokens" (an int64 text input).
    config: ModelConfig fields to store as sbcrt metadata (None = a model exported without sbcrt)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sbcrt.runtime.metadata import ModelConfig

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])
    if body == "probe":
        nodes = [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["scores"]),
        ]
        inputs, initializers, num_classes = [image], [], 3
    elif body == "conv":
        rng = np.random.default_rng(0)
        initializers = [
            numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "conv_w"),
            numpy_helper.from_array(rng.standard_normal((num_classes, 8)).astype(np.float32), "fc_w"),
            numpy_helper.from_array(np.zeros(num_classes, np.float32), "fc_b"),
        ]
        nodes = [
            helper.make_node("Conv", ["image", "conv_w"], ["conv"], strides=[2, 2], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["relu"]),
            helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["scores"], transB=1),
        ]
        inputs = [image]
    elif body == "tokens":
        tokens = helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, 16])
        nodes = [
            helper.make_node("Cast", ["tokens"], ["as_float"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["as_float"], ["scores"], keepdims=1),
        ]
        inputs, initializers, num_classes = [tokens], [], 1
    else:
        raise ValueError(body)
    output = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, num_classes])
    graph = helper.make_graph(nodes, body, inputs, [output], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    if config is not None:
        settings = {"num_classes": num_classes, "input_size": [3, size, size], "crop_size": size, **config}
        settings.setdefault("resize_size", round(size / 0.875))
        helper.set_model_props(model, ModelConfig(**settings).to_props())
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def runtime_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small generated models: "probe" (mean 0, std 1: the output is each channel's mean pixel on [0, 1]),
    "tiny" (4 labelled classes), "bare" (no sbcrt metadata, 160x160, 10 classes), "tokens" (not an image)."""
    root = tmp_path_factory.mktemp("runtime-models")
    identity = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    return {
        "probe": build_onnx(root / "probe.onnx", "probe", config={**identity, "labels": ["red", "green", "blue"]}),
        "tiny": build_onnx(
            root / "tiny.onnx",
            "conv",
            config={"architecture": "tiny", "labels": ["ant", "bee", "cat", "dog"]},
        ),
        "bare": build_onnx(root / "bare.onnx", "conv", num_classes=10, size=160),
        "tokens": build_onnx(root / "tokens.onnx", "tokens"),
    }


@pytest.fixture(autouse=True)
def _private_graph_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never write optimised graphs into the user's ~/.cache (subprocesses inherit the variable)."""
    monkeypatch.setenv("SBCRT_CACHE", str(tmp_path_factory.getbasetemp() / "graph-cache"))
