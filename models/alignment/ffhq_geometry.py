"""The FFHQ geometry (NVlabs' ffhq-dataset ``recreate_aligned_images``, rotate_level=True, no random shift): the
oriented crop square from 68 landmarks, the shrink, crop box and padding of a face, Pillow's QUAD coefficients,
and the upright region of a rolled face. numpy float64 on the host, the one copy both alignment backends use
(pipeline/crop.py with Pillow, models/alignment/ffhq_crop.py with torch), so their numbers are the same floats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["REGION_MARGIN", "UPRIGHT_ABOVE", "UPRIGHT_AGAIN_ABOVE", "ffhq_quad", "ffhq_quads", "CropPlan",
           "crop_and_pad", "plan_crop", "CropPlans", "plan_crops", "eye_roll_degrees", "UprightGeometry", "upright_geometry", "fast_fft_len"]

# Margin (fraction of the box side) around the face box in the upright copy (both paths). The predictor reads
# pixels outside its box: on 21 rolled test faces margins of 0.2 to 1.0 give identical landmarks, 0.1 moves
# some by up to 13 px.
REGION_MARGIN = 0.25
# Eye-line tilt (degrees) above which a face's landmarks are predicted again on an upright copy of its region
# (dlib's predictor does not reach faces rolled much more than ~20 degrees), and the change of tilt after that
# prediction above which it is made once more (a badly rolled first prediction misjudges the roll too).
UPRIGHT_ABOVE = 10.0
UPRIGHT_AGAIN_ABOVE = 5.0


# -- the crop square ---------------------------------------------------------------------------------------------

def ffhq_quads(landmarks) -> tuple[np.ndarray, np.ndarray]:
    """Oriented crop squares (N, 4, 2) and their sides (N,) from (N, 68, 2) landmarks, float64, in the FFHQ
    procedure's order of operations."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (68, 2):
        raise ValueError(f"expected (N, 68, 2) landmarks, got {lm.shape}")
    eye_left = np.mean(lm[:, 36:42], axis=1)
    eye_right = np.mean(lm[:, 42:48], axis=1)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[:, 48] + lm[:, 54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - eye_to_mouth[:, ::-1] * [-1, 1]
    x /= np.hypot(x[:, 0], x[:, 1])[:, None]
    x *= np.maximum(np.hypot(eye_to_eye[:, 0], eye_to_eye[:, 1]) * 2.0,
                    np.hypot(eye_to_mouth[:, 0], eye_to_mouth[:, 1]) * 1.8)[:, None]
    y = x[:, ::-1] * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quads = np.stack([c - x - y, c - x + y, c + x + y, c + x - y], axis=1)
    return quads, np.hypot(x[:, 0], x[:, 1]) * 2


def ffhq_quad(landmarks) -> tuple[np.ndarray, float]:
    """Oriented crop square (4x2, float64) and its side length from one face's 68 landmarks: ffhq_quads of one."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {lm.shape}")
    quads, sides = ffhq_quads(lm[None])
    return quads[0], float(sides[0])


@dataclass(frozen=True)
class CropPlan:
    """Where one face's FFHQ crop comes from (the reference's intermediate numbers).

    shrink: the integer Lanczos downscale (1: none); shrink_box: the source region (float, Pillow's ``box``)
    resized to the crop's size when shrinking. crop: (x0, y0, x1, y1) in the (shrunk) photo. pad: (left,
    top, right, bottom) reflect padding around the crop, all 0 when the padding step does not run.
    blur_sigma: the padding blur. quad: the corners in the padded crop's pixels. transform: Pillow's eight
    QUAD coefficients for a transform_size output."""

    shrink: int
    shrink_box: tuple | None
    crop: tuple
    pad: tuple
    blur_sigma: float
    quad: np.ndarray
    transform: tuple

    @property
    def padded(self) -> bool:
        return max(self.pad) > 0

    @property
    def canvas_size(self) -> tuple[int, int]:
        """(w, h) of the image the QUAD transform samples: the crop plus its padding."""
        x0, y0, x1, y1 = self.crop
        return (x1 - x0 + self.pad[0] + self.pad[2], y1 - y0 + self.pad[1] + self.pad[3])


def crop_and_pad(quad: np.ndarray, qsize: float, size: tuple[int, int]) -> tuple[tuple, tuple, int]:
    """The FFHQ procedure's crop box (x0, y0, x1, y1) of an image of ``size`` (w, h), the padding (left, top,
    right, bottom) the quad still needs beyond it, and the border, for a quad in that image's pixels (after
    any shrink). The padding step runs when ``max(pad) > border - 4``."""
    border = max(int(np.rint(qsize * 0.1)), 3)
    qx0, qy0 = int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1])))
    qx1, qy1 = int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1])))
    crop = (max(qx0 - border, 0), max(qy0 - border, 0), min(qx1 + border, size[0]), min(qy1 + border, size[1]))
    if crop[2] <= crop[0] or crop[3] <= crop[1]:
        crop = (0, 0, size[0], size[1])
    cw, ch = crop[2] - crop[0], crop[3] - crop[1]
    pad = (max(crop[0] - qx0 + border, 0), max(crop[1] - qy0 + border, 0), max(qx1 - crop[0] - cw + border, 0),
           max(qy1 - crop[1] - ch + border, 0))
    return crop, pad, border


def _quad_transform_coefficients(quad: np.ndarray, size: int) -> tuple:
    """Pillow's Image.transform(QUAD) data for corners ``quad`` (index coordinates) and a size^2 output."""
    nw, sw, se, ne = (tuple(float(v) for v in p) for p in quad + 0.5)
    x0, y0 = nw
    As = 1.0 / size
    At = 1.0 / size
    return (x0, (ne[0] - x0) * As, (sw[0] - x0) * At, (se[0] - sw[0] - ne[0] + x0) * As * At,
            y0, (ne[1] - y0) * As, (sw[1] - y0) * At, (se[1] - sw[1] - ne[1] + y0) * As * At)


