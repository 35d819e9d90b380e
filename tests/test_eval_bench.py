"""`sbcrt eval` and `sbcrt bench`: real models, real photos, real onnxruntime sessions; structure, not speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sbcrt.commands.eval import ProgressBar
from sbcrt.runtime.classifier import Classifier
from sbcrt.runtime.evaluation import LogitComparison, evaluate, find_dataset

SAMPLES = Path(__file__).resolve().parents[1] / "sbcrt" / "data" / "samples"
LITE0_TOP1 = 0.896  # the PyTorch reference on the shared photos (shared/data/README.md)


def sbcrt(*args: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "SBCRT_MODEL"}
    return subprocess.run(
        [sys.executable, "-m", "sbcrt", *args], capture_output=True, text=True, env=environment, timeout=180
    )


def link(target: Path, link_path: Path) -> Path:
    """Photos are linked into test folders, never copied."""
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(target.resolve())
    return link_path


# -- eval -------------------------------------------------------------------------------------------------------


def test_lite0_top1_on_all_shared_photos_matches_the_reference(lite0_onnx: Path, shared_dir: Path) -> None:
    photos = shared_dir / "data" / "imagenet-samples"
    classifier = Classifier(lite0_onnx, threads=2)
    report = evaluate(find_dataset(photos, classifier.labels), classifier)
    model = report["model"]
    assert report["dataset"] == {
        "layout": "flat",
        "images_found": 250,
        "images_used": 250,
        "images_evaluated": 250,
        "classes": 250,
    }
    assert abs(model["top1"] - LITE0_TOP1) <= 0.01, model["top1"]
    assert model["top1"] <= model["top5"] <= 1.0
    # One photo per class: every miss is one class with one error, named by the model's labels.
    errors = model["per_class_errors"]
    assert len(errors) == 250 - model["top1_correct"]
    assert all(e["images"] == 1 and e["errors"] == 1 and len(e["predicted"]) == 1 for e in errors)
    assert {e["label"] for e in errors} <= set(classifier.labels)
    assert model["inference"]["count"] == 250 and model["inference"]["median_ms"] > 0
    assert report["failures"] == [] and "vs" not in report


def test_eval_cli_json_limit_and_comparison_with_itself(lite0_onnx: Path, shared_dir: Path) -> None:
    photos = shared_dir / "data" / "imagenet-samples"
    done = sbcrt("eval", str(photos), "-m", str(lite0_onnx), "--vs", str(lite0_onnx), "--limit", "12", "--json")
    assert done.returncode == 0, done.stderr
    assert "[" not in done.stderr  # stderr is not a terminal: no progress bar
    report = json.loads(done.stdout)
    assert report["dataset"]["images_found"] == 250 and report["dataset"]["images_evaluated"] == 12
    assert report["model"]["top1"] == report["vs"]["top1"]
    comparison = report["comparison"]
    assert comparison["same_tensor"] is True and comparison["images"] == 12
    assert comparison["top1_agreement"] == 1.0 and comparison["max_abs_error"] == 0.0
    assert comparison["cosine_min"] == pytest.approx(1.0, abs=1e-12)


def test_limit_spreads_over_the_whole_folder(lite0_onnx: Path, shared_dir: Path) -> None:
    labels = Classifier(lite0_onnx, warmup=False).labels
    dataset = find_dataset(shared_dir / "data" / "imagenet-samples", labels, limit=5)
    # The photos are one per fourth class (0, 4, ..., 996): five spread evenly start at 0 and reach past 750.
    assert [i.label for i in dataset.images][0] == 0 and dataset.images[-1].label > 750
    assert dataset.total == 250 and len(dataset.images) == 5


def test_imagefolder_synsets_and_label_names(lite0_onnx: Path, shared_dir: Path, tmp_path: Path) -> None:
    photos = shared_dir / "data" / "imagenet-samples"
    tench, hen = photos / "n01440764_tench.JPEG", photos / "n01514859_hen.JPEG"
    link(tench, tmp_path / "n01440764" / "a.JPEG")
    link(hen, tmp_path / "hen" / "b.JPEG")  # a label name instead of a synset
    link(tench, tmp_path / "hen" / "c.JPEG")  # a tench filed as a hen: one known error
    done = sbcrt("eval", str(tmp_path), "-m", str(lite0_onnx), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["dataset"]["layout"] == "imagefolder" and report["dataset"]["classes"] == 2
    model = report["model"]
    assert model["images"] == 3 and model["top1_correct"] == 2
    assert model["per_class_errors"] == [{"class": 8, "label": "hen", "images": 2, "errors": 1, "predicted": ["tench"]}]


def test_human_output_and_per_image_failures(runtime_models: dict[str, Path], tmp_path: Path) -> None:
    model = runtime_models["tiny"]  # labels ant, bee, cat, dog
    classifier = Classifier(model)
    link(SAMPLES / "chelsea.png", tmp_path / "cat" / "chelsea.png")
    link(SAMPLES / "coffee.png", tmp_path / "dog" / "coffee.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a photo")
    predicted = {name: classifier.classify(SAMPLES / name).top1.label for name in ("chelsea.png", "coffee.png")}
    correct = int(predicted["chelsea.png"] == "cat") + int(predicted["coffee.png"] == "dog")

    done = sbcrt("eval", str(tmp_path), "-m", str(model))
    assert done.returncode == 1  # one image failed
    assert done.stdout.startswith("2 images in 2 classes (<class>/ folders)")
    assert f"top-1 {correct / 2:.3f} ({correct}/2)" in done.stdout
    assert "1 images could not be read" in done.stdout
    assert "broken.jpg: error: not an image" in done.stderr


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda m, d: ["eval", str(d / "missing"), "-m", str(m["tiny"])], "no such folder"),
        (lambda m, d: ["eval", str(d / "good"), "-m", str(m["tiny"]), "--vs", str(m["bare"])], "different numbers"),
        (lambda m, d: ["eval", str(d / "good"), "-m", str(m["tiny"]), "--vs", str(d / "x.onnx")], "no such file"),
        (lambda m, d: ["eval", str(d / "unknown-class"), "-m", str(m["tiny"])], "unknown label"),
        (lambda m, d: ["eval", str(d / "flat"), "-m", str(m["tiny"])], "need a 1000-class ImageNet model"),
        (lambda m, d: ["eval", str(d / "empty"), "-m", str(m["tiny"])], "no labelled images"),
        (lambda m, d: ["eval", str(d / "good"), "-m", str(m["tiny"]), "--limit", "0"], "must be at least 1"),
    ],
)
def test_eval_usage_errors_exit_2_with_one_line(runtime_models, tmp_path: Path, make_args, message: str) -> None:
    link(SAMPLES / "chelsea.png", tmp_path / "good" / "cat" / "chelsea.png")
    link(SAMPLES / "chelsea.png", tmp_path / "unknown-class" / "zebra" / "a.png")
    (tmp_path / "empty").mkdir()
    link(SAMPLES / "coffee.png", tmp_path / "flat" / "n07920052_espresso.png")
    done = sbcrt(*make_args(runtime_models, tmp_path))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("sbcrt eval: error: ") and "Traceback" not in done.stderr
    if "--limit" not in make_args(runtime_models, tmp_path):
        assert len(lines) == 1  # sbcrt's own errors are one line; argparse's also print the usage


def test_logit_comparison_figures() -> None:
    comparison = LogitComparison()
    a = np.array([1.0, 4.0, -2.0], dtype=np.float32)
    comparison.add(a, a * 2)  # same direction, twice the size: cosine 1, error = the largest |logit|
    comparison.add(a, np.array([1.0, 0.0, 3.0], dtype=np.float32))  # a different top-1
    summary = comparison.summary()
    assert summary["top1_agreement"] == 0.5
    assert summary["max_abs_error"] == pytest.approx(5.0)
    assert summary["relative_error_median"] == pytest.approx((1.0 + 5.0 / 4.0) / 2)
    assert summary["cosine_mean"] == pytest.approx((1.0 + (1 - 6) / (np.sqrt(21) * np.sqrt(10))) / 2)


def test_progress_bar_redraws_in_place(capsys: pytest.CaptureFixture[str]) -> None:
    bar = ProgressBar()
    bar(1, 4)
    bar(4, 4)
    bar.close()
    err = capsys.readouterr().err
    assert "\r[=======" in err and "] 1/4" in err and f"[{'=' * 30}] 4/4" in err
    assert err.endswith("\r")


# -- bench ------------------------------------------------------------------------------------------------------


def test_bench_json_structure_and_sanity(runtime_models: dict[str, Path]) -> None:
    import onnxruntime

    done = sbcrt(
        "bench", "-m", str(runtime_models["tiny"]), "--threads", "2,1,2", "--runs", "7", "--warmup", "1", "--json"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [r["threads"] for r in report["results"]] == [2, 1]  # order kept, repeats dropped
    for result in report["results"]:
        assert result["count"] == 7
        assert 0 < result["min_ms"] <= result["median_ms"] <= result["p90_ms"] <= result["p99_ms"]
        assert result["images_per_s"] == pytest.approx(1000 / result["median_ms"])
        assert result["session_ms"] > 0 and result["first_run_ms"] > 0
    assert report["runs"] == 7 and report["warmup"] == 1
    assert report["model"]["architecture"] == "tiny" and report["model"]["input_shape"] == [1, 3, 224, 224]
    assert 10 < report["peak_rss_mb"] < 24 * 1024
    machine = report["machine"]
    assert machine["onnxruntime"] == onnxruntime.__version__
    assert machine["cpu"] and machine["physical_cores"] >= 1 and isinstance(machine["features"], list)
    assert "CPUExecutionProvider" in machine["available_providers"]


def test_bench_human_output(runtime_models: dict[str, Path]) -> None:
    done = sbcrt("bench", "-m", str(runtime_models["tiny"]), "--threads", "1", "--runs", "3", "--warmup", "0")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"model: {runtime_models['tiny']} (tiny, fp32)")
    assert lines[1].startswith("machine: ") and "onnxruntime " in lines[1]
    row = lines[4].split()
    assert row[0] == "1" and float(row[1]) > 0
    assert lines[5].startswith("peak memory (RSS): ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threads", "0"], "at least 1"),
        (["--threads", "one"], "whole numbers"),
        (["--runs", "0"], "at least 1"),
        (["--warmup", "-1"], "--warmup must be 0 or more"),
    ],
)
def test_bench_usage_errors(runtime_models: dict[str, Path], args: list[str], message: str) -> None:
    done = sbcrt("bench", "-m", str(runtime_models["tiny"]), *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_bench_missing_model() -> None:
    done = sbcrt("bench", "-m", "no-such-model.onnx")
    assert done.returncode == 2 and "no such file" in done.stderr
