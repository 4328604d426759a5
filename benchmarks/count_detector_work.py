"""How much host work the detector makes per chunk of photos: kernel launcher calls by stage (each one or two GPU
kernels), host->device copies (upload_many), device->host synchronisations (transfers, nonzero, item, bool),
other torch operations of the detector's own (each a kernel launch on a GPU), pyramid levels and batches, and
the pixels scored. A count, not a timing: it runs on the CPU (the torch path stands for the kernels: a launcher
call is counted once whatever path runs inside it) and tells the host steps apart before a GPU run. With
``--stub-kernels``, also the compiled variants per kernel a CUDA process would need so far (Triton's own binder
for sm_90: a new specialisation of the arguments is a new compilation; tests/models/alignment/test_kernel_variants.py
requires one per kernel).

    python benchmarks/count_detector_work.py --photos 8 --chunk 4 --min-side 300 --max-side 500      # CPU, minutes
    python benchmarks/count_detector_work.py --repo /tmp/older-checkout ...   # the same counts of other code
    python benchmarks/count_detector_work.py --photos 32 --aligner 384,null   # DeviceAligner.detect's calls

``--repo``: a checkout whose models/ are counted (e.g. ``git worktree add /tmp/before <commit>``), so that
before and after are counted by the same script. ``--aligner``: also count DeviceAligner.detect per setting of
align.device_detect_max_side (detector calls, batches, scored level steps and MP, with the GPU's batch limit).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_ap.add_argument("--photos", type=int, default=8)
_ap.add_argument("--chunk", type=int, default=64, help="photos per detect() call (the pipeline's chunk)")
_ap.add_argument("--min-side", type=int, default=1024)
_ap.add_argument("--max-side", type=int, default=1800)
_ap.add_argument("--device", default="cpu")
_ap.add_argument("--repo", default=ROOT, help="the checkout whose models/ are counted")
_ap.add_argument("--aligner", default="", help="device_detect_max_side values to count DeviceAligner.detect with "
                 "('null' for None), e.g. 384,null")
_ap.add_argument("--stub-kernels", action="store_true", help="the GPU path's host steps: the Triton launchers run "
                 "(under Triton's interpreter, on CPU tensors) with every kernel replaced by a stub that only counts "
                 "its launches; detections are then meaningless, the host steps and their time are the GPU path's")
_ap.add_argument("--verbose", action="store_true", help="print the torch operations by name")
_ap.add_argument("--out", default="")
ARGS = _ap.parse_args()
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.abspath(ARGS.repo))
if ARGS.stub_kernels:
    os.environ["TRITON_INTERPRET"] = "1"  # chosen before triton is first imported

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import models.alignment as alignment  # noqa: E402
from models.alignment import detector as detector_module  # noqa: E402
from models.alignment import device as device_module  # noqa: E402
from benchmarks.bench_pipeline_raw_gpu import face_like_model, make_photos  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402

GPU_BATCH_PIXELS = 256 * 2 ** 20  # FrontalFaceDetector's batch limit on a GPU
# Launchers by stage: each is one or two kernels on a GPU (its torch path stands for them on the CPU).
KERNELS = ["_resize_rgb_kernel", "_place_photos_kernel", "_orient_mag_kernel", "_cell_hist_kernel",
           "_block_energy_kernel", "_features_kernel", "_filter_rows_kernel"]
LAUNCHERS = {"pyramid": ["_resize_rgb_torch", "_resize_rgb_triton"],
             "fhog": ["_fhog_level_torch", "_fhog_levels_triton",  # (and before the levels' launch:)
                      "_cell_histograms_torch", "_cell_histograms_triton", "_fhog_features_torch",
                      "_fhog_features_triton"],
             "filters": ["_filter_scores_torch", "_filter_scores_triton", "_launch_filter_levels"]}
# Tensor methods and functions that make the host wait for the device.
SYNCS = {"cpu", "item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__", "equal"}
# Metadata, not device work.
METADATA = {"size", "dim", "numel", "stride", "is_contiguous", "data_ptr", "element_size", "__len__", "__iter__",
            "__repr__", "__format__", "storage_offset", "__setstate__", "__reduce_ex__", "is_floating_point", "device",
            "dtype", "shape", "is_cuda"}
# Views: host work (microseconds each), no kernel.
VIEWS = {"__getitem__", "view", "permute", "reshape", "squeeze", "unsqueeze", "expand", "transpose", "t",
         "as_strided", "narrow", "select", "contiguous"}


class Counts:
    def __init__(self):
        self.reset()
        self.inside = 0  # > 0 while a launcher runs: its torch operations are the kernel's, not host steps

    def reset(self):
        self.launches: Counter = Counter()
        self.ops: Counter = Counter()
        self.kernels: Counter = Counter()
        self.views: Counter = Counter()
        self.syncs: Counter = Counter()
        self.uploads = 0
        self.batches = 0
        self.levels = 0
        self.scored_mp = 0.0


COUNTS = Counts()


class _OpCounter(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if COUNTS.inside == 0 and not name.endswith("__get__") and name not in METADATA:
            if name in SYNCS or (name == "to" and any(str(a) == "cpu" for a in list(args[1:]) + list((kwargs or {}).values()))):
                # A transfer to or a decision on the host waits for the device's queue (on a GPU).
                COUNTS.syncs[name] += 1
            elif name in VIEWS:
                COUNTS.views[name] += 1
            else:
                COUNTS.ops[name] += 1
        return func(*args, **(kwargs or {}))


class _OpTimer(TorchFunctionMode):
    """Time spent inside torch operations (outermost calls only)."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter()
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.seconds += time.perf_counter() - t


