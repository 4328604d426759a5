"""A detector batch planned on the host before any device work: every pyramid level's size for every photo, which
photos each level holds and scores, the tables of every level's resize, fHOG and filters, and where each level's
window scores lie in one buffer of scores for the whole batch; all of it uploaded in one copy (the resizes' own
sampling tables excepted: they point into the ledger of resize_tables.py, which copies each pair of lengths' entries
to a device once).

dlib's pyramid makes each level from the previous one, so the device still runs one resize per level, but the
host's part per level is only launching kernels on tables made here. The batch's photos are ordered by the
number of levels they go through (most first), so the photos a level holds are always the first ``count`` of
the batch: each level's batch is a view of the previous one's, with no index tables or copies. A level's photos
that none of their runs scans (``detect_levels``' runs on coarser levels) are given the size (0, 0) to the fHOG
and filter stages: no HOG cell, nothing computed for them, their windows never pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .device import aligned, upload_many
from .fhog import FhogLayout, fhog_layout, fhog_level_table
from .filters import FilterLevel, filter_bounds, filter_level_table
from .formats import NUM_PLANES, HogDetectorModel
from .pyramid import ResizePlan, count_pyramid_levels, plan_resizes, pyramid_down_size, pyramid_level_size

__all__ = ["LevelPlan", "BatchPlan", "plan_batch"]


@dataclass
class LevelPlan:
    """Pyramid level ``level`` of a batch: the first ``count`` photos of the batch's order have it, of ``sizes``.
    ``layout``: their fHOG layout (photos not scored here as (0, 0)), None when nothing is scored; their window
    scores lie at ``score_offset`` of the batch's score buffer, shaped ``score_shape`` (count, filters, rows,
    cols) (``scored_sizes``: the sizes the fHOG stage is given); ``resize``: the resize of the first ``resize.out_sizes`` photos to the next level (None at the last).
    Its fHOG planes lie at ``planes_offset`` of the batch's planes buffer, its rows of the filters' bounds table
    from ``bounds_row``, its photos at ``pixels_offset`` of the batch's pixels buffer, shaped ``pixels_shape``
    (count, 3, H, W)."""

    level: int
    count: int
    sizes: list
    scored_sizes: list = None
    layout: FhogLayout | None = None
    score_offset: int = 0
    score_shape: tuple = ()
    resize: ResizePlan | None = None
    planes_offset: int = 0
    bounds_row: int = 0
    pixels_offset: int = 0
    pixels_shape: tuple = ()

    @property
    def score_elements(self) -> int:
        return int(np.prod(self.score_shape)) if self.layout is not None else 0

    @property
    def planes_shape(self) -> tuple[int, int, int, int]:
        return (self.count, NUM_PLANES, self.layout.plane_h, self.layout.plane_w)


@dataclass
class BatchPlan:
    """A batch's levels (LevelPlan, from level 0 down), ``order``: the photos' positions in the caller's list, in
    the batch's order; ``spans``: per photo (caller's position), its runs' levels [first, end); ``score_elements``:
    the size of the score buffer; ``filter_height``: the filters' rows; ``planes_elements``: the size of the fHOG
    planes buffer; ``pixel_elements``: the pixels buffer's (every level's photos); ``filter_tables`` and
    ``fhog_tables``: the filter and fHOG kernels' tables for all levels on the device (after upload)."""

    order: list
    spans: list
    levels: list
    score_elements: int
    filter_height: int
    planes_elements: int = 0
    n_filters: int = 0
    filter_width: int = 0
    pixel_elements: int = 0
    filter_tables: tuple | None = None
    fhog_tables: tuple | None = None

    def upload(self, device, extra: tuple = ()) -> list[torch.Tensor]:
        """Every level's tables on ``device`` in one copy (set on the levels and their resize plans, whose sampling
        tables are the ledger's device copy, brought up to date first); returns ``extra`` arrays, which travel in
        the same copy, on the device."""
        scored = [lp for lp in self.levels if lp.layout is not None]
        arrays: list[np.ndarray] = list(extra)
        if scored:
            fhog = fhog_level_table([(lp.layout, lp.pixels_offset, lp.pixels_shape[2], lp.pixels_shape[3],
                                      lp.planes_offset, lp.bounds_row) for lp in scored])
            arrays += [self.filter_level_table(),
                       np.concatenate([filter_bounds(lp.layout.hog, self.filter_height) for lp in scored]),
                       fhog.table, np.concatenate([lp.layout.kernel_tables()[0] for lp in scored]),
                       np.concatenate([lp.layout.kernel_tables()[1] for lp in scored])]
        resizes = [lp.resize for lp in self.levels if lp.resize is not None]
        if resizes:  # (the levels' resizes share one info table and ledger: plan_resizes)
            arrays.append(resizes[0].info)
        on_device = upload_many(arrays, device)
        at = len(extra)
        if scored:
            self.filter_tables = (on_device[at], on_device[at + 1])
            self.fhog_tables = (fhog, *on_device[at + 2:at + 5])
            at += 5
        if resizes:
            shared = resizes[0].upload_kernel_tables(device, on_device[at])
            for resize in resizes[1:]:
                resize.device_tables = shared
        return on_device[:len(extra)]

    def fhog_levels(self) -> list[tuple]:
        """The scored levels as fhog_planes_levels takes them."""
        return [(lp.layout, lp.pixels_offset, lp.pixels_shape, lp.planes_offset)
                for lp in self.levels if lp.layout is not None]

    def pixels(self, buffer: torch.Tensor, level: int) -> torch.Tensor:
        """Level ``level``'s photos, (count, 3, H, W), a view of the pixels ``buffer``."""
        lp = self.levels[level]
        return buffer[lp.pixels_offset:lp.pixels_offset + int(np.prod(lp.pixels_shape))].view(lp.pixels_shape)

    def filter_levels(self, planes: torch.Tensor) -> list[FilterLevel]:
        """The scored levels as filter_scores_levels takes them, their planes views of the buffer ``planes``."""
        return [FilterLevel(planes[lp.planes_offset:lp.planes_offset + int(np.prod(lp.planes_shape))]
                            .view(lp.planes_shape), lp.layout.hog, lp.planes_offset, lp.score_offset, lp.bounds_row)
                for lp in self.levels if lp.layout is not None]

    def filter_level_table(self) -> np.ndarray:
        """filter_level_table of the scored levels (shapes only: no tensor needed)."""
        fw = self.filter_width
        return filter_level_table([(lp.planes_offset, lp.score_offset, lp.bounds_row, lp.count, lp.layout.plane_h,
                                    lp.layout.plane_w, lp.score_shape[2], lp.layout.plane_w - (fw - 1))
                                   for lp in self.levels if lp.layout is not None], self.n_filters)

    def level_table(self) -> dict[str, np.ndarray]:
        """The scored levels' score-buffer geometry as arrays (for decoding flat positions on the host): level,
        offset, rows, cols; plus ``ends`` (offset + elements)."""
        scored = [lp for lp in self.levels if lp.layout is not None]
        return {"level": np.array([lp.level for lp in scored], np.int64),
                "offset": np.array([lp.score_offset for lp in scored], np.int64),
                "rows": np.array([lp.score_shape[2] for lp in scored], np.int64),
                "cols": np.array([lp.score_shape[3] for lp in scored], np.int64)}


