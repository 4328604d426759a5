"""dlib's image pyramid (``pyramid_down<6>``, and ``pyramid_up`` for upsampled runs): level sizes, the levels a
run scans, the rectangle maps between levels (``rect_down``, ``rect_up``), the detection windows' boxes, and the
bilinear RGB resize that makes the levels. One definition for both alignment backends: the detection search
(pipeline/) sizes levels and maps rectangles with these functions whichever backend runs the detector.

The resize is dlib's ``resize_image`` (bilinear, RGB) in dlib's arithmetic: columns positioned by a float32
accumulator stepping four columns at a time (its SSE path), weighted in float32; the last few columns of each
row, where the SSE loop stops, computed in double; results truncated to uint8. Order in this module: sizes and
rectangle maps (numpy / plain Python), the resize's plans (its tables: resize_tables.py) and torch reference, its
Triton kernel (compiled with ``enable_fp_fusion=False``: no FMA contraction) and launcher, the probe that trusts the
kernel (models/kernel_check.py), the public ``resize_rgb``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .device import upload, upload_many
from .formats import HogDetectorModel
from .resize_tables import (INFO_COLUMN_AT, INFO_FIELDS, INFO_LAST_COLUMN, INFO_OUT_H, INFO_OUT_W, INFO_ROW_AT,
                            INFO_TAIL, TAIL_BAND, ResizeTableLedger, ResizeTables, resize_kernel_tables,
                            resize_tables)
from ..kernel_check import tl, triton, use_kernels

__all__ = ["PYRAMID_FACTOR", "PYRAMID_RATE_DOWN", "PYRAMID_RATE_UP", "pyramid_down_size",
           "pyramid_level_size", "pyramid_up_size", "count_pyramid_levels", "window_boxes",
           "boxes_down_after_upsample", "rect_down", "rect_up",
           "ResizePlan", "plan_resize", "plan_resizes", "resize_rgb",
           "place_photos", "check_resize_kernels"]

PYRAMID_FACTOR = 6                                          # pyramid_down<6>: each level 5/6 of the previous
PYRAMID_RATE_DOWN = (PYRAMID_FACTOR - 1.0) / PYRAMID_FACTOR  # pyramid_down<6>::point_down: (p - 0.3) * 5/6
PYRAMID_RATE_UP = PYRAMID_FACTOR / (PYRAMID_FACTOR - 1.0)    # pyramid_down<6>::point_up: p * 6/5 + 0.3
PYRAMID_SHIFT = 0.3                                         # the 0.3 of point_down and point_up
_RESIZE_BLOCK = 128  # output columns per program of _resize_rgb_kernel


# -- sizes and rectangle maps (dlib's integer and double rectangle arithmetic) -----------------------------------

def pyramid_down_size(h: int, w: int) -> tuple[int, int]:
    """(h, w) of the next level of dlib's pyramid_down<6>."""
    return ((PYRAMID_FACTOR - 1) * h) // PYRAMID_FACTOR, ((PYRAMID_FACTOR - 1) * w) // PYRAMID_FACTOR


def pyramid_level_size(size: tuple[int, int], levels: int) -> tuple[int, int]:
    """(h, w) of pyramid level ``levels`` of an image of ``size``: pyramid_down_size applied that many times."""
    for _ in range(levels):
        size = pyramid_down_size(*size)
    return size


def pyramid_up_size(h: int, w: int) -> tuple[int, int]:
    # pyramid_down<2>::rect_up of the image rectangle, lround'ed: (0,0)->(3,2), (w-1,h-1)->(2w+1, 2h)
    return 2 * h + 1, 2 * w + 2


