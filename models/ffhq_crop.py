"""The FFHQ crop in PyTorch, batched over faces on any device; equal to pipeline.align.ffhq_crop (Pillow).

    from models.ffhq_crop import crop_faces
    faces = crop_faces(photos, image_index, landmarks, output_size=256, transform_size=1024, device="cuda")

``photos``: HxWx3 uint8 RGB arrays (numpy, or torch tensors on the host or the device); ``image_index[i]``:
the photo of face i; ``landmarks``: (N, 68, 2) dlib points in source pixels. Returns an
(N, output_size, output_size, 3) uint8 tensor on ``device``.

The procedure is NVlabs' ffhq-dataset ``recreate_aligned_images`` (rotate_level=True, no random shift) as
the pipeline's ffhq_crop runs it: the quad from the landmarks, the Lanczos shrink of large faces, the crop, the
reflect padding with blur and median blend, the bilinear QUAD transform to ``transform_size`` and the
Lanczos resize to ``output_size``. The geometry (quads, crop boxes, filter coefficients) is numpy float64
on the host, as in the reference; the pixels are torch on ``device``. The resampling follows Pillow's C
code (src/libImaging/Geometry.c, Resample.c) sample for sample:
  * bilinear transforms (QUAD, AFFINE): output pixel (x, y) samples the source at the map of
    (x + 0.5, y + 0.5); a sample outside [0, w) x [0, h) is black; otherwise neighbours at floor(v - 0.5)
    and the next one, clamped to the image, interpolated in float64 and truncated to uint8;
  * Lanczos resizes: per output pixel, taps over the input range [in0, in1) scaled to the output, the
    kernel widened by the downscale factor, normalised, rounded to 22-bit fixed point; one pass per axis,
    rounded to uint8 in between, in the order the installed Pillow picks (VERTICAL_FIRST_RULE). The
    integer sums are formed exactly in float64 matmuls, on the band of inputs each group of outputs reads.
The padding blur (scipy.ndimage.gaussian_filter, mode 'reflect') is a float32 FFT convolution like the
reference's own, so padded crops may differ from it by one grey level where a value lies near .5.

models/ knows nothing of the pipeline: the quad and crop-box arithmetic repeats the pipeline's (ffhq_quad,
crop_and_pad, the padding step of ffhq_crop) operation for operation. The upright re-prediction of rolled
faces (upright_landmarks) takes the 68-point predictor as a callable.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "CropPlan",
    "ffhq_quads",
    "plan_crop",
    "crop_faces",
    "photos_to_device",
    "lanczos_resize",
    "upright_region",
    "upright_landmarks",
    "eye_roll_degrees",
    "REGION_MARGIN",
]

# Pillow's fixed point for 8-bit resampling: 32 bits less 8 for the value and 2 for overshoot.
PRECISION_BITS = 22
# Margin (fraction of the box side) around the face box in the upright copy; pipeline.align.REGION_MARGIN.
REGION_MARGIN = 0.25


# ----------------------------------------------------------------------------------------------------
# Geometry (host, numpy float64)


def ffhq_quads(landmarks) -> tuple[np.ndarray, np.ndarray]:
    """Oriented crop squares (N, 4, 2) and their sides (N,) from (N, 68, 2) landmarks, float64, with
    pipeline.align.ffhq_quad's operations in its order (so the same floats)."""
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
        return (self.crop[2] - self.crop[0] + self.pad[0] + self.pad[2], self.crop[3] - self.crop[1] + self.pad[1] + self.pad[3])


def _crop_and_pad(quad: np.ndarray, qsize: float, size: tuple[int, int]) -> tuple[tuple, tuple, int]:
    """pipeline.align.crop_and_pad: crop box, padding still needed beyond it, border."""
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
    crop, pad, border = _crop_and_pad(quad, qsize, size)
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
    return CropPlan(shrink, shrink_box, crop, pad, qsize * 0.02, quad, _quad_transform_coefficients(quad, transform_size))


# ----------------------------------------------------------------------------------------------------
# Photos on the device


