"""Deterministic variants of the test photographs, for checking dlib ports against dlib itself.

Every variant is rebuilt from ``tests/data`` with Pillow and numpy from a seed, so a failing case is named by
(seed, index) and reproduced exactly. Variant ``i`` depends only on ``(seed, i)``, not on how many variants
were asked for, so a smaller count is a prefix of a larger one.

The geometry is drawn around the face of each source photo (a rough centre and size, in source pixels,
written below from looking at the photos): the face is moved anywhere from well inside the frame to
partly outside it, so that crops with the face at an edge and faces on large canvases both occur. Whether
dlib then finds the face is deliberately left open; the tests compare with dlib, not with these numbers.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from helpers.paths import DATA_DIR


# Source photo -> (face centre x, face centre y, face size) in its own pixels; only steers where the face
# lands in a variant.
FACE_PHOTOS = {
    "astronaut.jpg": (222.0, 126.0, 90.0),
    "grace_hopper.jpg": (268.0, 245.0, 210.0),
}
FACELESS_PHOTO = "china.jpg"

SCALE_RANGE = (0.4, 2.5)
ROTATION_DEG = 35.0
JPEG_QUALITY_RANGE = (30, 95)


@dataclass(frozen=True)
class Variant:
    name: str           # e.g. "v0-0007:grace_hopper.jpg" — seed and index, enough to rebuild it
    image: np.ndarray   # HxWx3 uint8, C-contiguous
    source: str         # file in tests/data it came from, or "flat"/"noise" for synthetic faceless images
    recipe: str         # the transformations, human readable, for failure messages


_photo_cache: dict[str, Image.Image] = {}


def load_photo(file_name: str) -> Image.Image:
    """An RGB test photograph from tests/data (cached; callers must not modify it)."""
    if file_name not in _photo_cache:
        with Image.open(os.path.join(DATA_DIR, file_name)) as im:
            _photo_cache[file_name] = im.convert("RGB")
    return _photo_cache[file_name]


def load_photo_array(file_name: str) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(load_photo(file_name), dtype=np.uint8))


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, stream])


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str]:
    kind = rng.integers(3)
    if kind == 0:
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        return Image.new("RGB", (width, height), colour), f"flat{colour}"
    if kind == 1:
        noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        return Image.fromarray(noise), "noise"
    # A real faceless texture, tiled and shifted, so canvases are not trivially empty around the face.
    china = load_photo(FACELESS_PHOTO)
    tiled = Image.new("RGB", (width, height))
    dx, dy = (int(v) for v in rng.integers(0, 200, 2))
    for y in range(-dy, height, china.height):
        for x in range(-dx, width, china.width):
            tiled.paste(china, (x, y))
    return tiled, "china-tiles"


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _finish(image: Image.Image, rng: np.random.Generator, steps: list[str]) -> np.ndarray:
    if rng.random() < 0.8:
        quality = int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1))
        image = _jpeg(image, quality)
        steps.append(f"jpeg{quality}")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def face_variant(index: int, seed: int = 0, max_side: int = 640, min_side: int = 96) -> Variant:
    """Variant ``index`` of a face photo: mirror, rotation, scale, crop or canvas, JPEG, in that order.

    The output's sides are within [min_side, max_side]; at large scales the output is a crop.
    """
    rng = _rng(seed, index, 0)
    sources = sorted(FACE_PHOTOS)
    source = sources[int(rng.integers(len(sources)))]
    image = load_photo(source)
    cx, cy, face = FACE_PHOTOS[source]
    steps: list[str] = []

    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        cx = image.width - 1 - cx
        steps.append("mirror")

    angle = float(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
    if abs(angle) > 1.0:
        # Rotate about the face centre so that it stays where it was; corners fill with a grey level.
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, center=(cx, cy), fillcolor=fill)
        steps.append(f"rot{angle:+.1f}")

    scale = float(np.exp(rng.uniform(np.log(SCALE_RANGE[0]), np.log(SCALE_RANGE[1]))))
    resample = [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS][
        int(rng.integers(3))]
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(new_size, resample=resample)
    cx, cy, face = cx * scale, cy * scale, face * scale
    steps.append(f"scale{scale:.2f}")

    width = int(rng.integers(min_side, max_side + 1))
    height = int(rng.integers(min_side, max_side + 1))
    # Where the face centre lands in the output, as a fraction of its size; outside [0, 1] cuts the face.
    fx, fy = rng.uniform(-0.05, 1.05, 2)
    left = int(round(fx * width - cx))
    top = int(round(fy * height - cy))
    if width > image.width or height > image.height or rng.random() < 0.3:
        canvas, background = _background(rng, width, height)
        canvas.paste(image, (left, top))
        image = canvas
        steps.append(f"canvas{width}x{height}@{left},{top}:{background}")
    else:
        # A crop: keep the window inside the scaled photo, as near the drawn position as it allows.
        left = min(max(-left, 0), image.width - width)
        top = min(max(-top, 0), image.height - height)
        image = image.crop((left, top, left + width, top + height))
        steps.append(f"crop{width}x{height}@{left},{top}")

    array = _finish(image, rng, steps)
    return Variant(f"v{seed}-{index:04d}:{source}", array, source, " ".join(steps))


def faceless_variant(index: int, seed: int = 0, max_side: int = 640, min_side: int = 96) -> Variant:
    """Variant ``index`` of an image without a face: crops and rescales of china.jpg, flat, noise."""
    rng = _rng(seed, index, 1)
    width = int(rng.integers(min_side, max_side + 1))
    height = int(rng.integers(min_side, max_side + 1))
    kind = index % 4
    steps: list[str] = []
    if kind in (0, 1):
        china = load_photo(FACELESS_PHOTO)
        if kind == 1 and rng.random() < 0.5:
            china = china.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            steps.append("mirror")
        scale = max(width / china.width, height / china.height) * float(rng.uniform(1.0, 2.0))
        china = china.resize((round(china.width * scale), round(china.height * scale)),
                             resample=Image.Resampling.BICUBIC)
        left = int(rng.integers(0, china.width - width + 1))
        top = int(rng.integers(0, china.height - height + 1))
        image = china.crop((left, top, left + width, top + height))
        steps.append(f"scale{scale:.2f} crop{width}x{height}@{left},{top}")
        source = FACELESS_PHOTO
    elif kind == 2:
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        image = Image.new("RGB", (width, height), colour)
        steps.append(f"flat{colour} {width}x{height}")
        source = "flat"
    else:
        # Smoothed noise at a random grain: gradients everywhere, the hardest faceless case for HOG.
        grain = int(rng.integers(1, 9))
        small = rng.integers(0, 256, (max(1, height // grain), max(1, width // grain), 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), resample=Image.Resampling.BILINEAR)
        steps.append(f"noise/{grain} {width}x{height}")
        source = "noise"
    array = _finish(image, rng, steps)
    return Variant(f"n{seed}-{index:04d}:{source}", array, source, " ".join(steps))


def face_variants(count: int, seed: int = 0, max_side: int = 640, min_side: int = 96) -> list[Variant]:
    return [face_variant(i, seed, max_side, min_side) for i in range(count)]


def faceless_variants(count: int, seed: int = 0, max_side: int = 640, min_side: int = 96) -> list[Variant]:
    return [faceless_variant(i, seed, max_side, min_side) for i in range(count)]


def original_photos() -> list[Variant]:
    """The three test photographs as they are (two with faces, china.jpg without)."""
    return [Variant(f"orig:{name}", load_photo_array(name), name, "original")
            for name in (*sorted(FACE_PHOTOS), FACELESS_PHOTO)]
