"""The detector's batch plan (models/alignment/batch_plan.py) on the host: each level's photos are a prefix of the
batch's order with dlib's pyramid sizes, photos not scored at a level are given no HOG cell, the levels' score
buffers tile one buffer, and every table the plan uploads in one copy comes back as the per-level functions make
it; window boxes with per-window levels are the per-level boxes."""
from __future__ import annotations

import dataclasses
import threading
import numpy as np
import pytest
import torch

from models.alignment.batch_plan import plan_batch
from models.alignment.detector import BATCH_BYTES_PER_PIXEL, BUNDLED_DETECTOR_FILE, gpu_batch_pixels
from models.alignment.device import DEVICE_ALIGNMENT
from models.alignment.fhog import fhog_layout, fhog_level_table
from models.alignment.filters import filter_bounds
from models.alignment.formats import read_detector_file
from models.alignment.pyramid import (count_pyramid_levels, plan_resize, pyramid_down_size, pyramid_level_size,
                                      pyramid_up_size, window_boxes)
from models.alignment import resize_tables as resize_tables_module
from models.alignment.resize_tables import TAIL_BAND, ResizeTableLedger, resize_tables

MODEL = read_detector_file(BUNDLED_DETECTOR_FILE)


def test_window_boxes_with_a_level_per_window_are_each_levels_boxes():
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(5, 300, 400), rng.integers(5, 300, 400)
    levels = rng.integers(0, 12, 400)
    together = window_boxes(rows, cols, levels, MODEL)
    for level in np.unique(levels):
        sel = levels == level
        assert np.array_equal(together[sel], window_boxes(rows[sel], cols[sel], int(level), MODEL)), level
    assert window_boxes(rows[:0], cols[:0], levels[:0], MODEL).shape == (0, 4)


def _dlibs_level_count(height: int, width: int, min_width: int, min_height: int, max_levels: int) -> int:
    """impl::create_fhog_pyramid's loop as dlib writes it: the whole image rectangle rect_down'ed level by level
    (pyramid_down<6>::rect_down: each corner (p - 0.3) * 5/6, lround'ed), until it is smaller than the minimum
    or the levels reach max_levels."""
    rect = np.array([0.0, 0.0, width - 1, height - 1])
    levels = 0
    while True:
        shrunk = (rect - 0.3) * (5.0 / 6.0)
        rect = np.sign(shrunk) * np.floor(np.abs(shrunk) + 0.5)  # std::lround
        levels += 1
        if not (rect[2] - rect[0] + 1 >= min_width and rect[3] - rect[1] + 1 >= min_height and levels < max_levels):
            return levels


def test_level_counts_are_dlibs_for_every_size_and_limit():
    """count_pyramid_levels takes each side's count on its own (cached by length): equal to dlib's loop over the
    whole rectangle, for sides from below the minimum to photo sizes, square and long, and for level limits that
    cut the pyramid short or not."""
    rng = np.random.default_rng(3)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 2400, (300, 2))]
    sizes += [(h, w) for h in range(60, 100) for w in (1, 79, 80, 81, 97, 3000)]
    for limit in (1, 3, 8, MODEL.max_pyramid_levels):
        model = MODEL if limit == MODEL.max_pyramid_levels else dataclasses.replace(MODEL, max_pyramid_levels=limit)
        for h, w in sizes:
            assert count_pyramid_levels(h, w, model) == _dlibs_level_count(
                h, w, model.min_level_width, model.min_level_height, limit), (h, w, limit)


