"""The project's Triton kernels run by Triton's interpreter on CPU tensors, compared bit for bit with the torch paths.

    TRITON_INTERPRET=1 PYTHONPATH=.:tests python tests/helpers/triton_interpreter_checks.py GROUP

The kernels (models/alignment/: pyramid.py, fhog.py, filters.py, landmarks.py, resample.py) port dlib's and
Pillow's arithmetic to the GPU and are only used there when they equal the torch path, checked on the device
(models/kernel_check.py) with the probes these checks run too. Machines without a GPU (CI) never
compile them, but the interpreter executes their code (the same operations in the same order, with numpy) on
CPU tensors, so a change that breaks their arithmetic, indexing or masking fails here. The interpreter is
chosen when ``triton`` is first imported (kernels are decorated at import), so these checks run in a process of
their own:
tests/models/alignment/test_triton_kernels_interpreted.py starts one per group (the repository and tests/ on its
PYTHONPATH) and reads what it prints.

Output: one line per check, ``PASS name`` or ``FAIL name: why``; the last check of every group says which
Triton functions ran (each must have run at least once). Exit status 0 only when every check passed.
The interpreter is slow (it runs the programs of a launch one after the other, in Python: milliseconds to
seconds each): inputs are as small as the tiles and masks they must exercise allow.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Callable

from helpers.paths import DATA_DIR

# The Triton functions (kernels and the jit helpers they call) each group must run, per module: the test
# file checks that together they are all of the modules' Triton functions.
FUNCTIONS = {
    "detector-resize": {"models.alignment.pyramid": ["_resize_rgb_kernel", "_place_photos_kernel"]},
    "detector-fhog": {"models.alignment.fhog": ["_orient_mag_kernel", "_cell_hist_kernel", "_block_energy_kernel",
                                                "_features_kernel", "_lane_normaliser"],
                      "models.alignment.level_launch": ["level_of"]},
    "detector-filters": {"models.alignment.filters": ["_filter_rows_kernel", "_filter_rows", "_row_pass",
                                                      "_dlib_dot"],
                         "models.alignment.level_launch": ["level_of"]},
    "detector-detect": {"models.alignment.pyramid": ["_resize_rgb_kernel", "_place_photos_kernel"],
                        "models.alignment.fhog": ["_orient_mag_kernel", "_cell_hist_kernel", "_block_energy_kernel",
                                                  "_features_kernel"],
                        "models.alignment.filters": ["_filter_rows_kernel"]},
    "landmarks": {"models.alignment.landmarks": ["_tree_leaf_kernel", "_add_leaves_kernel"]},
    "quad": {"models.alignment.resample": ["_quad_bilinear_kernel"]},
}


# -- counting calls of Triton functions ---------------------------------------------------------------------

class _Counted:
    """A Triton function that counts its launches (``kernel[grid](...)``) and calls (a jit helper called from
    a kernel). Installed in place of the module's global and of every other loaded module's global bound to the
    same function (a jit helper the kernels' modules import): that is where the launching code and the kernels'
    bodies look their callees up."""

    def __init__(self, fn):
        self.fn = fn
        self.runs = 0

    def __getitem__(self, grid):
        self.runs += 1
        return self.fn[grid]

    def __call__(self, *args, **kwargs):
        self.runs += 1
        return self.fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fn, name)


def triton_functions(module) -> dict[str, object]:
    """The Triton functions (jit-decorated) the module defines (not those it imports), by name."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def defined_here(value) -> bool:
        fn = value.fn.fn if isinstance(value, _Counted) else value.fn
        return getattr(fn, "__module__", None) == module.__name__

    return {name: value for name, value in vars(module).items()
            if isinstance(value, (JITFunction, InterpretedFunction, _Counted)) and defined_here(value)}


def count_runs(group: str) -> Callable[[], str | None]:
    """Wraps the group's Triton functions in counters; returns the check that each of them ran, interpreted."""
    import importlib

    from triton.runtime.interpreter import InterpretedFunction

    counters = {}
    for module_name, names in FUNCTIONS[group].items():
        module = importlib.import_module(module_name)
        found = triton_functions(module)
        for name in names:
            if name not in found:
                raise RuntimeError(f"{module_name}.{name} is not a Triton function (renamed? update FUNCTIONS)")
            if not isinstance(found[name], InterpretedFunction):
                raise RuntimeError(f"{module_name}.{name} is {type(found[name]).__name__}, not interpreted: "
                                   "TRITON_INTERPRET=1 must be set before triton is imported")
            counter = _Counted(found[name])
            for user in list(sys.modules.values()):
                if getattr(user, "__name__", "").startswith("models.") and vars(user).get(name) is found[name]:
                    setattr(user, name, counter)
            counters[f"{module_name}.{name}"] = counter

    def all_ran() -> str | None:
        idle = [name for name, counter in counters.items() if counter.runs == 0]
        return f"never ran: {', '.join(idle)}" if idle else None

    return all_ran


# -- inputs -------------------------------------------------------------------------------------------------

def photo(name: str, max_side: int):
    """A test photograph shrunk to at most ``max_side`` pixels (Pillow, LANCZOS), HxWx3 uint8."""
    import numpy as np
    from PIL import Image

    with Image.open(os.path.join(DATA_DIR, name)) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side), Image.LANCZOS)
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def differences(want, got) -> str | None:
    import torch

    if want.shape != got.shape:
        return f"shapes differ: torch {tuple(want.shape)}, Triton {tuple(got.shape)}"
    if torch.equal(want, got):
        return None
    return f"{int((want != got).sum())} of {want.numel()} values differ"


