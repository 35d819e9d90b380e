"""`train`: photos in class folders + a base model -> a new head, chosen by cross-validation, in one ONNX file.

Head kinds (cross-validation on the training photos picks one, with its settings):
- "features": class-balanced softmax regression on the base model's pooled features, L2 chosen by CV. Works for
  any task, including ones the base model knows nothing of (textures, a gate open or closed).
- "prior": what the base model already recognises, mapped to the user's labels (sbcrt/train/prior.py): the
  base posterior softmax(logits / T) times R[c, label] = P(label | base class c), learned from which base classes
  the training photos land in and smoothed by label propagation over the base classifier's rows, so a species
  never seen in training inherits the label of the base classes nearest it.
- "features+prior": the two probabilities mixed, w * prior + (1 - w) * features.
The criterion is the class-balanced log loss of the out-of-fold probabilities (each candidate at its best logit
scale): a proper score that ranks candidates where accuracy, on a hundred photos, moves in whole-photo steps
and ties. Measured figures: benchmarks/train_accuracy.py and the README's training section.
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
from sbcrt.runtime.atomic import check_writable
from sbcrt.runtime.image_files import folder_images
from sbcrt.train.features import AUGMENTATIONS, FeatureExtractor, open_base
from sbcrt.train.head import LinearHead, balanced_weights, fit_head, stratified_folds
from sbcrt.train.model_file import (
    FoldedHead,
    build_trained_model,
    classifier_weights,
    head_logits,
    write_model,
)
from sbcrt.train.prior import ClassGraph, PriorSetting, mapping, softmax

HEAD_KINDS = ("features", "prior", "features+prior")
L2_GRID = (100.0, 10.0, 1.0, 0.1)  # strongest first: each fit warm-starts the next
# The prior's grid (cross-validation picks one point): neighbours in the base classes' graph, propagation
# strength, temperature of the base posterior. Small k keeps a label inside its cluster of base classes.
PRIOR_NEIGHBOURS = (3, 5, 10, 20)
PRIOR_ALPHAS = (0.0, 0.5, 0.8, 0.9)
PRIOR_TEMPERATURES = (0.25, 0.5, 1.0, 2.0)
MIX_WEIGHTS = (0.25, 0.5, 0.75)  # weight of the prior in "features+prior"
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
    l2: float | None  # features head's L2 (None for the prior alone)
    accuracy: float
    balanced_accuracy: float
    log_loss: float  # class-balanced, out of fold, at the candidate's best logit scale
    prior: PriorSetting | None = None
    prior_weight: float | None = None  # features+prior: the prior's share

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "prior"}
        out["prior"] = None if self.prior is None else self.prior.__dict__
        return out

    def describe(self) -> str:
        parts = []
        if self.l2 is not None:
            parts.append(f"L2 {self.l2:g}")
        if self.prior is not None:
            p = self.prior
            parts.append(f"k {p.neighbours}, alpha {p.alpha:g}, T {p.temperature:g}")
        if self.prior_weight is not None:
            parts.append(f"prior weight {self.prior_weight:g}")
        return ", ".join(parts)


@dataclass
class TrainReport:
    labels: list[str]
    photos: dict[str, int]  # usable photos per class
    failures: list[tuple[str, str]]  # (path, error) for photos that could not be read
    base: dict[str, Any]
    output: Path
    head_kind: str = ""
    chosen: Candidate | None = None
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
            "head_settings": None if self.chosen is None else self.chosen.to_dict(),
            "folds": self.folds,
            "cross_validation": {
                "accuracy": self.accuracy,
                "balanced_accuracy": self.balanced_accuracy,
                "precision": dict(zip(self.labels, self.precision, strict=True)),
                "recall": dict(zip(self.labels, self.recall, strict=True)),
                "confusion": self.confusion,
                "candidates": [c.to_dict() for c in self.candidates],
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
    check_writable(settings.output)  # a folder, a read-only mount or a full disk fails now, not after the fit
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

    features, scores, targets, centre_paths = [], [], [], []
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
    graph = ClassGraph(embeddings.astype(np.float64)) if "features" not in kinds or len(kinds) > 1 else None

    fit_started = time.perf_counter()
    folds = min(settings.folds, int(counts.min()))
    report.folds = folds
    assignment = stratified_folds(y, folds, settings.seed)
    classes = len(labels)
    best_features = best_prior = None  # (Candidate, out-of-fold probabilities)
    if "features" in kinds or "features+prior" in kinds:
        for candidate, predictions in _cross_validate_features(F, y, assignment, classes):
            best_features = _keep("features" in kinds, report, candidate, predictions, best_features)
    if "prior" in kinds or "features+prior" in kinds:
        for candidate, predictions in _cross_validate_prior(graph, S, y, assignment, classes):
            best_prior = _keep("prior" in kinds, report, candidate, predictions, best_prior)
    best = [c for c in (best_features, best_prior) if c is not None and c[0].kind in kinds]
    if "features+prior" in kinds:
        for weight in MIX_WEIGHTS:
            mixed = weight * best_prior[1] + (1 - weight) * best_features[1]
            candidate = _candidate(
                "features+prior", mixed, y, l2=best_features[0].l2, prior=best_prior[0].prior, weight=weight
            )
            report.candidates.append(candidate)
            best.append((candidate, mixed))
    chosen, predictions = min(best, key=lambda b: _rank(b[0]))
    report.head_kind, report.chosen = chosen.kind, chosen
    report.accuracy, report.balanced_accuracy = chosen.accuracy, chosen.balanced_accuracy
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (y, predictions.argmax(axis=1)), 1)
    report.confusion = confusion.tolist()
    predicted = confusion.sum(axis=0)
    report.precision = [float(confusion[k, k] / predicted[k]) if predicted[k] else 0.0 for k in range(classes)]
    report.recall = [float(confusion[k, k] / counts[k]) for k in range(classes)]
    report.calibration = _calibration(predictions, y)[0]

    folded = FoldedHead(bias=np.zeros(classes, np.float32), scale=report.calibration)
    if chosen.l2 is not None:
        head, mean, std = _fit(F, y, np.arange(len(y)), classes, chosen.l2)
        scaled = head.weight / std  # the standardisation folded in: the file takes raw features
        folded.feature_weight = scaled.astype(np.float32)
        folded.bias = (head.bias - scaled @ mean).astype(np.float32)
    if chosen.prior is not None:
        setting = chosen.prior
        propagated = _propagated(graph, S, setting)
        folded.prior_matrix = mapping(propagated, y, np.arange(len(y)), classes).astype(np.float32)
        folded.temperature = setting.temperature
        folded.prior_weight = 1.0 if chosen.prior_weight is None else chosen.prior_weight
    report.timings_s["fit"] = time.perf_counter() - fit_started

    metadata = _metadata(settings, report, reference, counts)
    payload = build_trained_model(base, folded, metadata)
    expected = head_logits(folded, F[:, 0], S[:, 0])
    report.verify_max_diff = _verify(payload, extractor, reference, centre_paths, expected, report)
    write_model(settings.output, payload)
    report.timings_s["total"] = time.perf_counter() - started
    return report


def _calibration(probabilities: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(scale, loss): one factor for the logits minimising the class-balanced log loss of the out-of-fold
    predictions, and that loss. A strongly regularised head ranks well but is timid (0.3 for a clear dog), which
    `--when "dog > 0.8"` rules would misread; the argmax is unchanged. softmax(s * log p) is the same as scaling
    the logits by s."""
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
    return best_scale, best_loss