def photos_to_device(photos: Sequence, device) -> tuple[torch.Tensor, list[int], list[tuple[int, int]]]:
    """All photos in one flat (P, 3) uint8 tensor on ``device``: (buffer, start row of each photo, (w, h) of
    each). Host photos travel as uint8 in one copy from pinned memory to a CUDA device."""
    device = torch.device(device)
    for p in photos:
        if str(p.dtype) not in ("uint8", "torch.uint8") or len(p.shape) != 3 or p.shape[2] != 3:
            raise ValueError(f"expected HxWx3 uint8 photos, got {tuple(p.shape)} {p.dtype}")
    sizes = [(int(p.shape[1]), int(p.shape[0])) for p in photos]
    starts = np.concatenate([[0], np.cumsum([w * h for w, h in sizes])]).astype(np.int64)
    on_host = [not isinstance(p, torch.Tensor) or p.device.type == "cpu" for p in photos]
    buffer = torch.empty((int(starts[-1]), 3), dtype=torch.uint8, device=device)
    staging = None
    if device.type == "cpu":
        staging = buffer
    elif any(on_host):
        staging = torch.empty((int(starts[-1]), 3), dtype=torch.uint8, pin_memory=device.type == "cuda")
    rows = [slice(int(starts[i]), int(starts[i + 1])) for i in range(len(photos))]
    for i, p in enumerate(photos):
        if not on_host[i]:
            continue
        if isinstance(p, torch.Tensor):
            staging[rows[i]].copy_(p.reshape(-1, 3))
        else:
            # Through numpy: a read-only array (np.asarray of a PIL image) needs no torch view of its own.
            staging[rows[i]].numpy()[:] = np.asarray(p).reshape(-1, 3)
    if staging is not None and staging is not buffer:
        # One transfer for all host photos; device photos' rows are written after it, in stream order.
        buffer.copy_(staging, non_blocking=True)
    for i, p in enumerate(photos):
        if not on_host[i]:
            buffer[rows[i]].copy_(p.reshape(-1, 3))
    return buffer, [int(s) for s in starts[:-1]], sizes


