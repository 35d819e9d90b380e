"""Image -> model input, two ways.

`preprocess_image` is the authors' eval transform, step for step (torchvision's Resize(resize_size, bicubic) +
CenterCrop(crop) + ToTensor + Normalize on a PIL image), so photos give the same predictions as the PyTorch
reference.

`preprocess_frame` is the fast path for camera frames (numpy arrays). Up to 1080p it computes the exact path's
pixels (all but a rare one differing by 1 level) for about a quarter of the cost, because it never touches
pixels the centre crop throws away and because it does PIL's resampling arithmetic as matrix products:
1. only the part of the frame that the crop (plus the filter's reach) covers is read (~960x960 of 1920x1080);
2. frames with a shorter side from 1536 px (4K, 12 MP stills) are first shrunk by an integer factor with an
   area (box) average, which OpenCV does in a few SIMD passes, leaving a scale of >= REDUCING_GAP;
3. PIL's antialiased filter is applied as PIL applies it (two separable passes with PIL's own weights, each
   rounded to 8 bits, see `filter_windows`), but each pass is a handful of small BLAS matrix products over the
   crop's 224 outputs instead of PIL's per-pixel loop (see `CropPlan`).
OpenCV's INTER_CUBIC alone would be faster still but does not antialias, which changes predictions on
camera-sized frames.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from PIL import Image

from sbcrt.errors import UsageError
from sbcrt.runtime.images import frame_channels
from sbcrt.runtime.metadata import ModelConfig

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
# crop-region resize, and agrees 100 % (logits within ~1e-2). Frames with a shorter side from 1536 px (4K,
# 12 MP stills) are pre-shrunk, where the box is small next to the filter and its error is ~4x smaller.
REDUCING_GAP = 3.0
# How `preprocess_frame` applies the exact filter: "matmul" (PIL's arithmetic as BLAS products, ~2x cheaper
# than "pil" at 1080p, ~1.5x at 4K) or "pil" (PIL's own `Image.resize(box=...)` on the crop region; also the fallback
# without OpenCV, and for "nearest", which PIL does by lookup rather than by weighted sums).
FRAME_RESAMPLERS = ("matmul", "pil")
# Outputs per band block (see `band_blocks`). Fewer waste fewer multiplications on zeros (a block spans
# ~(outputs - 1) * scale + window inputs, each output uses one window), more make bigger, more efficient
# products; at 1080p and 4K anything from 4 to 16 costs the same within noise, 8 was most often the fastest.
OUTPUTS_PER_BLOCK = 8


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
        # NaN passes every comparison, so it is checked by name: a NaN mean or std would feed the model NaNs.
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise UsageError(f"mean and std must be finite numbers, not mean {self.mean} std {self.std}")
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


def preprocess_frame(frame: np.ndarray, spec: Preprocessing, *, bgr: bool, resampler: str = "matmul") -> np.ndarray:
    """The fast path for an HxWx3 uint8 frame (RGB, or BGR with bgr=True): a (1, 3, H, W) float32 array.

    `resampler` is one of FRAME_RESAMPLERS; both give the same pixels up to a rare 1-level difference."""
    if resampler not in FRAME_RESAMPLERS:
        raise UsageError(f"unknown resampler {resampler!r} (one of {', '.join(FRAME_RESAMPLERS)})")
    pixels = frame_channels(frame)
    height, width = pixels.shape[:2]
    new_w, new_h = spec.resized_size(width, height)
    left, top = spec.crop_origin(new_w, new_h)
    if left < 0 or top < 0:  # tiny frames that need padding are rare and cheap: use the exact path
        rgb = pixels[:, :, ::-1] if bgr else pixels
        return preprocess_image(Image.fromarray(np.ascontiguousarray(rgb)), spec)
    if resampler == "pil" or spec.interpolation == "nearest" or optional_opencv() is None:
        return _resample_crop_with_pil(pixels, spec, bgr=bgr)
    plan = _crop_plan(height, width, spec, REDUCING_GAP)
    region = _area_shrink(pixels[plan.rows, plan.columns], plan.factor)
    # Channels are swapped by `normalize`, on the crop's pixels, not on the frame: the resampling treats them
    # alike. It is the exact path's `normalize`, so equal pixels give bit-identical tensors.
    return normalize(plan.resample(region), spec, bgr=bgr)


def _resample_crop_with_pil(pixels: np.ndarray, spec: Preprocessing, *, bgr: bool) -> np.ndarray:
    """The "pil" resampler: PIL's own filter maps the (pre-shrunk) region straight onto the crop's pixels
    (`Image.resize(box=...)`), with the same per-axis scale the full resize would use."""
    height, width = pixels.shape[:2]
    new_w, new_h = spec.resized_size(width, height)
    left, top = spec.crop_origin(new_w, new_h)
    crop_h, crop_w = spec.crop
    scale_x, scale_y = width / new_w, height / new_h
    # The crop's rectangle in frame coordinates: resizing this box straight to crop size is the same as
    # resizing the whole frame and cropping, with the same per-axis scale.
    box = (left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y)
    factor = _reduce_factor(scale_x, scale_y, REDUCING_GAP)
    reach = FILTER_SUPPORT[spec.interpolation] * max(scale_x, scale_y) + factor
    x0, x1 = _aligned_span(box[0] - reach, box[2] + reach, width, factor)
    y0, y1 = _aligned_span(box[1] - reach, box[3] + reach, height, factor)
    region = np.ascontiguousarray(_area_shrink(pixels[y0:y1, x0:x1], factor))
    small_box = ((box[0] - x0) / factor, (box[1] - y0) / factor, (box[2] - x0) / factor, (box[3] - y0) / factor)
    small_box = (
        max(0.0, small_box[0]),
        max(0.0, small_box[1]),
        min(float(region.shape[1]), small_box[2]),
        min(float(region.shape[0]), small_box[3]),
    )
    out = Image.fromarray(region).resize((crop_w, crop_h), FILTERS[spec.interpolation], box=small_box)
    return normalize(np.asarray(out), spec, bgr=bgr)


def _reduce_factor(scale_x: float, scale_y: float, reducing_gap: float) -> int:
    """The area pre-shrink's integer factor: as large as leaves the exact filter a scale >= reducing_gap."""
    return max(1, int(min(scale_x, scale_y) / reducing_gap))


