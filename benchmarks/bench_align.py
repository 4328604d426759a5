"""Face-alignment throughput on one core and landmark drift of downscaled detection (not a test).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_align.py [--n 40] [--transform-sizes 1024,512]

Photos: the test photos (astronaut, Grace Hopper), rotated, scaled and shifted on 1024 px canvases, in two
layouts (see ``photos``); one process, one thread ("per core"). Times are means over the photos.
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
from models.alignment.ffhq_geometry import crop_and_pad, ffhq_quad  # noqa: E402
from pipeline.crop import ffhq_crop  # noqa: E402
from pipeline.face_search import pick_largest  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "tests", "data")


def photos(n, layout="edge"):
    """``n`` 1024 px test photos. layout "edge": the photo (rotated, scaled 0.8-1.2) fills the canvas, so the
    face sits near the top edge and most crops need the FFHQ blur-padding; "centred": the face (box about
    200-300 px) is moved to the middle of the canvas, so the crop fits inside the photo (no padding)."""
    out = []
    srcs = [Image.open(os.path.join(DATA, f)).convert("RGB") for f in ("astronaut.jpg", "grace_hopper.jpg")]
    # Face centres (x, y as fractions of width, height) and box sides (px) in the source photos, from
    # full-resolution detection.
    centres = [(0.435, 0.248), (0.525, 0.408)]
    sides = [88, 216]
    rng = np.random.default_rng(0)
    for i in range(n):
        im = srcs[i % 2]
        ang = float(rng.uniform(-15, 15))
        s = float(rng.uniform(0.8, 1.2))
        im = im.rotate(ang, resample=Image.Resampling.BICUBIC, fillcolor=(110, 110, 110))
        w, h = im.size
        k = 1024 / max(w, h) * s
        if layout == "centred":
            k = float(rng.uniform(180, 300)) / sides[i % 2]  # face box 180-300 px
        im = im.resize((round(w * k), round(h * k)), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (1024, 1024) if i % 3 else (1024, 768), (110, 110, 110))
        jx, jy = int(rng.integers(-60, 61)), int(rng.integers(-60, 61))
        if layout == "centred":
            cx, cy = centres[i % 2]
            dx = canvas.size[0] // 2 - round(cx * im.size[0]) + jx // 3
            dy = canvas.size[1] // 2 - round(cy * im.size[1]) + jy // 3
        else:
            dx = jx + (canvas.size[0] - im.size[0]) // 2
            dy = jy + (canvas.size[1] - im.size[1]) // 2
        canvas.paste(im, (dx, dy))
        out.append(np.asarray(canvas))
    return out


def _pick(dets):
    return pick_largest(dets)[0]


def _needs_padding(im, quad, qsize):
    # ffhq_crop's padding condition for an unshrunk crop (shrink happens only when qsize >= 2 * output_size).
    _, pad, border = crop_and_pad(quad, qsize, (im.shape[1], im.shape[0]))
    return max(pad) > border - 4


def bench_layout(args, layout, fast, full):
    imgs = photos(args.n, layout)
    print(f"\n== {layout}: {len(imgs)} photos at 1024 px ==")
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
    print(f"faces missed by either detector: {missed}")
    print(f"detect (pyramid level <= {args.detect_max_side} px): {1e3 * np.mean(t_fast):.1f} ms/img (median {1e3 * np.median(t_fast):.1f}); "
          f"full-res: {1e3 * np.mean(t_full):.1f} ms/img")
    print(f"68-point landmarks: {1e3 * np.mean(t_lm):.1f} ms/face")
    d = np.array(drifts)
    print(f"landmark drift vs full-res detection (px, mean over 68 points): mean {d.mean():.2f}, median {np.median(d):.2f}, "
          f"max {d.max():.2f}; same box chosen on {same_box}/{len(d)} photos, drift 0 on {(d == 0).sum()}")

    # Crop sub-steps (the same quads as the pipeline), at each transform size, padded and unpadded apart.
    cases = []
    for im in imgs:
        dets = fast.detect(im)
        if dets:
            lm = fast.landmarks(im, _pick(dets))
            quad, qsize = ffhq_quad(lm)
            cases.append((im, lm, quad, qsize, _needs_padding(im, quad, qsize)))
    first_crops = None
    for ts in [int(x) for x in args.transform_sizes.split(",")]:
        t_crop = {False: [], True: []}
        t_quad, t_lz, crops = [], [], []
        for im, lm, quad, qsize, padded in cases:
            t = time.perf_counter()
            crops.append(ffhq_crop(im, lm, args.output_size, ts, quad=quad.copy(), qsize=qsize))
            t_crop[padded].append(time.perf_counter() - t)
            # The two Pillow steps alone, on the unpadded photo (same output sizes).
            pil = Image.fromarray(im)
            t = time.perf_counter()
            big = pil.transform((ts, ts), Image.Transform.QUAD, tuple((quad + 0.5).flatten()), Image.Resampling.BILINEAR)
            t_quad.append(time.perf_counter() - t)
            if args.output_size < ts:
                t = time.perf_counter(); big.resize((args.output_size,) * 2, Image.Resampling.LANCZOS); t_lz.append(time.perf_counter() - t)
        ms = lambda v: f"{1e3 * np.mean(v):.1f}" if v else "-"  # noqa: E731
        print(f"crop output {args.output_size}, transform {ts}: unpadded {ms(t_crop[False])} ms/face ({len(t_crop[False])}), "
              f"padded {ms(t_crop[True])} ms/face ({len(t_crop[True])}); Pillow QUAD bilinear {ms(t_quad)}, Lanczos {ms(t_lz) if t_lz else 0}")
        # The same crops at the first transform size are the reference: PSNR of these against them.
        if first_crops is None:
            first_crops, first_ts = crops, ts
        else:
            d = [np.abs(a.astype(np.float64) - b) for a, b in zip(crops, first_crops)]
            psnr = np.array([10 * np.log10(255.0**2 / max((x**2).mean(), 1e-12)) for x in d])
            print(f"  crops at transform {ts} vs {first_ts}: PSNR mean {psnr.mean():.1f} dB, min {psnr.min():.1f} dB, "
                  f"max abs difference {max(int(x.max()) for x in d)} grey levels")

    for ts in [int(x) for x in args.transform_sizes.split(",")]:
        for name, al in (("downscaled detect", fast), ("full-res detect", full)):
            nfaces = 0
            t = time.perf_counter()
            for im in imgs:
                nfaces += len(al.align(im, args.output_size, ts))
            dt = time.perf_counter() - t
            print(f"align_faces output {args.output_size}, transform {ts}, {name}: {len(imgs) / dt:.1f} images/s per core "
                  f"({1e3 * dt / len(imgs):.1f} ms/img, {nfaces} faces)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--output-size", type=int, default=256)
    ap.add_argument("--transform-sizes", default="1024,512")
    ap.add_argument("--layouts", default="edge,centred")
    ap.add_argument("--detect-max-side", type=int, default=384)
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()}")
    fast = FaceAligner(detect_max_side=args.detect_max_side)
    full = FaceAligner(detect_max_side=None)
    fast.align(photos(1)[0], args.output_size, 256)  # warm-up
    for layout in args.layouts.split(","):
        bench_layout(args, layout, fast, full)
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
