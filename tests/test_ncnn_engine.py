"""The ncnn engine: real pnnx conversions of real ONNX models, run by the real ncnn wheel (x86 here), against
onnxruntime on the same photos; the .ncnn file's checks; the engine choice; the CLI's errors."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sbcrt.commands.arguments import flag_of
from sbcrt.errors import SettingError, UsageError
from sbcrt.runtime.classifier import Classifier
from sbcrt.runtime.engines import resolve
from sbcrt.runtime.ncnn_file import MAGIC, NcnnModel, companion
from tests.conftest import build_onnx

SAMPLES = Path(__file__).resolve().parents[1] / "sbcrt" / "data" / "samples"
PHOTOS = [SAMPLES / "chelsea.png", SAMPLES / "coffee.png"]
RELATIVE_TOLERANCE = 1e-4  # the export's own bound (sbcrt/export/pipeline.py)
ON_ARM = platform.machine().lower() in ("aarch64", "arm64")


def convert_beside(onnx_path: Path) -> Path:
    """pnnx's conversion of an ONNX file with sbcrt metadata, packed into the .ncnn file beside it: the export's
    own conversion step (sbcrt/export/ncnn_export.py) on a generated model."""
    import onnx

    from sbcrt.export.ncnn_export import convert
    from sbcrt.runtime.metadata import ModelConfig

    payload = onnx_path.read_bytes()
    config = ModelConfig.from_props({p.key: p.value for p in onnx.load(onnx_path).metadata_props})
    model = convert(payload, list(config.input_size), config, payload)
    out = companion(onnx_path)
    out.write_bytes(model.to_bytes())
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conv + relu + pool + gemm model with 4 labelled classes, and its .ncnn beside it."""
    folder = tmp_path_factory.mktemp("ncnn-tiny")
    path = build_onnx(
        folder / "tiny.onnx", "conv", config={"architecture": "tiny", "labels": ["ant", "bee", "cat", "dog"]}
    )
    convert_beside(path)
    return path


