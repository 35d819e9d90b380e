"""`sbcrt export` end to end: real checkpoints on disk, real ONNX files, real onnxruntime sessions."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sbcrt.errors import SbcrtError
from sbcrt.export import pipeline
from sbcrt.export.checkpoint import load_checkpoint, load_weights
from sbcrt.export.graph import op_counts as graph_ops
from sbcrt.export.pipeline import export_model
from sbcrt.models.registry import get_architecture
from sbcrt.runtime.images import open_image
from sbcrt.runtime.metadata import ModelConfig
from sbcrt.runtime.preprocess import Preprocessing, preprocess_image
from tests.support.export import authors_checkpoint, save, seeded_state_dict

PAPER_GMACS = {"sbcformer_xs": 0.47, "sbcformer_s": 0.64, "sbcformer_b": 1.07, "sbcformer_l": 2.00}
SAMPLE = Path(__file__).resolve().parents[1] / "sbcrt" / "data" / "samples" / "chelsea.png"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sbcrt", *args], capture_output=True, text=True, env=env, timeout=600)


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module", params=list(PAPER_GMACS))
def sbcformer_export(request, tmp_path_factory) -> tuple[str, Path, pipeline.ExportReport, dict]:
    """Each SBCFormer variant, seeded, saved in the authors' training-checkpoint format, then exported."""
    arch = request.param
    tmp = tmp_path_factory.mktemp(arch)
    state_dict = seeded_state_dict(arch, seed=7)
    ckpt = save(authors_checkpoint(state_dict, arch), tmp / f"{arch}.pth")
    # The raw translation (a second export) only feeds the report's node counts: once is enough.
    report = export_model(arch, tmp / f"{arch}.onnx", checkpoint=ckpt, raw_graph_stats=arch == "sbcformer_xs")
    return arch, tmp / f"{arch}.onnx", report, state_dict


def test_sbcformer_export_matches_pytorch_and_is_fused(sbcformer_export) -> None:
    arch, path, report, state_dict = sbcformer_export
    assert path.is_file() and report.size_bytes == path.stat().st_size
    assert all(check.passed for check in report.parity) and len(report.parity) == 3

    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Pad" not in ops and "GatherND" not in ops
    if report.ops_raw is not None:  # the raw translation had them: folding did the work
        assert report.ops_raw["BatchNormalization"] == 53 and report.ops_raw["GatherND"] == 7
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # standard ONNX only
    counts = report.ops_final
    n_mattn = sum(k.startswith("sbcformer_blocks.") and k.endswith(".norm1.weight") for k in state_dict)
    assert counts["LayerNormalization"] == 2 * n_mattn + 1  # one op per LayerNorm, the head's included
    assert counts["HardSigmoid"] == 3
    assert counts["Gelu"] > 0 and "Erf" not in counts and "Concat" not in counts  # opset 20 GELU; split fusion
    assert report.macs / 1e9 == pytest.approx(PAPER_GMACS[arch], abs=0.006)

    # An independent check of the written file: onnxruntime vs eager PyTorch on a real photo.
    spec = get_architecture(arch)
    reference = spec.build(1000)
    reference.load_state_dict(state_dict)
    x = preprocess_image(open_image(SAMPLE), Preprocessing())
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_metadata_makes_the_file_self_describing(sbcformer_export) -> None:
    arch, path, _, _ = sbcformer_export
    config = ModelConfig.from_props(metadata(path))
    assert config is not None
    assert config.architecture == arch and config.num_classes == 1000 and len(config.labels) == 1000
    assert config.labels[0] == "tench" and config.input_size == [3, 224, 224]
    assert (config.resize_size, config.crop_size, config.interpolation) == (256, 224, "bicubic")
    assert config.mean == [0.485, 0.456, 0.406] and config.std == [0.229, 0.224, 0.225]
    assert len(config.checkpoint_sha256) == 64 and config.exporter.startswith("sbcrt ")
    assert config.untrained is False


def test_lite0_export_uses_conv_pads_and_its_own_normalisation(lite0_onnx: Path) -> None:
    model = onnx.load(str(lite0_onnx))
    ops = [n.op_type for n in model.graph.node]
    assert "Pad" not in ops and "BatchNormalization" not in ops
    asymmetric = [
        list(a.ints) for n in model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads"
    ]
    assert [0, 0, 1, 1] in asymmetric  # TF SAME on stride 2: the extra pixel goes after
    config = ModelConfig.from_props(metadata(lite0_onnx))
    assert config.mean == pytest.approx([127 / 255] * 3) and config.std == pytest.approx([128 / 255] * 3)


