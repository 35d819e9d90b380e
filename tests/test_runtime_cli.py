"""`sbcrt classify` and `sbcrt info` as a user runs them: real subprocesses, the JSON contract, exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[1] / "sbcrt" / "data" / "samples"


def sbcrt(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "SBCRT_MODEL"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sbcrt", *args], capture_output=True, text=True, env=environment, timeout=120
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two photos, one file that only pretends to be a JPEG, and a non-image the scan skips."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea.png", "coffee.png"):
        (folder / name).write_bytes((SAMPLES / name).read_bytes())
    (folder / "fake.jpg").write_text("not a photo")
    (folder / "readme.txt").write_text("skipped by the folder scan")
    return folder


def test_json_contract_and_partial_failure(runtime_models: dict[str, Path], photos: Path) -> None:
    done = sbcrt("classify", "--model", str(runtime_models["tiny"]), "--json", "--top-k", "2", "--logits", str(photos))
    assert done.returncode == 1, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(r["source"]).name for r in records] == ["chelsea.png", "coffee.png", "fake.jpg"]
    for record in records[:2]:
        assert set(record) == {"source", "topk", "timing_ms", "logits"}
        assert len(record["topk"]) == 2 and len(record["logits"]) == 4
        for entry in record["topk"]:
            assert set(entry) == {"index", "label", "prob"}
            assert isinstance(entry["index"], int) and isinstance(entry["prob"], float)
            assert entry["label"] == ["ant", "bee", "cat", "dog"][entry["index"]]
        timing = record["timing_ms"]
        assert set(timing) == {"decode", "preprocess", "inference", "postprocess", "total"}
        assert all(isinstance(v, float) and v >= 0 for v in timing.values())
    assert set(records[2]) == {"source", "error"} and "not an image" in records[2]["error"]


def test_human_output_globs_and_speed_line(runtime_models: dict[str, Path], photos: Path) -> None:
    done = sbcrt("classify", "-m", str(runtime_models["tiny"]), str(photos / "c*.png"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{photos / 'chelsea.png'}: ") and "(decode " in lines[0] and " ms, infer " in lines[0]
    assert lines[1].startswith(f"{photos / 'coffee.png'}: ")
    assert lines[-1].startswith("Speed: ") and lines[-1].endswith("per image at shape (1, 3, 224, 224)")
    quiet = sbcrt("classify", "-m", str(runtime_models["tiny"]), "-q", str(photos / "coffee.png"))
    assert quiet.returncode == 0 and len(quiet.stdout.splitlines()) == 1 and quiet.stderr == ""


def test_model_from_environment_and_failed_inputs(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"SBCRT_MODEL": str(runtime_models["tiny"])}
    done = sbcrt("classify", "--json", str(empty), str(tmp_path / "missing.jpg"), str(tmp_path / "*.png"), env=env)
    assert done.returncode == 1
    errors = {r["source"]: r["error"] for r in map(json.loads, done.stdout.splitlines())}
    assert errors == {
        str(empty): "no image files in this folder",
        str(tmp_path / "missing.jpg"): "no such file or folder",
        str(tmp_path / "*.png"): "no files match this pattern",
    }
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["classify", "x.jpg"], "no model: pass --model"),
        (["classify", "-m", "MODEL", "--top-k", "0", "x.jpg"], "must be at least 1"),
        (["classify", "-m", "MODEL", "--logits", "x.jpg"], "--logits only applies to --json"),
        (["classify", "-m", "MISSING", "x.jpg"], "no such file"),
        (["classify", "-m", "TOKENS", "x.jpg"], "not an image tensor"),
        (["classify", "-m", "NOTMODEL", "x.jpg"], "not an ONNX model"),
        (["classify", "-m", "MODEL", "--labels", "MISSING", "x.jpg"], "cannot read labels file"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    runtime_models: dict[str, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    not_a_model = tmp_path / "fake.onnx"
    not_a_model.write_bytes(b"\x00\x01garbage")
    names = {
        "MODEL": str(runtime_models["tiny"]),
        "TOKENS": str(runtime_models["tokens"]),
        "MISSING": str(tmp_path / "nope.onnx"),
        "NOTMODEL": str(not_a_model),
    }
    done = sbcrt(*[names.get(a, a) for a in args])
    assert done.returncode == 2
    # One error line (argparse's own errors come after its usage summary), never a traceback.
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and done.stderr.strip().endswith(errors[0])
    assert "Traceback" not in done.stderr


def test_bare_model_with_flags(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"thing {i}\n" for i in range(10)))
    done = sbcrt("classify", "-m", str(runtime_models["bare"]), "--labels", str(labels), "--size", "160",
                 "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5", str(SAMPLES / "coffee.png"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{SAMPLES / 'coffee.png'}: thing ")
    assert "no sbcrt metadata" in done.stderr


def test_info(runtime_models: dict[str, Path]) -> None:
    done = sbcrt("info", "--model", str(runtime_models["tiny"]), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {"sbcrt", "onnxruntime", "numpy", "pillow"} <= set(report["versions"])
    assert report["cpu"]["physical_cores"] >= 1
    assert "CPUExecutionProvider" in report["onnxruntime"]["chosen_providers"]
    assert report["model"]["architecture"] == "tiny" and report["model"]["num_classes"] == 4
    assert report["model"]["input"]["shape"] == [1, 3, 224, 224]
    text = sbcrt("info")
    assert text.returncode == 0 and "onnxruntime providers:" in text.stdout and "model:" not in text.stdout


def test_a_photo_path_that_is_an_image_in_disguise(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    # A PNG named .jpg is still an image: the decoder goes by content, not by name.
    disguised = tmp_path / "actually-png.jpg"
    Image.open(SAMPLES / "coffee.png").save(disguised, format="PNG")
    done = sbcrt("classify", "-m", str(runtime_models["tiny"]), "--json", str(disguised))
    assert done.returncode == 0 and "topk" in json.loads(done.stdout)
