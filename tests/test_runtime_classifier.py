"""The Classifier API on small generated models: loading, metadata and its absence, overrides, errors, the
graph cache, and the promise that the runtime never loads torch or onnx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sbcrt import Classifier
from sbcrt.errors import UsageError
from sbcrt.runtime.preprocess import Preprocessing, preprocess_frame, preprocess_image
from sbcrt.runtime.session import physical_cores

SAMPLES = Path(__file__).resolve().parents[1] / "sbcrt" / "data" / "samples"


def test_model_with_metadata(runtime_models: dict[str, Path]) -> None:
    clf = Classifier(runtime_models["tiny"], cache_dir=False)
    assert clf.has_metadata and clf.config.architecture == "tiny"
    assert clf.labels == ["ant", "bee", "cat", "dog"]
    assert clf.input_shape == (1, 3, 224, 224)
    assert clf.session_info.threads == physical_cores()
    result = clf.classify(SAMPLES / "coffee.png", top_k=3)
    assert [p.label for p in result.topk] == [clf.labels[p.index] for p in result.topk]
    assert len(result.topk) == 3 and result.logits.shape == (4,)
    probs = [p.prob for p in result.topk]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-9
    assert set(result.timing_ms) == {"decode", "preprocess", "inference", "postprocess", "total"}
    assert result.timing_ms["total"] >= result.timing_ms["inference"] > 0


def test_model_without_metadata_uses_its_shape_and_defaults(runtime_models: dict[str, Path]) -> None:
    clf = Classifier(runtime_models["bare"], cache_dir=False)
    assert not clf.has_metadata
    assert clf.input_shape == (1, 3, 160, 160)
    assert clf.preprocessing == Preprocessing(resize_size=183, crop=(160, 160))  # 160 / 0.875, ImageNet mean/std
    assert clf.labels[:2] == ["class_0", "class_1"]  # the names `sbcrt export` gives unnamed classes
    assert any("no sbcrt metadata" in note for note in clf.notes)
    assert clf.classify(SAMPLES / "chelsea.png").top1.label.startswith("class_")
    with pytest.raises(UsageError, match="takes 160x160 images, but the crop is 224x224"):
        Classifier(runtime_models["bare"], cache_dir=False, size=224)


def test_overrides_reach_the_model(runtime_models: dict[str, Path]) -> None:
    grey = np.full((300, 300, 3), 153, np.uint8)  # 0.6 on [0, 1]
    plain = Classifier(runtime_models["probe"], cache_dir=False)
    shifted = Classifier(runtime_models["probe"], cache_dir=False, mean=(0.5, 0.4, 0.1), std=(0.5, 0.5, 2.0))
    assert plain.classify(grey).logits == pytest.approx([0.6] * 3, abs=1e-4)
    assert shifted.classify(grey).logits == pytest.approx([0.2, 0.4, 0.25], abs=1e-4)
    renamed = Classifier(runtime_models["probe"], cache_dir=False, labels=["r", "g", "b"])
    assert renamed.labels == ["r", "g", "b"]
    with pytest.raises(UsageError, match="2 labels given, but model .* scores 3 classes"):
        Classifier(runtime_models["probe"], cache_dir=False, labels=["r", "g"])


def test_unusable_models_give_one_line_usage_errors(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    cases = {
        runtime_models["tokens"]: "input 'tokens' is tensor\\(int64\\) \\[1, 16\\], not an image tensor",
        text: "not an ONNX model",
        tmp_path / "missing.onnx": "no such file",
        tmp_path: "not a file",
    }
    for path, message in cases.items():
        with pytest.raises(UsageError, match=message) as caught:
            Classifier(path, cache_dir=False)
        assert "\n" not in str(caught.value)


def test_crop_geometry_follows_torchvision() -> None:
    spec = Preprocessing()
    assert spec.resized_size(1920, 1080) == (455, 256)  # int(256 * 1920 / 1080) = 455, truncated
    assert spec.resized_size(375, 500) == (256, 341)
    assert spec.crop_origin(455, 256) == (116, 16)  # (455 - 224) / 2 = 115.5 rounds half to even: 116
    assert spec.crop_origin(457, 256) == (116, 16)  # 116.5 -> 116
    assert spec.crop_origin(200, 256) == (-12, 16)  # smaller than the crop: zero padding, as torchvision


def test_exact_path_is_resize_then_crop(tmp_path: Path) -> None:
    # An odd size where both the truncated long side and the half-pixel crop offset matter.
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (517, 333, 3), dtype=np.uint8))
    spec = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    resized = image.resize((256, 397), Image.Resampling.BICUBIC)  # int(256 * 517 / 333) = 397
    expected = np.asarray(resized)[86:310, 16:240].astype(np.float32) / np.float32(255)  # top round(86.5)=86
    expected = ((expected - np.float32(0.5)) / np.float32(0.25)).transpose(2, 0, 1)[None]
    assert np.array_equal(preprocess_image(image, spec), expected)


def test_fast_path_stays_close_to_exact_on_a_frame() -> None:
    # A smooth gradient plus mild noise at 1080p; the per-image agreement on real photos is in test_runtime_lite0.
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:1080, 0:1920]
    frame = np.stack([x / 1920 * 255, y / 1080 * 255, (x + y) % 256], axis=-1) + rng.normal(0, 4, (1080, 1920, 3))
    frame = np.clip(frame, 0, 255).astype(np.uint8)
    spec = Preprocessing(mean=(0, 0, 0), std=(1, 1, 1))
    exact = preprocess_image(Image.fromarray(frame), spec)
    fast = preprocess_frame(np.ascontiguousarray(frame[:, :, ::-1]), spec, bgr=True)
    assert fast.shape == exact.shape == (1, 3, 224, 224)
    difference = np.abs(fast - exact) * 255
    # The fast path does PIL's arithmetic (tests/test_preprocess.py): measured max 1 level, mean ~1e-5.
    assert difference.mean() < 0.001 and difference.max() <= 1.0 + 1e-3


@pytest.mark.parametrize("channels", [1, 4])
def test_fast_path_accepts_grey_and_four_channel_frames(runtime_models: dict[str, Path], channels: int) -> None:
    clf = Classifier(runtime_models["probe"], cache_dir=False)
    frame = np.zeros((480, 640, channels), np.uint8)
    frame[..., 0] = 200  # grey: every channel 200; BGRX: blue 200
    means = clf.classify_frame(frame).logits * 255
    expected = [200, 200, 200] if channels == 1 else [0, 0, 200]
    assert means == pytest.approx(expected, abs=0.5)


def test_graph_cache_makes_the_second_start_load_the_optimised_graph(
    runtime_models: dict[str, Path], tmp_path: Path
) -> None:
    first = Classifier(runtime_models["tiny"], cache_dir=tmp_path, spin=False)
    assert not first.session_info.cache_hit
    cached = first.session_info.cache_path
    assert cached is not None and cached.is_file() and cached.parent == tmp_path
    assert not list(tmp_path.glob("*.partial"))
    second = Classifier(runtime_models["tiny"], cache_dir=tmp_path, threads=1)
    assert second.session_info.cache_hit and second.session_info.cache_path == cached
    assert second.labels == first.labels  # the metadata survives in the optimised graph
    photo = SAMPLES / "chelsea.png"
    assert np.allclose(first.classify(photo).logits, second.classify(photo).logits, atol=1e-5)

    cached.write_bytes(b"half-written")  # a power cut while saving
    third = Classifier(runtime_models["tiny"], cache_dir=tmp_path)
    assert not third.session_info.cache_hit and any("damaged" in n for n in third.session_info.notes)
    assert Classifier(runtime_models["tiny"], cache_dir=tmp_path).session_info.cache_hit


def test_the_runtime_never_loads_torch_or_onnx(runtime_models: dict[str, Path]) -> None:
    script = (
        "import sys, json\n"
        "from sbcrt import Classifier\n"
        f"clf = Classifier({str(runtime_models['tiny'])!r})\n"
        f"clf.classify({str(SAMPLES / 'chelsea.png')!r})\n"
        "import numpy as np\n"
        "clf.classify_frame(np.zeros((720, 1280, 3), np.uint8))\n"
        "from sbcrt.cli import build_parser\n"
        "build_parser()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'onnxscript'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []


def test_fast_file_path_decodes_big_jpegs_at_reduced_scale(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    # A 3000x2000 JPEG: the fast path may let libjpeg decode at 1/2 scale, the result must stay close.
    y, x = np.mgrid[0:2000, 0:3000]
    pixels = np.stack([x * 255 // 3000, y * 255 // 2000, (x // 50 + y // 50) % 2 * 255], axis=-1).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(pixels).save(path, quality=92)
    clf = Classifier(runtime_models["probe"], cache_dir=False)
    exact, fast = clf.preprocess(path), clf.preprocess(path, fast=True)
    assert np.abs(exact - fast).mean() * 255 < 2.0
    assert clf.classify(path, fast=True).logits == pytest.approx(clf.classify(path).logits, abs=2 / 255)


@pytest.mark.parametrize(("preset", "expected"), [(None, "1"), ("0", "0")])
def test_onnxruntime_telemetry_is_off_unless_the_user_wants_it(preset: str | None, expected: str) -> None:
    # onnxruntime >= 1.29 reads ORT_DISABLE_TELEMETRY once, when it initialises: importing sbcrt must set it first.
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    if preset is not None:
        env["ORT_DISABLE_TELEMETRY"] = preset
    code = "import os, sbcrt, onnxruntime; print(os.environ['ORT_DISABLE_TELEMETRY'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == expected