def _upload(array: np.ndarray, device) -> torch.Tensor:
    """A small host array on ``device``; to a CUDA device through pinned memory, so that the host does not
    wait for the work already queued on the stream (a pageable copy would)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


# ----------------------------------------------------------------------------------------------------
# Pillow's bilinear sampling


@dataclass
class _Sources:
    """Per-output image sources in a flat (P, 3) uint8 buffer: pixel (x, y) of source i is row
    base[i] + y * stride[i] + x; its size is width[i] x height[i]. (C,) int64 tensors."""

    base: torch.Tensor
    stride: torch.Tensor
    width: torch.Tensor
    height: torch.Tensor


def _bilinear_pillow(flat: torch.Tensor, src: _Sources, xin: torch.Tensor, yin: torch.Tensor) -> torch.Tensor:
    """Pillow's bilinear_filter32RGB at float64 source positions ``xin``, ``yin`` (C, Ho, Wo), Pillow's
    pixel-edge coordinates: (C, Ho, Wo, 3) uint8; black where the position is outside the source.
    ``xin`` and ``yin`` are overwritten (they are the largest float64 buffers in flight)."""
    w, h = src.width.view(-1, 1, 1), src.height.view(-1, 1, 1)
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xs, ys = xin.sub_(0.5), yin.sub_(0.5)
    xf, yf = torch.floor(xs), torch.floor(ys)
    dx, dy = xs.sub_(xf).unsqueeze(-1), ys.sub_(yf).unsqueeze(-1)
    xi, yi = xf.long(), yf.long()
    del xf, yf
    # Out-of-range neighbours take the edge pixel (Pillow's XCLIP/YCLIP and its "y + 1 outside: same row").
    x0 = torch.minimum(xi.clamp(min=0), w - 1)
    x1 = torch.minimum((xi + 1).clamp_(min=0), w - 1)
    base, stride = src.base.view(-1, 1, 1), src.stride.view(-1, 1, 1)
    row0 = base + torch.minimum(yi.clamp(min=0), h - 1) * stride
    row1 = base + torch.minimum((yi + 1).clamp_(min=0), h - 1) * stride
    del xi, yi
    # Pillow interpolates integer pixel values in double, a + (b - a) * d, along rows, then between them;
    # b - a is an exact integer, so it is formed in int16 and only the product and sums in float64.
    def along_row(row: torch.Tensor) -> torch.Tensor:
        a, b = flat[row + x0], flat[row + x1]
        return (b.short() - a.short()).double().mul_(dx).add_(a)

    top = along_row(row0)
    value = top.add_((along_row(row1) - top).mul_(dy))
    # The C cast to UINT8 truncates.
    out = value.to(torch.uint8)
    out.mul_(inside.unsqueeze(-1))
    return out


def _pixel_centres(n: int, device) -> torch.Tensor:
    """x + 0.5 for x in range(n), float64 (Pillow's sample position of output pixel x)."""
    return torch.arange(n, dtype=torch.float64, device=device) + 0.5


def _quad_positions(coeffs: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's quad_transform for (C, 8) coefficients on a size^2 output: source positions (C, size, size)
    as a0 + a1*x + a2*y + a3*x*y, evaluated in C's order (each product and sum rounded once)."""
    X = _pixel_centres(size, coeffs.device).view(1, 1, size)
    Y = X.view(1, size, 1)
    out = []
    for k in (0, 4):
        a0, a1, a2, a3 = (coeffs[:, k + j].view(-1, 1, 1) for j in range(4))
        v = (a0 + a1 * X) + a2 * Y
        v += (a3 * X) * Y
        out.append(v)
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------
# Pillow's Lanczos resize


def _lanczos_kernel(x: np.ndarray) -> np.ndarray:
    """Pillow's lanczos_filter: sinc(x) * sinc(x / 3) on [-3, 3), 0 elsewhere."""

    def sinc(v):
        t = v * math.pi
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(v == 0.0, 1.0, np.sin(t) / t)

    return np.where((x >= -3.0) & (x < 3.0), sinc(x) * sinc(x / 3), 0.0)


@dataclass(frozen=True, eq=False)
class _AxisWeights:
    """One axis of a Lanczos resize as banded blocks: outputs in groups of ``g``; group j reads the input
    window first + starts[j] .. + L and weighs it with weights[j] (L, g) (fixed-point integers as float64;
    zero outside each output's taps)."""

    first: int
    starts: np.ndarray  # (G,) int64
    weights: np.ndarray  # (G, L, g) float64
    out_size: int


def _span(axis: _AxisWeights) -> int:
    """Number of inputs from axis.first that the pass reads."""
    return int(axis.starts.max()) + axis.weights.shape[1]


@functools.lru_cache(maxsize=256)
def _lanczos_weights(in_size: int, in0: float, in1: float, out_size: int, group: int = 32) -> _AxisWeights:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for one axis, in groups of ``group`` outputs.
    ``in0``, ``in1`` arrive as C floats, as in Pillow."""
    in0, in1 = np.float32(in0), np.float32(in1)
    scale = float(np.float32(in1 - in0)) / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centre = float(in0) + (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(centre - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(centre + support + 0.5), in_size).astype(np.int64) - xmin
    taps = np.arange(ksize)
    w = _lanczos_kernel(((taps[None, :] + xmin[:, None]) - centre[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(taps[None, :] < xmax[:, None], w, 0.0)
    total = np.cumsum(w, axis=1)[:, -1]  # C sums the taps in order
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    fixed = np.trunc(w * (1 << PRECISION_BITS) + np.where(w < 0, -0.5, 0.5))
    first = int(xmin.min())
    used = int((xmin + xmax).max()) - first
    dense = np.zeros((used, out_size), dtype=np.float64)
    rows = xmin[:, None] - first + taps[None, :]
    valid = taps[None, :] < xmax[:, None]
    dense[rows[valid], np.nonzero(valid)[0]] = fixed[valid]
    # Band per group: the inputs any of its outputs reads; one window length L for all groups.
    n_groups = -(-out_size // group)
    lo = np.array([xmin[j * group : (j + 1) * group].min() - first for j in range(n_groups)])
    hi = np.array([(xmin + xmax)[j * group : (j + 1) * group].max() - first for j in range(n_groups)])
    length = int((hi - lo).max())
    starts = np.minimum(lo, used - length)
    blocks = np.zeros((n_groups, length, group), dtype=np.float64)
    for j in range(n_groups):
        cols = dense[starts[j] : starts[j] + length, j * group : (j + 1) * group]
        blocks[j, :, : cols.shape[1]] = cols
    return _AxisWeights(first, starts.astype(np.int64), blocks, out_size)


def _clip8(acc: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8 of a fixed-point sum (exact integers in float64) plus its rounding half."""
    acc = torch.floor(acc.add_(1 << (PRECISION_BITS - 1)).div_(1 << PRECISION_BITS))
    return acc.clamp_(0, 255).to(torch.uint8)


def _installed_pillow_version() -> tuple[int, ...]:
    """The installed Pillow's version from package metadata (Pillow itself is not imported); (0,) if none."""
    try:
        return tuple(int(p) for p in version("pillow").split(".")[:2] if p.isdigit())
    except PackageNotFoundError:
        return (0,)


# Pillow 13 resizes vertically first when the height shrinks by more than twice as many pixels as the width
# (Resample.c, ImagingResampleInner); earlier releases always go horizontally first. The passes round to uint8
# in between, so the order changes pixels: follow the Pillow that the CPU path in this environment uses.
VERTICAL_FIRST_RULE = _installed_pillow_version() >= (13,)


@functools.lru_cache(maxsize=256)
def _axis_on_device(axis: _AxisWeights, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, input window offsets from axis.first, flattened) of ``axis`` on ``device``, uploaded once."""
    length = axis.weights.shape[1]
    window = (axis.starts[:, None] + np.arange(length)[None, :]).reshape(-1)
    return _upload(axis.weights, device), _upload(window, device)


def _resample_along_width(x: torch.Tensor, axis: _AxisWeights, row_block: int, first: int | None = None) -> torch.Tensor:
    """One 8-bit Lanczos pass along dim 2 of (B, R, W, 3) uint8: (B, R, out, 3) uint8, ``row_block`` rows at
    a time; input column ``first`` (default axis.first) is the axis' first. The fixed-point sums are exact
    integers in float64 matmuls (products < 2^31, sums < 2^53)."""
    n_groups, length, group = axis.weights.shape
    weights, window = _axis_on_device(axis, x.device)
    window = window + (axis.first if first is None else first)
    parts = []
    for r in range(0, x.shape[1], row_block):
        block = x[:, r : r + row_block]
        B, R = block.shape[:2]
        lines = block.permute(0, 1, 3, 2).index_select(3, window).double()  # (B, R, 3, G * L)
        sums = torch.matmul(lines.view(B * R * 3, n_groups, length).transpose(0, 1), weights)  # (G, BR3, g)
        sums = sums.transpose(0, 1).reshape(B, R, 3, n_groups * group)[..., : axis.out_size]
        parts.append(_clip8(sums).permute(0, 1, 3, 2))
    return torch.cat(parts, dim=1)


def lanczos_resize(x: torch.Tensor, size: tuple[int, int], box: tuple | None = None, row_block: int = 512,
                   vertical_first: bool | None = None) -> torch.Tensor:
    """Pillow's ``Image.resize(size, LANCZOS, box=box)`` of (B, H, W, 3) uint8 images (all the same size
    and box): (B, size[1], size[0], 3) uint8. ``row_block``: lines per float64 matmul (bounds memory).
    ``vertical_first``: None follows the installed Pillow's choice of pass order (VERTICAL_FIRST_RULE)."""
    B, H, W, _ = x.shape
    out_w, out_h = size
    if box is None:
        box = (0, 0, W, H)
    box32 = [np.float32(v) for v in box]
    if (W, H) == (out_w, out_h) and tuple(box) == (0, 0, W, H):
        return x.clone()
    need_h = out_w != W or box32[0] != 0 or box32[2] != out_w
    need_v = out_h != H or box32[1] != 0 or box32[3] != out_h
    if vertical_first is None:
        vertical_first = VERTICAL_FIRST_RULE and H - out_h > 0 and H - out_h > (W - out_w) * 2
    vert = _lanczos_weights(H, box[1], box[3], out_h)
    horiz = _lanczos_weights(W, box[0], box[2], out_w) if need_h else None
    if vertical_first:
        if need_h:
            # Only the columns that the horizontal pass reads (each column is resampled on its own).
            x = x[:, :, horiz.first : horiz.first + _span(horiz)]
        if need_v:
            x = _resample_along_width(x.transpose(1, 2), vert, row_block).transpose(1, 2)
        return (_resample_along_width(x, horiz, row_block, first=0) if need_h else x).contiguous()
    v_first = vert.first
    if need_h:
        # Only the rows that the vertical pass reads.
        x = _resample_along_width(x[:, vert.first : vert.first + _span(vert)], horiz, row_block)
        v_first = 0
    if need_v:
        x = _resample_along_width(x.transpose(1, 2), vert, row_block, first=v_first).transpose(1, 2)
    return x.contiguous()


# ----------------------------------------------------------------------------------------------------
# The padding step


def _reflect_index(n: int, before: int, after: int, edge_repeats: bool, device) -> torch.Tensor:
    """Indices into range(n) of an axis padded by ``before``/``after``: numpy's 'reflect' (d c b | a b c d,
    edge_repeats=False) or 'symmetric' (c b a | a b c, edge_repeats=True), for pads of any length."""
    i = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * n if edge_repeats else 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i < n, i, period - (1 if edge_repeats else 0) - i)