def test_lite0_reaches_the_reference_accuracy_on_real_photos(lite0_onnx: Path, imagenet_samples) -> None:
    session = ort.InferenceSession(str(lite0_onnx), providers=["CPUExecutionProvider"])
    preprocessing = Preprocessing.from_config(ModelConfig.from_props(metadata(lite0_onnx)))
    batch = np.concatenate([preprocess_image(open_image(p), preprocessing) for p, _ in imagenet_samples])
    labels = np.array([c for _, c in imagenet_samples])
    logits = session.run(None, {"input": batch})[0]
    top1 = float(np.mean(logits.argmax(1) == labels))
    top5 = float(np.mean((np.argsort(-logits, 1)[:, :5] == labels[:, None]).any(1)))
    # The reference (spec/README.md: the authors' recipe in PyTorch): top-1 0.896, top-5 0.984.
    assert top1 == pytest.approx(0.896, abs=0.01) and top5 == pytest.approx(0.984, abs=0.01)

    # Eager PyTorch (slow here) on every tenth photo: the same classes as the exported file.
    spec = get_architecture("efficientnet_lite0")
    model = spec.build(1000)
    load_weights(model, load_checkpoint(spec.default_weights()).state_dict, spec.name)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch[::10])).numpy()
    assert np.array_equal(expected.argmax(1), logits[::10].argmax(1))
    assert np.abs(expected - logits[::10]).max() <= 1e-4 * np.abs(expected).max()


def test_int8_export_stays_within_a_point_of_fp32(shared_dir: Path, imagenet_samples, tmp_path: Path) -> None:
    out = tmp_path / "lite0_int8.onnx"
    photos = shared_dir / "data" / "imagenet-samples"
    report = export_model("efficientnet_lite0", out, int8=True, calib_dir=photos, raw_graph_stats=False)
    assert report.int8 is not None and report.int8.photos == 100  # the holdout the calibration did not see
    assert report.int8.top1_agreement >= 0.9 and report.int8.cosine > 0.9
    model = onnx.load(str(out))
    ops = graph_ops(model)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)  # standard ONNX only
    config = ModelConfig.from_props(metadata(out))
    assert config.precision == "int8" and config.architecture == "efficientnet_lite0"

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batch = np.concatenate(
        [preprocess_image(open_image(p), Preprocessing.from_config(config)) for p, _ in imagenet_samples]
    )
    labels = np.array([c for _, c in imagenet_samples])
    top1 = float(np.mean(session.run(None, {"input": batch})[0].argmax(1) == labels))
    assert top1 == pytest.approx(0.896, abs=0.01)  # fp32's top-1 on these photos (the reference)


def test_int8_needs_calibration_photos(tmp_path: Path) -> None:
    result = run_cli("export", "efficientnet_lite0", "--int8", "-o", str(tmp_path / "q.onnx"))
    assert result.returncode == 2 and "--int8 needs --calib" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("export", "efficientnet_lite0", "--int8", "--calib", str(empty), "-o", str(tmp_path / "q.onnx"))
    assert result.returncode == 2 and "no photos" in result.stderr
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("layout", ["authors", "bare", "ddp", "timm_state_dict", "timm_model_ema"])
def test_every_checkpoint_layout_loads_the_same_weights(layout: str, tmp_path: Path) -> None:
    sd = seeded_state_dict("sbcformer_xs", seed=3)
    obj = {
        "authors": authors_checkpoint(sd, "sbcformer_xs"),
        "bare": sd,
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "timm_state_dict": {"state_dict": sd, "epoch": 3, "arch": "sbcformer_xs"},
        "timm_model_ema": {"model_ema": {f"module.{k}": v for k, v in sd.items()}},
    }[layout]
    loaded = load_checkpoint(save(obj, tmp_path / "ckpt.pth")).state_dict
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


