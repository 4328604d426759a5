"""Raw photographs to latents on a GPU machine (align.backend torch) against inversion alone, in one run.

Input: JPEGs of ``--min-side``..``--max-side`` px with 0, 1 or 2 faces (``--faceless`` of them without),
made from the test photographs on backgrounds (by one process per CPU), in WebDataset tars on local disk;
output: latents and reconstructions on local disk. The landmark model is replaced by random trees of the
68-point model's shape (``face_like_model``: written in dlib's format and named by E2STYLE_LANDMARK_MODEL)
whose initial shape is the test photographs' mean face and whose leaves barely move it: the same work as the
real file, landmarks that are that face in each detection box (eyes level, so faces are not re-predicted
upright, as most real faces are not). Full-size official architecture, seeded random weights, ``--stages``
stages with reconstructions.

Figures (all in this one run, on the same GPU):
- inversion only: ``Inverter`` on 256 px faces already in memory (warm-up, then timed calls);
- alignment alone: ``DeviceAligner.align`` on decoded photos already in memory, photos/s, on photos of sizes
  it has not met (as in the pipeline) and on the same photos again (size-keyed tables cached);
- the actor alone: ``Inverter`` aligning and inverting chunks of such photos, without Ray: from one thread
  on photos it has met, from one thread on new ones and from two threads at once (as Ray runs it) on new
  ones, photos/s, and its alignment's time by part (upload, detect, landmarks, crop) in ms per chunk, which
  the pipeline's run summary gives too (``align_ms_per_chunk``: the same parts inside the pipeline);
- the pipeline: ``run_pipeline``'s runner with embedded Ray, photos/s and faces/s in steady state (from the
  end of the actor's first call to the last commit, as benchmarks/bench_pipeline_gpu.py measures), the
  ratio of its faces/s to inversion only's (target >= 0.9), and the time share of each stage (read, decode:
  CPU tasks; align, invert: the actor; encode, write: CPU tasks); with ``--backends torch,dlib`` the same
  pipeline again with alignment on the CPU tasks (dlib, which must be importable; the random trees then go
  to dlib's own shape_predictor), the side-by-side figure; with ``--variant`` (repeated) the torch pipeline
  once per set of config overrides, on the same photos; for each run the GPU's utilisation (nvidia-smi's
  share of time a kernel ran) between 10% and 90% of its faces.

    python benchmarks/bench_pipeline_raw_gpu.py --photos 4096 --shard 256 --batch 64 --stages 3 --backends torch,dlib
    python benchmarks/bench_pipeline_raw_gpu.py --photos 4096 --variant align.device_lanes=2 --variant align.device_lanes=4
    python benchmarks/bench_pipeline_raw_gpu.py --smoke      # CPU: tiny photos and model, checks it runs
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import tarfile
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.pipeline_stats import GpuBusy, middle_rate, middle_window, read_stats, report, steady_rate  # noqa: E402
from models.alignment.detector import FrontalFaceDetector  # noqa: E402
from models.factory import atomic_save, build_e2style, e2style_checkpoint  # noqa: E402
from models.alignment.landmarks import ShapePredictor  # noqa: E402
from models.alignment.landmarks_model import random_model, serialize_shape_predictor  # noqa: E402
from pipeline.config import AlignConfig, RayConfig, resolve  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402
from pipeline.device_align import DeviceAligner  # noqa: E402
from pipeline.inverter import Inverter, aligning_actor_calls  # noqa: E402
from pipeline.model_files import LANDMARK_MODEL_ENV  # noqa: E402
from pipeline.records import ALIGN_PENDING, PreparedChunk, Row  # noqa: E402
from pipeline.runner import run  # noqa: E402

# Head crops of the test photographs (left, top, right, bottom): the faces pasted into the photos.
HEADS = {"astronaut.jpg": (130, 30, 320, 230), "grace_hopper.jpg": (130, 100, 410, 400)}
DATA = os.path.join(ROOT, "tests", "data")

# dlib's 68 landmarks on the test photographs (benchmarks/bench_crop.py --save-landmarks writes them).
LANDMARKS_FILE = os.path.join(ROOT, "benchmarks", "data", "photo_landmarks.json")
# dlib's frontal detector's box of the face those landmarks belong to, as a dlib.rectangle (left, top, right,
# bottom, inclusive): the frame of dlib's mean shape. tests/models/alignment/test_landmarks.py checks them against dlib.
FACE_BOXES = {"astronaut.jpg": (179, 83, 266, 170), "grace_hopper.jpg": (161, 137, 376, 352)}
# Leaf spread of the face-like random trees: points move by ~1e-3 of the box (see models.alignment.landmarks_model.random_model).
FACE_LEAF_SCALE = 1e-5


def mean_face_shape() -> np.ndarray:
    """(68, 2) float32: the test photographs' landmarks, each in the unit square of its face box (dlib maps
    (0, 0) and (1, 1) to the box's left-top and right-bottom pixels), averaged: a plausible face for random
    trees' initial shape (random_model(initial_shape=...)), eyes level like most real faces."""
    with open(LANDMARKS_FILE) as f:
        saved = json.load(f)
    shapes = []
    for name, (left, top, right, bottom) in FACE_BOXES.items():
        points = np.asarray(saved[name], dtype=np.float64)
        shapes.append((points - (left, top)) / (right - left, bottom - top))
    return np.mean(shapes, axis=0).astype(np.float32)