def _wrap_launcher(stage, fn):
    # The torch path's operations inside a launcher are its kernels'; with stubbed Triton kernels the launcher's
    # own torch operations (allocations) are host steps of the GPU path, counted.
    depth = 0 if ARGS.stub_kernels else 1

    @functools.wraps(fn)
    def counted(*args, **kwargs):
        COUNTS.launches[stage] += 1
        COUNTS.inside += depth
        try:
            return fn(*args, **kwargs)
        finally:
            COUNTS.inside -= depth
    return counted


def _wrap_upload(fn):
    @functools.wraps(fn)
    def counted(*args, **kwargs):
        COUNTS.uploads += 1  # (on the torch path, its launchers' own tables count too)
        COUNTS.inside += 1  # (its own packing is no device op)
        try:
            return fn(*args, **kwargs)
        finally:
            COUNTS.inside -= 1
    return counted


# Per kernel, the distinct compiled variants a GPU process would need for the launches so far (Triton compiles
# one per specialization key: argument types, 16-byte alignment of pointers and int values, int width, constexprs
# and options). Not reset per chunk: a process keeps its compiled variants.
VARIANTS: dict[str, set] = {}


def _sm90_binder(kernel):
    """Triton's own argument binder of ``kernel`` (an interpreted triton.jit function) as a CUDA sm_90 process
    would build it: it returns the launch's specialization, from which Triton's cache key is made."""
    jit = JITFunction(kernel.fn, **{k: v for k, v in kernel.kwargs.items()
                                    if k in ("do_not_specialize", "do_not_specialize_on_alignment")})
    return create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))


class _StubKernel:
    """A Triton kernel replaced by a stub: ``kernel[grid](...)`` counts a launch and the compiled variant it would
    need, and computes nothing."""

    def __init__(self, name, kernel):
        self.name = name
        self.binder = _sm90_binder(kernel)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            COUNTS.kernels[self.name] += 1
            _bound, specialization, options = self.binder(*args, **kwargs)
            VARIANTS.setdefault(self.name, set()).add(str(specialization) + str(options))
        return launch


def install_counters() -> None:
    """Launchers and upload_many of every module of models/alignment, wrapped in counters (the modules' globals,
    where their callers look them up)."""
    modules = [m for m in vars(alignment).values() if getattr(m, "__name__", "").startswith("models.alignment.")]
    modules += [device_module, detector_module]
    for stage, names in LAUNCHERS.items():
        for m in modules:
            for name in names:
                if hasattr(m, name):
                    setattr(m, name, _wrap_launcher(stage, getattr(m, name)))
    if ARGS.stub_kernels:
        for m in modules:
            for name in KERNELS:
                if hasattr(m, name):
                    setattr(m, name, _StubKernel(name, getattr(m, name)))
    original = device_module.upload_many
    wrapped = _wrap_upload(original)
    for m in modules:
        if getattr(m, "upload_many", None) is original:
            setattr(m, "upload_many", wrapped)


