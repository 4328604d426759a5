"""The GPU face detector on raw photographs: photos/s of FrontalFaceDetector.detect per kernel variant, in one
run, and where its device time goes (torch.profiler, the default variant).

    python benchmarks/bench_detector.py --photos 64                       # GPU
    python benchmarks/bench_detector.py --photos 2 --min-side 200 --max-side 260 --device cpu --repeats 1

Photos: bench_pipeline_raw_gpu.make_photos (JPEG-decoded, --min-side..--max-side px, 0-2 faces), as host
arrays (the call includes their upload) and already on the device. Each variant: one warm-up call, then the
median of --repeats calls timed with CUDA events. Variants (Triton only): the cell histograms' kernel (one
lane per (cell, bin) or per cell). Every variant's detections must equal the default's (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import models.face_detector as face_detector  # noqa: E402
from benchmarks.bench_pipeline_raw_gpu import make_photos  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--min-side", type=int, default=1024)
    ap.add_argument("--max-side", type=int, default=1800)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    dev = torch.device(a.device)
    on_gpu = dev.type == "cuda"
    photos = [decode_image(p) for p, _ in make_photos(a.photos, a.min_side, a.max_side, 0.1)]
    resident = [torch.from_numpy(p).to(dev) for p in photos]
    megapixels = sum(p.shape[0] * p.shape[1] for p in photos) / 1e6
    t = time.perf_counter()
    detector = face_detector.FrontalFaceDetector(dev)
    print(f"detector built in {time.perf_counter() - t:.1f}s; triton: resize {detector.triton_resize}, "
          f"fhog {detector.triton_fhog}, filters {detector.triton_filters}", flush=True)

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

    variants = {"default": {}}
    if detector.triton_fhog:
        variants = {"hist: lane per (cell, bin)": {"_HIST_LANES": True},
                    "hist: lane per cell": {"_HIST_LANES": False}}
    want = detector.detect(photos)
    rows, failures = [], 0
    for name, settings in variants.items():
        saved = {k: getattr(face_detector, k) for k in settings}
        for k, v in settings.items():
            setattr(face_detector, k, v)
        got = detector.detect(resident)
        failures += got != want
        for source, images in (("host arrays", photos), ("on the device", resident)):
            s = timed(lambda: detector.detect(images))
            rows.append({"variant": name, "photos from": source, "ms": round(s * 1e3, 1),
                         "photos/s": round(len(photos) / s, 1), "MP/s": round(megapixels / s, 1),
                         "equal": got == want})
            print(rows[-1], flush=True)
        for k, v in saved.items():
            setattr(face_detector, k, v)

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    with torch.profiler.profile(activities=activities) as prof:
        detector.detect(resident)
        if on_gpu:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total" if on_gpu else "cpu_time_total", row_limit=20,
                                      max_name_column_width=50)
    print(table)
    print(f"\n{a.photos} photos, {a.min_side}-{a.max_side} px ({megapixels:.1f} MP), {dev}, "
          f"{sum(len(d) for d in want)} detections")
    print(f"| variant | photos from | ms per call | photos/s | MP/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['photos from']} | {r['ms']} | {r['photos/s']} | {r['MP/s']} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rows": rows, "profile": table}, f, indent=1)
    if failures:
        print(f"FAILED: {failures} variant(s) gave other detections than the default")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
