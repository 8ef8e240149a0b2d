"""Generated test images: odd but valid ones (to store as RGB JPEG) and bad ones (to reject)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from testkit import image_bytes, make_image


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def cmyk_jpeg() -> bytes:
    return encode(make_image(80, 60, seed=11).convert("CMYK"), "JPEG", quality=95)


def grayscale_png() -> bytes:
    return encode(make_image(80, 60, seed=12).convert("L"), "PNG")


def palette_png() -> bytes:
    return encode(make_image(80, 60, seed=13).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")


def rgba_png_half_transparent() -> bytes:
    """Left half fully transparent (must come out white), right half opaque red."""
    pixels = np.zeros((60, 80, 4), dtype=np.uint8)
    pixels[:, 40:] = (255, 0, 0, 255)
    return encode(Image.fromarray(pixels, "RGBA"), "PNG")


def palette_with_transparency_gif() -> bytes:
    """Palette index 0 is transparent (left half), index 1 is blue (right half)."""
    image = Image.new("P", (80, 60), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (3 * 254))
    image.paste(1, (40, 0, 80, 60))
    return encode(image, "GIF", transparency=0)


def la_png() -> bytes:
    pixels = np.zeros((60, 80, 2), dtype=np.uint8)
    pixels[:, 40:] = (0, 255)  # right half opaque black, left half transparent
    return encode(Image.fromarray(pixels, "LA"), "PNG")


def sixteen_bit_png() -> bytes:
    """Grayscale 16-bit ramp: left column 0, right column 65535."""
    ramp = np.linspace(0, 65535, 80).round().astype(np.uint16)
    return encode(Image.fromarray(np.tile(ramp, (60, 1))), "PNG")


def animated_gif() -> bytes:
    """Two frames: pure green then pure red; the stored image must be the green first frame."""
    first, second = Image.new("RGB", (64, 48), (0, 255, 0)), Image.new("RGB", (64, 48), (255, 0, 0))
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """Stored 96x64 with EXIF orientation 6: displayed (and stored by us) as 64x96."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(make_image(96, 64, seed=14), "JPEG", quality=95, exif=exif.tobytes())


def big_jpeg(width: int = 1200, height: int = 900, seed: int = 15) -> bytes:
    return image_bytes(width, height, seed=seed)


def webp() -> bytes:
    return encode(make_image(80, 60, seed=16), "WEBP")


def bmp() -> bytes:
    return encode(make_image(80, 60, seed=17), "BMP")


def truncated_jpeg() -> bytes:
    data = image_bytes(200, 150, seed=18)
    return data[: len(data) // 2]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds almost no data: decoding it would be the bomb."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


HTML_BODY = b"<!DOCTYPE html><html><body>Not found, but with status 200</body></html>"
EPS_BODY = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
