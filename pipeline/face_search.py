"""The detection search both alignment backends make, and the rules for which detections are faces.

    found = search_faces(detector, [(h, w), ...], SearchRules(detect_max_side, max_upsample, ...))
    chosen = choose_faces(found[i], "largest")

``detector`` is a backend's batched HOG detector over the photos' dlib pyramids (``LevelDetector``: the dlib
backend's, pipeline/detect.py, one photo at a time on a CPU task; the torch backend's, pipeline/device_align.py,
all of a group's photos at once on the actor's device). The search decides every run and every crop; the
detector only runs them, each call one batch.

The search (dlib's frontal HOG detector scans a pyramid whose levels are each ``pyramid_down<6>`` of the
previous one, and keeps per face the best-scoring window over all levels): the first run is on the photo's
pyramid level k (``coarse_level``: at most ``detect_max_side`` px), which scans levels k, k+1, ... of the
full-resolution pyramid, its boxes mapped back (``level_rect_to_source``) to those full-resolution detection
reports. A face whose best window lies on a finer level (smaller than about 80 * 1.2^k px) is seen at level k
by a weaker window: each face is searched for again in a crop of the next finer level around it
(``finer_window``), a better window there replaces it (``better_finer_detection``), and the search goes on one
level finer while the score improves. Only when nothing qualifying was found (or with ``exhaustive``), and
smaller faces could still reach ``min_face_size``, finer runs follow (``run_plan``, ``more_runs``): levels k-4,
k-8, ..., 0, then dlib's upsampling of the photo. A face found by an earlier run keeps that run's box.

The finer search's runs on crops scan only the crop's own level: the crop's coarser levels are not the photo's,
and a window of theirs could outscore and suppress the finer level's best (the search then ended on a weaker
window of a coarser level than full resolution's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

from models.alignment.formats import CELL_SIZE
from models.alignment.pyramid import PYRAMID_RATE_UP, PYRAMID_SHIFT, pyramid_level_size, rect_down

__all__ = ["Box", "Detection", "HOG_MIN_FACE", "HOG_WINDOW", "LevelDetector", "POLICIES", "SAME_FACE_IOU",
           "SearchRules", "UPSAMPLE_MAX_SIDE", "better_finer_detection", "box_iou", "choose_faces",
           "coarse_level", "faces_that_count", "finer_window", "is_window", "level_rect_to_source", "more_runs",
           "pick_largest", "rect_box", "run_plan", "search_faces", "smallest_visible", "upsample_runs",
           "window_up"]

# (left, top, right, bottom), inclusive integers: dlib's rectangle, in the pixels of the image a run was made on.
Rect = tuple[int, int, int, int]
# (x0, y0, x1, y1) floats in source pixels, x1/y1 exclusive: what the search returns per face.
Box = tuple[float, float, float, float]
Detection = tuple[Rect, float]

POLICIES = ("largest", "all")
# dlib's frontal HOG detector scans an 80x80 window: smaller faces are not found at a given scale.
HOG_MIN_FACE = 80
# Side of a detection rectangle (dlib's right - left + 1) at the pyramid level where the detector found it; a
# side across the image's left (top) edge is a cell longer: dlib's fhog_to_image rounds each corner away from
# zero (models.alignment.pyramid.window_boxes).
HOG_WINDOW = 73
# A detection overlapping an earlier face by more than this IoU is that face (a later run's, a finer window's).
SAME_FACE_IOU = 0.3
# What counts as a face: a score of at least this share of the photo's best (see faces_that_count).
FACE_SCORE_SHARE = 0.5
# Boxes within this factor of the largest side count as the same size for the largest policy (dlib's box sizes
# come a pyramid step, 1.2, apart).
SAME_SIZE_FACTOR = 1.1
# The finer search's crop around a face: its box at the finer level plus this share of its side and this many
# px on each side, room for the windows that overlap it by SAME_FACE_IOU and for their cells' neighbours.
FINER_SEARCH_MARGIN = 0.35
FINER_SEARCH_PAD = 12
# Longest photo side on which the upsampled search runs (align.upsample_max_side's default). The upsampled run
# only finds faces under HOG_MIN_FACE px; on a larger photo such a face covers under a tenth of its longer side
# (a face in the background, not the subject), and the run costs 4-5x the whole detection of the photo.
UPSAMPLE_MAX_SIDE = 800


class LevelDetector(Protocol):
    """A backend's batched HOG detector over its photos' pyramids (photo i is the i-th of search_faces' sizes).
    Detections are (dlib rectangle in the pixels of the image run on, score), in dlib's order."""

    def run_levels(self, photos: Sequence[int], levels: Sequence[int], upsample: int) -> list[list[Detection]]:
        """Per photo, dlib's ``detector.run(level, upsample, 0)`` on its pyramid level ``levels[n]`` (the photo
        itself, level 0, when ``upsample`` > 0)."""

    def run_windows(self, photos: Sequence[int], levels: Sequence[int], windows: Sequence[tuple[int, int, int, int]]
                    ) -> list[list[Detection]]:
        """Per photo, dlib's ``detector.run(crop, 0, 0)`` on the crop (x0, y0, x1, y1), x1/y1 exclusive, of its
        pyramid level ``levels[n]``, scanning the crop's own level only (the detector saved with
        max_pyramid_levels 1)."""


@dataclass
class _Face:
    """A face during a search step: its photo, source rect and score, and the level its finer search is on."""
    photo: int
    rect: Rect
    score: float
    level: int


@dataclass(frozen=True)
class SearchRules:
    """What the search looks for. detect_max_side: the first run's level is at most this long (None: the photo);
    max_upsample: most upsamplings tried when nothing qualifying was found; upsample_max_side: upsampling only
    on photos at most this long (None: any); min_face_size: smaller boxes (source px) are not faces;
    exhaustive: every run is made (policy ``all``); min_score: lower-scoring detections are dropped."""
    detect_max_side: int | None
    max_upsample: int
    upsample_max_side: int | None
    min_face_size: float
    exhaustive: bool = False
    min_score: float = 0.0


# -- a run's windows in source pixels --------------------------------------------------------------------------

def rect_box(rect) -> Box:
    """Inclusive (left, top, right, bottom) -> (x0, y0, x1, y1) floats, x1/y1 exclusive."""
    return (float(rect[0]), float(rect[1]), float(rect[2] + 1), float(rect[3] + 1))


def window_up(rect, levels: int) -> Rect:
    """A detector window of pyramid level ``levels`` in the photo's pixels, as dlib's detector reports it: the
    corners mapped up (pyramid_down<6>::rect_up) in double, rounded once, halves away from zero
    (models.alignment.pyramid.window_boxes)."""
    pts = [float(v) for v in rect]
    for _ in range(levels):
        pts = [v * PYRAMID_RATE_UP + PYRAMID_SHIFT for v in pts]
    return tuple(int(math.copysign(math.floor(abs(v) + 0.5), v)) for v in pts)


def is_window(rect) -> bool:
    """Whether ``rect`` is a detector window at its own pyramid level: HOG_WINDOW on each side, a cell more on a
    side that crosses 0."""
    def side_fits(lo: int, hi: int) -> bool:
        return hi - lo + 1 == HOG_WINDOW + (CELL_SIZE if lo < 0 <= hi else 0)
    return side_fits(rect[0], rect[2]) and side_fits(rect[1], rect[3])


def level_rect_to_source(rect, k: int) -> Rect:
    """Source-pixel rectangle (dlib's, inclusive) of a detection ``rect`` made on pyramid level ``k``.

    dlib maps a detection found at its own pyramid level j (a window, ``is_window``, there) with
    ``window_up(R, j)``, rounding once. A run on level k returned ``window_up(R, j - k)``; R is recovered exactly
    (the map has slope 1.2^(j-k) >= 1, so rounding is undone: the one level whose recovered rectangle is a
    window and maps back onto ``rect``) and mapped up j levels at once, which is what detection on the
    full-resolution photo reports for the same window.
    """
    rect = tuple(int(v) for v in rect)
    if k == 0:
        return rect
    width = rect[2] - rect[0] + 1
    level = 0
    while HOG_WINDOW * PYRAMID_RATE_UP ** level < PYRAMID_RATE_UP * width:  # windows up to a level wider
        window = tuple(int(round(v)) for v in rect_down(rect, level))
        if is_window(window) and window_up(window, level) == rect:
            return window_up(window, level + k)
        level += 1
    raise ValueError(f"{rect} is not a detector window of a run on pyramid level {k}")


# -- the run plan ---------------------------------------------------------------------------------------------

def upsample_runs(height: int, width: int, max_upsample: int, min_face_size: float,
                  upsample_max_side: int | None) -> list[int]:
    """The upsampled detection runs (times upsampled) made on a photo when nothing qualifying was found at its
    own resolution. Run u finds faces down to HOG_MIN_FACE / 2^u px, so it is made only while smaller faces
    could still reach ``min_face_size``, and only on photos whose longer side is at most ``upsample_max_side``
    (None: any), which bounds the cost of a photo without a face."""
    if upsample_max_side is not None and max(height, width) > upsample_max_side:
        return []
    return [u for u in range(1, max_upsample + 1) if min_face_size < HOG_MIN_FACE / 2 ** (u - 1)]


def coarse_level(height: int, width: int, detect_max_side: int | None) -> int:
    """The pyramid level detection starts on: the fewest pyramid_down<6> steps that bring the longer side to
    ``detect_max_side`` or below (None: 0, the photo itself), stopping while the shorter side is over
    2 * HOG_MIN_FACE."""
    k = 0
    while detect_max_side and max(height, width) > detect_max_side and min(height, width) > 2 * HOG_MIN_FACE:
        height, width, k = (5 * height) // 6, (5 * width) // 6, k + 1
    return k


def run_plan(height: int, width: int, rules: SearchRules) -> list[tuple[int, int]]:
    """(pyramid level, times upsampled) of each detection run a photo may need, in order: its coarse level k,
    then every 4th finer level down to the photo itself, then its upsampled runs (``upsample_runs``). The runs
    after the first are made only while ``more_runs`` says so."""
    k = coarse_level(height, width, rules.detect_max_side)
    return ([(j, 0) for j in range(k, 0, -4)] + [(0, 0)]
            + [(0, u) for u in upsample_runs(height, width, rules.max_upsample, rules.min_face_size,
                                             rules.upsample_max_side)])


def more_runs(found: list, exhaustive: bool, min_face_size: float, smallest_seen: float) -> bool:
    """Whether a photo's next detection run is made: not once a face was found (except with ``exhaustive``),
    nor when the faces the next run could add, smaller than ``smallest_seen`` (the previous run's smallest
    visible face, source px), would be under ``min_face_size``."""
    return (exhaustive or not found) and min_face_size < smallest_seen


def smallest_visible(width: int, level_width: int, up: int) -> float:
    """The smallest face (source px) a run on a level ``level_width`` px wide, upsampled ``up`` times, sees."""
    return HOG_MIN_FACE * width / level_width / 2 ** up


# -- the finer search -----------------------------------------------------------------------------------------

def finer_window(rect, j: int, level_h: int, level_w: int) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), x1/y1 exclusive, of the crop of pyramid level ``j`` (``level_h`` x ``level_w``) in which
    a face at source rect ``rect`` is searched one level finer than where it was found: around the face, cut
    at multiples of CELL_SIZE px (dlib's fHOG cell) so the cells, and so the scores, are those of the whole level. None when the
    crop is too small for a detector window."""
    left, top, right, bottom = rect_down(rect, j)
    m = FINER_SEARCH_MARGIN * (right - left) + FINER_SEARCH_PAD
    x0, y0 = max(int(left - m) // CELL_SIZE * CELL_SIZE, 0), max(int(top - m) // CELL_SIZE * CELL_SIZE, 0)
    x1, y1 = min(int(right + m) + 1, level_w), min(int(bottom + m) + 1, level_h)
    if x1 - x0 < HOG_MIN_FACE or y1 - y0 < HOG_MIN_FACE:
        return None
    return x0, y0, x1, y1


def better_finer_detection(rect, score: float, dets, x0: int, y0: int, j: int) -> tuple[Rect, float]:
    """The face's (rect, score) after the search in finer_window's crop of level ``j`` at (x0, y0): a window of
    the level (not one across the crop's edge) scoring higher and overlapping the face replaces it. ``dets``:
    the crop's detections, ((left, top, right, bottom) inclusive, score)."""
    box = rect_box(rect)
    for (left, top, right, bottom), sc in dets:
        on_level = (left + x0, top + y0, right + x0, bottom + y0)
        if sc <= score or not is_window(on_level):
            continue
        cand = window_up(on_level, j)
        if box_iou(rect_box(cand), box) > SAME_FACE_IOU:
            rect, score = cand, float(sc)
    return rect, score


def search_finer(detector: LevelDetector, faces: list[_Face], sizes: Sequence[tuple[int, int]]) -> None:
    """Each of ``faces`` found above level 0 searched for in a crop of the next finer level around it; a better
    window there replaces it, and its search goes on from there while that keeps happening. In place; one
    detector call per round for all faces."""
    active = [f for f in faces if f.level > 0]
    while active:
        searches = []
        for f in active:
            window = finer_window(f.rect, f.level - 1, *pyramid_level_size(sizes[f.photo], f.level - 1))
            if window is not None:
                searches.append((f, window))
        if not searches:
            return
        results = detector.run_windows([f.photo for f, _ in searches], [f.level - 1 for f, _ in searches],
                                       [w for _, w in searches])
        active = []
        for (f, (x0, y0, _x1, _y1)), dets in zip(searches, results):
            rect, score = better_finer_detection(f.rect, f.score, dets, x0, y0, f.level - 1)
            if score > f.score:
                f.rect, f.score, f.level = rect, score, f.level - 1
                if f.level > 0:
                    active.append(f)


# -- the search -----------------------------------------------------------------------------------------------

def search_faces(detector: LevelDetector, sizes: Sequence[tuple[int, int]], rules: SearchRules
                 ) -> list[list[tuple[Box, float]]]:
    """Per photo ((height, width) each, in ``detector``'s order), its faces: ((x0, y0, x1, y1) source px, x1/y1
    exclusive, score), in the order found (see the module's docstring). Each step is one detector call for all
    the photos making it (one per upsampling), each finer-search round one call for all faces."""
    plans = [run_plan(h, w, rules) for h, w in sizes]
    found: list[list[tuple[Box, float]]] = [[] for _ in sizes]
    smallest: list[float | None] = [None] * len(sizes)
    for step in range(max(map(len, plans), default=0)):
        todo = [i for i, plan in enumerate(plans) if step < len(plan) and (
            smallest[i] is None or more_runs(found[i], rules.exhaustive, rules.min_face_size, smallest[i]))]
        if not todo:  # (a photo that stops making runs never starts again)
            break
        dets: dict[int, list[Detection]] = {}
        for up in sorted({plans[i][step][1] for i in todo}):
            photos = [i for i in todo if plans[i][step][1] == up]
            dets.update(zip(photos, detector.run_levels(photos, [plans[i][step][0] for i in photos], up)))
        faces = []  # in the detections' order; an upsampled run's faces have no finer level
        for i in todo:
            j, up = plans[i][step]
            smallest[i] = smallest_visible(sizes[i][1], pyramid_level_size(sizes[i], j)[1], up)
            faces += [_Face(i, level_rect_to_source(rect, j), float(score), j if up == 0 else 0)
                      for rect, score in dets[i]]
        search_finer(detector, faces, sizes)
        for face in faces:
            box = rect_box(face.rect)
            if face.score < rules.min_score or min(box[2] - box[0], box[3] - box[1]) < rules.min_face_size:
                continue
            # A face already found by an earlier run keeps that run's box.
            if any(box_iou(box, b) > SAME_FACE_IOU for b, _ in found[face.photo]):
                continue
            found[face.photo].append((box, face.score))
    return found


# -- the face rules -------------------------------------------------------------------------------------------

def box_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def faces_that_count(dets):
    """The one rule for what counts as a face, for both policies and both backends: detections scoring under
    FACE_SCORE_SHARE of the photo's best one are dropped. A face-like object (a badge, a pattern: the
    astronaut's mission patch scores 0.27 against 1.20 for her face) scores far below a clear face; two real
    faces of one photo score alike. ``dets``: ((x0, y0, x1, y1), score) pairs; their order is kept."""
    if not dets:
        return []
    best = max(d[1] for d in dets)
    return [d for d in dets if d[1] >= FACE_SCORE_SHARE * best]


def pick_largest(dets):
    """The ``largest`` policy's choice among a photo's ((x0, y0, x1, y1), score) pairs.

    Only detections that count as faces (``faces_that_count``) are candidates: a face-like object may have a
    larger box than the face. dlib's boxes come in the sizes of its pyramid levels (a factor 1.2 apart; boxes
    found on one level differ by a pixel of rounding at most), so boxes within SAME_SIZE_FACTOR of the largest
    side count as the same size and the best-scoring one among them wins; then position, for determinism."""
    side = lambda d: min(d[0][2] - d[0][0], d[0][3] - d[0][1])  # noqa: E731
    dets = faces_that_count(dets)
    top = max(side(d) for d in dets)
    tied = [d for d in dets if side(d) >= top / SAME_SIZE_FACTOR]
    return max(tied, key=lambda d: (d[1], side(d), -d[0][0], -d[0][1]))


def choose_faces(dets, policy: str):
    """The faces a policy keeps of a photo's detections ((x0, y0, x1, y1), score): ``largest`` one (see
    ``pick_largest``), or ``all`` that count as faces (``faces_that_count``), left to right then top to
    bottom."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not dets:
        return []
    if policy == "largest":
        return [pick_largest(dets)]
    return sorted(faces_that_count(dets), key=lambda d: (d[0][0], d[0][1], d[0][2], d[0][3]))
