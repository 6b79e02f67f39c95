"""The decoder on awkward inputs: each either decodes to the right RGB or fails with its own clear error."""

from __future__ import annotations

import base64
import time

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from catalogue.size import Size
from gateway.errors import ImageError
from gateway.inputs.decode import decode_base64, decode_image, decode_scaled, open_image
from gateway.inputs.decode_limits import jpeg_marker_count, tiff_block_count
from tests import images

LIMIT = 50_000_000


def test_16bit_png_keeps_its_gradient() -> None:
    rgb = decode_image(images.gradient_16bit(), LIMIT)
    row = rgb[0, :, 0].astype(int)
    assert rgb.dtype == np.uint8
    assert (row[0], row[-1]) == (0, 255)
    assert (np.diff(row) >= 0).all()
    assert len(np.unique(row)) > 200  # not crushed to a few levels
    assert (rgb[..., 0] == rgb[..., 1]).all()


def test_palette_transparency_is_composited_on_white() -> None:
    rgb = decode_image(images.palette_with_transparency(), LIMIT)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 7].tolist() == [0, 0, 255]


def test_animated_gif_gives_its_first_frame() -> None:
    rgb = decode_image(images.animated_gif(), LIMIT)
    assert rgb.shape == (16, 16, 3)
    assert rgb[8, 8].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied() -> None:
    assert decode_image(images.exif_rotated_jpeg(60, 40), LIMIT).shape == (60, 40, 3)


def test_cmyk_becomes_rgb() -> None:
    rgb = decode_image(images.cmyk_jpeg(), LIMIT)
    assert rgb.shape == (20, 30, 3)
    assert rgb[10, 15, 0] > 200
    assert rgb[10, 15, 1:].max() < 60


@pytest.mark.parametrize("size", [(1, 1), (10000, 10), (10, 10000)])
def test_extreme_shapes(size: tuple[int, int]) -> None:
    width, height = size
    rgb = decode_image(images.encode(Image.fromarray(images.photo_like(width, height)), "PNG"), LIMIT)
    assert rgb.shape == (height, width, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (images.png_header_only(30000, 30000), "image has too many pixels"),
        (images.real_bomb(), "image too large: 8000x7000 pixels, at most 50000000 pixels"),
        (images.truncated_jpeg(), "image data is corrupt or truncated"),
        (b"hello, not an image", "not an image, or not one of the supported formats"),
        (images.ppm(), "not an image, or not one of the supported formats"),
        (images.png_header_only(100, 100), "image data is corrupt or truncated"),
    ],
)
def test_bad_images_fail_cleanly(data: bytes, message: str) -> None:
    with pytest.raises(ImageError) as caught:
        decode_image(data, LIMIT)
    assert str(caught.value).startswith(message)


def test_base64_forms() -> None:
    data = images.cmyk_jpeg()
    text = base64.b64encode(data).decode()
    assert decode_base64(text, 10**6) == data
    assert decode_base64(f"data:image/jpeg;base64,{text}", 10**6) == data
    assert decode_base64(f" \nDATA:Image/JPEG;Base64,{text}\n", 10**6) == data  # case and outer spaces, as before
    for bad, message in [
        ("not base64!", "invalid base64"),
        ("data:text/plain;base64,aGk=", "unsupported data URI"),
        ("  Data:image/png,aGk=", "unsupported data URI"),
        ("", "empty image data"),
        (text, "base64 image too large"),
    ]:
        with pytest.raises(ImageError, match=message):
            decode_base64(bad, 100 if bad == text else 10**6)


def test_a_scan_bomb_is_refused_before_decoding() -> None:
    """64 kB of progressive JPEG repeating one scan 3000 times: seconds of CPU if decoded."""
    bomb = images.scan_bomb_jpeg()
    assert len(bomb) < 100_000
    started = time.process_time()
    with pytest.raises(ImageError, match=r"JPEG has too many scans: 300\d, at most 100"):
        decode_image(bomb, LIMIT)
    assert time.process_time() - started < 0.05


def test_marker_count_finds_every_start_of_scan() -> None:
    """Counted as ``bytes.count`` counts them (FF DA cannot overlap itself), on bytes full of FF and DA."""
    rng = np.random.default_rng(7)
    for size in (0, 1, 2, 3, 1000, 65_537):
        data = rng.choice(np.array([0xFF, 0xDA, 0x00, 0xD8], np.uint8), size).tobytes()
        assert jpeg_marker_count(data, 0xDA) == data.count(b"\xff\xda")
    assert jpeg_marker_count(b"\xff\xda\xff\xda\xda\xff", 0xDA) == 2