def plan_batch(sizes: list[tuple[int, int]], runs: list[list[int]], model: HogDetectorModel,
               max_levels: int | None, n_filters: int, level0_hw: tuple[int, int] | None = None) -> BatchPlan:
    """The plan of a batch of photos of ``sizes`` (after any upsampling), photo k's runs at levels ``runs[k]``
    (detect_levels' runs), each scanning at most ``max_levels`` levels (None: the model's own limit);
    ``level0_hw``: the rows and columns of the batch's level-0 tensor (default: the largest size's). Host only."""
    fh, fw = model.fhog_window
    # Per photo, per run j: the levels [j, end) it scans (dlib counts a run's levels on its level j); the photo
    # is scored from its finest run's level to its last run's end, and resampled down to that end.
    spans = [[(j, j + min(count_pyramid_levels(*pyramid_level_size(size, j), model),
                          max_levels or model.max_pyramid_levels)) for j in photo_runs]
             for size, photo_runs in zip(sizes, runs)]
    first = [min(j for j, _ in s) for s in spans]
    depth = [max(max(e for _, e in s), 1) for s in spans]  # levels each photo goes through: 0 .. depth - 1
    order = sorted(range(len(sizes)), key=lambda k: -depth[k])
    level_sizes = {k: [tuple(sizes[k])] for k in order}
    for k in order:
        while len(level_sizes[k]) < depth[k]:
            level_sizes[k].append(pyramid_down_size(*level_sizes[k][-1]))
    levels: list[LevelPlan] = []
    offset = planes_at = bounds_row = 0
    for level in range(depth[order[0]] if order else 0):
        members = [k for k in order if depth[k] > level]
        lp = LevelPlan(level, len(members), [level_sizes[k][level] for k in members])
        lp.scored_sizes = [s if first[k] <= level else (0, 0) for k, s in zip(members, lp.sizes)]
        if any(first[k] <= level for k in members):
            layout = fhog_layout(lp.scored_sizes, model.fhog_window)
            if not layout.empty:
                lp.layout = layout
                lp.score_offset = offset
                lp.score_shape = (len(members), n_filters, int(layout.hog[:, 0].max()), layout.plane_w - (fw - 1))
                offset += lp.score_elements
                lp.planes_offset, lp.bounds_row = planes_at, bounds_row
                planes_at += int(np.prod(lp.planes_shape))
                bounds_row += lp.count
        levels.append(lp)
    # Every level's resize in one set of tables (those not made yet made together).
    for lp, resize in zip(levels, plan_resizes([(lp.sizes[:below.count], below.sizes)
                                                for lp, below in zip(levels, levels[1:])])):
        lp.resize = resize
    pixels_at = 0
    for lp, above in zip(levels, [None, *levels]):
        if above is None:
            hw = level0_hw or (max(h for h, _ in lp.sizes), max(w for _, w in lp.sizes))
        else:
            hw = (above.resize.out_h, above.resize.out_w)
        lp.pixels_offset, lp.pixels_shape = pixels_at, (lp.count, 3, *hw)
        pixels_at = aligned(pixels_at + int(np.prod(lp.pixels_shape)))  # (uint8: elements are bytes)
    return BatchPlan(order, spans, levels, offset, fh, planes_at, n_filters=n_filters, filter_width=fw,
                     pixel_elements=pixels_at)
