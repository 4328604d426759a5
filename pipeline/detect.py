"""Stage 3, detect: face detection and 68-point landmarks with dlib.

The HOG detector runs on dlib's own image pyramid from a level of at most ``detect_max_side`` px, with a
local search of finer levels per face, so its boxes (and so the landmarks) equal full-resolution
detection's; dlib's upsampling is used only when no qualifying face was found and a face too small to be
seen at the current scale could still be at least ``min_face_size``. Landmarks are predicted on the
full-resolution photo, again on an upright copy for rolled faces.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from models.alignment.ffhq_geometry import eye_roll_degrees, upright_geometry

from .images import as_rgb_uint8
from .model_files import find_landmark_model

__all__ = ["FaceDetector", "box_iou", "pick_largest", "faces_that_count", "upsample_runs", "HOG_MIN_FACE", "HOG_WINDOW",
           "UPSAMPLE_MAX_SIDE"]

# dlib's frontal HOG detector scans an 80x80 window: smaller faces are not found at a given scale.
HOG_MIN_FACE = 80
# Side of a detection rectangle (dlib's right - left + 1) at the pyramid level where the detector found it.
HOG_WINDOW = 73
# Longest photo side on which the upsampled search runs (align.upsample_max_side's default). The upsampled run
# only finds faces under HOG_MIN_FACE px; on a larger photo such a face covers under a tenth of its longer side
# (a face in the background, not the subject), and the run costs 4-5x the whole detection of the photo.
UPSAMPLE_MAX_SIDE = 800


def _rect_box(r) -> tuple:
    """Inclusive (left, top, right, bottom) -> (x0, y0, x1, y1) floats, x1/y1 exclusive."""
    return (float(r[0]), float(r[1]), float(r[2] + 1), float(r[3] + 1))


def _dlib_rect_tuple(r) -> tuple[int, int, int, int]:
    return (r.left(), r.top(), r.right(), r.bottom())


def faces_that_count(dets):
    """The one rule for what counts as a face, for both policies and both backends: detections scoring under
    half the photo's best one are dropped. A face-like object (a badge, a pattern: the astronaut's mission
    patch scores 0.27 against 1.20 for her face) scores far below a clear face; two real faces of one photo
    score alike. ``dets``: ((x0, y0, x1, y1), score) pairs; their order is kept."""
    if not dets:
        return []
    best = max(d[1] for d in dets)
    return [d for d in dets if d[1] >= 0.5 * best]


def upsample_runs(height: int, width: int, max_upsample: int, min_face_size: float,
                  upsample_max_side: int | None) -> list[int]:
    """The upsampled detection runs (times upsampled) made on a photo when nothing qualifying was found at its
    own resolution; the same rule on both backends. Run u finds faces down to HOG_MIN_FACE / 2^u px, so it is
    made only while smaller faces could still reach ``min_face_size``, and only on photos whose longer side
    is at most ``upsample_max_side`` (None: any), which bounds the cost of a photo without a face."""
    if upsample_max_side is not None and max(height, width) > upsample_max_side:
        return []
    return [u for u in range(1, max_upsample + 1) if min_face_size < HOG_MIN_FACE / 2 ** (u - 1)]


# dlib's pyramid_down<6>: each level is 5/6 of the previous one, (5 h) // 6 by (5 w) // 6; points map down a
# level as (p - 0.3) * 5/6 and up as p * 6/5 + 0.3, in double.
_PYR_DOWN, _PYR_UP = (6 - 1.0) / 6, 6 / (6 - 1.0)


def rect_down(box, levels: int) -> tuple[float, float, float, float]:
    """pyramid_down<6>::rect_down(drectangle, levels): (left, top, right, bottom) in double."""
    pts = [float(v) for v in box]
    for _ in range(levels):
        pts = [(v - 0.3) * _PYR_DOWN for v in pts]
    return tuple(pts)


def rect_up(rect, levels: int) -> tuple[int, int, int, int]:
    """pyramid_down<6>::rect_up(rectangle, levels): each corner mapped up in double, then rounded to dlib's
    integer point (floor(x + 0.5))."""
    pts = [float(v) for v in rect]
    for _ in range(levels):
        pts = [v * _PYR_UP + 0.3 for v in pts]
    return tuple(int(math.floor(v + 0.5)) for v in pts)


def coarse_level(height: int, width: int, detect_max_side: int | None) -> int:
    """The pyramid level detection starts on: the fewest pyramid_down<6> steps that bring the longer side to
    ``detect_max_side`` or below (None: 0, the photo itself), stopping while the shorter side is over
    2 * HOG_MIN_FACE."""
    k = 0
    while detect_max_side and max(height, width) > detect_max_side and min(height, width) > 2 * HOG_MIN_FACE:
        height, width, k = (5 * height) // 6, (5 * width) // 6, k + 1
    return k


def detection_runs(k: int, height: int, width: int, max_upsample: int, min_face_size: float,
                   upsample_max_side: int | None) -> list[tuple[int, int]]:
    """(pyramid level, times upsampled) of each detection run a photo may need, in order: level k, then
    every 4th finer level down to the photo itself, then its upsampled runs (``upsample_runs``). The runs
    after the first are made only while ``more_runs`` says so."""
    return ([(j, 0) for j in range(k, 0, -4)] + [(0, 0)]
            + [(0, u) for u in upsample_runs(height, width, max_upsample, min_face_size, upsample_max_side)])


def more_runs(found: list, exhaustive: bool, min_face_size: float, smallest_seen: float) -> bool:
    """Whether a photo's next detection run is made: not once a face was found (except with ``exhaustive``),
    nor when the faces the next run could add, smaller than ``smallest_seen`` (the previous run's smallest
    visible face, source px), would be under ``min_face_size``."""
    return (exhaustive or not found) and min_face_size < smallest_seen


def smallest_visible(width: int, level_width: int, up: int) -> float:
    """The smallest face (source px) a run on a level ``level_width`` px wide, upsampled ``up`` times, sees."""
    return HOG_MIN_FACE * width / level_width / 2 ** up


def level_rect_to_source(rect, k: int) -> tuple[int, int, int, int]:
    """Source-pixel rectangle (dlib's, inclusive) of a detection ``rect`` made on pyramid level ``k``.

    dlib maps a detection found at its own pyramid level j (window of HOG_WINDOW px there) with
    ``rect_up(R, j)``, rounding once. A run on level k returned ``rect_up(R, j - k)``; R is recovered exactly
    (the map has slope 1.2^(j-k) >= 1, so rounding is undone) and mapped up j levels at once, which is what
    detection on the full-resolution photo reports for the same window.
    """
    rect = tuple(int(v) for v in rect)
    if k == 0:
        return rect
    w = max(rect[2] - rect[0] + 1, 1)
    j = max(int(round(math.log(w / HOG_WINDOW) / math.log(1.2))), 0)
    for jj in (j, j - 1, j + 1):
        if jj < 0:
            continue
        r = tuple(int(round(v)) for v in rect_down(rect, jj))
        if rect_up(r, jj) == rect:
            return rect_up(r, jj + k)
    return rect_up(rect, k)


def finer_window(rect, j: int, level_h: int, level_w: int) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), x1/y1 exclusive, of the crop of pyramid level ``j`` (``level_h`` x ``level_w``) in which
    a face at source rect ``rect`` is searched one level finer than where it was found: around the face, cut
    at multiples of 8 px (the HOG cell size) so the cells, and so the scores, are those of the whole level.
    None when the crop is too small for a detector window."""
    left, top, right, bottom = rect_down(rect, j)
    m = 0.35 * (right - left) + 12
    x0, y0 = max(int(left - m) // 8 * 8, 0), max(int(top - m) // 8 * 8, 0)
    x1, y1 = min(int(right + m) + 1, level_w), min(int(bottom + m) + 1, level_h)
    if x1 - x0 < HOG_MIN_FACE or y1 - y0 < HOG_MIN_FACE:
        return None
    return x0, y0, x1, y1


def better_finer_detection(rect, score: float, dets, x0: int, y0: int, j: int) -> tuple[tuple, float]:
    """The face's (rect, score) after the search in finer_window's crop of level ``j`` at (x0, y0): a window of
    the crop's own level (not of its coarser levels, which are not the photo's) scoring higher and overlapping
    the face replaces it. ``dets``: the crop's detections, ((left, top, right, bottom) inclusive, score)."""
    box = _rect_box(rect)
    for (left, top, right, bottom), sc in dets:
        if right - left + 1 > HOG_WINDOW + 3 or sc <= score:
            continue
        cand = rect_up((left + x0, top + y0, right + x0, bottom + y0), j)
        if box_iou(_rect_box(cand), box) > 0.3:
            rect, score = cand, float(sc)
    return rect, score


def pick_largest(dets):
    """The ``largest`` policy's choice among detect()'s ((x0, y0, x1, y1), score) pairs.

    Only detections that count as faces (``faces_that_count``) are candidates: a face-like object may have a
    larger box than the face. dlib's boxes come in the sizes of its
    pyramid levels (a factor 1.2 apart; boxes found on one level differ by a pixel of rounding at most), so
    boxes within 10% of the largest side count as the same size and the best-scoring one among them wins;
    then position, for determinism."""
    side = lambda d: min(d[0][2] - d[0][0], d[0][3] - d[0][1])  # noqa: E731
    dets = faces_that_count(dets)
    top = max(side(d) for d in dets)
    tied = [d for d in dets if side(d) >= top / 1.1]
    return max(tied, key=lambda d: (d[1], side(d), -d[0][0], -d[0][1]))


def box_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class FaceDetector:
    """dlib HOG detector + 68-point predictor, built once per process (loading the predictor takes ~2 s).

    detect_max_side: the detector runs on a copy whose longer side is at most this (None: full size).
    max_upsample: most dlib pyramid upsamplings tried when nothing qualifying was found.
    upsample_max_side: upsampling only on photos whose longer side is at most this (None: any; see
        ``upsample_runs``).
    min_score: detector score threshold (dlib's own default is 0).
    upright_above: eye-line tilt (degrees) above which landmarks are predicted again on an upright copy of
        the face region (see ``landmarks``); None: never.
    """

    def __init__(
        self,
        predictor_path: str | None = None,
        detect_max_side: int | None = 384,
        max_upsample: int = 1,
        min_score: float = 0.0,
        upright_above: float | None = 10.0,
        upsample_max_side: int | None = UPSAMPLE_MAX_SIDE,
    ):
        import dlib

        self.predictor_path = find_landmark_model(predictor_path)
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(self.predictor_path)
        self.detect_max_side = detect_max_side
        self.max_upsample = int(max_upsample)
        self.upsample_max_side = upsample_max_side
        self.min_score = float(min_score)
        self.upright_above = None if upright_above is None else float(upright_above)
        self._dlib = dlib
        self._pyr = dlib.pyramid_down(6)

    # -- detection --------------------------------------------------------------------------------
    def detect(self, image, min_face_size: float = 0.0, detect_max_side="default", exhaustive: bool = False):
        """Face boxes in source pixels: list of ((x0, y0, x1, y1), score), x1/y1 exclusive.

        dlib's HOG detector scans an image pyramid whose levels are each ``pyramid_down(6)`` of the previous
        one, and keeps, per face, the best-scoring window over all levels. Here the photo is reduced with
        that same ``pyramid_down`` k times (``coarse_level``: the fewest that bring the longer side to
        ``detect_max_side`` or below) and the detector runs on level k: it scans exactly levels k, k+1, ... of
        the full-resolution pyramid, and its boxes, mapped back (``level_rect_to_source``), are the ones
        detection on the full-resolution photo reports for faces whose best window lies at those levels. A
        face's best window can also lie on a finer level (a face smaller than about 80 * 1.2^k px, seen at
        level k by a weaker window): for each detection the detector runs again on a crop of level k-1
        around it (``finer_window``), a better-scoring window there replaces it, and the search goes on to
        level k-2 and finer for as long as the score keeps improving.
        Only when nothing qualifying was found (or with ``exhaustive``), and smaller faces could still reach
        ``min_face_size``, finer runs follow (``detection_runs``, ``more_runs``): levels k-4, k-8, ..., 0,
        then dlib's upsampling of the photo, up to ``max_upsample`` times, on photos no longer than
        ``upsample_max_side``. The result is that of the last run made; with ``exhaustive`` the runs'
        detections are merged (overlaps keep the coarser run's box). The torch backend
        (pipeline.device_align.DeviceAligner.detect) follows the same steps with these functions, each step
        one detector call for all the photos or faces making it.
        """
        img = np.ascontiguousarray(as_rgb_uint8(image))
        H, W = img.shape[:2]
        dms = self.detect_max_side if detect_max_side == "default" else detect_max_side
        levels = [img]
        for _ in range(coarse_level(H, W, dms)):
            levels.append(self._pyr(levels[-1]))
        found, smallest = [], None
        for j, up in detection_runs(len(levels) - 1, H, W, self.max_upsample, min_face_size, self.upsample_max_side):
            if smallest is not None and not more_runs(found, exhaustive, min_face_size, smallest):
                break
            lv = levels[j]
            smallest = smallest_visible(W, lv.shape[1], up)
            rects, scores, _ = self.detector.run(lv, up, 0.0)
            for r, sc in zip(rects, scores):
                r = level_rect_to_source(_dlib_rect_tuple(r), j)
                # Descend while a finer level has a better window for this face (each step one local run).
                jj = j if up == 0 else 0
                while jj > 0:
                    r2, sc2 = self._best_window_one_level_finer(levels[jj - 1], jj - 1, r, sc)
                    if sc2 <= sc:
                        break
                    r, sc, jj = r2, sc2, jj - 1
                if sc < self.min_score:
                    continue
                box = _rect_box(r)
                if min(box[2] - box[0], box[3] - box[1]) < min_face_size:
                    continue
                # A face already found by a coarser run keeps that run's box (its "largest" answer).
                if any(box_iou(box, b) > 0.3 for b, _ in found):
                    continue
                found.append((box, float(sc)))
        return found

    def _best_window_one_level_finer(self, level: np.ndarray, j: int, r, score: float):
        """(rect, score) of the best detector window for the face at source rect ``r`` among its own and
        the windows of pyramid level ``j`` (one finer than where it was found) that overlap it."""
        window = finer_window(r, j, level.shape[0], level.shape[1])
        if window is None:
            return r, score
        x0, y0, x1, y1 = window
        rects, scores, _ = self.detector.run(np.ascontiguousarray(level[y0:y1, x0:x1]), 0, 0.0)
        return better_finer_detection(r, score, [(_dlib_rect_tuple(rr), sc) for rr, sc in zip(rects, scores)],
                                      x0, y0, j)

    def _predict(self, img, box) -> np.ndarray:
        x0, y0, x1, y1 = box
        rect = self._dlib.rectangle(int(round(x0)), int(round(y0)), int(round(x1)) - 1, int(round(y1)) - 1)
        shape = self.predictor(img, rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    def landmarks(self, image, box) -> np.ndarray:
        """68x2 landmarks (source pixels) predicted on the full-resolution image inside ``box``.

        dlib's predictor starts from an upright mean face inside the box and does not reach faces rolled by
        much more than ~20 degrees (on the test astronaut turned 30 degrees the quad lands 23% of its size
        off). When the eyes of the first prediction are tilted by more than ``upright_above`` degrees, the
        prediction is made again on a copy of the face region turned upright about the box centre (Pillow
        bilinear, same box size), and mapped back; a second turn follows when the first was off by more than
        5 degrees. Faces within ``upright_above`` keep the plain prediction, as in the reference scripts.
        """
        img = np.ascontiguousarray(as_rgb_uint8(image))
        lm = self._predict(img, box)
        if self.upright_above is None:
            return lm
        roll = eye_roll_degrees(lm)
        if abs(roll) <= self.upright_above:
            return lm
        lm = self._predict_upright(img, box, roll)
        # A badly rolled first prediction misjudges the roll too (12 degrees for the astronaut turned by 30,
        # 33 in all): turn once more.
        roll2 = eye_roll_degrees(lm)
        if abs(roll2 - roll) > 5.0:
            lm = self._predict_upright(img, box, roll2)
        return lm

    def _predict_upright(self, img: np.ndarray, box, roll: float) -> np.ndarray:
        """Landmarks predicted on the region around ``box`` turned by ``roll`` degrees (eyes level), in source
        pixel coordinates (models.ffhq_crop.upright_geometry, sampled by Pillow)."""
        g = upright_geometry(box, roll)
        region = Image.fromarray(img, "RGB").transform(g.size, Image.Transform.AFFINE, g.affine, Image.Resampling.BILINEAR)
        return g.to_source(self._predict(np.asarray(region), g.box))
