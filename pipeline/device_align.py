"""Stage 5 on the actor, device alignment (``align.backend: torch``): decoded photos -> rows and FFHQ faces on
the inversion actor's own device (GPU, or CPU: the same code, so CI tests it).

    aligner = DeviceAligner(align_cfg, device="cuda")
    rows, faces, face_photo = align_photos(aligner, photos, rows)   # rows: the ALIGN_PENDING rows of photos

The torch ports of dlib's models do the work of pipeline/detect.py and pipeline/crop.py: detection is the dlib
backend's search (pipeline.face_search.search_faces: the run on the photo's whole pyramid by default, or on a
coarse level with each face's search on finer levels, align.device_detect_max_side; the finer and upsampled runs
only where needed) with models.alignment.detector.FrontalFaceDetector, each of its steps one detector call for
all the photos or faces making it; 68 landmarks with models.alignment.landmarks.ShapePredictor (rolled faces
predicted again upright with models.alignment.ffhq_crop.upright_landmarks_batch: one predictor call per round
for the whole group); the FFHQ crop with models.alignment.ffhq_crop.crop_faces. The search, the choice of faces
(pipeline.face_search.choose_faces) and the rows (pipeline.align.face_rows) are the dlib backend's own, so rows,
keys and statuses are the same.

Memory: photos are aligned in groups of at most ``max_group_pixels`` pixels (a larger photo alone); none is
shrunk (no shrink factor is known that cannot change dlib's boxes). Each group crosses to the device once, as
uint8 from pinned memory: first copied there on the host (DeviceAligner.stage, outside align_photos' ``serial``
context, so an actor stages one chunk while another aligns), then in one transfer (photos_to_device); the
detector (every run), the predictor and the crop are given views of that copy, and the predictor, the upright
regions and the crop read them there (models/alignment/flat_views.py: no copy of the chunk).

After detection the host reads the device only where it decides: the faces' landmarks once per prediction round
(the first prediction, then the upright rounds of rolled faces), then the crops once; each step between is one
batch of device work for all faces (per round, per group of padded faces, per 32 faces of the QUAD transform).
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
from models.alignment.ffhq_geometry import UPRIGHT_ABOVE, ffhq_quads, plan_crops
from models.alignment.flat_views import views_of
from models.alignment.landmarks import ShapePredictor

from .align import AlignedFace, face_rows
from .config import AlignConfig
from .face_search import Detection, SearchRules, choose_faces, search_faces
from .model_files import find_landmark_model
from .records import ALIGN_PENDING, Row

__all__ = ["ALIGN_PARTS", "DeviceAligner", "PartClock", "align_photos", "resolve_align_backend"]


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
    ``part_seconds``: the wall time align() spent in each of ALIGN_PARTS so far (a run's summary reports it);
    ``part_cpu_seconds``: the CPU time of the aligning threads in each (time.thread_time: host work, and CUDA's
    spin-wait where a part reads results back); ``on_part(part, wall_s, cpu_s)``, when set, is called in the
    aligning thread at the end of each part (benchmarks/profile_actor.py times each chunk's parts with it)."""
    cfg: AlignConfig
    detector: FrontalFaceDetector
    predictor: ShapePredictor
    max_group_pixels: int
    part_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ALIGN_PARTS, 0.0))
    part_cpu_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(ALIGN_PARTS, 0.0))
    on_part: Callable[[str, float, float], None] | None = None

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
        with x1/y1 exclusive, score) the dlib backend's FaceDetector.detect makes: the same search
        (pipeline.face_search.search_faces) with the torch detector, each of its steps one detector call for
        all the photos or faces making it. By default (``align.device_detect_max_side`` null) from the photo
        itself: one call for the whole pyramid of every photo, then the upsampled run where nothing counted."""
        cfg = self.cfg
        photos = [p if isinstance(p, torch.Tensor) and p.device.type == self.device.type
                  else torch.as_tensor(np.ascontiguousarray(p)).to(self.device) for p in photos]
        rules = SearchRules(cfg.device_detect_max_side, cfg.max_upsample, cfg.upsample_max_side, cfg.min_face_size,
                            exhaustive=cfg.policy == "all")
        return search_faces(_DevicePyramids(self.detector, photos), [(int(p.shape[0]), int(p.shape[1])) for p in photos],
                            rules)

    def stage(self, photos: list[np.ndarray]) -> StagedPhotos:
        """The photos' host copy into pinned memory, ready for align(): host work only, so the actor stages
        one chunk while another is aligned."""
        clock = self._clock()
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
        clock = self._clock()
        # The group's one host -> device copy (from pinned memory): the detector, the predictor and the crop
        # are given views of it and read it where it lies.
        flat, starts, sizes = photos_to_device(photos, self.device)
        on_device = views_of(flat, starts, sizes)
        clock.lap("upload")
        chosen = [choose_faces(d, cfg.policy) for d in self.detect(on_device)]
        clock.lap("detect")
        image_index = [i for i, faces in enumerate(chosen) for _ in faces]
        if not image_index:
            return out
        boxes = [box for faces in chosen for box, _ in faces]
        # One predictor call for all faces (one read of their points), then one per round of upright
        # re-prediction for the rolled faces (the host decides which from the points it read).
        first = self.predictor.predict(on_device, [[_dlib_rect(box) for box, _ in faces] for faces in chosen])
        landmarks = np.stack(upright_landmarks_batch(
            [on_device[i] for i in image_index], boxes, self.predict_boxes, UPRIGHT_ABOVE,
            first=[points for per_photo in first for points in per_photo]))
        clock.lap("landmarks")
        quads, qsizes = ffhq_quads(landmarks)
        plans = plan_crops(quads, qsizes, [sizes[i] for i in image_index], cfg.output_size, cfg.transform_size)
        # The crops' one read back (the rows carry the faces to inversion and to the shard's output).
        crops = crop_faces(on_device, image_index, None, cfg.output_size, cfg.transform_size, device=self.device,
                           plans=plans).cpu().numpy()
        clock.lap("crop")
        n = 0
        for i, faces in enumerate(chosen):
            for box, score in faces:
                out[i].append(AlignedFace(image=crops[n], landmarks=landmarks[n], quad=quads[n],
                                          box=tuple(float(v) for v in box), score=score))
                n += 1
        return out

    def _clock(self) -> "PartClock":
        return PartClock(self.part_seconds, self.part_cpu_seconds, self.on_part)

    def predict_boxes(self, images: list[torch.Tensor], boxes: list) -> list[np.ndarray]:
        """(68, 2) float64 landmarks of the face in ``boxes[i]`` ((x0, y0, x1, y1), x1/y1 exclusive) of
        ``images[i]``, all in one predictor call."""
        points = self.predictor.predict(images, [[_dlib_rect(box)] for box in boxes])
        return [p[0].astype(np.float64) for p in points]


class _DevicePyramids:
    """The photos' pyramids on the device as pipeline.face_search's LevelDetector. A photo's run on level j is
    made on that level where an earlier call kept it, else from the photo (FrontalFaceDetector.detect_levels
    resamples the finer levels, scores from level j, and keeps all levels for the finer searches' crops)."""

    def __init__(self, detector: FrontalFaceDetector, photos: list[torch.Tensor]):
        self.detector, self.photos = detector, photos
        self.pyramids: list[list[torch.Tensor]] = [[p] for p in photos]

    def run_levels(self, photos, levels, upsample: int) -> list[list[Detection]]:
        if upsample:
            return _detections(self.detector.detect([self.photos[i] for i in photos], upsample=upsample))
        kept = [j < len(self.pyramids[i]) for i, j in zip(photos, levels)]
        found, new_levels = self.detector.detect_levels(
            [self.pyramids[i][j] if k else self.photos[i] for i, j, k in zip(photos, levels, kept)],
            [[0] if k else [j] for j, k in zip(levels, kept)],
            keep_levels=any(not k and j > 0 for j, k in zip(levels, kept)))
        for n, (i, k) in enumerate(zip(photos, kept)):
            if not k and new_levels is not None:
                self.pyramids[i] = new_levels[n]
        return _detections([per_run[0] for per_run in found])

    def run_windows(self, photos, levels, windows) -> list[list[Detection]]:
        return _detections(self.detector.detect([self.pyramids[i][j][y0:y1, x0:x1]
                                                 for i, j, (x0, y0, x1, y1) in zip(photos, levels, windows)],
                                                max_levels=1))


def _detections(per_image: list[list]) -> list[list[Detection]]:
    """The detector's (rect, score, filter) detections without the filter."""
    return [[(rect, float(score)) for rect, score, _filter in dets] for dets in per_image]


class PartClock:
    """Adds the wall time since the previous lap (or its creation) to ``seconds[part]`` (from 0 for a new part),
    and the calling thread's CPU time to ``cpu_seconds[part]`` when given; calls ``on_part(part, wall, cpu)``
    when given. (An actor's calls stage and align at once, from threads of their own: the sums are added under
    a lock.)"""

    _lock = threading.Lock()

    def __init__(self, seconds: dict[str, float], cpu_seconds: dict[str, float] | None = None,
                 on_part: Callable[[str, float, float], None] | None = None):
        self.seconds, self.cpu_seconds, self.on_part = seconds, cpu_seconds, on_part
        self.t, self.cpu = time.perf_counter(), time.thread_time()

    def lap(self, part: str) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        wall, used = now - self.t, cpu - self.cpu
        with self._lock:
            self.seconds[part] = self.seconds.get(part, 0.0) + wall
            if self.cpu_seconds is not None:
                self.cpu_seconds[part] = self.cpu_seconds.get(part, 0.0) + used
        if self.on_part is not None:
            self.on_part(part, wall, used)
        self.t, self.cpu = now, cpu


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
