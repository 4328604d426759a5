"""dlib's frontal HOG face detector in PyTorch, batched, following dlib's arithmetic step by step.

The FFHQ alignment is defined by dlib's boxes, so this port reproduces dlib's detector
(``dlib.get_frontal_face_detector()``, an ``object_detector<scan_fhog_pyramid<pyramid_down<6>>>``) rather
than approximating it: the pyramid images, every fHOG feature and every window score come out bit for bit
as dlib's (dlib-bin 20.0.1: AVX, no FMA, no LAPACK). The weights are read from the file
``detector.save(path)`` writes (models/alignment/formats.py; nothing is unpickled); a copy is bundled in
models/data. The stages, each a module of this package in dlib's order of float operations:

1. pyramid.py: ``pyramid_up`` (for ``upsample``) and ``pyramid_down<6>``, dlib's bilinear RGB ``resize_image``.
2. fhog.py: fHOG (cell 8, 31 planes).
3. filters.py: the window scores of the five filters, each replaced by its low-rank approximation from dlib's
   own SVD (svd.py), applied as separable row/column filters.
4. Here: windows at or above threshold + adjust_threshold, mapped to image pixels with dlib's rectangle
   arithmetic (pyramid.window_boxes), dlib's suppression (suppression.py: libstdc++'s ``std::sort`` order and
   the file's overlap thresholds), then ``pyramid_down<2>::rect_down`` for upsampled runs.

GPU exactness: every arithmetic step of the torch paths is a separate eager PyTorch elementwise operation, so
each product is rounded to float32 before the addition that uses it, as in dlib; fused operations and
``torch.compile`` are not used. The same code runs on CPU and CUDA. On CUDA each stage's Triton kernels
(compiled without FMA contraction) serve where their group passed its check against the torch path on the
device (models/kernel_check.py).

Batching (batch_plan.py): a batch's whole pyramid is planned on the host first (every level's size for every
photo, the tables of every stage for every level, uploaded in one copy); every level's photos lie in one buffer,
the photos of a level being the first ones of the batch's order. The device then runs one resize per level (dlib
makes each level from the previous one), and for all levels at once one launch of each fHOG kernel, one of the
filter kernel (which also makes the threshold test) and one compaction of the windows that pass; the
candidates come to the host in one transfer per batch, where dlib's suppression runs. The number of launches
does not depend on the number of photos; only the resize's grows with the number of levels. The Triton kernels
skip each photo's padding.

Input: HxWx3 uint8 RGB arrays, read by their contents. (dlib itself reads a non-contiguous numpy view
wrongly at its smaller pyramid levels; pass C-contiguous arrays to dlib when comparing.)

Device check (on a GPU machine, where dlib is absent; the CPU torch path is the one tested against dlib):
``python -m models.alignment.detector --device cuda tests/data/*.jpg``.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image

from .batch_plan import BatchPlan, plan_batch
from .device import photos_to_device
from .fhog import check_fhog_kernels, fhog_planes_levels
from .filters import FilterBank, check_filter_kernels, filter_scores_levels
from .formats import read_detector_file
from ..kernel_check import triton, use_kernels
from .pyramid import (boxes_down_after_upsample, check_resize_kernels, place_photos, pyramid_up_size, resize_rgb,
                      window_boxes)
from .resize_tables import TAIL_BAND
from .suppression import non_max_suppression

__all__ = ["BATCH_BYTES_PER_PIXEL", "BUNDLED_DETECTOR_FILE", "FrontalFaceDetector", "float32_at_least",
           "gpu_batch_pixels"]

BUNDLED_DETECTOR_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                                     "frontal_face_detector.svm")
# A batch's padded pixels at most this many times its photos' own: fewer, larger batches cost fewer launches
# and host work per photo; the Triton kernels skip the padding, the torch path computes it. Batches of small
# images (under 1/_SMALL_BATCH_SHARE of max_batch_pixels, padded: the crops of the finer searches, of many
# sizes) are not split for padding: each batch is a chain of host steps.
_MAX_PADDING = 1.5
_SMALL_BATCH_SHARE = 16
# A batch holds every pyramid level's buffers at once (pixels, fHOG grids and histograms, planes, window scores):
# at most BATCH_BYTES_PER_PIXEL bytes of device memory per pixel of its padded level 0 (test_batch_plan checks the
# plan's buffers against it). On a GPU a batch may take _GPU_MEMORY_SHARE of the device's memory, since several
# alignment lanes detect at once beside the inversion, and at most _GPU_BATCH_PIXELS pixels.
BATCH_BYTES_PER_PIXEL = 44
_GPU_MEMORY_SHARE = 1 / 8
_GPU_BATCH_PIXELS = 256 * 2 ** 20
_CPU_BATCH_PIXELS = 4 * 2 ** 20


def gpu_batch_pixels(total_memory: int) -> int:
    """The default bound on a batch's padded pixels on a GPU of ``total_memory`` bytes."""
    return min(_GPU_BATCH_PIXELS, int(total_memory * _GPU_MEMORY_SHARE) // BATCH_BYTES_PER_PIXEL)


def float32_at_least(values: np.ndarray) -> np.ndarray:
    """Per double value t, the smallest float32 c with c >= t: for any float32 s, s >= c exactly when s,
    promoted to double, is >= t (dlib's threshold test, made without promoting s)."""
    t = np.asarray(values, dtype=np.float64)
    c = t.astype(np.float32)
    below = c.astype(np.float64) < t
    c[below] = np.nextafter(c[below], np.float32(np.inf))
    return c


class FrontalFaceDetector:
    """dlib's frontal face detector, batched, on CPU or CUDA (same code).

    ``path``: a file written by ``dlib.get_frontal_face_detector().save(path)``; by default the copy bundled
    in models/data (byte-identical to what dlib writes, checked by the tests), so that machines without dlib
    can run it.
    """

    def __init__(self, device: str | torch.device = "cpu", path: str | None = None,
                 max_batch_pixels: int | None = None, chunk_elements: int | None = None,
                 use_triton: bool | None = None):
        """``use_triton``: None: each group of Triton kernels (resize, fhog, filters) on CUDA where it passed its
        check there (models/kernel_check.py), else the torch path; True: every group's kernels (a CUDA
        device, or Triton's interpreter); False: the torch path."""
        self.model = read_detector_file(path or BUNDLED_DETECTOR_FILE)
        self.device = torch.device(device)
        on_gpu = self.device.type != "cpu"
        # Photos per call: bounded by pixels (after upsampling) to bound memory. Filter terms per step: on
        # CPU small enough for the operands to stay in cache; on a GPU large enough to fill it.
        if max_batch_pixels is None:
            max_batch_pixels = _GPU_BATCH_PIXELS if on_gpu else _CPU_BATCH_PIXELS
            if self.device.type == "cuda":
                max_batch_pixels = gpu_batch_pixels(torch.cuda.get_device_properties(self.device).total_memory)
        self.max_batch_pixels = int(max_batch_pixels)
        self.chunk_elements = int(chunk_elements or (2 ** 26 if on_gpu else 2 ** 15))
        self._fhog_pad = self.model.fhog_window
        self.bank = FilterBank.from_model(self.model, self.device)
        self.num_terms = list(self.bank.num_terms)
        self.triton_resize = use_kernels("resize", self.device, use_triton, check_resize_kernels)
        self.triton_fhog = use_kernels("fhog", self.device, use_triton,
                                       lambda device: check_fhog_kernels(device, self._fhog_pad))
        self.triton_filters = use_kernels("filters", self.device, use_triton,
                                          lambda device: check_filter_kernels(device, self.bank),
                                          variant=self.bank.shape)

    @property
    def use_triton(self) -> bool:
        return self.triton_resize and self.triton_fhog and self.triton_filters

    # -- public API ------------------------------------------------------------------------------------

    def detect(self, images, upsample: int = 0, adjust_threshold: float = 0.0, max_levels: int | None = None
               ) -> list[list[tuple[tuple[int, int, int, int], float, int]]]:
        """For each image (HxWx3 uint8 RGB numpy array, or torch tensor: photos already on the detector's
        device are not copied again), dlib's ``detector.run(image, upsample, adjust_threshold)`` as a list
        of ((left, top, right, bottom), score, filter index), best first. ``max_levels``: each run scans at
        most this many pyramid levels (dlib's detector saved with that ``max_pyramid_levels``)."""
        return [per_run[0] for per_run in self.detect_levels(images, [[0]] * len(images), upsample,
                                                             adjust_threshold, max_levels=max_levels)[0]]

    def detect_levels(self, images, runs: list[list[int]], upsample: int = 0, adjust_threshold: float = 0.0,
                      keep_levels: bool = False, max_levels: int | None = None
                      ) -> tuple[list[list[list]], list[list[torch.Tensor]] | None]:
        """Several of dlib's runs per image at once: ``runs[i]`` lists pyramid levels j of image i, and run j is
        ``detector.run(level_j, upsample, adjust_threshold)`` on the image's level j (``pyramid_down(6)``
        applied j times: the detector's own pyramid, so the run scans levels j, j+1, ... of it), as detect()
        reports it (boxes in level j's pixels). Each level is scored once for all of an image's runs, and levels
        finer than its finest run are only resampled; ``max_levels``: as detect()'s. Returns (per image, per run,
        the detections; with ``keep_levels`` (upsample 0 only), per image its levels 0, 1, ... as far as its runs
        went, HxWx3 views on the device, for searches on crops of them; else None)."""
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of HxWx3 uint8 numpy arrays, got {type(images).__name__}")
        if int(upsample) != upsample or upsample < 0:
            raise ValueError(f"upsample must be a non-negative integer, got {upsample!r}")
        upsample = int(upsample)
        if keep_levels and upsample:
            raise ValueError("keep_levels is for runs without upsampling")
        adjust_threshold = float(adjust_threshold)
        for i, image in enumerate(images):
            if not isinstance(image, (np.ndarray, torch.Tensor)):
                raise TypeError(f"images[{i}] must be a numpy array or a torch tensor, got {type(image).__name__}")
            if image.dtype not in (np.uint8, torch.uint8) or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"images[{i}] must be an HxWx3 uint8 RGB array, got shape {image.shape} "
                                 f"dtype {image.dtype}")
        if len(runs) != len(images) or any(not r or min(r) < 0 for r in runs):
            raise ValueError("runs must give each image at least one pyramid level >= 0")
        results: list = [None] * len(images)
        levels = [[] for _ in images] if keep_levels else None
        for batch in self._batches([tuple(im.shape[:2]) for im in images], 4 ** upsample):
            self._detect_batch(images, batch, runs, upsample, adjust_threshold, results, levels, max_levels)
        return results, levels

    # -- internals -------------------------------------------------------------------------------------

    def _batches(self, shapes: list[tuple[int, int]], factor: int) -> list[list[int]]:
        """Indices of ``shapes`` ((h, w) each) in batches padded to a common size: similar shapes together,
        the padding and the pixels (times ``factor``, the upsampling's growth) bounded."""
        order = sorted(range(len(shapes)), key=lambda i: shapes[i])
        batches: list[list[int]] = []
        batch: list[int] = []
        for i in order:
            grown = batch + [i]
            h_max = max(shapes[j][0] for j in grown)
            w_max = max(shapes[j][1] for j in grown)
            area = sum(shapes[j][0] * shapes[j][1] for j in grown)
            padded = h_max * w_max * len(grown)
            if batch and (padded * factor > self.max_batch_pixels or (
                    padded > _MAX_PADDING * area and padded * factor * _SMALL_BATCH_SHARE > self.max_batch_pixels)):
                batches.append(batch)
                grown = [i]
            batch = grown
        if batch:
            batches.append(batch)
        return batches

    def _detect_batch(self, images, index, runs, upsample, adjust, results, kept_levels, max_levels):
        sizes = [images[i].shape[:2] for i in index]
        tiny = [k for k, (h, w) in enumerate(sizes) if h == 0 or w == 0]
        for k in tiny:
            results[index[k]] = [[] for _ in runs[index[k]]]
        index = [i for k, i in enumerate(index) if k not in tiny]
        if not index:
            return
        sizes = [tuple(int(v) for v in images[i].shape[:2]) for i in index]
        grown = list(sizes)
        for _ in range(upsample):
            grown = [pyramid_up_size(h, w) for h, w in grown]
        # Everything the levels need is planned and uploaded before the device work: no host steps per level
        # but the resize's launch, no transfer back until the batch's windows.
        level0_hw = (max(h for h, _ in grown), max(w for _, w in grown) + (TAIL_BAND if upsample else 0))
        plan = plan_batch(grown, [runs[i] for i in index], self.model, max_levels, self.bank.shape[0], level0_hw)
        sizes = [sizes[k] for k in plan.order]
        # (photos_to_device puts the photos one after the other in this order: these are its starts)
        starts = np.cumsum([0] + [h * w for h, w in sizes[:-1]]).astype(np.int64)
        cut, *place = plan.upload(self.device, (float32_at_least(self.model.thresholds + adjust), starts,
                                                np.asarray(sizes, np.int32).reshape(-1, 2)))
        # Every level's photos in one buffer, every scored level's fHOG planes in another, their window scores in
        # a third (-inf outside each photo's own windows: they never pass) and the threshold test's hits beside
        # them: the pyramid is made level by level (each level from the previous), then fHOG, the filters and
        # the test run once for all levels.
        pixels = torch.empty((plan.pixel_elements,), dtype=torch.uint8, device=self.device)
        level0 = plan.pixels(pixels, 0)
        photos = [images[index[k]] for k in plan.order]
        if upsample:
            batch = self._upload_batch(photos, sizes, max(h for h, _ in sizes), max(w for _, w in sizes),
                                       tables=place)
            for step in range(upsample):
                up = [pyramid_up_size(h, w) for h, w in sizes]
                batch = resize_rgb(batch, sizes, up, use_triton=self.triton_resize,
                                   out=level0 if step == upsample - 1 else None)
                sizes = up
        else:
            self._upload_batch(photos, sizes, *level0.shape[2:], out=level0, tables=place)
        planes = torch.zeros((plan.planes_elements,), dtype=torch.float32, device=self.device)
        scores = torch.full((plan.score_elements,), -torch.inf, dtype=torch.float32, device=self.device)
        hits = torch.zeros((plan.score_elements,), dtype=torch.uint8, device=self.device)
        for lp in plan.levels:
            batch = plan.pixels(pixels, lp.level)
            if kept_levels is not None:
                for pos, (h, w) in enumerate(lp.sizes):
                    kept_levels[index[plan.order[pos]]].append(batch[pos, :, :h, :w].permute(1, 2, 0))
            if lp.resize is not None:
                resize_rgb(batch[:len(lp.resize.out_sizes)], lp.resize.in_sizes, lp.resize.out_sizes,
                           use_triton=self.triton_resize, plan=lp.resize, out=plan.pixels(pixels, lp.level + 1))
        fhog_planes_levels(pixels, plan.fhog_levels(), planes, use_triton=self.triton_fhog, tables=plan.fhog_tables)
        # dlib compares the float32 saliency, promoted to double, with threshold + adjust_threshold (double); the
        # comparison is made in float32 against float32_at_least (the same windows pass).
        filter_scores_levels(planes, plan.filter_levels(planes), self.bank, scores, hits, cut, self.chunk_elements,
                             use_triton=self.triton_filters, tables=plan.filter_tables)
        found = self._windows(plan, scores, hits)
        for k, i in enumerate(index):
            results[i] = [self._finish(found.get(k), j, end, upsample) for j, end in plan.spans[k]]

    def _upload_batch(self, photos, sizes, h_max, w_max, out: torch.Tensor | None = None,
                      tables: tuple | None = None) -> torch.Tensor:
        """(B, 3, h_max, w_max) uint8 on the device (``out`` when given), photo k in its top-left corner, zeros
        around. Host photos travel in one copy (through pinned memory to a GPU); photos already on the device are
        not copied; then one placement for all (place_photos; ``tables``: its tables on the device)."""
        flat, starts, _ = photos_to_device(photos, self.device)
        if out is None:
            out = torch.empty((len(photos), 3, h_max, w_max), dtype=torch.uint8, device=self.device)
        return place_photos(flat, starts, sizes, out, use_triton=self.triton_resize, tables=tables)

    def _windows(self, plan: BatchPlan, scores: torch.Tensor, hits: torch.Tensor) -> dict:
        """Per photo (position in the batch's index), its windows that passed, at every level scored: arrays
        (levels, scores, filters, rows, cols, boxes in level 0's pixels). One transfer from the device for the
        whole batch (the candidates: flat position and saliency); decoded on the host with numpy, all levels
        at once."""
        if plan.score_elements == 0:
            return {}
        where = torch.nonzero(hits).squeeze(1)
        both = torch.stack([where.double(), scores[where].double()]).cpu().numpy()
        where, saliency = both[0].astype(np.int64), both[1]
        if where.size == 0:
            return {}
        fh, fw = self._fhog_pad
        n_filters = self.bank.shape[0]
        table = plan.level_table()
        li = np.searchsorted(table["offset"], where, side="right") - 1
        local = where - table["offset"][li]
        cols = table["cols"][li]
        per_filter = table["rows"][li] * cols
        pos = local // (n_filters * per_filter)
        f_idx = (local // per_filter) % n_filters
        rows = (local % per_filter) // cols + fh // 2
        cols = local % cols + fw // 2
        levels = table["level"][li]
        values = saliency - self.model.thresholds[f_idx]
        boxes = window_boxes(rows, cols, levels, self.model)
        photo = np.asarray(plan.order, np.int64)[pos]
        by_photo = np.argsort(photo, kind="stable")
        photos, firsts = np.unique(photo[by_photo], return_index=True)
        found = {}
        for k, a, b in zip(photos.tolist(), firsts, [*firsts[1:], len(by_photo)]):
            sel = by_photo[a:b]
            found[k] = (levels[sel], values[sel], f_idx[sel], rows[sel], cols[sel], boxes[sel])
        return found

    def _finish(self, found, first, end, upsample):
        """The run on level ``first`` from a photo's windows (_windows): those of its levels [first, end), boxes
        in level ``first``'s pixels, dlib's suppression, boxes back down an upsampling."""
        if found is None:
            return []
        levels, scores, filters, rows, cols, boxes = found
        sel = (levels >= first) & (levels < end)
        if not sel.any():
            return []
        levels, scores, filters, rows, cols = levels[sel] - first, scores[sel], filters[sel], rows[sel], cols[sel]
        keys = np.stack([filters, levels, rows, cols], axis=1)
        # Runs on level 0 (every run of the default full pyramid) take the boxes _windows made.
        boxes = boxes[sel] if first == 0 else window_boxes(rows, cols, levels, self.model)
        kept = non_max_suppression(boxes, scores, keys, self.model)
        boxes = boxes[kept]
        if upsample:
            boxes = boxes_down_after_upsample(boxes, upsample)
        return [((int(b[0]), int(b[1]), int(b[2]), int(b[3])), float(s), int(f))
                for b, s, f in zip(boxes, scores[kept], keys[kept, 0])]


# -- device check (run on the GPU machine, where dlib is absent; the CPU torch path is the one tested against
# dlib): python -m models.alignment.detector --device cuda tests/data/*.jpg ------------------------------------

def _check_device(argv=None) -> int:
    parser = argparse.ArgumentParser(description="FrontalFaceDetector on a device (Triton and torch paths) "
                                     "against the CPU torch path, bit for bit, and its speed.")
    parser.add_argument("photos", nargs="+", help="RGB photographs (e.g. tests/data/*.jpg)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--path", default=None, help="detector file (default: the bundled one)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in args.photos]
    rng = np.random.default_rng(0)
    images = []
    for photo in photos:  # scales, crops and mirrors of every photo, sizes 0.4x to 2.5x
        for scale in (0.4, 0.7, 1.0, 1.6, 2.5):
            im = Image.fromarray(photo)
            im = np.asarray(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                                      Image.Resampling.BILINEAR))
            top, left = (int(v) for v in rng.integers(0, [max(1, im.shape[0] // 4), max(1, im.shape[1] // 4)]))
            im = im[top:, left:]
            images.append(np.ascontiguousarray(im[:, ::-1] if rng.random() < 0.5 else im))
    cpu = FrontalFaceDetector("cpu", args.path)
    devices = {"torch": FrontalFaceDetector(args.device, args.path, use_triton=False)}
    if args.device.startswith("cuda") and triton is not None:
        devices["triton"] = FrontalFaceDetector(args.device, args.path)
        print(f"triton kernels in use: resize {devices['triton'].triton_resize}, fhog {devices['triton'].triton_fhog}, "
              f"filters {devices['triton'].triton_filters} (False: see the warning above)")
    failures = 0
    for upsample in (0, 1):
        subset = images if upsample == 0 else [im for im in images if im.shape[0] * im.shape[1] <= 700 * 700]
        for adjust in (0.0, -0.5):
            want = cpu.detect(subset, upsample, adjust)
            for name, det in devices.items():
                got = det.detect(subset, upsample, adjust)
                bad = [i for i, (w, g) in enumerate(zip(want, got)) if w != g]
                failures += len(bad)
                print(f"{name} on {args.device}, upsample {upsample}, adjust {adjust}: {len(subset)} images, "
                      f"{sum(map(len, want))} detections, {len(bad)} differ from CPU")
                for i in bad[:5]:
                    print(f"  image {i} {subset[i].shape}\n    cpu:    {want[i]}\n    device: {got[i]}")
    square = np.asarray(Image.fromarray(photos[0]).resize((args.size, args.size), Image.Resampling.BILINEAR))
    batch = [square] * args.batch
    for name, det in devices.items():
        det.detect(batch)
        sync = torch.cuda.synchronize if det.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(3):
            det.detect(batch)
        sync()
        seconds = (time.perf_counter() - start) / 3
        print(f"{name}: {args.batch} photos of {args.size}x{args.size}, upsample 0: {seconds * 1e3:.1f} ms, "
              f"{args.batch / seconds:.0f} photos/s")
    print("OK: device results equal the CPU path" if failures == 0 else f"FAILED: {failures} images differ")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(_check_device())
