"""Registers, spills and SASS instructions of the detector's filter kernel for a Hopper GPU (sm_90), without a GPU:
Triton compiles it (frontend and ptxas, both shipped with triton) and cuobjdump, also shipped with it, reads the
cubin. Run it with the device's Triton to get the device's counts: this machine's test Triton (3.5.1) gives other
counts than the device's 3.6.0 (BENCHMARKS.md, 2026-12-07, fifth session), so install that version apart first:

    pip install --no-deps --target /tmp/tr36 triton==3.6.0
    PYTHONPATH=/tmp/tr36 python benchmarks/kernel_registers.py 16x64x2 8x64x2 4x64x2 16x64x2x128

Each argument is a tile: ROWSxBLOCKxWARPS[xMAXNREG] (models/alignment/filters.py's _FILTER_* settings). About 30 s
per tile on one core (ptxas).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import triton  # noqa: E402

from helpers.triton_compile import compile_for_sm90  # noqa: E402
from models.alignment import filters  # noqa: E402
from models.alignment.detector import FrontalFaceDetector  # noqa: E402

_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def cubin_report(cubin: bytes) -> tuple[str, collections.Counter]:
    """(cuobjdump's resource line, SASS opcodes counted) of a cubin."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(_TOOLS, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(_TOOLS, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    opcodes = collections.Counter(m.group(1).split(".")[0] for m in
                                  re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    return next(line.strip() for line in usage.splitlines() if "REG:" in line), opcodes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tiles", nargs="+", help="ROWSxBLOCKxWARPS[xMAXNREG]")
    args = ap.parse_args()
    _filters, slots, fh, fw = FrontalFaceDetector("cpu", use_triton=False).bank.shape
    pointers = {n: "*fp32" for n in ("planes_ptr", "row_taps_ptr", "col_taps_ptr", "total_ptr", "cut_ptr")}
    pointers.update({"plane_idx_ptr": "*i64", "term_counts_ptr": "*i32", "bounds_ptr": "*i64", "levels_ptr": "*i64",
                     "hits_ptr": "*u8"})
    print(f"triton {triton.__version__}, filter kernel for sm_90 (the detector's launch, with the threshold test)")
    for tile in args.tiles:
        rows, block, warps, *bound = (int(v) for v in tile.split("x"))
        compiled = compile_for_sm90(filters._filter_rows_kernel, pointers,
                                    {"N_SLOTS": slots, "FW": fw, "FH": fh,
                                     "ROW_INTERLEAVED": filters._interleaved_taps(fw),
                                     "COL_INTERLEAVED": filters._interleaved_taps(fh), "ROWS": rows, "BLOCK": block,
                                     "HITS": True}, num_warps=warps, **({"maxnreg": bound[0]} if bound else {}))
        usage, opcodes = cubin_report(compiled.asm["cubin"])
        print(f"{tile}: {usage}; {sum(opcodes.values())} SASS instructions, most: {opcodes.most_common(6)}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
