"""dlib's fHOG (``extract_fhog_features``, cell 8, 31 planes) of a batch of RGB images, bit for bit as dlib
(dlib-bin 20.0.1: AVX, no FMA).

Per pixel the gradient of the colour channel with the largest magnitude (ties resolved differently in dlib's
8-wide SIMD columns and its scalar right-edge columns, followed here), orientation snapped to 18 directions,
bilinear votes into cells summed in raster order, block energies, truncation at TRUNCATION, the 4-lane sums
in SSE4.1 ``dpps`` order. Square roots are correctly rounded (``torch.sqrt`` on CPU is not: see
``_sqrt_float32``). Every arithmetic step of the torch reference is a separate eager operation, so each product
is rounded to float32 before the addition that uses it, as in dlib; the Triton kernels (compiled with
``enable_fp_fusion=False``) do the same operations in the same order. Order in this module: constants, torch
reference, kernels, launchers, the kernels' probe, the public ``fhog_planes``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .device import upload_many
from .fhog_reference import (BLOCK_EPSILON, DIRECTIONS, LANE_OFFSETS, NORM_SCALE, TEXTURE_SCALE, TRUNCATION,
                             _cell_histograms_torch, _fhog_features_torch)
from .formats import CELL_SIZE, NUM_PLANES
from ..kernel_check import tl, triton, use_kernels
from .level_launch import check_level_count, level_of
from .resize_tables import TAIL_BAND

__all__ = ["DIRECTIONS", "LANE_OFFSETS", "BLOCK_EPSILON", "TRUNCATION", "NORM_SCALE", "TEXTURE_SCALE", "FhogLayout",
           "fhog_layout", "FhogLevels", "fhog_level_table", "fhog_planes_levels", "fhog_planes",
           "check_fhog_kernels"]

_FHOG_BLOCK = 128  # pixels or cells per program of the kernels below
# Grid rows per program of _orient_mag_kernel: with one row each, a batch's pyramid is millions of programs, each
# first finding its level (a chain of dependent loads), which took longer than the pixels' own work (BENCHMARKS.md).
_ORIENT_ROWS = 8
_CELL_BLOCK = 128  # cells per program of _cell_hist_kernel (one per thread: BLOCK // 32 warps); 64, 256: same

# The columns of fhog_level_table (one row per level), by name for the table and the kernels that read it: the
# level's first program of each kernel (_LV_ORIENT_MAG .. _LV_FEATURES, in launch order), its offsets in the
# pixels, grid, histogram-cell and planes buffers, its first row in the info and hog tables, its image count,
# image height and width, grid rows and columns, interior pixel rows and columns, cell rows and columns, HOG rows
# and columns, plane rows and columns, and the planes' offset of the features (rows, columns).
_LEVEL_FIELDS = 24  # columns of fhog_level_table
(_LV_ORIENT_MAG, _LV_CELL_HIST, _LV_BLOCK_ENERGY, _LV_FEATURES, _LV_PIXELS_AT, _LV_GRID_AT, _LV_CELLS_AT,
 _LV_PLANES_AT, _LV_INFO_ROW, _LV_IMAGES, _LV_HEIGHT, _LV_WIDTH, _LV_GRID_H, _LV_GRID_W, _LV_INTERIOR_H,
 _LV_INTERIOR_W, _LV_CELL_ROWS, _LV_CELL_COLS, _LV_HOG_ROWS, _LV_HOG_COLS, _LV_PLANE_H, _LV_PLANE_W,
 _LV_OFFSET_ROWS, _LV_OFFSET_COLS) = range(_LEVEL_FIELDS)
# The columns of the per-image info table (FhogLayout.kernel_tables), by name for the table and the kernels that
# read it: visible pixel rows and columns (pixels 1..visible-1 vote), simd_end, cell rows and columns.
_INFO_FIELDS = 5
_INFO_VISIBLE_ROWS, _INFO_VISIBLE_COLS, _INFO_SIMD_END, _INFO_CELL_ROWS, _INFO_CELL_COLS = range(_INFO_FIELDS)


# -- Triton kernels ------------------------------------------------------------------------------------------

# Shape arguments are not specialised (do_not_specialize): photos of every size would otherwise compile new
# variants (divisible by 16 or not, per argument) for many calls after the first.
if triton is not None:

    # DIRECTIONS as constants of the kernels (float32 values, exact as Python floats).
    _DIRECTIONS_C = tl.constexpr(tuple(float(v) for v in DIRECTIONS.ravel()))
    # fhog_level_table's row width and columns as the kernels' constants (the host's ints: the constants above).
    _LEVEL_FIELDS_C = tl.constexpr(_LEVEL_FIELDS)
    _LV_ORIENT_MAG_C = tl.constexpr(_LV_ORIENT_MAG)
    _LV_CELL_HIST_C = tl.constexpr(_LV_CELL_HIST)
    _LV_BLOCK_ENERGY_C = tl.constexpr(_LV_BLOCK_ENERGY)
    _LV_FEATURES_C = tl.constexpr(_LV_FEATURES)
    _LV_PIXELS_AT_C = tl.constexpr(_LV_PIXELS_AT)
    _LV_GRID_AT_C = tl.constexpr(_LV_GRID_AT)
    _LV_CELLS_AT_C = tl.constexpr(_LV_CELLS_AT)
    _LV_PLANES_AT_C = tl.constexpr(_LV_PLANES_AT)
    _LV_INFO_ROW_C = tl.constexpr(_LV_INFO_ROW)
    _LV_IMAGES_C = tl.constexpr(_LV_IMAGES)
    _LV_HEIGHT_C = tl.constexpr(_LV_HEIGHT)
    _LV_WIDTH_C = tl.constexpr(_LV_WIDTH)
    _LV_GRID_H_C = tl.constexpr(_LV_GRID_H)
    _LV_GRID_W_C = tl.constexpr(_LV_GRID_W)
    _LV_INTERIOR_H_C = tl.constexpr(_LV_INTERIOR_H)
    _LV_INTERIOR_W_C = tl.constexpr(_LV_INTERIOR_W)
    _LV_CELL_ROWS_C = tl.constexpr(_LV_CELL_ROWS)
    _LV_CELL_COLS_C = tl.constexpr(_LV_CELL_COLS)
    _LV_HOG_ROWS_C = tl.constexpr(_LV_HOG_ROWS)
    _LV_HOG_COLS_C = tl.constexpr(_LV_HOG_COLS)
    _LV_PLANE_H_C = tl.constexpr(_LV_PLANE_H)
    _LV_PLANE_W_C = tl.constexpr(_LV_PLANE_W)
    _LV_OFFSET_ROWS_C = tl.constexpr(_LV_OFFSET_ROWS)
    _LV_OFFSET_COLS_C = tl.constexpr(_LV_OFFSET_COLS)
    # The info table's row width and columns as the kernels' constants.
    _INFO_FIELDS_C = tl.constexpr(_INFO_FIELDS)
    _INFO_VISIBLE_ROWS_C = tl.constexpr(_INFO_VISIBLE_ROWS)
    _INFO_VISIBLE_COLS_C = tl.constexpr(_INFO_VISIBLE_COLS)
    _INFO_SIMD_END_C = tl.constexpr(_INFO_SIMD_END)
    _INFO_CELL_ROWS_C = tl.constexpr(_INFO_CELL_ROWS)
    _INFO_CELL_COLS_C = tl.constexpr(_INFO_CELL_COLS)

    @triton.jit(do_not_specialize=["n_levels"])
    def _orient_mag_kernel(img_ptr, info_ptr, orient_ptr, mag_ptr, levels_ptr, n_levels, BLOCK: tl.constexpr,
                           ROWS: tl.constexpr):
        # One program per (ROWS grid rows Y >= 8, block of grid columns X, image): pixel (y, x) = (Y - 12, X - 12)'s
        # orientation bin (uint8) and gradient magnitude v (float32; 0 for pixels that do not vote, whose bin is
        # then 0), _cell_histograms_torch's arithmetic, for every grid position that _cell_hist_kernel reads of
        # the image (rows and columns < 8 * (its cells + 2)): no grid needs clearing first. The grids store position
        # (Y, X) at Y * grid_w + (X % 8) * (grid_w / 8) + X // 8 (grid_w is a multiple of 8): the columns of one
        # phase X % 8 lie together, so that the histogram kernel's lanes (cells 8 columns apart) load
        # consecutive addresses. Image info (int32, _INFO_FIELDS per image, columns _INFO_*): visible rows,
        # visible columns, simd_end, cell rows, cell columns. Over every level of the level table
        # (fhog_level_table): each level's images, grids and info rows at its offsets in the buffers.
        lv, pid = level_of(levels_ptr, tl.program_id(0).to(tl.int64), n_levels, _LV_ORIENT_MAG_C,
                           _LEVEL_FIELDS_C)
        height = tl.load(lv + _LV_HEIGHT_C).to(tl.int32)
        width = tl.load(lv + _LV_WIDTH_C).to(tl.int32)
        grid_h = tl.load(lv + _LV_GRID_H_C).to(tl.int32)
        grid_w = tl.load(lv + _LV_GRID_W_C).to(tl.int32)
        ph = tl.load(lv + _LV_INTERIOR_H_C).to(tl.int32)
        pw = tl.load(lv + _LV_INTERIOR_W_C).to(tl.int32)
        img_ptr += tl.load(lv + _LV_PIXELS_AT_C)
        orient_ptr += tl.load(lv + _LV_GRID_AT_C)
        mag_ptr += tl.load(lv + _LV_GRID_AT_C)
        info_ptr += _INFO_FIELDS_C * tl.load(lv + _LV_INFO_ROW_C)
        col_blocks = tl.cdiv(grid_w, BLOCK)
        X = ((pid % col_blocks) * BLOCK).to(tl.int32) + tl.arange(0, BLOCK)
        pid = pid // col_blocks
        row_blocks = tl.cdiv(grid_h - 8, ROWS)
        first_row = (pid % row_blocks).to(tl.int32) * ROWS + 8
        b = (pid // row_blocks).to(tl.int32)
        x = X - 12
        info = info_ptr + _INFO_FIELDS_C * b
        stored_cols = X < 8 * (tl.load(info + _INFO_CELL_COLS_C) + 2)
        stored_rows = tl.minimum(8 * (tl.load(info + _INFO_CELL_ROWS_C) + 2), grid_h)
        voting_cols = stored_cols & (x >= 1) & (x <= pw) & (x < tl.load(info + _INFO_VISIBLE_COLS_C))
        voting_rows = tl.minimum(ph + 1, tl.load(info + _INFO_VISIBLE_ROWS_C))  # rows y in [1, voting_rows) vote
        simd = x < tl.load(info + _INFO_SIMD_END_C)
        plane = height * width  # pixels that do not vote (padding of smaller photos) are not read
        image = img_ptr + b.to(tl.int64) * 3 * plane
        grid = b.to(tl.int64) * grid_h * grid_w + (X & 7) * (grid_w >> 3) + (X >> 3)
        for r in range(ROWS):
            Y = first_row + r
            y = Y - 12
            stored = stored_cols & (Y < stored_rows)
            valid = stored & voting_cols & (y >= 1) & (y < voting_rows)
            px = image + (y * width + x)
            gx0 = (tl.load(px + 1, mask=valid, other=0).to(tl.int32)
                   - tl.load(px - 1, mask=valid, other=0).to(tl.int32))
            gy0 = (tl.load(px + width, mask=valid, other=0).to(tl.int32)
                   - tl.load(px - width, mask=valid, other=0).to(tl.int32))
            px1 = px + plane
            gx1 = (tl.load(px1 + 1, mask=valid, other=0).to(tl.int32)
                   - tl.load(px1 - 1, mask=valid, other=0).to(tl.int32))
            gy1 = (tl.load(px1 + width, mask=valid, other=0).to(tl.int32)
                   - tl.load(px1 - width, mask=valid, other=0).to(tl.int32))
            px2 = px1 + plane
            gx2 = (tl.load(px2 + 1, mask=valid, other=0).to(tl.int32)
                   - tl.load(px2 - 1, mask=valid, other=0).to(tl.int32))
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
            at = grid + Y * grid_w
            tl.store(orient_ptr + at, bin_.to(tl.uint8), mask=stored)
            tl.store(mag_ptr + at, v, mask=stored)

    @triton.jit(do_not_specialize=["n_levels"])
    def _cell_hist_kernel(orient_ptr, mag_ptr, hist_ptr, info_ptr, levels_ptr, n_levels, BLOCK: tl.constexpr):
        # One lane per cell, its 18 bins in registers: the cell's 16x16 pixel block (_orient_mag_kernel's grids)
        # in raster order, each pixel's vote added to every bin, +0.0 to the bins other than its own (which
        # leaves their sums unchanged: the weights are >= 0). The vote weight of block offset (dy, dx) is
        # _cell_histograms_torch's, whose factors vy, vx depend on dy, dx only: pixel y = 8i + dy - 4 has
        # vy0 = ((dy % 8) + 0.5) / 8, and rows dy < 8 weigh by vy0, the others by 1 - vy0 = (15.5 - dy) / 8
        # (exact dyadic float32 values; likewise for x). SIMD columns x < simd_end compute vy * (vx * v),
        # scalar ones (vy * vx) * v. Cells beyond the image's own (padding of smaller photos) are not stored.
        # Over every level of the level table, as _orient_mag_kernel.
        lv, pid = level_of(levels_ptr, tl.program_id(0).to(tl.int64), n_levels, _LV_CELL_HIST_C,
                           _LEVEL_FIELDS_C)
        grid_h = tl.load(lv + _LV_GRID_H_C).to(tl.int32)
        grid_w = tl.load(lv + _LV_GRID_W_C).to(tl.int32)
        n_cr = tl.load(lv + _LV_CELL_ROWS_C).to(tl.int32)
        n_cc = tl.load(lv + _LV_CELL_COLS_C).to(tl.int32)
        n_cells = tl.load(lv + _LV_IMAGES_C).to(tl.int32) * n_cr * n_cc
        orient_ptr += tl.load(lv + _LV_GRID_AT_C)
        mag_ptr += tl.load(lv + _LV_GRID_AT_C)
        hist_ptr += 18 * tl.load(lv + _LV_CELLS_AT_C)
        info_ptr += _INFO_FIELDS_C * tl.load(lv + _LV_INFO_ROW_C)
        cell = (pid * BLOCK).to(tl.int32) + tl.arange(0, BLOCK)
        inside = cell < n_cells
        cell = tl.minimum(cell, n_cells - 1)  # dead lanes load (what they load is not stored)
        b = cell // (n_cr * n_cc)
        i = (cell // n_cc) % n_cr
        j = cell % n_cc
        info = info_ptr + _INFO_FIELDS_C * b
        live = inside & (i < tl.load(info + _INFO_CELL_ROWS_C)) & (j < tl.load(info + _INFO_CELL_COLS_C))
        simd_dx = tl.load(info + _INFO_SIMD_END_C) - 8 * j + 4  # offset dx is a SIMD column if dx < simd_dx
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

    @triton.jit(do_not_specialize=["n_levels"])
    def _block_energy_kernel(hist_ptr, norm_ptr, levels_ptr, n_levels, BLOCK: tl.constexpr):
        # Per cell: the sum over o = 0..8 of (hist[o] + hist[o + 9])^2, in that order; over every level of the
        # level table.
        lv, pid = level_of(levels_ptr, tl.program_id(0).to(tl.int64), n_levels, _LV_BLOCK_ENERGY_C,
                           _LEVEL_FIELDS_C)
        n_cells = tl.load(lv + _LV_IMAGES_C) * tl.load(lv + _LV_CELL_ROWS_C) * tl.load(lv + _LV_CELL_COLS_C)
        hist_ptr += 18 * tl.load(lv + _LV_CELLS_AT_C)
        norm_ptr += tl.load(lv + _LV_CELLS_AT_C)
        cell = pid * BLOCK + tl.arange(0, BLOCK)
        live = cell < n_cells
        base = hist_ptr + cell * 18
        norm = tl.zeros([BLOCK], dtype=tl.float32)
        for o in tl.static_range(9):
            both = tl.load(base + o, mask=live, other=0.0) + tl.load(base + o + 9, mask=live, other=0.0)
            norm = norm + both * both
        tl.store(norm_ptr + cell, norm, mask=live)

    @triton.jit
    def _lane_normaliser(norm_ptr, at, n_cc, live, EPSILON: tl.constexpr, TRUNC: tl.constexpr,
                         SCALE: tl.constexpr):
        # One of the four 2x2 blocks around a cell: (truncation level, 1 / its block energy's norm * 0.1).
        z1 = tl.load(norm_ptr + at, mask=live, other=1.0)
        z2 = tl.load(norm_ptr + at + 1, mask=live, other=1.0)
        z3 = tl.load(norm_ptr + at + n_cc, mask=live, other=1.0)
        z4 = tl.load(norm_ptr + at + n_cc + 1, mask=live, other=1.0)
        nn = tl.sqrt_rn((((z1 + z2) + z3) + z4) + EPSILON) * TRUNC
        return nn, tl.div_rn(tl.zeros_like(nn) + SCALE, nn)

    @triton.jit(do_not_specialize=["n_levels"])
    def _features_kernel(hist_ptr, norm_ptr, hog_ptr, planes_ptr, levels_ptr, n_levels, NUM_PLANES: tl.constexpr,
                         EPSILON: tl.constexpr, TRUNC: tl.constexpr, SCALE: tl.constexpr, TEXTURE: tl.constexpr,
                         BLOCK: tl.constexpr):
        # One lane per feature cell (b, r, c): the 31 features of _fhog's torch path, in its order of float
        # operations, written to the planes at (off_r + r, off_c + c); zeros outside the image's HOG size. Over
        # every level of the level table.
        lv, pid = level_of(levels_ptr, tl.program_id(0).to(tl.int64), n_levels, _LV_FEATURES_C,
                           _LEVEL_FIELDS_C)
        n_cr = tl.load(lv + _LV_CELL_ROWS_C)
        n_cc = tl.load(lv + _LV_CELL_COLS_C)
        hr = tl.load(lv + _LV_HOG_ROWS_C)
        hc = tl.load(lv + _LV_HOG_COLS_C)
        plane_h = tl.load(lv + _LV_PLANE_H_C)
        plane_w = tl.load(lv + _LV_PLANE_W_C)
        off_r = tl.load(lv + _LV_OFFSET_ROWS_C)
        off_c = tl.load(lv + _LV_OFFSET_COLS_C)
        n_out = tl.load(lv + _LV_IMAGES_C) * hr * hc
        hist_ptr += 18 * tl.load(lv + _LV_CELLS_AT_C)
        norm_ptr += tl.load(lv + _LV_CELLS_AT_C)
        hog_ptr += 2 * tl.load(lv + _LV_INFO_ROW_C)
        planes_ptr += tl.load(lv + _LV_PLANES_AT_C)
        cell = pid * BLOCK + tl.arange(0, BLOCK)
        live = cell < n_out
        c = cell % hc
        r = (cell // hc) % hr
        b = cell // (hr * hc)
        inside = live & (r < tl.load(hog_ptr + 2 * b, mask=live, other=0)) & (
            c < tl.load(hog_ptr + 2 * b + 1, mask=live, other=0))
        at = b * n_cr * n_cc + r * n_cc + c
        # The four lanes (dy, dx) = (1, 1), (0, 1), (1, 0), (0, 0) (LANE_OFFSETS).
        nn0, n0 = _lane_normaliser(norm_ptr, at + n_cc + 1, n_cc, live, EPSILON, TRUNC, SCALE)
        nn1, n1 = _lane_normaliser(norm_ptr, at + 1, n_cc, live, EPSILON, TRUNC, SCALE)
        nn2, n2 = _lane_normaliser(norm_ptr, at + n_cc, n_cc, live, EPSILON, TRUNC, SCALE)
        nn3, n3 = _lane_normaliser(norm_ptr, at, n_cc, live, EPSILON, TRUNC, SCALE)
        h = hist_ptr + (at + n_cc + 1) * 18  # dlib's hist[y + 2][x + 2]: this port's cell (r + 1, c + 1)
        out = planes_ptr + b * NUM_PLANES * plane_h * plane_w + (off_r + r) * plane_w + (off_c + c)
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
        tl.store(out + 27 * plane, tl.where(inside, t0 * TEXTURE, 0.0), mask=live)
        tl.store(out + 28 * plane, tl.where(inside, t1 * TEXTURE, 0.0), mask=live)
        tl.store(out + 29 * plane, tl.where(inside, t2 * TEXTURE, 0.0), mask=live)
        tl.store(out + 30 * plane, tl.where(inside, t3 * TEXTURE, 0.0), mask=live)


# -- the level table and the launcher ------------------------------------------------------------------------

@dataclass
class FhogLevels:
    """Several levels' fHOG work for one launch per kernel (fhog_level_table): ``table`` (L + 1, _LEVEL_FIELDS)
    int64; the buffers' sizes (``grid_elements``: orientation and magnitude grids; ``cells``: histogram cells)."""

    table: np.ndarray
    grid_elements: int
    cells: int

    @property
    def n_levels(self) -> int:
        return len(self.table) - 1

    def programs(self, column: int) -> int:
        """The launch's program count of the kernel whose first programs are in ``column`` (_LV_ORIENT_MAG ..)."""
        return int(self.table[-1, column])


