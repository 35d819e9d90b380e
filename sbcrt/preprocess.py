"""Image -> model input, two ways.

`preprocess_image` is the authors' eval transform, step for step (torchvision's Resize(resize_size, bicubic) +
CenterCrop(crop) + ToTensor + Normalize on a PIL image), so photos give the same predictions as the PyTorch
reference.

`preprocess_frame` is the fast path for camera frames (numpy arrays). It computes nearly the same pixels for a
fraction of the cost, because it never touches pixels the centre crop throws away and it shrinks in two steps:
1. only the part of the frame that the crop (plus the filter's reach) covers is read;
2. that region is shrunk by an integer factor with an area (box) average, which OpenCV does in a few SIMD
   passes, leaving a scale of >= REDUCING_GAP for the next step;
3. the exact filter (PIL's antialiased bicubic) maps the small region straight onto the crop's pixels
   (`Image.resize(box=...)`), with the same per-axis scale the full resize would use.
OpenCV's INTER_CUBIC alone would be faster still but does not antialias, which changes predictions on
camera-sized frames; the area pre-shrink is what keeps the result faithful.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sbcrt.errors import UsageError
from sbcrt.images import frame_channels
from sbcrt.metadata import ModelConfig

FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# Half-width of each filter's kernel in output pixels (PIL's `support`): how far outside the crop it reads.
FILTER_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0, "nearest": 0.5, "lanczos": 3.0, "box": 0.5, "hamming": 1.0}

# The area pre-shrink stops while the exact filter still has at least this much shrinking left to do.
# Measured with EfficientNet-Lite0 on the 250 shared photos as 1080p frames (benchmarks/preprocess.py): a gap
# of 2 (pre-shrink by 2 at 1080p) is ~2x cheaper again but flips 2-5 near-tie top-1s in 250 (98-99.6 %
# agreement, depending on the frames' noise); at 3, a 1080p frame (scale 4.2) gets no pre-shrink, only the
# crop-region resize, and agrees 100 % (logits within ~1e-3). Frames with a shorter side from 1536 px (4K,
# 12 MP stills) are pre-shrunk, where the box is small next to the filter and its error is ~4x smaller.
REDUCING_GAP = 3.0


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: shorter side to `resize_size`, centre crop `crop` (H, W), normalise."""

    resize_size: int = 256
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in FILTERS:
            raise UsageError(f"unknown interpolation {self.interpolation!r} (one of {', '.join(FILTERS)})")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UsageError("mean and std need three values (R, G, B)")
        if any(s <= 0 for s in self.std):
            raise UsageError("std values must be positive")
        if self.resize_size < 1 or min(self.crop) < 1:
            raise UsageError("resize and crop sizes must be positive")

    @classmethod
    def from_config(cls, config: ModelConfig) -> Preprocessing:
        return cls(
            resize_size=int(config.resize_size),
            crop=(int(config.crop_size), int(config.crop_size)),
            mean=tuple(float(v) for v in config.mean),
            std=tuple(float(v) for v in config.std),
            interpolation=str(config.interpolation).lower(),
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the shorter side becomes resize_size (torchvision's rule: truncate the long side)."""
        if width <= height:
            return self.resize_size, int(self.resize_size * height / width)
        return int(self.resize_size * width / height), self.resize_size

    def crop_origin(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the centre crop in an image of this size; negative when torchvision would pad."""
        crop_h, crop_w = self.crop
        return _centre_offset(width, crop_w), _centre_offset(height, crop_h)


def _centre_offset(size: int, crop: int) -> int:
    if crop > size:  # torchvision pads (crop - size) // 2 zeros before the image, then crops at 0
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))  # Python's round, as torchvision (ties go to even)


def preprocess_image(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """The exact eval transform on an RGB PIL image: a (1, 3, H, W) float32 array."""
    new_w, new_h = spec.resized_size(*image.size)
    resized = image.resize((new_w, new_h), FILTERS[spec.interpolation])
    left, top = spec.crop_origin(new_w, new_h)
    crop_h, crop_w = spec.crop
    cropped = resized.crop((left, top, left + crop_w, top + crop_h))  # PIL fills outside the image with 0
    return normalize(np.asarray(cropped), spec)


def preprocess_frame(frame: np.ndarray, spec: Preprocessing, *, bgr: bool) -> np.ndarray:
    """The fast path for an HxWx3 uint8 frame (RGB, or BGR with bgr=True): a (1, 3, H, W) float32 array."""
    pixels = frame_channels(frame)
    height, width = pixels.shape[:2]
    new_w, new_h = spec.resized_size(width, height)
    left, top = spec.crop_origin(new_w, new_h)
    crop_h, crop_w = spec.crop
    if left < 0 or top < 0:  # tiny frames that need padding are rare and cheap: use the exact path
        rgb = pixels[:, :, ::-1] if bgr else pixels
        return preprocess_image(Image.fromarray(np.ascontiguousarray(rgb)), spec)

    scale_x, scale_y = width / new_w, height / new_h
    # The crop's rectangle in frame coordinates: resizing this box straight to crop size is the same as
    # resizing the whole frame and cropping, with the same per-axis scale.
    box = (left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y)
    factor = max(1, int(min(scale_x, scale_y) / REDUCING_GAP))
    reach = FILTER_SUPPORT[spec.interpolation] * max(scale_x, scale_y) + factor
    x0, x1 = _aligned_span(box[0] - reach, box[2] + reach, width, factor)
    y0, y1 = _aligned_span(box[1] - reach, box[3] + reach, height, factor)
    region = _area_shrink(pixels[y0:y1, x0:x1], factor)
    small_box = ((box[0] - x0) / factor, (box[1] - y0) / factor, (box[2] - x0) / factor, (box[3] - y0) / factor)
    small_box = (
        max(0.0, small_box[0]),
        max(0.0, small_box[1]),
        min(float(region.shape[1]), small_box[2]),
        min(float(region.shape[0]), small_box[3]),
    )
    out = Image.fromarray(region).resize((crop_w, crop_h), FILTERS[spec.interpolation], box=small_box)
    # Channels are swapped here, on 224x224 pixels, not on the frame: the resampling treats them alike.
    return normalize(np.asarray(out), spec, bgr=bgr)


def _aligned_span(start: float, stop: float, size: int, factor: int) -> tuple[int, int]:
    """[start, stop) widened to whole pixels, clipped to the frame, a multiple of `factor` long."""
    lo = max(0, math.floor(start)) // factor * factor
    hi = min(size, math.ceil(stop))
    blocks = math.ceil((hi - lo) / factor)
    if lo + blocks * factor > size:  # at the frame's edge: drop the partial block rather than read past it
        blocks = (size - lo) // factor
    return lo, lo + blocks * factor


def _area_shrink(region: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return np.ascontiguousarray(region)
    height, width = region.shape[0] // factor, region.shape[1] // factor
    try:
        import cv2
    except ImportError:  # opencv is a dependency, but a hand-built Pi image may lack it: PIL's box reduce
        return np.asarray(Image.fromarray(np.ascontiguousarray(region)).reduce(factor))
    # For an integer factor INTER_AREA is an exact box average, like PIL's reduce(), only faster.
    return cv2.resize(region, (width, height), interpolation=cv2.INTER_AREA)


def normalize(pixels: np.ndarray, spec: Preprocessing, *, bgr: bool = False) -> np.ndarray:
    """HxWx3 uint8 (RGB, or BGR with bgr=True) -> (1, 3, H, W) float32, bit-identical to ToTensor + Normalize
    (the same float32 steps: v / 255, - mean, / std). The 8-bit pixels are made planar first: float
    arithmetic on contiguous planes is ~10x faster than on interleaved HxWx3 floats."""
    order = [2, 1, 0] if bgr else [0, 1, 2]
    planes = np.ascontiguousarray(pixels.transpose(2, 0, 1)[order]).astype(np.float32)
    planes /= np.float32(255.0)
    planes -= np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    planes /= np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return planes[None]
