"""The detector's five filters as dlib scores windows with them: each 10x10x31 filter replaced by its low-rank
approximation (scan_fhog_pyramid::build_fhog_filterbank, with dlib's own SVD: models/alignment/svd.py), applied
as separable row and column filters with dlib's three interleaved accumulators (its scalar order in the
right-edge columns), the terms added in dlib's order.

Every product of the torch reference is materialised (rounded to float32) before it is added: no fused
multiply-add (``matmul``, ``conv2d`` and ``addcmul`` are avoided: they contract or reorder). The Triton kernel
fuses both passes and the sum over terms with the same float32 operations in the same order, compiled with
``enable_fp_fusion=False``. Order in this module: the filter bank, the torch reference, the kernel, its
launcher, the probe, the public ``filter_scores``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .device import upload, upload_many
from .formats import NUM_PLANES, HogDetectorModel
from ..kernel_check import tl, triton, use_kernels
from .level_launch import check_level_count, level_of
from .resize_tables import TAIL_BAND
from .svd import dlib_svd

__all__ = ["SeparableTerm", "separable_terms", "FilterBank", "filter_bounds", "filter_level_table", "FilterLevel",
           "filter_scores_levels", "filter_scores", "check_filter_kernels"]

# The filter kernel (_filter_rows_kernel): _FILTER_ROWS output rows x _FILTER_BLOCK columns per program (HOG
# planes are 10-300 cells wide: narrow blocks waste less on the right edge; every plane row read by a program
# is row-filtered once per term, so its FH - 1 rows below the tile are the overhead), _FILTER_WARPS warps
# (BENCHMARKS.md has the tiles measured).
_FILTER_ROWS = 16
_FILTER_BLOCK = 64
_FILTER_WARPS = 2
# A bound on the filter kernel's registers per thread (ptxas' maxnreg), None: ptxas' choice. ptxas gives the
# 16x64 tile 168 (benchmarks/kernel_registers.py), which allows 3 warps per scheduler; a bound raises
# occupancy at the cost of spills (bench_detector's register variants weigh the two).
_FILTER_MAX_REGISTERS: int | None = None
# The columns of filter_level_table (one row per level), by name for the table and the kernel that reads it: the
# level's first program, the offsets of its planes, scores and bounds rows in their buffers, its image count,
# plane rows and columns, output rows and columns.
_LEVEL_FIELDS = 9
(_LV_FIRST_PROGRAM, _LV_PLANES_AT, _LV_SCORES_AT, _LV_BOUNDS_ROW, _LV_IMAGES, _LV_PLANE_H, _LV_PLANE_W, _LV_OUT_H,
 _LV_OUT_W) = range(_LEVEL_FIELDS)
# The columns of the per-image bounds table (filter_bounds), by name for the table and the kernel that reads it:
# the first scalar column, HOG rows and columns, plane rows that valid windows read.
_BOUNDS_FIELDS = 4
_BOUNDS_TAIL, _BOUNDS_HOG_ROWS, _BOUNDS_HOG_COLS, _BOUNDS_PLANE_ROWS = range(_BOUNDS_FIELDS)
# dlib keeps the singular values at or above max(_MIN_SINGULAR_VALUE, _RELATIVE_SINGULAR_VALUE * largest).
_MIN_SINGULAR_VALUE = 1e-4
_RELATIVE_SINGULAR_VALUE = 0.001


# -- the filter bank -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeparableTerm:
    plane: int
    row_filter: np.ndarray   # (filter width,) float32, applied along x
    col_filter: np.ndarray   # (filter height,) float32, applied along y


def separable_terms(filt: np.ndarray) -> list[SeparableTerm]:
    """scan_fhog_pyramid::build_fhog_filterbank: per plane, dlib's SVD, columns sorted by singular value
    (largest first), singular values below max(1e-4, 0.001 * largest) dropped, each kept term as float32
    (u_j * sqrt(w_j), v_j * sqrt(w_j)) computed in double."""
    terms = []
    for plane in range(filt.shape[0]):
        u, w, v = dlib_svd(filt[plane])
        order = np.argsort(-w, kind="stable")
        w, u, v = w[order], u[:, order], v[:, order]
        thresh = max(_MIN_SINGULAR_VALUE, float(w.max()) * _RELATIVE_SINGULAR_VALUE)
        for j in range(w.size):
            if w[j] >= thresh or w[j] <= -thresh:
                root = math.sqrt(float(w[j]))
                terms.append(SeparableTerm(plane, (v[:, j] * root).astype(np.float32),
                                           (u[:, j] * root).astype(np.float32)))
    return terms


@dataclass(frozen=True)
class FilterBank:
    """All filters' separable terms as (filter, slot) tensors on one device, zero terms padding the shorter
    filters at the end (the torch path adds them: +-0.0 after the last term leaves a sum's value unchanged; the
    kernel skips them), so the filters run together.
    plane_idx (F, S) int64: each term's fHOG plane; row_taps (F, S, fw) and col_taps (F, S, fh) float32;
    num_terms: each filter's own number of terms; term_counts: the same as an (F,) int32 tensor on the bank's
    device."""

    plane_idx: torch.Tensor
    row_taps: torch.Tensor
    col_taps: torch.Tensor
    num_terms: tuple[int, ...]
    term_counts: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "term_counts", torch.tensor(self.num_terms, dtype=torch.int32,
                                                             device=self.plane_idx.device))

    @classmethod
    def from_model(cls, model: HogDetectorModel, device) -> "FilterBank":
        fh, fw = model.fhog_window
        banks = [separable_terms(model.filters[f]) for f in range(model.filters.shape[0])]
        slots = max(len(b) for b in banks)
        plane_idx = np.zeros((len(banks), slots), dtype=np.int64)
        row_taps = np.zeros((len(banks), slots, fw), dtype=np.float32)
        col_taps = np.zeros((len(banks), slots, fh), dtype=np.float32)
        for f, bank in enumerate(banks):
            for k, term in enumerate(bank):
                plane_idx[f, k], row_taps[f, k], col_taps[f, k] = term.plane, term.row_filter, term.col_filter
        return cls(*(torch.from_numpy(a).to(device) for a in (plane_idx, row_taps, col_taps)),
                   tuple(len(b) for b in banks))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(filters, slots, filter height, filter width)."""
        return (*self.plane_idx.shape, self.col_taps.shape[2], self.row_taps.shape[2])

    def select_slots(self, slots) -> "FilterBank":
        """The bank with only the term slots ``slots`` (a few slots make quick probes)."""
        index = torch.as_tensor(list(slots), device=self.plane_idx.device)
        picked = [t.index_select(1, index) for t in (self.plane_idx, self.row_taps, self.col_taps)]
        return FilterBank(*picked, tuple(int((index < n).sum()) for n in self.num_terms))

    def to(self, device) -> "FilterBank":
        return FilterBank(self.plane_idx.to(device), self.row_taps.to(device), self.col_taps.to(device),
                          self.num_terms)


