"""Stage 8, paste: an aligned (possibly edited) face put back into its original photo along the row's quad."""
from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from .decode import decode_image
from .images import as_rgb_uint8, encode_image

__all__ = ["paste_back", "PasteBack"]

log = logging.getLogger("e2style.paste")


def _quad_affine(quad: np.ndarray, n: int):
    """Affine map from aligned-image coordinates (Pillow convention, 0..n) to source pixel coordinates."""
    q = np.asarray(quad, dtype=np.float64)
    o = q[0]
    ex = (q[3] - q[0]) / n  # along the aligned image's x axis
    ey = (q[1] - q[0]) / n  # along its y axis
    return o, ex, ey


def paste_back(source_image, aligned_face, quad, feather: float = 0.1) -> np.ndarray:
    """Paste a (possibly edited) aligned face back into ``source_image`` using the record's ``quad``.

    ``aligned_face`` is any square uint8 RGB image (any size); ``feather`` is the width of the soft edge
    of the blend mask as a fraction of the aligned image side (0 gives a hard edge). Returns a new array;
    pixels outside the quad are unchanged.
    """
    src = as_rgb_uint8(source_image)
    face = as_rgb_uint8(aligned_face)
    n = face.shape[0]
    if face.shape[1] != n:
        raise ValueError(f"aligned face must be square, got {face.shape}")
    H, W = src.shape[:2]
    q = np.asarray(quad, dtype=np.float64)
    x0 = max(int(np.floor(q[:, 0].min())) - 1, 0)
    y0 = max(int(np.floor(q[:, 1].min())) - 1, 0)
    x1 = min(int(np.ceil(q[:, 0].max())) + 2, W)
    y1 = min(int(np.ceil(q[:, 1].max())) + 2, H)
    out = src.copy()
    if x1 <= x0 or y1 <= y0:
        return out
    o, ex, ey = _quad_affine(q, n)
    # Source pixel (index coords) p = o + u*ex + v*ey with (u, v) in the aligned image's Pillow coords.
    # Output pixel of the region at Pillow coords (X, Y) has index coords (x0 + X - 0.5, y0 + Y - 0.5).
    M = np.column_stack([ex, ey])
    Minv = np.linalg.inv(M)
    # (u, v) = Minv @ (p - o); p = (X + x0 - 0.5, Y + y0 - 0.5)
    t = Minv @ (np.array([x0 - 0.5, y0 - 0.5]) - o)
    coeffs = (Minv[0, 0], Minv[0, 1], t[0], Minv[1, 0], Minv[1, 1], t[1])
    size = (x1 - x0, y1 - y0)
    warped = Image.fromarray(np.ascontiguousarray(face), "RGB").transform(
        size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR
    )
    # Feathered mask in aligned coordinates: 1 inside, ramping to 0 at the square's edge.
    c = np.arange(n, dtype=np.float32) + 0.5
    d = np.minimum(c, n - c)
    fw = max(float(feather) * n, 1e-6)
    ramp = np.clip(d / fw, 0.0, 1.0) if feather > 0 else (d > 0).astype(np.float32)
    m = np.minimum(ramp[:, None], ramp[None, :]).astype(np.float32)
    mask = Image.fromarray(m, "F").transform(size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    m = np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)[:, :, None]
    region = out[y0:y1, x0:x1].astype(np.float32)
    blended = region + (np.asarray(warped, dtype=np.float32) - region) * m
    out[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


class PasteBack:
    """output.paste_back, for the inversion pipeline and the latents subcommands alike: faces pasted into
    their original photo (``<stem>.paste.<ext>``). The original is decoded with the input's decompression-bomb
    limit and kept while consecutive faces share it (one decoded photo in memory at a time); one that cannot
    be read or decoded gives no pasted image (logged; the caller counts it)."""

    def __init__(self, image_format: str, jpeg_quality: int, max_pixels: int | None):
        self.fmt, self.quality, self.max_pixels = image_format, jpeg_quality, max_pixels
        self._current: tuple[str, np.ndarray | None] | None = None  # (source, its decoded original)

    def original(self, source: str, data: bytes | Exception | None) -> np.ndarray | None:
        """The decoded photo behind ``source`` (``data``: its bytes, or why they could not be read)."""
        if self._current is None or self._current[0] != source:
            img = None
            try:
                if isinstance(data, Exception):
                    raise data
                img = decode_image(data, max_pixels=self.max_pixels)
            except Exception as e:  # noqa: BLE001 - one row's paste, not the shard
                log.warning("paste_back: cannot read the original %s (%s: %s)", source, type(e).__name__, e)
            self._current = (source, img)
        return self._current[1]

    def member(self, stem: str, original: np.ndarray, face: np.ndarray, quad) -> tuple[str, bytes]:
        q = np.asarray(quad, np.float64).reshape(4, 2)
        return (f"{stem}.paste.{self.fmt}", encode_image(paste_back(original, face, q), self.fmt, None, self.quality))