def sbcrt(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SBCRT_MODEL"}
    code = f"{prelude}\nfrom sbcrt.cli import main\nraise SystemExit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def assert_same_predictions(ncnn: Classifier, reference: Classifier) -> list[float]:
    relative = []
    for photo in PHOTOS:
        got, want = ncnn.classify(photo), reference.classify(photo)
        scale = float(np.abs(want.logits).max())
        diff = float(np.abs(got.logits - want.logits).max())
        assert diff <= RELATIVE_TOLERANCE * scale, (photo.name, diff, scale)
        assert [p.index for p in got.topk[:1]] == [p.index for p in want.topk[:1]]
        relative.append(diff / scale)
    return relative


def test_a_pnnx_conversion_runs_like_onnxruntime(tiny: Path) -> None:
    ncnn = Classifier(tiny, engine="ncnn", threads=1)
    reference = Classifier(tiny, engine="onnxruntime", threads=1, cache_dir=False)
    assert ncnn.engine.name == "ncnn" and ncnn.engine.path == companion(tiny)
    assert reference.engine.name == "onnxruntime"
    # The metadata travelled with it: labels and preprocessing as the ONNX file has them.
    assert ncnn.labels == ["ant", "bee", "cat", "dog"] == reference.labels
    assert ncnn.preprocessing == reference.preprocessing and ncnn.config.architecture == "tiny"
    assert_same_predictions(ncnn, reference)
    # A batch runs image by image, in order.
    batch = np.concatenate([ncnn.preprocess(p) for p in PHOTOS])
    rows = ncnn.run(batch)
    assert rows.shape == (2, 4)
    np.testing.assert_allclose(rows[1], ncnn.run(batch[1:])[0], rtol=0, atol=0)
    session = ncnn.describe()["session"]
    assert session["engine"] == "ncnn" and session["providers"][0].startswith("ncnn ")
    assert session["providers"][0].endswith("fp32") and session["threads"] == 1


def test_the_ncnn_file_alone_is_a_model(tiny: Path, tmp_path: Path) -> None:
    alone = tmp_path / "elsewhere.ncnn"
    shutil.copy(companion(tiny), alone)
    clf = Classifier(alone)  # no .onnx beside it: the .ncnn path itself picks the engine
    assert clf.engine.name == "ncnn" and clf.labels == ["ant", "bee", "cat", "dog"]
    with pytest.raises(UsageError, match=r"onnxruntime needs the \.onnx file"):
        Classifier(alone, engine="onnxruntime")


def test_auto_picks_ncnn_only_on_arm_with_the_file_and_the_package(tiny: Path, tmp_path: Path) -> None:
    ncnn_file = companion(tiny)
    assert resolve(tiny, "auto", machine="aarch64", have_ncnn=True) == ("ncnn", ncnn_file)
    assert resolve(tiny, "auto", machine="aarch64", have_ncnn=False) == ("onnxruntime", tiny)
    assert resolve(tiny, "auto", machine="x86_64", have_ncnn=True) == ("onnxruntime", tiny)
    assert resolve(ncnn_file, "auto", machine="x86_64") == ("ncnn", ncnn_file)
    assert resolve(tiny, "ncnn", machine="x86_64") == ("ncnn", ncnn_file)
    lone = build_onnx(tmp_path / "lone.onnx", "conv", config={})
    assert resolve(lone, "auto", machine="aarch64", have_ncnn=True) == ("onnxruntime", lone)
    if not ON_ARM:
        assert Classifier(tiny, cache_dir=False).engine.name == "onnxruntime"  # x86: ncnn only when asked for


def test_ncnn_without_an_ncnn_model_says_how_to_make_one(tmp_path: Path) -> None:
    lone = build_onnx(tmp_path / "lone.onnx", "conv", config={})
    with pytest.raises(SettingError, match=r"no ncnn model beside it \(lone\.ncnn\)") as caught:
        Classifier(lone, engine="ncnn")
    assert caught.value.describe(flag_of).endswith("export the model with --engine ncnn too")


def damage(data: bytes, how: str) -> bytes:
    header_at = len(MAGIC) + 8 + 32
    if how == "weights":
        return data[:-5] + bytes([data[-5] ^ 0x10]) + data[-4:]
    if how == "param":
        # The param text comes right after the header; its first bytes are ncnn's magic number.
        length = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 8], "little")
        at = header_at + length + 2
        return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
    if how == "header":
        at = data.index(b'"tiny') + 2  # a letter of the architecture name: still valid JSON
        return data[:at] + b"X" + data[at + 1 :]
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "not ncnn":
        return b"\x89PNG\r\n" + data[8:]
    raise ValueError(how)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("weights", r"damaged ncnn model file \(its bin part does not match its digest\)"),
        ("param", r"damaged ncnn model file \(its param part does not match its digest\)"),
        ("header", r"damaged ncnn model file \(its header does not match its digest\)"),
        ("truncated", r"damaged ncnn model file \(its \w+ part is truncated\)"),
        ("not ncnn", r"not an sbcrt ncnn model file"),
    ],
)
def test_a_damaged_ncnn_file_is_refused_before_ncnn_reads_it(
    tiny: Path, tmp_path: Path, how: str, message: str
) -> None:
    path = tmp_path / "tiny.ncnn"
    path.write_bytes(damage(companion(tiny).read_bytes(), how))
    with pytest.raises(UsageError, match=message) as caught:
        Classifier(path)
    assert "\n" not in str(caught.value)


def test_a_damaged_ncnn_file_is_one_line_from_the_cli(tiny: Path, tmp_path: Path) -> None:
    path = tmp_path / "tiny.ncnn"
    path.write_bytes(damage(companion(tiny).read_bytes(), "weights"))
    done = sbcrt("classify", "--model", str(path), str(PHOTOS[0]))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "damaged ncnn model file" in lines[0] and "Traceback" not in done.stderr


