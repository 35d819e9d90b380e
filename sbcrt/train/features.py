"""The base model's pooled features (and its own class scores) for training photos, computed once and cached.

The features are the tensor that feeds the base model's classifier: the exporter names it in the metadata
(`features_output`); for models from other exporters it is the first input of the last Gemm/MatMul. The base
model runs with one extra graph output for it, so one inference gives both the features and the base scores.

Cache: one .npz per photo and base model under <sbcrt cache>/train-features/, named by the sha256 of the photo's
bytes (so renaming or moving a photo between class folders costs nothing) and keyed by the base model's sha256
and the view names. Files are read with allow_pickle=False and checked (keys, shapes, finite values) before use;
a damaged or foreign file is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sbcrt.errors import UsageError
from sbcrt.runtime.atomic import write_atomically
from sbcrt.runtime.images import ImageError, open_image
from sbcrt.runtime.preprocess import FILTERS, Preprocessing, normalize, preprocess_image
from sbcrt.train import onnx_wire as wire

FEATURES_KEY = "features_output"  # metadata key the exporter sets: the tensor feeding the classifier
# Views of each photo at feature level: the exact eval crop, its mirror image, and the four corner crops of the
# same resize (torchvision's FiveCrop corners). Only "centre" is what the model sees at run time.
VIEWS = ("centre", "flip", "top-left", "top-right", "bottom-left", "bottom-right")
AUGMENTATIONS = {"none": ("centre",), "flip": ("centre", "flip"), "crops": VIEWS}
CACHE_FORMAT = 1


@dataclass
class BaseModel:
    """A base model opened for feature extraction: its bytes split for editing, and what the head needs."""

    path: Path
    data: bytes
    sha256: str
    parsed: wire.Model
    features_name: str
    scores_name: str  # the base model's own output (ImageNet logits for the exported models)
    input_name: str
    classifier_node: wire.Node | None  # the node that reads the features (None if the features are the output)


def open_base(path: Path) -> BaseModel:
    """Read and split the base model; find its features tensor. Raises UsageError in the user's terms."""
    if not path.is_file():
        raise UsageError(f"model {path}: no such file" if not path.exists() else f"model {path}: not a file")
    data = path.read_bytes()
    try:
        parsed = wire.parse_model(data)
    except wire.WireError as exc:
        raise UsageError(f"model {path}: not an ONNX model ({exc})") from None
    graph = parsed.graph
    if len(graph.outputs) < 1 or not graph.nodes:
        raise UsageError(f"model {path}: the graph has no nodes or no outputs")
    weights = {name for name, _ in graph.initializers}
    inputs = [name for name, _ in graph.inputs if name not in weights]
    if len(inputs) != 1:
        raise UsageError(f"model {path}: has {len(inputs)} inputs; sbcrt train needs one image input")
    scores = graph.outputs[0][0]
    features = parsed.metadata.get(FEATURES_KEY)
    if features:
        features = _json_string(features, path)
        if not any(features in n.outputs for n in graph.nodes):
            raise UsageError(f"model {path}: metadata {FEATURES_KEY} names {features!r}, which no node produces")
    else:
        last = next((n for n in reversed(graph.nodes) if n.op_type in ("Gemm", "MatMul") and not n.domain), None)
        if last is None:
            raise UsageError(
                f"model {path}: no Gemm/MatMul classifier found and no {FEATURES_KEY} metadata: "
                "cannot tell which tensor holds the pooled features"
            )
        features = last.inputs[0]
    consumer = next((n for n in graph.nodes if features in n.inputs), None)
    return BaseModel(path, data, hashlib.sha256(data).hexdigest(), parsed, features, scores, inputs[0], consumer)


def _json_string(raw: str, path: Path) -> str:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # another exporter may store the bare name
    if not isinstance(value, str) or not value:
        raise UsageError(f"model {path}: metadata {FEATURES_KEY} is not a tensor name")
    return value


def extractor_bytes(base: BaseModel) -> bytes:
    """The base model with the features tensor as a second output (after its own scores)."""
    graph = base.parsed.graph
    outputs = [bytes(raw) for _, raw in graph.outputs[:1]]
    if base.features_name != base.scores_name:
        outputs.append(wire.value_info(wire.GRAPH_OUTPUT, base.features_name, None))
    nodes = wire.needed_nodes(graph, [base.scores_name, base.features_name])
    return wire.serialize(base.parsed, nodes=nodes, outputs=outputs, metadata=dict(base.parsed.metadata))


@dataclass
class PhotoFeatures:
    features: np.ndarray  # (views, D) float32
    scores: np.ndarray  # (views, C) float32: the base model's own output for each view
    cached: bool