def plan_crop(quad, qsize: float, image_size: tuple[int, int], output_size: int, transform_size: int,
              enable_padding: bool = True) -> CropPlan:
    """The reference ffhq_crop's shrink, crop box, padding and final quad for one face of a photo of
    ``image_size`` (w, h), in its order of operations."""
    quad = np.array(quad, dtype=np.float64)
    qsize = float(qsize)
    W, H = image_size
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        size = (int(np.rint(float(W) / shrink)), int(np.rint(float(H) / shrink)))
        quad /= shrink
        qsize /= shrink
    else:
        shrink, size = 1, (W, H)
    crop, pad, border = crop_and_pad(quad, qsize, size)
    shrink_box = None
    if shrink > 1:
        sx, sy = W / size[0], H / size[1]
        shrink_box = (crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy)
    quad -= crop[0:2]
    if enable_padding and max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        quad += pad[:2]
        pad = tuple(int(p) for p in pad)
    else:
        pad = (0, 0, 0, 0)
    transform = _quad_transform_coefficients(quad, transform_size)
    return CropPlan(shrink, shrink_box, crop, pad, qsize * 0.02, quad, transform)


@dataclass(frozen=True)
class CropPlans:
    """plan_crop's numbers for many faces, as arrays (face i's CropPlan is ``plans[i]``); shrink_box is NaN
    where a face is not shrunk."""

    shrink: np.ndarray      # (N,) int64
    shrink_box: np.ndarray  # (N, 4) float64
    crop: np.ndarray        # (N, 4) int64
    pad: np.ndarray         # (N, 4) int64
    blur_sigma: np.ndarray  # (N,) float64
    quad: np.ndarray        # (N, 4, 2) float64
    transform: np.ndarray   # (N, 8) float64

    def __len__(self) -> int:
        return len(self.shrink)

    def __getitem__(self, i: int) -> CropPlan:
        shrunk = self.shrink[i] > 1
        return CropPlan(int(self.shrink[i]), tuple(float(v) for v in self.shrink_box[i]) if shrunk else None,
                        tuple(int(v) for v in self.crop[i]), tuple(int(v) for v in self.pad[i]),
                        float(self.blur_sigma[i]), self.quad[i].copy(), tuple(float(v) for v in self.transform[i]))

    @property
    def padded(self) -> np.ndarray:
        return self.pad.max(axis=1) > 0

    @property
    def canvas_size(self) -> np.ndarray:
        """(N, 2) (w, h) of the images the QUAD transform samples: the crops plus their padding."""
        return np.stack([self.crop[:, 2] - self.crop[:, 0] + self.pad[:, 0] + self.pad[:, 2],
                         self.crop[:, 3] - self.crop[:, 1] + self.pad[:, 1] + self.pad[:, 3]], axis=1)

    @classmethod
    def from_list(cls, plans) -> "CropPlans":
        nan_box = (math.nan,) * 4
        return cls(np.array([p.shrink for p in plans], dtype=np.int64).reshape(-1),
                   np.array([p.shrink_box or nan_box for p in plans], dtype=np.float64).reshape(-1, 4),
                   np.array([p.crop for p in plans], dtype=np.int64).reshape(-1, 4),
                   np.array([p.pad for p in plans], dtype=np.int64).reshape(-1, 4),
                   np.array([p.blur_sigma for p in plans], dtype=np.float64).reshape(-1),
                   np.array([p.quad for p in plans], dtype=np.float64).reshape(-1, 4, 2),
                   np.array([p.transform for p in plans], dtype=np.float64).reshape(-1, 8))