def _lround(x: np.ndarray) -> np.ndarray:
    """std::lround: halves away from zero."""
    x = np.asarray(x, dtype=np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def count_pyramid_levels(height: int, width: int, model: HogDetectorModel) -> int:
    """impl::create_fhog_pyramid: levels until the rect_down'ed image rectangle gets smaller than the minimum.
    dlib maps the rectangle's four coordinates each on its own, so the count is the first level at which either
    side falls short (or the model's limit): each side's count is cached by its length alone, and a batch of photos
    of sizes never met before finds both in the cache."""
    limit = model.max_pyramid_levels
    return min(_levels_until_short(width, model.min_level_width, limit),
               _levels_until_short(height, model.min_level_height, limit))


@functools.lru_cache(maxsize=16384)
def _levels_until_short(length: int, minimum: int, limit: int) -> int:
    """The first level k >= 1 at which the side [0, length - 1], rect_down'ed k times, spans fewer than ``minimum``
    pixels; ``limit`` if none before it. Plain Python floats (IEEE doubles, as dlib's): numpy's per-call cost on
    scalars was a visible share of a GPU batch's host time."""
    def lround(v: float) -> int:  # std::lround: halves away from zero
        return int(math.copysign(math.floor(abs(v) + 0.5), v))

    low, high = 0, length - 1
    for level in range(1, limit):
        low, high = lround((low - PYRAMID_SHIFT) * PYRAMID_RATE_DOWN), lround((high - PYRAMID_SHIFT) * PYRAMID_RATE_DOWN)
        if high - low + 1 < minimum:
            return level
    return limit


def _fhog_to_image(p: np.ndarray, fhog_pad: int, cell: int) -> np.ndarray:
    q = (p + 1 - (fhog_pad - 1) // 2) * cell + 1
    return q + np.where(q >= 0, cell // 2, -(cell // 2))


def window_boxes(rows: np.ndarray, cols: np.ndarray, level, model: HogDetectorModel) -> np.ndarray:
    """(n, 4) left, top, right, bottom of detection windows at plane position (row, col) of pyramid ``level`` (one
    level for all, or one per window)."""
    fh, fw = model.fhog_window
    box_h, box_w = fh - 2 * model.padding, fw - 2 * model.padding
    left = cols - box_w // 2
    top = rows - box_h // 2
    pts = np.stack([_fhog_to_image(left, fw, model.cell_size), _fhog_to_image(top, fh, model.cell_size),
                    _fhog_to_image(left + box_w - 1, fw, model.cell_size),
                    _fhog_to_image(top + box_h - 1, fh, model.cell_size)], axis=1).astype(np.float64)
    levels = np.broadcast_to(np.asarray(level, dtype=np.int64), (len(pts),))
    for step in range(int(levels.max()) if len(levels) else 0):
        # pyramid_down<6>::rect_up(rect, level): in double, rounded once at the end; each window stops at its
        # own level.
        pts = np.where((step < levels)[:, None], pts * PYRAMID_RATE_UP + PYRAMID_SHIFT, pts)
    return _lround(pts)


def boxes_down_after_upsample(boxes: np.ndarray, times: int) -> np.ndarray:
    """pyramid_down<2>::rect_down(rect, times), as dlib maps detections of an upsampled image back."""
    pts = boxes.astype(np.float64)
    for _ in range(times):
        pts = pts / 2.0 - np.array([1.25, 0.75, 1.25, 0.75])
    return _lround(pts)


def rect_down(box, levels: int) -> tuple[float, float, float, float]:
    """pyramid_down<6>::rect_down(drectangle, levels): (left, top, right, bottom) in double."""
    pts = [float(v) for v in box]
    for _ in range(levels):
        pts = [(v - PYRAMID_SHIFT) * PYRAMID_RATE_DOWN for v in pts]
    return tuple(pts)


def rect_up(rect, levels: int) -> tuple[int, int, int, int]:
    """pyramid_down<6>::rect_up(rectangle, levels): each corner mapped up in double, then rounded to dlib's
    integer point (floor(x + 0.5))."""
    pts = [float(v) for v in rect]
    for _ in range(levels):
        pts = [v * PYRAMID_RATE_UP + PYRAMID_SHIFT for v in pts]
    return tuple(int(math.floor(v + 0.5)) for v in pts)


# -- the resize: plans and torch reference ----------------------------------------------------------------------

@dataclass
class ResizePlan:
    """One resize of a batch planned on the host (plan_resizes): image b from in_sizes[b] to out_sizes[b], the
    output padded to (out_h, out_w); the kernel's tables: ``info`` (resize_kernel_tables' host array, perhaps
    shared with other resizes, its images from row ``first_image``) pointing into ``ledger``'s tables;
    ``device_tables``: the ledger's tables and the info on the device once uploaded (upload_kernel_tables, or a
    whole pyramid's info in one copy with its other tables: batch_plan.py); the torch path's (``tables``) are made
    when first asked for."""

    in_sizes: list
    out_sizes: list
    out_h: int
    out_w: int
    info: np.ndarray
    ledger: ResizeTableLedger
    first_image: int = 0
    device_tables: tuple | None = None
    _tables: ResizeTables | None = None

    def upload_kernel_tables(self, device, info: torch.Tensor | None = None) -> tuple:
        """The kernel's tables on ``device`` (``info``: the info already there), kept as ``device_tables``."""
        self.device_tables = (*self.ledger.on_device(device), upload(self.info, device) if info is None else info)
        return self.device_tables

    @property
    def tables(self) -> ResizeTables:
        if self._tables is None:
            self._tables = resize_tables(self.in_sizes, self.out_sizes, self.out_h, self.out_w)
        return self._tables


def plan_resizes(steps: list[tuple[list, list]]) -> list[ResizePlan]:
    """resize_rgb's plans for several resizes, each (in_sizes, out_sizes), built on the host (no device work):
    their kernel tables made once for all (one resize_kernel_tables call, each step's images one after the other),
    so that a pyramid's levels share one info table (one upload, no per-level arrays)."""
    if not steps:
        return []
    info, ledger = resize_kernel_tables([s for ins, _ in steps for s in ins], [s for _, outs in steps for s in outs])
    plans, first = [], 0
    for ins, outs in steps:
        plans.append(ResizePlan(list(ins), list(outs), max(h for h, _ in outs), max(w for _, w in outs) + TAIL_BAND,
                                info, ledger, first))
        first += len(outs)
    return plans


def plan_resize(in_sizes: list[tuple[int, int]], out_sizes: list[tuple[int, int]]) -> ResizePlan:
    """resize_rgb's tables for these sizes, built on the host (no device work)."""
    return plan_resizes([(in_sizes, out_sizes)])[0]


def _resize_rgb_torch(images: torch.Tensor, plan: ResizePlan) -> torch.Tensor:
    """resize_rgb's reference: every step a separate eager torch operation (no FMA), the right-edge band in
    double; outside each image's output: junk."""
    dev = images.device
    n, _, in_h, in_w = images.shape
    out_h, r = plan.out_h, plan.tables
    top, bottom, tb64, tb32, inv_tb32 = r.top, r.bottom, r.tb64, r.tb32, r.inv_tb32
    left, right, lr32, inv_lr32, lr64 = r.left, r.right, r.lr32, r.inv_lr32, r.lr64
    band = r.tail[:, None] + np.arange(TAIL_BAND)

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
    band_idx = band_t[:, None, None, :].expand(n, 3, out_h, TAIL_BAND)

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


# -- the resize: Triton kernel ---------------------------------------------------------------------------------

# Shape arguments are not specialised (do_not_specialize): photos of every size would otherwise compile new
# variants (divisible by 16 or not, per argument) for many calls after the first.
if triton is not None:

    # The info table's row width and columns as the kernel's constants (the host's ints: the constants above).
    _INFO_FIELDS_C = tl.constexpr(INFO_FIELDS)
    _INFO_TAIL_C = tl.constexpr(INFO_TAIL)
    _INFO_OUT_W_C = tl.constexpr(INFO_OUT_W)
    _INFO_OUT_H_C = tl.constexpr(INFO_OUT_H)
    _INFO_LAST_COLUMN_C = tl.constexpr(INFO_LAST_COLUMN)
    _INFO_ROW_AT_C = tl.constexpr(INFO_ROW_AT)
    _INFO_COLUMN_AT_C = tl.constexpr(INFO_COLUMN_AT)

    @triton.jit(do_not_specialize=["first_image", "src_h", "src_w", "dst_h", "dst_w"])
    def _resize_rgb_kernel(src_ptr, dst_ptr, rows_i_ptr, rows_f_ptr, rows_d_ptr, cols_i_ptr, cols_f_ptr,
                           cols_d_ptr, info_ptr, first_image, src_h, src_w, dst_h, dst_w, BLOCK: tl.constexpr):
        # One program per (output row, block of output columns, image), its three channels: resize_rgb's
        # arithmetic. Tables (resize_kernel_tables: a ledger's, each pair of lengths' entries one after the
        # other): rows_i (2, its out_h) top, bottom; rows_f (2, out_h) tb32, 1 - tb32 (rounded from double: not
        # the float32 difference); rows_d (out_h) tb64; cols_i (out_w) left; cols_f (out_w) lr32 (its complement
        # is the float32 difference 1 - lr32, as in resize_rgb); cols_d (out_w) lr64; info (INFO_FIELDS per
        # image, columns INFO_*): first double-path column, output width and height, last input column, first
        # row and first column of the image's entries; image b's row is first_image + b (several resizes share
        # one info table: plan_resizes). Right
        # neighbours are min(left + 1, last column). Outside the image's output: nothing computed or written.
        # The double path (the right-edge band) is computed only in the column block that holds it.
        r = tl.program_id(0)
        c0 = tl.program_id(1) * BLOCK
        b = tl.program_id(2)
        info = info_ptr + _INFO_FIELDS_C * (first_image + b)
        tail = tl.load(info + _INFO_TAIL_C)
        out_w = tl.load(info + _INFO_OUT_W_C)
        out_h = tl.load(info + _INFO_OUT_H_C)
        if (r < out_h) & (c0 < out_w):
            c = c0 + tl.arange(0, BLOCK)
            live = c < out_w
            c = tl.minimum(c, out_w - 1)  # table entries of the image's own columns: no masked loads
            row_at = tl.load(info + _INFO_ROW_AT_C) + r
            col_at = tl.load(info + _INFO_COLUMN_AT_C) + c
            row_i = rows_i_ptr + 2 * tl.load(info + _INFO_ROW_AT_C) + r
            row_f = rows_f_ptr + 2 * tl.load(info + _INFO_ROW_AT_C) + r
            top = tl.load(row_i) * src_w
            bottom = tl.load(row_i + out_h) * src_w
            tb = tl.load(row_f)
            inv_tb = tl.load(row_f + out_h)
            left = tl.load(cols_i_ptr + col_at)
            right = tl.minimum(left + 1, tl.load(info + _INFO_LAST_COLUMN_C))
            lr = tl.load(cols_f_ptr + col_at)
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
                    tb64 = tl.load(rows_d_ptr + row_at)
                    lr64 = tl.load(cols_d_ptr + col_at)
                    one_lr = 1.0 - lr64
                    upper = one_lr * p_tl.to(tl.float64) + lr64 * p_tr.to(tl.float64)
                    lower = one_lr * p_bl.to(tl.float64) + lr64 * p_br.to(tl.float64)
                    value = (1.0 - tb64) * upper + tb64 * lower
                    out = tl.where(c < tail, out, value.to(tl.int32))
                tl.store(dst + ch * dst_h * dst_w, out.to(tl.uint8), mask=live)


    @triton.jit(do_not_specialize=["height", "width"])
    def _place_photos_kernel(flat_ptr, starts_ptr, sizes_ptr, out_ptr, height, width, BLOCK: tl.constexpr):
        # One program per (row, block of columns, photo): photo b (HxWx3, interleaved, from pixel starts[b] of
        # the flat (P, 3) buffer; sizes (B, 2) int32) at out[b, channel, y, x] of the (B, 3, height, width)
        # batch, zeros around it.
        y = tl.program_id(0)
        x = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        b = tl.program_id(2)
        h = tl.load(sizes_ptr + 2 * b)
        w = tl.load(sizes_ptr + 2 * b + 1)
        inside = (y < h) & (x < w)
        src = flat_ptr + (tl.load(starts_ptr + b) + y.to(tl.int64) * w + x) * 3
        dst = out_ptr + (b.to(tl.int64) * 3 * height + y) * width + x
        for ch in tl.static_range(3):
            tl.store(dst + ch * height * width, tl.load(src + ch, mask=inside, other=0), mask=x < width)


# -- the resize: launcher, probe, public function --------------------------------------------------------------

def _resize_rgb_triton(images: torch.Tensor, plan: ResizePlan, out: torch.Tensor | None = None) -> torch.Tensor:
    """resize_rgb as one Triton kernel: same arguments, same pixels inside each output image (outside them:
    unwritten, where the torch path leaves junk). The plan's device tables serve where uploaded, else they are
    uploaded here."""
    n, _, in_h, in_w = images.shape
    if out is None:
        out = torch.empty((n, 3, plan.out_h, plan.out_w), dtype=torch.uint8, device=images.device)
    tables = plan.device_tables or plan.upload_kernel_tables(images.device)
    _resize_rgb_kernel[(plan.out_h, triton.cdiv(plan.out_w, _RESIZE_BLOCK), n)](
        images.contiguous(), out, *tables, plan.first_image, in_h, in_w, plan.out_h, plan.out_w, BLOCK=_RESIZE_BLOCK,
        enable_fp_fusion=False)
    return out


def _place_photos_torch(flat: torch.Tensor, starts: list[int], sizes: list[tuple[int, int]], out: torch.Tensor
                        ) -> torch.Tensor:
    """place_photos' reference: the padding zeroed, each photo copied into its slot."""
    out.zero_()
    for k, (start, (h, w)) in enumerate(zip(starts, sizes)):
        out[k, :, :h, :w] = flat[start:start + h * w].view(h, w, 3).permute(2, 0, 1)
    return out


def place_photos(flat: torch.Tensor, starts: list[int], sizes: list[tuple[int, int]], out: torch.Tensor,
                 use_triton: bool | None = None, tables: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> torch.Tensor:
    """The photos of the flat (P, 3) uint8 buffer ``flat`` (photo k from row starts[k], of sizes[k] = (h, w)) in the
    (B, 3, H, W) uint8 batch ``out``, each in its top-left corner, zeros around; returns ``out``. On the kernel path
    one launch for all photos; ``tables``: (starts int64, sizes int32 (B, 2)) on the device, else uploaded here.
    ``use_triton``: the resize group's (models/kernel_check.py)."""
    if not use_kernels("resize", flat.device, use_triton, check_resize_kernels):
        return _place_photos_torch(flat, starts, sizes, out)
    if tables is None:
        tables = upload_many([np.asarray(starts, np.int64), np.asarray(sizes, np.int32).reshape(-1, 2)], flat.device)
    n, _, height, width = out.shape
    _place_photos_kernel[(height, triton.cdiv(width, _RESIZE_BLOCK), n)](
        flat, *tables, out, height, width, BLOCK=_RESIZE_BLOCK)
    return out


def check_resize_kernels(device) -> str | None:
    """The resize kernel against the torch path on ``device``: two sizes in a batch, pyramid_down and pyramid_up,
    noise and flat areas, columns over two kernel blocks. None when equal, else what differs."""
    rng = np.random.default_rng(1)
    sizes = [(97, 143), (61, 37)]
    batch = torch.zeros((2, 3, 97, 143), dtype=torch.uint8)
    for k, (h, w) in enumerate(sizes):
        batch[k, :, :h, :w] = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
    batch[1, :, 10:30, 5:25] = 200
    batch = batch.to(device)
    for out in ([pyramid_down_size(*z) for z in sizes], [pyramid_up_size(*z) for z in sizes]):
        want = resize_rgb(batch, sizes, out, use_triton=False)
        got = resize_rgb(batch, sizes, out, use_triton=True)
        for k, (h, w) in enumerate(out):
            if not torch.equal(want[k, :, :h, :w], got[k, :, :h, :w]):
                return f"resized pixels differ ({sizes[k]} -> {(h, w)})"
    # The photos' placement into a batch: two photos from one flat buffer, the batch wider than a kernel block.
    flat = torch.from_numpy(rng.integers(0, 256, (97 * 143 + 61 * 37, 3), dtype=np.uint8)).to(device)
    shape = (2, 3, 100, 150)
    places = [place_photos(flat, [0, 97 * 143], sizes, torch.full(shape, 7, dtype=torch.uint8, device=device),
                           use_triton=use) for use in (False, True)]
    if not torch.equal(places[0], places[1]):
        return "photos placed into a batch differ"
    return None


def resize_rgb(images: torch.Tensor, in_sizes: list[tuple[int, int]], out_sizes: list[tuple[int, int]],
               use_triton: bool | None = None, plan: ResizePlan | None = None, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """dlib's resize_image(bilinear) of each RGB uint8 image (B, 3, H, W), image b's valid part in_sizes[b],
    to out_sizes[b]; returns (B, 3, max out H, max out W + TAIL_BAND) uint8, equal to dlib inside each output
    image (outside: junk). ``use_triton``: see models/kernel_check.py (None: the kernel on CUDA once
    checked there). ``plan``: plan_resize(in_sizes, out_sizes), made beforehand (its tables perhaps uploaded
    already); ``out``: a contiguous uint8 tensor of the result's shape to write into (returned)."""
    plan = plan or plan_resize(in_sizes, out_sizes)
    if out is not None and tuple(out.shape) != (images.shape[0], 3, plan.out_h, plan.out_w):
        raise ValueError(f"out has shape {tuple(out.shape)}, the result {(images.shape[0], 3, plan.out_h, plan.out_w)}")
    if use_kernels("resize", images.device, use_triton, check_resize_kernels):
        return _resize_rgb_triton(images, plan, out)
    result = _resize_rgb_torch(images, plan)
    return result if out is None else out.copy_(result)
