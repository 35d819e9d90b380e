"""Safe image decoding: any file PIL can read becomes an upright 8-bit RGB image, or a one-line ImageError.

What "correctly" means for each odd input, and why:
- EXIF orientation is applied, so a phone photo taken sideways reaches the model the way a person sees it.
- Alpha (RGBA, LA, P with transparency) is composited on white: the colour stored under transparent pixels is
  arbitrary (often black), and a white background is what a viewer shows. Opaque images are unaffected.
- 16-bit and 32-bit integer greyscale (I;16*, I) is scaled to 8 bits (v / 257). PIL's own conversion clips at
  255 instead, which turns almost every 16-bit image white.
- CMYK goes through its embedded ICC profile when it has one (what print software does), else PIL's formula.
- Images with a declared size above `max_pixels` are refused before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sbcrt.errors import SbcrtError, UsageError

# 128 MP covers today's 108 MP phone sensors; a decoded RGB image that size is ~400 MB, about the most a
# 2 GB Raspberry Pi can hold next to a model. Override per call or with SBCRT_MAX_PIXELS.
DEFAULT_MAX_PIXELS = 128_000_000

EXIF_ORIENTATION = 0x0112

ImageSource = str | os.PathLike | bytes | BinaryIO


class ImageError(SbcrtError):
    """An input that is not a usable image (unreadable, truncated, hostile, wrong type)."""


def max_pixels_default() -> int:
    """$SBCRT_MAX_PIXELS, else DEFAULT_MAX_PIXELS. Raises UsageError for a value that is not a positive whole
    number (a `Classifier` reads it once, when it is made, so a typo fails the start, not every image)."""
    raw = os.environ.get("SBCRT_MAX_PIXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"SBCRT_MAX_PIXELS must be a positive whole number of pixels, not {raw!r}")
    return value


def _allow_in_pil(limit: int) -> None:
    """Let PIL open images up to `limit` pixels: PIL refuses anything above twice its own MAX_IMAGE_PIXELS
    (~179 MP) while opening, before our check could allow it, so a higher limit raises PIL's (never lowers
    it; our own check, from the header, is what refuses bombs)."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is not None and limit > 2 * pil_limit:
        Image.MAX_IMAGE_PIXELS = -(-limit // 2)


def open_image(
    source: ImageSource, *, max_pixels: int | None = None, draft_shorter_side: int | None = None
) -> Image.Image:
    """Decode `source` (a path, bytes or a binary file object) into an upright RGB image.

    `draft_shorter_side` lets a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) as long as its
    shorter side stays at least that long: several times faster for big photos, but no longer pixel-identical
    to the reference pipeline, so only the fast path uses it.
    """
    limit = max_pixels_default() if max_pixels is None else max_pixels
    _allow_in_pil(limit)
    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    name = str(source) if isinstance(source, str | os.PathLike) else "image"
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.exists():
            raise ImageError("no such file")
        if path.is_dir():
            raise ImageError("is a folder, not an image")
        if path.stat().st_size == 0:
            raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; our own limit below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except UnidentifiedImageError:
        raise ImageError("not an image, or a format PIL cannot read") from None
    except Image.DecompressionBombError:
        # PIL's own hard limit (2x MAX_IMAGE_PIXELS) fires while opening, before ours can.
        raise ImageError(
            f"refused: declared size is above PIL's {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP limit "
            "(a decompression bomb)"
        ) from None
    except OSError as exc:
        raise ImageError(f"cannot read {name}: {exc.strerror or exc}") from None
    try:
        rgb = _decode_opened(image, limit, draft_shorter_side)
    except ImageError:
        image.close()
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for broken files
        image.close()
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated" in message:
            raise ImageError(f"truncated or corrupt image ({message})") from None
        raise ImageError(f"corrupt image ({message})") from None
    if rgb is not image:
        image.close()  # release the file handle (multi-frame formats keep it open after load)
    return rgb


def _decode_opened(image: Image.Image, limit: int, draft_shorter_side: int | None) -> Image.Image:
    width, height = image.size  # read from the header: nothing is decoded yet
    if width * height > limit:
        raise ImageError(
            f"refused: {width}x{height} is {width * height / 1e6:.0f} MP, above the {limit / 1e6:.0f} MP "
            "limit (a decompression bomb, or set SBCRT_MAX_PIXELS)"
        )
    if draft_shorter_side is not None and image.format == "JPEG":
        keep = draft_shorter_side / min(width, height)
        image.draft(None, (math.ceil(width * keep), math.ceil(height * keep)))
    image.load()
    return to_rgb(upright(image))


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says (itself when there is nothing to turn)."""
    try:
        if image.getexif().get(EXIF_ORIENTATION, 1) not in range(2, 9):
            return image  # exif_transpose would copy the whole image to change nothing
        return ImageOps.exif_transpose(image)
    except Exception:
        # A broken EXIF block must not make an otherwise fine photo unusable: keep it as stored.
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        has_alpha = "transparency" in image.info or image.palette.mode == "RGBA"
        image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode.startswith("I;16") or mode == "I":
        return _scale_16bit_grey(image).convert("RGB")
    if mode == "F":
        # Float images have no standard range; [0, 1] is the common convention, else treat as 8-bit values.
        values = np.asarray(image, dtype=np.float64)
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        grey = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    return image.convert("RGB")  # L, 1, YCbCr, LAB, HSV, RGBX: PIL's conversions are the right ones


def _scale_16bit_grey(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.int64)
    # 0..65535 maps to 0..255 with v / 257, rounded: an 8-bit image saved as 16-bit (v * 257) comes back exact.
    grey = np.clip((values + 128) // 257, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:
            pass  # a broken profile: fall back to the plain formula rather than failing the image
    return image.convert("RGB")


def frame_channels(array: np.ndarray) -> np.ndarray:
    """Check a camera frame (HxW, HxWx1, HxWx3 or HxWx4 uint8) and return an HxWx3 view, channels as given.

    Four-channel frames (picamera2's XRGB8888/XBGR8888, BGRA from OpenCV) drop the fourth channel. The channel
    order is not swapped here: the fast path swaps after shrinking, where it is 40x cheaper.
    """
    if not isinstance(array, np.ndarray):
        raise ImageError(f"expected a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ImageError(f"expected a uint8 image array, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape:
        raise ImageError(f"expected an HxWx3 image array, got shape {tuple(array.shape)}")
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    return array[:, :, :3]