def _aligned_span(start: float, stop: float, size: int, factor: int) -> tuple[int, int]:
    """[start, stop) widened to whole pixels, clipped to the frame, a multiple of `factor` long."""
    lo = max(0, math.floor(start)) // factor * factor
    hi = min(size, math.ceil(stop))
    blocks = math.ceil((hi - lo) / factor)
    if lo + blocks * factor > size:  # at the frame's edge: drop the partial block rather than read past it
        blocks = (size - lo) // factor
    return lo, lo + blocks * factor


@functools.cache
def optional_opencv() -> ModuleType | None:
    """OpenCV, imported on first use; None where it is missing (it is a dependency, but a hand-built Pi image
    may lack it: the fast path then uses the "pil" resampler)."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def require_opencv(purpose: str) -> ModuleType:
    """OpenCV for what cannot do without it (cameras, streams, videos, JPEG snapshots); UsageError otherwise."""
    cv2 = optional_opencv()
    if cv2 is None:
        raise UsageError(f"OpenCV is needed for {purpose}: pip install opencv-python-headless")
    return cv2


def _area_shrink(region: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return region
    cv2 = optional_opencv()
    if cv2 is None:  # PIL's box reduce: the same average, slower
        return np.asarray(Image.fromarray(np.ascontiguousarray(region)).reduce(factor))
    # For an integer factor INTER_AREA is an exact box average, like PIL's reduce(), only faster.
    height, width = region.shape[0] // factor, region.shape[1] // factor
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


# -- the exact filter as matrix products ------------------------------------------------------------------------
#
# PIL resizes separably: each output pixel is a weighted sum of a short window of input pixels along one axis,
# with weights from its `precompute_coeffs` (the kernel stretched by the shrink factor, centred at
# (i + 0.5) * scale, its window clipped to the image, normalised to sum 1, rounded to 22-bit fixed point).
# It does the horizontal pass first, over every row the vertical pass needs, rounds that to 8 bits, then the
# vertical pass, and rounds again. As a matrix, one axis's resampling is a band: 224 outputs x ~960 inputs at
# 1080p with ~19 non-zeros per row. A dense product would do 50x too much work, so the band is cut into blocks
# of a few consecutive outputs whose windows together span a short run of inputs, and each block is one small
# BLAS product: (outputs x span) @ (span x row length). Both passes run over rows of interleaved pixels (the
# 8-bit image is transposed for the horizontal one, one SIMD copy), so channels never need splitting.
# The sums are float32 rather than PIL's exact integers, so a sum within ~1e-4 of a half level may round the
# other way: a rare 1-level difference (tests/test_preprocess.py).


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5  # PIL's (and the authors') bicubic
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# PIL's filters (libImaging/Resample.c) on distances in units of the stretched kernel; np.sinc is sin(pi x)/(pi x).
KERNELS = {
    "bicubic": _bicubic,
    "bilinear": lambda x: np.maximum(0.0, 1.0 - np.abs(x)),
    "box": lambda x: ((x > -0.5) & (x <= 0.5)).astype(np.float64),
    "hamming": lambda x: np.where(np.abs(x) < 1.0, np.sinc(x) * (0.54 + 0.46 * np.cos(np.pi * x)), 0.0),
    "lanczos": lambda x: np.where((x >= -3.0) & (x < 3.0), np.sinc(x) * np.sinc(x / 3.0), 0.0),
}
PIL_WEIGHT_BITS = 22  # PIL's PRECISION_BITS for 8-bit images: 32 - 8 - 2
# Products are cut so that none exceeds this many multiply-adds (M * N * K): numpy's OpenBLAS runs bigger ones
# on all cores, whose start-up and spin-waiting cost far more than these products, and on a busy machine
# ruinously: measured 320 ms wall, 160 ms CPU per 1080p frame instead of 5 ms with 2 cores taken by other work.
# At or below 4 * 65536 (OpenBLAS's GEMM_MULTITHREAD_THRESHOLD * SMP_THRESHOLD_MIN) it stays on one thread.
SINGLE_THREAD_PRODUCT = 4 * 65536
# PIL rounds its exact integer sums half up; OpenCV's 8-bit conversion rounds half to even. Sums that are exactly
# a half are common with box and bilinear weights (4 equal taps of 0.25), so a bias of a few float32 ulps at 255
# makes them round up too; larger biases round up sums just below a half (measured: 2^-16 gives the fewest
# 1-level differences for every filter, none for box).
HALF_UP_BIAS = 2.0**-16


def filter_windows(
    centres: np.ndarray, scale: float, in_size: int, interpolation: str
) -> tuple[np.ndarray, np.ndarray]:
    """PIL's `precompute_coeffs` (+ `normalize_coeffs_8bpc`) for outputs centred at `centres` (in input pixels)
    when shrinking by `scale` from `in_size` pixels: each output's first input and its weights (one row per
    output, zero past the window's end)."""
    filterscale = max(scale, 1.0)  # enlarging keeps the kernel's own size
    support = FILTER_SUPPORT[interpolation] * filterscale
    # C's (int) truncates toward zero; a start before the image is then clipped to 0 like any other.
    first = np.maximum(0, np.trunc(centres - support + 0.5).astype(np.int64))
    stop = np.minimum(in_size, np.trunc(centres + support + 0.5).astype(np.int64))
    taps = np.arange(math.ceil(support) * 2 + 1)
    weights = KERNELS[interpolation]((taps + first[:, None] - centres[:, None] + 0.5) * (1.0 / filterscale))
    weights[taps >= (stop - first)[:, None]] = 0.0
    totals = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, totals, out=weights, where=totals != 0.0)
    # Fixed point, rounded half away from zero as C's (int)(w +- 0.5): PIL's sums use exactly these weights.
    one = float(1 << PIL_WEIGHT_BITS)
    return first, np.trunc(weights * one + np.copysign(0.5, weights)) / one