def plan_crops(quads, qsizes, image_sizes, output_size: int, transform_size: int,
               enable_padding: bool = True) -> CropPlans:
    """plan_crop of every face at once (``image_sizes``: (N, 2) (w, h) of each face's photo): the same float64
    operations in the same order on arrays, so every number equals plan_crop's."""
    quad = np.array(quads, dtype=np.float64).reshape(-1, 4, 2)
    qsize = np.array(qsizes, dtype=np.float64).reshape(-1)
    W, H = (np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)[:, k] for k in (0, 1))
    shrink = np.floor(qsize / output_size * 0.5).astype(np.int64)
    shrunk = shrink > 1
    shrink = np.where(shrunk, shrink, 1)
    size_w = np.where(shrunk, np.rint(W / shrink), W).astype(np.int64)
    size_h = np.where(shrunk, np.rint(H / shrink), H).astype(np.int64)
    quad = quad / shrink[:, None, None]   # (x / 1 is x: unshrunk faces keep their numbers)
    qsize = qsize / shrink
    # crop_and_pad
    border = np.maximum(np.rint(qsize * 0.1).astype(np.int64), 3)
    qx0, qy0 = (np.floor(quad[:, :, k].min(axis=1)).astype(np.int64) for k in (0, 1))
    qx1, qy1 = (np.ceil(quad[:, :, k].max(axis=1)).astype(np.int64) for k in (0, 1))
    crop = np.stack([np.maximum(qx0 - border, 0), np.maximum(qy0 - border, 0), np.minimum(qx1 + border, size_w),
                     np.minimum(qy1 + border, size_h)], axis=1)
    empty = (crop[:, 2] <= crop[:, 0]) | (crop[:, 3] <= crop[:, 1])
    crop[empty] = np.stack([np.zeros_like(size_w), np.zeros_like(size_h), size_w, size_h], axis=1)[empty]
    cw, ch = crop[:, 2] - crop[:, 0], crop[:, 3] - crop[:, 1]
    pad = np.stack([np.maximum(crop[:, 0] - qx0 + border, 0), np.maximum(crop[:, 1] - qy0 + border, 0),
                    np.maximum(qx1 - crop[:, 0] - cw + border, 0), np.maximum(qy1 - crop[:, 1] - ch + border, 0)],
                   axis=1)
    # the shrink's source box, the quad in the crop, the padding
    sx, sy = W / size_w, H / size_h
    shrink_box = np.where(shrunk[:, None], np.stack([crop[:, 0] * sx, crop[:, 1] * sy, crop[:, 2] * sx,
                                                     crop[:, 3] * sy], axis=1), math.nan)
    quad = quad - crop[:, None, 0:2]
    padded = (pad.max(axis=1) > border - 4) if enable_padding else np.zeros(len(pad), dtype=bool)
    pad = np.where(padded[:, None], np.maximum(pad, np.rint(qsize * 0.3).astype(np.int64)[:, None]), 0)
    quad = np.where(padded[:, None, None], quad + pad[:, None, :2], quad)
    # _quad_transform_coefficients
    nw, sw, se, ne = (quad[:, k] + 0.5 for k in range(4))
    x0, y0 = nw[:, 0], nw[:, 1]
    As = At = 1.0 / transform_size
    transform = np.stack([x0, (ne[:, 0] - x0) * As, (sw[:, 0] - x0) * At, (se[:, 0] - sw[:, 0] - ne[:, 0] + x0) * As * At,
                          y0, (ne[:, 1] - y0) * As, (sw[:, 1] - y0) * At, (se[:, 1] - sw[:, 1] - ne[:, 1] + y0) * As * At],
                         axis=1)
    return CropPlans(shrink, shrink_box, crop, pad, qsize * 0.02, quad, transform)


