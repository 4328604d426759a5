"""FFHQ face alignment: detection and landmarks (pipeline/detect.py), then the FFHQ crop (pipeline/crop.py).

    from pipeline.align import align_faces
    faces = align_faces(image, output_size=256, transform_size=1024, policy="largest")

``image`` is an HxWx3 uint8 RGB array. The result is a list (empty when no face qualifies) of
:class:`AlignedFace` records: ``.image`` (output_size x output_size x 3 uint8), ``.landmarks`` (68x2,
source-pixel coordinates), ``.quad`` (4x2, the oriented crop square in source pixels, corners in the
order top-left, bottom-left, bottom-right, top-right of the aligned image), ``.box`` (x0, y0, x1, y1)
and ``.score`` from the detector. pipeline/paste.py undoes the crop.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from models.alignment.ffhq_geometry import ffhq_quad

from .crop import ffhq_crop
from .detect import FaceDetector
from .face_search import POLICIES, choose_faces
from .images import as_rgb_uint8
from .records import Row

__all__ = ["AlignedFace", "FaceAligner", "align_faces", "get_aligner", "face_rows"]


@dataclass
class AlignedFace:
    image: np.ndarray  # (output_size, output_size, 3) uint8
    landmarks: np.ndarray  # (68, 2) float64, source-pixel coordinates
    quad: np.ndarray  # (4, 2) float64, source-pixel coordinates
    box: tuple  # (x0, y0, x1, y1) detector box in source pixels
    score: float  # detector score
    extra: dict = field(default_factory=dict)


class FaceAligner(FaceDetector):
    """FaceDetector plus the FFHQ crop of each face it keeps (``largest``: one, ``all``: every face)."""

    def align(
        self,
        image,
        output_size: int = 256,
        transform_size: int = 1024,
        policy: str = "largest",
        min_face_size: float = 0.0,
        enable_padding: bool = True,
    ) -> list[AlignedFace]:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        img = np.ascontiguousarray(as_rgb_uint8(image))
        dets = choose_faces(self.detect(img, min_face_size=min_face_size, exhaustive=(policy == "all")), policy)
        faces = []
        for box, score in dets:
            lm = self.landmarks(img, box)
            quad, qsize = ffhq_quad(lm)
            crop = ffhq_crop(img, lm, output_size, transform_size, enable_padding, quad=quad.copy(), qsize=qsize)
            faces.append(AlignedFace(image=crop, landmarks=lm, quad=quad, box=tuple(float(v) for v in box), score=score))
        return faces

    __call__ = align


def _face_key(key: str, i: int) -> str:
    # The first face keeps the input's key, so with policy "largest" keys equal the input's keys.
    return key if i == 0 else f"{key}_face{i}"


def face_rows(row: Row, faces: list[AlignedFace]) -> list[tuple[Row, np.ndarray | None]]:
    """An input's output rows from its aligned faces (each with its crop), or its ``no_face`` row; ``row``
    names the input (key, source, meta). Both backends make their rows here."""
    if not faces:
        return [(Row(row.key, row.source, status="no_face", error="no face detected", meta=row.meta), None)]
    return [(Row(_face_key(row.key, i), row.source, face_index=i,
                 quad=np.asarray(f.quad, np.float32).reshape(-1).tolist(),
                 landmarks=np.asarray(f.landmarks, np.float32).reshape(-1).tolist(),
                 score=float(f.score), meta=row.meta), f.image) for i, f in enumerate(faces)]


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def get_aligner(**kwargs) -> FaceAligner:
    """Process-wide FaceAligner for these settings (built on first use, then reused)."""
    key = tuple(sorted(kwargs.items()))
    with _CACHE_LOCK:
        inst = _CACHE.get(key)
        if inst is None:
            inst = _CACHE[key] = FaceAligner(**kwargs)
        return inst


def align_faces(
    image,
    output_size: int = 256,
    transform_size: int = 1024,
    policy: str = "largest",
    *,
    min_face_size: float = 0.0,
    enable_padding: bool = True,
    aligner: FaceAligner | None = None,
) -> list[AlignedFace]:
    """Detect faces in ``image`` (HxWx3 uint8 RGB) and return FFHQ-aligned crops (see module docs).

    policy: "largest" (at most one record, the largest face) or "all" (every face, left to right;
    this also runs the upsampled detection levels, so it is slower).
    min_face_size: faces whose detector box side (source pixels) is smaller are ignored.
    """
    a = aligner if aligner is not None else get_aligner()
    return a.align(image, output_size, transform_size, policy, min_face_size=min_face_size, enable_padding=enable_padding)
