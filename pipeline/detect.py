"""Stage 3, detect: face detection and 68-point landmarks with dlib (the dlib backend, on CPU tasks).

Detection is the search of pipeline/face_search.py (from the pyramid level of at most ``detect_max_side`` px,
with a local search of finer levels per face, so its boxes, and so the landmarks, equal full-resolution
detection's; dlib's upsampling only when no qualifying face was found
and a face too small to be seen at the current scale could still be at least ``min_face_size``), made with
dlib's detector on dlib's own pyramid, one photo at a time. Landmarks are predicted on the full-resolution
photo, again on an upright copy for rolled faces.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image

from models.alignment.formats import detector_with_max_levels
from models.alignment.ffhq_geometry import UPRIGHT_ABOVE, UPRIGHT_AGAIN_ABOVE, eye_roll_degrees, upright_geometry

from .face_search import UPSAMPLE_MAX_SIDE, Detection, SearchRules, search_faces
from .images import as_rgb_uint8
from .model_files import find_landmark_model

__all__ = ["FaceDetector"]


class FaceDetector:
    """dlib HOG detector + 68-point predictor, built once per process (loading the predictor takes ~2 s).

    detect_max_side: the detector runs on a copy whose longer side is at most this (None: full size).
    max_upsample: most dlib pyramid upsamplings tried when nothing qualifying was found.
    upsample_max_side: upsampling only on photos whose longer side is at most this (None: any; see
        pipeline.face_search.upsample_runs).
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
        upright_above: float | None = UPRIGHT_ABOVE,
        upsample_max_side: int | None = UPSAMPLE_MAX_SIDE,
    ):
        import dlib

        self.predictor_path = find_landmark_model(predictor_path)
        self.detector = dlib.get_frontal_face_detector()
        self.crop_detector = _one_level_detector(dlib)
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
        """Face boxes in source pixels: list of ((x0, y0, x1, y1), score), x1/y1 exclusive: the search of
        pipeline.face_search (search_faces) with dlib's detector on dlib's pyramid of the photo (its levels made
        with dlib's ``pyramid_down(6)`` as the search reaches them). ``detect_max_side``: this call's (default:
        the detector's); ``exhaustive``: every run is made (policy ``all``)."""
        img = np.ascontiguousarray(as_rgb_uint8(image))
        rules = SearchRules(self.detect_max_side if detect_max_side == "default" else detect_max_side,
                            self.max_upsample, self.upsample_max_side, min_face_size, exhaustive, self.min_score)
        return search_faces(_DlibPyramid(self.detector.run, self.crop_detector.run, self._pyr, img), [img.shape[:2]],
                            rules)[0]

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
        UPRIGHT_AGAIN_ABOVE degrees. Faces within ``upright_above`` keep the plain prediction, as in the reference scripts.
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
        if abs(roll2 - roll) > UPRIGHT_AGAIN_ABOVE:
            lm = self._predict_upright(img, box, roll2)
        return lm

    def _predict_upright(self, img: np.ndarray, box, roll: float) -> np.ndarray:
        """Landmarks predicted on the region around ``box`` turned by ``roll`` degrees (eyes level), in source
        pixel coordinates (models.alignment.ffhq_geometry.upright_geometry, sampled by Pillow)."""
        g = upright_geometry(box, roll)
        region = Image.fromarray(img, "RGB").transform(g.size, Image.Transform.AFFINE, g.affine, Image.Resampling.BILINEAR)
        return g.to_source(self._predict(np.asarray(region), g.box))


def _one_level_detector(dlib):
    """dlib's frontal face detector scanning only the image's own pyramid level (saved with max_pyramid_levels
    1), for the finer search's crops: their coarser levels are not the photo's, and a window there could
    suppress the crop's best."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "frontal_face_detector.svm")
        dlib.get_frontal_face_detector().save(path)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(detector_with_max_levels(data, 1, path))
        return dlib.fhog_object_detector(path)


class _DlibPyramid:
    """One photo's dlib pyramid as pipeline.face_search's LevelDetector (photo 0, the only one): dlib's
    ``detector.run`` on its levels, each level made from the previous one when first asked for, and on crops
    of them scanning only the crop's own level (``crop_run``)."""

    def __init__(self, run, crop_run, pyramid_down, image: np.ndarray):
        self._run, self._crop_run, self._pyramid_down, self._levels = run, crop_run, pyramid_down, [image]

    def _level(self, j: int) -> np.ndarray:
        while len(self._levels) <= j:
            self._levels.append(self._pyramid_down(self._levels[-1]))
        return self._levels[j]

    def run_levels(self, photos, levels, upsample: int) -> list[list[Detection]]:
        return [_detections(self._run, self._level(j), upsample) for j in levels]

    def run_windows(self, photos, levels, windows) -> list[list[Detection]]:
        return [_detections(self._crop_run, np.ascontiguousarray(self._level(j)[y0:y1, x0:x1]), 0)
                for j, (x0, y0, x1, y1) in zip(levels, windows)]


def _detections(run, image: np.ndarray, upsample: int) -> list[Detection]:
    rects, scores, _ = run(image, upsample, 0.0)
    return [((r.left(), r.top(), r.right(), r.bottom()), score) for r, score in zip(rects, scores)]
