"""dlib's greedy non-maximum suppression of candidate detections (object_detector, box_overlap_testing.h), with
libstdc++'s ``std::sort`` emulated step for step: dlib orders the candidates with it, and it is not stable, so
equal scores come out (and suppress each other) in dlib's order only with the same algorithm.
"""
from __future__ import annotations

import numpy as np

from .formats import HogDetectorModel

__all__ = ["std_sort", "non_max_suppression"]


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
