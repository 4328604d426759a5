"""The tables of dlib's bilinear ``resize_image`` (RGB), which pyramid.py's resize reads: where each output row and
column samples its input and with which weights, in dlib's arithmetic. Two forms of the same tables:

- ``resize_tables``: a batch's tables, one row per image (numpy, one pass per table over the whole batch): the torch
  reference path's, and the definition the kernel's are tested against (it is checked against dlib's loops in
  tests/models/alignment/test_face_detector.py).
- ``resize_kernel_tables``: the Triton kernel's, per pair of lengths (in, out) in a ledger shared by every batch
  (``ResizeTableLedger``), each pair's entries made once and uploaded once per device; a batch's own table is
  only where its images' entries lie (``info``).

Row positions: dlib accumulates them in double, one step per row. Columns: its SSE path's four float32 lanes,
truncated; the last columns of a row, where the SSE loop stops, in double (at most TAIL_BAND of them).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TAIL_BAND", "INFO_FIELDS", "INFO_TAIL", "INFO_OUT_W", "INFO_OUT_H", "INFO_LAST_COLUMN", "INFO_ROW_AT",
           "INFO_COLUMN_AT", "ResizeTables", "resize_tables", "ResizeTableLedger", "resize_kernel_tables"]

# Widest right-edge band handled by a scalar path in dlib's loops (resize: < 8 columns; filters: < 8).
TAIL_BAND = 8


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
    photo needs its own, and photos are seldom of a size met before (made per image, they were a large share of
    a GPU batch's detection host time)."""
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
    if np.any(ow - tail > TAIL_BAND):
        b = int(np.argmax(ow - tail))
        raise AssertionError(f"resize {w[b]}->{ow[b]}: {ow[b] - tail[b]} scalar columns")
    simd = np.arange(out_w) < tail[:, None]
    pos = pos.reshape(n, -1)[:, :out_w]
    left = np.where(simd, left_simd.reshape(n, -1)[:, :out_w], 0)
    right = np.where(simd, left + 1, 0)
    lr32 = np.where(simd, pos - left.astype(np.float32), np.float32(0))
    inv_lr32 = (np.float32(1) - lr32).astype(np.float32)
    # Double path, the columns from tail on: a double accumulator from the SSE loop's last position.
    steps = np.repeat(scale[:, None], TAIL_BAND + 1, axis=1)
    steps[:, 0] = -scale + tail * scale
    xs = np.add.accumulate(steps, axis=1)[:, 1:]
    cols = tail[:, None] + np.arange(TAIL_BAND)
    b, k = np.nonzero(cols < ow[:, None])
    lr64 = np.zeros((n, out_w), np.float64)
    band_left = np.floor(xs[b, k]).astype(np.int64)
    left[b, cols[b, k]] = band_left
    right[b, cols[b, k]] = np.minimum(band_left + 1, w[b] - 1)
    lr64[b, cols[b, k]] = xs[b, k] - band_left
    return ResizeTables(top, bottom, tb64, tb64.astype(np.float32), (1 - tb64).astype(np.float32), left, right,
                        lr32, inv_lr32, lr64, tail)


# -- the kernel's tables: per pair of lengths, made once, uploaded once per device ------------------------------

# The resize kernel's per-image info table: its row width and columns (the kernel's constants are made from these):
# first double-path column, output width and height, last input column, first row and first column of the
# image's entries in the ledger's row and column tables.
INFO_FIELDS = 6
INFO_TAIL, INFO_OUT_W, INFO_OUT_H, INFO_LAST_COLUMN, INFO_ROW_AT, INFO_COLUMN_AT = range(INFO_FIELDS)
# Output lengths of one resize_tables call span at most this factor: it pads every pair of a call to its longest
# output, and a pyramid's lengths span a factor of twenty, so one call for all would compute mostly padding.
_GROUP_SPREAD = 1.25
# Entries (rows or columns) a ledger takes before a new one replaces it for the batches planned after. Photos up to
# 1800 px meet about 1.35 million row entries in all (every length's pyramid step); the bound holds the device copy
# under 100 MB of row and 70 MB of column tables.
_LEDGER_ENTRIES = 1 << 22
_FIRST_CAPACITY = 1 << 16