class FeatureExtractor:
    """Runs the base model on the views of each photo; reads and writes the feature cache."""

    def __init__(
        self,
        base: BaseModel,
        preprocessing: Preprocessing,
        views: tuple[str, ...],
        *,
        threads: int,
        cache_dir: Path | None,
    ) -> None:
        import onnxruntime as ort

        self.base, self.preprocessing, self.views = base, preprocessing, views
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(extractor_bytes(base), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types, multi-line
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise UsageError(f"model {base.path}: onnxruntime cannot run it for features: {first[:200]}") from None
        self._outputs = [base.scores_name, base.features_name]
        batch = self._session.get_inputs()[0].shape[0]
        self._one_at_a_time = isinstance(batch, int) and batch == 1
        # Part of the key: a change of preprocessing (a re-exported base) must not reuse old features.
        spec = json.dumps([preprocessing.resize_size, list(preprocessing.crop), list(preprocessing.mean),
                           list(preprocessing.std), preprocessing.interpolation, CACHE_FORMAT])  # fmt: skip
        self._key = hashlib.sha256(f"{base.sha256}|{spec}".encode()).hexdigest()[:20]
        self.cache_dir = cache_dir / "train-features" / self._key if cache_dir is not None else None

    def extract(self, path: Path) -> PhotoFeatures:
        """Features of every view of one photo. Raises ImageError for an unreadable photo."""
        try:
            data = path.read_bytes()
        except OSError as exc:  # missing, a folder, no permission: a one-line ImageError, never a traceback
            open_image(path)
            raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from None
        photo_sha = hashlib.sha256(data).hexdigest()
        cached = self._load(photo_sha)
        if cached is not None:
            return PhotoFeatures(*cached, cached=True)
        image = open_image(path)
        batch = np.concatenate([self._view(image, v) for v in self.views])
        scores, features = self._run(batch)
        self._store(photo_sha, features, scores)
        return PhotoFeatures(features, scores, cached=False)

    def _view(self, image: Image.Image, view: str) -> np.ndarray:
        spec = self.preprocessing
        if view == "centre":
            return preprocess_image(image, spec)
        if view == "flip":
            return np.ascontiguousarray(preprocess_image(image, spec)[..., ::-1])
        new_w, new_h = spec.resized_size(*image.size)
        crop_h, crop_w = spec.crop
        resized = image.resize((new_w, new_h), FILTERS[spec.interpolation])
        left = 0 if view.endswith("left") else max(0, new_w - crop_w)
        top = 0 if view.startswith("top") else max(0, new_h - crop_h)
        return normalize(np.asarray(resized.crop((left, top, left + crop_w, top + crop_h))), spec)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chunks = [batch[i : i + 1] for i in range(len(batch))] if self._one_at_a_time else [batch]
        results = [self._session.run(self._outputs, {self.base.input_name: c}) for c in chunks]
        scores = np.concatenate([r[0].reshape(len(c), -1) for r, c in zip(results, chunks, strict=True)])
        raw = np.concatenate([r[1] for r in results])
        if raw.ndim != 2:
            raise UsageError(
                f"model {self.base.path}: features tensor {self.base.features_name!r} has shape "
                f"{list(raw.shape)[1:]} per image, not a vector; export with sbcrt (it marks the pooled features)"
            )
        return scores.astype(np.float32), raw.astype(np.float32)

    def _cache_file(self, photo_sha: str) -> Path | None:
        return self.cache_dir / f"{photo_sha}.npz" if self.cache_dir is not None else None

    def _load(self, photo_sha: str) -> tuple[np.ndarray, np.ndarray] | None:
        file = self._cache_file(photo_sha)
        if file is None or not file.is_file():
            return None
        try:
            with np.load(file, allow_pickle=False) as npz:
                if str(npz["photo_sha256"]) != photo_sha or str(npz["key"]) != self._key:
                    return None
                stored = [str(v) for v in npz["views"]]
                features, scores = npz["features"], npz["scores"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged, foreign, or pickled
            return None
        if not set(self.views) <= set(stored) or features.ndim != 2 or scores.ndim != 2:
            return None
        if len(features) != len(stored) or len(scores) != len(stored) or features.dtype != np.float32:
            return None
        if not (np.isfinite(features).all() and np.isfinite(scores).all()):
            return None
        rows = [stored.index(v) for v in self.views]
        return features[rows], scores[rows]

    def _store(self, photo_sha: str, features: np.ndarray, scores: np.ndarray) -> None:
        file = self._cache_file(photo_sha)
        if file is None:
            return
        buffer = io.BytesIO()
        np.savez(buffer, features=features, scores=scores, views=np.array(self.views),
                 photo_sha256=np.array(photo_sha), key=np.array(self._key))  # fmt: skip
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(file, buffer.getvalue())  # never a half-written file under the real name
        except OSError:
            pass  # a full disk only costs speed