# -- face detector ------------------------------------------------------------------------------------------

def _detector(use_triton: bool):
    from models.alignment.detector import FrontalFaceDetector

    # Under the interpreter the Triton kernels run on CPU tensors: a CPU detector runs them when forced.
    return FrontalFaceDetector("cpu", use_triton=use_triton)


def check_detector_resize() -> str | None:
    # The device probe: two sizes in a batch, pyramid_down and pyramid_up, columns over two kernel blocks.
    from models.alignment.pyramid import check_resize_kernels

    return check_resize_kernels("cpu")


def check_detector_fhog() -> str | None:
    # The device probe: quantised random images (ties in every vote), two sizes in a batch.
    from models.alignment.fhog import check_fhog_kernels

    return check_fhog_kernels("cpu", _detector(False).model.fhog_window)


def check_detector_filters_few_terms() -> str | None:
    """The device probe of the fused filter kernel (planes over several row tiles and column blocks, two images of
    other sizes in a batch) on the detector's bank cut to five of its term slots per filter: the first two, the
    last term of the filter with the fewest terms and the zero slot after it (padding, which must add +0.0), and
    the last slot. (All of the model's slots, about 60, take about 2 s per program under the interpreter, and
    the probe's own planes 150 programs: minutes. detector-detect runs every slot, on a real photo.)"""
    from models.alignment import filters

    bank = _detector(False).bank
    fewest, most = min(bank.num_terms), max(bank.num_terms)
    if fewest == most:
        return "every filter has as many terms as the others: no padding slot to check"
    few = bank.select_slots([0, 1, fewest - 1, fewest, most - 1])
    rows_tile, cols_block = filters._FILTER_ROWS, filters._FILTER_BLOCK
    # Image 0: two row tiles, its last column block partial; image 1: less than one row tile, three column
    # blocks. Neither width is a multiple of 8: both have a band of columns on dlib's scalar loop. The torch
    # path with its CPU chunk and with one term per step.
    hog = ((rows_tile + 5, cols_block - 3), (rows_tile // 3, 2 * cols_block + 6))
    return filters.check_filter_kernels("cpu", few, hog=hog, chunks=(2 ** 15, 1))


def check_detector_detect_batch() -> str | None:
    """One whole detect() with every Triton group switched on against the torch path: a real face (Grace
    Hopper, ~90 px, found at level 0 of two pyramid levels) and another photograph of another size batched
    with it (astronaut, 74x60, one level), with a threshold low enough that both images report windows. Besides
    the detections, every window's score and threshold test at every level is compared (a detection is the best
    of many), and outside each photo's own windows the scores must be -inf and the tests 0 on both paths."""
    import numpy as np
    import torch

    face = photo("grace_hopper.jpg", 200)[30:120, 40:130]
    other = photo("astronaut.jpg", 90)[:74, :60]
    images = [face.copy(), other.copy()]
    adjust = -2.0
    seen = {}  # per path: (plan, scores buffer, hits buffer) of the batch
    found = {}
    for use_triton in (False, True):
        det = _detector(use_triton)
        windows = det._windows

        def recorded(plan, scores, hits, windows=windows, use_triton=use_triton):
            seen[use_triton] = (plan, scores.clone(), hits.clone())
            return windows(plan, scores, hits)

        det._windows = recorded
        found[use_triton] = det.detect(images, adjust_threshold=adjust)
    want, got = found[False], found[True]
    if got != want:
        return f"detections differ:\n  torch:  {want}\n  Triton: {got}"
    if not all(want) or max(score for _box, score, _f in want[0]) < 0:
        return f"too little to compare (want a face above threshold and windows in both images): {want}"
    plan, want_scores, want_hits = seen[False]
    _plan, got_scores, got_hits = seen[True]
    scored = [lp for lp in plan.levels if lp.layout is not None]
    if len(scored) < 2:
        return f"levels scored: {len(scored)} (expected >= 2)"
    for lp in scored:
        at = slice(lp.score_offset, lp.score_offset + lp.score_elements)
        hog = lp.layout.hog
        _n, _f, rows, cols = lp.score_shape
        valid = torch.from_numpy((np.arange(rows)[None, None, :, None] < hog[:, 0, None, None, None])
                                 & (np.arange(cols)[None, None, None, :] < hog[:, 1, None, None, None]))
        for name, buffers in (("torch", (want_scores, want_hits)), ("Triton", (got_scores, got_hits))):
            level_scores, level_hits = (t[at].view(lp.score_shape) for t in buffers)
            if not bool(torch.isneginf(torch.where(valid, -torch.inf, level_scores)).all()):
                return f"level {lp.level}: the {name} path's scores outside the images' own windows are not all -inf"
            if bool(torch.where(valid, 0, level_hits).any()):
                return f"level {lp.level}: the {name} path's hits outside the images' own windows are not all 0"
        for what, w, g in (("window scores", want_scores, got_scores), ("threshold tests", want_hits, got_hits)):
            problem = differences(w[at], g[at])
            if problem:
                return f"level {lp.level}: {what}: {problem}"
    if not 0 < int(want_hits.sum()) < int(torch.isfinite(want_scores).sum()):
        return "every window passed or none: the threshold tests were not compared"
    return None


# -- landmarks ----------------------------------------------------------------------------------------------

def _predictor(trees: int, depth: int, parts: int, seed: int, use_triton: bool):
    """A random predictor, every other threshold rounded to an integer: grey levels are integers, so those
    splits see f1 - f2 == threshold (a tie goes to the right child); the others keep float thresholds."""
    import dataclasses

    import numpy as np

    from models.alignment.landmarks import ShapePredictor
    from models.alignment.landmarks_model import random_model

    model = random_model(cascades=3, trees=trees, depth=depth, pixels=200, parts=parts, seed=seed)
    threshold = model.split_threshold.copy()
    threshold[..., ::2] = np.round(threshold[..., ::2] / 8)
    model = dataclasses.replace(model, split_threshold=threshold)
    return ShapePredictor.from_model(model, device="cpu", use_triton=use_triton)


# Tree shapes: trees over three blocks of the tree kernel (the last partial), unrolled by 10, 68 points
# (136 coordinates: five blocks of the leaf kernel, the last partial); and a tree count unrolled by 4, depth
# 3, five points (one partial block).
PREDICTOR_SHAPES = [dict(trees=300, depth=4, parts=68, seed=1), dict(trees=132, depth=3, parts=5, seed=2)]


def check_landmark_cascades() -> str | None:
    """The device probe (check_landmark_kernels): each cascade's trees and leaf sums with both kernels against
    the torch path, from the same shapes and feature pixel values, quantised so that many splits tie."""
    from models.alignment.landmarks import check_landmark_kernels

    for shape_args in PREDICTOR_SHAPES:
        problem = check_landmark_kernels("cpu", cascades=3, pixels=200, **shape_args)
        if problem:
            return f"{shape_args}: {problem}"
    return None


def check_landmark_predict() -> str | None:
    """Whole predict() with the Triton kernels against the torch path: two images of other sizes (a photo and
    quantised noise), several faces each, boxes partly outside the images."""
    import numpy as np

    rng = np.random.default_rng(3)
    face = photo("grace_hopper.jpg", 150)
    noise = (rng.integers(0, 4, (70, 95, 3)) * 85).astype(np.uint8)
    boxes = [[(30, 30, 110, 110), (-20, 40, 60, 170), (5, 10, 35, 40)], [(10, 5, 80, 65), (60, -30, 130, 50)]]
    for shape_args in PREDICTOR_SHAPES:
        want = _predictor(**shape_args, use_triton=False).predict([face, noise], boxes)
        got = _predictor(**shape_args, use_triton=True).predict([face, noise], boxes)
        for i, (w, g) in enumerate(zip(want, got)):
            if w.shape != g.shape or not np.array_equal(w, g):
                return f"{shape_args}, image {i}: points differ at {int((w != g).sum())} coordinates"
        if len({p.tobytes() for w in want for p in w}) < sum(len(b) for b in boxes):
            return f"{shape_args}: faces got identical points: too little to compare"
    return None


# -- Pillow's QUAD transform --------------------------------------------------------------------------------

def check_quad_sample() -> str | None:
    """quad_sample with the Triton kernel against the torch path: three sources of other sizes in one buffer, one of them
    a window of a wider image (stride > width, as the crop samples photos), and quads across the edges,
    mirrored and rotated, and on a grid of pixel centres and midpoints (fractions 0 and 0.5); outputs 131 px
    wide (two column blocks, the second masked after 3 columns)."""
    import numpy as np
    import torch

    from models.alignment import resample as pr

    rng = np.random.default_rng(0)
    wide = 100                                                   # the third source lies in a 100-wide image
    buffers = [rng.integers(0, 256, (61 * 47, 3), dtype=np.uint8), rng.integers(0, 256, (29 * 13, 3), dtype=np.uint8),
               rng.integers(0, 256, (wide * 50, 3), dtype=np.uint8)]
    base = np.cumsum([0] + [len(b) for b in buffers[:-1]])
    flat = torch.from_numpy(np.concatenate(buffers))
    window_at = base[2] + 7 * wide + 20                          # row 7, column 20 of the wide image
    where = [(base[0], 61, 61, 47), (base[1], 29, 29, 13), (window_at, wide, 40, 30)]  # base, stride, w, h
    size = 131
    quads = [
        ([-3.3, 0.71, 0.13, 1e-4, -2.1, -0.09, 0.83, 2e-4], 0),   # across the edges, a little warped
        ([1.7, 0.41, -0.05, -3e-4, 0.3, 0.07, 0.27, 1e-4], 1),
        ([0.25, 0.5, 0.0, 0.0, 0.25, 0.0, 0.5, 0.0], 2),          # pixel centres and midpoints, past the window
        ([45.0, -0.4, 0.1, 0.0, 2.0, 0.05, 0.2, 0.0], 0),         # mirrored and rotated
    ]
    src = pr.ImageSources(*torch.tensor([where[k] for _, k in quads], dtype=torch.int64).t().contiguous())
    coeffs = torch.tensor([q for q, _ in quads], dtype=torch.float64)
    want = pr.quad_sample(flat, src, coeffs, size, use_triton=False)
    got = pr.quad_sample(flat, src, coeffs, size, use_triton=True)
    problem = differences(want, got)
    if problem:
        return problem
    black = (want == 0).all(dim=-1)
    if not (bool(black.any(dim=(1, 2)).all()) and not bool(black.all(dim=(1, 2)).any())):
        return "every quad must sample inside and outside its source: the masks are not exercised"
    return None


def check_quad_in_crop_faces() -> str | None:
    """models.alignment.ffhq_crop.crop_faces with the QUAD transform on the Triton kernel (forced: on CPU the
    default is the torch path) against the torch path: dlib's landmarks of a photo, a face cropped from the photo and the
    same face cut at the photo's edge (sampled from a padded canvas)."""
    import dlib
    import numpy as np
    import torch

    from models.alignment.ffhq_crop import crop_faces
    from models.alignment.ffhq_geometry import ffhq_quads, plan_crop
    from models.alignment.landmarks_model import shape_predictor_68_path

    image = photo("grace_hopper.jpg", 240)
    box = max(dlib.get_frontal_face_detector()(image, 0), key=lambda r: r.area(), default=None)
    if box is None:
        return "dlib found no face to crop"
    shape = dlib.shape_predictor(shape_predictor_68_path())(image, box)
    landmarks = np.array([(shape.part(k).x, shape.part(k).y) for k in range(68)], dtype=np.float64)
    cut_x = int(landmarks[:, 0].mean())                          # the face's left half only
    cut = np.ascontiguousarray(image[:, cut_x:])
    photos, faces = [image, cut], np.stack([landmarks, landmarks - (cut_x, 0)])
    size = 131                                                   # two column blocks of the kernel
    quads, qsizes = ffhq_quads(faces)
    plans = [plan_crop(quads[i], qsizes[i], (p.shape[1], p.shape[0]), size, size, True) for i, p in enumerate(photos)]
    if [plan.padded for plan in plans] != [False, True]:
        return f"expected the whole face unpadded and the cut face padded, got {[p.padded for p in plans]}"
    want = crop_faces(photos, [0, 1], faces, output_size=size, transform_size=size, plans=plans, use_triton=False)
    got = crop_faces(photos, [0, 1], faces, output_size=size, transform_size=size, plans=plans, use_triton=True)
    problem = differences(want, got)
    if problem:
        return f"crops: {problem}"
    if any(len(torch.unique(crop)) < 100 for crop in want):
        return "a crop is (nearly) flat: too little to compare"
    return None


CHECKS: dict[str, list[tuple[str, Callable[[], str | None]]]] = {
    "detector-resize": [("resize", check_detector_resize)],
    "detector-fhog": [("fhog", check_detector_fhog)],
    "detector-filters": [("filters_few_terms", check_detector_filters_few_terms)],
    "detector-detect": [("detect_two_photos", check_detector_detect_batch)],
    "landmarks": [("cascades", check_landmark_cascades), ("predict", check_landmark_predict)],
    "quad": [("quad_sample", check_quad_sample), ("crop_faces", check_quad_in_crop_faces)],
}
ALL_RAN = "all_triton_functions_ran"


def check_names(group: str) -> list[str]:
    """The names of the lines a run of ``group`` prints, in order."""
    return [name for name, _ in CHECKS[group]] + [ALL_RAN]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in CHECKS:
        print(f"usage: TRITON_INTERPRET=1 python {sys.argv[0]} {{{','.join(CHECKS)}}}", file=sys.stderr)
        return 2
    group = argv[0]
    if os.environ.get("TRITON_INTERPRET") != "1":
        print(f"FAIL {group}: TRITON_INTERPRET=1 must be set (the kernels would need a GPU otherwise)")
        return 1
    import torch

    # Many small tensor operations and a single-threaded interpreter: a second intra-op thread only adds
    # synchronisation on CI's 2 cores.
    torch.set_num_threads(1)
    try:
        all_ran = count_runs(group)
    except Exception as e:  # noqa: BLE001 - reported as the group's failure
        print(f"FAIL {ALL_RAN}: {type(e).__name__}: {e}")
        return 1
    failed = 0
    for name, check in [*CHECKS[group], (ALL_RAN, all_ran)]:
        started = time.perf_counter()
        try:
            problem = check()
        except Exception:  # noqa: BLE001 - a kernel that does not run under the interpreter is a failure
            problem = "raised\n" + traceback.format_exc()
        took = time.perf_counter() - started
        verdict = "PASS" if problem is None else "FAIL"
        print(f"{verdict} {name} ({took:.1f} s)" + ("" if problem is None else f": {problem}"), flush=True)
        failed += problem is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
