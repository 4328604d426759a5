"""The FFHQ crop in PyTorch, batched over faces on any device; equal to pipeline/crop.py's (Pillow) to one grey level.

    from models.alignment.ffhq_crop import crop_faces
    faces = crop_faces(photos, image_index, landmarks, output_size=256, transform_size=1024, device="cuda")

``photos``: HxWx3 uint8 RGB arrays (numpy, or torch tensors on the host or the device); ``image_index[i]``:
the photo of face i; ``landmarks``: (N, 68, 2) dlib points in source pixels. Returns an
(N, output_size, output_size, 3) uint8 tensor on ``device``.

The procedure is NVlabs' ffhq-dataset ``recreate_aligned_images`` (rotate_level=True, no random shift): the quad
from the landmarks, the Lanczos shrink of large faces, the crop, the reflect padding with blur and median blend,
the bilinear QUAD transform to ``transform_size`` and the Lanczos resize to ``output_size``. The geometry (quads,
crop boxes) is models/alignment/ffhq_geometry.py, the one copy the Pillow path uses too; the pixels are torch on
``device``, resampled as Pillow does (models/alignment/resample.py); the padding step is
models/alignment/ffhq_padding.py (its blur a float32 FFT convolution like the reference's own, so padded crops may
differ from it by one grey level where a value lies near .5). Every step runs once for all faces of a call (or per
group of padded faces of similar size, or per ``faces_per_chunk`` faces of the QUAD transform), except the Lanczos
shrink of large faces, one resize per shrunk face (each has a box of its own). The photos are read where they
lie when they are views of one buffer on the device (a chunk's upload).

The upright re-prediction of rolled faces (upright_landmarks_batch, and upright_landmarks for one face) takes
the 68-point predictor as a callable.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from ..kernel_check import use_kernels
from .device import photos_to_device, upload, upload_many
from .ffhq_geometry import (REGION_MARGIN, UPRIGHT_ABOVE, UPRIGHT_AGAIN_ABOVE, CropPlan, CropPlans, UprightGeometry,
                            fast_fft_len, ffhq_quads, plan_crops, upright_geometry)
from .ffhq_padding import _channel_median, _gaussian_blur, blur_pad_faces  # noqa: F401 (the tests' names)
from .flat_views import shared_flat, views_of
from .resample import (ImageSources, affine_positions, affine_sample_regions, bilinear_sample, check_quad_kernel,
                       lanczos_resize, quad_sample)

__all__ = ["crop_faces", "eye_rolls_degrees", "regions_to_source", "upright_region", "upright_regions",
           "upright_landmarks", "upright_landmarks_batch"]


# -- the batch ---------------------------------------------------------------------------------------------------

def crop_faces(
    photos: Sequence,
    image_index: Sequence[int],
    landmarks,
    output_size: int = 256,
    transform_size: int = 1024,
    enable_padding: bool = True,
    device=None,
    faces_per_chunk: int | None = None,
    plans: Sequence[CropPlan] | CropPlans | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """FFHQ crops of faces with ``landmarks`` (N, 68, 2) in ``photos[image_index[i]]``: (N, output_size,
    output_size, 3) uint8 on ``device`` (default: the first photo's device). Photos that are views of one buffer
    on ``device`` (a chunk's upload) are read there; others are copied into one buffer first. The QUAD transform
    and the final resize run ``faces_per_chunk`` faces at a time: by default 32 where the QUAD transform is its
    Triton kernel (about 20 * transform_size^2 bytes a face in flight, the resize's), else 8 (the torch path's
    float64 intermediates take about 150 * transform_size^2 bytes a face). ``plans``: precomputed :func:`plan_crop` (or :func:`plan_crops`) results, otherwise made from the
    landmarks. ``use_triton``: the QUAD transform's kernel (see models/kernel_check.py). Nothing is read back
    to the host."""
    if device is None:
        device = photos[0].device if len(photos) and isinstance(photos[0], torch.Tensor) else "cpu"
    device = torch.device(device)
    shared = shared_flat(photos)
    flat, starts, sizes = (shared if shared is not None and shared[0].device == device
                           else photos_to_device(photos, device))
    image_index = np.asarray(image_index, dtype=np.int64).reshape(-1)
    face_starts = np.asarray(starts, dtype=np.int64).reshape(-1)[image_index]
    face_sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)[image_index]
    if plans is None:
        lm = np.asarray(landmarks, dtype=np.float64).reshape(-1, 68, 2)
        if len(lm) != len(image_index):
            raise ValueError(f"{len(lm)} landmark sets for {len(image_index)} image indices")
        quads, qsizes = ffhq_quads(lm)
        plans = plan_crops(quads, qsizes, face_sizes, output_size, transform_size, enable_padding)
    elif not isinstance(plans, CropPlans):
        plans = CropPlans.from_list(plans)
    n = len(plans)
    if n == 0:
        return torch.empty((0, output_size, output_size, 3), dtype=torch.uint8, device=device)
    if faces_per_chunk is None:
        faces_per_chunk = 32 if use_kernels("quad", device, use_triton, check_quad_kernel) else 8

    # Where each face's QUAD transform samples: the photo buffer for a crop that is a window of its photo; the
    # shrunk photos' buffer for a shrunk crop (each made by its own Lanczos resize: a box of its own); a group
    # of padded canvases for a padded crop (made by blur_pad_faces from either, a few groups in all).
    shrunk = np.flatnonzero(plans.shrink > 1)
    padded = plans.padded
    crop_w, crop_h = plans.crop[:, 2] - plans.crop[:, 0], plans.crop[:, 3] - plans.crop[:, 1]
    base = face_starts + plans.crop[:, 1] * face_sizes[:, 0] + plans.crop[:, 0]
    stride = face_sizes[:, 0].copy()
    shrunk_buffer = None
    if len(shrunk):
        regions = [_shrink(flat, int(face_starts[i]), face_sizes[i], plans[i]) for i in shrunk]
        shrunk_buffer = torch.cat(regions)
        base[shrunk] = np.concatenate([[0], np.cumsum([len(r) for r in regions])[:-1]])
        stride[shrunk] = crop_w[shrunk]
    segments = []   # (buffer, its faces, their base rows and row strides in it)
    plain = np.flatnonzero(~padded & (plans.shrink == 1))
    shrunk_plain = np.flatnonzero(~padded & (plans.shrink > 1))
    segments += [(flat, plain, base[plain], stride[plain]), (shrunk_buffer, shrunk_plain, base[shrunk_plain],
                                                            stride[shrunk_plain])]
    for buffer, faces in ((flat, np.flatnonzero(padded & (plans.shrink == 1))),
                          (shrunk_buffer, np.flatnonzero(padded & (plans.shrink > 1)))):
        if len(faces):
            groups = blur_pad_faces(buffer, base[faces], stride[faces], np.stack([crop_w, crop_h], 1)[faces],
                                    plans.pad[faces], plans.blur_sigma[faces])
            segments += [(g.flat, faces[g.faces], g.base, g.stride) for g in groups]
    segments = [seg for seg in segments if len(seg[1])]

    # All faces' tables uploaded at once, in the segments' order.
    order = np.concatenate([faces for _, faces, _, _ in segments])
    canvas = plans.canvas_size[order]
    where, coeffs = upload_many([np.stack([np.concatenate([b for _, _, b, _ in segments]),
                                           np.concatenate([st for _, _, _, st in segments]), canvas[:, 0],
                                           canvas[:, 1]]), plans.transform[order]], device)
    crops = []
    first = 0
    for buffer, faces, _, _ in segments:
        for c in range(first, first + len(faces), faces_per_chunk):
            chunk = slice(c, min(c + faces_per_chunk, first + len(faces)))
            warped = quad_sample(buffer, ImageSources(*where[:, chunk]), coeffs[chunk], transform_size, use_triton)
            if output_size < transform_size:
                warped = lanczos_resize(warped, (output_size, output_size))
            crops.append(warped)
        first += len(faces)
    crops = torch.cat(crops)
    if (order == np.arange(n)).all():
        return crops
    out = torch.empty_like(crops)
    out[upload(order, device)] = crops
    return out


def _shrink(flat: torch.Tensor, start: int, size, plan: CropPlan) -> torch.Tensor:
    """A shrunk face's crop, (h * w, 3) uint8: its photo (at ``start`` of ``flat``, ``size`` (w, h)) resized by
    Lanczos from plan_crop's shrink box to the crop's size."""
    w, h = (int(v) for v in size)
    photo = flat[start : start + w * h].view(h, w, 3)
    x0, y0, x1, y1 = plan.crop
    return lanczos_resize(photo[None], (x1 - x0, y1 - y0), plan.shrink_box)[0].reshape(-1, 3)


# -- upright re-prediction of rolled faces ------------------------------------------------------------------------

def upright_region(photo: torch.Tensor, box, roll: float, margin: float = REGION_MARGIN):
    """The upright region (``upright_geometry``) of an (H, W, 3) uint8 photo, sampled as Pillow's bilinear
    AFFINE transform does. Returns (region (ny, nx, 3) uint8 on the photo's device, the box in the region,
    to_source), ``to_source`` mapping (n, 2) region points back to the photo."""
    g = upright_geometry(box, roll, margin)
    nx, ny = g.size
    H, W = int(photo.shape[0]), int(photo.shape[1])
    where = upload(np.array([[0], [W], [W], [H]], dtype=np.int64), photo.device)
    region = bilinear_sample(photo.reshape(-1, 3), ImageSources(*where), *affine_positions(g.affine, nx, ny, photo.device))[0]
    return region, g.box, g.to_source


def upright_regions(photos: Sequence[torch.Tensor], geometry: Sequence[UprightGeometry]) -> list[torch.Tensor]:
    """:func:`upright_region` of many faces at once: region i (``geometry[i]``, from ``upright_geometry``) of
    ``photos[i]`` (a photo repeats for its faces), all sampled in one pass into one buffer on the photos' device.
    Returns the regions as (ny, nx, 3) views of that buffer (the predictor reads them where they lie). Photos
    that are views of one buffer (a chunk's upload) are read there; others are copied into one first."""
    if not geometry:
        return []
    shared = shared_flat(photos)
    flat, starts, sizes = shared if shared is not None else photos_to_device(photos, photos[0].device)
    src = ImageSources(*upload(np.array([starts, [w for w, _ in sizes], [w for w, _ in sizes],
                                         [h for _, h in sizes]], dtype=np.int64), flat.device))
    region_sizes = np.array([g.size for g in geometry], dtype=np.int64)
    pixels = affine_sample_regions(flat, src, np.array([g.affine for g in geometry], dtype=np.float64), region_sizes)
    region_starts = np.concatenate([[0], np.cumsum(region_sizes[:, 0] * region_sizes[:, 1])[:-1]])
    return views_of(pixels, region_starts.tolist(), [tuple(s) for s in region_sizes.tolist()])


def regions_to_source(geometry: Sequence[UprightGeometry], points) -> np.ndarray:
    """Each ``geometry[i].to_source`` of ``points[i]`` ((n, 2) region points each) at once: (N, n, 2) float64,
    the same float64 operations in the same order."""
    c, s = (np.array([g.cos_sin[k] for g in geometry])[:, None] for k in (0, 1))
    hx, hy = (np.array([g.half[k] for g in geometry])[:, None] for k in (0, 1))
    cx, cy = (np.array([g.centre[k] for g in geometry])[:, None] for k in (0, 1))
    p = np.asarray(points, dtype=np.float64)
    dx, dy = p[:, :, 0] - hx, p[:, :, 1] - hy
    return np.stack([c * dx - s * dy + cx, s * dx + c * dy + cy], axis=2)


def eye_rolls_degrees(landmarks) -> list[float]:
    """``eye_roll_degrees`` of each face of (N, 68, 2) landmarks: the eyes' centres for all faces at once, the
    angle by the same math.atan2 (its last bits decide the upright region's samples)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    d = lm[:, 42:48].mean(axis=1) - lm[:, 36:42].mean(axis=1)
    return [math.degrees(math.atan2(dy, dx)) for dx, dy in d.tolist()]


Predictor = Callable[[torch.Tensor, tuple], np.ndarray]
# predict_many(images, boxes): one box per image, (68, 2) points per image; one call for many faces.
PredictMany = Callable[[list, list], list]


def upright_landmarks(photo: torch.Tensor, box, predict: Predictor, upright_above: float = UPRIGHT_ABOVE,
                      first: np.ndarray | None = None) -> np.ndarray:
    """68 landmarks of the face in ``box``, re-predicted upright when the eyes are rolled by more than
    ``upright_above`` degrees (pipeline.detect.FaceDetector.landmarks' procedure): :func:`upright_landmarks_batch`
    for one face.

    ``predict(image, box)``: a 68-point predictor on an (H, W, 3) uint8 tensor and an (x0, y0, x1, y1) box,
    returning (68, 2) points; ``first``: its answer on ``photo`` when already known.

    models.alignment.landmarks.ShapePredictor takes dlib rectangles (inclusive corners), as the CPU path rounds them:
        def predict(image, box):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            return sp.predict([image], [[(x0, y0, x1 - 1, y1 - 1)]])[0][0]
    (with it, the 30 rolled and varied test faces gave the CPU path's quads exactly)."""
    def predict_many(images, boxes):
        return [predict(image, b) for image, b in zip(images, boxes)]

    return upright_landmarks_batch([photo], [box], predict_many, upright_above,
                                   None if first is None else [first])[0]


def upright_landmarks_batch(photos: Sequence[torch.Tensor], boxes: Sequence, predict_many: PredictMany,
                            upright_above: float = UPRIGHT_ABOVE, first: Sequence[np.ndarray] | None = None
                            ) -> list[np.ndarray]:
    """68 landmarks (float64) of face i in ``boxes[i]`` of ``photos[i]`` (a photo repeats for its faces), each
    re-predicted upright when its eyes are rolled by more than ``upright_above`` degrees.

    A rolled face is predicted again on its :func:`upright_region`, and once more when that changed the roll
    by over UPRIGHT_AGAIN_ABOVE degrees (a badly rolled first prediction misjudges the roll too). Each round is
    one ``predict_many`` call over all its faces, their regions sampled together into one buffer
    (:func:`upright_regions`) and mapped back together (:func:`regions_to_source`): the host reads the points
    once per round, to decide the next. On a GPU a call costs about the same whatever its size. ``first``: the faces' first predictions
    when already known (otherwise one ``predict_many`` call on the photos makes them). A face's points do not
    depend on the others in a call, so each equals its own :func:`upright_landmarks`."""
    if len(photos) != len(boxes):
        raise ValueError(f"{len(photos)} photos for {len(boxes)} boxes")
    if not len(photos):
        return []
    found = predict_many(list(photos), list(boxes)) if first is None else first
    lm = np.array(found, dtype=np.float64).reshape(len(photos), -1, 2)
    roll = eye_rolls_degrees(lm) if len(lm) else []

    def predict_upright(faces: list[int], angles: list[float]) -> np.ndarray:
        geometry = [upright_geometry(boxes[i], a, REGION_MARGIN) for i, a in zip(faces, angles)]
        regions = upright_regions([photos[i] for i in faces], geometry)
        return regions_to_source(geometry, predict_many(regions, [g.box for g in geometry]))

    todo = [i for i, r in enumerate(roll) if abs(r) > upright_above]
    again = []
    if todo:
        lm[todo] = predict_upright(todo, [roll[i] for i in todo])
        again = [(i, r2) for i, r2 in zip(todo, eye_rolls_degrees(lm[todo])) if abs(r2 - roll[i]) > UPRIGHT_AGAIN_ABOVE]
    if again:
        lm[[i for i, _ in again]] = predict_upright([i for i, _ in again], [r for _, r in again])
    return list(lm)
