"""The GPU face detector on raw photographs: photos/s of FrontalFaceDetector.detect, from host arrays and from
photos already on the device, its device time per call, and where that time goes (torch.profiler).

    python benchmarks/bench_detector.py --photos 64 --variants all        # GPU
    python benchmarks/bench_detector.py --photos 2 --min-side 200 --max-side 260 --device cpu --repeats 1

Photos: bench_pipeline_raw_gpu.make_photos (JPEG-decoded, --min-side..--max-side px, 0-2 faces), as host
arrays (the call includes their upload) and already on the device (their detections must be the same:
exit status 1 otherwise). One warm-up call, then the median of --repeats calls timed with CUDA events (wall
time of the call: host work included); "host ms" is the call's wall time less its waits in synchronising torch
calls (the host's own work, launches included), "syncs" their number; "device ms" sums the kernels' and copies' time of one call
(torch.profiler): what the detector takes from a GPU it shares with inversion. ``--variants``: other tile
sizes and batching settings (VARIANTS), each timed on the device photos in the same run, and each required to
give the default's detections. Then, for the host's part: the allocators' calls into CUDA during one call
(cudaMalloc and cudaFree counts, retries, new pinned host blocks), and one call under cProfile, its functions by
own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from models.alignment import detector as detector_module  # noqa: E402
from models.alignment import fhog, filters  # noqa: E402
from benchmarks.bench_pipeline_raw_gpu import allocator_calls, allocator_state, make_photos  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402


# Settings of the detector's modules (models/alignment/) tried against their defaults in the same run (photos
# on the device): the filter kernel's tiles (rows x columns per program, warps), histogram cells per program,
# the padding allowed in a batch. (Names without commas: --variants is comma-separated.)
VARIANTS = {
    "filters 8x32 1 warp": {(filters, "_FILTER_ROWS"): 8, (filters, "_FILTER_BLOCK"): 32,
                            (filters, "_FILTER_WARPS"): 1},
    "filters 16x32 1 warp": {(filters, "_FILTER_BLOCK"): 32, (filters, "_FILTER_WARPS"): 1},
    "filters 32x64": {(filters, "_FILTER_ROWS"): 32},
    "filters 8x64": {(filters, "_FILTER_ROWS"): 8},
    "filters 16x128": {(filters, "_FILTER_BLOCK"): 128},
    "filters 16x128 4 warps": {(filters, "_FILTER_BLOCK"): 128, (filters, "_FILTER_WARPS"): 4},
    "filters 128 registers": {(filters, "_FILTER_MAX_REGISTERS"): 128},
    "filters 96 registers": {(filters, "_FILTER_MAX_REGISTERS"): 96},
    "filters 4x64": {(filters, "_FILTER_ROWS"): 4},
    "hist 64 cells": {(fhog, "_CELL_BLOCK"): 64},
    "hist 256 cells": {(fhog, "_CELL_BLOCK"): 256},
    "padding 2": {(detector_module, "_MAX_PADDING"): 2.0},
    "padding 4": {(detector_module, "_MAX_PADDING"): 4.0},
}


# Torch calls that make the host wait for the device (transfers to the host, nonzero's size, item, bool).
SYNCS = {"cpu", "item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "equal", "synchronize"}


class HostTime(TorchFunctionMode):
    """Host time of a call: its wall time less the time spent waiting in synchronising torch calls (each torch
    call also costs this mode a microsecond or two, included)."""

    def __init__(self):
        super().__init__()
        self.waited = 0.0
        self.syncs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") not in SYNCS:
            return func(*args, **(kwargs or {}))
        self.syncs += 1
        t = time.perf_counter()
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.waited += time.perf_counter() - t


def host_ms(fn, repeats: int, sync) -> tuple[float, int]:
    """Median host ms of ``fn`` (wall time less its waits for the device) and its number of synchronisations."""
    times, syncs = [], 0
    for _ in range(repeats):
        sync()
        mode = HostTime()
        t = time.perf_counter()
        with mode:
            fn()
        times.append(time.perf_counter() - t - mode.waited)
        syncs = mode.syncs
    return statistics.median(times) * 1e3, syncs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--min-side", type=int, default=1024)
    ap.add_argument("--max-side", type=int, default=1800)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default="", help=f"comma-separated, of: {', '.join(VARIANTS)} (or 'all')")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.variants == "all":
        a.variants = ",".join(VARIANTS)
    dev = torch.device(a.device)
    on_gpu = dev.type == "cuda"
    photos = [decode_image(p) for p, _ in make_photos(a.photos, a.min_side, a.max_side, 0.1)]
    resident = [torch.from_numpy(p).to(dev) for p in photos]
    megapixels = sum(p.shape[0] * p.shape[1] for p in photos) / 1e6
    t = time.perf_counter()
    detector = detector_module.FrontalFaceDetector(dev)
    print(f"detector built in {time.perf_counter() - t:.1f}s; triton: resize {detector.triton_resize}, "
          f"fhog {detector.triton_fhog}, filters {detector.triton_filters}", flush=True)

    def device_ms(fn) -> float:
        """Kernels' and copies' time of one call (torch.profiler), ms; nan on a CPU."""
        if not on_gpu:
            return float("nan")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
            fn()
            torch.cuda.synchronize()
        return sum(e.self_device_time_total for e in p.key_averages()) / 1e3

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(a.repeats):
            if on_gpu:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    want = detector.detect(photos)
    got = detector.detect(resident)
    rows = []
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    per_64 = 64 / len(photos)
    for source, images in (("host arrays", photos), ("on the device", resident)):
        s = timed(lambda: detector.detect(images))
        host, syncs = host_ms(lambda: detector.detect(images), a.repeats, sync)
        rows.append({"variant": "default", "photos from": source, "ms": round(s * 1e3, 1),
                     "photos/s": round(len(photos) / s, 1), "MP/s": round(megapixels / s, 1),
                     "device ms": round(device_ms(lambda: detector.detect(images)), 1),
                     "host ms": round(host, 1), "syncs": syncs})
        rows[-1]["device ms per 64"] = round(rows[-1]["device ms"] * per_64, 1)
        rows[-1]["host ms per 64"] = round(host * per_64, 1)
        print(rows[-1], flush=True)
    # Where the host time of a call goes: the allocators' calls into CUDA during one call (each cudaMalloc, cudaFree
    # or new pinned block costs the host, and a retry frees the cache after synchronising), and the call
    # under cProfile, its functions by own time.
    allocator = {}
    if on_gpu:
        for source, images in (("host arrays", photos), ("on the device", resident)):
            before = allocator_state()
            detector.detect(images)
            allocator[source] = allocator_calls(before)
            print(f"allocators' calls into CUDA per call (photos from {source}): {allocator[source]}", flush=True)
    host_profile = cProfile.Profile()
    host_profile.enable()
    detector.detect(resident)
    sync()
    host_profile.disable()
    by_own_time = io.StringIO()
    pstats.Stats(host_profile, stream=by_own_time).sort_stats("tottime").print_stats(30)
    print(by_own_time.getvalue())
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    with torch.profiler.profile(activities=activities) as prof:
        detector.detect(resident)
        if on_gpu:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total" if on_gpu else "cpu_time_total", row_limit=20,
                                      max_name_column_width=50)
    print(table)
    differ = []
    for name in (a.variants.split(",") if a.variants else []):
        settings = VARIANTS[name]
        saved = {(module, k): getattr(module, k) for module, k in settings}
        for (module, k), v in settings.items():
            setattr(module, k, v)
        try:
            if detector.detect(resident) != want:
                differ.append(name)
            s = timed(lambda: detector.detect(resident))
            host, syncs = host_ms(lambda: detector.detect(resident), a.repeats, sync)
            rows.append({"variant": name, "photos from": "on the device", "ms": round(s * 1e3, 1),
                         "photos/s": round(len(photos) / s, 1), "MP/s": round(megapixels / s, 1),
                         "device ms": round(device_ms(lambda: detector.detect(resident)), 1),
                         "host ms": round(host, 1), "syncs": syncs})
            rows[-1]["device ms per 64"] = round(rows[-1]["device ms"] * per_64, 1)
            rows[-1]["host ms per 64"] = round(host * per_64, 1)
            print(rows[-1], flush=True)
        finally:
            for (module, k), v in saved.items():
                setattr(module, k, v)

    print(f"\n{a.photos} photos, {a.min_side}-{a.max_side} px ({megapixels:.1f} MP), {dev}, "
          f"{sum(len(d) for d in want)} detections")
    print("| variant | photos from | ms per call | photos/s | MP/s | device ms per call | device ms per 64 photos | "
          "host ms per call | host ms per 64 photos | syncs |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['photos from']} | {r['ms']} | {r['photos/s']} | {r['MP/s']} | {r['device ms']} | "
              f"{r['device ms per 64']} | {r['host ms']} | {r['host ms per 64']} | {r['syncs']} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rows": rows, "allocator_per_call": allocator, "host_profile": by_own_time.getvalue(),
                       "profile": table}, f, indent=1)
    if got != want or differ:
        print(f"FAILED: other detections than host arrays with the default: "
              f"{(['photos on the device'] if got != want else []) + differ}")
    return 0 if got == want and not differ else 1


if __name__ == "__main__":
    raise SystemExit(main())
