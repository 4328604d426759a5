"""Pillow's resampling in PyTorch, sample for sample: bilinear transforms and the 8-bit Lanczos resize.

Read from Pillow's C code (src/libImaging/Geometry.c, Resample.c; Pillow 13 for the pass order):
  * bilinear transforms (QUAD, AFFINE): output pixel (x, y) samples the source at the map of
    (x + 0.5, y + 0.5) (pixel-edge coordinates); a sample outside [0, w) x [0, h) is black; otherwise the
    neighbours at floor(v - 0.5) and the next one, clamped to the image, are interpolated in float64 (rows,
    then between rows) and the result truncated to uint8;
  * Lanczos resizes (``Image.resize(size, LANCZOS, box=...)``): per output pixel, taps over the input range
    [in0, in1) scaled to the output, the kernel widened by the downscale factor, normalised, rounded to
    22-bit fixed point; one pass per axis, rounded to uint8 in between, in the order the installed Pillow
    picks (VERTICAL_FIRST_RULE). The integer sums are formed exactly in float64 matmuls, on the band of
    inputs each group of outputs reads.
Coefficients are computed on the host (numpy float64, C floats where Pillow has them); pixels stay on the
tensors' device. On CUDA the QUAD transform is one Triton pass (reference, kernel, launcher, probe and the
public ``quad_sample`` in that order below), trusted as models/kernel_check.py trusts kernels.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Sequence

import numpy as np
import torch

from .device import upload, upload_many
from ..kernel_check import tl, triton, use_kernels

__all__ = [
    "ImageSources",
    "VERTICAL_FIRST_RULE",
    "affine_positions",
    "affine_sample_regions",
    "bilinear_sample",
    "lanczos_resize",
    "pixel_centres",
    "quad_positions",
    "quad_sample",
    "check_quad_kernel",
]

# Pillow's fixed point for 8-bit resampling: 32 bits less 8 for the value and 2 for overshoot.
PRECISION_BITS = 22
_QUAD_BLOCK = 128  # output columns per program of _quad_bilinear_kernel


# ----------------------------------------------------------------------------------------------------
# Pillow's bilinear sampling


@dataclass
class ImageSources:
    """Per-output image sources in a flat (P, 3) uint8 buffer: pixel (x, y) of source i is row
    base[i] + y * stride[i] + x; its size is width[i] x height[i]. (C,) int64 tensors."""

    base: torch.Tensor
    stride: torch.Tensor
    width: torch.Tensor
    height: torch.Tensor


def bilinear_sample(flat: torch.Tensor, src: ImageSources, xin: torch.Tensor, yin: torch.Tensor) -> torch.Tensor:
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


def pixel_centres(n: int, device) -> torch.Tensor:
    """x + 0.5 for x in range(n), float64 (Pillow's sample position of output pixel x)."""
    return torch.arange(n, dtype=torch.float64, device=device) + 0.5


def affine_positions(coeffs: Sequence[float], width: int, height: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's affine_transform for six coefficients on a width x height output: source positions (1, height,
    width) as a0*x + a1*y + a2 (and a3..a5), in C's order."""
    X = pixel_centres(width, device).view(1, 1, width)
    Y = pixel_centres(height, device).view(1, height, 1)
    return (coeffs[0] * X + coeffs[1] * Y) + coeffs[2], (coeffs[3] * X + coeffs[4] * Y) + coeffs[5]


def affine_sample_regions(flat: torch.Tensor, src: ImageSources, coeffs: np.ndarray, sizes: np.ndarray,
                          max_pixels: int = 1 << 22) -> torch.Tensor:
    """Pillow's bilinear ``transform((nx, ny), AFFINE, coeffs[i])`` of source ``i`` of ``flat`` for regions of
    different sizes (``sizes[i]`` = (nx, ny)), all in one flat (sum of nx * ny, 3) uint8 buffer, region after
    region, each row-major: what ``affine_positions`` and ``bilinear_sample`` make region by region, the same
    float64 operations in the same order. Output pixels are taken ``max_pixels`` at a time (the float64
    positions and neighbour indices take about 100 bytes a pixel), whatever the number of regions: each pixel
    finds its region on the device (a sorted search of the regions' ends), so the host loops over neither
    regions nor rows."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    ends = np.cumsum(sizes[:, 0] * sizes[:, 1])
    total = int(ends[-1]) if len(ends) else 0
    out = torch.empty((total, 3), dtype=torch.uint8, device=flat.device)
    if total == 0:
        return out
    ends_t, starts_t, nx_t, coeffs_t = upload_many(
        [ends, ends - sizes[:, 0] * sizes[:, 1], sizes[:, 0].copy(), np.asarray(coeffs, dtype=np.float64)],
        flat.device)
    for first in range(0, total, max_pixels):
        ids = torch.arange(first, min(first + max_pixels, total), device=flat.device)
        region = torch.searchsorted(ends_t, ids, right=True)
        local = ids - starts_t[region]
        nx = nx_t[region]
        X = (local % nx).to(torch.float64) + 0.5
        Y = (local // nx).to(torch.float64) + 0.5
        c = coeffs_t[region]
        xin = (c[:, 0] * X + c[:, 1] * Y) + c[:, 2]
        yin = (c[:, 3] * X + c[:, 4] * Y) + c[:, 5]
        pixel_src = ImageSources(src.base[region], src.stride[region], src.width[region], src.height[region])
        n = len(ids)
        out[first:first + n] = bilinear_sample(flat, pixel_src, xin.view(n, 1, 1), yin.view(n, 1, 1)).view(n, 3)
    return out


def quad_positions(coeffs: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's quad_transform for (C, 8) coefficients on a size^2 output: source positions (C, size, size)
    as a0 + a1*x + a2*y + a3*x*y, evaluated in C's order (each product and sum rounded once)."""
    X = pixel_centres(size, coeffs.device).view(1, 1, size)
    Y = X.view(1, size, 1)
    out = []
    for k in (0, 4):
        a0, a1, a2, a3 = (coeffs[:, k + j].view(-1, 1, 1) for j in range(4))
        v = (a0 + a1 * X) + a2 * Y
        v += (a3 * X) * Y
        out.append(v)
    return out[0], out[1]


def _quad_sample_torch(flat: torch.Tensor, src: ImageSources, coeffs: torch.Tensor, size: int) -> torch.Tensor:
    return bilinear_sample(flat, src, *quad_positions(coeffs, size))


if triton is not None:

    @triton.jit(do_not_specialize=["n_images", "size"])
    def _quad_bilinear_kernel(flat_ptr, where_ptr, coeffs_ptr, out_ptr, n_images, size, BLOCK: tl.constexpr):
        # One program per (output image, output row, block of columns): quad_positions then bilinear_sample,
        # the same float64 operations in the same order (compiled without FMA contraction), one pass.
        pid = tl.program_id(0).to(tl.int64)
        y = pid % size
        i = pid // size
        x = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = x < size
        c = coeffs_ptr + i * 8
        X = x.to(tl.float64) + 0.5
        Y = y.to(tl.float64) + 0.5
        xin = (tl.load(c) + tl.load(c + 1) * X) + tl.load(c + 2) * Y
        xin = xin + (tl.load(c + 3) * X) * Y
        yin = (tl.load(c + 4) + tl.load(c + 5) * X) + tl.load(c + 6) * Y
        yin = yin + (tl.load(c + 7) * X) * Y
        base = tl.load(where_ptr + i)
        stride = tl.load(where_ptr + n_images + i)
        w = tl.load(where_ptr + 2 * n_images + i)
        h = tl.load(where_ptr + 3 * n_images + i)
        inside = (xin >= 0) & (xin < w.to(tl.float64)) & (yin >= 0) & (yin < h.to(tl.float64))
        xs = xin - 0.5
        ys = yin - 0.5
        xf = tl.floor(xs)
        yf = tl.floor(ys)
        dx = xs - xf
        dy = ys - yf
        xi = xf.to(tl.int64)
        yi = yf.to(tl.int64)
        x0 = tl.minimum(tl.maximum(xi, 0), w - 1)
        x1 = tl.minimum(tl.maximum(xi + 1, 0), w - 1)
        row0 = base + tl.minimum(tl.maximum(yi, 0), h - 1) * stride
        row1 = base + tl.minimum(tl.maximum(yi + 1, 0), h - 1) * stride
        out = out_ptr + ((i * size + y) * size + x) * 3
        for ch in tl.static_range(3):
            a0 = tl.load(flat_ptr + (row0 + x0) * 3 + ch, mask=live & inside, other=0).to(tl.int32)
            b0 = tl.load(flat_ptr + (row0 + x1) * 3 + ch, mask=live & inside, other=0).to(tl.int32)
            a1 = tl.load(flat_ptr + (row1 + x0) * 3 + ch, mask=live & inside, other=0).to(tl.int32)
            b1 = tl.load(flat_ptr + (row1 + x1) * 3 + ch, mask=live & inside, other=0).to(tl.int32)
            top = (b0 - a0).to(tl.float64) * dx + a0.to(tl.float64)
            bottom = (b1 - a1).to(tl.float64) * dx + a1.to(tl.float64)
            value = top + (bottom - top) * dy
            tl.store(out + ch, tl.where(inside, value.to(tl.int32), 0).to(tl.uint8), mask=live)



def _quad_sample_triton(flat: torch.Tensor, src: ImageSources, coeffs: torch.Tensor, size: int) -> torch.Tensor:
    """_quad_sample_torch as one Triton pass: same arguments, same pixels."""
    n = coeffs.shape[0]
    out = torch.empty((n, size, size, 3), dtype=torch.uint8, device=flat.device)
    where = torch.stack([src.base, src.stride, src.width, src.height]).to(torch.int64).contiguous()
    _quad_bilinear_kernel[(n * size, triton.cdiv(size, _QUAD_BLOCK))](
        flat.contiguous(), where, coeffs.to(torch.float64).contiguous(), out, n, size, BLOCK=_QUAD_BLOCK,
        enable_fp_fusion=False)
    return out


def check_quad_kernel(device) -> str | None:
    """The QUAD kernel against the torch path on ``device``: two sources, positions inside, across and outside
    them, non-square quads. None when equal, else what differs."""
    rng = np.random.default_rng(0)
    flat = upload(rng.integers(0, 256, (61 * 47 + 13 * 29, 3), dtype=np.uint8), device)
    src = ImageSources(*upload(np.array([[0, 61 * 47], [47, 29], [47, 29], [61, 13]], dtype=np.int64), device))
    coeffs = upload(np.array([[-3.3, 0.71, 0.13, 1e-4, -2.1, -0.09, 0.83, 2e-4],
                              [1.7, 0.41, -0.05, -3e-4, 0.3, 0.07, 0.27, 1e-4]]), device)
    want = quad_sample(flat, src, coeffs, 53, use_triton=False)
    got = quad_sample(flat, src, coeffs, 53, use_triton=True)
    return None if torch.equal(want, got) else f"{int((want != got).sum())} values differ"


def quad_sample(flat: torch.Tensor, src: ImageSources, coeffs: torch.Tensor, size: int,
                use_triton: bool | None = None) -> torch.Tensor:
    """Pillow's ``transform((size, size), QUAD, coeffs[i], BILINEAR)`` of each source ``i`` of ``flat``:
    (C, size, size, 3) uint8. ``use_triton``: see models/kernel_check.py (None: on CUDA one Triton
    pass once checked equal to the torch path there; otherwise quad_positions then bilinear_sample)."""
    if use_kernels("quad", flat.device, use_triton, check_quad_kernel):
        return _quad_sample_triton(flat, src, coeffs, size)
    return _quad_sample_torch(flat, src, coeffs, size)


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


# The final resize repeats its sizes for every batch; each shrink has its own box. A few entries serve the
# former without keeping the latter's device copies (about a megabyte each) around.
@functools.lru_cache(maxsize=16)
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
    # Band per group: the inputs any of its outputs reads; one window length L for all groups. (The last
    # group is padded with its last output's values, which change neither its min nor its max.)
    n_groups = -(-out_size // group)
    grouped = np.pad(np.stack([xmin, xmin + xmax]), ((0, 0), (0, n_groups * group - out_size)), mode="edge")
    lo = grouped[0].reshape(n_groups, group).min(axis=1) - first
    hi = grouped[1].reshape(n_groups, group).max(axis=1) - first
    length = int((hi - lo).max())
    starts = np.minimum(lo, used - length)
    # Output o's tap t weighs input xmin[o] + t, row xmin[o] + t - first - starts[o // group] of its group's
    # window, which holds every input the group reads.
    out = np.arange(out_size)
    rows = xmin[:, None] - first - starts[out // group][:, None] + taps[None, :]
    valid = taps[None, :] < xmax[:, None]
    blocks = np.zeros((n_groups, length, group), dtype=np.float64)
    o = np.broadcast_to(out[:, None], rows.shape)[valid]
    blocks[o // group, rows[valid], o % group] = fixed[valid]
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


@functools.lru_cache(maxsize=16)
def _axis_on_device(axis: _AxisWeights, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, input window offsets from axis.first, flattened) of ``axis`` on ``device``, uploaded once."""
    length = axis.weights.shape[1]
    window = (axis.starts[:, None] + np.arange(length)[None, :]).reshape(-1)
    return upload(axis.weights, device), upload(window, device)


def _resample_along_width(x: torch.Tensor, axis: _AxisWeights, row_block: int,
                          first: int | None = None) -> torch.Tensor:
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
