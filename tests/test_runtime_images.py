"""Decoding odd, broken and hostile images, seen through a real model whose output is each channel's mean
pixel (the "probe"): what the model receives is what these tests check."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sbcrt import Classifier
from sbcrt.runtime.images import ImageError, open_image

REDDISH = (200, 40, 10)


@pytest.fixture(scope="module")
def probe(runtime_models: dict[str, Path]) -> Classifier:
    return Classifier(runtime_models["probe"], cache_dir=False)


def channel_means(probe: Classifier, image) -> np.ndarray:
    """The mean R, G, B (0..255) the model saw."""
    return probe.classify(image).logits * 255


def test_rgb_reaches_the_model_unchanged(probe: Classifier, tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    Image.new("RGB", (300, 260), REDDISH).save(path)
    assert channel_means(probe, path) == pytest.approx(REDDISH, abs=0.05)


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("L", 90, (90, 90, 90)),
        ("1", 1, (255, 255, 255)),
        ("LA", (90, 255), (90, 90, 90)),
        ("LA", (90, 0), (255, 255, 255)),  # fully transparent: the white background, not the hidden grey
        ("RGBA", (*REDDISH, 255), REDDISH),
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),  # transparent black is white, as a viewer shows it
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),  # pure red ink mix
        ("YCbCr", (76, 85, 255), (254, 0, 0)),
    ],
)
def test_modes_convert_to_rgb(probe: Classifier, tmp_path: Path, mode: str, color, expected) -> None:
    path = tmp_path / "odd.tiff"
    Image.new(mode, (240, 240), color).save(path)
    assert channel_means(probe, path) == pytest.approx(expected, abs=1.5)


def test_palette_with_transparency(probe: Classifier, tmp_path: Path) -> None:
    image = Image.new("P", (240, 240), 1)
    image.putpalette([0, 0, 0, *REDDISH] + [0, 0, 0] * 254)
    opaque, transparent = tmp_path / "opaque.png", tmp_path / "transparent.png"
    image.save(opaque)
    image.save(transparent, transparency=1)
    assert channel_means(probe, opaque) == pytest.approx(REDDISH, abs=0.05)
    assert channel_means(probe, transparent) == pytest.approx((255, 255, 255), abs=0.05)


def test_16bit_greyscale_is_scaled_not_clipped(probe: Classifier, tmp_path: Path) -> None:
    # PIL's own convert("RGB") clips 16-bit values at 255: this mid-grey would come out white.
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((240, 240), 100 * 257, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert channel_means(probe, path) == pytest.approx((100, 100, 100), abs=0.05)


def test_exif_orientation_is_applied(probe: Classifier, tmp_path: Path) -> None:
    # Left half red, right half blue as stored; orientation 6 means "rotate 90 degrees clockwise to view",
    # which puts red on top. The probe cannot see position, so crop-relevant geometry is checked instead:
    # a 400x240 landscape stored image becomes portrait and its centre crop changes accordingly.
    stored = np.zeros((240, 400, 3), np.uint8)
    stored[:, :200] = (255, 0, 0)
    stored[:, 200:] = (0, 0, 255)
    plain, rotated = tmp_path / "plain.jpg", tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(plain, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(rotated, quality=95, exif=exif)
    upright = open_image(rotated)
    assert upright.size == (240, 400)
    top, bottom = np.asarray(upright)[50, 120], np.asarray(upright)[350, 120]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    assert open_image(plain).size == (400, 240)


def test_pil_image_and_arrays_match_files(probe: Classifier, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)
    path = tmp_path / "noise.png"
    Image.fromarray(pixels).save(path)
    from_file = probe.preprocess(path)
    assert np.array_equal(probe.preprocess(Image.fromarray(pixels)), from_file)
    assert np.array_equal(probe.preprocess(pixels), from_file)
    assert np.array_equal(probe.preprocess(np.ascontiguousarray(pixels[:, :, ::-1]), bgr=True), from_file)
    assert np.array_equal(probe.preprocess(path.read_bytes()), from_file)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"just some text, not a JPEG\n", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "not an image"),
    ],
)
def test_non_images_give_one_line_errors(probe: Classifier, tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as caught:
        probe.classify(path)
    assert "\n" not in str(caught.value)


def test_truncated_jpeg_is_refused(probe: Classifier, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        probe.classify(path)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height pixels and carries none: what a decompression bomb looks like to a
    decoder that trusts the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (16_000, 10_000)])
def test_decompression_bombs_are_refused_before_decoding(
    probe: Classifier, tmp_path: Path, width: int, height: int
) -> None:
    # 10 GP is above PIL's own hard limit; 160 MP is below it but above sbcrt's 128 MP default.
    bomb = png_header_only(tmp_path / "bomb.png", width, height)
    with pytest.raises(ImageError, match="decompression bomb"):
        probe.classify(bomb)


def test_pixel_limit_is_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "two-megapixels.png"
    Image.new("RGB", (2000, 1000)).save(path)
    with pytest.raises(ImageError, match="2 MP, above the 1 MP limit"):
        open_image(path, max_pixels=1_000_000)
    monkeypatch.setenv("SBCRT_MAX_PIXELS", "1000000")
    with pytest.raises(ImageError, match="above the 1 MP limit"):
        open_image(path)
    monkeypatch.delenv("SBCRT_MAX_PIXELS")
    assert open_image(path).size == (2000, 1000)


def test_folders_and_missing_files(probe: Classifier, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        probe.classify(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="folder"):
        probe.classify(tmp_path)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((10, 10, 3), np.float32),
        np.zeros((10, 10, 2), np.uint8),
        np.zeros((0, 10, 3), np.uint8),
        np.zeros((2, 10, 10, 3), np.uint8),
    ],
)
def test_bad_arrays_are_refused(probe: Classifier, array: np.ndarray) -> None:
    with pytest.raises(ImageError, match="expected"):
        probe.classify(array)