def _fast_fft_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n."""
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


def _gaussian_blur(f: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(f, [sigma, sigma, 0]) (mode 'reflect', truncate 4) of float32 (H, W, 3):
    rows then columns, float32 between, each a float32 FFT convolution (the reference's own method)."""
    radius = int(4.0 * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 / (sigma * sigma) * t * t)
    kernel /= kernel.sum()

    def along_last(a: torch.Tensor) -> torch.Tensor:
        n = a.shape[-1]
        padded = a[..., _reflect_index(n, radius, radius, True, a.device)]
        nfft = _fast_fft_len(n + 2 * radius)
        k = torch.fft.rfft(_upload(kernel.astype(np.float32), a.device), nfft)
        # Circular convolution; outputs from 2r on see no wrap-around (nfft >= n + 2r).
        return torch.fft.irfft(torch.fft.rfft(padded, nfft) * k, nfft)[..., 2 * radius : 2 * radius + n]

    down = along_last(f.permute(1, 2, 0))  # (W, 3, H)
    return along_last(down.permute(2, 1, 0)).permute(0, 2, 1)  # (H, 3, W) -> (H, W, 3)


def _pad_blend_weights(n: int, before: int, after: int) -> np.ndarray:
    """1 - min(i / before, (n - 1 - i) / after) along one axis, as the reference computes it (float32
    positions over numpy int64 pads: float64)."""
    i = np.arange(n)
    return 1.0 - np.minimum(np.float32(i) / np.int64(before), np.float32(n - 1 - i) / np.int64(after))


