"""Accuracy of a model on labelled photos, and how closely a second model agrees with it (torch-free).

Two folder layouts carry the labels:
- ImageFolder: `DIR/<class>/*.jpg`, where `<class>` is an ImageNet synset (`n01440764`, mapped through
  sbcrt/data/imagenet_classes.txt) or one of the model's label names (`tench`, `tiger_cat` for "tiger cat");
- flat: `DIR/<synset>_*.JPEG`, the layout of the shared ImageNet sample photos.

Every image goes through the exact photo path (`Classifier.preprocess`: the authors' eval transform), so the
figures are the ones the PyTorch reference would give. With a second model, both models see the same tensor
(when their preprocessing is the same), so their logits can be compared directly.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sbcrt.errors import SbcrtError, UsageError
from sbcrt.runtime.image_files import folder_images
from sbcrt.runtime.metadata import imagenet_classes

SYNSET = re.compile(r"^n\d{8}$")
FLAT_NAME = re.compile(r"^(n\d{8})_")


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: int  # class index in the model's output


@dataclass(frozen=True)
class Dataset:
    images: list[LabelledImage]
    layout: str  # "imagefolder" or "flat"
    total: int  # images found before --limit


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet synsets in class-index order."""
    return [synset for synset, _ in imagenet_classes()]