def test_an_ncnn_file_from_another_onnx_file_is_refused(tiny: Path, tmp_path: Path) -> None:
    other = build_onnx(tmp_path / "tiny.onnx", "conv", num_classes=4, config={"architecture": "other"})
    shutil.copy(companion(tiny), companion(other))  # a stale .ncnn beside a re-exported .onnx
    with pytest.raises(UsageError, match=r"tiny\.ncnn was not converted from .*tiny\.onnx"):
        Classifier(other, engine="ncnn")
    done = sbcrt("classify", "--model", str(other), "--engine", "ncnn", str(PHOTOS[0]))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "was not converted from" in done.stderr


def test_ncnn_without_the_package_says_what_to_install(tiny: Path) -> None:
    hide = "import sys\nsys.modules['ncnn'] = None  # as if the ncnn extra were not installed"
    done = sbcrt("classify", "--model", str(tiny), "--engine", "ncnn", str(PHOTOS[0]), prelude=hide)
    assert done.returncode == 2, done.stderr
    expected = f'the ncnn engine needs the ncnn package: pip install "sbcrt[ncnn]" (model {companion(tiny)})'
    assert done.stderr.strip() == f"sbcrt classify: error: {expected}"
    # auto never needs it: onnxruntime runs the .onnx file.
    done = sbcrt("classify", "--model", str(tiny), "--no-cache", str(PHOTOS[0]), prelude=hide)
    assert done.returncode == 0, done.stderr


def test_fp16_is_an_ncnn_option_and_only_where_the_cpu_has_it(tiny: Path) -> None:
    with pytest.raises(UsageError, match="fp16 is an ncnn engine option"):
        Classifier(tiny, engine="onnxruntime", fp16=True)
    from sbcrt.runtime.engines.ncnn import fp16_supported

    clf = Classifier(tiny, engine="ncnn", fp16=True, threads=1)
    if fp16_supported():  # a Pi 5
        assert clf.session_info.providers[0].endswith("fp16")
    else:
        assert clf.session_info.providers[0].endswith("fp32")
        assert any("no half-precision arithmetic" in note for note in clf.notes)


