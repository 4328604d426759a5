"""Throughput of the dlib ports: face detection (photos/s) and 68-point landmarks (faces/s), not a test.

    # GPU (the lead's H200): random landmark trees of the real model's shape (the 100 MB model cannot travel)
    python benchmarks/bench_face_models.py --device cuda
    # CPU smoke run (real model, dlib beside the ports on one core)
    python benchmarks/bench_face_models.py --device cpu --face-batches 16,64 --detect-photos 2

Rows, printed as one table at the end:
  * detect: models.alignment.detector.FrontalFaceDetector on 1024x1024 photos, upsample 0, batches of
    --photo-batch photos, on --device; the same on one CPU core; dlib's detector on one core when importable.
  * landmarks: models.alignment.landmarks.ShapePredictor.predict on --device for each face batch size, with the images
    already on the device (as the pipeline holds them after detection) and boxes spread over a pool of
    --pool-photos photos; on CUDA both the Triton kernels and the pure-torch path, whose results must be
    identical (exit status 1 otherwise); "core" rows time predict_faces alone (inputs already prepared on
    the device, no host transfers); "+graphs" rows replay CUDA graphs (ShapePredictor(cuda_graphs=True)).
    Then one CPU core, and dlib on one core when importable.
Landmark speed does not depend on the trees' values, so a random model of the same shape stands in where
the real file is missing; its landmarks mean nothing and dlib is not run on it.

Timing: warm-up calls first, then the median of --repeats calls, each ended by a device synchronisation
(predict returns host arrays, which synchronises).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from models.alignment.detector import FrontalFaceDetector  # noqa: E402
from models.alignment.landmarks import ShapePredictor, grey_levels  # noqa: E402
from models.alignment.landmarks_model import shape_predictor_68_path  # noqa: E402

try:
    import dlib
except ImportError:  # the GPU machine has no dlib
    dlib = None

DATA = os.path.join(os.path.dirname(__file__), "..", "tests", "data")
# Face centre (x, y) and box side in the source photos, from dlib's detector on the originals.
FACES = {"astronaut.jpg": (222.0, 126.0, 90.0), "grace_hopper.jpg": (268.0, 245.0, 216.0)}
PHOTO_SIDE = 1024


def photos_with_faces(count: int, seed: int = 0) -> tuple[list[np.ndarray], list[tuple[int, int, int, int]]]:
    """`count` 1024x1024 photos, each one test face (box side 120-360 px) pasted at a random place on a grey
    canvas; returns the photos and each face's box (left, top, right, bottom)."""
    rng = np.random.default_rng(seed)
    sources = {name: Image.open(os.path.join(DATA, name)).convert("RGB") for name in FACES}
    photos, boxes = [], []
    for i in range(count):
        name = sorted(FACES)[i % len(FACES)]
        cx, cy, side = FACES[name]
        scale = float(rng.uniform(120, 360)) / side
        src = sources[name]
        src = src.resize((round(src.width * scale), round(src.height * scale)), Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (PHOTO_SIDE, PHOTO_SIDE), tuple(int(v) for v in rng.integers(60, 200, 3)))
        face_x = float(rng.uniform(0.25, 0.75)) * PHOTO_SIDE
        face_y = float(rng.uniform(0.25, 0.75)) * PHOTO_SIDE
        dx, dy = round(face_x - cx * scale), round(face_y - cy * scale)
        canvas.paste(src, (dx, dy))
        half = side * scale / 2
        boxes.append(tuple(int(round(v)) for v in (face_x - half, face_y - half, face_x + half, face_y + half)))
        photos.append(np.array(canvas))  # a writable copy: torch.from_numpy warns on read-only arrays
    return photos, boxes


