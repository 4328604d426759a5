"""The detector's Triton kernels compile for a GPU (sm_90) on a machine without one (why:
tests/helpers/triton_compile.py): each kernel with the arguments' types and constants its launcher passes.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers.triton_compile import compile_for_sm90, requires_triton
from models.alignment import fhog, filters, pyramid
from models.alignment.detector import FrontalFaceDetector

# About a minute on 2 cores (ptxas on the filter kernel takes most of it).
pytestmark = [pytest.mark.slow, requires_triton]


def test_resize_and_placement_kernels_compile():
    compile_for_sm90(pyramid._resize_rgb_kernel,
                     {"src_ptr": "*u8", "dst_ptr": "*u8", "rows_i_ptr": "*i32", "rows_f_ptr": "*fp32",
                      "rows_d_ptr": "*fp64", "cols_i_ptr": "*i32", "cols_f_ptr": "*fp32", "cols_d_ptr": "*fp64",
                      "info_ptr": "*i32"}, {"BLOCK": pyramid._RESIZE_BLOCK})
    compile_for_sm90(pyramid._place_photos_kernel, {"flat_ptr": "*u8", "starts_ptr": "*i64", "sizes_ptr": "*i32",
                                                    "out_ptr": "*u8"}, {"BLOCK": pyramid._RESIZE_BLOCK})


def test_fhog_kernels_compile():
    levels = {"BLOCK": fhog._FHOG_BLOCK}
    compile_for_sm90(fhog._orient_mag_kernel, {"img_ptr": "*u8", "info_ptr": "*i32", "orient_ptr": "*u8",
                                               "mag_ptr": "*fp32", "levels_ptr": "*i64"},
                     {**levels, "ROWS": fhog._ORIENT_ROWS})
    compile_for_sm90(fhog._cell_hist_kernel, {"orient_ptr": "*u8", "mag_ptr": "*fp32", "hist_ptr": "*fp32",
                                              "info_ptr": "*i32", "levels_ptr": "*i64"},
                     {**levels, "BLOCK": fhog._CELL_BLOCK}, num_warps=fhog._CELL_BLOCK // 32)
    compile_for_sm90(fhog._block_energy_kernel, {"hist_ptr": "*fp32", "norm_ptr": "*fp32", "levels_ptr": "*i64"},
                     levels)
    compile_for_sm90(fhog._features_kernel, {"hist_ptr": "*fp32", "norm_ptr": "*fp32", "hog_ptr": "*i64",
                                             "planes_ptr": "*fp32", "levels_ptr": "*i64"},
                     {**levels, "NUM_PLANES": 31, "EPSILON": fhog.BLOCK_EPSILON, "TRUNC": fhog.TRUNCATION,
                      "SCALE": fhog.NORM_SCALE, "TEXTURE": fhog.TEXTURE_SCALE})


def test_filter_kernel_compiles_with_the_detectors_bank():
    # The detector's launch (with the threshold test); the probe's one-level launch differs only by that store.
    _filters, slots, fh, fw = FrontalFaceDetector("cpu", use_triton=False).bank.shape
    pointers = {n: "*fp32" for n in ("planes_ptr", "row_taps_ptr", "col_taps_ptr", "total_ptr", "cut_ptr")}
    pointers.update({"plane_idx_ptr": "*i64", "term_counts_ptr": "*i32", "bounds_ptr": "*i64", "levels_ptr": "*i64",
                     "hits_ptr": "*u8"})
    compile_for_sm90(filters._filter_rows_kernel, pointers,
                     {"N_SLOTS": slots, "FW": fw, "FH": fh, "ROW_INTERLEAVED": filters._interleaved_taps(fw),
                      "COL_INTERLEAVED": filters._interleaved_taps(fh), "ROWS": filters._FILTER_ROWS,
                      "BLOCK": filters._FILTER_BLOCK, "HITS": True},
                     num_warps=filters._FILTER_WARPS)


def test_register_report_reads_the_compiled_filter_kernel():
    # benchmarks/kernel_registers.py: the registers and SASS instructions of a filter tile, read from the cubin by
    # the cuobjdump shipped with triton (a small tile: ptxas is quick on it).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernel_registers.py"), "2x64x2",
                          "2x64x2x32"], capture_output=True, text=True, timeout=600, check=True).stdout
    reports = re.findall(r"REG:(\d+) STACK:(\d+).*; (\d+) SASS instructions", out)
    assert len(reports) == 2, out
    (free_regs, _, free_count), (bound_regs, bound_stack, _) = ((int(v) for v in r) for r in reports)
    assert 0 < bound_regs <= 32 < free_regs and free_count > 100, out
    assert bound_stack > 0, out  # bounded below its need, the kernel spills