def _blur_pad(crop: torch.Tensor, pad: tuple, sigma: float) -> torch.Tensor:
    """The FFHQ padding step on an (h, w, 3) uint8 crop: reflect padding, the blur blended in towards the
    edges, then the median; rounded to uint8."""
    h, w, _ = crop.shape
    dev = crop.device
    rows = _reflect_index(h, pad[1], pad[3], False, dev)
    cols = _reflect_index(w, pad[0], pad[2], False, dev)
    f = crop[rows][:, cols].float()
    H, W, _ = f.shape
    mx, my = _pad_blend_weights(W, pad[0], pad[2]), _pad_blend_weights(H, pad[1], pad[3])

    def weight(wy: np.ndarray, wx: np.ndarray) -> torch.Tensor:
        wy32, wx32 = _upload(wy.astype(np.float32), dev), _upload(wx.astype(np.float32), dev)
        return torch.maximum(wy32[:, None, None], wx32[None, :, None])

    if sigma > 1e-15:
        f.lerp_(_gaussian_blur(f, sigma), weight(np.clip(my * 3.0 + 1.0, 0.0, 1.0), np.clip(mx * 3.0 + 1.0, 0.0, 1.0)))
    # np.median: the mean of the two middle values when the count is even.
    flat = f.reshape(-1, 3)
    n = flat.shape[0]
    if n % 2:
        median = flat.kthvalue(n // 2 + 1, dim=0).values
    else:
        median = (flat.kthvalue(n // 2, dim=0).values + flat.kthvalue(n // 2 + 1, dim=0).values) / 2
    f.lerp_(median.expand_as(f), weight(np.clip(my, 0.0, 1.0), np.clip(mx, 0.0, 1.0)))
    return f.round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------
# The batch


def crop_faces(
    photos: Sequence,
    image_index: Sequence[int],
    landmarks,
    output_size: int = 256,
    transform_size: int = 1024,
    enable_padding: bool = True,
    device=None,
    faces_per_chunk: int = 8,
    plans: Sequence[CropPlan] | None = None,
) -> torch.Tensor:
    """FFHQ crops of faces with ``landmarks`` (N, 68, 2) in ``photos[image_index[i]]``: (N, output_size,
    output_size, 3) uint8 on ``device`` (default: the first photo's device). The bilinear transform runs
    ``faces_per_chunk`` faces at a time (its intermediates take about 150 * transform_size^2 bytes per
    face). ``plans``: precomputed :func:`plan_crop` results, otherwise made from the landmarks."""
    if device is None:
        device = photos[0].device if len(photos) and isinstance(photos[0], torch.Tensor) else "cpu"
    device = torch.device(device)
    image_index = [int(i) for i in image_index]
    flat, starts, sizes = photos_to_device(photos, device)
    if plans is None:
        lm = np.asarray(landmarks, dtype=np.float64).reshape(-1, 68, 2)
        if len(lm) != len(image_index):
            raise ValueError(f"{len(lm)} landmark sets for {len(image_index)} image indices")
        quads, qsizes = ffhq_quads(lm)
        plans = [plan_crop(quads[i], qsizes[i], sizes[image_index[i]], output_size, transform_size, enable_padding)
                 for i in range(len(image_index))]
    n = len(plans)
    if n == 0:
        return torch.empty((0, output_size, output_size, 3), dtype=torch.uint8, device=device)

    # Faces whose crop is a window of the photo sample the photo buffer directly; shrunk or padded crops are
    # made first, each its own canvas, and sampled from a second buffer.
    canvases, canvas_faces = [], []
    for i, plan in enumerate(plans):
        if plan.shrink == 1 and not plan.padded:
            continue
        p = image_index[i]
        w, h = sizes[p]
        photo = flat[starts[p] : starts[p] + w * h].view(h, w, 3)
        x0, y0, x1, y1 = plan.crop
        if plan.shrink > 1:
            region = lanczos_resize(photo[None], (x1 - x0, y1 - y0), plan.shrink_box)[0]
        else:
            region = photo[y0:y1, x0:x1]
        if plan.padded:
            region = _blur_pad(region, plan.pad, plan.blur_sigma)
        canvases.append(region.reshape(-1, 3))
        canvas_faces.append(i)
    direct_faces = sorted(set(range(n)) - set(canvas_faces))

    # Where each face samples from, all faces uploaded at once: direct faces first, then canvas faces.
    order = direct_faces + canvas_faces
    canvas_starts = np.concatenate([[0], np.cumsum([len(c) for c in canvases])]).astype(np.int64)
    base = [starts[image_index[i]] + plans[i].crop[1] * sizes[image_index[i]][0] + plans[i].crop[0] for i in direct_faces]
    base += [int(b) for b in canvas_starts[:-1]]
    stride = [sizes[image_index[i]][0] for i in direct_faces] + [plans[i].canvas_size[0] for i in canvas_faces]
    where = _upload(np.array([base, stride, [plans[i].canvas_size[0] for i in order],
                              [plans[i].canvas_size[1] for i in order]], dtype=np.int64), device)
    coeffs = _upload(np.array([plans[i].transform for i in order], dtype=np.float64), device)
    canvas_buffer = torch.cat(canvases) if canvases else None

    crops = []
    for first, count, buffer in ((0, len(direct_faces), flat), (len(direct_faces), len(canvas_faces), canvas_buffer)):
        for c in range(first, first + count, faces_per_chunk):
            chunk = slice(c, min(c + faces_per_chunk, first + count))
            warped = _bilinear_pillow(buffer, _Sources(*where[:, chunk]), *_quad_positions(coeffs[chunk], transform_size))
            if output_size < transform_size:
                warped = lanczos_resize(warped, (output_size, output_size))
            crops.append(warped)
    crops = torch.cat(crops)
    if order == list(range(n)):
        return crops
    out = torch.empty_like(crops)
    out[_upload(np.array(order, dtype=np.int64), device)] = crops
    return out


# ----------------------------------------------------------------------------------------------------
# Upright re-prediction of rolled faces


def eye_roll_degrees(lm) -> float:
    """Angle of the line from the left eye's centre to the right eye's (image axes, y down)."""
    lm = np.asarray(lm, dtype=np.float64)
    d = lm[42:48].mean(axis=0) - lm[36:42].mean(axis=0)
    return math.degrees(math.atan2(d[1], d[0]))


def upright_region(photo: torch.Tensor, box, roll: float, margin: float = REGION_MARGIN):
    """The region around ``box`` (x0, y0, x1, y1) of an (H, W, 3) uint8 photo turned by ``roll`` degrees
    about the box centre (eyes level), Pillow's bilinear AFFINE transform as pipeline.align samples it.

    Returns (region (ny, nx, 3) uint8 on the photo's device, the box in the region (margin, margin,
    margin + box width, margin + box height), to_source) where ``to_source`` maps (n, 2) region points (index
    coordinates) back to the photo."""
    x0, y0, x1, y1 = (float(round(v)) for v in box)
    bw, bh = x1 - x0, y1 - y0
    cx, cy = (x0 + x1 - 1) / 2.0, (y0 + y1 - 1) / 2.0
    # The box keeps its own size on whole pixels of the region (the predictor moves with a pixel of box size).
    m = int(math.ceil(margin * max(bw, bh)))
    nx, ny = int(bw) + 2 * m, int(bh) + 2 * m
    hx, hy = (nx - 1) / 2.0, (ny - 1) / 2.0
    t = math.radians(roll)
    c, s = math.cos(t), math.sin(t)
    # Pillow AFFINE data: source = R @ (out - (hx, hy)) + centre, in pixel-edge coordinates.
    a = (c, -s, cx + 0.5 - c * (hx + 0.5) + s * (hy + 0.5), s, c, cy + 0.5 - s * (hx + 0.5) - c * (hy + 0.5))
    dev = photo.device
    X = _pixel_centres(nx, dev).view(1, 1, nx)
    Y = _pixel_centres(ny, dev).view(1, ny, 1)
    # affine_transform in C's order: a0 * x + a1 * y + a2.
    xin = (a[0] * X + a[1] * Y) + a[2]
    yin = (a[3] * X + a[4] * Y) + a[5]
    H, W = int(photo.shape[0]), int(photo.shape[1])
    where = _upload(np.array([[0], [W], [W], [H]], dtype=np.int64), dev)
    region = _bilinear_pillow(photo.reshape(-1, 3), _Sources(*where), xin, yin)[0]

    def to_source(points) -> np.ndarray:
        d = np.asarray(points, dtype=np.float64) - (hx, hy)
        return np.column_stack([c * d[:, 0] - s * d[:, 1] + cx, s * d[:, 0] + c * d[:, 1] + cy])

    return region, (float(m), float(m), float(m + bw), float(m + bh)), to_source


Predictor = Callable[[torch.Tensor, tuple], np.ndarray]


def upright_landmarks(photo: torch.Tensor, box, predict: Predictor, upright_above: float = 10.0,
                      first: np.ndarray | None = None) -> np.ndarray:
    """68 landmarks of the face in ``box``, re-predicted upright when the eyes are rolled by more than
    ``upright_above`` degrees (pipeline.align.FaceAligner.landmarks' procedure).

    ``predict(image, box)``: a 68-point predictor on an (H, W, 3) uint8 tensor and an (x0, y0, x1, y1) box,
    returning (68, 2) points; ``first``: its answer on ``photo`` when already known. A rolled face is
    predicted again on :func:`upright_region`, and once more when that changed the roll by over 5 degrees
    (a badly rolled first prediction misjudges the roll too).

    models.landmarks.ShapePredictor takes dlib rectangles (inclusive corners), as the CPU path rounds them:
        def predict(image, box):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            return sp.predict([image], [[(x0, y0, x1 - 1, y1 - 1)]])[0][0]
    (with it, the 30 rolled and varied test faces gave the CPU path's quads exactly)."""
    lm = np.asarray(predict(photo, box) if first is None else first, dtype=np.float64)
    roll = eye_roll_degrees(lm)
    if abs(roll) <= upright_above:
        return lm

    def predict_upright(angle: float) -> np.ndarray:
        region, inner_box, to_source = upright_region(photo, box, angle)
        return to_source(predict(region, inner_box))

    lm = predict_upright(roll)
    roll2 = eye_roll_degrees(lm)
    if abs(roll2 - roll) > 5.0:
        lm = predict_upright(roll2)
    return lm