# -- torch reference -------------------------------------------------------------------------------------------

def _interleaved_taps(size: int) -> int:
    """Taps covered by dlib's 3-way interleaved loop (it runs while three taps remain: n < size - 2)."""
    return 3 * max(0, -(-(size - 2) // 3))


def _three_accumulator_sum(shifted, taps):
    """dlib's 8-wide filter loop: taps 0, 3, 6, ... / 1, 4, 7, ... / 2, 5, 8, ... summed in three
    accumulators while three taps remain (n < size - 2), the leftover taps into the first, then
    acc0 + (acc1 + acc2). `shifted(n)` is the input shifted by tap n; `taps[n]` broadcastable weights.
    Every product is materialised (rounded) before it is added: no fused multiply-add."""
    size = len(taps)
    interleaved = _interleaved_taps(size)
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


def _filter_scores_torch(planes: torch.Tensor, hog: np.ndarray, plane_idx: torch.Tensor, row_taps: torch.Tensor,
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
    band = tail_start[:, None] + torch.arange(TAIL_BAND + fw - 1, device=dev)[None, :]
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
        band_idx = band[:, None, None, :TAIL_BAND].expand(n, t, plane_h, TAIL_BAND)
        rows_out.scatter_(3, band_idx, _sequential_sum(lambda k: band_in[..., k:k + TAIL_BAND], row_w))
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


# -- Triton kernel --------------------------------------------------------------------------------------------

# Shape arguments are not specialised (do_not_specialize): photos of every size would otherwise compile new
# variants (divisible by 16 or not, per argument) for many calls after the first.
if triton is not None:

    # filter_level_table's row width and columns as the kernel's constants (the host's ints: the constants above).
    _LEVEL_FIELDS_C = tl.constexpr(_LEVEL_FIELDS)
    _LV_FIRST_PROGRAM_C = tl.constexpr(_LV_FIRST_PROGRAM)
    _LV_PLANES_AT_C = tl.constexpr(_LV_PLANES_AT)
    _LV_SCORES_AT_C = tl.constexpr(_LV_SCORES_AT)
    _LV_BOUNDS_ROW_C = tl.constexpr(_LV_BOUNDS_ROW)
    _LV_PLANE_H_C = tl.constexpr(_LV_PLANE_H)
    _LV_PLANE_W_C = tl.constexpr(_LV_PLANE_W)
    _LV_OUT_H_C = tl.constexpr(_LV_OUT_H)
    _LV_OUT_W_C = tl.constexpr(_LV_OUT_W)
    # The bounds table's row width and the columns the kernel reads, as its constants.
    _BOUNDS_FIELDS_C = tl.constexpr(_BOUNDS_FIELDS)
    _BOUNDS_TAIL_C = tl.constexpr(_BOUNDS_TAIL)
    _BOUNDS_HOG_ROWS_C = tl.constexpr(_BOUNDS_HOG_ROWS)
    _BOUNDS_HOG_COLS_C = tl.constexpr(_BOUNDS_HOG_COLS)

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
    def _filter_rows(planes_ptr, plane_idx_ptr, row_taps_ptr, col_taps_ptr, term_counts_ptr, total_ptr, hits_ptr,
                     cut_ptr, b, f, i0, j, tail, hog_rows, hog_cols, n_filters, n_planes, plane_h, plane_w, out_h,
                     out_w, N_SLOTS: tl.constexpr, FW: tl.constexpr, FH: tl.constexpr, ROW_INTERLEAVED: tl.constexpr,
                     COL_INTERLEAVED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, SEQ: tl.constexpr,
                     HITS: tl.constexpr):
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
        n_terms = tl.load(term_counts_ptr + f)
        for s in range(N_SLOTS):  # a constant of the model (a loop bound Triton's interpreter can run)
            if s < n_terms:  # (the bank's zero padding slots add nothing)
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
        at = ((b * n_filters + f) * out_h + i0) * out_w + j
        if HITS:
            cut = tl.load(cut_ptr + f)
        for r in tl.static_range(ROWS):
            tl.store(total_ptr + at + r * out_w, totals[r], mask=cols & (i0 + r < hog_rows))
            if HITS:
                tl.store(hits_ptr + at + r * out_w, (totals[r] >= cut).to(tl.uint8), mask=cols & (i0 + r < hog_rows))

    @triton.jit(do_not_specialize=["n_levels", "n_filters", "n_planes"])
    def _filter_rows_kernel(planes_ptr, plane_idx_ptr, row_taps_ptr, col_taps_ptr, term_counts_ptr, bounds_ptr,
                            total_ptr, hits_ptr, cut_ptr, levels_ptr, n_levels, n_filters, n_planes,
                            N_SLOTS: tl.constexpr, FW: tl.constexpr, FH: tl.constexpr, ROW_INTERLEAVED: tl.constexpr,
                            COL_INTERLEAVED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                            HITS: tl.constexpr):
        # One program per (level, image, filter, ROWS output rows, BLOCK columns) of every level in the table:
        # _filter_rows, with the scalar order's sums only in blocks that reach the image's scalar columns. Level
        # table (n_levels, _LEVEL_FIELDS) int64 (filter_level_table, columns _LV_*): first program, offsets of
        # the level's planes, scores and bounds rows in their buffers, images, plane rows and columns, output rows
        # and columns. bounds (B, _BOUNDS_FIELDS) per level, columns _BOUNDS_*: the first scalar column, HOG
        # rows and columns, plane rows that valid windows read. Programs outside an image's own rows and columns
        # (padding of smaller photos) do nothing: its scores there keep what they held. HITS: also each window's
        # score >= cut[filter] (uint8), stored where the score is.
        info, pid = level_of(levels_ptr, tl.program_id(0).to(tl.int64), n_levels, _LV_FIRST_PROGRAM_C,
                             _LEVEL_FIELDS_C)
        plane_h = tl.load(info + _LV_PLANE_H_C).to(tl.int32)  # (the sizes as int32, as the kernel's arguments were)
        plane_w = tl.load(info + _LV_PLANE_W_C).to(tl.int32)
        out_h = tl.load(info + _LV_OUT_H_C).to(tl.int32)
        out_w = tl.load(info + _LV_OUT_W_C).to(tl.int32)
        col_blocks = tl.cdiv(out_w, BLOCK)
        j0 = ((pid % col_blocks) * BLOCK).to(tl.int32)
        pid = pid // col_blocks
        row_blocks = tl.cdiv(out_h, ROWS)
        i0 = (pid % row_blocks) * ROWS
        f = (pid // row_blocks) % n_filters
        b = pid // (row_blocks * n_filters)
        j = j0 + tl.arange(0, BLOCK)
        bounds = bounds_ptr + _BOUNDS_FIELDS_C * (tl.load(info + _LV_BOUNDS_ROW_C) + b)
        tail = tl.load(bounds + _BOUNDS_TAIL_C)
        hog_rows = tl.load(bounds + _BOUNDS_HOG_ROWS_C)
        hog_cols = tl.load(bounds + _BOUNDS_HOG_COLS_C)
        planes = planes_ptr + tl.load(info + _LV_PLANES_AT_C)
        at = tl.load(info + _LV_SCORES_AT_C)
        if (i0 < hog_rows) & (j0 < hog_cols):
            if j0 + BLOCK > tail:
                _filter_rows(planes, plane_idx_ptr, row_taps_ptr, col_taps_ptr, term_counts_ptr,
                             total_ptr + at, hits_ptr + at, cut_ptr, b, f, i0, j, tail, hog_rows, hog_cols, n_filters,
                             n_planes, plane_h, plane_w, out_h, out_w, N_SLOTS, FW, FH, ROW_INTERLEAVED,
                             COL_INTERLEAVED, ROWS, BLOCK, True, HITS)
            else:
                _filter_rows(planes, plane_idx_ptr, row_taps_ptr, col_taps_ptr, term_counts_ptr,
                             total_ptr + at, hits_ptr + at, cut_ptr, b, f, i0, j, tail, hog_rows, hog_cols, n_filters,
                             n_planes, plane_h, plane_w, out_h, out_w, N_SLOTS, FW, FH, ROW_INTERLEAVED,
                             COL_INTERLEAVED, ROWS, BLOCK, False, HITS)



# -- launcher ---------------------------------------------------------------------------------------------------

def filter_bounds(hog: np.ndarray, fh: int) -> np.ndarray:
    """The filter kernel's per-image table (B, _BOUNDS_FIELDS) int64 (columns _BOUNDS_*): first scalar column, HOG
    rows and columns, plane rows that valid windows read."""
    bounds = np.zeros((len(hog), _BOUNDS_FIELDS), np.int64)
    bounds[:, _BOUNDS_TAIL] = 8 * (hog[:, 1] // 8)
    bounds[:, _BOUNDS_HOG_ROWS] = hog[:, 0]
    bounds[:, _BOUNDS_HOG_COLS] = hog[:, 1]
    bounds[:, _BOUNDS_PLANE_ROWS] = hog[:, 0] + fh - 1
    return bounds



def filter_level_table(levels: list[tuple[int, int, int, int, int, int, int, int]], n_filters: int) -> np.ndarray:
    """The filter kernel's level table (L, _LEVEL_FIELDS) int64 for levels given as (planes offset, scores offset,
    bounds row, images, plane rows, plane cols, output rows, output cols): the first program of each level
    (column _LV_FIRST_PROGRAM; the launch's program count in the extra last row's), then those fields (columns
    _LV_*, named in the constants section)."""
    table = np.zeros((len(levels) + 1, _LEVEL_FIELDS), np.int64)
    start = 0
    for k, (planes_at, scores_at, bounds_row, n, plane_h, plane_w, out_h, out_w) in enumerate(levels):
        fields = {_LV_FIRST_PROGRAM: start, _LV_PLANES_AT: planes_at, _LV_SCORES_AT: scores_at,
                  _LV_BOUNDS_ROW: bounds_row, _LV_IMAGES: n, _LV_PLANE_H: plane_h, _LV_PLANE_W: plane_w,
                  _LV_OUT_H: out_h, _LV_OUT_W: out_w}
        table[k, list(fields)] = list(fields.values())
        start += n * n_filters * -(-out_h // _FILTER_ROWS) * -(-out_w // _FILTER_BLOCK)
    table[-1, _LV_FIRST_PROGRAM] = start
    return table


def _launch_filter_levels(planes: torch.Tensor, bank: FilterBank, bounds: torch.Tensor, table: torch.Tensor,
                          n_levels: int, n_programs: int, scores: torch.Tensor, hits: torch.Tensor | None = None,
                          cut: torch.Tensor | None = None) -> None:
    """The filter kernel over every level of ``table`` (filter_level_table on the device; ``n_levels`` and
    ``n_programs`` from it on the host): each level's planes, bounds rows and scores in the flat buffers
    ``planes``, ``bounds`` and ``scores`` (and ``hits``, uint8, with ``cut`` per filter, when given)."""
    n_filters, n_slots, fh, fw = bank.shape
    if n_programs == 0:
        return
    check_level_count(n_levels, "filter")
    _filter_rows_kernel[(n_programs,)](
        planes, bank.plane_idx, bank.row_taps, bank.col_taps, bank.term_counts, bounds, scores,
        scores if hits is None else hits, scores if cut is None else cut, table, n_levels, n_filters, NUM_PLANES,
        N_SLOTS=n_slots, FW=fw, FH=fh, ROW_INTERLEAVED=_interleaved_taps(fw), COL_INTERLEAVED=_interleaved_taps(fh),
        ROWS=_FILTER_ROWS, BLOCK=_FILTER_BLOCK, HITS=hits is not None,
        num_warps=_FILTER_WARPS, enable_fp_fusion=False,
        **({} if _FILTER_MAX_REGISTERS is None else {"maxnreg": _FILTER_MAX_REGISTERS}))


def _filter_scores_triton(planes: torch.Tensor, hog: np.ndarray, bank: FilterBank, bounds: torch.Tensor | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """_filter_scores_torch with the Triton kernel (one level): same result bit for bit at each image's own
    windows (elsewhere: 0, or what ``out`` held). ``bounds``: filter_bounds on the device (else uploaded here with
    the level table); ``out``: a contiguous (B, F, hog rows max, plane cols - fw + 1) float32 tensor to write
    into."""
    dev = planes.device
    planes = planes.contiguous()
    n, _, plane_h, plane_w = planes.shape
    n_filters, _, fh, fw = bank.shape
    out_h = int(hog[:, 0].max())
    out_w = plane_w - (fw - 1)
    table = filter_level_table([(0, 0, 0, n, plane_h, plane_w, out_h, out_w)], n_filters)
    if bounds is None:
        table_t, bounds = upload_many([table, filter_bounds(hog, fh)], dev)
    else:
        table_t = upload(table, dev)
    total = torch.zeros((n, n_filters, out_h, out_w), dtype=torch.float32, device=dev) if out is None else out
    _launch_filter_levels(planes, bank, bounds, table_t, 1, int(table[-1, _LV_FIRST_PROGRAM]), total)
    return total


# -- the probe and the public function ---------------------------------------------------------------------

def check_filter_kernels(device, bank: FilterBank, hog=((71, 29), (17, 137)), chunks=(2 ** 26, 1)) -> str | None:
    """The filter kernel against the torch path on ``device`` with ``bank``: random planes of two images of
    other sizes (``hog``: their HOG rows and columns) in a batch, over several row tiles and column blocks of the
    kernel; the torch path with each of ``chunks`` (its chunking must not change a sum). Compared at each
    image's own windows (outside them the kernel writes 0, the torch path junk). None when equal, else what
    differs."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    bank = bank.to(device)
    _filters, _slots, fh, fw = bank.shape
    hog = np.array(hog)
    rows, cols = int(hog[:, 0].max()), int(hog[:, 1].max())
    planes = torch.zeros((len(hog), NUM_PLANES, rows + fh - 1, cols + fw - 1 + TAIL_BAND))
    for k, (h, w) in enumerate(hog):
        planes[k, :, :h + fh - 1, :w + fw - 1] = torch.rand((NUM_PLANES, h + fh - 1, w + fw - 1), generator=gen)
    planes = planes.to(device)
    valid = torch.from_numpy((np.arange(rows)[None, None, :, None] < hog[:, 0, None, None, None])
                             & (np.arange(cols)[None, None, None, :] < hog[:, 1, None, None, None])).to(device)
    got = filter_scores(planes, hog, bank, use_triton=True)[..., :cols] * valid
    if not bool((got != 0).any(dim=(0, 2, 3)).all()):
        return "some filter scored 0 everywhere: nothing was compared"
    for chunk in chunks:
        want = filter_scores(planes, hog, bank, chunk, use_triton=False)[..., :cols] * valid
        if not torch.equal(want, got):
            return f"filter scores (torch chunk {chunk}) differ by up to {float((want - got).abs().max()):.3g}"
    return _check_filter_levels(device, bank, planes, hog, gen)


def _check_filter_levels(device, bank: FilterBank, planes: torch.Tensor, hog: np.ndarray, gen) -> str | None:
    """filter_scores_levels' one launch against the torch path: two levels in one planes buffer (``planes`` and a
    smaller one of one image), scores into a -inf buffer and hits against a cut per filter that some windows pass
    and others do not."""
    n_filters, _slots, fh, fw = bank.shape
    small = torch.zeros((1, NUM_PLANES, 7 + fh - 1, 11 + fw - 1 + TAIL_BAND))
    small[0, :, :7 + fh - 1, :11 + fw - 1] = torch.rand((NUM_PLANES, 7 + fh - 1, 11 + fw - 1), generator=gen)
    flat = torch.cat([planes.reshape(-1), small.to(device).reshape(-1)])
    big_hog, small_hog = np.asarray(hog), np.array([[7, 11]])
    levels = [FilterLevel(flat[:planes.numel()].view(planes.shape), big_hog, 0, 0, 0)]
    first = int(np.prod(levels[0].score_shape(n_filters, fw)))
    levels.append(FilterLevel(flat[planes.numel():].view(small.shape), small_hog, planes.numel(), first, len(hog)))
    total = first + int(np.prod(levels[1].score_shape(n_filters, fw)))
    want = filter_scores(planes, big_hog, bank, use_triton=False)
    valid = _own_windows(big_hog, want.shape, device)[:, None].expand_as(want)
    cut = torch.stack([want[:, f][valid[:, f]].median() for f in range(n_filters)]).float().contiguous()
    results = []
    for use_triton in (False, True):
        scores = torch.full((total,), -torch.inf, device=device)
        hits = torch.zeros((total,), dtype=torch.uint8, device=device)
        filter_scores_levels(flat, levels, bank, scores, hits, cut, use_triton=use_triton)
        results.append((scores, hits))
    (want_scores, want_hits), (got_scores, got_hits) = results
    if not torch.equal(want_scores, got_scores):
        return f"scores of two levels in one launch differ in {int((want_scores != got_scores).sum())} values"
    if not torch.equal(want_hits, got_hits):
        return f"hits of two levels in one launch differ in {int((want_hits != got_hits).sum())} values"
    if not (0 < int(want_hits.sum()) < int(torch.isfinite(want_scores).sum())):
        return "the cut passed all windows or none: hits were not compared"
    return None


@dataclass
class FilterLevel:
    """One level of filter_scores_levels: its planes (B, 31, rows, cols), a view of the levels' planes buffer
    at ``planes_offset``; its HOG sizes (B, 2); its scores at ``scores_offset`` of the scores buffer, shaped
    (B, F, HOG rows max, plane cols - fw + 1); its rows of the bounds table from ``bounds_row``."""

    planes: torch.Tensor
    hog: np.ndarray
    planes_offset: int
    scores_offset: int
    bounds_row: int

    def score_shape(self, n_filters: int, fw: int) -> tuple[int, int, int, int]:
        return (self.planes.shape[0], n_filters, int(self.hog[:, 0].max()), self.planes.shape[3] - (fw - 1))

    def fields(self, n_filters: int, fw: int) -> tuple:
        """This level's entry of filter_level_table."""
        shape = self.score_shape(n_filters, fw)
        return (self.planes_offset, self.scores_offset, self.bounds_row, shape[0], self.planes.shape[2],
                self.planes.shape[3], shape[2], shape[3])


def filter_scores_levels(planes: torch.Tensor, levels: list[FilterLevel], bank: FilterBank, scores: torch.Tensor,
                         hits: torch.Tensor, cut: torch.Tensor, chunk_elements: int = 2 ** 15,
                         use_triton: bool | None = None, tables: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> None:
    """filter_scores of several levels whose planes lie in one flat buffer ``planes``, into the flat buffers
    ``scores`` (float32: each level's scores of its images' own windows; elsewhere they keep what they held) and
    ``hits`` (uint8: score >= cut[filter] there, as on the torch path; elsewhere kept): on the kernel path one
    launch for all levels. ``tables``: (filter_level_table, the levels' filter_bounds stacked) on the device,
    made beforehand (else uploaded here)."""
    n_filters, _, fh, fw = bank.shape
    if not levels:
        return
    if use_kernels("filters", planes.device, use_triton, lambda device: check_filter_kernels(device, bank),
                   variant=bank.shape):
        table = filter_level_table([lv.fields(n_filters, fw) for lv in levels], n_filters)
        if tables is None:
            tables = upload_many([table, np.concatenate([filter_bounds(lv.hog, fh) for lv in levels])], planes.device)
        _launch_filter_levels(planes, bank, tables[1], tables[0], len(levels), int(table[-1, _LV_FIRST_PROGRAM]),
                              scores, hits, cut)
        return
    for lv in levels:
        shape = lv.score_shape(n_filters, fw)
        count = int(np.prod(shape))
        out = scores[lv.scores_offset:lv.scores_offset + count].view(shape)
        filter_scores(lv.planes, lv.hog, bank, chunk_elements, use_triton=False, out=out)
        level_hits = hits[lv.scores_offset:lv.scores_offset + count].view(shape)
        # As the kernel: only each image's own windows get their hit.
        own = _own_windows(lv.hog, shape, planes.device)
        level_hits.copy_(torch.where(own[:, None], torch.ge(out, cut[None, :, None, None]).to(torch.uint8),
                                     level_hits))


def _own_windows(hog: np.ndarray, shape, dev) -> torch.Tensor:
    """(B, rows, cols) bool: each image's own windows (row < its HOG rows, col < its HOG cols)."""
    hog_t = upload(hog.astype(np.int64), dev)
    return ((torch.arange(shape[2], device=dev)[None, :, None] < hog_t[:, 0, None, None])
            & (torch.arange(shape[3], device=dev)[None, None, :] < hog_t[:, 1, None, None]))


def filter_scores(planes: torch.Tensor, hog: np.ndarray, bank: FilterBank, chunk_elements: int = 2 ** 15,
                  use_triton: bool | None = None, bounds: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Every filter's window scores on fHOG ``planes`` (B, 31, plane rows, plane cols), image b's HOG size
    hog[b]: for each filter the sum over its separable terms (in dlib's order) of
    column-filter(row-filter(plane)). Returns (B, F, hog rows max, plane cols - fw + 1) float32: position (i, j)
    scores the window centred at plane (i + fh // 2, j + fw // 2), equal to dlib at each image's own windows.
    ``chunk_elements`` bounds the torch path's intermediates. ``use_triton``: see
    models/kernel_check.py (None: the kernel on CUDA once checked there with this bank's shape).
    ``out``: a contiguous tensor of that shape that gets the scores of each image's own windows and keeps its
    values elsewhere (on both paths), returned; ``bounds``: filter_bounds(hog, fh) on the device (optional)."""
    if use_kernels("filters", planes.device, use_triton, lambda device: check_filter_kernels(device, bank),
                   variant=bank.shape):
        return _filter_scores_triton(planes, hog, bank, bounds, out)
    total = _filter_scores_torch(planes, hog, bank.plane_idx, bank.row_taps, bank.col_taps, chunk_elements)
    if out is None:
        return total
    own = _own_windows(hog, out.shape, planes.device)
    return out.copy_(torch.where(own[:, None], total, out))
