#!/usr/bin/env python
"""Whole-pipeline throughput on this machine (CPU, small factory model), with each stage's time share.

    .venv/bin/python benchmarks/bench_pipeline.py [--images 96] [--cpus 2] [--shard-size 32]

Runs the real pipeline (embedded Ray, local files in and out) twice:
  * align on:  real face photos (tests/data), the full read -> decode -> align -> invert -> encode/write path;
  * align off: synthetic 256x256 images, so inversion and I/O alone are measured.
images/s is over the processing time (Ray start-up and planning excluded). Stage shares are the
summed seconds each stage spent inside workers; they add up to more than the wall time when stages
overlap across processes, and show which stage to speed up first.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data")


def make_inputs(d: str, n: int, faces: bool) -> None:
    os.makedirs(d, exist_ok=True)
    photos = [Image.open(os.path.join(DATA, f)).convert("RGB") for f in ("astronaut.jpg", "grace_hopper.jpg")]
    rng = np.random.default_rng(0)
    for i in range(n):
        if faces:
            # Distinct bytes per file (a small shift), same content cost as the originals.
            im = photos[i % len(photos)]
            dx = int(rng.integers(0, 8))
            im = im.crop((dx, 0, im.width - 8 + dx, im.height))
        else:
            im = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        with open(os.path.join(d, f"img{i:05d}.jpg"), "wb") as f:
            f.write(buf.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=64, help="factory model resolution")
    ap.add_argument("--only", choices=("align", "noalign"), default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the inversion actor")
    args = ap.parse_args()

    import ray

    from pipeline.config import resolve
    from pipeline.runner import run

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    tmp = tempfile.mkdtemp(prefix="bench_pipeline_")
    rows = []
    try:
        for name, align in (("align on (real photos)", True), ("align off (synthetic 256px)", False)):
            if args.only and (args.only == "align") != align:
                continue
            src = os.path.join(tmp, f"in_{int(align)}")
            make_inputs(src, args.images, faces=align)
            cfg = resolve({
                "input": {"url": src}, "output": {"url": os.path.join(tmp, f"out_{int(align)}"), "overwrite": True},
                "model": {"checkpoint": f"factory:resolution={args.resolution},stages=2,seed=0",
                          "batch_size": args.batch_size, "num_threads": args.threads},
                "align": {"enabled": align}, "shard_size": args.shard_size, "progress": False,
                "ray": {"chunk_size": 16},
            })
            t0 = time.time()
            res = run(cfg, echo=lambda s: None)
            wall = time.time() - t0
            s = res.summary
            rows.append((name, s["inputs"], s["images_per_s"], wall, s["stage_share"], s["counts"]))
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nPipeline on CPU: {args.cpus} Ray CPUs, factory model r{args.resolution} 2 stages, "
          f"batch {args.batch_size}, {args.images} images, shards of {args.shard_size}, "
          f"actor threads {args.threads or 1}")
    print("| run | images | images/s | wall s | read | decode | align | invert | encode | write |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, ips, wall, share, counts in rows:
        cells = " | ".join(f"{100 * share.get(k, 0):.0f}%" for k in ("read", "decode", "align", "invert", "encode", "write"))
        print(f"| {name} | {n} | {ips:.2f} | {wall:.1f} | {cells} |")
    for name, *_, counts in rows:
        print(f"{name}: statuses {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
