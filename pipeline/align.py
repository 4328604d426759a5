"""FFHQ face alignment with dlib: detection, 68-point landmarks, the FFHQ crop, and its inverse.

    from pipeline.align import align_faces
    faces = align_faces(image, output_size=256, transform_size=1024, policy="largest")

``image`` is an HxWx3 uint8 RGB array. The result is a list (empty when no face qualifies) of
:class:`AlignedFace` records: ``.image`` (output_size x output_size x 3 uint8), ``.landmarks`` (68x2,
source-pixel coordinates), ``.quad`` (4x2, the oriented crop square in source pixels, corners in the
order top-left, bottom-left, bottom-right, top-right of the aligned image), ``.box`` (x0, y0, x1, y1)
and ``.score`` from the detector.

The crop is NVlabs' ffhq-dataset ``recreate_aligned_images`` procedure (rotate_level=True, no random
shift). Deviations are only in how the same numbers are computed:
  * the Lanczos shrink resizes only the region that the crop keeps (Pillow's ``box=`` argument, which
    gives the same pixels as resizing the whole photo and cropping);
  * scipy.ndimage.gaussian_filter (mode 'reflect', truncate 4.0) is reimplemented with numpy/torch,
    accumulating in float64 and storing float32 after each axis, as scipy does;
  * the padding step's blur, median blend and blur blend are evaluated only on the edge band where the
    blend weights are > 0 (the blends leave the other pixels unchanged), the blends in float32.

Speed: the HOG detector runs on a copy downscaled to ``detect_max_side``; the boxes are mapped back and
the landmarks are predicted on the full-resolution photo. dlib's upsampling is used only when no
qualifying face was found and a face too small to be seen at the current scale could still be at
least ``min_face_size``.
"""
from __future__ import annotations

import importlib.util
import math
import os
import threading
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = [
    "AlignedFace",
    "FaceAligner",
    "align_faces",
    "ffhq_quad",
    "ffhq_crop",
    "crop_and_pad",
    "paste_back",
    "gaussian_blur_hw",
    "find_landmark_model",
    "get_aligner",
    "pick_largest",
    "POLICIES",
]

POLICIES = ("largest", "all")
LANDMARK_MODEL_ENV = "E2STYLE_LANDMARK_MODEL"
LANDMARK_MODEL_NAME = "shape_predictor_68_face_landmarks.dat"
# dlib's frontal HOG detector scans an 80x80 window: smaller faces are not found at a given scale.
HOG_MIN_FACE = 80
# Side of a detection rectangle (dlib's right - left + 1) at the pyramid level where the detector found it.
HOG_WINDOW = 73


# ----------------------------------------------------------------------------------------------------
# Records


@dataclass
class AlignedFace:
    image: np.ndarray  # (output_size, output_size, 3) uint8
    landmarks: np.ndarray  # (68, 2) float64, source-pixel coordinates
    quad: np.ndarray  # (4, 2) float64, source-pixel coordinates
    box: tuple  # (x0, y0, x1, y1) detector box in source pixels
    score: float  # detector score
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Model files


def find_landmark_model(path: str | None = None) -> str:
    """Path of dlib's 68-point shape predictor.

    Order: ``path`` argument, environment variable ``E2STYLE_LANDMARK_MODEL``, then the
    ``face-recognition-models`` package, located without importing it (its __init__ needs pkg_resources,
    which setuptools >= 82 no longer ships).
    """
    candidates = []
    if path:
        candidates.append(path)
    elif os.environ.get(LANDMARK_MODEL_ENV):
        candidates.append(os.environ[LANDMARK_MODEL_ENV])
    else:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is not None and spec.submodule_search_locations:
            candidates.append(os.path.join(list(spec.submodule_search_locations)[0], "models", LANDMARK_MODEL_NAME))
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(
        f"{LANDMARK_MODEL_NAME} not found (tried {candidates or 'nothing'}); install face-recognition-models "
        f"or set {LANDMARK_MODEL_ENV}"
    )


# ----------------------------------------------------------------------------------------------------
# Gaussian blur equal to scipy.ndimage.gaussian_filter(img, [s, s, 0]) (mode 'reflect', truncate 4.0)


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) * float(sigma)) * x * x)
    return phi / phi.sum()