class CountingDetector(detector_module.FrontalFaceDetector):
    """The detector, counting its batches, levels and scored pixels (old and new level hooks alike)."""

    def _detect_batch(self, *args, **kwargs):
        COUNTS.batches += 1
        return super()._detect_batch(*args, **kwargs)

    def _score_level(self, batch, sizes):  # (code before the batch plan: a hook per scored level)
        COUNTS.levels += 1
        COUNTS.scored_mp += sum(h * w for h, w in sizes) / 1e6
        return super()._score_level(batch, sizes)

    def _windows(self, plan, *rest):  # (with the batch plan: its scored levels)
        if hasattr(plan, "levels"):
            for lp in plan.levels:
                if lp.layout is not None:
                    COUNTS.levels += 1
                    COUNTS.scored_mp += sum(h * w for h, w in lp.scored_sizes) / 1e6
        return super()._windows(plan, *rest)


def count_chunks(detector, photos, chunk: int) -> list[dict]:
    rows = []
    for start in range(0, len(photos), chunk):
        part = photos[start:start + chunk]
        timing = {}
        if ARGS.stub_kernels:
            # Host time of the GPU path, median of 3 calls, and of it the time inside torch operations (on a CPU
            # they run: allocations and fills are memsets here, kernel launches on a GPU).
            times, in_ops = [], []
            for _ in range(3):
                timer = _OpTimer()
                t = time.perf_counter()
                with timer:
                    detector.detect(part)
                times.append(time.perf_counter() - t)
                in_ops.append(timer.seconds)
            timing = {"host ms (kernels stubbed)": round(statistics.median(times) * 1e3, 1),
                      "of it in torch ops": round(statistics.median(in_ops) * 1e3, 1)}
        COUNTS.reset()
        with _OpCounter():
            found = detector.detect(part)
        rows.append({"photos": len(part), "faces": sum(map(len, found)), "batches": COUNTS.batches,
                     "levels scored": COUNTS.levels, "scored MP": round(COUNTS.scored_mp, 1),
                     "launcher calls": sum(COUNTS.launches.values()), **{f"  {k}": v for k, v in COUNTS.launches.items()},
                     **({"Triton kernel launches": sum(COUNTS.kernels.values()),
                         "compiled variants so far": {k: len(v) for k, v in VARIANTS.items()}}
                        if ARGS.stub_kernels else {}),
                     "uploads": COUNTS.uploads, "syncs": sum(COUNTS.syncs.values()),
                     "other torch ops": sum(COUNTS.ops.values()), "views": sum(COUNTS.views.values()),
                     **timing,
                     "sync names": dict(COUNTS.syncs), "op names": dict(COUNTS.ops.most_common(12))})
        row = {k: v for k, v in rows[-1].items() if ARGS.verbose or not k.endswith("names")}
        print(json.dumps(row), flush=True)
    return rows


def count_aligner(photos, max_sides: str) -> None:
    from models.alignment.landmarks import ShapePredictor
    from pipeline.config import AlignConfig
    from pipeline.device_align import DeviceAligner

    detector = CountingDetector(device=ARGS.device, max_batch_pixels=GPU_BATCH_PIXELS)
    predictor = ShapePredictor.from_model(face_like_model(0), ARGS.device, cuda_graphs=False)
    for text in max_sides.split(","):
        max_side = None if text == "null" else int(text)
        aligner = DeviceAligner(AlignConfig(backend="torch", device_detect_max_side=max_side), detector, predictor,
                                GPU_BATCH_PIXELS)
        COUNTS.reset()
        t = time.time()
        with _OpCounter():
            found = aligner.detect(photos)
        print(f"device_detect_max_side {max_side}: {sum(map(len, found))} faces in {len(photos)} photos, "
              f"batches {COUNTS.batches}, levels scored {COUNTS.levels}, scored MP {COUNTS.scored_mp:.1f}, "
              f"launcher calls {dict(COUNTS.launches)}, uploads {COUNTS.uploads}, syncs {sum(COUNTS.syncs.values())} "
              f"({time.time() - t:.0f} s on {ARGS.device})", flush=True)


def main() -> None:
    install_counters()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    photos = [torch.from_numpy(decode_image(p).copy())
              for p, _ in make_photos(ARGS.photos, ARGS.min_side, ARGS.max_side, faceless=0.1)]
    print(f"models from {os.path.abspath(ARGS.repo)}; {len(photos)} photos of {ARGS.min_side}-{ARGS.max_side} px, "
          f"chunks of {ARGS.chunk}, {ARGS.device}", flush=True)
    detector = CountingDetector(device=ARGS.device, max_batch_pixels=GPU_BATCH_PIXELS,
                                use_triton=True if ARGS.stub_kernels else None)
    rows = count_chunks(detector, photos, ARGS.chunk)
    if ARGS.aligner:
        count_aligner(photos, ARGS.aligner)
    if ARGS.out:
        with open(ARGS.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