def find_dataset(root: Path, labels: list[str], *, limit: int | None = None) -> Dataset:
    """The labelled images under `root` for a model with these class `labels`.

    `limit` keeps N images spread evenly over the sorted list, so a quick run still samples every part of
    the class range instead of only the first classes. Raises UsageError when the layout or a class name
    cannot be read.
    """
    if not root.exists():
        raise UsageError(f"{root}: no such folder")
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder (give the folder of labelled photos)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        images, layout = _imagefolder(class_dirs, labels), "imagefolder"
    else:
        images, layout = _flat(root, labels), "flat"
    if not images:
        raise UsageError(f"{root}: no labelled images (expected {root}/<class>/*.jpg or {root}/<synset>_*.JPEG files)")
    total = len(images)
    if limit is not None and limit < total:
        images = [images[(i * total) // limit] for i in range(limit)]
    return Dataset(images=images, layout=layout, total=total)


def _class_resolver(labels: list[str]) -> Callable[[str], int | None]:
    """class name -> index: a synset (for 1000-class ImageNet models) or an unambiguous label name."""
    synsets = {s: i for i, s in enumerate(imagenet_synsets())} if len(labels) == 1000 else {}
    by_name: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_name.setdefault(_normal(label), []).append(index)

    def resolve(name: str) -> int | None:
        if SYNSET.match(name):
            return synsets.get(name)
        matches = by_name.get(_normal(name), [])
        if len(matches) > 1:
            raise UsageError(f"class folder {name!r} matches {len(matches)} of the model's labels; rename it")
        return matches[0] if matches else None

    return resolve


def _normal(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def _imagefolder(class_dirs: list[Path], labels: list[str]) -> list[LabelledImage]:
    resolve = _class_resolver(labels)
    images = []
    for folder in class_dirs:
        index = resolve(folder.name)
        if index is None:
            kind = "synset" if SYNSET.match(folder.name) else "label"
            why = (
                "synsets need a 1000-class ImageNet model"
                if kind == "synset" and len(labels) != 1000
                else f"not one of the model's {len(labels)} classes"
            )
            raise UsageError(f"class folder {folder.name!r}: unknown {kind} ({why})")
        images += [LabelledImage(path, index) for path in folder_images(folder)]
    return images


def _flat(root: Path, labels: list[str]) -> list[LabelledImage]:
    named = [(p, FLAT_NAME.match(p.name)) for p in folder_images(root)]
    if not any(match for _, match in named):
        return []
    if len(labels) != 1000:
        raise UsageError(f"<synset>_* file names need a 1000-class ImageNet model; this one has {len(labels)}")
    synsets = {s: i for i, s in enumerate(imagenet_synsets())}
    images = []
    for path, match in named:
        if match is None or match.group(1) not in synsets:
            raise UsageError(f"{path.name}: not named <synset>_*, so its class is unknown")
        images.append(LabelledImage(path, synsets[match.group(1)]))
    return images


# -- metrics ---------------------------------------------------------------------------------------------------


def latency_summary(times_ms: list[float]) -> dict[str, float]:
    """median, p90, p99, mean and min of a list of times (ms); empty for no times."""
    if not times_ms:
        return {}
    values = np.asarray(times_ms, dtype=np.float64)
    return {
        "median_ms": float(np.median(values)),
        "p90_ms": float(np.percentile(values, 90)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()),
        "min_ms": float(values.min()),
        "count": int(values.size),
    }


@dataclass
class LogitComparison:
    """How far model B's logits are from model A's on the same inputs (A is the reference), per image.

    Two relative errors, for two questions: `relative` (max |b - a| / max |a|, the worst single logit: fp32 parity
    after a graph rewrite, `eval --compare`, the benchmarks) and `relative_l2` (||b - a|| / ||a||, the whole
    vector: the int8 export's report, where every logit moves a little)."""

    top1_agree: list[bool] = field(default_factory=list)
    max_abs: list[float] = field(default_factory=list)  # max |b - a| per image
    relative: list[float] = field(default_factory=list)  # max |b - a| / max |a| per image
    relative_l2: list[float] = field(default_factory=list)  # ||b - a|| / ||a|| per image
    cosine: list[float] = field(default_factory=list)

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        diff = float(np.abs(b64 - a64).max())
        scale = float(np.abs(a64).max())
        norm_a, norm_b = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
        self.top1_agree.append(int(a64.argmax()) == int(b64.argmax()))
        self.max_abs.append(diff)
        self.relative.append(diff / scale if scale > 0 else math.inf)
        self.relative_l2.append(float(np.linalg.norm(b64 - a64)) / norm_a if norm_a > 0 else math.inf)
        self.cosine.append(float(a64 @ b64) / (norm_a * norm_b) if norm_a * norm_b > 0 else 0.0)

    def summary(self) -> dict[str, Any]:
        if not self.top1_agree:
            return {}
        return {
            "images": len(self.top1_agree),
            "top1_agreement": float(np.mean(self.top1_agree)),
            "max_abs_error": float(max(self.max_abs)),
            "relative_error_median": float(np.median(self.relative)),
            "relative_error_max": float(max(self.relative)),
            "cosine_mean": float(np.mean(self.cosine)),
            "cosine_min": float(min(self.cosine)),
        }


@dataclass
class ModelScore:
    """Top-1/top-5 of one model, the mistakes per true class, and its inference times."""

    labels: list[str]
    top1_hits: int = 0
    top5_hits: int = 0
    count: int = 0
    mistakes: dict[int, list[int]] = field(default_factory=dict)  # true class -> wrong top-1 predictions
    inference_ms: list[float] = field(default_factory=list)

    def add(self, logits: np.ndarray, label: int, inference_ms: float) -> None:
        top5 = np.argsort(-logits, kind="stable")[:5]
        self.count += 1
        self.top1_hits += int(top5[0] == label)
        self.top5_hits += int(label in top5)
        if top5[0] != label:
            self.mistakes.setdefault(label, []).append(int(top5[0]))
        self.inference_ms.append(inference_ms)

    def summary(self, class_images: dict[int, int]) -> dict[str, Any]:
        per_class = [
            {
                "class": label,
                "label": self.labels[label],
                "images": class_images[label],
                "errors": len(wrong),
                "predicted": [self.labels[w] for w in wrong],
            }
            for label, wrong in self.mistakes.items()
        ]
        per_class.sort(key=lambda e: (-e["errors"] / e["images"], -e["errors"], e["class"]))
        return {
            "images": self.count,
            "top1": self.top1_hits / self.count if self.count else 0.0,
            "top5": self.top5_hits / self.count if self.count else 0.0,
            "top1_correct": self.top1_hits,
            "top5_correct": self.top5_hits,
            "per_class_errors": per_class,
            "inference": latency_summary(self.inference_ms),
        }


@dataclass
class Failure:
    path: str
    error: str


def check_comparable(model, other) -> None:
    """Raise UsageError unless `other` (None, or a second Classifier) scores the same classes as `model`."""
    if other is not None and other.num_classes != model.num_classes:
        raise UsageError(
            f"the models score different numbers of classes ({model.num_classes} vs {other.num_classes}); "
            "they cannot be compared"
        )


def evaluate(
    dataset: Dataset,
    model,
    other=None,
    *,
    progress: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Run `model` (a Classifier) and optionally `other` over `dataset`; returns the JSON-ready report.

    Images that cannot be decoded are listed under "failures" and left out of every figure. `stop` is asked
    before each image: once it says True the report covers the images done so far and has "interrupted": true.
    """
    check_comparable(model, other)
    shared_tensor = other is None or other.preprocessing == model.preprocessing
    scores = [ModelScore(model.labels)] + ([ModelScore(other.labels)] if other is not None else [])
    comparison = LogitComparison()
    preprocess_ms: list[float] = []
    failures: list[Failure] = []
    class_images: dict[int, int] = {}
    interrupted = False
    for done, item in enumerate(dataset.images, start=1):
        if stop is not None and stop():
            interrupted = True
            break
        try:
            start = time.perf_counter()
            tensor = model.preprocess(item.path)
            preprocess_ms.append((time.perf_counter() - start) * 1000)
            tensors = [tensor]
            if other is not None:
                tensors.append(tensor if shared_tensor else other.preprocess(item.path))
        except SbcrtError as exc:  # a broken file is reported, not fatal: the rest still measures the model
            failures.append(Failure(str(item.path), str(exc)))
            if progress:
                progress(done, len(dataset.images))
            continue
        outputs = []
        for classifier, score, tensor in zip([model, other], scores, tensors, strict=False):
            start = time.perf_counter()
            logits = classifier.run(tensor)[0]
            score.add(logits, item.label, (time.perf_counter() - start) * 1000)
            outputs.append(logits)
        if other is not None:
            comparison.add(outputs[0], outputs[1])
        class_images[item.label] = class_images.get(item.label, 0) + 1
        if progress:
            progress(done, len(dataset.images))

    report: dict[str, Any] = {
        "dataset": {
            "layout": dataset.layout,
            "images_found": dataset.total,
            "images_used": len(dataset.images),
            "images_evaluated": scores[0].count,
            "classes": len(class_images),
        },
        "model": {"path": str(model.path), **_describe(model), **scores[0].summary(class_images)},
        "preprocess": latency_summary(preprocess_ms),
        "failures": [{"path": f.path, "error": f.error} for f in failures],
    }
    if other is not None:
        report["vs"] = {"path": str(other.path), **_describe(other), **scores[1].summary(class_images)}
        report["comparison"] = {"same_tensor": shared_tensor, **comparison.summary()}
    if interrupted:  # only then: a complete run's report keeps its keys
        report["interrupted"] = True
    return report


def _describe(classifier) -> dict[str, Any]:
    config = classifier.config
    return {
        "architecture": config.architecture,
        "precision": config.precision,
        "untrained": config.untrained,
        "threads": classifier.session_info.threads,
    }