def fhog_level_table(levels: list[tuple["FhogLayout", int, int, int, int, int]]) -> FhogLevels:
    """The fHOG kernels' level table for levels given as (layout, images' offset in the pixels buffer, their
    height and width there, their planes' offset in the planes buffer, their first row in the info and hog
    tables). Per level (columns _LV_*, named in the constants section): the first program of each of the four
    kernels, the offsets of its pixels, grids, histogram cells and planes, its first info row, its image count,
    height, width, grid rows and columns, interior pixel rows and columns, cell rows and columns, HOG rows and
    columns, plane rows and columns, and the planes' offset of the features (rows, columns); the extra last row
    holds the launches' program counts."""
    table = np.zeros((len(levels) + 1, _LEVEL_FIELDS), np.int64)
    first_programs = [_LV_ORIENT_MAG, _LV_CELL_HIST, _LV_BLOCK_ENERGY, _LV_FEATURES]
    starts = np.zeros(len(first_programs), np.int64)
    grid_at = cell_at = 0
    for k, (layout, pixels_at, height, width, planes_at, info_row) in enumerate(levels):
        n = len(layout.hog)
        grid_h, grid_w, n_cr, n_cc = layout.grid_h, layout.grid_w, layout.n_cr, layout.n_cc
        hr, hc = int(layout.hog[:, 0].max()), int(layout.hog[:, 1].max())
        ph, pw = layout.interior(height, width)
        fields = {_LV_PIXELS_AT: pixels_at, _LV_GRID_AT: grid_at, _LV_CELLS_AT: cell_at, _LV_PLANES_AT: planes_at,
                  _LV_INFO_ROW: info_row, _LV_IMAGES: n, _LV_HEIGHT: height, _LV_WIDTH: width, _LV_GRID_H: grid_h,
                  _LV_GRID_W: grid_w, _LV_INTERIOR_H: ph, _LV_INTERIOR_W: pw, _LV_CELL_ROWS: n_cr,
                  _LV_CELL_COLS: n_cc, _LV_HOG_ROWS: hr, _LV_HOG_COLS: hc, _LV_PLANE_H: layout.plane_h,
                  _LV_PLANE_W: layout.plane_w, _LV_OFFSET_ROWS: layout.offset[0], _LV_OFFSET_COLS: layout.offset[1]}
        table[k, first_programs] = starts
        table[k, list(fields)] = list(fields.values())
        cells = n * n_cr * n_cc
        starts += (n * -(-(grid_h - 8) // _ORIENT_ROWS) * -(-grid_w // _FHOG_BLOCK), -(-cells // _CELL_BLOCK),
                   -(-cells // _FHOG_BLOCK), -(-(n * hr * hc) // _FHOG_BLOCK))
        grid_at += n * grid_h * grid_w
        cell_at += cells
    table[-1, first_programs] = starts
    return FhogLevels(table, grid_at, cell_at)


def _fhog_levels_triton(pixels: torch.Tensor, levels: FhogLevels, table: torch.Tensor, info: torch.Tensor,
                        hog: torch.Tensor, planes: torch.Tensor) -> None:
    """The four fHOG kernels, one launch each over every level of ``levels`` (``table``: its table on the device;
    ``info``, ``hog``: the levels' kernel_tables() one after the other, on the device): images from the flat
    uint8 buffer ``pixels``, planes into the flat, zero-filled float32 buffer ``planes``."""
    dev = pixels.device
    n_levels = levels.n_levels
    check_level_count(n_levels, "fHOG")
    orient = torch.empty((levels.grid_elements,), dtype=torch.uint8, device=dev)
    mag = torch.empty((levels.grid_elements,), dtype=torch.float32, device=dev)
    hist = torch.empty((levels.cells * 18,), dtype=torch.float32, device=dev)
    norm = torch.empty((levels.cells,), dtype=torch.float32, device=dev)
    common = dict(enable_fp_fusion=False)
    _orient_mag_kernel[(levels.programs(_LV_ORIENT_MAG),)](pixels, info, orient, mag, table, n_levels,
                                                           BLOCK=_FHOG_BLOCK, ROWS=_ORIENT_ROWS, **common)
    _cell_hist_kernel[(levels.programs(_LV_CELL_HIST),)](orient, mag, hist, info, table, n_levels,
                                                         BLOCK=_CELL_BLOCK, num_warps=_CELL_BLOCK // 32, **common)
    _block_energy_kernel[(levels.programs(_LV_BLOCK_ENERGY),)](hist, norm, table, n_levels, BLOCK=_FHOG_BLOCK,
                                                               **common)
    if levels.programs(_LV_FEATURES):
        _features_kernel[(levels.programs(_LV_FEATURES),)](
            hist, norm, hog, planes, table, n_levels, NUM_PLANES=NUM_PLANES, EPSILON=BLOCK_EPSILON,
            TRUNC=TRUNCATION, SCALE=NORM_SCALE, TEXTURE=TEXTURE_SCALE, BLOCK=_FHOG_BLOCK, **common)


# -- the layout (host tables) ------------------------------------------------------------------------------

@dataclass
class FhogLayout:
    """fhog_planes' sizes and tables for a batch of image sizes, computed on the host (fhog_layout): per image its
    cells (rows, cols), HOG size ``hog`` (0 where it has no HOG cell), pixels that vote (``visible``), first scalar
    pixel column ``simd_end``; the batch's planes (plane_h, plane_w), cell grid (n_cr, n_cc) and pixel grid
    (grid_h, grid_w); ``info`` (B, _INFO_FIELDS) int32 and ``hog`` (B, 2) are the kernels' tables
    (``kernel_tables``)."""

    cells: np.ndarray
    hog: np.ndarray
    visible: np.ndarray
    simd_end: np.ndarray
    plane_h: int
    plane_w: int
    n_cr: int
    n_cc: int
    offset: tuple[int, int]

    @property
    def grid_h(self) -> int:
        return CELL_SIZE * (self.n_cr + 2)

    @property
    def grid_w(self) -> int:
        return CELL_SIZE * (self.n_cc + 2)

    @property
    def empty(self) -> bool:
        return int(self.hog.max()) == 0

    def interior(self, height: int, width: int) -> tuple[int, int]:
        """Interior pixels 1..ph, 1..pw of images (B, 3, height, width) that the cell grid reads."""
        return min(height - 2, self.grid_h - 13), min(width - 2, self.grid_w - 13)

    def kernel_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(info (B, _INFO_FIELDS) int32: visible rows and columns, simd_end, cell rows and columns (columns
        _INFO_*); hog (B, 2) int64)."""
        info = np.zeros((len(self.hog), _INFO_FIELDS), np.int32)
        info[:, _INFO_VISIBLE_ROWS], info[:, _INFO_VISIBLE_COLS] = self.visible[:, 0], self.visible[:, 1]
        info[:, _INFO_SIMD_END] = self.simd_end
        info[:, _INFO_CELL_ROWS], info[:, _INFO_CELL_COLS] = self.cells[:, 0], self.cells[:, 1]
        return info, self.hog.astype(np.int64)


def fhog_layout(sizes: list[tuple[int, int]], fhog_pad: tuple[int, int]) -> FhogLayout:
    """fhog_planes' sizes and tables for images of ``sizes`` (numpy only: no device work)."""
    cell = CELL_SIZE
    # dlib: (int)(rows / (float)cell_size + 0.5), in float32 (exact: a division by 8, then + 0.5), truncated.
    cells = (np.asarray(sizes, dtype=np.float32).reshape(-1, 2) / np.float32(cell) + np.float32(0.5)).astype(np.int64)
    hog = np.maximum(cells - 2, 0)
    hog[(hog == 0).any(axis=1)] = 0
    visible = np.minimum(cells * cell, np.asarray(sizes, dtype=np.int64).reshape(-1, 2)) - 1  # pixels 1..visible-1 vote
    pad_r, pad_c = fhog_pad
    plane_h = int(hog[:, 0].max()) + pad_r - 1
    # One band's width more on the right: the scalar right-edge filter loop reads up to 8 + fw - 1 columns
    # past each image's first scalar column.
    plane_w = int(hog[:, 1].max()) + pad_c - 1 + TAIL_BAND
    simd_end = 1 + 8 * ((visible[:, 1] - 1) // 8)  # dlib's 8-wide pixel columns are x < simd_end
    return FhogLayout(cells, hog, visible, simd_end, plane_h, plane_w, int(cells[:, 0].max()),
                      int(cells[:, 1].max()), ((pad_r - 1) // 2, (pad_c - 1) // 2))


# -- the probe and the public function ---------------------------------------------------------------------

def check_fhog_kernels(device, fhog_pad: tuple[int, int] = (10, 10)) -> str | None:
    """The fHOG kernels against the torch path on ``device``: quantised random images (many equal gradients:
    every tie rule is exercised), two sizes in a batch; ``fhog_pad``: the detector's filter size. None when
    equal, else what differs."""
    rng = np.random.default_rng(0)
    images = [(rng.integers(0, 4, (h, w, 3)) * 60).astype(np.uint8) for h, w in ((93, 141), (130, 77))]
    images[1][40:90, 10:60] = rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)
    sizes = [im.shape[:2] for im in images]
    batch = torch.zeros((2, 3, 130, 141), dtype=torch.uint8)
    for k, im in enumerate(images):
        batch[k, :, :im.shape[0], :im.shape[1]] = torch.from_numpy(im).permute(2, 0, 1)
    batch = batch.to(device)
    want, _ = fhog_planes(batch, sizes, fhog_pad, use_triton=False)
    got, _ = fhog_planes(batch, sizes, fhog_pad, use_triton=True)
    if not torch.equal(want, got):
        return f"fHOG planes differ in {int((want != got).sum())} values"
    # Two levels in one launch: the batch, and a smaller batch of three images (one of no HOG cell) after it in
    # the pixels buffer, their planes one after the other.
    small = batch[[1, 0, 1], :, :70, :61].contiguous()
    small_sizes = [(70, 41), (53, 61), (9, 12)]
    pixels = torch.cat([batch.reshape(-1), small.reshape(-1)])
    layouts = [fhog_layout(sizes, fhog_pad), fhog_layout(small_sizes, fhog_pad)]
    shapes = [tuple(batch.shape), tuple(small.shape)]
    plane_sizes = [len(lay.hog) * NUM_PLANES * lay.plane_h * lay.plane_w for lay in layouts]
    levels = [(layouts[0], 0, shapes[0], 0), (layouts[1], batch.numel(), shapes[1], plane_sizes[0])]
    results = []
    for use_triton in (False, True):
        planes = torch.zeros((sum(plane_sizes),), dtype=torch.float32, device=pixels.device)
        fhog_planes_levels(pixels, levels, planes, use_triton=use_triton)
        results.append(planes)
    if not torch.equal(results[0], results[1]):
        return f"fHOG planes of two levels in one launch differ in {int((results[0] != results[1]).sum())} values"
    if not torch.equal(results[0][:plane_sizes[0]], want.reshape(-1)):
        return "the first level's planes in the two-level launch differ from its own"
    return None


def _fhog_level_torch(images: torch.Tensor, layout: FhogLayout, planes: torch.Tensor) -> None:
    """One level on the torch path: images (B, 3, H, W), its planes (zero-filled) written."""
    ph, pw = layout.interior(images.shape[2], images.shape[3])
    hist = _cell_histograms_torch(images, ph, pw, layout.visible, layout.simd_end, layout.grid_h, layout.grid_w,
                                  layout.n_cr, layout.n_cc)
    _fhog_features_torch(hist, layout.hog, planes, layout.offset)


def fhog_planes_levels(pixels: torch.Tensor, levels: list[tuple[FhogLayout, int, tuple, int]], planes: torch.Tensor,
                       use_triton: bool | None = None, tables: tuple | None = None) -> None:
    """fhog_planes of several levels at once: level k's images (B, 3, H, W) lie in the flat uint8 buffer
    ``pixels`` at an offset, its planes go to the flat zero-filled float32 buffer ``planes`` at an offset; levels
    given as (layout (none empty), pixels offset, (B, 3, H, W), planes offset). On the kernel path one launch per
    kernel for all levels. ``tables``: (fhog_level_table of them, their kernel_tables() one after the other:
    info, hog) with the first two on the device, made beforehand (else made and uploaded here)."""
    if not levels:
        return
    if use_kernels("fhog", pixels.device, use_triton, check_fhog_kernels):
        if tables is None:
            rows = np.cumsum([0] + [len(layout.hog) for layout, *_ in levels])
            fhog = fhog_level_table([(layout, at, shape[2], shape[3], planes_at, int(row))
                                     for (layout, at, shape, planes_at), row in zip(levels, rows)])
            info = np.concatenate([layout.kernel_tables()[0] for layout, *_ in levels])
            hog = np.concatenate([layout.kernel_tables()[1] for layout, *_ in levels])
            tables = (fhog, *upload_many([fhog.table, info, hog], pixels.device))
        fhog, table, info, hog = tables
        _fhog_levels_triton(pixels, fhog, table, info, hog, planes)
        return
    for layout, at, shape, planes_at in levels:
        images = pixels[at:at + int(np.prod(shape))].view(shape)
        plane_shape = (shape[0], NUM_PLANES, layout.plane_h, layout.plane_w)
        _fhog_level_torch(images, layout, planes[planes_at:planes_at + int(np.prod(plane_shape))].view(plane_shape))


def fhog_planes(images: torch.Tensor, sizes: list[tuple[int, int]], fhog_pad: tuple[int, int],
                use_triton: bool | None = None, layout: FhogLayout | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """extract_fhog_features(cell 8, filter padding fhog_pad) for each image; returns the planes
    (B, 31, Hp, Wp + band) float32 with each image's features at offset (pad-1)//2 and zeros around, and per
    image (hog rows, hog cols). Images (B, 3, H, W) uint8, image b's valid part sizes[b] (an image of size
    (0, 0) has no HOG cell: nothing of it is computed). ``use_triton``: see models/kernel_check.py (None: the
    kernels on CUDA once checked there). ``layout``: fhog_layout(sizes, fhog_pad), made beforehand."""
    dev = images.device
    layout = layout or fhog_layout(sizes, fhog_pad)
    n = images.shape[0]
    planes = torch.zeros((n, NUM_PLANES, layout.plane_h, layout.plane_w), dtype=torch.float32, device=dev)
    if not layout.empty:
        fhog_planes_levels(images.contiguous().view(-1), [(layout, 0, tuple(images.shape), 0)], planes.view(-1),
                           use_triton)
    return planes, layout.hog
