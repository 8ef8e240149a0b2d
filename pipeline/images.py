"""Turn source bytes into the stored image: an RGB JPEG whose shorter side is at most `image_size`.

One code path for URL and folder sources. The order matters for safety and speed: the pixel count
is read from the header and checked before anything is decoded (decompression bombs), JPEGs are
decoded at a reduced scale when the result is downscaled anyway (draft mode), and only the first
frame of an animation is decoded.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import statuses
from pipeline.statuses import RowFailure

# Decoders allowed to touch untrusted bytes (JPEG covers MPO, which it opens as such). Formats that shell out (EPS via Ghostscript) or are
# rarely images (PDF, PSD layers, ICNS...) are refused as `not_an_image`.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class StoredImage:
    jpeg: bytes
    width: int
    height: int
    original_width: int   # as displayed (EXIF orientation applied)
    original_height: int


@dataclass(frozen=True)
class ImagePolicy:
    image_size: int = 256
    min_image_size: int = 0          # shorter side below this: `too_small`
    max_pixels: int = Image.MAX_IMAGE_PIXELS  # Pillow's own warning threshold (~89.5 MP)
    jpeg_quality: int = 95


def source_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ImageProcessor:
    """Callable: source bytes -> StoredImage, or RowFailure naming what is wrong with them."""

    def __init__(self, policy: ImagePolicy):
        self.policy = policy

    def __call__(self, data: bytes) -> StoredImage:
        if not data:
            raise RowFailure(statuses.EMPTY, "empty body or file (0 bytes)")
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise RowFailure(statuses.NOT_AN_IMAGE, f"not an image in {'/'.join(ALLOWED_FORMATS)} "
                                                    f"({len(data)} bytes starting {data[:16]!r})") from None
        except Image.DecompressionBombError as error:
            raise RowFailure(statuses.DECOMPRESSION_BOMB, str(error)) from None
        except (OSError, SyntaxError, ValueError) as error:
            raise _decode_failure(error) from None
        with image:
            return self._convert(image)

    def _convert(self, image: Image.Image) -> StoredImage:
        policy = self.policy
        width, height = image.size  # from the header: nothing decoded yet
        if width * height > policy.max_pixels:
            raise RowFailure(statuses.DECOMPRESSION_BOMB, f"{width}x{height} = {width * height} pixels exceeds "
                                                          f"the cap of {policy.max_pixels} (checked before decoding)")
        if min(width, height) < policy.min_image_size:
            raise RowFailure(statuses.TOO_SMALL, f"{width}x{height} is below the minimum of "
                                                 f"{policy.min_image_size} px on the shorter side")
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION)
            if image.format in ("JPEG", "MPO") and min(width, height) > policy.image_size:
                scale = policy.image_size / min(width, height)
                # Decode at 1/2, 1/4 or 1/8 scale when the result is still at least the target.
                image.draft(None, (max(1, int(width * scale)), max(1, int(height * scale))))
            image.load()
            if orientation in range(2, 9):  # exif_transpose copies the image even when nothing turns
                image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)
        except Image.DecompressionBombError as error:
            raise RowFailure(statuses.DECOMPRESSION_BOMB, str(error)) from None
        except (OSError, SyntaxError, ValueError) as error:
            raise _decode_failure(error) from None
        if orientation in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        rgb = shrink_to_shorter_side(rgb, policy.image_size)
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=policy.jpeg_quality)
        return StoredImage(buffer.getvalue(), rgb.width, rgb.height, width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """3-channel RGB: transparency composited on white, CMYK converted, 16-bit scaled to 8-bit."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # [H, W] integers in 0..65535; 257 maps 65535 to 255 exactly
        values = np.asarray(image).astype(np.float32)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


def shrink_to_shorter_side(image: Image.Image, image_size: int) -> Image.Image:
    """Resize so the shorter side is exactly `image_size`; smaller images are kept (no upscaling)."""
    width, height = image.size
    if min(width, height) <= image_size:
        return image
    if width <= height:
        size = (image_size, max(1, round(height * image_size / width)))
    else:
        size = (max(1, round(width * image_size / height)), image_size)
    # Area averaging (BOX when shrinking), img2dataset's default downscale filter; the JPEG draft
    # already took out any factor of 2 or more, so this is a cheap pass over a small image.
    return image.resize(size, Image.Resampling.BOX)


def _decode_failure(error: Exception) -> RowFailure:
    message = str(error) or type(error).__name__
    if "truncated" in message.lower():
        return RowFailure(statuses.TRUNCATED, f"image data ends early ({message})")
    return RowFailure(statuses.CORRUPT_IMAGE, f"image does not decode ({type(error).__name__}: {message})")