@dataclass(frozen=True)
class BandBlock:
    """Outputs [outputs] of one axis = `weights` (outputs x inputs, float32) @ inputs [start, stop)."""

    outputs: slice
    start: int
    stop: int
    weights: np.ndarray


def band_blocks(first: np.ndarray, weights: np.ndarray, outputs_per_block: int) -> list[BandBlock]:
    """Cut one axis's band (`filter_windows`' first input and weights per output) into blocks."""
    taps = weights.shape[1]
    blocks = []
    for begin in range(0, len(first), outputs_per_block):
        end = min(len(first), begin + outputs_per_block)
        start, stop = int(first[begin:end].min()), int(first[begin:end].max()) + taps
        matrix = np.zeros((end - begin, stop - start), np.float32)
        for row in range(begin, end):
            offset = first[row] - start
            matrix[row - begin, offset : offset + taps] = weights[row]
        used = np.flatnonzero(matrix.any(axis=0))  # windows clipped at the image's edge end early
        stop = start + int(used[-1]) + 1 if used.size else start + 1
        blocks.append(BandBlock(slice(begin, end), start, stop, np.ascontiguousarray(matrix[:, : stop - start])))
    return blocks


@dataclass(frozen=True)
class CropPlan:
    """What `preprocess_frame` needs for one frame size and spec: the part of the frame to read, the area
    pre-shrink factor, and each axis's band blocks (in pixels of that region after the pre-shrink)."""

    rows: slice
    columns: slice
    factor: int
    vertical: list[BandBlock]
    horizontal: list[BandBlock]

    def resample(self, region: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 region -> the crop, crop_h x crop_w x 3 uint8, as PIL's resize-then-crop computes it."""
        cv2 = optional_opencv()
        crop_h, crop_w = self.vertical[-1].outputs.stop, self.horizontal[-1].outputs.stop
        across = _resample_rows(cv2.transpose(region), self.horizontal)  # crop_w x (height * 3)
        down = cv2.transpose(across.reshape(crop_w, region.shape[0], 3))  # height x crop_w x 3, still 8-bit
        return _resample_rows(down, self.vertical).reshape(crop_h, crop_w, 3)


def _resample_rows(image: np.ndarray, blocks: list[BandBlock]) -> np.ndarray:
    """One pass along an HxWx3 uint8 image's first axis: (outputs, W * 3) uint8, rounded and clipped as PIL."""
    rows = image.reshape(image.shape[0], -1)
    width = rows.shape[1]
    sums = np.empty((blocks[-1].outputs.stop, width), np.float32)
    for block in blocks:
        inputs = rows[block.start : block.stop].astype(np.float32)  # only this block's rows, while in cache
        outputs, span = block.weights.shape
        step = max(1, SINGLE_THREAD_PRODUCT // block.weights.size)
        chunks = width // step
        if chunks:  # equal column chunks as one stacked product: numpy's loop calls BLAS once per chunk
            head = chunks * step
            np.matmul(
                block.weights,
                inputs[:, :head].reshape(span, chunks, step).swapaxes(0, 1),
                out=sums[block.outputs, :head].reshape(outputs, chunks, step).swapaxes(0, 1),
            )
        if chunks * step < width:
            np.matmul(block.weights, inputs[:, chunks * step :], out=sums[block.outputs, chunks * step :])
    # Round (half up, see HALF_UP_BIAS) and saturate to 8 bits in one SIMD pass.
    cv2 = optional_opencv()
    return cv2.add(sums, HALF_UP_BIAS, dtype=cv2.CV_8U)


@functools.lru_cache(maxsize=16)
def _crop_plan(height: int, width: int, spec: Preprocessing, reducing_gap: float) -> CropPlan:
    new_w, new_h = spec.resized_size(width, height)
    left, top = spec.crop_origin(new_w, new_h)
    crop_h, crop_w = spec.crop
    scale_x, scale_y = width / new_w, height / new_h
    factor = _reduce_factor(scale_x, scale_y, reducing_gap)
    rows, vertical = _axis_plan(height, scale_y, top, crop_h, factor, spec.interpolation)
    columns, horizontal = _axis_plan(width, scale_x, left, crop_w, factor, spec.interpolation)
    return CropPlan(rows, columns, factor, vertical, horizontal)


def _axis_plan(
    size: int, scale: float, crop_start: int, crop: int, factor: int, interpolation: str
) -> tuple[slice, list[BandBlock]]:
    """One axis: the span of the frame to read and the band blocks over it (after a pre-shrink by `factor`)."""
    # The crop's output centres, computed as PIL does for the whole resized image (in0 = 0).
    centres = (np.arange(crop_start, crop_start + crop) + 0.5) * scale
    if factor == 1:  # exactly the exact path's windows, clipped at the frame's edges; read only their union
        first, weights = filter_windows(centres, scale, size, interpolation)
        span_start = int(first.min())
        blocks = band_blocks(first - span_start, weights, OUTPUTS_PER_BLOCK)
        return slice(span_start, span_start + max(block.stop for block in blocks)), blocks
    # Pre-shrunk: PIL's filter on the box-averaged region, as the "pil" resampler does with Image.resize(box=).
    reach = FILTER_SUPPORT[interpolation] * scale + factor
    start, stop = _aligned_span(crop_start * scale - reach, (crop_start + crop) * scale + reach, size, factor)
    first, weights = filter_windows((centres - start) / factor, scale / factor, (stop - start) // factor, interpolation)
    return slice(start, stop), band_blocks(first, weights, OUTPUTS_PER_BLOCK)
