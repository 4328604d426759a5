"""Where device alignment spends its time: DeviceAligner.align's parts on raw photos, and the detector's, the
predictor's and the crop's kernels and host time (torch.profiler, cProfile). A profile, not a benchmark: the
figures that go in BENCHMARKS.md come from bench_pipeline_raw_gpu.py and bench_face_models.py.

    python benchmarks/profile_align.py --photos 64                 # GPU
    python benchmarks/profile_align.py --photos 4 --min-side 300 --max-side 400 --device cpu   # smoke

Photos: bench_pipeline_raw_gpu.make_photos (1024-1800 px, 0-2 faces). Landmarks: random trees of the 68-point
model's shape, face-like (bench_pipeline_raw_gpu.face_like_model: a face in each box, eyes level) or, with
``--rolled``, with random mean points (every face looks rolled: the upright re-prediction's worst case).
Prints, per part, the median seconds of --repeats calls (each ended by a synchronisation), then the profiler
tables, and writes them to --out when given.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench_pipeline_raw_gpu import face_like_model, make_photos, mean_face_shape  # noqa: E402
from models.alignment.ffhq_crop import crop_faces, upright_landmarks_batch  # noqa: E402
from models.alignment.ffhq_geometry import UPRIGHT_ABOVE  # noqa: E402
from models.alignment.landmarks import ShapePredictor  # noqa: E402
from models.alignment.landmarks_model import random_model  # noqa: E402
from pipeline.face_search import choose_faces  # noqa: E402
from pipeline.config import AlignConfig  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402
from pipeline.device_align import DeviceAligner  # noqa: E402


def timed(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_new_photos(aligner: DeviceAligner, chunks: list, sync, say) -> None:
    """align() on chunks of photos it has not met, then on the same chunks again: ms per chunk by part, and
    the host's time by function (cProfile) on the new photos."""
    for name in ("new photos", "the same photos again"):
        before = dict(aligner.part_seconds)
        pr = cProfile.Profile()
        sync()
        t = time.perf_counter()
        pr.enable()
        for chunk in chunks:
            aligner.align(chunk)
        sync()
        pr.disable()
        ms = {k: round(1e3 * (v - before[k]) / len(chunks), 1) for k, v in aligner.part_seconds.items()}
        say(f"align() on {name}: {1e3 * (time.perf_counter() - t) / len(chunks):.1f} ms per chunk; by part {ms}")
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats(key).print_stats(40)
            say(f"\n== align() on {name}: cProfile ({key})\n{s.getvalue()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--min-side", type=int, default=1024)
    ap.add_argument("--max-side", type=int, default=1800)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rolled", action="store_true", help="random mean points: every face re-predicted upright")
    ap.add_argument("--new-chunks", type=int, default=0,
                    help="first profile align() on this many chunks of --photos photos it has not met (as in the "
                         "pipeline, where each photo is new), against the same chunks again")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    decoded = [decode_image(p) for p, _ in make_photos(a.photos * (1 + a.new_chunks), a.min_side, a.max_side, 0.1)]
    photos, new_chunks = decoded[:a.photos], [decoded[i:i + a.photos] for i in range(a.photos, len(decoded), a.photos)]
    t = time.perf_counter()
    model = random_model(seed=0) if a.rolled else face_like_model(seed=0)
    aligner = DeviceAligner.build(AlignConfig(backend="torch"), str(dev),
                                  predictor=ShapePredictor.from_model(model, str(dev), cuda_graphs=False))
    print(f"aligner built in {time.perf_counter() - t:.1f}s", flush=True)
    aligner.align(photos)  # warm-up: Triton compiles
    report = []

    def say(line: str) -> None:
        print(line, flush=True)
        report.append(line)

    if new_chunks:
        profile_new_photos(aligner, new_chunks, sync, say)

    rows = {}
    rows["align (whole)"] = timed(lambda: aligner.align(photos), a.repeats, sync)
    rows["detect (DeviceAligner.detect)"] = timed(lambda: aligner.detect(photos), a.repeats, sync)
    on_device = [torch.from_numpy(p).to(dev) for p in photos]
    rows["detect (photos on device, as align does)"] = timed(lambda: aligner.detect(on_device), a.repeats, sync)
    rows["detector.detect upsample 0"] = timed(lambda: aligner.detector.detect(photos), a.repeats, sync)
    chosen = [choose_faces(d, "largest") for d in aligner.detect(photos)]
    index = [i for i, f in enumerate(chosen) for _ in f]
    rects = [[(int(b[0]), int(b[1]), int(b[2]) - 1, int(b[3]) - 1) for b, _ in f] for f in chosen]
    rows["landmarks (predict, photos on device)"] = timed(lambda: aligner.predictor.predict(on_device, rects),
                                                          a.repeats, sync)
    boxes = [b for f in chosen for b, _ in f]
    first = [p for per_photo in aligner.predictor.predict(on_device, rects) for p in per_photo]
    face_photos = [on_device[i] for i in index]
    calls = []

    def predict_boxes(images, face_boxes):
        calls.append(len(images))
        return aligner.predict_boxes(images, face_boxes)

    lm = np.stack(upright_landmarks_batch(face_photos, boxes, predict_boxes, UPRIGHT_ABOVE, first=first))
    rounds = f"{len(calls)} calls of {calls} faces"
    if a.rolled:
        # Random mean points make meaningless quads: the crop gets the mean face in each box instead.
        corners = np.array([r for f in rects for r in f], np.float64)
        lm = corners[:, None, :2] + mean_face_shape()[None] * (corners[:, None, 2:] - corners[:, None, :2])
    rows[f"upright re-prediction ({rounds})"] = timed(
        lambda: upright_landmarks_batch(face_photos, boxes, aligner.predict_boxes, UPRIGHT_ABOVE, first=first),
        a.repeats, sync)
    rows[f"crop ({len(index)} faces, photos from host)"] = timed(
        lambda: crop_faces(photos, index, lm, 256, 1024, device=dev), a.repeats, sync)
    rows[f"crop ({len(index)} faces, photos on device)"] = timed(
        lambda: crop_faces(on_device, index, lm, 256, 1024, device=dev), a.repeats, sync)
    say(f"{a.photos} photos {a.min_side}-{a.max_side} px on {dev}, {len(index)} faces")
    for name, s in rows.items():
        say(f"  {name:45s} {s * 1e3:9.1f} ms  {a.photos / s:8.1f} photos/s")

    for name, fn in (("detector.detect", lambda: aligner.detector.detect(photos)),
                     ("predictor.predict", lambda: aligner.predictor.predict(on_device, rects)),
                     ("crop_faces", lambda: crop_faces(on_device, index, lm, 256, 1024, device=dev))):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            sync()
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        say(f"\n== {name}: torch.profiler by {key}")
        say(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
        say(f"\n== {name}: torch.profiler by self_cpu_time_total")
        say(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
        pr = cProfile.Profile()
        pr.enable()
        fn()
        sync()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
        say(f"\n== {name}: cProfile (cumulative)\n{s.getvalue()}")
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(report))


if __name__ == "__main__":
    main()
