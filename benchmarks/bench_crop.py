"""FFHQ crop throughput: models.alignment.ffhq_crop.crop_faces on a device vs pipeline.align.ffhq_crop (Pillow, one core).

    .venv/bin/python benchmarks/bench_crop.py --device cuda                      # batches of 64 photos, 1024-1800 px
    .venv/bin/python benchmarks/bench_crop.py --device cpu --batch 4 --min-side 384 --max-side 512 --iters 2   # smoke

Photos: the two test photographs, turned by up to 25 degrees and scaled so that the FFHQ quad is
``--quad-min``..``--quad-max`` px, pasted on canvases of ``--min-side``..``--max-side`` px (a flat grey or a
tiling of china.jpg), about ``--edge-fraction`` of them across an edge (those crops need the blur padding).
One face per photo. Landmarks: dlib's on the untouched photographs, carried through the same turn, scale and
shift (synthetic, but exact for the photo as built).

Device path: the whole crop_faces call (host uint8 photos through pinned memory, geometry on the host,
padding, the QUAD transform, the Lanczos resize), timed with CUDA events after ``--warmup`` untimed calls;
the median of ``--iters``, with the calling thread's host CPU time per call. "resident" rows start from photos
already on the device as the actor holds them (views of one buffer). The CPU row is
Pillow's ffhq_crop on one thread, per face, over ``--cpu-faces`` faces (median seconds per face).
Agreement: max grey-level difference and PSNR of the device crops against the CPU crops of those faces.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from models.alignment.device import photos_to_device  # noqa: E402
from models.alignment.ffhq_crop import crop_faces  # noqa: E402
from models.alignment.flat_views import views_of  # noqa: E402
from models.alignment.ffhq_geometry import ffhq_quad, ffhq_quads, plan_crop  # noqa: E402
from pipeline.align import get_aligner  # noqa: E402
from pipeline.crop import ffhq_crop, ffhq_quad  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "tests", "data")


LANDMARKS_FILE = os.path.join(os.path.dirname(__file__), "data", "photo_landmarks.json")


def source_faces():
    """(photo as PIL image, its dlib landmarks) for the two test photographs. Where dlib is missing (the GPU
    machine), the landmarks come from LANDMARKS_FILE, written here by ``--save-landmarks``."""
    try:
        aligner = get_aligner()
    except ImportError:
        aligner = None
    saved = json.load(open(LANDMARKS_FILE)) if aligner is None else {}
    out = []
    for name in ("astronaut.jpg", "grace_hopper.jpg"):
        photo = Image.open(os.path.join(DATA, name)).convert("RGB")
        if aligner is None:
            out.append((photo, np.asarray(saved[name], dtype=np.float64)))
            continue
        array = np.asarray(photo)
        box = max(aligner.detect(array), key=lambda d: d[1])[0]
        out.append((photo, aligner.landmarks(array, box)))
    return out


def build_photos(n: int, args, seed: int = 0):
    """``n`` photos with one face each and its landmarks (see module docs)."""
    rng = np.random.default_rng(seed)
    sources = source_faces()
    texture = Image.open(os.path.join(DATA, "china.jpg")).convert("RGB")
    photos, landmarks = [], []
    for i in range(n):
        photo, lm = sources[i % 2]
        _, qsize = ffhq_quad(lm)
        angle = float(rng.uniform(-25, 25))
        scale = float(rng.uniform(args.quad_min, args.quad_max)) / qsize
        w, h = photo.size
        # Turn about the photo centre (Pillow: counter-clockwise in the image for positive angles), then scale.
        turned = photo.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128))
        t = math.radians(angle)
        c, s = math.cos(t), math.sin(t)
        ox, oy = w / 2.0, h / 2.0
        d = lm + 0.5 - (ox, oy)
        lm_t = np.column_stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]]) + (ox, oy)
        size = (max(round(w * scale), 1), max(round(h * scale), 1))
        scaled = turned.resize(size, Image.Resampling.BILINEAR)
        lm_s = lm_t * (size[0] / w, size[1] / h) - 0.5
        W, H = (int(v) for v in rng.integers(args.min_side, args.max_side + 1, 2))
        canvas = Image.new("RGB", (W, H), (118, 118, 118)) if i % 2 else _tiled(texture, W, H)
        centre = lm_s.mean(axis=0)
        if rng.random() < args.edge_fraction:
            # Face centre within a fifth of its quad size of a random edge (partly outside at times).
            target = [rng.uniform(0, W), rng.uniform(0, H)]
            axis = int(rng.integers(2))
            limit = (W, H)[axis]
            target[axis] = float(rng.choice([0.0, limit])) + rng.uniform(-0.2, 0.2) * args.quad_min
        else:
            target = [rng.uniform(0.35, 0.65) * W, rng.uniform(0.35, 0.65) * H]
        dx, dy = round(target[0] - centre[0]), round(target[1] - centre[1])
        canvas.paste(scaled, (dx, dy))
        photos.append(np.asarray(canvas))
        landmarks.append(lm_s + (dx, dy))
    return photos, np.stack(landmarks)


def _tiled(texture: Image.Image, W: int, H: int) -> Image.Image:
    canvas = Image.new("RGB", (W, H))
    for y in range(0, H, texture.height):
        for x in range(0, W, texture.width):
            canvas.paste(texture, (x, y))
    return canvas


def time_device(photos, landmarks, args, device, faces_per_chunk: int, resident: bool):
    """Median seconds per crop_faces call (device time on CUDA), median host CPU seconds of the calling thread per
    call (the call returns before its kernels end: no read back inside), and peak device memory (GiB)."""
    if resident:  # as the actor holds a chunk: views of one buffer on the device
        flat, starts, sizes = photos_to_device(photos, device)
        photos = views_of(flat, starts, sizes)
    index = list(range(len(photos)))

    def run():
        return crop_faces(photos, index, landmarks, args.output_size, args.transform_size, device=device,
                          faces_per_chunk=faces_per_chunk)

    for _ in range(args.warmup):
        run()
    times, host = [], []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            c0 = time.thread_time()
            out = run()
            host.append(time.thread_time() - c0)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0, c0 = time.perf_counter(), time.thread_time()
            out = run()
            times.append(time.perf_counter() - t0)
            host.append(time.thread_time() - c0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), statistics.median(host), peak, out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--min-side", type=int, default=1024)
    p.add_argument("--max-side", type=int, default=1800)
    p.add_argument("--quad-min", type=float, default=250.0, help="smallest FFHQ quad side (px)")
    p.add_argument("--quad-max", type=float, default=1300.0, help="largest (>= 4 * output size: Lanczos shrink)")
    p.add_argument("--edge-fraction", type=float, default=0.3)
    p.add_argument("--output-size", type=int, default=256)
    p.add_argument("--transform-size", type=int, default=1024)
    p.add_argument("--faces-per-chunk", default="8,16,32")
    p.add_argument("--out", default="", help="write the table as JSON here")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--save-landmarks", action="store_true", help=f"write dlib's landmarks to {LANDMARKS_FILE} and exit")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cpu-faces", type=int, default=16, help="faces timed (and compared) on the CPU path")
    args = p.parse_args()
    if args.save_landmarks:
        os.makedirs(os.path.dirname(LANDMARKS_FILE), exist_ok=True)
        with open(LANDMARKS_FILE, "w") as f:
            json.dump({n: lm.tolist() for n, (_, lm) in zip(("astronaut.jpg", "grace_hopper.jpg"), source_faces())}, f)
        return
    device = torch.device(args.device)
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    photos, landmarks = build_photos(args.batch, args)
    quads, sides = ffhq_quads(landmarks)
    plans = [plan_crop(quads[i], sides[i], (ph.shape[1], ph.shape[0]), args.output_size, args.transform_size)
             for i, ph in enumerate(photos)]
    padded = sum(pl.padded for pl in plans)
    shrunk = sum(pl.shrink > 1 for pl in plans)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{len(photos)} photos {args.min_side}-{args.max_side} px, quads {args.quad_min:.0f}-{args.quad_max:.0f} px: "
          f"{padded} padded, {shrunk} shrunk; output {args.output_size}, transform {args.transform_size}; "
          f"device {name}")

    rows, last = [], None
    for chunk in [int(c) for c in args.faces_per_chunk.split(",")]:
        for resident in (False, True):
            sec, host, peak, last = time_device(photos, landmarks, args, device, chunk, resident)
            path = f"{device.type} {'resident' if resident else 'from host'}"
            rows.append((path, chunk, sec * 1e3, host * 1e3, len(photos) / sec, peak))

    # CPU reference path: Pillow on one thread, one face at a time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's padding blur uses torch FFTs
    k = min(args.cpu_faces, len(photos))
    cpu_times, worst_diff, psnrs = [], 0, []
    for i in range(k):
        t0 = time.perf_counter()
        ref = ffhq_crop(photos[i], landmarks[i], args.output_size, args.transform_size)
        cpu_times.append(time.perf_counter() - t0)
        diff = last[i].cpu().numpy().astype(np.int32) - ref.astype(np.int32)
        mse = float(np.mean(diff.astype(np.float64) ** 2))
        worst_diff = max(worst_diff, int(np.abs(diff).max()))
        psnrs.append(math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse))
    torch.set_num_threads(threads)
    per_face = statistics.median(cpu_times)
    rows.append(("cpu Pillow, 1 thread", 1, per_face * len(photos) * 1e3, per_face * len(photos) * 1e3, 1 / per_face,
                 float("nan")))

    print(f"\n{'path':22s} {'chunk':>5s} {'ms/batch':>10s} {'host ms':>8s} {'crops/s':>9s} {'peak GiB':>9s}")
    for path, chunk, ms, host_ms, rate, peak in rows:
        print(f"{path:22s} {chunk:5d} {ms:10.1f} {host_ms:8.1f} {rate:9.1f} {peak:9.2f}")
    finite = [v for v in psnrs if math.isfinite(v)]
    print(f"\nagreement on {k} faces: max grey diff {worst_diff}, PSNR min "
          f"{min(psnrs):.1f} dB, {k - len(finite)} identical"
          + (f", mean over inexact {statistics.mean(finite):.1f} dB" if finite else ""))
    print("(CPU ms/batch: per-face median x batch size; host ms: the calling thread's CPU time per call)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "photos": len(photos), "padded": int(padded), "shrunk": int(shrunk),
                       "rows": [dict(zip(("path", "faces_per_chunk", "ms_per_batch", "host_ms", "crops_s", "peak_gib"),
                                         r)) for r in rows],
                       "agreement": {"faces": k, "max_grey_diff": worst_diff, "min_psnr_db": min(psnrs)}}, f, indent=1)


if __name__ == "__main__":
    main()
