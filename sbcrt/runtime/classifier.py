"""`Classifier`: one ONNX image classifier, ready to classify photos and camera frames (torch-free).

    from sbcrt import Classifier
    clf = Classifier("efficientnet_lite0.onnx")
    result = clf.classify("cow.jpg")            # a path, bytes, a PIL image or an HxWx3 uint8 array
    result.topk[0].label, result.topk[0].prob, result.timing_ms["inference"]
    clf.classify_frame(frame)                   # OpenCV/picamera2 frames: the fast preprocessing path

Everything the model needs (preprocessing, labels) comes from the sbcrt metadata inside the .onnx file; a model
without it runs with explicit overrides or ImageNet defaults (see `Classifier.notes`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sbcrt.errors import SettingError, UsageError
from sbcrt.runtime.engines import open_engine
from sbcrt.runtime.images import (
    ImageError,
    ImageSource,
    frame_channels,
    max_pixels_default,
    open_image,
    to_rgb,
    upright,
)
from sbcrt.runtime.metadata import ModelConfig, imagenet_labels, indexed_labels
from sbcrt.runtime.preprocess import Preprocessing, optional_opencv, preprocess_frame, preprocess_image

# timm's and torchvision's convention for models without a recorded resize: crop / 0.875 (224 -> 256).
DEFAULT_CROP_PCT = 0.875
DEFAULT_CROP = 224
JPEG_DRAFT_GAP = 2.0
ONNX_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    prob: float


@dataclass
class Result:
    """One classified image: the top-k classes, the raw model output and where the time went (ms)."""

    source: str
    topk: list[Prediction]
    logits: np.ndarray  # the model's raw output for this image, shape (num_classes,)
    timing_ms: dict[str, float] = field(default_factory=dict)  # decode, preprocess, inference, postprocess, total

    @property
    def top1(self) -> Prediction:
        return self.topk[0]

    def to_dict(self, *, logits: bool = False) -> dict[str, Any]:
        """The JSON contract: {"source", "topk": [{"index", "label", "prob"}], "timing_ms"[, "logits"]}."""
        out: dict[str, Any] = {
            "source": self.source,
            "topk": [{"index": p.index, "label": p.label, "prob": p.prob} for p in self.topk],
            "timing_ms": dict(self.timing_ms),
        }
        if logits:
            out["logits"] = [float(v) for v in self.logits]
        return out

    def summary(self) -> str:
        """ "ox 0.81, water buffalo 0.07, ..." as the CLI prints it."""
        return ", ".join(f"{p.label} {p.prob:.2f}" for p in self.topk)


class Classifier:
    """An ONNX image classifier with its preprocessing, labels and a tuned onnxruntime session.

    Args:
        model: path to the .onnx file.
        threads: intra-op threads; None means one per physical core this process may use.
        spin: let idle worker threads busy-wait (fastest alone; pass False when camera or UI threads share
            the cores).
        cache_dir: where optimised graphs are cached; None for $SBCRT_CACHE or ~/.cache/sbcrt, False for none.
        warmup: run the model once now, so the first real image does not pay for lazy initialisation.
        providers: onnxruntime providers to use instead of the automatic choice.
        engine: "auto" (ncnn on aarch64 when the .ncnn file beside the model and the ncnn package are there,
            else onnxruntime), "onnxruntime" or "ncnn" (see sbcrt/runtime/engines).
        fp16: ncnn only: half-precision storage and arithmetic where the CPU has it (a Pi 5).
        size, resize_size, mean, std, interpolation: override the model's preprocessing (needed only for models
            without sbcrt metadata whose input is not the ImageNet default).
        labels: class names overriding the model's.

    Raises UsageError (one line) when the file is missing, is not a model, or its input is not an image.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        threads: int | None = None,
        spin: bool = True,
        cache_dir: str | os.PathLike | None | bool = None,
        warmup: bool = True,
        providers: list[str] | None = None,
        size: int | None = None,
        resize_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
        labels: list[str] | None = None,
        engine: str = "auto",
        fp16: bool = False,
    ) -> None:
        self.path = Path(model)
        self.max_pixels = max_pixels_default()  # read once: a bad SBCRT_MAX_PIXELS fails here, not per image
        self.engine = open_engine(
            self.path, engine=engine, threads=threads, spin=spin, cache_dir=cache_dir, providers=providers, fp16=fp16
        )
        self.session_info = self.engine.info
        self.notes: list[str] = list(self.session_info.notes)  # assumptions a user should know about
        self._read_signature()
        try:
            self.config = ModelConfig.from_props(self.engine.metadata)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"model {self.path}: bad sbcrt metadata: {exc}") from None
        self.has_metadata = self.config is not None
        # Unlike notes, warnings are meant to be shown even to a quiet caller.
        self.warnings: list[str] = []
        if self.config is not None and self.config.untrained:
            self.warnings.append(
                f"{self.path.name} is UNTRAINED (random weights, for speed tests only): its predictions mean nothing"
            )
        if self.config is None:
            self.config = ModelConfig(architecture="unknown", num_classes=self.num_classes)
        self.preprocessing = self._resolve_preprocessing(size, resize_size, mean, std, interpolation)
        self.labels = self._resolve_labels(labels)
        self.input_shape: tuple[int, int, int, int] = (1, 3, *self.preprocessing.crop)
        if warmup:
            self._run(np.zeros(self.input_shape, dtype=np.float32))

    # -- loading -------------------------------------------------------------------------------------------

    def _read_signature(self) -> None:
        inputs, outputs = self.engine.inputs, self.engine.outputs
        where = f"model {self.engine.path}"
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise UsageError(f"{where}: has {len(inputs)} inputs ({names}); sbcrt needs one image input")
        image = inputs[0]
        shape = list(image.shape)
        is_image = (
            image.type in ONNX_FLOAT_TYPES and len(shape) == 4 and (shape[1] == 3 or not isinstance(shape[1], int))
        )
        if not is_image:
            raise UsageError(
                f"{where}: input {image.name!r} is {image.type} {_shape_text(shape)}, not an image tensor "
                "(sbcrt needs float [N, 3, H, W])"
            )
        if isinstance(shape[0], int) and shape[0] != 1 and shape[0] > 0:
            raise UsageError(f"{where}: input batch size is fixed at {shape[0]}; sbcrt feeds one image at a time")
        self.input_name = image.name
        self._input_dtype = ONNX_FLOAT_TYPES[image.type]
        self._static_hw = tuple(d if isinstance(d, int) and d > 0 else None for d in shape[2:])
        out = outputs[0]
        out_shape = list(out.shape)
        classes = [d for d in out_shape[1:] if d != 1]
        if len(out_shape) < 2 or len(classes) > 1 or (classes and not isinstance(classes[0], int)):
            raise UsageError(f"{where}: output {out.name!r} {_shape_text(out_shape)} is not a class score vector")
        self.output_name = out.name
        self.num_classes = int(classes[0]) if classes else 1

    def _resolve_preprocessing(self, size, resize_size, mean, std, interpolation) -> Preprocessing:
        config = self.config
        static_h, static_w = self._static_hw
        if self.has_metadata:
            spec = Preprocessing.from_config(config)
        else:
            crop = (static_h or DEFAULT_CROP, static_w or DEFAULT_CROP)
            spec = Preprocessing(resize_size=round(max(crop) / DEFAULT_CROP_PCT), crop=crop)
            self.notes.append(
                "no sbcrt metadata in the model: "
                + ("preprocessing from the flags given, the rest " if size or mean or std else "")
                + "ImageNet defaults (resize the shorter side to crop/0.875, centre crop, ImageNet mean/std)"
            )
        if size is not None:
            spec = replace(spec, crop=(size, size), resize_size=resize_size or round(size / DEFAULT_CROP_PCT))
        if resize_size is not None:
            spec = replace(spec, resize_size=resize_size)
        if mean is not None:
            spec = replace(spec, mean=tuple(mean))
        if std is not None:
            spec = replace(spec, std=tuple(std))
        if interpolation is not None:
            spec = replace(spec, interpolation=interpolation.lower())
        for axis, (want, have) in enumerate(zip(self._static_hw, spec.crop, strict=True)):
            if want is not None and want != have:
                raise UsageError(
                    f"model {self.path}: takes {static_h}x{static_w} images, but the crop is "
                    f"{spec.crop[0]}x{spec.crop[1]} ({'height' if axis == 0 else 'width'} differs)"
                )
        return spec

    def _resolve_labels(self, labels: list[str] | None) -> list[str]:
        if labels is not None:
            if len(labels) != self.num_classes:
                raise UsageError(f"{len(labels)} labels given, but model {self.path} scores {self.num_classes} classes")
            return list(labels)
        if self.config.labels:
            if len(self.config.labels) != self.num_classes:
                raise SettingError(
                    "labels",
                    f"model {self.path}: its metadata has {len(self.config.labels)} labels for {self.num_classes} "
                    f"outputs; give {self.num_classes} labels",
                )
            return list(self.config.labels)
        if self.num_classes == 1000:
            self.notes.append("no labels in the model: assuming the 1000 ImageNet classes")
            return imagenet_labels()
        self.notes.append("no labels in the model: classes are shown by index")
        return indexed_labels(self.num_classes)

    # -- classifying ---------------------------------------------------------------------------------------

    def classify(
        self,
        image: ImageSource | Image.Image | np.ndarray,
        *,
        bgr: bool = False,
        fast: bool = False,
        top_k: int = 5,
        source: str | None = None,
    ) -> Result:
        """Classify one image.

        `image` is a path, bytes or binary file (decoded safely: EXIF orientation, any mode, size limit), a
        PIL image, or an HxWx3 uint8 array (RGB; BGR with bgr=True). By default the preprocessing is exactly the
        reference eval transform; fast=True trades a little fidelity for speed (JPEG draft decoding for files,
        the area pre-shrink path for arrays). Raises ImageError for an unusable image.
        """
        start = time.perf_counter()
        decoded = self._decode(image, fast=fast)
        decode_end = time.perf_counter()
        tensor = self._to_tensor(decoded, bgr=bgr, fast=fast)
        name = source if source is not None else _describe(image)
        return self._finish(tensor, name, top_k, start, decode_end)

    def classify_frame(self, frame: np.ndarray, *, bgr: bool = True, top_k: int = 5) -> Result:
        """Classify a camera frame (OpenCV's BGR by default; picamera2 RGB888 arrays are BGR in memory too)
        with the fast preprocessing path."""
        return self.classify(frame, bgr=bgr, fast=True, top_k=top_k, source="frame")

    def preprocess(
        self, image: ImageSource | Image.Image | np.ndarray, *, bgr: bool = False, fast: bool = False
    ) -> np.ndarray:
        """The (1, 3, H, W) float32 tensor `classify` would feed the model."""
        return self._to_tensor(self._decode(image, fast=fast), bgr=bgr, fast=fast)

    def _decode(self, image: ImageSource | Image.Image | np.ndarray, *, fast: bool) -> Image.Image | np.ndarray:
        """Files and PIL images become an upright RGB PIL image; arrays pass through (checked later)."""
        if isinstance(image, np.ndarray):
            return image
        if isinstance(image, Image.Image):
            return to_rgb(upright(image))
        # The fast path decodes JPEGs at a reduced scale (1/2 for a 1080p JPEG), keeping at least twice the
        # resized size for the exact final filter. An opt-in trade: agreement with the exact path is measured
        # in benchmarks/preprocess.py.
        draft = round(self.preprocessing.resize_size * JPEG_DRAFT_GAP) if fast else None
        return open_image(image, max_pixels=self.max_pixels, draft_shorter_side=draft)

    def _to_tensor(self, decoded: Image.Image | np.ndarray, *, bgr: bool, fast: bool) -> np.ndarray:
        if isinstance(decoded, Image.Image):
            if fast:
                return preprocess_frame(np.asarray(decoded), self.preprocessing, bgr=False)
            return preprocess_image(decoded, self.preprocessing)
        if fast:
            return preprocess_frame(decoded, self.preprocessing, bgr=bgr)
        pixels = frame_channels(decoded)
        rgb = _swap_channels(pixels) if bgr else np.ascontiguousarray(pixels)
        return preprocess_image(Image.fromarray(rgb), self.preprocessing)

    def run(self, tensor: np.ndarray) -> np.ndarray:
        """Raw model output for a (N, 3, H, W) float32 batch, shape (N, num_classes)."""
        return self._run(tensor)

    def _run(self, tensor: np.ndarray) -> np.ndarray:
        feed = tensor if tensor.dtype == self._input_dtype else tensor.astype(self._input_dtype)
        out = self.engine.run(feed)
        return np.asarray(out, dtype=np.float32).reshape(out.shape[0], -1)

    def _finish(self, tensor: np.ndarray, source: str, top_k: int, start: float, decode_end: float) -> Result:
        pre_end = time.perf_counter()
        logits = self._run(tensor)[0]
        infer_end = time.perf_counter()
        probs = _probabilities(logits)
        k = max(1, min(top_k, len(probs)))
        best = np.argsort(-probs, kind="stable")[:k]
        topk = [Prediction(int(i), self.labels[i], float(probs[i])) for i in best]
        end = time.perf_counter()
        timing = {
            "decode": (decode_end - start) * 1000,
            "preprocess": (pre_end - decode_end) * 1000,
            "inference": (infer_end - pre_end) * 1000,
            "postprocess": (end - infer_end) * 1000,
            "total": (end - start) * 1000,
        }
        return Result(source=source, topk=topk, logits=logits, timing_ms=timing)

    def describe(self) -> dict[str, Any]:
        """What `sbcrt info` shows about the model and its session."""
        spec = self.preprocessing
        return {
            "path": str(self.path),
            "architecture": self.config.architecture,
            "has_metadata": self.has_metadata,
            "num_classes": self.num_classes,
            "input": {"name": self.input_name, "shape": list(self.input_shape)},
            "output": self.output_name,
            "preprocessing": {
                "resize_size": spec.resize_size,
                "crop": list(spec.crop),
                "interpolation": spec.interpolation,
                "mean": list(spec.mean),
                "std": list(spec.std),
            },
            "precision": self.config.precision,
            "untrained": self.config.untrained,
            "checkpoint_sha256": self.config.checkpoint_sha256,
            "exporter": self.config.exporter,
            "session": {
                "engine": self.engine.name,
                "file": str(self.engine.path),
                "providers": self.session_info.providers,
                "threads": self.session_info.threads,
                "spin": self.session_info.spin,
                "cache": str(self.session_info.cache_path) if self.session_info.cache_path else None,
                "cache_hit": self.session_info.cache_hit,
                "load_ms": round(self.session_info.load_ms, 1),
                "cache_check_ms": round(self.session_info.digest_ms, 1),  # part of load_ms
            },
            "notes": list(self.notes),
        }


def _probabilities(logits: np.ndarray) -> np.ndarray:
    values = logits.astype(np.float64)
    # A model that already ends in softmax outputs probabilities: applying softmax again would flatten them.
    if values.size > 1 and values.min() >= 0.0 and abs(values.sum() - 1.0) < 1e-3:
        return values
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()


def _swap_channels(pixels: np.ndarray) -> np.ndarray:
    cv2 = optional_opencv()
    if cv2 is None:
        return np.ascontiguousarray(pixels[:, :, ::-1])
    return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_BGR2RGB)  # ~50x faster than numpy's copy


def _describe(image: object) -> str:
    if isinstance(image, str | os.PathLike):
        return str(image)
    if isinstance(image, np.ndarray):
        return "array"
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or "image"
    return "image"


def _shape_text(shape: list) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else str(d or "?") for d in shape) + "]"


__all__ = ["Classifier", "ImageError", "Prediction", "Result"]
