"""Stage 2, decode: image bytes -> 8-bit RGB, shared by the pipeline, the paste-back and training.

Contract (the pipeline codes against it):

    img = decode_image(data, max_pixels=None)   # HxWx3 uint8 RGB numpy array
    # raises DecodeError (and only DecodeError) for bad bytes; DecodeError.status is one of
    # "empty_file", "decode_error", "decompression_bomb", "unsupported_image".

What decode_image does:
  * EXIF orientation is applied (a broken EXIF block is ignored, the pixels are kept);
  * grayscale, 1-bit, palette, CMYK, YCbCr/LAB/HSV and 16-bit images become 8-bit RGB;
    images with alpha (RGBA, LA, PA, palette with transparency) are composited over white;
  * multi-frame files (GIF, APNG, TIFF) give their first frame;
  * Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) is kept: the effective limit is
    ``min(max_pixels, Image.MAX_IMAGE_PIXELS)``, checked from the header before any pixel is decoded,
    and reported as status "decompression_bomb";
  * truncated files and bytes that are not an image raise DecodeError("decode_error"); Pillow's
    global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is neither read for leniency nor changed.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DecodeError", "decode_image", "STATUSES"]

STATUSES = ("empty_file", "decode_error", "decompression_bomb", "unsupported_image")

# Modes Pillow can turn into RGB with ``convert`` (after the special cases below).
_PLAIN_MODES = {"1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}
_INT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class DecodeError(Exception):
    """Bad image bytes. ``status`` is a short snake_case row status, ``message`` says what is wrong."""

    def __init__(self, status: str, message: str):
        if status not in STATUSES:
            raise ValueError(f"unknown decode status {status!r}")
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message

    def __reduce__(self):  # picklable across Ray workers
        return (DecodeError, (self.status, self.message))


def _pixel_limit(max_pixels: int | None) -> int | None:
    limits = [v for v in (max_pixels, Image.MAX_IMAGE_PIXELS) if v is not None]
    return int(min(limits)) if limits else None


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in _INT16_MODES or mode == "I":
        # 16-bit grayscale (PNG/TIFF). Pillow keeps 16-bit PNG gray as I;16 or I with values 0..65535.
        a = np.asarray(img).astype(np.float64)  # astype also fixes big-endian I;16B
        if mode == "I" and a.size and a.max() <= 255 and a.min() >= 0:
            g = a  # 'I' images holding 8-bit values (e.g. some TIFFs)
        else:
            g = a / 257.0
        g = np.clip(np.rint(g), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba).convert("RGB")
    elif mode in _PLAIN_MODES:
        if mode != "RGB":  # (convert would copy an RGB image)
            img = img.convert("RGB")
    else:
        raise DecodeError("unsupported_image", f"pixel mode {mode!r} cannot be converted to 8-bit RGB")
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise DecodeError("unsupported_image", f"conversion gave shape {a.shape}")
    return np.ascontiguousarray(a)


def decode_image(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 RGB array; raise DecodeError for anything bad."""
    if data is None or len(data) == 0:
        raise DecodeError("empty_file", "zero bytes")
    limit = _pixel_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice its limit; we enforce the limit ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(bytes(data)))
            except Image.DecompressionBombError as e:
                raise DecodeError("decompression_bomb", str(e)) from None
            except Image.UnidentifiedImageError:
                raise DecodeError(
                    "decode_error", f"not a recognised image ({len(data)} bytes, starts {bytes(data[:8])!r})"
                ) from None
            w, h = img.size
            if w <= 0 or h <= 0:
                raise DecodeError("unsupported_image", f"image has size {w}x{h}")
            if limit is not None and w * h > limit:
                raise DecodeError(
                    "decompression_bomb", f"{w}x{h} = {w * h} pixels exceeds the limit of {limit} pixels"
                )
            fmt = img.format
            try:
                img.seek(0)
                img.load()
            except DecodeError:
                raise
            except Image.DecompressionBombError as e:
                raise DecodeError("decompression_bomb", str(e)) from None
            except Exception as e:  # truncated data, corrupt streams, broken headers
                raise DecodeError("decode_error", f"{fmt or 'image'} data cannot be decoded: {e}") from None
            try:
                # In place: a copy of a 2 MP photo costs a fifth of its decoding.
                ImageOps.exif_transpose(img, in_place=True)
            except Exception:
                pass  # broken EXIF: keep the pixels as stored
            return _to_rgb(img)
    except DecodeError:
        raise
    except MemoryError as e:
        raise DecodeError("decompression_bomb", f"out of memory while decoding: {e}") from None
    except Exception as e:  # never let another exception type escape for bad bytes
        raise DecodeError("decode_error", f"{type(e).__name__}: {e}") from None
