"""dlib's frontal HOG face detector in PyTorch, batched, following dlib's arithmetic step by step.

The FFHQ alignment is defined by dlib's boxes, so this port reproduces dlib's detector
(``dlib.get_frontal_face_detector()``, an ``object_detector<scan_fhog_pyramid<pyramid_down<6>>>``) rather
than approximating it: the pyramid images, every fHOG feature and every window score come out bit for bit
as dlib's (dlib-bin 20.0.1: AVX, no FMA, no LAPACK). The weights are read from the file
``detector.save(path)`` writes (dlib's portable serialization, read by ``models.dlib_serialize``; nothing is
unpickled); a copy is bundled in models/data. The stages, each in dlib's order of float operations:

1. ``pyramid_up`` (for ``upsample``) and ``pyramid_down<6>``: dlib's bilinear RGB ``resize_image``. Columns
   are positioned by a float32 accumulator stepping four columns at a time (its SSE path) and weighted in
   float32; the last few columns of each row, where the SSE loop stops, are computed in double. Results are
   truncated to uint8.
2. fHOG (cell 8, 31 planes): per pixel the gradient of the colour channel with the largest magnitude
   (ties resolved differently in dlib's 8-wide SIMD columns and its scalar right-edge columns, followed
   here), orientation snapped to 18 directions, bilinear votes into cells summed in raster order, block
   energies, truncation at 0.2, the 4-lane sums in SSE4.1 ``dpps`` order. Square roots are correctly
   rounded (``torch.sqrt`` on CPU is not: see ``_sqrt_float32``).
3. Scores: every 10x10x31 filter replaced by its low-rank approximation, computed with dlib's own SVD
   (``dlib_svd``, ported step for step), singular values below max(1e-4, 0.001 * largest) dropped, applied
   as separable row/column filters with dlib's three interleaved accumulators (scalar order in the
   right-edge columns), terms added in dlib's order.
4. Windows at or above threshold + adjust_threshold, mapped to image pixels with dlib's rectangle
   arithmetic (``fhog_to_image``, ``pyramid_down<6>::rect_up``, ``lround``), greedy non-maximum suppression
   with the file's overlap thresholds, then ``pyramid_down<2>::rect_down`` for upsampled runs.

GPU exactness: every arithmetic step is a separate eager PyTorch elementwise operation (``torch.mul``,
``torch.add``, ...), so each product is rounded to float32 before the addition that uses it, as in dlib.
Fused operations (``addcmul``, ``matmul``, ``conv2d``, ``baddbmm``) and ``torch.compile`` are deliberately
not used: they contract multiply-adds into FMA or reorder sums. Division is IEEE-rounded on CPU and CUDA.
The same code runs on both devices. On CUDA, every stage (the pyramid resize, fHOG's votes, histograms and
features, the separable filters) runs by default as Triton kernels compiled with ``enable_fp_fusion=False``
(no FMA contraction), each group used only after a check at construction that it equals the torch path bit
for bit.

Batching: images of any sizes are padded into one tensor per pyramid level (level l of every image that
has one), with per-image index tables and masks, so the number of kernel launches depends on the number of
levels and filter terms, not on the number of photos; the Triton kernels skip each image's padding. All
levels' detections come to the host in one transfer per batch.

Ties: dlib orders candidate detections with libstdc++'s unstable ``std::sort`` before suppressing
overlaps; ``std_sort`` follows that algorithm step for step, so equal scores come out (and suppress each
other) in dlib's order too.

Input: HxWx3 uint8 RGB arrays, read by their contents. (dlib itself reads a non-contiguous numpy view
wrongly at its smaller pyramid levels; pass C-contiguous arrays to dlib when comparing.)
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

try:  # Triton kernels for the hot loops on CUDA (optional; the torch path is the reference)
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

from models.dlib_serialize import DlibFormatError, DlibReader
from models.ffhq_crop import photos_to_device
from models.pillow_resample import upload, upload_many

NUM_PLANES = 31  # fHOG planes: 18 signed + 9 unsigned orientations + 4 texture (block energy) planes
# dlib's unit vectors for the 9 unsigned orientation bins (fhog.h), as float32 like dlib's matrix<float>.
_DIRECTIONS = np.array([
    (1.0000, 0.0000), (0.9397, 0.3420), (0.7660, 0.6428), (0.500, 0.8660), (0.1736, 0.9848),
    (-0.1736, 0.9848), (-0.5000, 0.8660), (-0.7660, 0.6428), (-0.9397, 0.3420)], dtype=np.float32)
# Lane order of dlib's 4-wide block normalisation: lane k normalises by the 2x2 block of cells whose top-left
# cell is (y + dy, x + dx) in norm coordinates (see fhog.h, z1..z4).
_LANE_OFFSETS = ((1, 1), (0, 1), (1, 0), (0, 0))
_PYRAMID_RATE_DOWN = (6 - 1.0) / 6   # pyramid_down<6>::point_down ratio
_PYRAMID_RATE_UP = 6 / (6 - 1.0)     # pyramid_down<6>::point_up ratio


class DetectorFileError(DlibFormatError):
    """The detector file is not what dlib's frontal face detector saves; names the file and byte offset."""


# -- the model file --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeparableTerm:
    plane: int
    row_filter: np.ndarray   # (filter width,) float32, applied along x
    col_filter: np.ndarray   # (filter height,) float32, applied along y


@dataclass(frozen=True)
class HogDetectorModel:
    """What dlib's ``object_detector<scan_fhog_pyramid<pyramid_down<6>>>`` file holds."""
    cell_size: int
    padding: int
    window_width: int
    window_height: int
    max_pyramid_levels: int
    min_level_width: int
    min_level_height: int
    iou_thresh: float
    covered_thresh: float
    filters: np.ndarray      # (n_filters, NUM_PLANES, fhog height, fhog width) float64
    thresholds: np.ndarray   # (n_filters,) float64: the bias (last weight) of each filter

    @property
    def fhog_window(self) -> tuple[int, int]:
        return self.filters.shape[2], self.filters.shape[3]


def _c_div(a: int, b: int) -> int:
    """C++ integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _fhog_window_size(cell_size: int, padding: int, width: int, height: int) -> tuple[int, int]:
    # scan_fhog_pyramid::compute_fhog_window_size: the window centred at 0, mapped by image_to_fhog with
    # filter padding 1, grown by `padding` cells on every side.
    left, top = -(width // 2), -(height // 2)
    right, bottom = left + width - 1, top + height - 1

    def to_fhog(v: int) -> int:
        return _c_div(v - 1, cell_size) - 1

    return (to_fhog(bottom) - to_fhog(top) + 1 + 2 * padding, to_fhog(right) - to_fhog(left) + 1 + 2 * padding)


def read_detector_file(path: str) -> HogDetectorModel:
    """Parse ``dlib.fhog_object_detector.save(path)`` output (object_detector version 2). Raises
    DetectorFileError (naming the file and the byte offset) on a truncated or altered file."""
    with open(path, "rb") as f:
        data = f.read()
    reader = DlibReader(data, path)
    try:
        return _parse_detector(reader)
    except DetectorFileError:
        raise
    except DlibFormatError as e:
        raise DetectorFileError(str(e)) from None


def _parse_detector(r: DlibReader) -> HogDetectorModel:
    def fail(message: str, at: int) -> DetectorFileError:
        return DetectorFileError(str(r.error(message, at)))

    def small_int(what: str, low: int, high: int) -> int:
        at = r.offset
        value = r.read_int(what=what)
        if not low <= value <= high:
            raise fail(f"{what} is {value}, expected {low}..{high}", at)
        return value

    def read_double(what: str, low: float, high: float) -> float:
        at = r.offset
        value = float(r.read_floats(1, dtype=np.float64)[0])
        if not low <= value <= high:  # also rejects nan
            raise fail(f"{what} is {value}, expected {low}..{high}", at)
        return value

    r.expect_int(2, "object_detector version")
    r.expect_int(1, "scan_fhog_pyramid version")
    # The scanner's cached feature pyramid: dlib saves a copy_configuration() of it, always empty.
    r.expect_int(0, "feature pyramid max_size")
    r.expect_int(0, "feature pyramid size")
    at = r.offset
    cell_size = r.read_int(what="cell_size")
    if cell_size != 8:
        raise fail(f"cell_size is {cell_size}: only dlib's cell size 8 is supported", at)
    padding = small_int("padding", 0, 16)
    window_width = small_int("window width", 1, 4096)
    window_height = small_int("window height", 1, 4096)
    max_levels = small_int("max_pyramid_levels", 1, 1 << 20)
    min_width = small_int("min_pyramid_layer_width", 1, 1 << 20)
    min_height = small_int("min_pyramid_layer_height", 1, 1 << 20)
    read_double("nuclear_norm_regularization_strength", 0.0, math.inf)
    fhog_h, fhog_w = _fhog_window_size(cell_size, padding, window_width, window_height)
    dims = fhog_h * fhog_w * NUM_PLANES
    r.expect_int(dims, "number of dimensions")
    iou = read_double("overlap iou threshold", 0.0, 1.0)
    covered = read_double("overlap percent-covered threshold", 0.0, 1.0)
    n_filters = small_int("number of filters", 1, 64)
    filters, thresholds = [], []
    for i in range(n_filters):
        at = r.offset
        size = r.read_ints(2, what="weight vector size")
        if abs(int(size[0])) != dims + 1 or abs(int(size[1])) != 1:
            raise fail(f"weight vector {i} is {abs(int(size[0]))}x{abs(int(size[1]))}, expected {dims + 1}x1",
                       at)
        at = r.offset
        w = r.read_floats(dims + 1, dtype=np.float64)
        if not np.isfinite(w).all():
            raise fail(f"weight vector {i} has a value that is not finite", at)
        filters.append(w[:dims].reshape(NUM_PLANES, fhog_h, fhog_w))
        thresholds.append(w[dims])
    if not r.at_end():
        raise fail("unexpected data after the last weight vector", r.offset)
    return HogDetectorModel(cell_size, padding, window_width, window_height, max_levels, min_width, min_height,
                            iou, covered, np.stack(filters), np.array(thresholds, dtype=np.float64))


def dlib_svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dlib's svd3 without LAPACK (dlib-bin has none): the Golub-Reinsch SVD of svd4(SVD_SKINNY_U), in
    double, step for step, so that u, w, v equal dlib's bit for bit (Python floats are IEEE doubles, every
    operation rounded, no FMA, like dlib's build). a is m x n with m >= n; a = u diag(w) v^T, unsorted."""
    m, n = a.shape
    if m < n:
        raise ValueError("dlib_svd needs rows >= columns")
    eps = float(np.finfo(np.float64).eps)
    tol = float(np.finfo(np.float64).tiny) / eps
    u = [[float(v) for v in row] for row in a]
    v = [[0.0] * n for _ in range(n)]
    q = [0.0] * n
    e = [0.0] * n
    g = x = 0.0
    l = 0
    # Householder reduction to bidiagonal form.
    for i in range(n):
        e[i] = g
        s = 0.0
        l = i + 1
        for j in range(i, m):
            s += u[j][i] * u[j][i]
        if s < tol:
            g = 0.0
        else:
            f = u[i][i]
            g = math.sqrt(s) if f < 0 else -math.sqrt(s)
            h = f * g - s
            u[i][i] = f - g
            for j in range(l, n):
                s = 0.0
                for k in range(i, m):
                    s += u[k][i] * u[k][j]
                f = s / h
                for k in range(i, m):
                    u[k][j] += f * u[k][i]
        q[i] = g
        s = 0.0
        for j in range(l, n):
            s += u[i][j] * u[i][j]
        if s < tol:
            g = 0.0
        else:
            f = u[i][i + 1]
            g = math.sqrt(s) if f < 0 else -math.sqrt(s)
            h = f * g - s
            u[i][i + 1] = f - g
            for j in range(l, n):
                e[j] = u[i][j] / h
            for j in range(l, m):
                s = 0.0
                for k in range(l, n):
                    s += u[j][k] * u[i][k]
                for k in range(l, n):
                    u[j][k] += s * e[k]
        y = abs(q[i]) + abs(e[i])
        if y > x:
            x = y
    # Accumulation of right-hand transformations.
    for i in range(n - 1, -1, -1):
        if g != 0.0:
            h = u[i][i + 1] * g
            for j in range(l, n):
                v[j][i] = u[i][j] / h
            for j in range(l, n):
                s = 0.0
                for k in range(l, n):
                    s += u[i][k] * v[k][j]
                for k in range(l, n):
                    v[k][j] += s * v[k][i]
        for j in range(l, n):
            v[i][j] = v[j][i] = 0.0
        v[i][i] = 1.0
        g = e[i]
        l = i
    # Accumulation of left-hand transformations (skinny u: m x n).
    for i in range(n - 1, -1, -1):
        l = i + 1
        g = q[i]
        for j in range(l, n):
            u[i][j] = 0.0
        if g != 0.0:
            h = u[i][i] * g
            for j in range(l, n):
                s = 0.0
                for k in range(l, m):
                    s += u[k][i] * u[k][j]
                f = s / h
                for k in range(i, m):
                    u[k][j] += f * u[k][i]
            for j in range(i, m):
                u[j][i] /= g
        else:
            for j in range(i, m):
                u[j][i] = 0.0
        u[i][i] += 1.0
    # Diagonalisation of the bidiagonal form.
    eps *= x
    for k in range(n - 1, -1, -1):
        iterations = 0
        while True:  # test for splitting
            cancel = False
            for l in range(k, -1, -1):  # noqa: B007 - l is used after the loop, as in dlib
                if abs(e[l]) <= eps:
                    break
                if abs(q[l - 1]) <= eps:
                    cancel = True
                    break
            if cancel:  # cancellation of e[l], l > 0
                c, s = 0.0, 1.0
                l1 = l - 1
                for i in range(l, k + 1):
                    f = s * e[i]
                    e[i] *= c
                    if abs(f) <= eps:
                        break
                    g = q[i]
                    h = q[i] = math.sqrt(f * f + g * g)
                    c = g / h
                    s = -f / h
                    for j in range(m):
                        y = u[j][l1]
                        z = u[j][i]
                        u[j][l1] = y * c + z * s
                        u[j][i] = -y * s + z * c
            z = q[k]  # test for convergence
            if l == k:
                break
            iterations += 1
            if iterations > 300:
                raise ArithmeticError("dlib_svd: no convergence")  # dlib returns an error code here
            x = q[l]
            y = q[k - 1]
            g = e[k - 1]
            h = e[k]
            f = ((y - z) * (y + z) + (g - h) * (g + h)) / (2 * h * y)
            g = math.sqrt(f * f + 1.0)
            f = ((x - z) * (x + z) + h * (y / ((f - g) if f < 0 else (f + g)) - h)) / x
            c = s = 1.0
            for i in range(l + 1, k + 1):
                g = e[i]
                y = q[i]
                h = s * g
                g *= c
                e[i - 1] = z = math.sqrt(f * f + h * h)
                c = f / z
                s = h / z
                f = x * c + g * s
                g = -x * s + g * c
                h = y * s
                y *= c
                for j in range(n):
                    x = v[j][i - 1]
                    z = v[j][i]
                    v[j][i - 1] = x * c + z * s
                    v[j][i] = -x * s + z * c
                q[i - 1] = z = math.sqrt(f * f + h * h)
                if z != 0:
                    c = f / z
                    s = h / z
                f = c * g + s * y
                x = -s * g + c * y
                for j in range(m):
                    y = u[j][i - 1]
                    z = u[j][i]
                    u[j][i - 1] = y * c + z * s
                    u[j][i] = -y * s + z * c
            e[l] = 0.0
            e[k] = f
            q[k] = x
        if z < 0.0:  # make the singular value non-negative
            q[k] = -z
            for j in range(n):
                v[j][k] = -v[j][k]
    return np.array(u), np.array(q), np.array(v)


