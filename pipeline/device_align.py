"""Stage 5 on the actor, device alignment (``align.backend: torch``): decoded photos -> rows and FFHQ faces on
the inversion actor's own device (GPU, or CPU: the same code, so CI tests it).

    aligner = DeviceAligner(align_cfg, device="cuda")
    rows, faces, face_photo = align_photos(aligner, photos, rows)   # rows: the ALIGN_PENDING rows of photos

The torch ports of dlib's models do the work of pipeline/detect.py and pipeline/crop.py: detection with
models.face_detector.FrontalFaceDetector by the dlib backend's own algorithm (pipeline.detect.FaceDetector.detect:
the run on the photo's whole pyramid by default, or on a coarse level with each face's search on finer levels
(align.device_detect_max_side); the finer and upsampled runs only where needed), each of its steps one detector
call for all the photos or faces making it; 68 landmarks with
models.landmarks.ShapePredictor (rolled faces predicted again upright with
models.ffhq_crop.upright_landmarks_batch: one predictor call per round for the whole group); the FFHQ crop with
models.ffhq_crop.crop_faces. The runs, the choice of faces (pipeline.align.choose_faces) and the rows
(pipeline.align.face_rows) are the dlib backend's own functions, so rows, keys and statuses are the same.

Memory: photos are aligned in groups of at most ``max_group_pixels`` pixels (a larger photo alone); none is
shrunk (no shrink factor is known that cannot change dlib's boxes). Each group crosses to the device once, as
uint8 from pinned memory: first copied there on the host (DeviceAligner.stage, outside align_photos' ``serial``
context, so an actor stages one chunk while another aligns), then in one transfer (photos_to_device); the
detector (every run), the predictor and the crop are given views of that copy (what they copy of it is device
to device).
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import numpy as np
import torch

from models.alignment.detector import FrontalFaceDetector
from models.alignment.device import StagedPhotos, photos_to_device, stage_photos
from models.alignment.ffhq_crop import crop_faces, upright_landmarks_batch
from models.alignment.ffhq_geometry import ffhq_quads
from models.alignment.landmarks import ShapePredictor
from models.alignment.pyramid import pyramid_level_size

from .align import AlignedFace, choose_faces, face_rows
from .config import AlignConfig
from .detect import (better_finer_detection, box_iou, coarse_level, detection_runs, finer_window,
                     level_rect_to_source, more_runs, smallest_visible)
from .model_files import find_landmark_model
from .records import ALIGN_PENDING, Row

__all__ = ["ALIGN_PARTS", "DeviceAligner", "PartClock", "align_photos", "resolve_align_backend"]

# Eye-line tilt (degrees) above which landmarks are predicted again upright: pipeline.detect.FaceDetector's.
UPRIGHT_ABOVE = 10.0
# IoU above which a detection of a later (upsampled) run is the same face as an earlier one's.
SAME_FACE_IOU = 0.3


def resolve_align_backend(backend: str, device: str) -> str:
    """``align.backend`` on an actor whose device is ``device``: auto is torch on a GPU, dlib otherwise."""
    if backend == "auto":
        return "torch" if str(device).startswith("cuda") else "dlib"
    return backend


# The parts of DeviceAligner's work whose host time it adds up (seconds; the device work of each part is
# waited for where the part reads its results back): stage (the photos' host copy into pinned memory,
# DeviceAligner.stage), then align()'s.
ALIGN_PARTS = ("stage", "upload", "detect", "landmarks", "crop")


@dataclass
class DeviceAligner:
    """The torch detector and predictor on one device, and the alignment settings (an AlignConfig).
    ``part_seconds``: the time align() spent in each of ALIGN_PARTS so far (a run's summary reports it)."""
    cfg: AlignConfig
    detector: FrontalFaceDetector
    predictor: ShapePredictor
    max_group_pixels: int
    part_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ALIGN_PARTS, 0.0))

    @classmethod
    def build(cls, cfg: AlignConfig, device: str, predictor: ShapePredictor | None = None,
              max_group_pixels: int | None = None) -> "DeviceAligner":
        """``predictor``: by default dlib's 68-point model file (pipeline.model_files); benchmarks pass
        ``ShapePredictor.random()`` where the file is absent."""
        on_gpu = str(device).startswith("cuda")
        if predictor is None:
            # No CUDA graphs: the actor's other call may launch inversion kernels while a graph would be
            # captured; landmarks are a small part of alignment's time without them.
            predictor = ShapePredictor(find_landmark_model(None), device=device, cuda_graphs=False)
        return cls(cfg, FrontalFaceDetector(device=device), predictor,
                   int(max_group_pixels or (256 if on_gpu else 16) * 2 ** 20))

    @property
    def device(self) -> torch.device:
        return self.detector.device

    def detect(self, photos: list) -> list[list[tuple[tuple, float]]]:
        """Per photo (HxWx3 uint8; host photos are copied to the device first), the detections ((x0, y0, x1, y1)
        with x1/y1 exclusive, score) the dlib backend's FaceDetector.detect makes, by its own algorithm and
        functions, each of its steps one detector call for all the photos or faces making it: the run on each
        photo's coarse level (``coarse_level``: at most ``align.device_detect_max_side`` px; the detector resamples
        the finer levels, scores from there, and keeps all levels for the searches), each face's search one
        level finer for as long as its score improves (``finer_window``, ``better_finer_detection``: one call
        per round for all faces), and the finer and upsampled runs (``detection_runs``) only for photos that
        ``more_runs`` says need them (FrontalFaceDetector.detect_levels).
        By default (null) from the photo itself: one call for the whole pyramid of every photo, then the
        upsampled run where nothing counted."""
        cfg = self.cfg
        exhaustive = cfg.policy == "all"
        photos = [p if isinstance(p, torch.Tensor) and p.device.type == self.device.type
                  else torch.as_tensor(np.ascontiguousarray(p)).to(self.device) for p in photos]
        sizes = [(int(p.shape[0]), int(p.shape[1])) for p in photos]
        coarse = [coarse_level(h, w, cfg.device_detect_max_side) for h, w in sizes]
        runs = [detection_runs(k, h, w, cfg.max_upsample, cfg.min_face_size, cfg.upsample_max_side)
                for k, (h, w) in zip(coarse, sizes)]
        # Each photo's pyramid levels (kept by the detector's calls, for the finer searches' crops).
        pyramids: list[list[torch.Tensor]] = [[p] for p in photos]
        found: list[list] = [[] for _ in photos]
        smallest: list[float | None] = [None] * len(photos)
        for step in range(max(map(len, runs), default=0)):
            todo = [i for i, r in enumerate(runs) if step < len(r)
                    and (smallest[i] is None or more_runs(found[i], exhaustive, cfg.min_face_size, smallest[i]))]
            if not todo:  # (a photo that stops making runs never starts again)
                break
            dets: dict[int, list] = {}
            plain = [i for i in todo if runs[i][step][1] == 0]
            if plain:
                # The run on each photo's level j: on that level where an earlier call kept it, else from the
                # photo (the detector resamples the finer levels, scores from level j, and keeps all levels for
                # the searches when j > 0).
                kept = [runs[i][step][0] < len(pyramids[i]) for i in plain]
                found_plain, levels = self.detector.detect_levels(
                    [pyramids[i][runs[i][step][0]] if k else photos[i] for i, k in zip(plain, kept)],
                    [[0] if k else [runs[i][step][0]] for i, k in zip(plain, kept)],
                    keep_levels=any(not k and runs[i][step][0] > 0 for i, k in zip(plain, kept)))
                for n, (i, k) in enumerate(zip(plain, kept)):
                    dets[i] = found_plain[n][0]
                    if not k and levels is not None:
                        pyramids[i] = levels[n]
            for up in sorted({runs[i][step][1] for i in todo} - {0}):
                mine = [i for i in todo if runs[i][step][1] == up]
                dets.update(zip(mine, self.detector.detect([photos[i] for i in mine], upsample=up)))
            # (photo, source rect, score, level its finer search starts from), in the order of the detections
            faces = []
            for i in todo:
                j, up = runs[i][step]
                smallest[i] = smallest_visible(sizes[i][1], pyramid_level_size(sizes[i], j)[1], up)
                faces += [[i, level_rect_to_source(rect, j), float(score), j if up == 0 else 0]
                          for rect, score, _filter in dets[i]]
            self._search_finer(faces, pyramids)
            for i, rect, score, _j in faces:
                box = (float(rect[0]), float(rect[1]), float(rect[2] + 1), float(rect[3] + 1))
                if min(box[2] - box[0], box[3] - box[1]) < cfg.min_face_size:
                    continue
                # A face already found by an earlier run keeps that run's box.
                if any(box_iou(box, b) > SAME_FACE_IOU for b, _ in found[i]):
                    continue
                found[i].append((box, score))
        return found

    def _search_finer(self, faces: list[list], pyramids: list[list[torch.Tensor]]) -> None:
        """FaceDetector's descent, for all ``faces`` ([photo, rect, score, level]) at once, in place: each face
        found above level 0 is searched for in a crop of the next finer level around it, a better window there
        replaces it, and its search goes on from there while that keeps happening; one detector call per
        round."""
        active = [f for f in faces if f[3] > 0]
        while active:
            searches = []
            for f in active:
                level = pyramids[f[0]][f[3] - 1]
                window = finer_window(f[1], f[3] - 1, int(level.shape[0]), int(level.shape[1]))
                if window is not None:
                    searches.append((f, window))
            crops = [pyramids[f[0]][f[3] - 1][y0:y1, x0:x1] for f, (x0, y0, x1, y1) in searches]
            active = []
            for (f, (x0, y0, _x1, _y1)), dets in zip(searches, self.detector.detect(crops) if crops else []):
                rect, score = better_finer_detection(f[1], f[2], [(r, sc) for r, sc, _filter in dets], x0, y0,
                                                     f[3] - 1)
                if score > f[2]:
                    f[1], f[2], f[3] = rect, score, f[3] - 1
                    if f[3] > 0:
                        active.append(f)

    def stage(self, photos: list[np.ndarray]) -> StagedPhotos:
        """The photos' host copy into pinned memory, ready for align(): host work only, so the actor stages
        one chunk while another is aligned."""
        clock = PartClock(self.part_seconds)
        staged = stage_photos(photos, self.device)
        clock.lap("stage")
        return staged

    def align(self, photos: list[np.ndarray] | StagedPhotos) -> list[list[AlignedFace]]:
        """Per photo (or per photo of stage()'s result), its aligned faces (the policy's choice), as the dlib
        backend's FaceAligner.align."""
        cfg = self.cfg
        if not isinstance(photos, StagedPhotos):
            photos = self.stage(photos)
        out: list[list[AlignedFace]] = [[] for _ in photos.photos]
        if not photos.photos:
            return out
        clock = PartClock(self.part_seconds)
        # The group's one host -> device copy (from pinned memory): the detector, the predictor and the crop
        # are given views of it and copy from it on the device only.
        flat, starts, sizes = photos_to_device(photos, self.device)
        on_device = [flat[s:s + w * h].view(h, w, 3) for s, (w, h) in zip(starts, sizes)]
        clock.lap("upload")
        chosen = [choose_faces(d, cfg.policy) for d in self.detect(on_device)]
        clock.lap("detect")
        image_index = [i for i, faces in enumerate(chosen) for _ in faces]
        if not image_index:
            return out
        rects = [[_dlib_rect(box) for box, _ in faces] for faces in chosen]
        first = self.predictor.predict(on_device, rects)
        # Rolled faces are predicted again upright in one predictor call per round for the whole group.
        landmarks = np.stack(upright_landmarks_batch(
            [on_device[i] for i in image_index], [box for faces in chosen for box, _ in faces], self.predict_boxes,
            UPRIGHT_ABOVE, first=[points for per_photo in first for points in per_photo]))
        clock.lap("landmarks")
        crops = crop_faces(on_device, image_index, landmarks, cfg.output_size, cfg.transform_size,
                           device=self.device).cpu().numpy()
        clock.lap("crop")
        quads, _ = ffhq_quads(landmarks)
        n = 0
        for i, faces in enumerate(chosen):
            for box, score in faces:
                out[i].append(AlignedFace(image=crops[n], landmarks=landmarks[n], quad=quads[n],
                                          box=tuple(float(v) for v in box), score=score))
                n += 1
        return out

    def predict_boxes(self, images: list[torch.Tensor], boxes: list) -> list[np.ndarray]:
        """(68, 2) float64 landmarks of the face in ``boxes[i]`` ((x0, y0, x1, y1), x1/y1 exclusive) of
        ``images[i]``, all in one predictor call."""
        points = self.predictor.predict(images, [[_dlib_rect(box)] for box in boxes])
        return [p[0].astype(np.float64) for p in points]


