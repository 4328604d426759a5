"""One Triton launch over several pyramid levels: the contract the fHOG and filter kernels share.

A launch's level table is an int64 array of (levels + 1) rows of FIELDS columns: row k holds level k's fields,
among them, in one column per kernel, the first program of level k in that kernel's launch (ascending with k);
the extra last row holds in that column the launch's program count. A program finds its level by bisection over
that column (``level_of``), so a launch spans at most 2 ** LEVEL_SEARCH_STEPS levels (``check_level_count``)."""
from __future__ import annotations

from ..kernel_check import tl, triton

__all__ = ["LEVEL_SEARCH_STEPS", "check_level_count", "level_of"]

LEVEL_SEARCH_STEPS = 7  # bisection steps: at most 2 ** 7 levels per launch (a batch's pyramid has about 20-40)


def check_level_count(n_levels: int, kernel: str) -> None:
    """ValueError when ``n_levels`` do not fit one launch of ``kernel`` (named in the message)."""
    if n_levels > 2 ** LEVEL_SEARCH_STEPS:
        raise ValueError(f"{n_levels} levels in one {kernel} launch: at most {2 ** LEVEL_SEARCH_STEPS}")


if triton is not None:
    _LEVEL_SEARCH_STEPS_C = tl.constexpr(LEVEL_SEARCH_STEPS)

    @triton.jit
    def level_of(levels_ptr, pid, n_levels, COLUMN: tl.constexpr, FIELDS: tl.constexpr):
        # Program ``pid`` of a launch over n_levels levels: the last level whose first program (column COLUMN)
        # is <= pid. Returns (a pointer to the level's row, pid within the level).
        lo = pid * 0
        hi = lo + n_levels
        for _ in tl.static_range(_LEVEL_SEARCH_STEPS_C):
            mid = (lo + hi) // 2
            below = tl.load(levels_ptr + mid * FIELDS + COLUMN) <= pid
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid)
        row = levels_ptr + lo * FIELDS
        return row, pid - tl.load(row + COLUMN)
else:  # CPU-only installs: the kernels' modules never launch
    level_of = None