def separable_terms(filt: np.ndarray) -> list[SeparableTerm]:
    """scan_fhog_pyramid::build_fhog_filterbank: per plane, dlib's SVD, columns sorted by singular value
    (largest first), singular values below max(1e-4, 0.001 * largest) dropped, each kept term as float32
    (u_j * sqrt(w_j), v_j * sqrt(w_j)) computed in double."""
    terms = []
    for plane in range(filt.shape[0]):
        u, w, v = dlib_svd(filt[plane])
        order = np.argsort(-w, kind="stable")
        w, u, v = w[order], u[:, order], v[:, order]
        thresh = max(1e-4, float(w.max()) * 0.001)
        for j in range(w.size):
            if w[j] >= thresh or w[j] <= -thresh:
                root = math.sqrt(float(w[j]))
                terms.append(SeparableTerm(plane, (v[:, j] * root).astype(np.float32),
                                           (u[:, j] * root).astype(np.float32)))
    return terms


# -- geometry (dlib's integer and double rectangle arithmetic) -------------------------------------------

def _lround(x: np.ndarray) -> np.ndarray:
    """std::lround: halves away from zero."""
    x = np.asarray(x, dtype=np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def count_pyramid_levels(height: int, width: int, model: HogDetectorModel) -> int:
    """impl::create_fhog_pyramid: levels until the rect_down'ed image rectangle gets smaller than the minimum."""
    return _count_pyramid_levels(height, width, model.min_level_width, model.min_level_height,
                                 model.max_pyramid_levels)


@functools.lru_cache(maxsize=4096)
def _count_pyramid_levels(height: int, width: int, min_width: int, min_height: int, max_levels: int) -> int:
    # Plain Python floats (IEEE doubles, as numpy's and dlib's): this runs for every photo of every batch on the
    # host, where numpy's per-call cost on scalars was a visible share of a GPU batch's host time.
    def lround(v: float) -> int:  # std::lround: halves away from zero
        return int(math.copysign(math.floor(abs(v) + 0.5), v))

    right, bottom = width - 1, height - 1
    left = top = 0
    levels = 0
    while True:
        left, top, right, bottom = (lround((v - 0.3) * _PYRAMID_RATE_DOWN) for v in (left, top, right, bottom))
        levels += 1
        if not (right - left + 1 >= min_width and bottom - top + 1 >= min_height and levels < max_levels):
            return levels


def _fhog_to_image(p: np.ndarray, fhog_pad: int, cell: int) -> np.ndarray:
    q = (p + 1 - (fhog_pad - 1) // 2) * cell + 1
    return q + np.where(q >= 0, cell // 2, -(cell // 2))


def window_boxes(rows: np.ndarray, cols: np.ndarray, level: int, model: HogDetectorModel) -> np.ndarray:
    """(n, 4) left, top, right, bottom of detection windows at plane position (row, col) of pyramid `level`."""
    fh, fw = model.fhog_window
    box_h, box_w = fh - 2 * model.padding, fw - 2 * model.padding
    left = cols - box_w // 2
    top = rows - box_h // 2
    pts = np.stack([_fhog_to_image(left, fw, model.cell_size), _fhog_to_image(top, fh, model.cell_size),
                    _fhog_to_image(left + box_w - 1, fw, model.cell_size),
                    _fhog_to_image(top + box_h - 1, fh, model.cell_size)], axis=1).astype(np.float64)
    for _ in range(level):  # pyramid_down<6>::rect_up(rect, level): in double, rounded once at the end
        pts = pts * _PYRAMID_RATE_UP + 0.3
    return _lround(pts)


def boxes_down_after_upsample(boxes: np.ndarray, times: int) -> np.ndarray:
    """pyramid_down<2>::rect_down(rect, times), as dlib maps detections of an upsampled image back."""
    pts = boxes.astype(np.float64)
    for _ in range(times):
        pts = pts / 2.0 - np.array([1.25, 0.75, 1.25, 0.75])
    return _lround(pts)


def float32_at_least(values: np.ndarray) -> np.ndarray:
    """Per double value t, the smallest float32 c with c >= t: for any float32 s, s >= c exactly when s,
    promoted to double, is >= t (dlib's threshold test, made without promoting s)."""
    t = np.asarray(values, dtype=np.float64)
    c = t.astype(np.float32)
    below = c.astype(np.float64) < t
    c[below] = np.nextafter(c[below], np.float32(np.inf))
    return c


def _overlaps(kept: list, box: tuple, iou_thresh: float, covered_thresh: float) -> bool:
    """test_box_overlap against every kept box (inclusive integer rectangles, as tuples of ints). Plain Python:
    a handful of boxes per photo, where numpy's per-call cost dominated a GPU batch's host time. The ratios are
    the same IEEE double divisions as dlib's (exact integer operands, a correctly rounded quotient)."""
    left, top, right, bottom = box
    area_box = (right - left + 1) * (bottom - top + 1)
    for k_left, k_top, k_right, k_bottom in kept:
        inner = (max(min(k_right, right) - max(k_left, left) + 1, 0)
                 * max(min(k_bottom, bottom) - max(k_top, top) + 1, 0))
        if inner <= 0:  # (then both boxes have a positive area: no division by zero below)
            continue
        outer = (max(k_right, right) - min(k_left, left) + 1) * (max(k_bottom, bottom) - min(k_top, top) + 1)
        area_kept = (k_right - k_left + 1) * (k_bottom - k_top + 1)
        if inner / outer > iou_thresh or inner / area_kept > covered_thresh or inner / area_box > covered_thresh:
            return True
    return False


# libstdc++'s std::sort (introsort: median-of-3 quicksort down to runs of 16, heapsort past 2*log2(n)
# levels, then insertion sort), followed step for step: dlib orders candidate detections with it, and it
# is not stable, so equal scores come out in its order, which only this emulation reproduces.
_SORT_THRESHOLD = 16


def _unguarded_linear_insert(a: list, last: int, less) -> None:
    value = a[last]
    prev = last - 1
    while less(value, a[prev]):
        a[last] = a[prev]
        last = prev
        prev -= 1
    a[last] = value


def _insertion_sort(a: list, first: int, last: int, less) -> None:
    for i in range(first + 1, last):
        if less(a[i], a[first]):
            value = a[i]
            a[first + 1:i + 1] = a[first:i]
            a[first] = value
        else:
            _unguarded_linear_insert(a, i, less)


def _push_heap(a: list, first: int, hole: int, top: int, value, less) -> None:
    parent = (hole - 1) // 2
    while hole > top and less(a[first + parent], value):
        a[first + hole] = a[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[first + hole] = value


def _adjust_heap(a: list, first: int, hole: int, length: int, value, less) -> None:
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if less(a[first + child], a[first + child - 1]):
            child -= 1
        a[first + hole] = a[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[first + hole] = a[first + child - 1]
        hole = child - 1
    _push_heap(a, first, hole, top, value, less)


def _heap_sort(a: list, first: int, last: int, less) -> None:
    """std::__partial_sort(first, last, last): make_heap, then sort_heap."""
    length = last - first
    if length >= 2:
        for parent in range((length - 2) // 2, -1, -1):
            _adjust_heap(a, first, parent, length, a[first + parent], less)
    while last - first > 1:
        last -= 1
        value = a[last]
        a[last] = a[first]
        _adjust_heap(a, first, 0, last - first, value, less)


def _partition_at_pivot(a: list, first: int, last: int, less) -> int:
    mid = first + (last - first) // 2
    x, y, z = first + 1, mid, last - 1  # __move_median_to_first(first, first + 1, mid, last - 1)
    if less(a[x], a[y]):
        median = y if less(a[y], a[z]) else (z if less(a[x], a[z]) else x)
    else:
        median = x if less(a[x], a[z]) else (z if less(a[y], a[z]) else y)
    a[first], a[median] = a[median], a[first]
    lo, hi = first + 1, last  # __unguarded_partition(first + 1, last, pivot = first)
    while True:
        while less(a[lo], a[first]):
            lo += 1
        hi -= 1
        while less(a[first], a[hi]):
            hi -= 1
        if not lo < hi:
            return lo
        a[lo], a[hi] = a[hi], a[lo]
        lo += 1


def _introsort_loop(a: list, first: int, last: int, depth: int, less) -> None:
    while last - first > _SORT_THRESHOLD:
        if depth == 0:
            _heap_sort(a, first, last, less)
            return
        depth -= 1
        cut = _partition_at_pivot(a, first, last, less)
        _introsort_loop(a, cut, last, depth, less)
        last = cut


def std_sort(a: list, less) -> None:
    """In place, exactly as libstdc++'s std::sort(first, last, comp) orders it (including equal keys)."""
    n = len(a)
    if n < 2:
        return
    _introsort_loop(a, 0, n, 2 * (n.bit_length() - 1), less)
    if n > _SORT_THRESHOLD:
        _insertion_sort(a, 0, _SORT_THRESHOLD, less)
        for i in range(_SORT_THRESHOLD, n):
            _unguarded_linear_insert(a, i, less)
    else:
        _insertion_sort(a, 0, n, less)


def _sort_reversed_range(items: list, less) -> list:
    """std::sort(v.rbegin(), v.rend(), less): the reversed view sorted ascending, i.e. v descending."""
    view = items[::-1]
    std_sort(view, less)
    return view[::-1]


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray, order_keys: np.ndarray, model: HogDetectorModel
                        ) -> np.ndarray:
    """Indices kept by dlib's greedy suppression, in dlib's order. order_keys (n, 4): filter, level, row,
    column of each candidate; scores: its confidence (saliency - threshold), whose order within a filter is
    the saliency's. As dlib: each filter's candidates in scan order, sorted; the filters' lists
    concatenated and sorted again; then each candidate kept unless it overlaps one kept before."""
    generation = np.lexsort(order_keys.T[::-1])
    values = scores.tolist()

    def less(i, j):
        return values[i] < values[j]

    filters = order_keys[:, 0]
    merged: list[int] = []
    for f in np.unique(filters):
        merged += _sort_reversed_range([int(i) for i in generation if filters[i] == f], less)
    if model.filters.shape[0] > 1:
        merged = _sort_reversed_range(merged, less)
    rects = [tuple(r) for r in boxes.tolist()]
    kept: list[int] = []
    for i in merged:
        if not _overlaps([rects[k] for k in kept], rects[i], model.iou_thresh, model.covered_thresh):
            kept.append(i)
    return np.array(kept, dtype=np.int64)


# -- resampling (dlib's resize_image, bilinear, RGB) -----------------------------------------------------

@dataclass
class ResizeTables:
    """dlib's resize_image (bilinear) sampling tables of a batch (resize_tables): per image b and output row,
    top, bottom (int64), the fraction tb64 and its float32 roundings tb32, inv_tb32 = float32(1 - tb64);
    per output column, left, right (int64), lr32 (SSE path, float32), inv_lr32 = 1 - lr32 (float32) and lr64
    (double path); tail[b]: the first column of the double path. (n, out_h) and (n, out_w) arrays; outside
    each image's output the entries are only valid indices."""

    top: np.ndarray
    bottom: np.ndarray
    tb64: np.ndarray
    tb32: np.ndarray
    inv_tb32: np.ndarray
    left: np.ndarray
    right: np.ndarray
    lr32: np.ndarray
    inv_lr32: np.ndarray
    lr64: np.ndarray
    tail: np.ndarray


def resize_tables(in_sizes: list[tuple[int, int]], out_sizes: list[tuple[int, int]], out_h: int, out_w: int
                  ) -> ResizeTables:
    """The tables of resize_image from in_sizes[b] to out_sizes[b] ((h, w)) for every image at once, padded to
    out_h rows and out_w columns. numpy, one pass per table over the whole batch: every pyramid level of every
    photo needs its own, and photos are seldom of a size met before (per image, they took ~40% of a 64-photo
    batch's detection host time on an H200's host)."""
    n = len(in_sizes)
    h, w = (np.array([s[k] for s in in_sizes], np.int64) for k in (0, 1))
    oh, ow = (np.array([s[k] for s in out_sizes], np.int64) for k in (0, 1))
    # Rows: dlib accumulates the row position in double, one step per row, from -scale; np.add.accumulate
    # along axis 1 adds in that order, row by row.
    scale = (h - 1) / np.maximum(oh - 1, 1)
    steps = np.repeat(scale[:, None], out_h + 1, axis=1)
    steps[:, 0] = -scale
    ys = np.where(np.arange(out_h) < oh[:, None], np.add.accumulate(steps, axis=1)[:, 1:], 0.0)
    top = np.floor(ys).astype(np.int64)
    bottom = np.minimum(top + 1, h[:, None] - 1)
    tb64 = ys - top
    # Columns, SSE path: four float32 lanes x0 + k * scale (from double), advanced by float32(4 * scale) per
    # group of four columns in a float32 accumulator, truncated (cvttps); it stops at the first group whose
    # 4th lane's right neighbour leaves the image.
    scale = (w - 1) / np.maximum(ow - 1, 1)
    n_groups = max(int(((ow + 3) // 4 + 1).max()), -(-out_w // 4))
    seq = np.empty((n, n_groups + 1, 4), np.float32)
    seq[:, 0] = (-4 * scale)[:, None] + np.arange(4) * scale[:, None]
    seq[:, 1:] = (4 * scale).astype(np.float32)[:, None, None]
    pos = np.add.accumulate(seq, axis=1, dtype=np.float32)[:, 1:]
    left_simd = pos.astype(np.int64)
    stops = left_simd[:, :, 3] + 1 >= w[:, None]
    tail = np.minimum(4 * np.where(stops.any(axis=1), stops.argmax(axis=1), n_groups), ow)
    if np.any(ow - tail > _TAIL_BAND):
        b = int(np.argmax(ow - tail))
        raise AssertionError(f"resize {w[b]}->{ow[b]}: {ow[b] - tail[b]} scalar columns")
    simd = np.arange(out_w) < tail[:, None]
    pos = pos.reshape(n, -1)[:, :out_w]
    left = np.where(simd, left_simd.reshape(n, -1)[:, :out_w], 0)
    right = np.where(simd, left + 1, 0)
    lr32 = np.where(simd, pos - left.astype(np.float32), np.float32(0))
    inv_lr32 = (np.float32(1) - lr32).astype(np.float32)
    # Double path, the columns from tail on: a double accumulator from the SSE loop's last position.
    steps = np.repeat(scale[:, None], _TAIL_BAND + 1, axis=1)
    steps[:, 0] = -scale + tail * scale
    xs = np.add.accumulate(steps, axis=1)[:, 1:]
    cols = tail[:, None] + np.arange(_TAIL_BAND)
    b, k = np.nonzero(cols < ow[:, None])
    lr64 = np.zeros((n, out_w), np.float64)
    band_left = np.floor(xs[b, k]).astype(np.int64)
    left[b, cols[b, k]] = band_left
    right[b, cols[b, k]] = np.minimum(band_left + 1, w[b] - 1)
    lr64[b, cols[b, k]] = xs[b, k] - band_left
    return ResizeTables(top, bottom, tb64, tb64.astype(np.float32), (1 - tb64).astype(np.float32), left, right,
                        lr32, inv_lr32, lr64, tail)


_TAIL_BAND = 8  # widest right-edge band handled by a scalar path (resize: < 8 columns; filters: < 8)


def resize_rgb(images: torch.Tensor, in_sizes: list[tuple[int, int]], out_sizes: list[tuple[int, int]]
                ) -> torch.Tensor:
    """dlib's resize_image(bilinear) of each RGB uint8 image (B, 3, H, W), image b's valid part in_sizes[b],
    to out_sizes[b]; returns (B, 3, max out H, max out W + band) uint8 (outside each image: junk)."""
    dev = images.device
    n, _, in_h, in_w = images.shape
    out_h = max(h for h, _ in out_sizes)
    out_w = max(w for _, w in out_sizes) + _TAIL_BAND
    r = resize_tables(in_sizes, out_sizes, out_h, out_w)
    top, bottom, tb64, tb32, inv_tb32 = r.top, r.bottom, r.tb64, r.tb32, r.inv_tb32
    left, right, lr32, inv_lr32, lr64 = r.left, r.right, r.lr32, r.inv_lr32, r.lr64
    band = r.tail[:, None] + np.arange(_TAIL_BAND)

    def t(a):
        return upload(a, dev)

    flat = images.reshape(n, 3, in_h * in_w)

    def gather(rows, cols):
        idx = (t(rows)[:, :, None] * in_w + t(cols)[:, None, :]).reshape(n, 1, -1).expand(n, 3, -1)
        return torch.gather(flat, 2, idx).reshape(n, 3, rows.shape[1], cols.shape[1])

    tl, tr = gather(top, left), gather(top, right)
    bl, br = gather(bottom, left), gather(bottom, right)
    # SSE path: weights are float32 products, each term rounded before it is added (no FMA).
    inv_tb, tb = t(inv_tb32)[:, None, :, None], t(tb32)[:, None, :, None]
    inv_lr, lr = t(inv_lr32)[:, None, None, :], t(lr32)[:, None, None, :]
    w_tl, w_tr = torch.mul(inv_tb, inv_lr), torch.mul(inv_tb, lr)
    w_bl, w_br = torch.mul(tb, inv_lr), torch.mul(tb, lr)
    acc = torch.mul(w_tl, tl.float())
    acc = torch.add(acc, torch.mul(w_tr, tr.float()))
    acc = torch.add(acc, torch.mul(w_bl, bl.float()))
    acc = torch.add(acc, torch.mul(w_br, br.float()))
    out = acc.to(torch.int32).to(torch.uint8)  # truncation toward zero, like cvttps
    # Double path for the right-edge band of each image.
    band_t = t(band)
    band_idx = band_t[:, None, None, :].expand(n, 3, out_h, _TAIL_BAND)

    def band_of(x):
        return torch.gather(x, 3, band_idx).double()

    lr_b = torch.gather(t(lr64), 1, band_t)[:, None, None, :]
    tb_b = t(tb64)[:, None, :, None]
    one_lr = torch.sub(1.0, lr_b)
    upper = torch.add(torch.mul(one_lr, band_of(tl)), torch.mul(lr_b, band_of(tr)))
    lower = torch.add(torch.mul(one_lr, band_of(bl)), torch.mul(lr_b, band_of(br)))
    value = torch.add(torch.mul(torch.sub(1.0, tb_b), upper), torch.mul(tb_b, lower))
    out.scatter_(3, band_idx, value.to(torch.int32).to(torch.uint8))
    return out


def pyramid_down_size(h: int, w: int) -> tuple[int, int]:
    return (5 * h) // 6, (5 * w) // 6


def pyramid_level_size(size: tuple[int, int], levels: int) -> tuple[int, int]:
    """(h, w) of pyramid level ``levels`` of an image of ``size``: pyramid_down_size applied that many times."""
    for _ in range(levels):
        size = pyramid_down_size(*size)
    return size


def pyramid_up_size(h: int, w: int) -> tuple[int, int]:
    # pyramid_down<2>::rect_up of the image rectangle, lround'ed: (0,0)->(3,2), (w-1,h-1)->(2w+1, 2h)
    return 2 * h + 1, 2 * w + 2


# -- fHOG ------------------------------------------------------------------------------------------------

def _sqrt_float32(x: torch.Tensor) -> torch.Tensor:
    """IEEE float32 square root, correctly rounded like dlib's sqrtps. torch.sqrt on CPU is not (it misrounds
    about 0.7% of float32 inputs); the double square root of a float32, rounded to float32, always is."""
    return torch.sqrt(x.double()).float()


def _cell_histograms(orient_steps: torch.Tensor, weight_steps: torch.Tensor) -> torch.Tensor:
    """(steps, B, R, C) bins and weights -> (B, R, C, 18): each cell's bins summed over the steps in order."""
    hist = torch.zeros((*orient_steps.shape[1:], 18), dtype=torch.float32, device=orient_steps.device)
    for k in range(orient_steps.shape[0]):
        hist.scatter_add_(3, orient_steps[k].unsqueeze(-1), weight_steps[k].unsqueeze(-1))
    return hist


def _vote_weights(ph: int, pw: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel row y = 1..ph: (vy0, vy1); per column x = 1..pw: (vx0, vx1): dlib's bilinear vote
    fractions, exact dyadic float32 values."""
    yp = ((np.arange(1, ph + 1) + 0.5) / 8.0 - 0.5).astype(np.float32)
    vy0 = (yp - np.floor(yp)).astype(np.float32)
    xp = ((np.arange(1, pw + 1) + 0.5) / 8.0 - 0.5).astype(np.float32)
    vx0 = (xp - np.floor(xp)).astype(np.float32)
    return (np.stack([vy0, (1.0 - vy0).astype(np.float32)], 1),
            np.stack([vx0, (1.0 - vx0).astype(np.float32)], 1))


def _cell_histograms_torch(images, ph, pw, visible, simd_end, grid_h, grid_w, n_cr, n_cc) -> torch.Tensor:
    """fHOG's orientation histograms of cells 0..n_cr-1 x 0..n_cc-1 (dlib's hist[1..][1..]), (B, R, C, 18)."""
    dev = images.device
    n = images.shape[0]
    cell = 8
    img = images[:, :, :ph + 2, :pw + 2].to(torch.int32)
    gx = torch.sub(img[:, :, 1:-1, 2:], img[:, :, 1:-1, :-2])
    gy = torch.sub(img[:, :, 2:, 1:-1], img[:, :, :-2, 1:-1])
    mag = torch.add(torch.mul(gx, gx), torch.mul(gy, gy))  # exact integers
    xs = np.arange(1, pw + 1)
    ys = np.arange(1, ph + 1)
    simd_col = upload(xs[None, :] < simd_end[:, None], dev)[:, None, :]  # (B, 1, pw)
    # The channel with the largest squared gradient. dlib's SIMD columns do select(r > g, r, g) then
    # select(t > b, t, b) (ties go to the later channel); its scalar columns start with red and switch
    # only on a strictly larger value (ties go to the earlier channel).
    red_green = torch.maximum(mag[:, 0], mag[:, 1])
    simd_channel = torch.where(red_green > mag[:, 2], torch.where(mag[:, 0] > mag[:, 1], 0, 1), 2)
    scalar_channel = torch.where(mag[:, 2] > red_green, 2, torch.where(mag[:, 1] > mag[:, 0], 1, 0))
    channel = torch.where(simd_col, simd_channel, scalar_channel).unsqueeze(1)
    grad_x = torch.gather(gx, 1, channel).squeeze(1).float()
    grad_y = torch.gather(gy, 1, channel).squeeze(1).float()
    v = _sqrt_float32(torch.maximum(red_green, mag[:, 2]).float())
    # Orientation: dlib keeps the first of the 18 candidates dot_0, -dot_0, dot_1, -dot_1, ... that is
    # strictly larger than everything before it (and than 0). That is the first o with the largest |dot_o|
    # (of dot_o and -dot_o only one can be positive), bin o or o + 9 by the sign, when the largest is > 0.
    d0 = upload(_DIRECTIONS[:, 0], dev)
    d1 = upload(_DIRECTIONS[:, 1], dev)
    dots = torch.add(torch.mul(grad_x.unsqueeze(-1), d0), torch.mul(grad_y.unsqueeze(-1), d1))
    magnitude = torch.abs(dots)
    best = torch.amax(magnitude, dim=-1, keepdim=True)
    # The first o reaching the maximum, whatever the backend's tie rule for argmax.
    first = torch.where(magnitude == best, torch.arange(9, device=dev), 9).amin(dim=-1)
    best = best.squeeze(-1)
    negative = torch.gather(dots, -1, first.unsqueeze(-1)).squeeze(-1) < 0
    best_o = torch.where(best > 0, torch.where(negative, first + 9, first), 0)

    # Bilinear vote weights. dlib's SIMD columns compute vy * (vx * v), its scalar columns (vy * vx) * v.
    vy_np, vx_np = _vote_weights(ph, pw)
    vy_t = upload(vy_np, dev)
    vx_t = upload(vx_np, dev)
    valid = upload((ys[None, :, None] < visible[:, 0, None, None]) & (xs[None, None, :] < visible[:, 1, None, None]), dev)
    weights = {}
    for ky in range(2):
        for kx in range(2):
            vy = vy_t[:, ky][None, :, None]
            vx = vx_t[:, kx][None, None, :]
            simd_w = torch.mul(vy, torch.mul(vx, v))
            scalar_w = torch.mul(torch.mul(vy, vx), v)
            w = torch.where(simd_col, simd_w, scalar_w)
            w = torch.where(valid, w, torch.zeros((), device=dev))
            grid = torch.zeros((n, grid_h, grid_w), dtype=torch.float32, device=dev)
            grid[:, 13:13 + ph, 13:13 + pw] = w
            weights[ky, kx] = grid
    orient = torch.zeros((n, grid_h, grid_w), dtype=torch.int64, device=dev)
    orient[:, 13:13 + ph, 13:13 + pw] = best_o

    # Cell i (dlib's padded index i + 1) sums, in raster order, pixel rows 8i-4 .. 8i+11 (weights vy0 for
    # the first 8, vy1 for the last 8) and likewise columns; adding in that order reproduces dlib's float32
    # sums exactly. The 256 block offsets (dy, dx) in raster order, each as one (B, cells, cells) slice.
    orient_steps, weight_steps = [], []
    for dy in range(16):
        rows = slice(cell + dy, cell + dy + cell * n_cr, cell)
        for dx in range(16):
            cols = slice(cell + dx, cell + dx + cell * n_cc, cell)
            orient_steps.append(orient[:, rows, cols])
            weight_steps.append(weights[dy // 8, dx // 8][:, rows, cols])
    return _cell_histograms(torch.stack(orient_steps), torch.stack(weight_steps))


def _fhog(images: torch.Tensor, sizes: list[tuple[int, int]], fhog_pad: tuple[int, int],
          use_triton: bool = False):
    """extract_fhog_features(cell 8, filter padding fhog_pad) for each image; returns the planes
    (B, 31, Hp, Wp + band) float32 with each image's features at offset (pad-1)//2 and zeros around, and per
    image (hog rows, hog cols)."""
    dev = images.device
    cell = 8
    n = images.shape[0]
    # dlib: (int)(rows / (float)cell_size + 0.5), in float32 (exact: a division by 8, then + 0.5), truncated.
    cells = (np.asarray(sizes, dtype=np.float32).reshape(-1, 2) / np.float32(cell) + np.float32(0.5)).astype(np.int64)
    hog = np.maximum(cells - 2, 0)
    hog[(hog == 0).any(axis=1)] = 0
    visible = np.minimum(cells * cell, np.array(sizes)) - 1  # pixels 1..visible-1 vote
    pad_r, pad_c = fhog_pad
    plane_h = int(hog[:, 0].max()) + pad_r - 1
    # One band's width more on the right: the scalar right-edge filter loop reads up to 8 + fw - 1 columns
    # past each image's first scalar column.
    plane_w = int(hog[:, 1].max()) + pad_c - 1 + _TAIL_BAND
    planes = torch.zeros((n, NUM_PLANES, plane_h, plane_w), dtype=torch.float32, device=dev)
    if hog.max() == 0:
        return planes, hog
    n_cr, n_cc = int(cells[:, 0].max()), int(cells[:, 1].max())
    height, width = images.shape[2], images.shape[3]
    # Pixel grid: pixel (y, x) at (y + 12, x + 12), so that cell (padded index hr) gathers rows 8hr .. 8hr+15.
    grid_h, grid_w = cell * (n_cr + 2), cell * (n_cc + 2)
    ph, pw = min(height - 2, grid_h - 13), min(width - 2, grid_w - 13)  # interior pixels 1..ph, 1..pw
    simd_end = 1 + 8 * ((visible[:, 1] - 1) // 8)  # dlib's 8-wide pixel columns are x < simd_end
    if use_triton:
        hist = _cell_histograms_triton(images, ph, pw, visible, simd_end, grid_h, grid_w, n_cr, n_cc, cells)
        _fhog_planes_triton(hist, hog, planes, ((pad_r - 1) // 2, (pad_c - 1) // 2))
        return planes, hog
    hist = _cell_histograms_torch(images, ph, pw, visible, simd_end, grid_h, grid_w, n_cr, n_cc)

    both = torch.add(hist[..., :9], hist[..., 9:])
    sq = torch.mul(both, both)
    norm = sq[..., 0]
    for o in range(1, 9):
        norm = torch.add(norm, sq[..., o])

    hr, hc = int(hog[:, 0].max()), int(hog[:, 1].max())
    eps = upload(np.array(0.0001, dtype=np.float32), dev)
    tenth = upload(np.array(0.1, dtype=np.float32), dev)
    nn_lanes, n_lanes = [], []
    for dy, dx in _LANE_OFFSETS:
        z1 = norm[:, dy:dy + hr, dx:dx + hc]
        z2 = norm[:, dy:dy + hr, dx + 1:dx + 1 + hc]
        z3 = norm[:, dy + 1:dy + 1 + hr, dx:dx + hc]
        z4 = norm[:, dy + 1:dy + 1 + hr, dx + 1:dx + 1 + hc]
        s = torch.add(torch.add(torch.add(torch.add(z1, z2), z3), z4), eps)
        nn = torch.mul(_sqrt_float32(s), float(np.float32(0.2)))
        nn_lanes.append(nn)
        n_lanes.append(torch.div(tenth, nn))
    nn4 = torch.stack(nn_lanes, 0).unsqueeze(-1)  # (4, B, hr, hc, 1)
    n4 = torch.stack(n_lanes, 0).unsqueeze(-1)
    cell_hist = hist[:, 1:1 + hr, 1:1 + hc, :]    # dlib's hist[y+2][x+2]
    h_sens = torch.mul(torch.minimum(cell_hist.unsqueeze(0), nn4), n4)  # (4, B, hr, hc, 18)
    sens = torch.add(torch.add(h_sens[0], h_sens[1]), torch.add(h_sens[2], h_sens[3]))  # dpps order
    unsigned = torch.add(cell_hist[..., :9], cell_hist[..., 9:])
    h_ins = torch.mul(torch.minimum(unsigned.unsqueeze(0), nn4), n4)
    insens = torch.add(torch.add(h_ins[0], h_ins[1]), torch.add(h_ins[2], h_ins[3]))
    texture = torch.add(torch.add(h_sens[..., 0], h_sens[..., 1]), h_sens[..., 2])
    for o in range(3, 18, 3):
        texture = torch.add(texture, torch.add(torch.add(h_sens[..., o], h_sens[..., o + 1]), h_sens[..., o + 2]))
    texture = torch.mul(texture, float(np.float32(2 * 0.2357)))  # (4, B, hr, hc)
    feats = torch.cat([sens, insens, texture.permute(1, 2, 3, 0)], dim=-1)  # (B, hr, hc, 31)
    inside = upload((np.arange(hr)[None, :, None] < hog[:, 0, None, None])
                    & (np.arange(hc)[None, None, :] < hog[:, 1, None, None]), dev)
    feats = torch.where(inside.unsqueeze(-1), feats, torch.zeros((), device=dev))
    off_r, off_c = (pad_r - 1) // 2, (pad_c - 1) // 2
    planes[:, :, off_r:off_r + hr, off_c:off_c + hc] = feats.permute(0, 3, 1, 2)
    return planes, hog


# -- scoring ---------------------------------------------------------------------------------------------

def _three_accumulator_sum(shifted, taps):
    """dlib's 8-wide filter loop: taps 0, 3, 6, ... / 1, 4, 7, ... / 2, 5, 8, ... summed in three
    accumulators while three taps remain (n < size - 2), the leftover taps into the first, then
    acc0 + (acc1 + acc2). `shifted(n)` is the input shifted by tap n; `taps[n]` broadcastable weights.
    Every product is materialised (rounded) before it is added: no fused multiply-add."""
    size = len(taps)
    interleaved = 3 * max(0, -(-(size - 2) // 3))  # taps covered by the 3-way loop
    accs = [None, None, None]
    for n in range(size):
        term = torch.mul(shifted(n), taps[n])
        k = n % 3 if n < interleaved else 0
        if accs[k] is None:
            accs[k] = term
        else:
            accs[k].add_(term)
    total = accs[0]
    if accs[1] is not None:
        if accs[2] is not None:
            accs[1].add_(accs[2])
        total.add_(accs[1])
    return total


def _sequential_sum(shifted, taps):
    """dlib's scalar (right-edge) filter loop: taps added one after the other."""
    acc = torch.mul(shifted(0), taps[0])
    for n in range(1, len(taps)):
        acc.add_(torch.mul(shifted(n), taps[n]))
    return acc


def _filter_scores(planes: torch.Tensor, hog: np.ndarray, plane_idx: torch.Tensor, row_taps: torch.Tensor,
                   col_taps: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """For every filter, the sum over its separable terms (in dlib's order) of
    column-filter(row-filter(plane)), in dlib's summation order. plane_idx (F, S), row_taps (F, S, fw),
    col_taps (F, S, fh). Returns (B, F, hog rows max, plane cols - fw + 1): position (i, j) scores the
    window centred at plane (i + fh // 2, j + fw // 2). Slots are processed a chunk at a time (memory)."""
    dev = planes.device
    n, _, plane_h, plane_w = planes.shape
    n_filters, n_slots = plane_idx.shape
    fh, fw = col_taps.shape[2], row_taps.shape[2]
    out_h = int(hog[:, 0].max())
    out_w = plane_w - (fw - 1)
    # dlib filters the right-most (hog cols % 8) columns with its scalar loop: a band of 8 per image.
    tail_start = upload(8 * (hog[:, 1] // 8), dev)
    band = tail_start[:, None] + torch.arange(_TAIL_BAND + fw - 1, device=dev)[None, :]
    step = max(1, chunk_elements // (n * n_filters * plane_h * plane_w))
    total = None
    for start in range(0, n_slots, step):
        stop = min(start + step, n_slots)
        t = n_filters * (stop - start)
        x = planes.index_select(1, plane_idx[:, start:stop].reshape(-1))  # (B, F * Sc, plane_h, plane_w)
        row_w = [row_taps[:, start:stop, k].reshape(1, t, 1, 1) for k in range(fw)]
        col_w = [col_taps[:, start:stop, k].reshape(1, t, 1, 1) for k in range(fh)]
        rows_out = _three_accumulator_sum(lambda k: x[:, :, :, k:k + out_w], row_w)
        band_in = torch.gather(x, 3, band[:, None, None, :].expand(n, t, plane_h, band.shape[1]))
        band_idx = band[:, None, None, :_TAIL_BAND].expand(n, t, plane_h, _TAIL_BAND)
        rows_out.scatter_(3, band_idx, _sequential_sum(lambda k: band_in[..., k:k + _TAIL_BAND], row_w))
        scores = _three_accumulator_sum(lambda k: rows_out[:, :, k:k + out_h, :], col_w)
        band_rows = torch.gather(rows_out, 3, band_idx)
        scores.scatter_(3, band_idx[:, :, :out_h, :],
                        _sequential_sum(lambda k: band_rows[:, :, k:k + out_h, :], col_w))
        scores = scores.view(n, n_filters, stop - start, out_h, out_w)
        for k in range(stop - start):  # saliency += term, one term after the other
            if total is None:
                total = scores[:, :, 0].clone()
            else:
                total.add_(scores[:, :, k])
    return total


# -- Triton kernels (CUDA) ------------------------------------------------------------------------------
# The same arithmetic as the torch path above, fused: the pyramid resize, the pixels' orientations and
# magnitudes, the cell histograms, fHOG's features, and one kernel for both filter passes and the sum over
# terms. Compiled with
# enable_fp_fusion=False so that no multiply-add is contracted into an FMA; every operation is a float32 add
# or multiply in dlib's order. FrontalFaceDetector checks them against the torch path when it is created and
# falls back to the torch path (with a warning) if they differ or fail.

_TRITON_BLOCK = 128
# A batch's padded pixels at most this many times its photos' own: fewer, larger batches cost fewer launches
# and host work per photo; the Triton kernels skip the padding, the torch path computes it. Batches of small
# images (under 1/_SMALL_BATCH_SHARE of max_batch_pixels, padded: the crops of the finer searches, of many
# sizes) are not split for padding: each batch is a chain of host steps.
_MAX_PADDING = 1.5
_SMALL_BATCH_SHARE = 16
# H200, 64 photos of 1024-1800 px, all levels (BENCHMARKS.md): 37.4 ms of device time per detect call with
# the kernels below, against 94.2 with those they replaced in the same run (one lane per cell and bin for
# the histograms, one program per channel for the resize, 32x32 tiles with a scratch slot for the filters).
_CELL_BLOCK = 128  # cells per program of _cell_hist_kernel (one per thread: BLOCK // 32 warps); 64, 256: same
# The filter kernel (_filter_rows_kernel): _FILTER_ROWS output rows x _FILTER_BLOCK columns per program (HOG
# planes are 10-300 cells wide: narrow blocks waste less on the right edge; every plane row read by a program
# is row-filtered once per term, so its FH - 1 rows below the tile are the overhead), _FILTER_WARPS warps.
# Device ms per detect call: 16x64 2 warps 71.7 (the filters 17.0), 8x64 72.3, 32x64 79.5, 16x128 4 warps
# 74.7, 16x32 1 warp 71.1, 8x32 1 warp 71.0 (the old kernel 94.2), with the old histogram and resize kernels.
_FILTER_ROWS = 16
_FILTER_BLOCK = 64
_FILTER_WARPS = 2
# Shape arguments are not specialised (do_not_specialize): photos of every size would otherwise compile
# new variants (divisible by 16 or not, per argument) for many calls after the first.

if triton is not None:

    @triton.jit
    def _dlib_dot(values, taps, SIZE: tl.constexpr, INTERLEAVED: tl.constexpr, SEQ: tl.constexpr):
        # sum(values[n] * taps[n]) in dlib's two orders: its 8-wide loop's (_three_accumulator_sum: taps 0, 3,
        # 6, ... / 1, 4, 7, ... / 2, 5, 8, ... while three remain, the rest into the first, then acc0 + (acc1 +
        # acc2)) and, with SEQ, its scalar loop's (_sequential_sum) beside it. Each accumulator starts from its
        # first product (as the torch path's do), the others are 0 and add nothing.
        p = values[0] * taps[0]
        acc0 = p
        acc1 = tl.zeros_like(p)
        acc2 = tl.zeros_like(p)
        seq = p
        for n in tl.static_range(1, SIZE):
            p = values[n] * taps[n]
            if n < INTERLEAVED:
                if n % 3 == 0:
                    acc0 = acc0 + p
                elif n % 3 == 1:
                    if n == 1:
                        acc1 = p
                    else:
                        acc1 = acc1 + p
                else:
                    if n == 2:
                        acc2 = p
                    else:
                        acc2 = acc2 + p
            else:
                acc0 = acc0 + p
            if SEQ:
                seq = seq + p
        return acc0 + (acc1 + acc2), seq

    @triton.jit
    def _row_pass(src, r, j, last_row, plane_w, taps, simd, FW: tl.constexpr, INTERLEAVED: tl.constexpr,
                  SEQ: tl.constexpr):
        # The row filter of one term at plane row r, output columns j (a vector): FW shifted loads. Rows past
        # the plane's last and columns past the last output column (clamped by the caller) read values of
        # the plane that only outputs never stored depend on: no masks, every load inside the plane.
        at = src + tl.minimum(r, last_row) * plane_w + j
        values = ()
        for n in tl.static_range(FW):
            values = values + (tl.load(at + n),)
        simd_sum, seq = _dlib_dot(values, taps, FW, INTERLEAVED, SEQ)
        if SEQ:
            simd_sum = tl.where(simd, simd_sum, seq)
        return simd_sum

    @triton.jit
    def _filter_rows(planes_ptr, plane_idx_ptr, row_taps_ptr, col_taps_ptr, total_ptr, b, f, i0, j, tail,
                     hog_rows, hog_cols, n_filters, n_planes, plane_h, plane_w, out_h, out_w,
                     N_SLOTS: tl.constexpr, FW: tl.constexpr, FH: tl.constexpr, ROW_INTERLEAVED: tl.constexpr,
                     COL_INTERLEAVED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SEQ: tl.constexpr):
        # ROWS output rows of one filter at columns j, term after term: each plane row's row filter is
        # computed once and kept in registers while the FH output rows that read it are formed (a window of
        # FH row-filtered rows slides down), and each output row's total gains the term: _filter_scores'
        # operations in its order. SEQ: the block holds scalar (right-edge) columns, whose sums run in dlib's
        # scalar order.
        cols = j < hog_cols
        simd = j < tail
        j_in = tl.minimum(j, out_w - 1)  # lanes past the planes' last window read its columns (not stored)
        totals = ()
        for r in tl.static_range(ROWS):
            totals = totals + (tl.zeros([BLOCK], dtype=tl.float32),)
        for s in range(N_SLOTS):  # a constant of the model (a loop bound Triton's interpreter can run)
            term = f * N_SLOTS + s
            src = planes_ptr + (b * n_planes + tl.load(plane_idx_ptr + term).to(tl.int64)) * plane_h * plane_w
            row_taps = ()
            for n in tl.static_range(FW):
                row_taps = row_taps + (tl.load(row_taps_ptr + term * FW + n),)
            col_taps = ()
            for m in tl.static_range(FH):
                col_taps = col_taps + (tl.load(col_taps_ptr + term * FH + m),)
            window = ()
            for r in tl.static_range(FH - 1):
                window = window + (_row_pass(src, i0 + r, j_in, plane_h - 1, plane_w, row_taps, simd, FW,
                                             ROW_INTERLEAVED, SEQ),)
            summed = ()
            for r in tl.static_range(ROWS):
                window = window + (_row_pass(src, i0 + r + FH - 1, j_in, plane_h - 1, plane_w, row_taps, simd,
                                             FW, ROW_INTERLEAVED, SEQ),)
                simd_sum, seq = _dlib_dot(window, col_taps, FH, COL_INTERLEAVED, SEQ)
                if SEQ:
                    simd_sum = tl.where(simd, simd_sum, seq)
                summed = summed + (totals[r] + simd_sum,)
                window = window[1:]
            totals = summed
        out = total_ptr + ((b * n_filters + f) * out_h + i0) * out_w + j
        for r in tl.static_range(ROWS):
            tl.store(out + r * out_w, totals[r], mask=cols & (i0 + r < hog_rows))

    @triton.jit(do_not_specialize=["n_filters", "n_planes", "plane_h", "plane_w", "out_h", "out_w"])
    def _filter_rows_kernel(planes_ptr, plane_idx_ptr, row_taps_ptr, col_taps_ptr, bounds_ptr, total_ptr,
                            n_filters, n_planes, plane_h, plane_w, out_h, out_w, N_SLOTS: tl.constexpr,
                            FW: tl.constexpr, FH: tl.constexpr, ROW_INTERLEAVED: tl.constexpr,
                            COL_INTERLEAVED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # One program per (image, filter, ROWS output rows, BLOCK columns): _filter_rows, with the scalar
        # order's sums only in blocks that reach the image's scalar columns. bounds (B, 4): the first scalar
        # column, HOG rows and columns, plane rows that valid windows read. Programs outside the image's own
        # rows and columns (padding of smaller photos) do nothing and the total stays 0.
        pid = tl.program_id(0).to(tl.int64)
        row_blocks = tl.cdiv(out_h, ROWS)
        i0 = (pid % row_blocks) * ROWS
        f = (pid // row_blocks) % n_filters
        b = pid // (row_blocks * n_filters)
        j0 = tl.program_id(1) * BLOCK
        j = j0 + tl.arange(0, BLOCK)
        tail = tl.load(bounds_ptr + 4 * b)
        hog_rows = tl.load(bounds_ptr + 4 * b + 1)
        hog_cols = tl.load(bounds_ptr + 4 * b + 2)
        if (i0 < hog_rows) & (j0 < hog_cols):
            if j0 + BLOCK > tail:
                _filter_rows(planes_ptr, plane_idx_ptr, row_taps_ptr, col_taps_ptr, total_ptr, b, f, i0, j, tail,
                             hog_rows, hog_cols, n_filters, n_planes, plane_h, plane_w, out_h, out_w,
                             N_SLOTS, FW, FH, ROW_INTERLEAVED, COL_INTERLEAVED, ROWS, BLOCK, True)
            else:
                _filter_rows(planes_ptr, plane_idx_ptr, row_taps_ptr, col_taps_ptr, total_ptr, b, f, i0, j, tail,
                             hog_rows, hog_cols, n_filters, n_planes, plane_h, plane_w, out_h, out_w,
                             N_SLOTS, FW, FH, ROW_INTERLEAVED, COL_INTERLEAVED, ROWS, BLOCK, False)

    # _DIRECTIONS as constants of the kernels (float32 values, exact as Python floats).
    _DIRECTIONS_C = tl.constexpr(tuple(float(v) for v in _DIRECTIONS.ravel()))

    @triton.jit(do_not_specialize=["height", "width", "grid_h", "grid_w", "ph", "pw"])
    def _orient_mag_kernel(img_ptr, info_ptr, orient_ptr, mag_ptr, height, width, grid_h, grid_w, ph, pw,
                           BLOCK: tl.constexpr):
        # One program per (grid row Y >= 8, block of grid columns X, image): pixel (y, x) = (Y - 12, X - 12)'s
        # orientation bin (uint8) and gradient magnitude v (float32; 0 for pixels that do not vote, whose bin is
        # then 0), _cell_histograms_torch's arithmetic, for every grid position that _cell_hist_kernel reads of
        # the image (rows and columns < 8 * (its cells + 2)): no grid needs clearing first. The grids store position
        # (Y, X) at Y * grid_w + (X % 8) * (grid_w / 8) + X // 8 (grid_w is a multiple of 8): the columns of one
        # phase X % 8 lie together, so that the histogram kernel's lanes (cells 8 columns apart) load
        # consecutive addresses. Image info (int32, 5 per image): visible rows, visible columns, simd_end,
        # cell rows, cell columns.
        Y = tl.program_id(0) + 8
        X = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        b = tl.program_id(2)
        y = Y - 12
        x = X - 12
        info = info_ptr + 5 * b
        stored = (X < 8 * (tl.load(info + 4) + 2)) & (Y < 8 * (tl.load(info + 3) + 2))
        valid = stored & (y >= 1) & (y <= ph) & (y < tl.load(info)) & (x >= 1) & (x <= pw) & (x < tl.load(info + 1))
        simd = x < tl.load(info + 2)
        plane = height * width  # pixels that do not vote (padding of smaller photos) are not read
        px = img_ptr + b.to(tl.int64) * 3 * plane + (y * width + x)
        gx0 = tl.load(px + 1, mask=valid, other=0).to(tl.int32) - tl.load(px - 1, mask=valid, other=0).to(tl.int32)
        gy0 = (tl.load(px + width, mask=valid, other=0).to(tl.int32)
               - tl.load(px - width, mask=valid, other=0).to(tl.int32))
        px1 = px + plane
        gx1 = tl.load(px1 + 1, mask=valid, other=0).to(tl.int32) - tl.load(px1 - 1, mask=valid, other=0).to(tl.int32)
        gy1 = (tl.load(px1 + width, mask=valid, other=0).to(tl.int32)
               - tl.load(px1 - width, mask=valid, other=0).to(tl.int32))
        px2 = px1 + plane
        gx2 = tl.load(px2 + 1, mask=valid, other=0).to(tl.int32) - tl.load(px2 - 1, mask=valid, other=0).to(tl.int32)
        gy2 = (tl.load(px2 + width, mask=valid, other=0).to(tl.int32)
               - tl.load(px2 - width, mask=valid, other=0).to(tl.int32))
        m0 = gx0 * gx0 + gy0 * gy0
        m1 = gx1 * gx1 + gy1 * gy1
        m2 = gx2 * gx2 + gy2 * gy2
        red_green = tl.maximum(m0, m1)
        # SIMD columns: ties go to the later channel.
        s_gx = tl.where(red_green > m2, tl.where(m0 > m1, gx0, gx1), gx2)
        s_gy = tl.where(red_green > m2, tl.where(m0 > m1, gy0, gy1), gy2)
        # Scalar columns: ties go to the earlier channel.
        c_gx = tl.where(m2 > red_green, gx2, tl.where(m1 > m0, gx1, gx0))
        c_gy = tl.where(m2 > red_green, gy2, tl.where(m1 > m0, gy1, gy0))
        gx = tl.where(simd, s_gx, c_gx).to(tl.float32)
        gy = tl.where(simd, s_gy, c_gy).to(tl.float32)
        v = tl.sqrt_rn(tl.maximum(red_green, m2).to(tl.float32))  # 0 where nothing was read
        best = tl.zeros([BLOCK], dtype=tl.float32)
        bin_ = tl.zeros([BLOCK], dtype=tl.int32)
        for o in tl.static_range(9):
            dot = gx * _DIRECTIONS_C[2 * o] + gy * _DIRECTIONS_C[2 * o + 1]
            size = tl.abs(dot)
            better = size > best
            best = tl.where(better, size, best)
            bin_ = tl.where(better, tl.where(dot > 0, o, o + 9), bin_)
        at = b.to(tl.int64) * grid_h * grid_w + (Y * grid_w + (X & 7) * (grid_w >> 3) + (X >> 3))
        tl.store(orient_ptr + at, bin_.to(tl.uint8), mask=stored)
        tl.store(mag_ptr + at, v, mask=stored)

    @triton.jit(do_not_specialize=["n_cr", "n_cc", "grid_h", "grid_w", "n_cells"])
    def _cell_hist_kernel(orient_ptr, mag_ptr, hist_ptr, info_ptr, n_cr, n_cc, grid_h, grid_w, n_cells,
                          BLOCK: tl.constexpr):
        # One lane per cell, its 18 bins in registers: the cell's 16x16 pixel block (_orient_mag_kernel's grids)
        # in raster order, each pixel's vote added to every bin, +0.0 to the bins other than its own (which
        # leaves their sums unchanged: the weights are >= 0). The vote weight of block offset (dy, dx) is
        # _cell_histograms_torch's, whose factors vy, vx depend on dy, dx only: pixel y = 8i + dy - 4 has
        # vy0 = ((dy % 8) + 0.5) / 8, and rows dy < 8 weigh by vy0, the others by 1 - vy0 = (15.5 - dy) / 8
        # (exact dyadic float32 values; likewise for x). SIMD columns x < simd_end compute vy * (vx * v),
        # scalar ones (vy * vx) * v. Cells beyond the image's own (padding of smaller photos) are not stored.
        cell = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = cell < n_cells
        cell = tl.minimum(cell, n_cells - 1)  # dead lanes load (what they load is not stored)
        b = cell // (n_cr * n_cc)
        i = (cell // n_cc) % n_cr
        j = cell % n_cc
        info = info_ptr + 5 * b
        live = inside & (i < tl.load(info + 3)) & (j < tl.load(info + 4))
        simd_dx = tl.load(info + 2) - 8 * j + 4  # offset dx is a SIMD column if dx < simd_dx
        # Grid position (8 (i + 1) + dy, 8 (j + 1) + dx), stored at row * grid_w + (dx % 8) * (grid_w / 8)
        # + j + 1 + dx // 8.
        start = b.to(tl.int64) * grid_h * grid_w + ((8 * (i + 1)) * grid_w + j + 1)
        o_at = orient_ptr + start
        v_at = mag_ptr + start
        phase = grid_w >> 3
        acc = ()
        for k in tl.static_range(18):
            acc = acc + (tl.zeros([BLOCK], dtype=tl.float32),)
        for dy in range(16):
            vy = tl.where(dy < 8, dy + 0.5, 15.5 - dy) * 0.125
            o_row = o_at + dy * grid_w
            v_row = v_at + dy * grid_w
            for dx in tl.static_range(16):
                vx = ((dx + 0.5) if dx < 8 else (15.5 - dx)) * 0.125
                o = tl.load(o_row + (dx % 8) * phase + dx // 8).to(tl.int32)
                v = tl.load(v_row + (dx % 8) * phase + dx // 8)
                w = tl.where(dx < simd_dx, vy * (vx * v), (vy * vx) * v)
                votes = ()
                for k in tl.static_range(18):
                    votes = votes + (tl.where(o == k, acc[k] + w, acc[k]),)
                acc = votes
        out = hist_ptr + cell.to(tl.int64) * 18
        for k in tl.static_range(18):
            tl.store(out + k, acc[k], mask=live)

    @triton.jit(do_not_specialize=["src_h", "src_w", "dst_h", "dst_w"])
    def _resize_rgb_kernel(src_ptr, dst_ptr, rows_i_ptr, rows_f_ptr, rows_d_ptr, cols_i_ptr, cols_f_ptr,
                           cols_d_ptr, info_ptr, src_h, src_w, dst_h, dst_w, BLOCK: tl.constexpr):
        # One program per (output row, block of output columns, image), its three channels: resize_rgb's
        # arithmetic. Tables per image: rows_i (2, dst_h) top, bottom; rows_f (2, dst_h) tb32, 1 - tb32 (rounded
        # from double: not the float32 difference); rows_d (dst_h) tb64; cols_i (dst_w) left; cols_f (dst_w)
        # lr32 (its complement is the float32 difference 1 - lr32, as in resize_rgb); cols_d (dst_w) lr64; info
        # (4): first double-path column, output width and height, last input column. Right neighbours are
        # min(left + 1, last column). Outside the image's output: nothing computed or written. The double path
        # (the right-edge band) is computed only in the column block that holds it.
        r = tl.program_id(0)
        c0 = tl.program_id(1) * BLOCK
        b = tl.program_id(2)
        info = info_ptr + 4 * b
        tail = tl.load(info)
        out_w = tl.load(info + 1)
        if (r < tl.load(info + 2)) & (c0 < out_w):
            c = c0 + tl.arange(0, BLOCK)
            live = c < out_w
            c = tl.minimum(c, out_w - 1)  # table entries of the image's own columns: no masked loads
            row_i = rows_i_ptr + 2 * b * dst_h + r
            row_f = rows_f_ptr + 2 * b * dst_h + r
            top = tl.load(row_i) * src_w
            bottom = tl.load(row_i + dst_h) * src_w
            tb = tl.load(row_f)
            inv_tb = tl.load(row_f + dst_h)
            left = tl.load(cols_i_ptr + b * dst_w + c)
            right = tl.minimum(left + 1, tl.load(info + 3))
            lr = tl.load(cols_f_ptr + b * dst_w + c)
            inv_lr = 1.0 - lr
            w_tl = inv_tb * inv_lr
            w_tr = inv_tb * lr
            w_bl = tb * inv_lr
            w_br = tb * lr
            band = c0 + BLOCK > tail
            plane = src_h * src_w
            src = src_ptr + b.to(tl.int64) * 3 * plane
            dst = dst_ptr + (b.to(tl.int64) * 3 * dst_h + r) * dst_w + c
            for ch in tl.static_range(3):
                p_tl = tl.load(src + ch * plane + top + left)
                p_tr = tl.load(src + ch * plane + top + right)
                p_bl = tl.load(src + ch * plane + bottom + left)
                p_br = tl.load(src + ch * plane + bottom + right)
                acc = w_tl * p_tl.to(tl.float32)
                acc = acc + w_tr * p_tr.to(tl.float32)
                acc = acc + w_bl * p_bl.to(tl.float32)
                acc = acc + w_br * p_br.to(tl.float32)
                out = acc.to(tl.int32)
                if band:
                    tb64 = tl.load(rows_d_ptr + b * dst_h + r)
                    lr64 = tl.load(cols_d_ptr + b * dst_w + c)
                    one_lr = 1.0 - lr64
                    upper = one_lr * p_tl.to(tl.float64) + lr64 * p_tr.to(tl.float64)
                    lower = one_lr * p_bl.to(tl.float64) + lr64 * p_br.to(tl.float64)
                    value = (1.0 - tb64) * upper + tb64 * lower
                    out = tl.where(c < tail, out, value.to(tl.int32))
                tl.store(dst + ch * dst_h * dst_w, out.to(tl.uint8), mask=live)

    @triton.jit(do_not_specialize=["n_cells"])
    def _block_energy_kernel(hist_ptr, norm_ptr, n_cells, BLOCK: tl.constexpr):
        # Per cell: the sum over o = 0..8 of (hist[o] + hist[o + 9])^2, in that order.
        cell = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = cell < n_cells
        base = hist_ptr + cell * 18
        norm = tl.zeros([BLOCK], dtype=tl.float32)
        for o in tl.static_range(9):
            both = tl.load(base + o, mask=live, other=0.0) + tl.load(base + o + 9, mask=live, other=0.0)
            norm = norm + both * both
        tl.store(norm_ptr + cell, norm, mask=live)

    @triton.jit
    def _lane_normaliser(norm_ptr, at, n_cc, live):
        # One of the four 2x2 blocks around a cell: (truncation level, 1 / its block energy's norm * 0.1).
        z1 = tl.load(norm_ptr + at, mask=live, other=1.0)
        z2 = tl.load(norm_ptr + at + 1, mask=live, other=1.0)
        z3 = tl.load(norm_ptr + at + n_cc, mask=live, other=1.0)
        z4 = tl.load(norm_ptr + at + n_cc + 1, mask=live, other=1.0)
        nn = tl.sqrt_rn((((z1 + z2) + z3) + z4) + 0.0001) * 0.2
        return nn, tl.div_rn(tl.zeros_like(nn) + 0.1, nn)

    @triton.jit(do_not_specialize=["hr", "hc", "n_cr", "n_cc", "plane_h", "plane_w", "off_r", "off_c", "n_out"])
    def _features_kernel(hist_ptr, norm_ptr, hog_ptr, planes_ptr, hr, hc, n_cr, n_cc, plane_h, plane_w, off_r,
                         off_c, n_out, BLOCK: tl.constexpr):
        # One lane per feature cell (b, r, c): the 31 features of _fhog's torch path, in its order of float
        # operations, written to the planes at (off_r + r, off_c + c); zeros outside the image's HOG size.
        cell = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = cell < n_out
        c = cell % hc
        r = (cell // hc) % hr
        b = cell // (hr * hc)
        inside = live & (r < tl.load(hog_ptr + 2 * b, mask=live, other=0)) & (
            c < tl.load(hog_ptr + 2 * b + 1, mask=live, other=0))
        at = b * n_cr * n_cc + r * n_cc + c
        # The four lanes (dy, dx) = (1, 1), (0, 1), (1, 0), (0, 0) (_LANE_OFFSETS).
        nn0, n0 = _lane_normaliser(norm_ptr, at + n_cc + 1, n_cc, live)
        nn1, n1 = _lane_normaliser(norm_ptr, at + 1, n_cc, live)
        nn2, n2 = _lane_normaliser(norm_ptr, at + n_cc, n_cc, live)
        nn3, n3 = _lane_normaliser(norm_ptr, at, n_cc, live)
        h = hist_ptr + (at + n_cc + 1) * 18  # dlib's hist[y + 2][x + 2]: this port's cell (r + 1, c + 1)
        out = planes_ptr + b * 31 * plane_h * plane_w + (off_r + r) * plane_w + (off_c + c)
        plane = plane_h * plane_w
        t0 = tl.zeros([BLOCK], dtype=tl.float32)
        t1 = tl.zeros([BLOCK], dtype=tl.float32)
        t2 = tl.zeros([BLOCK], dtype=tl.float32)
        t3 = tl.zeros([BLOCK], dtype=tl.float32)
        for g in tl.static_range(6):  # texture: ((h[3g] + h[3g+1]) + h[3g+2]) added group after group
            for k in tl.static_range(3):
                v = tl.load(h + 3 * g + k, mask=live, other=0.0)
                s0 = tl.minimum(v, nn0) * n0
                s1 = tl.minimum(v, nn1) * n1
                s2 = tl.minimum(v, nn2) * n2
                s3 = tl.minimum(v, nn3) * n3
                tl.store(out + (3 * g + k) * plane, tl.where(inside, (s0 + s1) + (s2 + s3), 0.0), mask=live)
                if k == 0:
                    g0, g1, g2, g3 = s0, s1, s2, s3
                else:
                    g0, g1, g2, g3 = g0 + s0, g1 + s1, g2 + s2, g3 + s3
            t0, t1, t2, t3 = t0 + g0, t1 + g1, t2 + g2, t3 + g3
        for o in tl.static_range(9):
            u = tl.load(h + o, mask=live, other=0.0) + tl.load(h + o + 9, mask=live, other=0.0)
            s0 = tl.minimum(u, nn0) * n0
            s1 = tl.minimum(u, nn1) * n1
            s2 = tl.minimum(u, nn2) * n2
            s3 = tl.minimum(u, nn3) * n3
            tl.store(out + (18 + o) * plane, tl.where(inside, (s0 + s1) + (s2 + s3), 0.0), mask=live)
        tl.store(out + 27 * plane, tl.where(inside, t0 * 0.4714, 0.0), mask=live)
        tl.store(out + 28 * plane, tl.where(inside, t1 * 0.4714, 0.0), mask=live)
        tl.store(out + 29 * plane, tl.where(inside, t2 * 0.4714, 0.0), mask=live)
        tl.store(out + 30 * plane, tl.where(inside, t3 * 0.4714, 0.0), mask=live)

def _resize_rgb_triton(images: torch.Tensor, in_sizes: list[tuple[int, int]], out_sizes: list[tuple[int, int]]
                       ) -> torch.Tensor:
    """resize_rgb as one Triton kernel: same arguments, same pixels inside each output image (outside them:
    unwritten, where resize_rgb leaves junk)."""
    n, _, in_h, in_w = images.shape
    out_h = max(h for h, _ in out_sizes)
    out_w = max(w for _, w in out_sizes) + _TAIL_BAND
    out = torch.empty((n, 3, out_h, out_w), dtype=torch.uint8, device=images.device)
    r = resize_tables(in_sizes, out_sizes, out_h, out_w)
    last_col = np.array([w - 1 for _, w in in_sizes], np.int64)
    oh, ow = (np.array([s[k] for s in out_sizes], np.int64) for k in (0, 1))
    # The kernel's tables (see it): rows_i, rows_f, rows_d, cols_i, cols_f, cols_d, info. It takes each right
    # neighbour as min(left + 1, last column), which resize_tables' are (tests/test_face_detector.py).
    tables = (np.stack([r.top, r.bottom], axis=1).astype(np.int32), np.stack([r.tb32, r.inv_tb32], axis=1), r.tb64,
              r.left.astype(np.int32), r.lr32, r.lr64, np.stack([r.tail, ow, oh, last_col], axis=1).astype(np.int32))
    _resize_rgb_kernel[(out_h, triton.cdiv(out_w, _TRITON_BLOCK), n)](
        images.contiguous(), out, *upload_many(tables, images.device),
        in_h, in_w, out_h, out_w, BLOCK=_TRITON_BLOCK, enable_fp_fusion=False)
    return out


def _fhog_planes_triton(hist: torch.Tensor, hog: np.ndarray, planes: torch.Tensor, offset: tuple[int, int]) -> None:
    """_fhog's normalisation and features (its torch code after the histograms) as two Triton kernels,
    written into ``planes`` (zeros) at ``offset``."""
    n, n_cr, n_cc, _ = hist.shape
    hr, hc = int(hog[:, 0].max()), int(hog[:, 1].max())
    hist = hist.contiguous()
    norm = torch.empty((n, n_cr, n_cc), dtype=torch.float32, device=hist.device)
    cells = n * n_cr * n_cc
    _block_energy_kernel[(triton.cdiv(cells, _TRITON_BLOCK),)](hist, norm, cells, BLOCK=_TRITON_BLOCK,
                                                                enable_fp_fusion=False)
    n_out = n * hr * hc
    _features_kernel[(triton.cdiv(n_out, _TRITON_BLOCK),)](
        hist, norm, upload(hog.astype(np.int64), hist.device), planes, hr, hc, n_cr, n_cc, planes.shape[2],
        planes.shape[3], offset[0], offset[1], n_out, BLOCK=_TRITON_BLOCK, enable_fp_fusion=False)


def _interleaved_taps(size: int) -> int:
    return 3 * max(0, -(-(size - 2) // 3))


def _cell_histograms_triton(images, ph, pw, visible, simd_end, grid_h, grid_w, n_cr, n_cc, cells) -> torch.Tensor:
    """_cell_histograms_torch with two Triton kernels: same arguments, same result bit for bit in each image's
    own ``cells`` (B, 2) (the only ones read)."""
    dev = images.device
    n, _, height, width = images.shape
    images = images.contiguous()
    n_cells = n * n_cr * n_cc
    hist = torch.empty((n, n_cr, n_cc, 18), dtype=torch.float32, device=dev)
    info = np.concatenate([visible, simd_end[:, None], cells], axis=1).astype(np.int32)
    info_t = upload(info, dev)
    orient = torch.empty((n, grid_h, grid_w), dtype=torch.uint8, device=dev)
    mag = torch.empty((n, grid_h, grid_w), dtype=torch.float32, device=dev)
    _orient_mag_kernel[(grid_h - 8, triton.cdiv(grid_w, _TRITON_BLOCK), n)](
        images, info_t, orient, mag, height, width, grid_h, grid_w, ph, pw, BLOCK=_TRITON_BLOCK,
        enable_fp_fusion=False)
    _cell_hist_kernel[(triton.cdiv(n_cells, _CELL_BLOCK),)](
        orient, mag, hist, info_t, n_cr, n_cc, grid_h, grid_w, n_cells, BLOCK=_CELL_BLOCK,
        num_warps=_CELL_BLOCK // 32, enable_fp_fusion=False)
    return hist


def _filter_scores_triton(planes: torch.Tensor, hog: np.ndarray, plane_idx: torch.Tensor, row_taps: torch.Tensor,
                          col_taps: torch.Tensor) -> torch.Tensor:
    """_filter_scores with the Triton kernel: same arguments (less the chunking, which only bounds the torch
    path's intermediate), same result bit for bit at each image's own windows (elsewhere: 0)."""
    dev = planes.device
    planes = planes.contiguous()
    n, n_planes, plane_h, plane_w = planes.shape
    n_filters, n_slots = plane_idx.shape
    fh, fw = col_taps.shape[2], row_taps.shape[2]
    out_h = int(hog[:, 0].max())
    out_w = plane_w - (fw - 1)
    bounds = upload(np.stack([8 * (hog[:, 1] // 8), hog[:, 0], hog[:, 1], hog[:, 0] + fh - 1], 1).astype(np.int64), dev)
    total = torch.zeros((n, n_filters, out_h, out_w), dtype=torch.float32, device=dev)
    grid = (n * n_filters * triton.cdiv(out_h, _FILTER_ROWS), triton.cdiv(out_w, _FILTER_BLOCK))
    _filter_rows_kernel[grid](
        planes, plane_idx.contiguous(), row_taps.contiguous(), col_taps.contiguous(), bounds, total,
        n_filters, n_planes, plane_h, plane_w, out_h, out_w, N_SLOTS=n_slots, FW=fw, FH=fh,
        ROW_INTERLEAVED=_interleaved_taps(fw), COL_INTERLEAVED=_interleaved_taps(fh), ROWS=_FILTER_ROWS,
        BLOCK=_FILTER_BLOCK, num_warps=_FILTER_WARPS, enable_fp_fusion=False)
    return total


BUNDLED_DETECTOR_FILE = os.path.join(os.path.dirname(__file__), "data", "frontal_face_detector.svm")


class FrontalFaceDetector:
    """dlib's frontal face detector, batched, on CPU or CUDA (same code).

    ``path``: a file written by ``dlib.get_frontal_face_detector().save(path)``; by default the copy bundled
    in models/data (byte-identical to what dlib writes, checked by the tests), so that machines without dlib
    can run it.
    """

    def __init__(self, device: str | torch.device = "cpu", path: str | None = None,
                 max_batch_pixels: int | None = None, chunk_elements: int | None = None,
                 use_triton: bool | None = None):
        self.model = read_detector_file(path or BUNDLED_DETECTOR_FILE)
        self.device = torch.device(device)
        on_gpu = self.device.type != "cpu"
        # Photos per call: bounded by pixels (after upsampling) to bound memory. Filter terms per step: on
        # CPU small enough for the operands to stay in cache; on a GPU large enough to fill it.
        self.max_batch_pixels = int(max_batch_pixels or (256 if on_gpu else 4) * 2 ** 20)
        self.chunk_elements = int(chunk_elements or (2 ** 26 if on_gpu else 2 ** 15))
        fh, fw = self.model.fhog_window
        self._fhog_pad = (fh, fw)
        # All filters' separable terms as (filter, slot) with zero terms padding the shorter filters at the
        # end (adding +0.0 after the last term leaves a sum unchanged): the five filters run together.
        banks = [separable_terms(self.model.filters[f]) for f in range(self.model.filters.shape[0])]
        slots = max(len(b) for b in banks)
        plane_idx = np.zeros((len(banks), slots), dtype=np.int64)
        row_taps = np.zeros((len(banks), slots, fw), dtype=np.float32)
        col_taps = np.zeros((len(banks), slots, fh), dtype=np.float32)
        for f, bank in enumerate(banks):
            for k, term in enumerate(bank):
                plane_idx[f, k], row_taps[f, k], col_taps[f, k] = term.plane, term.row_filter, term.col_filter
        self.num_terms = [len(b) for b in banks]
        self._plane_idx = torch.from_numpy(plane_idx).to(self.device)
        self._row_taps = torch.from_numpy(row_taps).to(self.device)
        self._col_taps = torch.from_numpy(col_taps).to(self.device)

        # Triton kernels on CUDA (default when available): each group (fHOG histograms, filters) is used only
        # if it reproduces the torch path bit for bit on the checks here; otherwise a warning and torch.
        self.triton_fhog = self.triton_filters = self.triton_resize = False
        if use_triton is None:
            use_triton = self.device.type == "cuda" and triton is not None
        if use_triton:
            if self.device.type != "cuda" or triton is None:
                raise ValueError("use_triton needs a CUDA device and the triton package")
            for group, check in (("resize", self._check_triton_resize), ("fhog", self._check_triton_fhog),
                                 ("filters", self._check_triton_filters)):
                try:
                    problem = check()
                except Exception as e:  # noqa: BLE001 - a compile or launch failure means: use torch
                    problem = f"{type(e).__name__}: {e}"
                if problem is None:
                    setattr(self, f"triton_{group}", True)
                else:
                    warnings.warn(f"FrontalFaceDetector: Triton {group} kernels disagree with the torch path "
                                  f"({problem}); using the torch path for them", RuntimeWarning, stacklevel=2)

    @property
    def _resize(self):
        """The resampling the detector's pyramid uses: the Triton kernel where it passed its check."""
        return _resize_rgb_triton if self.triton_resize else resize_rgb

    @property
    def use_triton(self) -> bool:
        return self.triton_resize and self.triton_fhog and self.triton_filters

    def _check_triton_resize(self) -> str | None:
        # Two sizes in a batch, down (pyramid_down<6>) and up (pyramid_up), noise and flat areas.
        rng = np.random.default_rng(1)
        sizes = [(97, 143), (61, 37)]
        batch = torch.zeros((2, 3, 97, 143), dtype=torch.uint8)
        for k, (h, w) in enumerate(sizes):
            batch[k, :, :h, :w] = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        batch[1, :, 10:30, 5:25] = 200
        batch = batch.to(self.device)
        for out in ([pyramid_down_size(*z) for z in sizes], [pyramid_up_size(*z) for z in sizes]):
            want = resize_rgb(batch, sizes, out)
            got = _resize_rgb_triton(batch, sizes, out)
            for k, (h, w) in enumerate(out):
                if not torch.equal(want[k, :, :h, :w], got[k, :, :h, :w]):
                    return f"resized pixels differ ({sizes[k]} -> {(h, w)})"
        return None

    def _check_triton_fhog(self) -> str | None:
        # Quantised random images (many equal gradients: every tie rule is exercised), two sizes in a batch.
        rng = np.random.default_rng(0)
        images = [(rng.integers(0, 4, (h, w, 3)) * 60).astype(np.uint8) for h, w in ((93, 141), (130, 77))]
        images[1][40:90, 10:60] = rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)
        sizes = [im.shape[:2] for im in images]
        batch = torch.zeros((2, 3, 130, 141), dtype=torch.uint8)
        for k, im in enumerate(images):
            batch[k, :, :im.shape[0], :im.shape[1]] = torch.from_numpy(im).permute(2, 0, 1)
        batch = batch.to(self.device)
        want, _ = _fhog(batch, sizes, self._fhog_pad, use_triton=False)
        got, _ = _fhog(batch, sizes, self._fhog_pad, use_triton=True)
        if not torch.equal(want, got):
            return f"fHOG planes differ in {int((want != got).sum())} values"
        return None

    def _check_triton_filters(self) -> str | None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        fh, fw = self._fhog_pad
        # Two images of other sizes in a batch, over several row tiles and column blocks of the kernels.
        hog = np.array([[71, 29], [17, 137]])
        rows, cols = int(hog[:, 0].max()), int(hog[:, 1].max())
        planes = torch.zeros((2, NUM_PLANES, rows + fh - 1, cols + fw - 1 + _TAIL_BAND))
        planes[:, :, :rows, :cols] = torch.rand((2, NUM_PLANES, rows, cols), generator=gen)
        planes = planes.to(self.device)
        valid = torch.from_numpy((np.arange(rows)[None, None, :, None] < hog[:, 0, None, None, None])
                                 & (np.arange(cols)[None, None, None, :] < hog[:, 1, None, None, None])
                                 ).to(self.device)  # outside each image's windows the values are junk
        got = _filter_scores_triton(planes, hog, self._plane_idx, self._row_taps, self._col_taps)[..., :cols] * valid
        for chunk in (self.chunk_elements, 1):
            want = _filter_scores(planes, hog, self._plane_idx, self._row_taps, self._col_taps, chunk)[..., :cols] * valid
            if not torch.equal(want, got):
                return f"filter scores differ by up to {float((want - got).abs().max()):.3g}"
        return None

    # -- public API ------------------------------------------------------------------------------------

    def detect(self, images, upsample: int = 0, adjust_threshold: float = 0.0
               ) -> list[list[tuple[tuple[int, int, int, int], float, int]]]:
        """For each image (HxWx3 uint8 RGB numpy array, or torch tensor: photos already on the detector's
        device are not copied again), dlib's ``detector.run(image, upsample, adjust_threshold)`` as a list
        of ((left, top, right, bottom), score, filter index), best first."""
        return [per_run[0] for per_run in self.detect_levels(images, [[0]] * len(images), upsample,
                                                             adjust_threshold)[0]]

    def detect_levels(self, images, runs: list[list[int]], upsample: int = 0, adjust_threshold: float = 0.0,
                      keep_levels: bool = False) -> tuple[list[list[list]], list[list[torch.Tensor]] | None]:
        """Several of dlib's runs per image at once: ``runs[i]`` lists pyramid levels j of image i, and run j is
        ``detector.run(level_j, upsample, adjust_threshold)`` on the image's level j (``pyramid_down(6)``
        applied j times: the detector's own pyramid, so the run scans levels j, j+1, ... of it), as detect()
        reports it (boxes in level j's pixels). Each level is scored once for all of an image's runs, and levels
        finer than its finest run are only resampled. Returns (per image, per run, the detections; with
        ``keep_levels`` (upsample 0 only), per image its levels 0, 1, ... as far as its runs went, HxWx3 views on
        the device, for searches on crops of them; else None)."""
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of HxWx3 uint8 numpy arrays, got {type(images).__name__}")
        if int(upsample) != upsample or upsample < 0:
            raise ValueError(f"upsample must be a non-negative integer, got {upsample!r}")
        upsample = int(upsample)
        if keep_levels and upsample:
            raise ValueError("keep_levels is for runs without upsampling")
        adjust_threshold = float(adjust_threshold)
        for i, image in enumerate(images):
            if not isinstance(image, (np.ndarray, torch.Tensor)):
                raise TypeError(f"images[{i}] must be a numpy array or a torch tensor, got {type(image).__name__}")
            if image.dtype not in (np.uint8, torch.uint8) or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"images[{i}] must be an HxWx3 uint8 RGB array, got shape {image.shape} "
                                 f"dtype {image.dtype}")
        if len(runs) != len(images) or any(not r or min(r) < 0 for r in runs):
            raise ValueError("runs must give each image at least one pyramid level >= 0")
        results: list = [None] * len(images)
        levels = [[] for _ in images] if keep_levels else None
        for batch in self._batches([tuple(im.shape[:2]) for im in images], 4 ** upsample):
            self._detect_batch(images, batch, runs, upsample, adjust_threshold, results, levels)
        return results, levels

    # -- internals -------------------------------------------------------------------------------------

    def _batches(self, shapes: list[tuple[int, int]], factor: int) -> list[list[int]]:
        """Indices of ``shapes`` ((h, w) each) in batches padded to a common size: similar shapes together,
        the padding and the pixels (times ``factor``, the upsampling's growth) bounded."""
        order = sorted(range(len(shapes)), key=lambda i: shapes[i])
        batches: list[list[int]] = []
        batch: list[int] = []
        for i in order:
            grown = batch + [i]
            h_max = max(shapes[j][0] for j in grown)
            w_max = max(shapes[j][1] for j in grown)
            area = sum(shapes[j][0] * shapes[j][1] for j in grown)
            padded = h_max * w_max * len(grown)
            if batch and (padded * factor > self.max_batch_pixels or (
                    padded > _MAX_PADDING * area and padded * factor * _SMALL_BATCH_SHARE > self.max_batch_pixels)):
                batches.append(batch)
                grown = [i]
            batch = grown
        if batch:
            batches.append(batch)
        return batches

    def _detect_batch(self, images, index, runs, upsample, adjust, results, kept_levels):
        sizes = [images[i].shape[:2] for i in index]
        tiny = [k for k, (h, w) in enumerate(sizes) if h == 0 or w == 0]
        for k in tiny:
            results[index[k]] = [[] for _ in runs[index[k]]]
        index = [i for k, i in enumerate(index) if k not in tiny]
        if not index:
            return
        sizes = [tuple(int(v) for v in images[i].shape[:2]) for i in index]
        h_max = max(h for h, _ in sizes)
        w_max = max(w for _, w in sizes)
        batch = self._upload_batch([images[i] for i in index], sizes, h_max, w_max)
        resize = self._resize
        for _ in range(upsample):
            up = [pyramid_up_size(h, w) for h, w in sizes]
            batch = resize(batch, sizes, up)
            sizes = up
        # Per image, per run j: the levels [j, end) it scans (dlib counts a run's levels on its level j); the
        # image is scored from its finest run's level to its last run's end.
        spans = [[(j, j + count_pyramid_levels(*pyramid_level_size(sizes[k], j), self.model)) for j in runs[i]]
                 for k, i in enumerate(index)]
        first = [min(j for j, _ in s) for s in spans]
        last = [max(e for _, e in s) for s in spans]
        scored = []  # per level: (level, scored images, hog sizes, window scores on the device)
        active = list(range(len(index)))
        level = 0
        while active:
            if kept_levels is not None:
                for pos, k in enumerate(active):
                    h, w = sizes[k]
                    kept_levels[index[k]].append(batch[pos, :, :h, :w].permute(1, 2, 0))
            mine = [pos for pos, k in enumerate(active) if first[k] <= level]
            if mine:
                part = batch if len(mine) == len(active) else batch[upload(np.array(mine, dtype=np.int64), self.device)]
                scores = self._score_level(part, [sizes[active[pos]] for pos in mine])
                if scores is not None:
                    scored.append((level, [active[pos] for pos in mine], *scores))
            keep = [j for j, k in enumerate(active) if last[k] > level + 1]
            if not keep:
                break
            batch = batch[upload(np.array(keep, dtype=np.int64), self.device)] if len(keep) < len(active) else batch
            active = [active[j] for j in keep]
            down = [pyramid_down_size(*sizes[k]) for k in active]
            batch = resize(batch, [sizes[k] for k in active], down)
            for k, s in zip(active, down):
                sizes[k] = s
            level += 1
        found = self._windows(scored, adjust, len(index))
        for k, i in enumerate(index):
            results[i] = [self._finish(found[k], j, end, upsample) for j, end in spans[k]]

    def _upload_batch(self, photos, sizes, h_max, w_max) -> torch.Tensor:
        """(B, 3, h_max, w_max) uint8 on the device, photo k in its top-left corner, zeros around. Host photos
        travel in one copy (through pinned memory to a GPU); photos already on the device are not copied."""
        flat, starts, _ = photos_to_device(photos, self.device)
        batch = torch.zeros((len(photos), 3, h_max, w_max), dtype=torch.uint8, device=self.device)
        for k, (start, (h, w)) in enumerate(zip(starts, sizes)):
            batch[k, :, :h, :w] = flat[start:start + h * w].view(h, w, 3).permute(2, 0, 1)
        return batch

    def _score_level(self, batch, sizes):
        """The five filters' window scores of one pyramid level, (B, 5, rows, cols) float32 on the device,
        and the fHOG sizes (B, 2); None when no image of the level has a HOG cell."""
        planes, hog = _fhog(batch, sizes, self._fhog_pad, use_triton=self.triton_fhog)
        if hog.max() == 0:
            return None
        if self.triton_filters:
            return hog, _filter_scores_triton(planes, hog, self._plane_idx, self._row_taps, self._col_taps)
        return hog, _filter_scores(planes, hog, self._plane_idx, self._row_taps, self._col_taps, self.chunk_elements)

    def _windows(self, scored, adjust, n_images):
        """Per image, the windows at or above threshold of every level scored, as (level, scores, filters, rows,
        cols, boxes in level 0's pixels) with arrays, level by level. All levels' hits come to the host in one
        transfer (each transfer waits for the device); the boxes are made once per level for all images."""
        fh, fw = self._fhog_pad
        found = [[] for _ in range(n_images)]
        if not scored:
            return found
        # dlib compares the float32 saliency, promoted to double, with threshold + adjust_threshold (double);
        # the score it reports is saliency - threshold in double. The comparison is made in float32 against
        # float32_at_least (the same windows pass), so the score maps are not copied to double on the device.
        cut = upload(float32_at_least(self.model.thresholds + adjust), self.device)[None, :, None, None]
        flat_hits, flat_saliency = [], []
        hogs = upload_many([hog.astype(np.int64) for _level, _active, hog, _totals in scored], self.device)
        for (_level, _active, _hog, totals), hog_t in zip(scored, hogs):
            out_h, out_w = totals.shape[2], totals.shape[3]
            # Each image's own windows: built on the device from its HOG size (a host mask was megabytes).
            valid = ((torch.arange(out_h, device=self.device)[None, :, None] < hog_t[:, 0, None, None])
                     & (torch.arange(out_w, device=self.device)[None, None, :] < hog_t[:, 1, None, None]))
            flat_hits.append(((totals >= cut) & valid[:, None]).reshape(-1))
            flat_saliency.append(totals.reshape(-1))
        where = torch.nonzero(torch.cat(flat_hits)).squeeze(1)
        both = torch.stack([where.double(), torch.cat(flat_saliency)[where].double()]).cpu().numpy()
        where, saliency = both[0].astype(np.int64), both[1]
        start = 0
        for level, active, _hog, totals in scored:
            stop = start + totals.numel()
            sel = (where >= start) & (where < stop)
            b_idx, f_idx, r_idx, c_idx = np.unravel_index(where[sel] - start, tuple(totals.shape))
            values = saliency[sel] - self.model.thresholds[f_idx]
            start = stop
            # The level's hits, image by image (b_idx is sorted: hits come in (image, filter, row, col) order).
            rows, cols = r_idx + fh // 2, c_idx + fw // 2
            boxes = window_boxes(rows, cols, level, self.model)
            images, firsts = np.unique(b_idx, return_index=True)
            for k, a, b in zip(images, firsts, [*firsts[1:], len(b_idx)]):
                found[active[k]].append((level, values[a:b], f_idx[a:b], rows[a:b], cols[a:b], boxes[a:b]))
        return found

    def _finish(self, found, first, end, upsample):
        """The run on level ``first`` from an image's windows (_windows): those of its levels [first, end), boxes
        in level ``first``'s pixels, dlib's suppression, boxes back down an upsampling."""
        found = [w for w in found if first <= w[0] < end]
        if not found:
            return []
        scores = np.concatenate([w[1] for w in found])
        keys = np.concatenate([np.stack([w[2], np.full(len(w[2]), w[0] - first), w[3], w[4]], axis=1)
                               for w in found])
        # Runs on level 0 (every run of the default full pyramid) take the boxes _windows made.
        boxes = np.concatenate([w[5] if first == 0 else window_boxes(w[3], w[4], w[0] - first, self.model)
                                for w in found])
        kept = non_max_suppression(boxes, scores, keys, self.model)
        boxes = boxes[kept]
        if upsample:
            boxes = boxes_down_after_upsample(boxes, upsample)
        return [((int(b[0]), int(b[1]), int(b[2]), int(b[3])), float(s), int(f))
                for b, s, f in zip(boxes, scores[kept], keys[kept, 0])]


# -- device check (run on the GPU machine, where dlib is absent; the CPU torch path is the one tested against
# dlib): python -m models.face_detector --device cuda tests/data/*.jpg ------------------------------------

def _check_device(argv=None) -> int:
    parser = argparse.ArgumentParser(description="FrontalFaceDetector on a device (Triton and torch paths) "
                                     "against the CPU torch path, bit for bit, and its speed.")
    parser.add_argument("photos", nargs="+", help="RGB photographs (e.g. tests/data/*.jpg)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--path", default=None, help="detector file (default: the bundled one)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in args.photos]
    rng = np.random.default_rng(0)
    images = []
    for photo in photos:  # scales, crops and mirrors of every photo, sizes 0.4x to 2.5x
        for scale in (0.4, 0.7, 1.0, 1.6, 2.5):
            im = Image.fromarray(photo)
            im = np.asarray(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                                      Image.Resampling.BILINEAR))
            top, left = (int(v) for v in rng.integers(0, [max(1, im.shape[0] // 4), max(1, im.shape[1] // 4)]))
            im = im[top:, left:]
            images.append(np.ascontiguousarray(im[:, ::-1] if rng.random() < 0.5 else im))
    cpu = FrontalFaceDetector("cpu", args.path)
    devices = {"torch": FrontalFaceDetector(args.device, args.path, use_triton=False)}
    if args.device.startswith("cuda") and triton is not None:
        devices["triton"] = FrontalFaceDetector(args.device, args.path)
        print(f"triton kernels in use: resize {devices['triton'].triton_resize}, fhog {devices['triton'].triton_fhog}, "
              f"filters {devices['triton'].triton_filters} (False: see the warning above)")
    failures = 0
    for upsample in (0, 1):
        subset = images if upsample == 0 else [im for im in images if im.shape[0] * im.shape[1] <= 700 * 700]
        for adjust in (0.0, -0.5):
            want = cpu.detect(subset, upsample, adjust)
            for name, det in devices.items():
                got = det.detect(subset, upsample, adjust)
                bad = [i for i, (w, g) in enumerate(zip(want, got)) if w != g]
                failures += len(bad)
                print(f"{name} on {args.device}, upsample {upsample}, adjust {adjust}: {len(subset)} images, "
                      f"{sum(map(len, want))} detections, {len(bad)} differ from CPU")
                for i in bad[:5]:
                    print(f"  image {i} {subset[i].shape}\n    cpu:    {want[i]}\n    device: {got[i]}")
    square = np.asarray(Image.fromarray(photos[0]).resize((args.size, args.size), Image.Resampling.BILINEAR))
    batch = [square] * args.batch
    for name, det in devices.items():
        det.detect(batch)
        sync = torch.cuda.synchronize if det.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(3):
            det.detect(batch)
        sync()
        seconds = (time.perf_counter() - start) / 3
        print(f"{name}: {args.batch} photos of {args.size}x{args.size}, upsample 0: {seconds * 1e3:.1f} ms, "
              f"{args.batch / seconds:.0f} photos/s")
    print("OK: device results equal the CPU path" if failures == 0 else f"FAILED: {failures} images differ")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(_check_device())