def _candidate(
    kind: str,
    probabilities: np.ndarray,
    y: np.ndarray,
    *,
    l2: float | None = None,
    prior: PriorSetting | None = None,
    weight: float | None = None,
) -> Candidate:
    classes = probabilities.shape[1]
    hits = probabilities.argmax(axis=1) == y
    recall = [hits[y == k].mean() for k in range(classes)]
    return Candidate(
        kind, l2, float(hits.mean()), float(np.mean(recall)), _calibration(probabilities, y)[1], prior, weight
    )


def _keep(listed: bool, report: TrainReport, candidate: Candidate, predictions: np.ndarray, best):
    """Record the candidate (when its kind is on offer) and return the better of it and `best`."""
    if listed:
        report.candidates.append(candidate)
    if best is None or _rank(candidate) < _rank(best[0]):
        return candidate, predictions
    return best


def _rank(candidate: Candidate) -> tuple[float, float]:
    """Lowest log loss first; balanced accuracy breaks ties."""
    return round(candidate.log_loss, 6), -candidate.balanced_accuracy


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


def _cross_validate_features(F: np.ndarray, y: np.ndarray, assignment: np.ndarray, classes: int):
    """(Candidate, out-of-fold probabilities) for each L2 strength: trained on the other folds' views,
    scored on the held-out photos' centre view (what the model sees at run time)."""
    folds = int(assignment.max()) + 1
    starts: dict[int, LinearHead] = {}
    for l2 in L2_GRID:
        probabilities = np.zeros((len(y), classes))
        for fold in range(folds):
            train_rows, test_rows = np.flatnonzero(assignment != fold), np.flatnonzero(assignment == fold)
            head, mean, std = _fit(F, y, train_rows, classes, l2, starts.get(fold))
            starts[fold] = head
            probabilities[test_rows] = softmax(head.scores((F[test_rows, 0] - mean) / std))
        yield _candidate("features", probabilities, y, l2=l2), probabilities


def _propagated(graph: ClassGraph, S: np.ndarray, setting: PriorSetting) -> np.ndarray:
    """Each photo's base posterior (its views averaged), propagated over the base classes: (classes, photos)."""
    posteriors = softmax(S / setting.temperature).mean(axis=1)
    return graph.propagate(posteriors.T, setting.neighbours, setting.alpha)


def _cross_validate_prior(graph: ClassGraph, S: np.ndarray, y: np.ndarray, assignment: np.ndarray, classes: int):
    """(Candidate, out-of-fold probabilities) for each point of the prior's grid: the mapping learned from the
    other folds' photos, applied to the held-out photos' centre view."""
    folds = int(assignment.max()) + 1
    for temperature in PRIOR_TEMPERATURES:
        centre = softmax(S[:, 0] / temperature)
        for neighbours in PRIOR_NEIGHBOURS:
            for alpha in PRIOR_ALPHAS:
                if alpha == 0 and neighbours != PRIOR_NEIGHBOURS[0]:
                    continue  # no propagation: the graph plays no part
                setting = PriorSetting(neighbours, alpha, temperature)
                propagated = _propagated(graph, S, setting)
                probabilities = np.zeros((len(y), classes))
                for fold in range(folds):
                    train_rows, test_rows = np.flatnonzero(assignment != fold), np.flatnonzero(assignment == fold)
                    probabilities[test_rows] = centre[test_rows] @ mapping(propagated, y, train_rows, classes)
                yield _candidate("prior", probabilities, y, prior=setting), probabilities


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
        "head_settings": report.chosen.to_dict() if report.chosen else None,
        "calibration_scale": round(report.calibration, 4),
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