def test_plan_levels_are_prefixes_of_dlibs_pyramid_with_every_table():
    sizes = [(300, 410), (95, 120), (640, 480), (70, 70), (200, 90)]
    runs = [[0], [0], [2, 4], [0], [1]]
    plan = plan_batch(sizes, runs, MODEL, None, 5)
    assert sorted(plan.order) == list(range(len(sizes)))
    depth = {k: max(end for _, end in plan.spans[k]) for k in range(len(sizes))}
    for k, photo_runs in enumerate(runs):
        assert [j for j, _ in plan.spans[k]] == photo_runs
        for j, end in plan.spans[k]:
            assert end - j == count_pyramid_levels(*pyramid_level_size(sizes[k], j), MODEL)
    offset = 0
    counts = [lp.count for lp in plan.levels]
    assert counts == sorted(counts, reverse=True) and len(counts) == max(depth.values())
    for lp in plan.levels:
        members = plan.order[:lp.count]
        # The level's photos: those that go through it, first in the batch's order.
        assert sorted(members) == sorted(k for k in range(len(sizes)) if depth[k] > lp.level)
        assert lp.sizes == [pyramid_level_size(sizes[k], lp.level) for k in members]
        assert lp.scored_sizes == [s if min(runs[k]) <= lp.level else (0, 0) for k, s in zip(members, lp.sizes)]
        if lp.layout is not None:
            want = fhog_layout(lp.scored_sizes, MODEL.fhog_window)
            assert np.array_equal(lp.layout.hog, want.hog) and lp.layout.hog.max() > 0
            assert lp.score_offset == offset and lp.score_shape[:2] == (lp.count, 5)
            offset += lp.score_elements
        if lp.resize is not None:
            below = plan.levels[lp.level + 1]
            assert lp.resize.in_sizes == lp.sizes[:below.count] and lp.resize.out_sizes == below.sizes
    assert plan.score_elements == offset > 0
    assert plan.levels[-1].resize is None
    # Photo 2 is not scored at levels 0 and 1 (its runs start at 2): it holds no HOG cell there.
    assert all(lp.layout.hog[plan.order.index(2)].max() == 0 for lp in plan.levels[:2])

    extra = np.arange(5, dtype=np.float32)
    back, = plan.upload("cpu", (extra,))
    assert torch.equal(back, torch.from_numpy(extra))
    scored = [lp for lp in plan.levels if lp.layout is not None]
    table, bounds = plan.filter_tables
    assert np.array_equal(bounds.numpy(), np.concatenate([filter_bounds(lp.layout.hog, MODEL.fhog_window[0])
                                                         for lp in scored]))
    assert np.array_equal(table.numpy(), plan.filter_level_table()) and len(table) == len(scored) + 1
    planes_at = 0
    for k, lp in enumerate(scored):
        # The filter kernel's level table: this level's planes, scores and bounds rows where the plan put them.
        assert lp.planes_offset == planes_at and lp.bounds_row == sum(s.count for s in scored[:k])
        assert tuple(table[k, 1:9].tolist()) == (lp.planes_offset, lp.score_offset, lp.bounds_row, lp.count,
                                                 lp.layout.plane_h, lp.layout.plane_w, *lp.score_shape[2:])
        planes_at += int(np.prod(lp.planes_shape))
    assert plan.planes_elements == planes_at
    fhog, fhog_table, info, hog = plan.fhog_tables
    assert np.array_equal(fhog_table.numpy(), fhog.table) and fhog.n_levels == len(scored)
    assert np.array_equal(info.numpy(), np.concatenate([lp.layout.kernel_tables()[0] for lp in scored]))
    assert np.array_equal(hog.numpy(), np.concatenate([lp.layout.kernel_tables()[1] for lp in scored]))
    pixels_at = 0
    for lp in plan.levels:
        # Every level's photos one level after the other in the pixels buffer, each from the first multiple of
        # DEVICE_ALIGNMENT bytes after the last (so its views keep one compiled variant of the kernels), each level
        # of the shape the previous level's resize makes.
        assert lp.pixels_offset == -(-pixels_at // DEVICE_ALIGNMENT) * DEVICE_ALIGNMENT
        assert lp.pixels_offset % DEVICE_ALIGNMENT == 0 and lp.pixels_shape[:2] == (lp.count, 3)
        if lp.level:
            above = plan.levels[lp.level - 1].resize
            assert lp.pixels_shape[2:] == (above.out_h, above.out_w)
        pixels_at = lp.pixels_offset + int(np.prod(lp.pixels_shape))
    assert pixels_at <= plan.pixel_elements < pixels_at + DEVICE_ALIGNMENT
    for k, lp in enumerate(scored):
        assert tuple(fhog.table[k, 4:9]) == (lp.pixels_offset, fhog.table[k, 5], fhog.table[k, 6], lp.planes_offset,
                                             lp.bounds_row)
        assert tuple(fhog.table[k, 9:12]) == lp.pixels_shape[:1] + lp.pixels_shape[2:]
    # The levels' resizes share one info table and the ledger's tables on the device (the same tensors); each
    # level's images, from its first_image, find their own resize's tables (resize_tables, made for the level
    # alone) at the entries their info rows name.
    resizes = [lp.resize for lp in plan.levels if lp.resize is not None]
    assert all(r.device_tables is resizes[0].device_tables for r in resizes)
    *tables, info = (t.numpy() for t in resizes[0].device_tables)
    assert sum(len(r.out_sizes) for r in resizes) == len(info)
    for resize in resizes:
        _assert_kernel_tables_are_resize_tables(tables, info[resize.first_image:], resize.in_sizes, resize.out_sizes)


def _assert_kernel_tables_are_resize_tables(tables, info, in_sizes, out_sizes):
    """Image b's entries in the kernel's tables (rows_i, rows_f, rows_d, cols_i, cols_f, cols_d), where its row
    of ``info`` points, equal resize_tables of the batch at the image's own rows and columns."""
    rows_i, rows_f, rows_d, cols_i, cols_f, cols_d = tables
    batched = resize_tables(in_sizes, out_sizes, max(h for h, _ in out_sizes), max(w for _, w in out_sizes) + TAIL_BAND)
    for b, ((h, w), (oh, ow)) in enumerate(zip(in_sizes, out_sizes)):
        tail, width, height, last, row_at, col_at = info[b].tolist()
        assert (tail, width, height, last) == (batched.tail[b], ow, oh, w - 1)
        assert np.array_equal(rows_i[2 * row_at:2 * row_at + 2 * oh], np.concatenate(
            [batched.top[b, :oh], batched.bottom[b, :oh]]))
        assert np.array_equal(rows_f[2 * row_at:2 * row_at + 2 * oh], np.concatenate(
            [batched.tb32[b, :oh], batched.inv_tb32[b, :oh]]))
        assert np.array_equal(rows_d[row_at:row_at + oh], batched.tb64[b, :oh])
        assert np.array_equal(cols_i[col_at:col_at + ow], batched.left[b, :ow])
        assert np.array_equal(cols_f[col_at:col_at + ow], batched.lr32[b, :ow])
        assert np.array_equal(cols_d[col_at:col_at + ow], batched.lr64[b, :ow])


def test_the_resize_kernels_tables_per_pair_of_lengths_are_the_batched_tables():
    """resize_kernel_tables (each pair of lengths' entries made once in the ledger, images pointing into it) equal
    resize_tables of the whole batch (checked against dlib's loops in test_face_detector.py) at every image's own
    rows and columns, for pyramid_down and pyramid_up, including pairs made in an earlier call and in this one,
    on the host and in the ledger's copy on a device after entries were added since its last copy."""
    rng = np.random.default_rng(5)
    sizes = [(int(h), int(w)) for h, w in rng.integers(20, 900, (24, 2))]
    sizes += sizes[:3]  # pairs met again within the call
    for out_sizes in ([pyramid_down_size(*s) for s in sizes], [pyramid_up_size(*s) for s in sizes[:6]]):
        ins = sizes[:len(out_sizes)]
        plan = plan_resize(ins, out_sizes)
        _assert_kernel_tables_are_resize_tables(plan.ledger.host_tables(), plan.info, ins, out_sizes)
        device_tables = [t.numpy() for t in plan.upload_kernel_tables("cpu")[:-1]]
        _assert_kernel_tables_are_resize_tables(device_tables, plan.info, ins, out_sizes)


def test_a_full_ledger_is_replaced_and_plans_made_before_keep_theirs(monkeypatch):
    """Past its bound of entries the ledger is replaced for the plans made after; a plan made before keeps its
    ledger and tables (their device copy too). A ledger outgrowing its arrays' capacity keeps every entry, on the
    host and on a device it was copied to before."""
    monkeypatch.setattr(resize_tables_module, "_LEDGER", ResizeTableLedger())
    monkeypatch.setattr(resize_tables_module, "_LEDGER_ENTRIES", 3000)
    monkeypatch.setattr(resize_tables_module, "_FIRST_CAPACITY", 512)
    rng = np.random.default_rng(9)

    def sizes(n):
        return [(int(h), int(w)) for h, w in rng.integers(100, 400, (n, 2))]

    ins = sizes(1)
    first = plan_resize(ins, [pyramid_down_size(*s) for s in ins])
    first.upload_kernel_tables("cpu")  # copied at the first capacity: the ledger outgrows it below
    grown_ins = sizes(5)
    grown = plan_resize(grown_ins, [pyramid_down_size(*s) for s in grown_ins])
    assert grown.ledger is first.ledger and len(first.ledger.host_tables()[2]) > 512
    for plan, ins_ in ((first, ins), (grown, grown_ins)):
        outs = [pyramid_down_size(*s) for s in ins_]
        _assert_kernel_tables_are_resize_tables(plan.ledger.host_tables(), plan.info, ins_, outs)
        tables = [t.numpy() for t in plan.upload_kernel_tables("cpu")[:-1]]
        _assert_kernel_tables_are_resize_tables(tables, plan.info, ins_, outs)
    kept = [t.clone() for t in first.device_tables]
    later_ins = sizes(12)
    later = plan_resize(later_ins, [pyramid_down_size(*s) for s in later_ins])
    assert later.ledger is not first.ledger and resize_tables_module._LEDGER is later.ledger
    _assert_kernel_tables_are_resize_tables(later.ledger.host_tables(), later.info, later_ins,
                                            [pyramid_down_size(*s) for s in later_ins])
    assert all(torch.equal(a, b) for a, b in zip(kept, first.device_tables))
    _assert_kernel_tables_are_resize_tables(first.ledger.host_tables(), first.info, ins,
                                            [pyramid_down_size(*s) for s in ins])


def test_threads_planning_at_once_get_their_own_tables(monkeypatch):
    """Alignment lanes plan batches in threads at once: each plan's entries are its own resizes' tables, on the
    host and on a device, while other threads add pairs, grow the ledger's arrays and replace the ledger."""
    monkeypatch.setattr(resize_tables_module, "_LEDGER", ResizeTableLedger())
    monkeypatch.setattr(resize_tables_module, "_LEDGER_ENTRIES", 20000)
    monkeypatch.setattr(resize_tables_module, "_FIRST_CAPACITY", 256)
    ledgers, failures = set(), []

    def plan_many(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(15):
                ins = [(int(h), int(w)) for h, w in rng.integers(30, 700, (6, 2))]
                outs = [pyramid_down_size(*s) for s in ins]
                plan = plan_resize(ins, outs)
                ledgers.add(id(plan.ledger))
                tables = [t.numpy() for t in plan.upload_kernel_tables("cpu")[:-1]]
                _assert_kernel_tables_are_resize_tables(tables, plan.info, ins, outs)
                _assert_kernel_tables_are_resize_tables(plan.ledger.host_tables(), plan.info, ins, outs)
        except AssertionError as e:  # (pytest sees only the main thread's)
            failures.append(e)

    threads = [threading.Thread(target=plan_many, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
    assert len(ledgers) > 1  # the bound was passed: plans were made on more than one ledger


@pytest.mark.parametrize("count, low, high", [(64, 1024, 1800), (40, 1400, 1800), (200, 300, 640)])
def test_a_batchs_device_buffers_stay_within_the_bytes_per_pixel_its_bound_assumes(count, low, high):
    # The buffers a batch allocates: every level's pixels (uint8; detector._detect_batch), the fHOG grids (uint8
    # orientation, float32 magnitude), 18 histogram bins and a block energy per cell (float32;
    # fhog._fhog_levels_triton), the planes (float32) and the window scores (float32) with their hits (uint8).
    rng = np.random.default_rng(count)
    sizes = [(int(rng.integers(low, high)), int(rng.integers(low, high))) for _ in range(count)]
    level0 = (max(h for h, _ in sizes), max(w for _, w in sizes))
    plan = plan_batch(sizes, [[0]] * count, MODEL, None, 5, level0)
    levels = plan.fhog_levels()
    rows = np.cumsum([0] + [len(layout.hog) for layout, *_ in levels])
    fhog = fhog_level_table([(layout, at, shape[2], shape[3], planes_at, int(row))
                             for (layout, at, shape, planes_at), row in zip(levels, rows)])
    total = (plan.pixel_elements + 4 * plan.planes_elements + 5 * plan.score_elements + 5 * fhog.grid_elements
             + 4 * 19 * fhog.cells)
    padded = count * level0[0] * level0[1]
    assert total <= BATCH_BYTES_PER_PIXEL * padded, total / padded
    assert total >= 0.75 * BATCH_BYTES_PER_PIXEL * padded, total / padded  # the bound is not far off either


def test_gpu_batch_bound_follows_the_devices_memory():
    gib = 2 ** 30
    assert gpu_batch_pixels(141 * gib) == gpu_batch_pixels(96 * gib) == 256 * 2 ** 20  # H200, large GPUs: the cap
    small = gpu_batch_pixels(24 * gib)
    assert small * BATCH_BYTES_PER_PIXEL <= 3 * gib < (small + 1) * BATCH_BYTES_PER_PIXEL  # an eighth of 24 GiB
    assert gpu_batch_pixels(40 * gib) > small