def test_info_and_bench_say_which_engine(tiny: Path) -> None:
    done = sbcrt("info", "--model", str(tiny), "--engine", "ncnn")
    assert done.returncode == 0, done.stderr
    assert f"engine: ncnn ({companion(tiny)}): ncnn " in done.stdout
    done = sbcrt("bench", "--model", str(tiny), "--engine", "ncnn", "--runs", "3", "--warmup", "1", "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert ", ncnn: ncnn " in done.stdout.splitlines()[0]
    done = sbcrt("bench", "--model", str(tiny), "--runs", "2", "--warmup", "0", "--threads", "1", "--json")
    assert json.loads(done.stdout)["model"]["engine"] == ("ncnn" if ON_ARM else "onnxruntime")


@pytest.mark.slow
def test_export_writes_a_verified_ncnn_model_beside_the_onnx_file(tmp_path: Path) -> None:
    """`sbcrt export --engine ncnn` as a user runs it: SBCFormer-XS (seeded weights), both files checked
    against PyTorch, and the two engines agree on photos."""
    out = tmp_path / "xs.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "sbcrt", "export", "sbcformer_xs", "--random-init", "-o", str(out), "--engine", "ncnn"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    assert f"ncnn model -> {companion(out)}" in done.stdout
    assert done.stdout.count("  ok") == 6 and "FAILED" not in done.stdout  # 3 ONNX checks, 3 ncnn checks
    model = NcnnModel.read(companion(out))
    assert model.converter.startswith("pnnx ") and model.source_sha256
    # ncnn's forms: the head's global mean as ncnn's global Pooling, not a generic Reduction; the attention scale
    # (0.25 for XS's 16-wide keys) folded into q's projection, not a multiply layer per attention map.
    param = model.param.decode()
    assert "\nReduction " not in param and any(
        line.startswith("Pooling ") and line.endswith(" 0=1 4=1") for line in param.splitlines()
    )
    assert "0=2 1=1 2=0.25" not in param
    ncnn = Classifier(out, engine="ncnn", threads=1)
    reference = Classifier(out, engine="onnxruntime", threads=1, cache_dir=False)
    assert ncnn.config == reference.config and ncnn.config.untrained
    assert max(assert_same_predictions(ncnn, reference)) < 1e-5


def test_export_refuses_int8_with_ncnn(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sbcrt", "export", "efficientnet_lite0", "-o", str(tmp_path / "m.onnx"), "--int8",
         "--calib", str(SAMPLES), "--engine", "ncnn"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "--engine 'ncnn': ncnn is fp32 only" in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())


def test_the_int8_benchmark_writes_an_int8_model_ncnn_runs(tiny: Path) -> None:
    """benchmarks/ncnn_int8.py's quantiser (ncnn2int8's layout): every weight byte accounted for, int8 terms in
    the param, and ncnn's int8 kernels give the fp32 model's answer on real photos."""
    from benchmarks.ncnn_int8 import QUANTISED, blob_values, load_net, quantise, read_layers

    model = NcnnModel.read(companion(tiny))
    param, weights = model.param.decode(), model.weights
    _, layers = read_layers(param, weights)
    quantised = [layer for layer in layers if layer.kind in QUANTISED]
    assert {layer.kind for layer in quantised} >= {"Convolution", "InnerProduct"}
    classifier = Classifier(tiny, engine="ncnn", threads=1)
    tensors = [classifier.preprocess(photo) for photo in PHOTOS]
    blobs = sorted({layer.bottoms[0] for layer in quantised})
    fp32 = load_net(model, param, weights)
    largest = {blob: max(float(np.abs(blob_values(fp32, model.input_name, t, [blob])[blob]).max()) for t in tensors)
               for blob in blobs}  # fmt: skip
    int8_param, int8_weights = quantise(param, weights, {blob: 127.0 / value for blob, value in largest.items()})
    # Each quantised layer gains its int8 term and (per output channel + 1 input) float scales; nothing else moves.
    added = sum(4 * (int(layer.params[0]) + 1) for layer in quantised)
    assert len(int8_weights) == len(weights) + added
    assert all(" 8=" in line for line in int8_param.splitlines() if line.split()[0] in QUANTISED)
    int8 = load_net(model, int8_param, int8_weights)
    for tensor in tensors:
        want = blob_values(fp32, model.input_name, tensor, [model.output_name])[model.output_name]
        got = blob_values(int8, model.input_name, tensor, [model.output_name])[model.output_name]
        assert not np.array_equal(got, want)  # int8 ran: its logits are not fp32's bit for bit
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
        assert got.argmax() == want.argmax()


def test_an_arm64_export_converts_the_cpu_neutral_graph_to_ncnn(tmp_path: Path) -> None:
    """--target arm64 shapes the .onnx for onnxruntime's aarch64 kernels; the .ncnn beside it is pnnx's conversion
    of the CPU-neutral graph (ncnn has direct depthwise kernels), not of those forms."""
    pytest.importorskip("torch")
    import onnx

    from sbcrt.export.pipeline import export_model

    out = tmp_path / "lite0.onnx"
    export_model("efficientnet_lite0", out, target="arm64", engine="ncnn")
    assert {n.op_type for n in onnx.load(out).graph.node} >= {"Slice", "Transpose"}  # the arm64 forms
    layers = [line.split()[0] for line in NcnnModel.read(companion(out)).param.decode().splitlines()[2:]]
    assert layers.count("ConvolutionDepthWise") == 16  # Lite0's 16 depthwise convolutions, as ncnn layers
    assert not {"Crop", "Permute", "Reshape"} & set(layers)