def _blur_axis(a: np.ndarray, axis: int, w: np.ndarray, exact: bool) -> np.ndarray:
    """Correlate float32 HxWxC ``a`` with symmetric 1-D kernel ``w`` along axis 0 or 1 with scipy 'reflect'
    borders, through an FFT. exact=True: float64 (equal to scipy to ~1e-12); False: float32 FFT in torch,
    about 3x faster, off by at most ~1e-3 of a grey level."""
    r = (len(w) - 1) // 2
    n_in = a.shape[axis]
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="symmetric")  # numpy 'symmetric' == scipy 'reflect' (d c b a | a b c d)
    nfft = _fast_len(p.shape[axis])
    # y[m] = sum_j w[j] p[m - j]; output pixel i is m = i + 2r (no wrap-around since nfft >= len(p)).
    if exact:
        shape = [1] * a.ndim
        shape[axis] = -1
        fp = np.fft.rfft(p.astype(np.float64), nfft, axis=axis)
        y = np.fft.irfft(fp * np.fft.rfft(w, nfft).reshape(shape), nfft, axis=axis)
        out = np.take(y, np.arange(2 * r, 2 * r + n_in), axis=axis)
        return out.astype(np.float32)
    import torch

    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(p, axis, -1)))
    fw = torch.fft.rfft(torch.from_numpy(w.astype(np.float32)), nfft)
    y = torch.fft.irfft(torch.fft.rfft(t, nfft, dim=-1) * fw, nfft, dim=-1)[..., 2 * r : 2 * r + n_in]
    return np.ascontiguousarray(np.moveaxis(y.numpy(), -1, axis))


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (fast FFT size)."""
    best = 1 << max(int(n - 1).bit_length(), 0)
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


def gaussian_blur_hw(img: np.ndarray, sigma: float, truncate: float = 4.0, exact: bool = False) -> np.ndarray:
    """scipy.ndimage.gaussian_filter(img, [sigma, sigma, 0]) for a float32 HxWxC array (float32 out).

    Axis 0 first, then axis 1, float32 between them, as scipy does."""
    a = np.asarray(img, dtype=np.float32)
    if sigma <= 1e-15:
        return a.copy()
    w = _gaussian_kernel(sigma, truncate)
    if not exact:
        return _blur_hw_torch(a, w)
    return _blur_axis(_blur_axis(a, 0, w, exact), 1, w, exact)


def _blur_hw_torch(a: np.ndarray, w: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
    """_blur_axis(_blur_axis(a, 0, w, False), 1, w, False) (the same float32 FFTs, same values) with fewer
    copies: each axis is padded (numpy 'symmetric') and laid out last in a single torch.cat, and the result
    is put back in HxWxC order once. ``rows``: only these rows of the result are computed and returned."""
    import torch

    r = (len(w) - 1) // 2

    def along_last(x):
        n = x.shape[-1]
        if r <= n:
            p = torch.cat([x[..., :r].flip(-1), x, x[..., n - r :].flip(-1)], dim=-1)
        else:
            p = torch.from_numpy(np.pad(x.numpy(), [(0, 0)] * (x.dim() - 1) + [(r, r)], mode="symmetric"))
        nfft = _fast_len(n + 2 * r)
        fw = torch.fft.rfft(torch.from_numpy(w.astype(np.float32)), nfft)
        return torch.fft.irfft(torch.fft.rfft(p, nfft, dim=-1) * fw, nfft, dim=-1)[..., 2 * r : 2 * r + n]

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # (H, W, C)
    y0 = along_last(t.permute(1, 2, 0))  # axis 0: (W, C, H)
    y1 = along_last(y0[..., rows].permute(2, 1, 0))  # axis 1: (H, C, W)
    return y1.permute(0, 2, 1).contiguous().numpy()


# ----------------------------------------------------------------------------------------------------
# The FFHQ crop


def ffhq_quad(landmarks) -> tuple[np.ndarray, float]:
    """Oriented crop square (4x2, float64) and its side length from 68 landmarks (FFHQ procedure)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {lm.shape}")
    eye_left = np.mean(lm[36:42], axis=0)
    eye_right = np.mean(lm[42:48], axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    qsize = float(np.hypot(*x) * 2)
    return quad, qsize


def _as_rgb_uint8(image) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {a.shape}")
    return a


def _band_regions(wy: np.ndarray, wx: np.ndarray):
    """(row slice, col slice) pieces covering exactly the pixels where max(wy[y], wx[x]) > 0:
    full-width top/bottom strips and left/right strips between them (none overlap)."""
    h, w = len(wy), len(wx)
    ry, rx = np.flatnonzero(wy <= 0), np.flatnonzero(wx <= 0)
    # The weights are 0 on one contiguous interior interval (they fall, then rise again).
    if len(ry) == 0 or len(rx) == 0:
        return [(slice(0, h), slice(0, w))]
    y0, y1, x0, x1 = int(ry[0]), int(ry[-1]) + 1, int(rx[0]), int(rx[-1]) + 1
    regs = [(slice(0, y0), slice(0, w)), (slice(y1, h), slice(0, w)), (slice(y0, y1), slice(0, x0)), (slice(y0, y1), slice(x1, w))]
    return [(a, b) for a, b in regs if a.stop > a.start and b.stop > b.start]


def _blur_region(f: np.ndarray, ys: slice, xs: slice, w: np.ndarray, exact: bool) -> np.ndarray:
    """gaussian_blur_hw(f)[ys, xs] (to float rounding), computed from the block around it: the kernel
    radius r of context on each side; where the block reaches the image edge it reflects as the full blur
    does, and elsewhere outputs at least r from the block's edge do not see the block's own borders."""
    h, wd = f.shape[:2]
    r = (len(w) - 1) // 2
    a0, a1 = max(ys.start - r, 0), min(ys.stop + r, h)
    b0, b1 = max(xs.start - r, 0), min(xs.stop + r, wd)
    if not exact:
        return _blur_hw_torch(f[a0:a1, b0:b1], w, slice(ys.start - a0, ys.stop - a0))[:, xs.start - b0 : xs.stop - b0]
    t = _blur_axis(f[a0:a1, b0:b1], 0, w, exact)[ys.start - a0 : ys.stop - a0]
    return _blur_axis(t, 1, w, exact)[:, xs.start - b0 : xs.stop - b0]


def _median_hw(f: np.ndarray) -> np.ndarray:
    """np.median(f, axis=(0, 1)) for a float32 HxWxC array, one channel at a time (same values)."""
    n = f.shape[0] * f.shape[1]
    k = [n // 2 - 1, n // 2] if n % 2 == 0 else [n // 2]
    out = np.empty(f.shape[2], dtype=f.dtype)
    for c in range(f.shape[2]):
        part = f[:, :, c].flatten()  # always a copy: partitioned in place
        part.partition(k)
        out[c] = np.mean(part[k])
    return out


def _blur_pad_blend(f: np.ndarray, pad, sigma: float, exact: bool) -> None:
    """In place on the reflect-padded float32 image ``f``, the FFHQ padding step:

        mask = max(1 - min(x / pad[0], (w-1-x) / pad[2]), 1 - min(y / pad[1], (h-1-y) / pad[3]))
        f += (gaussian_filter(f, [sigma, sigma, 0]) - f) * clip(mask * 3 + 1, 0, 1)
        f += (median(f, axis=(0, 1)) - f) * clip(mask, 0, 1)

    Both blends change only pixels where their weight is > 0 (a band along the edges), so they, and the
    blur, are evaluated there only. The weights are computed in float64 as in the reference and the blends
    done in float32 in place with one ``lerp`` each (the reference multiplies in float64: rounding
    differences of ~1e-5 grey)."""
    import torch

    h, wd, _ = f.shape
    x = np.arange(wd)
    y = np.arange(h)
    mx = 1.0 - np.minimum(np.float32(x) / pad[0], np.float32(wd - 1 - x) / pad[2])
    my = 1.0 - np.minimum(np.float32(y) / pad[1], np.float32(h - 1 - y) / pad[3])
    ft = torch.from_numpy(f)

    def blend(wy: np.ndarray, wx: np.ndarray, targets) -> None:
        wy32, wx32 = torch.from_numpy(wy.astype(np.float32)), torch.from_numpy(wx.astype(np.float32))
        for (ys, xs), target in zip(_band_regions(wy, wx), targets):
            ft[ys, xs].lerp_(target, torch.maximum(wy32[ys, None, None], wx32[None, xs, None]))

    if sigma > 1e-15:
        wx, wy = np.clip(mx * 3.0 + 1.0, 0.0, 1.0), np.clip(my * 3.0 + 1.0, 0.0, 1.0)
        k = _gaussian_kernel(sigma)
        # Every strip is blurred before any is blended: the blur reads unblended neighbours.
        blurred = [torch.from_numpy(_blur_region(f, ys, xs, k, exact)) for ys, xs in _band_regions(wy, wx)]
        blend(wy, wx, blurred)
    med = torch.from_numpy(_median_hw(f))
    cx, cy = np.clip(mx, 0.0, 1.0), np.clip(my, 0.0, 1.0)
    blend(cy, cx, (med.expand(ys.stop - ys.start, xs.stop - xs.start, 3) for ys, xs in _band_regions(cy, cx)))


def crop_and_pad(quad: np.ndarray, qsize: float, size: tuple[int, int]) -> tuple[tuple, tuple, int]:
    """The FFHQ procedure's crop box (x0, y0, x1, y1) of an image of ``size`` (w, h), the padding (left, top,
    right, bottom) the quad still needs beyond it, and the border, for a quad in that image's pixels (after
    any shrink). The padding step runs when ``max(pad) > border - 4``."""
    border = max(int(np.rint(qsize * 0.1)), 3)
    qx0, qy0 = int(np.floor(min(quad[:, 0]))), int(np.floor(min(quad[:, 1])))
    qx1, qy1 = int(np.ceil(max(quad[:, 0]))), int(np.ceil(max(quad[:, 1])))
    crop = (max(qx0 - border, 0), max(qy0 - border, 0), min(qx1 + border, size[0]), min(qy1 + border, size[1]))
    if crop[2] <= crop[0] or crop[3] <= crop[1]:
        # The quad lies entirely outside the photo (only possible with made-up landmarks).
        crop = (0, 0, size[0], size[1])
    cw, ch = crop[2] - crop[0], crop[3] - crop[1]
    pad = (max(crop[0] - qx0 + border, 0), max(crop[1] - qy0 + border, 0), max(qx1 - crop[0] - cw + border, 0),
           max(qy1 - crop[1] - ch + border, 0))
    return crop, pad, border


def ffhq_crop(
    image,
    landmarks,
    output_size: int = 1024,
    transform_size: int = 4096,
    enable_padding: bool = True,
    quad: np.ndarray | None = None,
    qsize: float | None = None,
    exact_blur: bool = False,
) -> np.ndarray:
    """The FFHQ crop of ``image`` (HxWx3 uint8) for given 68 landmarks; returns output_size^2 x 3 uint8.

    Equals NVlabs' ``recreate_aligned_images`` (rotate_level=True, random_shift=0) to rounding.
    """
    img = _as_rgb_uint8(image)
    if quad is None or qsize is None:
        quad, qsize = ffhq_quad(landmarks)
    quad = np.array(quad, dtype=np.float64)
    qsize = float(qsize)
    H, W = img.shape[:2]

    # Shrink (Lanczos), restricted to the region the crop keeps.
    shrink = int(np.floor(qsize / output_size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(W) / shrink)), int(np.rint(float(H) / shrink)))
        quad /= shrink
        qsize /= shrink
        size = rsize
    else:
        size = (W, H)

    # Crop.
    crop, pad, border = crop_and_pad(quad, qsize, size)
    if shrink > 1:
        sx, sy = W / size[0], H / size[1]
        pil = Image.fromarray(np.ascontiguousarray(img), "RGB").resize(
            (crop[2] - crop[0], crop[3] - crop[1]),
            Image.Resampling.LANCZOS,
            box=(crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy),
        )
        arr = None
    else:
        arr = img[crop[1] : crop[3], crop[0] : crop[2]]
        pil = None
    quad -= crop[0:2]

    # Pad.
    if enable_padding and max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        src = np.asarray(pil) if arr is None else arr
        f = np.pad(np.float32(src), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        _blur_pad_blend(f, pad, qsize * 0.02, exact_blur)
        np.rint(f, out=f)
        np.clip(f, 0, 255, out=f)
        pil = Image.fromarray(f.astype(np.uint8), "RGB")
        quad += pad[:2]
    elif pil is None:
        pil = Image.fromarray(np.ascontiguousarray(arr), "RGB")

    # Transform.
    out = pil.transform(
        (transform_size, transform_size), Image.Transform.QUAD, tuple((quad + 0.5).flatten()), Image.Resampling.BILINEAR
    )
    if output_size < transform_size:
        out = out.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return np.asarray(out, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# Inverse


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
    src = _as_rgb_uint8(source_image)
    face = _as_rgb_uint8(aligned_face)
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


# ----------------------------------------------------------------------------------------------------
# Detection, landmarks, policies


def _rect_box(r) -> tuple:
    """dlib rectangle (inclusive corners) -> (x0, y0, x1, y1) floats, x1/y1 exclusive."""
    return (float(r.left()), float(r.top()), float(r.right() + 1), float(r.bottom() + 1))


def pick_largest(dets):
    """The ``largest`` policy's choice among detect()'s ((x0, y0, x1, y1), score) pairs.

    Weak detections (score below half the best one's) are not candidates: a face-like object (a badge, a
    pattern) scores far below a clear face and may have a larger box. dlib's boxes come in the sizes of its
    pyramid levels (a factor 1.2 apart; boxes found on one level differ by a pixel of rounding at most), so
    boxes within 10% of the largest side count as the same size and the best-scoring one among them wins;
    then position, for determinism."""
    side = lambda d: min(d[0][2] - d[0][0], d[0][3] - d[0][1])  # noqa: E731
    best = max(d[1] for d in dets)
    dets = [d for d in dets if d[1] >= 0.5 * best]
    top = max(side(d) for d in dets)
    tied = [d for d in dets if side(d) >= top / 1.1]
    return max(tied, key=lambda d: (d[1], side(d), -d[0][0], -d[0][1]))


# Margin (fraction of the box side) around the face box in the upright copy. The predictor reads pixels
# outside its box: on 21 rolled test faces margins of 0.2 to 1.0 give identical landmarks, 0.1 moves some by
# up to 13 px.
REGION_MARGIN = 0.25


def _eye_roll_degrees(lm: np.ndarray) -> float:
    """Angle of the line from the left eye's centre to the right eye's (image axes, y down)."""
    d = lm[42:48].mean(axis=0) - lm[36:42].mean(axis=0)
    return math.degrees(math.atan2(d[1], d[0]))


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class FaceAligner:
    """dlib HOG detector + 68-point predictor, built once per process (loading the predictor takes ~2 s).

    detect_max_side: the detector runs on a copy whose longer side is at most this (None: full size).
    max_upsample: most dlib pyramid upsamplings tried when nothing qualifying was found.
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
    ):
        import dlib

        self.predictor_path = find_landmark_model(predictor_path)
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(self.predictor_path)
        self.detect_max_side = detect_max_side
        self.max_upsample = int(max_upsample)
        self.min_score = float(min_score)
        self.upright_above = None if upright_above is None else float(upright_above)
        self._dlib = dlib
        self._pyr = dlib.pyramid_down(6)

    # -- detection --------------------------------------------------------------------------------
    def _level_rect_to_source(self, r, k: int):
        """Source-pixel rectangle of a detection ``r`` made on pyramid level ``k``.

        dlib maps a detection found at its own pyramid level j (window of HOG_WINDOW px there) with
        ``rect_up(R, j)``, rounding once. A run on level k returned ``rect_up(R, j - k)``; R is recovered
        exactly (the map has slope 1.2^(j-k) >= 1, so rounding is undone) and mapped up j levels at once, which
        is what detection on the full-resolution photo reports for the same window.
        """
        pyr = self._pyr
        if k == 0:
            return r
        w = max(r.right() - r.left() + 1, 1)
        j = max(int(round(math.log(w / HOG_WINDOW) / math.log(1.2))), 0)
        for jj in (j, j - 1, j + 1):
            if jj < 0:
                continue
            d = pyr.rect_down(self._dlib.drectangle(r.left(), r.top(), r.right(), r.bottom()), jj)
            R = self._dlib.rectangle(int(round(d.left())), int(round(d.top())), int(round(d.right())), int(round(d.bottom())))
            if pyr.rect_up(R, jj) == r:
                return pyr.rect_up(R, jj + k)
        return pyr.rect_up(r, k)

    def detect(self, image, min_face_size: float = 0.0, detect_max_side="default", exhaustive: bool = False):
        """Face boxes in source pixels: list of ((x0, y0, x1, y1), score), x1/y1 exclusive.

        dlib's HOG detector scans an image pyramid whose levels are each ``pyramid_down(6)`` of the previous
        one, and keeps, per face, the best-scoring window over all levels. Here the photo is reduced with
        that same ``pyramid_down`` k times (k: the fewest that bring the longer side to ``detect_max_side`` or
        below) and the detector runs on level k: it scans exactly levels k, k+1, ... of the full-resolution
        pyramid, and its boxes, mapped back (see _level_rect_to_source), are the ones detection on the
        full-resolution photo reports for faces whose best window lies at those levels. A face's best
        window can also lie on a finer level (a face smaller than about 80 * 1.2^k px, seen at level k by
        a weaker window): for each detection the detector runs again on a crop of level k-1 around it, a
        better-scoring window there replaces it, and the search goes on to level k-2 and finer for as long
        as the score keeps improving.
        Only when nothing qualifying was found (or with ``exhaustive``), and smaller faces could still reach
        ``min_face_size``, finer runs follow: levels k-4, k-8, ..., 0, then dlib's upsampling of the photo,
        up to ``max_upsample`` times. The result is that of the last run made; with ``exhaustive`` the
        runs' detections are merged (overlaps keep the coarser run's box).
        """
        img = np.ascontiguousarray(_as_rgb_uint8(image))
        H, W = img.shape[:2]
        dms = self.detect_max_side if detect_max_side == "default" else detect_max_side
        levels = [img]
        while dms and max(levels[-1].shape[:2]) > dms and min(levels[-1].shape[:2]) > 2 * HOG_MIN_FACE:
            levels.append(self._pyr(levels[-1]))
        k = len(levels) - 1
        runs = [(j, 0) for j in range(k, 0, -4)] + [(0, u) for u in range(self.max_upsample + 1)]
        found, prev_min = [], None
        for j, up in runs:
            if prev_min is not None:
                if found and not exhaustive:
                    break
                # Faces first visible in this run are smaller than those the previous run could see.
                if min_face_size >= prev_min:
                    break
            lv = levels[j]
            prev_min = HOG_MIN_FACE * W / lv.shape[1] / 2**up
            rects, scores, _ = self.detector.run(lv, up, 0.0)
            for r, sc in zip(rects, scores):
                r = self._level_rect_to_source(r, j)
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
                if any(_iou(box, b) > 0.3 for b, _ in found):
                    continue
                found.append((box, float(sc)))
        return found

    def _best_window_one_level_finer(self, level: np.ndarray, j: int, r, score: float):
        """(rect, score) of the best detector window for the face at source rect ``r`` among its own and
        the windows of pyramid level ``j`` (one finer than where it was found) that overlap it.

        The detector runs on a crop of the level around the face, cut at multiples of 8 px (its HOG cell
        size) so the cells, and so the scores, are those of the whole level; windows of the crop's own
        coarser levels are ignored (those levels are not the photo's)."""
        pyr = self._pyr
        d = pyr.rect_down(self._dlib.drectangle(r.left(), r.top(), r.right(), r.bottom()), j)
        h, w = level.shape[:2]
        m = 0.35 * (d.right() - d.left()) + 12
        x0, y0 = max(int(d.left() - m) // 8 * 8, 0), max(int(d.top() - m) // 8 * 8, 0)
        x1, y1 = min(int(d.right() + m) + 1, w), min(int(d.bottom() + m) + 1, h)
        if x1 - x0 < HOG_MIN_FACE or y1 - y0 < HOG_MIN_FACE:
            return r, score
        rects, scores, _ = self.detector.run(np.ascontiguousarray(level[y0:y1, x0:x1]), 0, 0.0)
        box = _rect_box(r)
        for rr, sc in zip(rects, scores):
            if rr.right() - rr.left() + 1 > HOG_WINDOW + 3 or sc <= score:
                continue
            cand = pyr.rect_up(self._dlib.rectangle(rr.left() + x0, rr.top() + y0, rr.right() + x0, rr.bottom() + y0), j)
            if _iou(_rect_box(cand), box) > 0.3:
                r, score = cand, float(sc)
        return r, score

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
        img = np.ascontiguousarray(_as_rgb_uint8(image))
        lm = self._predict(img, box)
        if self.upright_above is None:
            return lm
        roll = _eye_roll_degrees(lm)
        if abs(roll) <= self.upright_above:
            return lm
        lm = self._predict_upright(img, box, roll)
        # A badly rolled first prediction misjudges the roll too (12 degrees for the astronaut turned by 30,
        # 33 in all): turn once more.
        roll2 = _eye_roll_degrees(lm)
        if abs(roll2 - roll) > 5.0:
            lm = self._predict_upright(img, box, roll2)
        return lm

    def _predict_upright(self, img: np.ndarray, box, roll: float) -> np.ndarray:
        """Landmarks predicted on the region around ``box`` turned by ``roll`` degrees (eyes level), in source
        pixel coordinates. Index coordinates throughout (pixel i's centre at i; Pillow's at i + 0.5)."""
        x0, y0, x1, y1 = (float(round(v)) for v in box)
        bw, bh = x1 - x0, y1 - y0
        cx, cy = (x0 + x1 - 1) / 2.0, (y0 + y1 - 1) / 2.0
        # The region is the box plus a margin m on every side, so the box lands on whole pixels there with its
        # own size (the predictor's output moves with a pixel of box size).
        m = int(math.ceil(REGION_MARGIN * max(bw, bh)))
        nx, ny = int(bw) + 2 * m, int(bh) + 2 * m
        hx, hy = (nx - 1) / 2.0, (ny - 1) / 2.0
        t = math.radians(roll)
        c, s = math.cos(t), math.sin(t)
        # source = R @ (out - (hx, hy)) + centre, R turning the output's x axis onto the eye line.
        coeffs = (c, -s, cx + 0.5 - c * (hx + 0.5) + s * (hy + 0.5), s, c, cy + 0.5 - s * (hx + 0.5) - c * (hy + 0.5))
        region = Image.fromarray(img, "RGB").transform((nx, ny), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
        lm = self._predict(np.asarray(region), (m, m, m + bw, m + bh))
        d = lm - (hx, hy)
        return np.column_stack([c * d[:, 0] - s * d[:, 1] + cx, s * d[:, 0] + c * d[:, 1] + cy])

    # -- everything ------------------------------------------------------------------------------
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
        img = np.ascontiguousarray(_as_rgb_uint8(image))
        dets = self.detect(img, min_face_size=min_face_size, exhaustive=(policy == "all"))
        if not dets:
            return []
        if policy == "largest":
            dets = [pick_largest(dets)]
        else:
            # Stable order: left to right, then top to bottom.
            dets = sorted(dets, key=lambda d: (d[0][0], d[0][1], d[0][2], d[0][3]))
        faces = []
        for box, score in dets:
            lm = self.landmarks(img, box)
            quad, qsize = ffhq_quad(lm)
            crop = ffhq_crop(img, lm, output_size, transform_size, enable_padding, quad=quad.copy(), qsize=qsize)
            faces.append(AlignedFace(image=crop, landmarks=lm, quad=quad, box=tuple(float(v) for v in box), score=score))
        return faces

    __call__ = align


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
