"""The model config that travels inside the ONNX file (`metadata_props`), shared by export and runtime.

Every value is stored as a JSON string under a plain key, so any ONNX tool can read it and the runtime
needs nothing but the .onnx file. Keep this module free of heavy imports: the runtime reads it on the Pi.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from importlib import resources

FORMAT_VERSION = 1
FORMAT_KEY = "sbcrt.format"


@dataclass
class ModelConfig:
    """What a runtime needs to turn a photo into the model's input and its output into names."""

    architecture: str = "unknown"
    num_classes: int = 1000
    labels: list[str] = field(default_factory=list)
    input_size: list[int] = field(default_factory=lambda: [3, 224, 224])  # C, H, W
    resize_size: int = 256  # shorter side before the centre crop
    crop_size: int = 224
    interpolation: str = "bicubic"
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    checkpoint_sha256: str = ""
    exporter: str = ""
    untrained: bool = False
    precision: str = "fp32"

    def to_props(self) -> dict[str, str]:
        props = {key: json.dumps(value) for key, value in asdict(self).items()}
        props[FORMAT_KEY] = str(FORMAT_VERSION)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ModelConfig | None:
        """The config stored by `to_props`, or None for a model exported without sbcrt."""
        if FORMAT_KEY not in props:
            return None
        known = {f.name for f in fields(cls)}
        values = {}
        for key, raw in props.items():
            if key in known:
                try:
                    values[key] = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"model metadata {key!r} is not valid JSON: {raw[:60]!r}") from exc
                problem = _check_value(key, values[key])
                if problem:
                    raise ValueError(f"model metadata {key!r} must be {problem}, not {raw[:60]!r}")
        return cls(**values)


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 ImageNet-1K classes in index order as (synset, short name), from sbcrt/data/imagenet_classes.txt."""
    text = resources.files("sbcrt").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    rows = (line.split(" ", 1) for line in text.splitlines() if line.strip())
    return tuple((synset, name.strip()) for synset, name in rows)


def _check_value(key: str, value: object) -> str | None:
    """What `value` should have been for `key` (a phrase for the error), or None when it is fine. Checked on
    load, so hostile or hand-edited metadata is refused by name instead of failing later with a traceback."""
    if key in ("num_classes", "resize_size", "crop_size"):
        return None if _is_int(value) and value >= 1 else "a positive whole number"
    if key == "input_size":
        ok = isinstance(value, list) and len(value) == 3 and all(_is_int(v) and v >= 1 for v in value)
        return None if ok else "three positive whole numbers [C, H, W]"
    if key in ("mean", "std"):
        ok = isinstance(value, list) and len(value) == 3 and all(_is_finite(v) for v in value)
        if ok and key == "std" and not all(v > 0 for v in value):
            return "three positive numbers (R, G, B)"
        return None if ok else "three finite numbers (R, G, B)"
    if key == "labels":
        return None if isinstance(value, list) and all(isinstance(v, str) for v in value) else "a list of strings"
    if key == "untrained":
        return None if isinstance(value, bool) else "true or false"
    return None if isinstance(value, str) else "a string"  # architecture, interpolation, precision, ...


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def _is_finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1K class names in index order (short names; a few repeat, e.g. 'crane')."""
    return [name for _, name in imagenet_classes()]


def indexed_labels(num_classes: int) -> list[str]:
    """Names for classes nobody named: class_0, class_1, ... (no spaces: usable in `watch --when class_3>=0.5`).
    `sbcrt export` stores them in the model; the runtime shows them for a model without labels."""
    return [f"class_{i}" for i in range(num_classes)]


def read_labels_file(path: str) -> list[str]:
    """One label per line; blank lines are ignored. `<synset> <name>` lines keep the whole line."""
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]
