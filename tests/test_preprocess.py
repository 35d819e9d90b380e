"""The fast path's "matmul" resampler against PIL: the exact path's pixels, up to a rare 1-level difference
(float32 sums vs PIL's integer ones), on random and real images, for each of PIL's filters and several frame
shapes; and the same pixels as the "pil" resampler where both pre-shrink (4K)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from sbcrt.errors import UsageError
from sbcrt.runtime.preprocess import Preprocessing, preprocess_frame, preprocess_image

SAMPLES = Path(__file__).resolve().parents[1] / "sbcrt" / "data" / "samples"
# Pixels as levels: mean 0, std 1/255 makes the model input the 8-bit value itself.
LEVELS = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)}


def differences(frame_bgr: np.ndarray, spec: Preprocessing) -> tuple[float, float]:
    """(largest difference in levels, fraction of values that differ) between the fast and the exact path."""
    exact = preprocess_image(Image.fromarray(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)), spec)
    fast = preprocess_frame(frame_bgr, spec, bgr=True)
    difference = np.abs(fast - exact)
    return float(difference.max()), float(np.mean(difference > 1e-3))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos", "hamming", "box"])
@pytest.mark.parametrize("size", [(1920, 1080), (1080, 1920), (640, 480), (333, 517)])
def test_matmul_resampler_matches_pil_on_noise(interpolation: str, size: tuple[int, int]) -> None:
    # Noise is the hard case: every pixel matters and the bicubic/lanczos lobes overshoot and get clipped.
    frame = np.random.default_rng(size[0] + size[1]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    largest, share = differences(frame, Preprocessing(interpolation=interpolation, **LEVELS))
    # Measured: at most 1 level, on <= 0.007 % of values (bicubic: <= 0.005 %; box: none), but bilinear at a
    # scale of 15/8 (640x480) has many sums near a half: 0.6 %. (Keeping floats between the passes instead of
    # rounding to 8 bits as PIL does changes nearly every value, by up to ~4 levels on photos.)
    assert largest <= 1.0 + 1e-3, largest
    assert share < (0.01 if interpolation == "bilinear" else 0.0002), share


def real_frames(photos: list[Path]) -> list[np.ndarray]:
    """Photos as 1080p BGR frames: stretched with OpenCV's cubic (its overshoot saturates at edges), and a
    camera-like one, aspect kept with sensor noise."""
    frames = []
    noise = np.random.default_rng(0).normal(0, 4, (1080, 1920, 3)).round().astype(np.int16)
    for photo in photos:
        bgr = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        frames.append(cv2.resize(bgr, (1920, 1080), interpolation=cv2.INTER_CUBIC))
        scale = 1920 / bgr.shape[1]
        tall = cv2.resize(bgr, (1920, max(1080, round(bgr.shape[0] * scale))), interpolation=cv2.INTER_CUBIC)
        top = (tall.shape[0] - 1080) // 2
        frames.append(np.clip(tall[top : top + 1080].astype(np.int16) + noise, 0, 255).astype(np.uint8))
    return frames


def test_matmul_resampler_matches_pil_on_the_repository_photos() -> None:
    matmul_matches_pil_on([SAMPLES / "chelsea.png", SAMPLES / "coffee.png"])


def test_matmul_resampler_matches_pil_on_shared_photos(imagenet_samples: list[tuple[Path, int]]) -> None:
    matmul_matches_pil_on([path for path, _ in imagenet_samples[::50]])


def matmul_matches_pil_on(photos: list[Path]) -> None:
    spec = Preprocessing(**LEVELS)
    for frame in real_frames(photos):
        largest, share = differences(frame, spec)
        assert largest <= 1.0 + 1e-3 and share < 0.001, (largest, share)  # measured: 1 level, ~0.005 %


def test_both_resamplers_agree_on_pre_shrunk_4k_frames() -> None:
    # At 4K both first shrink by 2 with an area average (not in the exact path), then apply PIL's filter.
    rng = np.random.default_rng(7)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (2160, 3840, 3), dtype=np.uint8), (0, 0), 1.0)
    spec = Preprocessing(**LEVELS)
    matmul, pil = (preprocess_frame(frame, spec, bgr=True, resampler=name) for name in ("matmul", "pil"))
    difference = np.abs(matmul - pil)
    assert difference.max() <= 1.0 + 1e-3 and np.mean(difference > 1e-3) < 0.001


def test_unknown_resampler_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown resampler 'cubic'"):
        preprocess_frame(np.zeros((480, 640, 3), np.uint8), Preprocessing(), bgr=True, resampler="cubic")