class PartClock:
    """Adds the time since the previous lap (or its creation) to ``seconds[part]`` (from 0 for a new part).
    (An actor's calls stage and align at once, from threads of their own: the sums are added under a lock.)"""

    _lock = threading.Lock()

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.t = seconds, time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        with self._lock:
            self.seconds[part] = self.seconds.get(part, 0.0) + now - self.t
        self.t = now


def _dlib_rect(box) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), x1/y1 exclusive -> dlib's inclusive rectangle, rounded as pipeline.detect does."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return (x0, y0, x1 - 1, y1 - 1)


def _groups(photos: list[np.ndarray], max_pixels: int) -> list[list[int]]:
    """Photo indices in groups of at most ``max_pixels`` pixels (a larger photo alone), in order."""
    groups: list[list[int]] = []
    total = 0
    for i, p in enumerate(photos):
        pixels = int(p.shape[0]) * int(p.shape[1])
        if not groups or total + pixels > max_pixels:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += pixels
    return groups


def align_photos(aligner: DeviceAligner, photos: list[np.ndarray], rows: list[Row],
                 serial: Callable[[], ContextManager] = contextlib.nullcontext
                 ) -> tuple[list[Row], np.ndarray, list[int], float]:
    """A chunk's rows with each ALIGN_PENDING row (one per photo, in order) replaced by its photo's rows (as
    the dlib backend makes them: ok rows with quad, landmarks and score, or no_face; align_error when
    aligning its group failed). Returns (rows, the ok rows' faces (F, S, S, 3) uint8, each face's photo index,
    seconds). ``serial()``: a context held around each group's device work (the actor's: one chunk aligns at
    a time, on alignment's stream); the photos' host staging runs outside it."""
    t0 = time.perf_counter()
    pending = [r for r in rows if r.status == ALIGN_PENDING]
    if len(pending) != len(photos):
        raise ValueError(f"{len(photos)} photos for {len(pending)} rows awaiting alignment")
    per_photo: list[list[tuple[Row, np.ndarray | None]]] = [[] for _ in photos]
    for group in _groups(photos, aligner.max_group_pixels):
        try:
            staged = aligner.stage([photos[i] for i in group])
            with serial():
                aligned = aligner.align(staged)
        except Exception as e:  # noqa: BLE001 - a failing group costs its rows, not the chunk
            if len(group) > 1:  # find the photo at fault: the others are aligned one by one
                for i in group:
                    per_photo[i] = _align_one(aligner, photos[i], pending[i], serial)
                continue
            aligned = None
            error = f"{type(e).__name__}: {e}"
        for k, i in enumerate(group):
            base = pending[i]
            per_photo[i] = (face_rows(base, aligned[k]) if aligned is not None else
                            [(Row(base.key, base.source, status="align_error", error=error, meta=base.meta), None)])
    out_rows: list[Row] = []
    faces: list[np.ndarray] = []
    face_photo: list[int] = []
    p = 0
    for r in rows:
        if r.status != ALIGN_PENDING:
            out_rows.append(r)
            continue
        for row, face in per_photo[p]:
            out_rows.append(row)
            if face is not None:
                faces.append(face)
                face_photo.append(p)
        p += 1
    size = aligner.cfg.output_size
    arr = np.stack(faces) if faces else np.zeros((0, size, size, 3), np.uint8)
    return out_rows, arr, face_photo, time.perf_counter() - t0


def _align_one(aligner: DeviceAligner, photo: np.ndarray, base: Row, serial: Callable[[], ContextManager]
               ) -> list[tuple[Row, np.ndarray | None]]:
    try:
        staged = aligner.stage([photo])
        with serial():
            return face_rows(base, aligner.align(staged)[0])
    except Exception as e:  # noqa: BLE001 - a pathological photo costs one row
        return [(Row(base.key, base.source, status="align_error", error=f"{type(e).__name__}: {e}",
                     meta=base.meta), None)]