def boxes_for_batch(face_boxes, faces: int, seed: int) -> list[list[tuple[int, int, int, int]]]:
    """`faces` boxes spread round-robin over the photos: each photo's face box, jittered by a few pixels."""
    rng = np.random.default_rng(seed)
    out = [[] for _ in face_boxes]
    for k in range(faces):
        i = k % len(face_boxes)
        out[i].append(tuple(int(v) for v in np.array(face_boxes[i]) + rng.integers(-4, 5, 4)))
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class OneThread:
    """torch (and its OpenMP pool) on one thread, for "one CPU core" rows."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--face-batches", default="64,256,1024,8192", help="landmark batch sizes (faces)")
    ap.add_argument("--torch-path-max", type=int, default=1024,
                    help="largest batch also timed with the pure-torch path on CUDA (it is launch-bound)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph rows")
    ap.add_argument("--pool-photos", type=int, default=64, help="photos the landmark boxes are spread over")
    ap.add_argument("--cpu-faces", type=int, default=64, help="faces in the one-core landmark rows")
    ap.add_argument("--landmark-model", default=None,
                    help="shape predictor .dat (default: face-recognition-models' 68-point model if present)")
    ap.add_argument("--random-landmarks", action="store_true", help="random trees of the 68-point shape")
    ap.add_argument("--detector-file", default=None,
                    help="dlib.get_frontal_face_detector().save(path) output; default: the bundled copy")
    ap.add_argument("--photo-batch", type=int, default=64, help="photos per detect call")
    ap.add_argument("--detect-photos", type=int, default=4, help="photos in the one-core detect rows")
    ap.add_argument("--skip-detect", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the rows as JSON here too")
    args = ap.parse_args()

    device = torch.device(args.device)
    rows: list[dict] = []
    failures: list[str] = []

    def row(component, where, impl, batch, seconds, items, unit, note=""):
        rows.append(dict(component=component, device=where, impl=impl, batch=batch, seconds=seconds,
                         rate=items / seconds, unit=unit, note=note))
        print(f"  {component:9s} {where:12s} {impl:22s} batch {batch:5d}: {items / seconds:10.1f} {unit}"
              f"  ({seconds * 1e3:.1f} ms) {note}", flush=True)

    pool_count = max(args.pool_photos, args.photo_batch if not args.skip_detect else 1)
    print(f"building {pool_count} photos of {PHOTO_SIDE}x{PHOTO_SIDE} ...", flush=True)
    photos, face_boxes = photos_with_faces(pool_count)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    # -- landmarks ----------------------------------------------------------------------------------------
    model_path = args.landmark_model
    if model_path is None and not args.random_landmarks:
        try:
            candidate = shape_predictor_68_path()
            model_path = candidate if os.path.exists(candidate) else None
        except FileNotFoundError:
            model_path = None
    model_note = os.path.basename(model_path) if model_path else "random trees, 68-point shape"
    print(f"landmark model: {model_note}", flush=True)

    def make_predictor(where, use_triton=None):  # without graphs: the "+graphs" rows below add them
        if model_path:
            return ShapePredictor(model_path, device=where, use_triton=use_triton, cuda_graphs=False)
        return ShapePredictor.random(device=where, use_triton=use_triton, cuda_graphs=False)

    pool = photos[:args.pool_photos]
    pool_boxes = face_boxes[:args.pool_photos]
    main_predictor = make_predictor(device)
    predictors = {("triton" if main_predictor.use_triton else "torch"): main_predictor}
    if main_predictor.use_triton:
        predictors["torch"] = ShapePredictor.from_model(main_predictor.model, device=device, use_triton=False,
                                                        cuda_graphs=False)
    if device.type == "cuda" and not args.no_graphs:
        predictors[("triton" if main_predictor.use_triton else "torch") + "+graphs"] = ShapePredictor.from_model(
            main_predictor.model, device=device, cuda_graphs=True)
    images_on_device = [torch.from_numpy(p).to(device) for p in pool]
    for faces in (int(v) for v in args.face_batches.split(",") if v):
        boxes = boxes_for_batch(pool_boxes, faces, seed=faces)
        results = {}
        for impl, sp in predictors.items():
            if impl == "torch" and "triton" in predictors and faces > args.torch_path_max:
                continue
            try:
                sp.predict(images_on_device, boxes)
            except Exception as e:  # a path that fails on this machine is reported, the others still run
                failures.append(f"landmarks: {impl} failed at batch {faces}: {type(e).__name__}: {e}")
                print(f"  {impl} at {faces} faces FAILED: {type(e).__name__}: {e}", flush=True)
                continue
            results[impl] = sp.predict(images_on_device, boxes)
            seconds = median_seconds(lambda: sp.predict(images_on_device, boxes), device, args.repeats,
                                     args.warmup)
            row("landmarks", device_name, f"{impl} predict", faces, seconds, faces, "faces/s", model_note)
            # The core alone: grey levels and face table prepared on the device beforehand.
            grey = grey_levels(torch.cat([t.reshape(-1) for t in images_on_device]))
            offsets = np.cumsum([0] + [p.shape[0] * p.shape[1] for p in pool])[:-1]
            table = torch.tensor([[*b, offsets[i], pool[i].shape[1], pool[i].shape[0]]
                                  for i, bs in enumerate(boxes) for b in bs], device=device)
            seconds = median_seconds(lambda: sp.predict_faces(grey, table), device, args.repeats,
                                     args.warmup)
            row("landmarks", device_name, f"{impl} core", faces, seconds, faces, "faces/s", model_note)
        # The pure-torch path is the reference (the CPU tests prove it equal to dlib); above
        # --torch-path-max the Triton path stands in for it.
        reference = next((r for r in ("torch", "triton") if r in results), None)
        for impl in results:
            if reference is None or impl == reference:
                continue
            same = all(np.array_equal(a, b) for a, b in zip(results[impl], results[reference]))
            print(f"  {impl} == {reference} on {faces} faces: {same}", flush=True)
            if not same:
                failures.append(f"landmarks: {impl} differs from the {reference} path at batch {faces}")

    with OneThread():
        sp_cpu = make_predictor("cpu")
        cpu_boxes = boxes_for_batch(pool_boxes, args.cpu_faces, seed=1)
        ours = sp_cpu.predict(pool, cpu_boxes)
        seconds = median_seconds(lambda: sp_cpu.predict(pool, cpu_boxes), torch.device("cpu"),
                                 max(1, args.repeats // 2), 1)
        row("landmarks", "1 CPU core", "torch predict", args.cpu_faces, seconds, args.cpu_faces, "faces/s",
            model_note)
    if dlib is not None and model_path:
        dlib_sp = dlib.shape_predictor(model_path)
        pairs = [(pool[i], b) for i, bs in enumerate(cpu_boxes) for b in bs]

        def run_dlib():
            return [dlib_sp(image, dlib.rectangle(*b)) for image, b in pairs]

        seconds = median_seconds(run_dlib, torch.device("cpu"), max(1, args.repeats // 2), 1)
        row("landmarks", "1 CPU core", "dlib", args.cpu_faces, seconds, args.cpu_faces, "faces/s", model_note)
        theirs = run_dlib()
        flat_ours = [p for per_image in ours for p in per_image]
        same = all(np.array_equal(o, np.array([(s.part(k).x, s.part(k).y) for k in range(s.num_parts)]))
                   for o, s in zip(flat_ours, theirs))
        print(f"  port == dlib on {len(pairs)} faces (CPU): {same}", flush=True)
        if not same:
            failures.append("landmarks: CPU port differs from dlib")

    # -- detection ----------------------------------------------------------------------------------------
    if not args.skip_detect:
        detector_file = args.detector_file  # None: the copy bundled with models/alignment/detector.py
        batch = photos[:args.photo_batch]
        det = FrontalFaceDetector(device=device, path=detector_file)
        seconds = median_seconds(lambda: det.detect(batch, upsample=0), device, args.repeats,
                                 args.warmup)
        row("detect", device_name, "torch", len(batch), seconds, len(batch), "photos/s", "upsample 0")
        few = photos[:args.detect_photos]
        with OneThread():
            det_cpu = FrontalFaceDetector(device="cpu", path=detector_file)
            seconds = median_seconds(lambda: det_cpu.detect(few, upsample=0), torch.device("cpu"), 1, 1)
            row("detect", "1 CPU core", "torch", len(few), seconds, len(few), "photos/s", "upsample 0")
        if dlib is not None:
            dlib_det = dlib.get_frontal_face_detector()
            seconds = median_seconds(lambda: [dlib_det(p, 0) for p in few], torch.device("cpu"), 1, 1)
            row("detect", "1 CPU core", "dlib", len(few), seconds, len(few), "photos/s", "upsample 0")

    print()
    print(f"| component | device | implementation | batch | rate | ms per batch | note |")
    print(f"|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['component']} | {r['device']} | {r['impl']} | {r['batch']} | {r['rate']:.1f} {r['unit']} | "
              f"{r['seconds'] * 1e3:.2f} | {r['note']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "failures": failures, "torch": torch.__version__, "device": device_name,
                       "argv": sys.argv}, f, indent=1)
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
