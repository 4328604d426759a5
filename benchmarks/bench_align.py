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

from pipeline.align import FaceAligner, ffhq_crop, ffhq_quad  # noqa: E402

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


def _pick(dets):
    # FaceAligner.align's "largest" rule.
    return max(dets, key=lambda d: ((d[0][2] - d[0][0]) * (d[0][3] - d[0][1]), d[1], -d[0][0], -d[0][1]))[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--output-size", type=int, default=256)
    ap.add_argument("--transform-sizes", default="1024,256")
    ap.add_argument("--detect-max-side", type=int, default=384)
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()}")
    imgs = photos(args.n)
    fast = FaceAligner(detect_max_side=args.detect_max_side)
    full = FaceAligner(detect_max_side=None)
    fast.align(imgs[0], args.output_size, 256)  # warm-up

    # Drift: landmarks from boxes found on the downscaled copy vs on the full-resolution photo.
    drifts, t_fast, t_full, t_lm, missed, same_box = [], [], [], [], 0, 0
    for im in imgs:
        t = time.perf_counter(); df = fast.detect(im); t_fast.append(time.perf_counter() - t)
        t = time.perf_counter(); dg = full.detect(im); t_full.append(time.perf_counter() - t)
        if not df or not dg:
            missed += 1
            continue
        bf, bg = _pick(df), _pick(dg)
        same_box += bf == bg
        t = time.perf_counter(); lf = fast.landmarks(im, bf); t_lm.append(time.perf_counter() - t)
        drifts.append(np.linalg.norm(lf - full.landmarks(im, bg), axis=1).mean())
    print(f"photos: {len(imgs)} at 1024 px, faces missed by either detector: {missed}")
    print(f"detect (pyramid level <= {args.detect_max_side} px): {1e3 * np.mean(t_fast):.1f} ms/img; full-res: {1e3 * np.mean(t_full):.1f} ms/img")
    print(f"68-point landmarks: {1e3 * np.mean(t_lm):.1f} ms/face")
    d = np.array(drifts)
    print(f"landmark drift vs full-res detection (px, mean over 68 points): mean {d.mean():.2f}, median {np.median(d):.2f}, "
          f"max {d.max():.2f}; same box chosen on {same_box}/{len(d)} photos, drift 0 on {(d == 0).sum()}")

    # Crop sub-steps (the same quads as the pipeline), at each transform size.
    for ts in [int(x) for x in args.transform_sizes.split(",")]:
        t_crop, t_quad, t_lz, n_pad = [], [], [], 0
        for im in imgs:
            dets = fast.detect(im)
            if not dets:
                continue
            lm = fast.landmarks(im, _pick(dets))
            quad, qsize = ffhq_quad(lm)
            t = time.perf_counter(); ffhq_crop(im, lm, args.output_size, ts, quad=quad.copy(), qsize=qsize); t_crop.append(time.perf_counter() - t)
            # The two PIL steps alone, on the unpadded photo (same output sizes).
            pil = Image.fromarray(im)
            t = time.perf_counter()
            big = pil.transform((ts, ts), Image.Transform.QUAD, tuple((quad + 0.5).flatten()), Image.Resampling.BILINEAR)
            t_quad.append(time.perf_counter() - t)
            if args.output_size < ts:
                t = time.perf_counter(); big.resize((args.output_size,) * 2, Image.Resampling.LANCZOS); t_lz.append(time.perf_counter() - t)
            border = max(int(np.rint(qsize * 0.1)), 3)
            n_pad += bool(quad[:, 0].min() < border + 4 or quad[:, 1].min() < border + 4
                          or quad[:, 0].max() > im.shape[1] - border - 4 or quad[:, 1].max() > im.shape[0] - border - 4)
        lz = f"{1e3 * np.mean(t_lz):.1f}" if t_lz else "0"
        print(f"crop output {args.output_size}, transform {ts}: {1e3 * np.mean(t_crop):.1f} ms/face (PIL QUAD bilinear {1e3 * np.mean(t_quad):.1f}, "
              f"Lanczos {lz}; about {n_pad}/{len(t_crop)} crops need blur-padding)")

    for ts in [int(x) for x in args.transform_sizes.split(",")]:
        for name, al in (("downscaled detect", fast), ("full-res detect", full)):
            nfaces = 0
            t = time.perf_counter()
            for im in imgs:
                nfaces += len(al.align(im, args.output_size, ts))
            dt = time.perf_counter() - t
            print(f"align_faces output {args.output_size}, transform {ts}, {name}: {len(imgs) / dt:.1f} images/s per core "
                  f"({1e3 * dt / len(imgs):.1f} ms/img, {nfaces} faces)")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