# -- the padding blur's FFT sizes --------------------------------------------------------------------------------

def fast_fft_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: a fast FFT size for the padding step's blur (both backends)."""
    best = 1 << max(n - 1, 0).bit_length()
    f5 = 1
    while f5 < best:
        f35 = f5
        while f35 < best:
            m = f35
            while m < n:
                m *= 2
            best = min(best, m)
            f35 *= 3
        f5 *= 5
    return best


# -- upright regions of rolled faces ----------------------------------------------------------------------------

def eye_roll_degrees(lm) -> float:
    """Angle of the line from the left eye's centre to the right eye's (image axes, y down)."""
    lm = np.asarray(lm, dtype=np.float64)
    d = lm[42:48].mean(axis=0) - lm[36:42].mean(axis=0)
    return math.degrees(math.atan2(d[1], d[0]))


@dataclass(frozen=True)
class UprightGeometry:
    """The region around a face box turned by ``roll`` degrees about the box centre (eyes level): its size
    (nx, ny), the box inside it, Pillow's AFFINE data that samples it from the photo, and the way back."""
    size: tuple[int, int]
    box: tuple[float, float, float, float]
    affine: tuple[float, ...]
    centre: tuple[float, float]
    half: tuple[float, float]
    cos_sin: tuple[float, float]

    def to_source(self, points) -> np.ndarray:
        """(n, 2) region points (index coordinates) -> photo points."""
        (c, s), (hx, hy), (cx, cy) = self.cos_sin, self.half, self.centre
        d = np.asarray(points, dtype=np.float64) - (hx, hy)
        return np.column_stack([c * d[:, 0] - s * d[:, 1] + cx, s * d[:, 0] + c * d[:, 1] + cy])


def upright_geometry(box, roll: float, margin: float = REGION_MARGIN) -> UprightGeometry:
    """Index coordinates throughout (pixel i's centre at i; Pillow's at i + 0.5). Used by the CPU path
    (pipeline/detect.py, Pillow) and ``upright_region`` (models/alignment/ffhq_crop.py, torch)."""
    x0, y0, x1, y1 = (float(round(v)) for v in box)
    bw, bh = x1 - x0, y1 - y0
    cx, cy = (x0 + x1 - 1) / 2.0, (y0 + y1 - 1) / 2.0
    # The region is the box plus a margin m on every side, so the box lands on whole pixels there with its own
    # size (the predictor's output moves with a pixel of box size).
    m = int(math.ceil(margin * max(bw, bh)))
    nx, ny = int(bw) + 2 * m, int(bh) + 2 * m
    hx, hy = (nx - 1) / 2.0, (ny - 1) / 2.0
    t = math.radians(roll)
    c, s = math.cos(t), math.sin(t)
    # Pillow AFFINE data: source = R @ (out - (hx, hy)) + centre in pixel-edge coordinates, R turning the
    # output's x axis onto the eye line.
    a = (c, -s, cx + 0.5 - c * (hx + 0.5) + s * (hy + 0.5), s, c, cy + 0.5 - s * (hx + 0.5) - c * (hy + 0.5))
    return UprightGeometry((nx, ny), (float(m), float(m), float(m + bw), float(m + bh)), a, (cx, cy), (hx, hy), (c, s))