def _length_groups(pairs: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """``pairs`` (in, out) in groups of similar output lengths (the longest at most _GROUP_SPREAD times the group's
    shortest), longest first."""
    groups: list[list[tuple[int, int]]] = []
    for pair in sorted(pairs, key=lambda p: -p[1]):
        if not groups or groups[-1][0][1] > _GROUP_SPREAD * max(pair[1], 1):
            groups.append([])
        groups[-1].append(pair)
    return groups


# Host arrays of a ledger: name, dtype, entries per row or column entry. Rows: (top, bottom) int32 and (tb32,
# inv_tb32) float32, each pair's two halves one after the other, then tb64; columns: left, lr32, lr64.
_ROW_ARRAYS = (("rows_i", np.int32, 2), ("rows_f", np.float32, 2), ("rows_d", np.float64, 1))
_COLUMN_ARRAYS = (("cols_i", np.int32, 1), ("cols_f", np.float32, 1), ("cols_d", np.float64, 1))


class _Arrays:
    """Growing host arrays of one kind (rows or columns), ``end`` entries in use."""

    def __init__(self, layout: tuple):
        self.layout = layout
        self.end = 0
        self.capacity = _FIRST_CAPACITY
        self.arrays = [np.empty(self.capacity * per, dtype) for _, dtype, per in layout]

    def reserve(self, entries: int) -> int:
        """Room for ``entries`` more; returns where they start."""
        start = self.end
        if start + entries > self.capacity:
            self.capacity = max(2 * self.capacity, start + entries)
            self.arrays = [np.concatenate([a[:start * per], np.empty((self.capacity - start) * per, a.dtype)])
                           for a, (_, _, per) in zip(self.arrays, self.layout)]
        self.end += entries
        return start

    def used(self) -> list[np.ndarray]:
        return [a[:self.end * per] for a, (_, _, per) in zip(self.arrays, self.layout)]


class _DeviceCopy:
    """A ledger's tables on one device: tensors of the host arrays' capacity, their first ``rows`` and ``columns``
    entries copied."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []
        self.rows = self.columns = 0
        self.row_capacity = self.column_capacity = 0
        self.stream = None


class ResizeTableLedger:
    """The resize kernel's tables of every (in, out) pair of lengths met so far, rows and columns apart (rows depend
    on the two heights only, columns on the two widths, so photos of any size share them, and a pyramid's levels
    meet the same lengths again and again), each pair's entries one after the other in growing host arrays, and a
    copy on each device the batches ran on. A batch's table is then only its images' info (where each image's pair
    lies): no per-batch concatenation or upload of the tables themselves, and each pair is uploaded once.

    Append-only and shared by the threads that plan batches: offsets never change, so a plan keeps the ledger (and
    the device tensors) it was made with; on a GPU, new entries are copied on a stream of the ledger's own and
    waited for before any batch is given tensors that hold them, so a kernel on any stream reads them complete."""

    def __init__(self):
        self._lock = threading.Lock()
        self.rows: dict = {}      # (h, oh) -> first row entry
        self.columns: dict = {}   # (w, ow) -> (first column entry, first double-path column)
        self._row_arrays = _Arrays(_ROW_ARRAYS)
        self._column_arrays = _Arrays(_COLUMN_ARRAYS)
        self._devices: dict[str, _DeviceCopy] = {}

    @property
    def entries(self) -> int:
        return max(self._row_arrays.end, self._column_arrays.end)

    def missing(self, row_pairs, column_pairs) -> tuple[set, set]:
        """The (in, out) pairs of heights and of widths this ledger does not hold yet."""
        return ({p for p in row_pairs if p not in self.rows}, {p for p in column_pairs if p not in self.columns})

    def add(self, rows: set, cols: set) -> None:
        """Makes the tables of the pairs of heights ``rows`` and widths ``cols`` (Python ints; missing() of this
        ledger): one resize_tables call per group of similar lengths (numpy's cost is per call and per padded
        entry)."""
        with self._lock:
            for group in _length_groups(list(rows)):
                r = resize_tables([(h, 1) for h, _ in group], [(oh, 1) for _, oh in group], group[0][1], 1 + TAIL_BAND)
                start = self._row_arrays.reserve(sum(oh for _, oh in group))
                rows_i, rows_f, rows_d = self._row_arrays.arrays
                at = start
                for k, (h, oh) in enumerate(group):
                    rows_i[2 * at:2 * at + oh], rows_i[2 * at + oh:2 * at + 2 * oh] = r.top[k, :oh], r.bottom[k, :oh]
                    rows_f[2 * at:2 * at + oh], rows_f[2 * at + oh:2 * at + 2 * oh] = r.tb32[k, :oh], r.inv_tb32[k, :oh]
                    rows_d[at:at + oh] = r.tb64[k, :oh]
                    self.rows[h, oh] = at
                    at += oh
            for group in _length_groups(list(cols)):
                r = resize_tables([(1, w) for w, _ in group], [(1, ow) for _, ow in group], 1, group[0][1] + TAIL_BAND)
                start = self._column_arrays.reserve(sum(ow for _, ow in group))
                cols_i, cols_f, cols_d = self._column_arrays.arrays
                at = start
                for k, (w, ow) in enumerate(group):
                    cols_i[at:at + ow], cols_f[at:at + ow], cols_d[at:at + ow] = (r.left[k, :ow], r.lr32[k, :ow],
                                                                                  r.lr64[k, :ow])
                    self.columns[w, ow] = (at, int(r.tail[k]))
                    at += ow

    def host_tables(self) -> tuple[np.ndarray, ...]:
        """(rows_i, rows_f, rows_d, cols_i, cols_f, cols_d): the entries made so far, host arrays."""
        with self._lock:
            return tuple(self._row_arrays.used() + self._column_arrays.used())

    def on_device(self, device) -> tuple[torch.Tensor, ...]:
        """The tables on ``device`` as host_tables() gives them (tensors perhaps longer), every entry made so far
        copied and complete: only entries not copied before travel."""
        device = torch.device(device)
        with self._lock:
            copy = self._devices.setdefault(str(device), _DeviceCopy())
            rows, columns = self._row_arrays, self._column_arrays
            if copy.row_capacity < rows.capacity or copy.column_capacity < columns.capacity:
                copy.tensors = [torch.empty(a.shape, dtype=torch.from_numpy(a[:0]).dtype, device=device)
                                for a in rows.arrays + columns.arrays]
                copy.row_capacity, copy.column_capacity = rows.capacity, columns.capacity
                copy.rows = copy.columns = 0
            if copy.rows == rows.end and copy.columns == columns.end:
                return tuple(copy.tensors)
            parts = [(t, a, per, copy.rows, rows.end) for t, a, (_, _, per) in
                     zip(copy.tensors[:3], rows.arrays, _ROW_ARRAYS)]
            parts += [(t, a, per, copy.columns, columns.end) for t, a, (_, _, per) in
                      zip(copy.tensors[3:], columns.arrays, _COLUMN_ARRAYS)]
            if device.type == "cuda":
                copy.stream = copy.stream or torch.cuda.Stream(device)
                with torch.cuda.stream(copy.stream):
                    for t, a, per, first, end in parts:
                        t[first * per:end * per].copy_(torch.from_numpy(a[first * per:end * per]).pin_memory(),
                                                       non_blocking=True)
                copy.stream.synchronize()
            else:
                for t, a, per, first, end in parts:
                    t[first * per:end * per].copy_(torch.from_numpy(a[first * per:end * per]))
            copy.rows, copy.columns = rows.end, columns.end
            return tuple(copy.tensors)

    def info(self, in_sizes: list[tuple[int, int]], out_sizes: list[tuple[int, int]]) -> np.ndarray:
        """The kernel's info table (INFO_FIELDS per image) of resizes whose pairs this ledger holds."""
        info = np.empty((len(out_sizes), INFO_FIELDS), np.int32)
        columns = [self.columns[w, ow] for (_, w), (_, ow) in zip(in_sizes, out_sizes)]
        info[:, INFO_TAIL] = [c[1] for c in columns]
        info[:, INFO_OUT_W] = [ow for _, ow in out_sizes]
        info[:, INFO_OUT_H] = [oh for oh, _ in out_sizes]
        info[:, INFO_LAST_COLUMN] = [w - 1 for _, w in in_sizes]
        info[:, INFO_ROW_AT] = [self.rows[h, oh] for (h, _), (oh, _) in zip(in_sizes, out_sizes)]
        info[:, INFO_COLUMN_AT] = [c[0] for c in columns]
        return info


