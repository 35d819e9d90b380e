"""`train`: photos in class folders + a base model -> a new head, chosen by cross-validation, in one ONNX file.

Head kinds (cross-validation picks one, with its L2 strength):
- "features": softmax regression on the base model's pooled features. Works for any task, including ones the
  base model knows nothing of (textures, a gate open or closed).
- "prior": softmax regression on what the base model already recognises, in a form that carries over to
  classes it never saw in training: p = softmax(base logits / T), mapped through the base classifier's own
  (unit-length) weight rows, q = p @ E. E's rows are the base classes' directions in feature space, so similar
  base classes (two dog breeds) get similar q, and a head trained on some breeds recognises the others.
  Folded, the prior is a (base classes x new classes) matrix: a mapping from the base model's classes to the
  user's, learned from the training photos and smoothed by the base model's own class similarity.
- "features+prior": both inputs side by side.
On the shared ImageNet photos, four classes, half of the species held out (benchmarks/train_accuracy.py):
features 0.83, prior 0.94 (see the README's training section for the current figures).
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sbcrt.errors import SbcrtError, UsageError
from sbcrt.runtime.image_files import folder_images
from sbcrt.train.features import AUGMENTATIONS, FeatureExtractor, open_base
from sbcrt.train.head import LinearHead, balanced_weights, fit_head, stratified_folds
from sbcrt.train.model_file import FoldedHead, build_trained_model, classifier_weights, write_atomically

HEAD_KINDS = ("features", "prior", "features+prior")
L2_GRID = (100.0, 10.0, 1.0, 0.1)  # strongest first: each fit warm-starts the next
# Softening the base model's probabilities spreads each photo's mass over its near neighbours among the base
# classes, which is what lets the prior carry over to unseen ones; measured on the shared photos (held-out
# species): T = 1 0.88, 2 0.94, 3 0.92, 4 0.88 (prior head, best L2 each).
PRIOR_TEMPERATURE = 2.0
MAX_FOLDS = 5
MIN_PHOTOS = 2
VERIFY_PHOTOS = 3
STD_FLOOR = 1e-6


@dataclass
class TrainSettings:
    data: Path  # DATA/<label>/*.jpg
    base_model: Path
    output: Path
    augmentation: str = "flip"  # one of features.AUGMENTATIONS
    head: str = "auto"  # "auto" (cross-validation chooses) or one of HEAD_KINDS
    folds: int = MAX_FOLDS
    threads: int | None = None
    cache_dir: Path | None | bool = None  # None: the sbcrt cache dir; False: no cache
    seed: int = 0


@dataclass
class Candidate:
    kind: str
    l2: float
    accuracy: float
    balanced_accuracy: float
    log_loss: float


@dataclass
class TrainReport:
    labels: list[str]
    photos: dict[str, int]  # usable photos per class
    failures: list[tuple[str, str]]  # (path, error) for photos that could not be read
    base: dict[str, Any]
    output: Path
    head_kind: str = ""
    l2: float = 0.0
    folds: int = 0
    candidates: list[Candidate] = field(default_factory=list)
    accuracy: float = 0.0  # cross-validated, of the chosen head
    balanced_accuracy: float = 0.0
    precision: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)  # rows: true class, columns: predicted
    notes: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    cached_photos: int = 0
    verify_max_diff: float = 0.0
    calibration: float = 1.0  # the logits' scale that makes the cross-validated probabilities honest

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "photos": self.photos,
            "failures": [{"path": p, "error": e} for p, e in self.failures],
            "base": self.base,
            "output": str(self.output),
            "head": self.head_kind,
            "l2": self.l2,
            "folds": self.folds,
            "cross_validation": {
                "accuracy": self.accuracy,
                "balanced_accuracy": self.balanced_accuracy,
                "precision": dict(zip(self.labels, self.precision, strict=True)),
                "recall": dict(zip(self.labels, self.recall, strict=True)),
                "confusion": self.confusion,
                "candidates": [c.__dict__ for c in self.candidates],
            },
            "notes": self.notes,
            "timings_s": self.timings_s,
            "cached_photos": self.cached_photos,
            "verify_max_abs_diff": self.verify_max_diff,
            "calibration_scale": self.calibration,
        }


def find_classes(data: Path) -> tuple[list[str], list[list[Path]]]:
    """Class folders of `data` (sorted names) and their image files. Refuses a layout that cannot train."""
    if not data.is_dir():
        raise UsageError(f"{data}: no such folder" if not data.exists() else f"{data}: not a folder")
    folders = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise UsageError(
            f"{data}: found {len(folders)} class folder{'s' if len(folders) != 1 else ''}; "
            f"training needs at least two ({data}/<label>/*.jpg, one folder per class)"
        )
    return [f.name for f in folders], [folder_images(f) for f in folders]


def check_counts(labels: list[str], counts: list[int]) -> None:
    few = [f"{label} ({n})" for label, n in zip(labels, counts, strict=True) if n < MIN_PHOTOS]
    if few:
        raise UsageError(f"every class needs at least {MIN_PHOTOS} readable photos; too few in: {', '.join(few)}")


def train(settings: TrainSettings, *, progress: Callable[[int, int], None] | None = None) -> TrainReport:
    """Train a head for the classes in settings.data on settings.base_model and write settings.output."""
    from sbcrt.runtime.classifier import Classifier
    from sbcrt.runtime.session import default_cache_dir, physical_cores

    started = time.perf_counter()
    if settings.augmentation not in AUGMENTATIONS:
        raise UsageError(f"unknown augmentation {settings.augmentation!r} (one of {', '.join(AUGMENTATIONS)})")
    if settings.head != "auto" and settings.head not in HEAD_KINDS:
        raise UsageError(f"unknown head {settings.head!r} (auto or one of {', '.join(HEAD_KINDS)})")
    if settings.folds < 2:
        raise UsageError("cross-validation needs at least 2 folds")
    if settings.output.is_dir():
        raise UsageError(f"{settings.output} is a folder; give the .onnx file to write")
    labels, files = find_classes(settings.data)
    check_counts(labels, [len(f) for f in files])  # before loading anything: an empty folder fails at once
    base = open_base(settings.base_model)
    # The Classifier is the source of truth for the base model's preprocessing (metadata or ImageNet defaults).
    reference = Classifier(base.path, threads=settings.threads, warmup=False, cache_dir=False)
    cache_root = default_cache_dir() if settings.cache_dir is None else (settings.cache_dir or None)
    extractor = FeatureExtractor(
        base,
        reference.preprocessing,
        AUGMENTATIONS[settings.augmentation],
        threads=settings.threads or physical_cores(),
        cache_dir=Path(cache_root) if cache_root else None,
    )
    report = TrainReport(
        labels=labels,
        photos={},
        failures=[],
        base={
            "path": str(base.path),
            "sha256": base.sha256,
            "architecture": reference.config.architecture,
            "features_output": base.features_name,
        },
        output=settings.output,
    )
    report.notes += reference.notes

    features, scores, targets, groups, centre_paths = [], [], [], [], []
    total = sum(len(f) for f in files)
    done = 0
    for label_index, photos in enumerate(files):
        for path in photos:
            done += 1
            try:
                result = extractor.extract(path)
            except SbcrtError as exc:  # an unreadable photo is reported; the others still train the head
                report.failures.append((str(path), str(exc)))
            else:
                features.append(result.features)
                scores.append(result.scores)
                targets.append(label_index)
                groups.append(len(groups))
                centre_paths.append(path)
                report.cached_photos += int(result.cached)
            if progress:
                progress(done, total)
    report.timings_s["features"] = time.perf_counter() - started
    y = np.asarray(targets, dtype=np.int64)
    counts = np.bincount(y, minlength=len(labels)) if len(y) else np.zeros(len(labels), np.int64)
    report.photos = {label: int(n) for label, n in zip(labels, counts, strict=True)}
    check_counts(labels, [int(n) for n in counts])

    F = np.stack(features).astype(np.float64)  # (photos, views, D)
    S = np.stack(scores).astype(np.float64)  # (photos, views, C)
    embeddings = classifier_weights(base)
    kinds = list(HEAD_KINDS) if settings.head == "auto" else [settings.head]
    if embeddings is None or embeddings.shape != (S.shape[2], F.shape[2]):
        if settings.head not in ("auto", "features"):
            raise UsageError(
                f"model {base.path}: the {settings.head} head needs a base model ending in a plain Gemm/MatMul "
                "classifier on its features"
            )
        kinds = ["features"]
        report.notes.append("base model has no plain classifier to use as a prior: features head only")
        unit = None
    else:
        unit = embeddings.astype(np.float64) / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    Q = _softmax(S / PRIOR_TEMPERATURE) @ unit if unit is not None else None

    fit_started = time.perf_counter()
    folds = min(settings.folds, int(counts.min()))
    report.folds = folds
    assignment = stratified_folds(y, folds, settings.seed)
    best: tuple[tuple[float, float], Candidate, np.ndarray] | None = None
    for kind in kinds:
        inputs = _inputs(kind, F, Q)
        for candidate, predictions in _cross_validate(kind, inputs, y, assignment, len(labels)):
            report.candidates.append(candidate)
            # Balanced accuracy first (every class counts the same, like the class-balanced loss); the log
            # loss breaks ties, which are common with few photos.
            key = (candidate.balanced_accuracy, -candidate.log_loss)
            if best is None or key > best[0]:
                best = (key, candidate, predictions)
    assert best is not None
    _, chosen, predictions = best
    report.head_kind, report.l2 = chosen.kind, chosen.l2
    report.accuracy, report.balanced_accuracy = chosen.accuracy, chosen.balanced_accuracy
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(confusion, (y, predictions.argmax(axis=1)), 1)
    report.confusion = confusion.tolist()
    predicted = confusion.sum(axis=0)
    report.precision = [float(confusion[k, k] / predicted[k]) if predicted[k] else 0.0 for k in range(len(labels))]
    report.recall = [float(confusion[k, k] / counts[k]) for k in range(len(labels))]

    inputs = _inputs(chosen.kind, F, Q)
    head, mean, std = _fit(inputs, y, np.arange(len(y)), len(labels), chosen.l2)
    report.calibration = _calibration_scale(predictions, y)
    head = LinearHead(head.weight * report.calibration, head.bias * report.calibration, head.iterations)
    folded = _fold(chosen.kind, head, mean, std, F.shape[2], unit)
    report.timings_s["fit"] = time.perf_counter() - fit_started

    metadata = _metadata(settings, report, reference, counts)
    payload = build_trained_model(base, folded, metadata)
    expected = head.scores((inputs[:, 0] - mean) / std)
    report.verify_max_diff = _verify(payload, extractor, reference, centre_paths, expected, report)
    write_atomically(settings.output, payload)
    report.timings_s["total"] = time.perf_counter() - started
    return report


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _calibration_scale(probabilities: np.ndarray, y: np.ndarray) -> float:
    """One factor for the logits minimising the class-balanced log loss of the out-of-fold predictions. A
    strongly regularised head ranks well but is timid (0.3 for a clear dog), which `--when "dog > 0.8"` rules
    would misread; the argmax is unchanged. softmax(s * log p) is the same as scaling the logits by s."""
    log_p = np.log(np.maximum(probabilities, 1e-12))
    weights = 1.0 / np.bincount(y)[y]
    best_loss, best_scale = math.inf, 1.0
    for scale in np.geomspace(0.25, 64.0, 49):
        scaled = scale * log_p
        scaled -= scaled.max(axis=1, keepdims=True)
        scaled -= np.log(np.exp(scaled).sum(axis=1, keepdims=True))
        loss = -float(np.sum(weights * scaled[np.arange(len(y)), y])) / float(weights.sum())
        if loss < best_loss:
            best_loss, best_scale = loss, float(scale)
    return best_scale


def _inputs(kind: str, F: np.ndarray, Q: np.ndarray | None) -> np.ndarray:
    if kind == "features":
        return F
    if kind == "prior":
        return Q
    return np.concatenate([F, Q], axis=-1)


def _fit(
    inputs: np.ndarray, y: np.ndarray, photos: np.ndarray, classes: int, l2: float, start: LinearHead | None = None
) -> tuple[LinearHead, np.ndarray, np.ndarray]:
    """Fit on every view of `photos`; returns the head and the standardisation it expects."""
    views = inputs.shape[1]
    x = inputs[photos].reshape(len(photos) * views, -1)
    labels = np.repeat(y[photos], views)
    groups = np.repeat(np.arange(len(photos)), views)
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), STD_FLOOR)
    weights = balanced_weights(labels, groups, classes)
    head = fit_head((x - mean) / std, labels, classes, l2=l2, sample_weights=weights, start=start)
    return head, mean, std


def _cross_validate(kind: str, inputs: np.ndarray, y: np.ndarray, assignment: np.ndarray, classes: int):
    """(Candidate, out-of-fold probabilities) for each L2 strength: trained on the other folds' views,
    scored on the held-out photos' centre view (what the model sees at run time)."""
    folds = int(assignment.max()) + 1
    starts: dict[int, LinearHead] = {}
    for l2 in L2_GRID:
        probabilities = np.zeros((len(y), classes))
        for fold in range(folds):
            train_rows, test_rows = np.flatnonzero(assignment != fold), np.flatnonzero(assignment == fold)
            head, mean, std = _fit(inputs, y, train_rows, classes, l2, starts.get(fold))
            starts[fold] = head
            probabilities[test_rows] = _softmax(head.scores((inputs[test_rows, 0] - mean) / std))
        hits = probabilities.argmax(axis=1) == y
        recall = [hits[y == k].mean() for k in range(classes)]
        weights = 1.0 / np.bincount(y, minlength=classes)[y]
        log_loss = -float(np.sum(weights * np.log(np.maximum(probabilities[np.arange(len(y)), y], 1e-12))))
        log_loss /= float(weights.sum())
        yield Candidate(kind, l2, float(hits.mean()), float(np.mean(recall)), log_loss), probabilities


