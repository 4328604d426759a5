"""Face-alignment throughput on one core and landmark drift of downscaled detection (not a test).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_align.py [--n 40] [--transform-sizes 1024,256]

Photos: the test photos (astronaut, Grace Hopper) upscaled to 1024 px on the long side, plus shifted,
rotated and scaled copies, all 1024 px; one process, one thread ("per core").
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.align import FaceAligner  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "tests", "data")


def photos(n):
    out = []
    srcs = [Image.open(os.path.join(DATA, f)).convert("RGB") for f in ("astronaut.jpg", "grace_hopper.jpg")]
    rng = np.random.default_rng(0)
    for i in range(n):
        im = srcs[i % 2]
        ang = float(rng.uniform(-15, 15))
        s = float(rng.uniform(0.8, 1.2))
        im = im.rotate(ang, resample=Image.Resampling.BICUBIC, fillcolor=(110, 110, 110))
        w, h = im.size
        k = 1024 / max(w, h) * s
        im = im.resize((round(w * k), round(h * k)), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (1024, 1024) if i % 3 else (1024, 768), (110, 110, 110))
        dx = int(rng.integers(-60, 61)) + (canvas.size[0] - im.size[0]) // 2
        dy = int(rng.integers(-60, 61)) + (canvas.size[1] - im.size[1]) // 2
        canvas.paste(im, (dx, dy))
        out.append(np.asarray(canvas))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--output-size", type=int, default=256)
    ap.add_argument("--transform-sizes", default="1024,256")
    ap.add_argument("--detect-max-side", type=int, default=384)
    args = ap.parse_args()
    imgs = photos(args.n)
    fast = FaceAligner(detect_max_side=args.detect_max_side)
    full = FaceAligner(detect_max_side=None)
    fast.align(imgs[0], args.output_size, 256)  # warm-up

    # Drift: landmarks from boxes found on the downscaled copy vs on the full-resolution photo.
    drifts, t_fast, t_full, missed = [], [], [], 0
    for im in imgs:
        t = time.perf_counter(); df = fast.detect(im); t_fast.append(time.perf_counter() - t)
        t = time.perf_counter(); dg = full.detect(im); t_full.append(time.perf_counter() - t)
        if not df or not dg:
            missed += 1
            continue
        bf = max(df, key=lambda d: (d[0][2] - d[0][0]) * (d[0][3] - d[0][1]))[0]
        bg = max(dg, key=lambda d: (d[0][2] - d[0][0]) * (d[0][3] - d[0][1]))[0]
        drifts.append(np.linalg.norm(fast.landmarks(im, bf) - full.landmarks(im, bg), axis=1).mean())
    print(f"photos: {len(imgs)} at 1024 px, faces missed by either detector: {missed}")
    print(f"detect (downscaled to {args.detect_max_side}): {1e3 * np.mean(t_fast):.1f} ms/img; full-res: {1e3 * np.mean(t_full):.1f} ms/img")
    d = np.array(drifts)
    print(f"landmark drift vs full-res detection (px, mean over 68 points): mean {d.mean():.2f}, median {np.median(d):.2f}, max {d.max():.2f}")

    for ts in [int(x) for x in args.transform_sizes.split(",")]:
        for name, al in (("downscaled detect", fast), ("full-res detect", full)):
            nfaces = 0
            t = time.perf_counter()
            for im in imgs:
                nfaces += len(al.align(im, args.output_size, ts))
            dt = time.perf_counter() - t
            print(f"align_faces output {args.output_size}, transform {ts}, {name}: {len(imgs) / dt:.1f} images/s per core "
                  f"({1e3 * dt / len(imgs):.1f} ms/img, {nfaces} faces)")


if __name__ == "__main__":
    main()
