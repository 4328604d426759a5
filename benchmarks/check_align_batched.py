"""The alignment steps after detection, batched over a chunk's faces, on a device: checked against their per-face
forms there, and timed (device ms by CUDA events, host ms as the calling thread's CPU time) beside them.

    python benchmarks/check_align_batched.py --out align_batched.json      # GPU: 64 photos of 1024-1800 px
    python benchmarks/check_align_batched.py --smoke                        # CPU: checks the script runs

Needs only torch, numpy (and Triton on a GPU). Photos: random textures as views of one device buffer (as the actor
holds a chunk), one face each (synthetic eyes and mouth corners: all the FFHQ geometry reads), a share of them
across an edge (padded crops) and rolled (upright regions). Predictor: random trees of the 68-point model's shape.

Checks (exit status 1 when one fails): the predictor on views of the chunk's buffer equals it on copies; the upright
regions sampled in one pass equal upright_region face by face; blur_pad_faces equals _blur_pad face by face to one
grey level (its FFT lengths are the group's); crop_faces of the chunk equals crop_faces face by face to one grey
level (the same). Timings, each the median of --iters after --warmup: predict (all faces), one upright round,
crop_faces; each batched and face by face.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.alignment.device import photos_to_device  # noqa: E402
from models.alignment.ffhq_crop import crop_faces, upright_region, upright_regions  # noqa: E402
from models.alignment.ffhq_geometry import ffhq_quads, plan_crops, upright_geometry  # noqa: E402
from models.alignment.ffhq_padding import _blur_pad, blur_pad_faces  # noqa: E402
from models.alignment.flat_views import views_of  # noqa: E402
from models.alignment.landmarks import ShapePredictor  # noqa: E402


def face_landmarks(centre, eye_distance: float, roll_degrees: float) -> np.ndarray:
    """68 points whose eyes and mouth corners make a face at ``centre`` (the rest 0: the FFHQ geometry reads
    only those)."""
    t = np.radians(roll_degrees)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    lm = np.zeros((68, 2))
    eye = np.array([[-0.55, -0.05], [-0.5, -0.1], [-0.4, -0.1], [-0.35, -0.05], [-0.4, 0.0], [-0.5, 0.0]])
    lm[36:42], lm[42:48] = eye, eye * [-1, 1]
    lm[48], lm[54] = (-0.4, 0.9), (0.4, 0.9)
    return (lm * eye_distance / 0.9) @ rot.T + centre


def chunk(n: int, sides: tuple[int, int], device, seed: int = 0):
    """n photos (views of one device buffer), a face box and landmarks each, and each face's roll."""
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(*sides)), int(rng.integers(*sides))) for _ in range(n)]
    # Smooth random textures (a coarse grid upsampled), so that blur and resampling see real gradients.
    photos = []
    for w, h in sizes:
        coarse = torch.from_numpy(rng.integers(0, 256, (3, h // 16 + 2, w // 16 + 2)).astype(np.float32))
        photos.append(torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="bilinear")[0]
                      .permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
    flat, starts, sizes = photos_to_device(photos, device)
    views = views_of(flat, starts, sizes)
    boxes, lms, rolls = [], [], []
    for k, (w, h) in enumerate(sizes):
        side = rng.uniform(0.15, 0.4) * min(w, h)
        edge = k % 3 == 0  # a third across an edge: padded crops
        cx = rng.uniform(0.05, 0.2) * w if edge else rng.uniform(0.35, 0.65) * w
        cy = rng.uniform(0.35, 0.65) * h
        roll = rng.uniform(12, 30) * rng.choice([-1, 1]) if k % 4 == 1 else rng.uniform(-5, 5)
        boxes.append((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)))
        lms.append(face_landmarks((cx, cy), side * 0.4, roll))
        rolls.append(roll)
    return flat, views, boxes, np.stack(lms), rolls


def timed(fn, device, warmup: int, iters: int) -> tuple[float, float, object]:
    """Median device ms (CUDA events; wall on a CPU) and host ms (the thread's CPU time until fn returns)."""
    for _ in range(warmup):
        out = fn()
    cuda = device.type == "cuda"
    dev_ms, host_ms = [], []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn()
        host_ms.append(1e3 * (time.thread_time() - c0))
        if cuda:
            end.record()
            torch.cuda.synchronize(device)
            dev_ms.append(start.elapsed_time(end))
        else:
            dev_ms.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(dev_ms), statistics.median(host_ms), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--min-side", type=int, default=1024)
    ap.add_argument("--max-side", type=int, default=1800)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="a few small photos and a small predictor on the CPU")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.smoke:
        a.device, a.photos, a.min_side, a.max_side, a.warmup, a.iters = "cpu", 4, 200, 300, 0, 1
    device = torch.device(a.device)
    flat, views, boxes, lms, rolls = chunk(a.photos, (a.min_side, a.max_side + 1), device)
    predictor = (ShapePredictor.random(cascades=2, trees=20, device=device) if a.smoke
                 else ShapePredictor.random(device=device, cuda_graphs=False))
    rects = [[(x0, y0, x1 - 1, y1 - 1)] for x0, y0, x1, y1 in boxes]
    failures, rows = [], []

    # The predictor: views of the chunk's buffer against copies of each photo, and face by face.
    copies = [v.clone() for v in views]
    batched = predictor.predict(views, rects)
    if not all(np.array_equal(b, c) for b, c in zip(batched, predictor.predict(copies, rects))):
        failures.append("predict: views and copies differ")
    rows.append(("predict, all faces", *timed(lambda: predictor.predict(views, rects), device, a.warmup, a.iters)[:2]))
    rows.append(("predict, face by face", *timed(lambda: [predictor.predict([v], [r]) for v, r in zip(views, rects)],
                                                  device, a.warmup, a.iters)[:2]))

    # One upright round: the rolled faces' regions in one pass, against upright_region face by face.
    rolled = [k for k, r in enumerate(rolls) if abs(r) > 10]
    geometry = [upright_geometry(boxes[k], rolls[k]) for k in rolled]
    regions = upright_regions([views[k] for k in rolled], geometry)
    singles = [upright_region(views[k], boxes[k], rolls[k])[0] for k in rolled]
    if not all(torch.equal(r, s) for r, s in zip(regions, singles)):
        failures.append("upright_regions: differ from upright_region")
    rows.append((f"upright regions, {len(rolled)} faces together",
                 *timed(lambda: upright_regions([views[k] for k in rolled], geometry), device, a.warmup, a.iters)[:2]))
    rows.append(("upright regions, face by face",
                 *timed(lambda: [upright_region(views[k], boxes[k], rolls[k]) for k in rolled], device, a.warmup,
                        a.iters)[:2]))

    # The padding step and the whole crop: batched against face by face.
    index = list(range(len(views)))
    sizes = [(v.shape[1], v.shape[0]) for v in views]
    plans = plan_crops(*ffhq_quads(lms), sizes, 256, 1024)
    padded = [k for k in index if plans.padded[k] and plans.shrink[k] == 1]
    starts = [v.storage_offset() // 3 for v in views]
    crop_w, crop_h = plans.crop[:, 2] - plans.crop[:, 0], plans.crop[:, 3] - plans.crop[:, 1]
    base = [starts[k] + plans.crop[k, 1] * sizes[k][0] + plans.crop[k, 0] for k in padded]
    groups = blur_pad_faces(flat, base, [sizes[k][0] for k in padded], np.stack([crop_w, crop_h], 1)[padded],
                            plans.pad[padded], plans.blur_sigma[padded])
    worst_pad, differ_pad = 0, 0
    for g in groups:
        for b, i in enumerate(g.faces):
            k = padded[i]
            x0, y0, x1, y1 = plans.crop[k]
            want = _blur_pad(views[k][y0:y1, x0:x1], tuple(plans.pad[k]), float(plans.blur_sigma[k]))
            got = g.canvases[b, :want.shape[0], :want.shape[1]]
            diff = (got.int() - want.int()).abs()
            worst_pad, differ_pad = max(worst_pad, int(diff.max())), differ_pad + int((diff > 0).sum())
    if worst_pad > 1:
        failures.append(f"blur_pad_faces: {worst_pad} grey levels from _blur_pad")
    dev_ms, host_ms, crops = timed(lambda: crop_faces(views, index, lms, 256, 1024), device, a.warmup, a.iters)
    rows.append((f"crop_faces, {len(index)} faces ({len(padded)} padded) together", dev_ms, host_ms))
    dev_ms, host_ms, single = timed(lambda: [crop_faces([views[k]], [0], lms[k:k + 1], 256, 1024) for k in index],
                                    device, a.warmup, a.iters)
    rows.append(("crop_faces, face by face", dev_ms, host_ms))
    worst_crop = max(int((crops[k].int() - single[k][0].int()).abs().max()) for k in index)
    if worst_crop > 1:
        failures.append(f"crop_faces: {worst_crop} grey levels from face by face")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{len(views)} photos {a.min_side}-{a.max_side} px on {name}: {len(rolled)} rolled, {len(padded)} padded "
          f"(unshrunk) faces; padding {worst_pad} grey level(s) at most ({differ_pad} values), crops {worst_crop}")
    print(f"\n{'step':50s} {'device ms':>10s} {'host ms':>8s}")
    for step, dev, host in rows:
        print(f"{step:50s} {dev:10.2f} {host:8.2f}")
    print("\nchecks: " + ("all passed" if not failures else "FAILED: " + "; ".join(failures)))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": name, "photos": len(views), "rolled": len(rolled), "padded": len(padded),
                       "rows": [dict(zip(("step", "device_ms", "host_ms"), r)) for r in rows],
                       "max_grey_diff": {"padding": worst_pad, "crop": worst_crop}, "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
