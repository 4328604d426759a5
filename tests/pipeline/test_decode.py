"""decode_image: every kind of bad bytes gives its DecodeError status; odd image modes become 8-bit RGB."""
from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers.paths import DATA_DIR
from pipeline.decode import DecodeError, decode_image
from pipeline.images import resize_square



def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


@pytest.fixture(scope="module")
def photo():
    return Image.open(os.path.join(DATA_DIR, "astronaut.jpg")).convert("RGB").resize((128, 96))


def status_of(data, **kw):
    with pytest.raises(DecodeError) as e:
        decode_image(data, **kw)
    assert e.value.message and e.value.status in str(e.value)
    return e.value.status


def test_good_jpeg_and_png(photo):
    ref = np.asarray(photo)
    png = decode_image(encode(photo, "PNG"))
    assert png.dtype == np.uint8 and png.shape == (96, 128, 3)
    np.testing.assert_array_equal(png, ref)
    jpg = decode_image(encode(photo, "JPEG", quality=95))
    assert jpg.shape == (96, 128, 3) and np.abs(jpg.astype(int) - ref).mean() < 4


def test_bad_bytes(photo):
    assert status_of(b"") == "empty_file"
    rng = np.random.default_rng(0)
    assert status_of(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()) == "decode_error"
    assert status_of(b"\x00" * 1000) == "decode_error"
    assert status_of(b"<html>not an image</html>") == "decode_error"
    jpg = encode(photo, "JPEG")
    assert status_of(jpg[: len(jpg) // 2]) == "decode_error"
    assert status_of(jpg[:20]) == "decode_error"
    png = encode(photo, "PNG")
    assert status_of(png[: len(png) // 2]) == "decode_error"
    assert status_of(png[:40]) == "decode_error"
    # corrupt PNG data (bytes flipped inside the IDAT stream)
    bad = bytearray(png)
    i = bad.index(b"IDAT") + 40
    bad[i : i + 50] = bytes(50)
    assert status_of(bytes(bad)) == "decode_error"


def _png_header_only(width, height):
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


def test_decompression_bomb():
    # Header claims 100000 x 100000 pixels: refused from the header, nothing decoded.
    assert status_of(_png_header_only(100_000, 100_000)) == "decompression_bomb"
    # Pillow's own limit is kept even when the caller allows more.
    n = int(Image.MAX_IMAGE_PIXELS ** 0.5) + 10
    assert status_of(_png_header_only(n, n), max_pixels=10 * n * n) == "decompression_bomb"
    # A real, blank (tiny compressed) image over a caller's low limit.
    blank = encode(Image.new("RGB", (2000, 1500)), "PNG")
    assert len(blank) < 50_000
    assert status_of(blank, max_pixels=1_000_000) == "decompression_bomb"
    assert decode_image(blank, max_pixels=3_000_000).shape == (1500, 2000, 3)


def test_cmyk_jpeg(photo):
    cmyk = photo.convert("CMYK")
    out = decode_image(encode(cmyk, "JPEG", quality=95))
    assert out.shape == (96, 128, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - np.asarray(photo)).mean() < 8


def test_16bit_png():
    ramp = (np.arange(64 * 32).reshape(32, 64) * 31).astype(np.uint16)
    im = Image.fromarray(ramp)
    assert im.mode.startswith("I;16")
    out = decode_image(encode(im, "PNG"))
    assert out.shape == (32, 64, 3) and out.dtype == np.uint8
    exp = np.clip(np.rint(ramp / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], exp)
    np.testing.assert_array_equal(out[:, :, 1], out[:, :, 2])
    assert out.max() > 200  # not clipped to the low byte


def test_gray_palette_alpha_modes(photo):
    ref = np.asarray(photo).astype(int)
    gray = decode_image(encode(photo.convert("L"), "PNG"))
    assert gray.shape == (96, 128, 3) and (gray[:, :, 0] == gray[:, :, 2]).all()
    pal = decode_image(encode(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"))
    assert pal.shape == (96, 128, 3) and np.abs(pal.astype(int) - ref).mean() < 12
    one = decode_image(encode(photo.convert("1"), "PNG"))
    assert set(np.unique(one)) <= {0, 255}
    # Alpha: composited over white. Left half opaque, right half fully transparent.
    rgba = photo.convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:, 64:, 3] = 0
    out = decode_image(encode(Image.fromarray(a, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out[:, :64], ref[:, :64])
    assert (out[:, 64:] == 255).all()
    la = Image.fromarray(np.stack([np.asarray(photo.convert("L")), np.full((96, 128), 255, np.uint8)], -1), "LA")
    out = decode_image(encode(la, "PNG"))
    np.testing.assert_array_equal(out[:, :, 1], np.asarray(photo.convert("L")))
    # Palette with a transparent index.
    p = Image.new("P", (10, 10), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (0, 0, 5, 10))
    out = decode_image(encode(p, "PNG", transparency=0))
    assert (out[:, :5] == [0, 0, 255]).all() and (out[:, 5:] == 255).all()


def test_exif_rotated_jpeg():
    # 40 wide x 20 tall stored; left half red. Orientation 6 (rotate 90 CW to display) -> 20 x 40.
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = [255, 0, 0]
    a[:, 20:] = [0, 0, 255]
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(Image.fromarray(a), "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)
    # Rotated clockwise: the stored left (red) half ends up on top.
    assert out[:15, :, 0].mean() > 200 and out[25:, :, 2].mean() > 200
    plain = decode_image(encode(Image.fromarray(a), "JPEG", quality=95))
    assert plain.shape == (20, 40, 3)


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(b.getvalue())
    assert out.shape == (8, 8, 3) and out[0, 0, 0] > 200


def test_unsupported_mode():
    f = Image.fromarray(np.ones((5, 5), np.float32))
    assert status_of(encode(f, "TIFF")) == "unsupported_image"


def test_decode_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(DecodeError("decode_error", "x")))
    assert e.status == "decode_error" and e.message == "x"
    with pytest.raises(ValueError):
        DecodeError("nope", "x")


def test_resize_square(photo):
    a = np.asarray(photo)
    out = resize_square(a, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert abs(out.astype(float).mean() - a.mean()) < 3
    assert resize_square(a[:, :, 0], 32).shape == (32, 32, 3)