class _Payload:
    """Pickles to a call of os.system that would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": seeded_state_dict("sbcformer_xs"), "hook": _Payload(marker)}, evil)
    with open(tmp_path / "plain.pkl", "wb") as fh:  # a raw pickle, not even a torch zip
        pickle.dump(_Payload(marker), fh)
    for path in (evil, tmp_path / "plain.pkl"):
        result = run_cli("export", "sbcformer_xs", "--checkpoint", str(path), "-o", str(tmp_path / "x.onnx"))
        assert result.returncode == 1
        assert "refusing to unpickle" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    assert not (tmp_path / "x.onnx").exists()


def test_fine_tuned_head_with_labels(tmp_path: Path, shared_dir: Path) -> None:
    labels = ["cow", "sheep", "pig", "fox", "empty pen"]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n")
    ckpt = save(authors_checkpoint(seeded_state_dict("sbcformer_xs", seed=5, num_classes=5), "x"), tmp_path / "ft.pth")
    out = tmp_path / "barn.onnx"
    report = export_model(
        "sbcformer_xs",
        out,
        checkpoint=ckpt,
        labels_path=tmp_path / "labels.txt",
        verify_images=shared_dir / "data" / "imagenet-samples",
        raw_graph_stats=False,
    )
    assert all(check.passed for check in report.parity)
    assert report.parity[-1].inputs == "18 real photos"  # the 2 samples + up to 16 from --verify-images
    config = ModelConfig.from_props(metadata(out))
    assert config.num_classes == 5 and config.labels == labels
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((1, 3, 224, 224), np.float32)})[0].shape == (1, 5)

    (tmp_path / "four.txt").write_text("a\nb\nc\nd\n")
    wrong = run_cli(
        "export",
        "sbcformer_xs",
        "--checkpoint",
        str(ckpt),
        "--labels",
        str(tmp_path / "four.txt"),
        "-o",
        str(tmp_path / "w.onnx"),
    )
    assert wrong.returncode == 2 and "4 labels but the model has 5 classes" in wrong.stderr
    assert not (tmp_path / "w.onnx").exists()


def test_mismatched_checkpoint_names_the_keys(tmp_path: Path) -> None:
    ckpt = save(seeded_state_dict("sbcformer_xs"), tmp_path / "xs.pth")
    result = run_cli("export", "sbcformer_b", "--checkpoint", str(ckpt), "-o", str(tmp_path / "b.onnx"))
    assert result.returncode == 1
    assert "does not fit sbcformer_b" in result.stderr and "wrong shape" in result.stderr
    assert "merging_blocks.0.stem.0.conv.weight" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sbcformer_b"], "needs weights"),
        (["resnet50"], "unknown architecture"),
        (["sbcformer_xs", "--checkpoint", "/nonexistent.pth"], "checkpoint not found"),
        (["efficientnet_lite0", "--target", "arm64", "--int8", "--calib", "/tmp"], "fp32 only"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = run_cli("export", *args, "-o", str(tmp_path / "m.onnx"))
    assert result.returncode in (1, 2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_arm64_target_rewrites_lite0_depthwise_convs_and_still_matches_pytorch(tmp_path: Path) -> None:
    """--target arm64: the depthwise forms of sbcrt/export/arm_forms.py, through the export's own parity check."""
    out = tmp_path / "lite0_pi.onnx"
    report = export_model("efficientnet_lite0", out, random_init=True, raw_graph_stats=False, target="arm64")
    assert all(check.passed for check in report.parity)
    assert "arm64 depthwise forms: 1 phases, 1 strided, 8 taps" in report.notes
    model = onnx.load(str(out))
    grouped = [
        n for n in model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]
    assert len(grouped) == 8  # kept: five 3x3 stride-1, the 5x5 on 28x28; the strided and phases forms' Convs
    assert graph_ops(model)["SpaceToDepth"] == 1


def test_random_init_is_marked_untrained(tmp_path: Path) -> None:
    out = tmp_path / "lite0.onnx"
    report = export_model("efficientnet_lite0", out, random_init=True, raw_graph_stats=False)
    assert "UNTRAINED" in report.weights
    assert json.loads(metadata(out)["untrained"]) is True


def test_failed_verification_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No real export is off by exactly zero: a zero tolerance must fail the check and keep the file unwritten.
    monkeypatch.setattr(pipeline, "RELATIVE_TOLERANCE", 0.0)
    out = tmp_path / "lite0.onnx"
    with pytest.raises(SbcrtError, match="nothing written"):
        export_model("efficientnet_lite0", out, random_init=True, raw_graph_stats=False)
    assert list(tmp_path.iterdir()) == []


def test_export_without_torch_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from sbcrt.cli import main\n"
        f"raise SystemExit(main(['export', 'efficientnet_lite0', '-o', {str(tmp_path / 'm.onnx')!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert 'pip install "sbcrt[export]"' in result.stderr
