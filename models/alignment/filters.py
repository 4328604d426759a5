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
from dataclasses import dataclass

import numpy as np
import torch

from .device import upload
from .formats import NUM_PLANES, HogDetectorModel
from ..kernel_check import tl, triton, use_kernels
from .pyramid import TAIL_BAND
from .svd import dlib_svd

__all__ = ["SeparableTerm", "separable_terms", "FilterBank", "filter_bounds", "filter_scores", "check_filter_kernels"]

# The filter kernel (_filter_rows_kernel): _FILTER_ROWS output rows x _FILTER_BLOCK columns per program (HOG
# planes are 10-300 cells wide: narrow blocks waste less on the right edge; every plane row read by a program
# is row-filtered once per term, so its FH - 1 rows below the tile are the overhead), _FILTER_WARPS warps
# (BENCHMARKS.md has the tiles measured).
_FILTER_ROWS = 16
_FILTER_BLOCK = 64
_FILTER_WARPS = 2
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
    filters at the end (adding +0.0 after the last term leaves a sum unchanged), so the filters run together.
    plane_idx (F, S) int64: each term's fHOG plane; row_taps (F, S, fw) and col_taps (F, S, fh) float32;
    num_terms: each filter's own number of terms."""

    plane_idx: torch.Tensor
    row_taps: torch.Tensor
    col_taps: torch.Tensor
    num_terms: tuple[int, ...]

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



# -- launcher ---------------------------------------------------------------------------------------------------

def filter_bounds(hog: np.ndarray, fh: int) -> np.ndarray:
    """The filter kernel's per-image table (B, 4) int64: first scalar column, HOG rows and columns, plane rows that
    valid windows read."""
    return np.stack([8 * (hog[:, 1] // 8), hog[:, 0], hog[:, 1], hog[:, 0] + fh - 1], 1).astype(np.int64)


def _filter_scores_triton(planes: torch.Tensor, hog: np.ndarray, plane_idx: torch.Tensor, row_taps: torch.Tensor,
                          col_taps: torch.Tensor, bounds: torch.Tensor | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """_filter_scores_torch with the Triton kernel: same arguments (less the chunking, which only bounds the torch
    path's intermediate), same result bit for bit at each image's own windows (elsewhere: 0, or what ``out``
    held). ``bounds``: filter_bounds on the device (else uploaded here); ``out``: a contiguous
    (B, F, hog rows max, plane cols - fw + 1) float32 tensor to write into."""
    dev = planes.device
    planes = planes.contiguous()
    n, n_planes, plane_h, plane_w = planes.shape
    n_filters, n_slots = plane_idx.shape
    fh, fw = col_taps.shape[2], row_taps.shape[2]
    out_h = int(hog[:, 0].max())
    out_w = plane_w - (fw - 1)
    if bounds is None:
        bounds = upload(filter_bounds(hog, fh), dev)
    total = torch.zeros((n, n_filters, out_h, out_w), dtype=torch.float32, device=dev) if out is None else out
    grid = (n * n_filters * triton.cdiv(out_h, _FILTER_ROWS), triton.cdiv(out_w, _FILTER_BLOCK))
    _filter_rows_kernel[grid](
        planes, plane_idx.contiguous(), row_taps.contiguous(), col_taps.contiguous(), bounds, total,
        n_filters, n_planes, plane_h, plane_w, out_h, out_w, N_SLOTS=n_slots, FW=fw, FH=fh,
        ROW_INTERLEAVED=_interleaved_taps(fw), COL_INTERLEAVED=_interleaved_taps(fh), ROWS=_FILTER_ROWS,
        BLOCK=_FILTER_BLOCK, num_warps=_FILTER_WARPS, enable_fp_fusion=False)
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
    return None


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
        return _filter_scores_triton(planes, hog, bank.plane_idx, bank.row_taps, bank.col_taps, bounds, out)
    total = _filter_scores_torch(planes, hog, bank.plane_idx, bank.row_taps, bank.col_taps, chunk_elements)
    if out is None:
        return total
    dev = planes.device
    rows, cols = out.shape[2], out.shape[3]
    hog_t = upload(hog.astype(np.int64), dev)
    own = ((torch.arange(rows, device=dev)[None, :, None] < hog_t[:, 0, None, None])
           & (torch.arange(cols, device=dev)[None, None, :] < hog_t[:, 1, None, None]))
    return out.copy_(torch.where(own[:, None], total, out))