def face_like_model(seed: int = 0):
    """Random trees of the 68-point model's shape whose landmarks stay near mean_face_shape in every box:
    the real model's work per face, without every face looking rolled (random mean points would make each
    face cost the upright re-prediction too)."""
    return random_model(seed=seed, initial_shape=mean_face_shape(), leaf_scale=FACE_LEAF_SCALE)


_SOURCES: dict = {}


def _sources():
    """The heads and the background photo, read once per process."""
    if not _SOURCES:
        _SOURCES["heads"] = [Image.open(os.path.join(DATA, f)).convert("RGB").crop(box) for f, box in HEADS.items()]
        _SOURCES["china"] = Image.open(os.path.join(DATA, "china.jpg")).convert("RGB")
    return _SOURCES["heads"], _SOURCES["china"]


def make_photo(args: tuple) -> tuple[bytes, int]:
    """Photo ``i`` of make_photos (args: i, min_side, max_side, faceless, seed): its own random stream,
    from (seed, i), so any process makes the same photo."""
    i, min_side, max_side, faceless, seed = args
    rng = np.random.default_rng((seed, i))
    heads, china = _sources()
    w = int(rng.integers(min_side, max_side + 1))
    h = int(rng.integers(min_side, max_side + 1))
    bg = china.resize((w, h), Image.Resampling.BILINEAR) if i % 2 else Image.fromarray(
        rng.integers(60, 200, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    count = 0 if rng.random() < faceless else int(rng.integers(1, 3))
    for k in range(count):
        side = int(min(w, h) * rng.uniform(0.18, 0.4))
        head = heads[(i + k) % 2].resize((side, side), Image.Resampling.BILINEAR)
        x = int(rng.integers(0, max(1, w // count - side))) + k * (w // max(count, 1))
        y = int(rng.integers(0, h - side))
        bg.paste(head, (min(x, w - side), y))
    buf = io.BytesIO()
    bg.save(buf, "JPEG", quality=90)
    return buf.getvalue(), count


def make_photos(n: int, min_side: int, max_side: int, faceless: float, seed: int = 0, workers: int | None = None):
    """(encoded JPEG, faces pasted) per photo: a background (the faceless photo scaled, or noise) with 0, 1
    or 2 heads of 18-40% of the shorter side. Made by ``workers`` processes (default: one per CPU; 1024 photos
    of 1024-1800 px took 73 s on one core); the same photos whatever their number."""
    jobs = [(i, min_side, max_side, faceless, seed) for i in range(n)]
    workers = min(workers or os.cpu_count() or 1, n)
    if workers <= 1:
        return [make_photo(j) for j in jobs]
    # fork: the children run only numpy and Pillow (never torch or CUDA, which a forked child must not touch),
    # and start at once where spawn would import torch and Ray again in each.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(make_photo, jobs, chunksize=max(1, n // (4 * workers)))


def write_tars(d: str, photos, shard: int) -> None:
    os.makedirs(d, exist_ok=True)
    for t in range(0, len(photos), shard):
        with tarfile.open(os.path.join(d, f"{t // shard:05d}.tar"), "w") as tf:
            for i in range(t, min(len(photos), t + shard)):
                info = tarfile.TarInfo(f"{i:08d}.jpg")
                info.size = len(photos[i][0])
                tf.addfile(info, io.BytesIO(photos[i][0]))


def parse_overrides(text: str) -> dict:
    """'align.device_lanes=4,ray.cpu_task_niceness=0' -> {'align.device_lanes': 4, ...}: integers as int,
    'null' as None, anything else as the string."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = None if value == "null" else int(value) if value.lstrip("-").isdigit() else value
    return out


def per_chunk_ms(part_seconds: dict[str, float], chunks: int) -> dict[str, float]:
    """Alignment's seconds by part (pipeline.device_align.ALIGN_PARTS) as ms per chunk."""
    return {k: round(1e3 * v / max(1, chunks), 1) for k, v in part_seconds.items()}


def allocator_state() -> dict:
    """The CUDA device allocator's and the pinned host allocator's counters (for allocator_calls)."""
    return {**torch.cuda.memory_stats(), **torch.cuda.host_memory_stats()}


def allocator_calls(before: dict, calls: int = 1) -> dict[str, float]:
    """The allocators' calls into CUDA since ``before`` (allocator_state()), per one of ``calls`` calls or chunks:
    each cudaMalloc or cudaFree costs the host, and a retry (no cached block fits) synchronises and frees the
    cache; a new pinned host block (no cached one free: the copies that used them are still queued) costs a
    cudaHostAlloc, its microseconds counted (host_alloc_us)."""
    after = allocator_state()
    counters = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams", "num_host_alloc",
                "num_host_free", "host_alloc_time.total", "host_free_time.total")
    return {k.replace("_time.total", "_us"): round((after.get(k, 0) - before.get(k, 0)) / calls, 2) for k in counters}


def photo_chunks(photos: list, group: int) -> list[PreparedChunk]:
    """Decoded photos as the chunks CPU tasks hand an aligning actor: ``group`` photos each, one
    ALIGN_PENDING row per photo."""
    return [PreparedChunk("b", k, [Row(str(i), "x", status=ALIGN_PENDING) for i in range(i0, i0 + len(part))],
                          np.zeros((0, 256, 256, 3), np.uint8), {}, len(part), photos=part)
            for k, (i0, part) in enumerate((i, photos[i:i + group]) for i in range(0, len(photos), group))]


def actor_alone(ckpt: str, a, landmarks_model, seen: list, new: list, device: str) -> dict:
    """Photos/s of the inversion actor's own class (``Inverter`` aligning on its device, then inverting),
    on chunks of decoded photos already in memory, without Ray or decoding, and its alignment's ms per chunk
    by part: from one thread (stage, align, invert, one chunk after the other) on photos it has aligned before
    (``seen``: every size-keyed table cached) and on photos of sizes it has not met (a third of ``new``), as in
    the pipeline, where each photo is new; then from 2 and from aligning_actor_calls (lanes + 2) threads at once, as
    Ray's max_concurrency runs the pipeline's actor (one call staging, two aligning, one inverting), each on
    another third of ``new``. Tells the actor's own limit from the rest of the pipeline's, whether new photos
    cost more, and what each call at once adds. Without enough ``new`` photos (--smoke), every run is on
    ``seen``."""
    worker = Inverter(ckpt, stages=a.stages, batch_size=a.batch, align=AlignConfig(backend="torch"),
                          landmark_predictor=ShapePredictor.from_model(landmarks_model, device, cuda_graphs=False))
    group = RayConfig.chunk_size
    seen_chunks = photo_chunks(seen, group)
    for c in seen_chunks:
        worker.invert_chunks(c)  # warm-up, and every size of ``seen`` met
    third = len(new) // 3 // group * group
    runs = [("seen photos, 1 thread", seen_chunks, 1)]
    for k, threads in enumerate((1, 2, aligning_actor_calls(AlignConfig(backend="torch")))):
        name = f"{threads} thread{'s' * (threads > 1)}"
        if third:
            runs.append((f"new photos, {name}", photo_chunks(new[k * third:(k + 1) * third], group), threads))
        elif threads > 1:
            runs.append((f"seen photos, {threads} threads", seen_chunks, threads))
    rates = {}
    for name, chunks, threads in runs:
        if device == "cuda":
            torch.cuda.synchronize()
        before = worker.align_part_seconds()
        t = time.time()
        jobs = [chunks[k::threads] for k in range(threads)]
        runners = [threading.Thread(target=lambda mine=mine: [worker.invert_chunks(c) for c in mine]) for mine in jobs]
        for r in runners:
            r.start()
        for r in runners:
            r.join()
        photos = sum(len(c.photos) for c in chunks)
        rates[name] = round(photos / (time.time() - t), 1)
        parts = {k: v - before[k] for k, v in worker.align_part_seconds().items()}
        rates[f"{name}, align ms per chunk"] = per_chunk_ms(parts, len(chunks))
        print(f"actor alone, {name}: {rates[name]} photos/s; alignment, ms per chunk of {group}: "
              f"{rates[f'{name}, align ms per chunk']}", flush=True)
    del worker
    if device == "cuda":
        torch.cuda.empty_cache()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=4096)
    ap.add_argument("--shard", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--min-side", type=int, default=1024)
    ap.add_argument("--max-side", type=int, default=1800)
    ap.add_argument("--faceless", type=float, default=0.1)
    ap.add_argument("--resolution", type=int, default=1024, help="generator resolution (smoke: 64)")
    ap.add_argument("--width", type=int, default=512, help="network width (smoke: 32)")
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny photos and model on CPU: checks the script runs")
    ap.add_argument("--work", default=tempfile.mkdtemp(prefix="bench_raw_"))
    ap.add_argument("--backends", default="torch",
                    help="align.backend of each pipeline run, comma-separated (torch,dlib: the side-by-side)")
    ap.add_argument("--variant", action="append", default=[],
                    help="a torch-backend run with these config overrides, dotted keys, comma-separated, 'null' for "
                         "None: e.g. align.device_lanes=4,align.device_detect_max_side=384 (repeat the option for "
                         "several runs; none: one run with the config's defaults)")
    ap.add_argument("--check-cpu", type=int, default=0,
                    help="compare the device's detections with the CPU's on this many photos (about 2 s each)")
    ap.add_argument("--no-actor-alone", action="store_true",
                    help="skip the actor alone (Inverter without Ray): saves about a minute of device time")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if a.smoke:
        a.photos, a.shard, a.batch, a.stages = 8, 4, 4, 2
        a.min_side, a.max_side, a.resolution, a.width = 200, 260, 64, 32

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    t = time.time()
    photos = make_photos(a.photos, a.min_side, a.max_side, a.faceless)
    write_tars(os.path.join(a.work, "in"), photos, a.shard)
    ckpt = os.path.join(a.work, "e2style.pt")
    with torch.device(device):
        model = build_e2style(a.resolution, stages=a.stages, width=a.width, seed=0)
    atomic_save(e2style_checkpoint(model), ckpt)
    del model
    # Random face-like trees of the 68-point model's shape, in dlib's file format: the actor (and, with the dlib
    # backend, dlib's shape_predictor) loads it as the real one.
    landmarks_model = face_like_model(seed=0)
    landmark_file = os.path.join(a.work, "random_68.dat")
    with open(landmark_file, "wb") as f:
        f.write(serialize_shape_predictor(landmarks_model))
    os.environ[LANDMARK_MODEL_ENV] = landmark_file   # before Ray starts: its workers inherit it
    print(f"{a.photos} photos ({sum(c for _, c in photos)} faces pasted) and checkpoint ready in "
          f"{time.time() - t:.0f}s", flush=True)

    # Inversion alone, same settings, the actor's class, faces already decoded and aligned.
    worker = Inverter(ckpt, stages=a.stages, batch_size=a.batch)
    rng = np.random.default_rng(1)
    faces = rng.integers(0, 256, (a.batch * (16 if on_gpu else 1), 256, 256, 3), dtype=np.uint8)
    chunk = PreparedChunk("b", 0, [Row(str(i), "x") for i in range(len(faces))], faces, {}, len(faces))
    worker.invert_chunks(chunk)  # compile + warm-up
    if on_gpu:
        torch.cuda.synchronize()
    t = time.time()
    reps = 3 if on_gpu else 1
    for _ in range(reps):
        worker.invert_chunks(chunk)
    invert_only = reps * len(faces) / (time.time() - t)
    print(f"inversion only: {invert_only:.1f} faces/s", flush=True)
    del worker
    # The pipeline runs next: their actor's compilation reuses the caches inversion alone filled (on a fresh
    # machine the compilations are minutes of the call's time).
    pipelines = {}
    # Chunks of the run: each shard's photos cut into chunks of RayConfig.chunk_size.
    n_chunks = sum(-(-min(a.shard, a.photos - t) // RayConfig.chunk_size) for t in range(0, a.photos, a.shard))
    # (backend, overrides): the torch runs once per --variant, the config's defaults without one
    runs = [(backend, {}) for backend in a.backends.split(",") if backend != "torch" or not a.variant]
    if "torch" in a.backends.split(","):
        runs += [("torch", parse_overrides(v)) for v in a.variant]
    for backend, overrides in runs:
        name = ", ".join([backend] + [f"{k}={v}" for k, v in overrides.items()])
        out = os.path.join(a.work, f"out_{len(pipelines)}")
        cfg_dict = {"input": {"url": os.path.join(a.work, "in"), "format": "webdataset"},
                    "output": {"url": out, "image_size": 256},
                    "model": {"checkpoint": ckpt, "batch_size": a.batch, "stages": a.stages},
                    "align": {"enabled": True, "backend": backend}, "ray": {"num_cpus": a.num_cpus}, "progress": False}
        for key, value in overrides.items():
            section, _, leaf = key.partition(".")
            cfg_dict.setdefault(section, {})[leaf] = value
        cfg = resolve(cfg_dict, {})
        t = time.time()
        with GpuBusy() as busy:
            res = run(cfg, echo=lambda s: print(s, flush=True))
        wall = time.time() - t
        stats = read_stats(out)
        face_rate, seconds = steady_rate(stats)
        middle = middle_window(stats)
        first_call = min(t_ for s in stats for _n, t_ in s["inverted_at"]) - t
        faces_done = sum(s["counts"].get("ok", 0) for s in stats)
        photo_rate = face_rate * a.photos / max(1, faces_done)
        pipelines[name] = {"pipeline_faces_s": round(face_rate, 1), "pipeline_photos_s": round(photo_rate, 1),
                        "steady_s": round(seconds, 1),
                        # between 10% and 90% of the faces: neither the start nor the last shards' wave
                        "middle_faces_s": round(middle_rate(stats), 1),
                        # the GPU's utilisation (nvidia-smi: share of time a kernel ran) in that window
                        "middle_gpu_busy_percent": busy.mean(*middle[:2]) if middle else None,
                        "first_call_s": round(first_call, 1),
                        "wall_s": round(wall, 1), "counts": res.summary.get("counts"),
                        "exit_code": res.exit_code, "stage_share": res.summary.get("stage_share"),
                        "stage_seconds": res.summary.get("stage_seconds"),
                        # the actors' alignment by part, per chunk of the run (as the actor alone's above)
                        "align_ms_per_chunk": per_chunk_ms(res.summary.get("align_seconds_by_part", {}), n_chunks)}
        print(json.dumps({name: pipelines[name]}), flush=True)
    # Alignment alone: decoded photos in memory -> faces on the device; once per align.device_detect_max_side
    # of the runs (the default first), each with its check against the CPU when asked.
    decoded = [decode_image(p) for p, _ in photos[: min(len(photos), 512)]]
    group = RayConfig.chunk_size  # the photos of one chunk: what the actor aligns in one call
    timed = decoded[group:] or decoded  # photos the warm-up did not meet (the smoke run has only one chunk)
    align_rates = {}
    max_sides = list(dict.fromkeys([AlignConfig.device_detect_max_side] + [
        o["align.device_detect_max_side"] for _b, o in runs if "align.device_detect_max_side" in o]))
    for max_side in max_sides:
        cfg = AlignConfig(backend="torch", device_detect_max_side=max_side)
        aligner = DeviceAligner.build(cfg, device, predictor=ShapePredictor.from_model(landmarks_model, device,
                                                                                       cuda_graphs=False))
        aligner.align(decoded[:group])  # warm-up (Triton kernels, CUDA graphs)
        rates = {}
        for when in ("new photos", "the same photos again"):
            if on_gpu:
                torch.cuda.synchronize()
            t = time.time()
            found = 0
            for i in range(0, len(timed), group):
                found += sum(len(f) for f in aligner.align(timed[i:i + group]))
            rates[when] = round(len(timed) / (time.time() - t), 1)
        print(f"alignment alone, device_detect_max_side {max_side}: {rates['new photos']} photos/s on photos it "
              f"had not met, {rates['the same photos again']} on the same photos again ({found} faces in "
              f"{len(timed)} photos)", flush=True)
        if a.check_cpu:
            # The device's detections against the CPU's (the torch CPU path is the one CI tests against dlib).
            on_cpu = DeviceAligner(cfg, FrontalFaceDetector(device="cpu"), aligner.predictor, aligner.max_group_pixels)
            sample = decoded[:a.check_cpu]
            got, want = aligner.detect(sample), on_cpu.detect(sample)
            rates["device check, photos differ"] = sum(g != w for g, w in zip(got, want))
            print(f"device check: detections of {len(sample)} photos ({sum(map(len, want))} faces) on {device} "
                  f"against the CPU: {rates['device check, photos differ']} photos differ", flush=True)
        align_rates[f"device_detect_max_side {max_side}"] = rates
        del aligner
    align_rate = align_rates[f"device_detect_max_side {max_sides[0]}"]["new photos"]

    actor_rates = {}
    if (on_gpu or a.smoke) and not a.no_actor_alone:
        # Photos the actor has not met: 3 x 256 (in the smoke run there are none: it reuses ``decoded``).
        new_photos = [decode_image(p) for p, _ in photos[len(decoded):len(decoded) + 768]]
        actor_rates = actor_alone(ckpt, a, landmarks_model, decoded, new_photos, device)
    if on_gpu:
        torch.cuda.empty_cache()

    result = {"gpu": torch.cuda.get_device_name(0) if on_gpu else "cpu", "photos": a.photos,
              "sides": [a.min_side, a.max_side], "batch": a.batch, "stages": a.stages,
              "inversion_only_faces_s": round(invert_only, 1), "alignment_alone_photos_s": align_rate,
              "alignment_alone": align_rates,
              "actor_alone_photos_s": actor_rates}
    for name, r in pipelines.items():
        r["ratio"] = round(r["pipeline_faces_s"] / invert_only, 3)
        r["middle_ratio"] = round(r["middle_faces_s"] / invert_only, 3)
        result[name] = r
    report(result, a.out)


if __name__ == "__main__":
    main()