def test_progressive_jpegs_within_the_scan_limit_decode() -> None:
    progressive = images.encode(Image.fromarray(images.photo_like(64, 48)), "JPEG", progressive=True)
    assert decode_image(progressive, LIMIT).shape == (48, 64, 3)
    assert decode_image(images.scan_bomb_jpeg(side=64, repeats=50), LIMIT).shape == (64, 64, 3)


def test_a_strip_bomb_tiff_is_refused_before_decoding() -> None:
    """A 12 MB TIFF of 4x4 pixels listing 1.5 million strips: seconds and hundreds of MB in Pillow."""
    bomb = images.strip_bomb_tiff()
    assert tiff_block_count(bomb) == 1_500_000
    started = time.process_time()
    with pytest.raises(ImageError, match="TIFF has too many strips or tiles: 1500000, at most 65536"):
        decode_image(bomb, LIMIT)
    assert time.process_time() - started < 0.05


@pytest.mark.parametrize("options", [{}, {"compression": "tiff_lzw"}, {"big_tiff": True}])
def test_ordinary_tiffs_decode_and_their_strips_are_counted(options: dict) -> None:
    tiff = images.encode(Image.fromarray(images.photo_like(40, 30)), "TIFF", **options)
    assert 1 <= tiff_block_count(tiff) <= 30
    assert decode_image(tiff, LIMIT).shape == (30, 40, 3)
    assert decode_image(images.strip_bomb_tiff(strips=4), LIMIT).shape == (4, 4, 3)


def test_the_header_is_read_without_decoding_any_pixel() -> None:
    webp = images.huge_canvas_webp()
    assert len(webp) < 200
    started = time.process_time()
    assert open_image(webp, LIMIT).size == (7000, 7000)
    assert time.process_time() - started < 0.1  # decoding its 49 M pixels takes about 2 s


# --------------------------------------------------------------------------- reduced-scale JPEG decoding

BUCKET = Size(686, 518)  # the 4:3 Depth-Anything bucket


def large_photo(width: int, height: int, orientation: int = 1) -> tuple[np.ndarray, bytes]:
    photo = cv2.resize(data.astronaut(), (width, height), interpolation=cv2.INTER_CUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(np.rot90(photo, 1)) if orientation == 6 else photo  # 6: rotate to display
    return photo, images.encode(Image.fromarray(stored), "JPEG", quality=92, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_large_jpeg_decodes_at_the_smallest_scale_that_covers_the_network_input(orientation: int) -> None:
    photo, jpeg = large_photo(2072, 1554, orientation)
    asked = []

    def at_least(size: Size) -> Size:
        asked.append(size)
        return BUCKET

    reduced, size = decode_scaled(jpeg, LIMIT, at_least)
    full, full_size = decode_scaled(jpeg, LIMIT, None)
    assert asked == [(2072, 1554)]  # the upright size, whichever way the JPEG is stored
    assert size == full_size == (2072, 1554)
    assert full.shape == (1554, 2072, 3)
    assert reduced.shape == (777, 1036, 3)  # 1/2: 1/4 would be 518x389, under the bucket's 686x518
    assert np.abs(cv2.resize(reduced, (2072, 1554)).astype(float) - photo).mean() < 3  # the same picture, upright


def test_the_reduced_decode_changes_the_network_input_less_than_the_resize_loses() -> None:
    """What the DCT-scaled decode changes in the network input, against what resizing to it discards."""
    for width, height in [(2072, 1554), (4032, 3024)]:
        _photo, jpeg = large_photo(width, height)
        full, _ = decode_scaled(jpeg, LIMIT, None)
        reduced, size = decode_scaled(jpeg, LIMIT, lambda size: BUCKET)
        from_full = cv2.resize(full, BUCKET, interpolation=cv2.INTER_AREA).astype(float)
        from_reduced = cv2.resize(reduced, BUCKET, interpolation=cv2.INTER_AREA).astype(float)
        change = np.abs(from_reduced - from_full).mean()
        resize_loss = np.abs(cv2.resize(from_full, size, interpolation=cv2.INTER_LINEAR) - full).mean()
        assert reduced.shape[1] < width / 1.9
        assert change < resize_loss / 2
        assert change < 1.0  # levels of 255


def test_only_jpegs_are_decoded_at_a_reduced_scale() -> None:
    png = images.encode(Image.fromarray(images.photo_like(2000, 1500)), "PNG")
    pixels, size = decode_scaled(png, LIMIT, lambda size: BUCKET)
    assert pixels.shape == (1500, 2000, 3)
    assert size == (2000, 1500)
    small, _ = decode_scaled(large_photo(600, 450)[1], LIMIT, lambda size: BUCKET)  # smaller than the bucket
    assert small.shape == (450, 600, 3)