_LEDGER = ResizeTableLedger()
_LEDGER_SWAP = threading.Lock()


def resize_kernel_tables(in_sizes: list[tuple[int, int]], out_sizes: list[tuple[int, int]]
                         ) -> tuple[np.ndarray, ResizeTableLedger]:
    """The resize kernel's tables of a batch, image b from in_sizes[b] to out_sizes[b]: (its info table, the ledger
    whose tables it points into), every pair of lengths added to the ledger if new. A ledger past _LEDGER_ENTRIES
    is replaced by a new one for this batch and those after (plans made before keep theirs). Each image's entries
    equal resize_tables' at its own rows and columns (tests/models/alignment/test_batch_plan.py)."""
    global _LEDGER
    row_pairs = [(h, oh) for (h, _), (oh, _) in zip(in_sizes, out_sizes)]
    column_pairs = [(w, ow) for (_, w), (_, ow) in zip(in_sizes, out_sizes)]
    with _LEDGER_SWAP:
        ledger = _LEDGER
        rows, cols = ledger.missing(row_pairs, column_pairs)
        if rows or cols:
            if ledger.entries and ledger.entries + max(sum(oh for _, oh in rows), sum(ow for _, ow in cols)) > \
                    _LEDGER_ENTRIES:
                ledger = _LEDGER = ResizeTableLedger()
                rows, cols = set(row_pairs), set(column_pairs)
            ledger.add(rows, cols)
    return ledger.info(in_sizes, out_sizes), ledger
