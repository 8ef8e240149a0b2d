"""pipeline.images: odd but valid images become RGB JPEGs; bad bytes become a status and a reason."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

import odd_images
from testkit import image_bytes
from pipeline import statuses
from pipeline.images import ImagePolicy, ImageProcessor, source_sha256
from pipeline.statuses import RowFailure


def stored_pixels(data: bytes, **policy) -> tuple[np.ndarray, object]:
    result = ImageProcessor(ImagePolicy(**policy))(data)
    with Image.open(io.BytesIO(result.jpeg)) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (result.width, result.height)
        return np.asarray(image).astype(int), result


@pytest.mark.parametrize("make", [
    odd_images.cmyk_jpeg, odd_images.grayscale_png, odd_images.palette_png, odd_images.sixteen_bit_png,
    odd_images.webp, odd_images.bmp,
])
def test_odd_modes_become_rgb_jpeg_at_original_size(make):
    pixels, result = stored_pixels(make())
    assert pixels.shape == (60, 80, 3)
    assert (result.original_width, result.original_height) == (80, 60)


def test_transparency_is_composited_on_white():
    pixels, _ = stored_pixels(odd_images.rgba_png_half_transparent())
    assert (pixels[:, :35] >= 250).all()                          # transparent -> white
    assert (abs(pixels[:, 45:] - [255, 0, 0]) <= 8).all()          # opaque red stays red
    pixels, _ = stored_pixels(odd_images.palette_with_transparency_gif())
    assert (pixels[:, :35] >= 250).all()
    assert (abs(pixels[:, 45:] - [0, 0, 255]) <= 8).all()
    pixels, _ = stored_pixels(odd_images.la_png())
    assert (pixels[:, :35] >= 250).all() and (pixels[:, 45:] <= 8).all()


def test_sixteen_bit_is_scaled_not_clipped():
    pixels, _ = stored_pixels(odd_images.sixteen_bit_png())
    assert pixels[:, 0].max() <= 3 and pixels[:, -1].min() >= 252
    assert 110 <= pixels[30, 40, 0] <= 145  # mid-ramp is mid-gray, not saturated white


def test_animated_gif_keeps_first_frame():
    pixels, _ = stored_pixels(odd_images.animated_gif())
    assert (abs(pixels - [0, 255, 0]) <= 8).all()


def test_exif_rotation_is_applied():
    _, result = stored_pixels(odd_images.exif_rotated_jpeg(6))
    assert (result.width, result.height) == (64, 96)
    assert (result.original_width, result.original_height) == (64, 96)


def test_resize_shorter_side_and_never_upscale():
    _, big = stored_pixels(odd_images.big_jpeg(1200, 900), image_size=256)
    assert (big.width, big.height) == (341, 256)
    assert (big.original_width, big.original_height) == (1200, 900)
    _, tall = stored_pixels(image_bytes(300, 1000, seed=3, fmt="PNG"), image_size=128)
    assert (tall.width, tall.height) == (128, 427)
    _, small = stored_pixels(image_bytes(100, 50, seed=4), image_size=256)
    assert (small.width, small.height) == (100, 50)


def test_draft_decoding_matches_full_decode_closely():
    data = odd_images.big_jpeg(2048, 1536, seed=21)
    fast, _ = stored_pixels(data, image_size=256)
    with Image.open(io.BytesIO(data)) as full:
        reference = np.asarray(full.convert("RGB").resize((341, 256), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(fast - reference).mean() < 3.0


def test_same_bytes_same_output():
    data = odd_images.big_jpeg(640, 480, seed=5)
    first, second = ImageProcessor(ImagePolicy())(data), ImageProcessor(ImagePolicy())(data)
    assert first.jpeg == second.jpeg
    assert source_sha256(data) == source_sha256(bytes(data))


@pytest.mark.parametrize("data,status,words", [
    (b"", statuses.EMPTY, "0 bytes"),
    (odd_images.HTML_BODY, statuses.NOT_AN_IMAGE, "not an image"),
    (odd_images.EPS_BODY, statuses.NOT_AN_IMAGE, "not an image"),  # never handed to Ghostscript
    (odd_images.truncated_jpeg(), statuses.TRUNCATED, "truncated"),
    (odd_images.png_header_only(30000, 30000), statuses.DECOMPRESSION_BOMB, "pixels"),
])
def test_bad_bytes_are_named(data, status, words):
    with pytest.raises(RowFailure) as caught:
        ImageProcessor(ImagePolicy())(data)
    assert caught.value.status == status
    assert words in caught.value.message.lower()


def test_pixel_cap_is_checked_before_decoding():
    # 5000 x 4000 (20 MP, under Pillow's own limit) against a 1 MP cap: refused from the header
    bomb = odd_images.png_header_only(5000, 4000)
    started = time.perf_counter()
    with pytest.raises(RowFailure) as caught:
        ImageProcessor(ImagePolicy(max_pixels=1_000_000))(bomb)
    assert caught.value.status == statuses.DECOMPRESSION_BOMB
    assert "5000x4000" in caught.value.message and "before decoding" in caught.value.message
    assert time.perf_counter() - started < 0.5


def test_min_size():
    with pytest.raises(RowFailure) as caught:
        ImageProcessor(ImagePolicy(min_image_size=32))(image_bytes(40, 20))
    assert caught.value.status == statuses.TOO_SMALL and "40x20" in caught.value.message
    assert ImageProcessor(ImagePolicy(min_image_size=20))(image_bytes(40, 20)).width == 40