def _fold(
    kind: str, head: LinearHead, mean: np.ndarray, std: np.ndarray, feature_dim: int, unit: np.ndarray | None
) -> FoldedHead:
    """Undo the standardisation inside the weights: the file takes raw features and base logits."""
    scaled = head.weight / std  # (K, inputs)
    bias = head.bias - scaled @ mean
    feature_weight = prior = None
    if kind in ("features", "features+prior"):
        feature_weight = scaled[:, :feature_dim]
    if kind in ("prior", "features+prior"):
        prior = unit @ scaled[:, -unit.shape[1] :].T  # (C, K): q @ A.T = p @ (E @ A.T)
    return FoldedHead(
        bias=bias.astype(np.float32),
        feature_weight=None if feature_weight is None else feature_weight.astype(np.float32),
        prior_matrix=None if prior is None else prior.astype(np.float32),
        temperature=PRIOR_TEMPERATURE,
    )


def _metadata(settings: TrainSettings, report: TrainReport, reference, counts: np.ndarray) -> dict[str, str]:
    import json

    from sbcrt import __version__

    config = reference.config
    props = {key: value for key, value in config.to_props().items()}
    props.update(
        {
            "architecture": json.dumps(config.architecture),
            "num_classes": json.dumps(len(report.labels)),
            "labels": json.dumps(report.labels),
            "base_sha256": json.dumps(report.base["sha256"]),
            "exporter": json.dumps(f"sbcrt {__version__} train"),
        }
    )
    spec = reference.preprocessing
    props.update(
        {
            "resize_size": json.dumps(spec.resize_size),
            "crop_size": json.dumps(spec.crop[0]),
            "input_size": json.dumps([3, *spec.crop]),
            "interpolation": json.dumps(spec.interpolation),
            "mean": json.dumps(list(spec.mean)),
            "std": json.dumps(list(spec.std)),
        }
    )
    provenance = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sbcrt": __version__,
        "base_model": Path(report.base["path"]).name,
        "base_sha256": report.base["sha256"],
        "base_architecture": config.architecture,
        "photos": {label: int(n) for label, n in zip(report.labels, counts, strict=True)},
        "unreadable_photos": len(report.failures),
        "augmentation": settings.augmentation,
        "head": report.head_kind,
        "l2": report.l2,
        "calibration_scale": round(report.calibration, 4),
        "prior_temperature": PRIOR_TEMPERATURE if "prior" in report.head_kind else None,
        "validation": {
            "method": f"{report.folds}-fold stratified cross-validation on the training photos",
            "accuracy": round(report.accuracy, 4),
            "balanced_accuracy": round(report.balanced_accuracy, 4),
            "recall": {k: round(v, 4) for k, v in zip(report.labels, report.recall, strict=True)},
            "precision": {k: round(v, 4) for k, v in zip(report.labels, report.precision, strict=True)},
        },
    }
    props["trained_head"] = json.dumps(provenance)
    return props


def _verify(payload: bytes, extractor: FeatureExtractor, reference, paths: list[Path], expected, report) -> float:
    """Run the written bytes on a few training photos: onnxruntime must give the head's own logits."""
    import onnxruntime as ort

    from sbcrt.runtime.images import open_image
    from sbcrt.runtime.preprocess import preprocess_image

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise SbcrtError(f"internal error: onnxruntime rejects the trained model: {first[:200]}") from None
    worst = 0.0
    for index in range(min(VERIFY_PHOTOS, len(paths))):
        tensor = preprocess_image(open_image(paths[index]), reference.preprocessing)
        got = session.run(None, {extractor.base.input_name: tensor})[0][0]
        want = expected[index]
        scale = max(1.0, float(np.abs(want).max()))
        worst = max(worst, float(np.abs(got - want).max()) / scale)
    if not math.isfinite(worst) or worst > 1e-3:
        raise SbcrtError(f"internal error: the trained model's logits differ from the head's by {worst:.3g}")
    return worst
