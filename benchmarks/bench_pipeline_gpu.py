"""The whole pipeline on a GPU machine against the model alone, at the same settings.

Input: pre-aligned 256px JPEGs (crops of the test photos) in WebDataset tars on local disk; output:
latents and reconstructions on local disk; alignment off; full-size official architecture with seeded
random weights. Model-only: `Inverter` on the decoded faces in one process (warm-up, then a timed
pass). Pipeline: `run_pipeline`'s runner with embedded Ray; throughput is measured in steady state, from
the end of the inversion actor's first call to the last commit (`inverted_at`, `committed_unix` in the
stats files), counting the faces inverted in that window, so Ray start-up, model loading and compilation
are excluded from both figures.

    python benchmarks/bench_pipeline_gpu.py --images 8192 --shard 512 --batch 32 --stages 3
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.pipeline_stats import read_stats, report, steady_rate  # noqa: E402


def make_tars(d: str, n: int, shard: int) -> list[np.ndarray]:
    photos = [np.asarray(Image.open(os.path.join(ROOT, "tests/data", f)).convert("RGB")) for f in ("astronaut.jpg", "grace_hopper.jpg")]
    rng = np.random.default_rng(0)
    os.makedirs(d, exist_ok=True)
    sample = []
    for t in range(0, n, shard):
        with tarfile.open(os.path.join(d, f"{t // shard:05d}.tar"), "w") as tf:
            for i in range(t, min(n, t + shard)):
                img = photos[i % 2]
                h, w = img.shape[:2]
                s = int(rng.integers(min(h, w) * 3 // 4, min(h, w) + 1))
                y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
                face = Image.fromarray(img[y:y + s, x:x + s]).resize((256, 256), Image.Resampling.BILINEAR)
                buf = io.BytesIO()
                face.save(buf, "JPEG", quality=90)
                data = buf.getvalue()
                info = tarfile.TarInfo(f"{i:08d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                if len(sample) < 1024:
                    sample.append(np.asarray(face))
    return sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--shard", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=256, help="0 = latents only")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--work", default=tempfile.mkdtemp(prefix="bench_pipe_"))
    ap.add_argument("--out", default="")
    a = ap.parse_args()

    import torch

    from models.factory import atomic_save, build_e2style, e2style_checkpoint
    from pipeline.config import resolve
    from pipeline.runner import run
    from pipeline.inverter import Inverter

    t = time.time()
    sample = make_tars(os.path.join(a.work, "in"), a.images, a.shard)
    ckpt = os.path.join(a.work, "e2style_full.pt")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = build_e2style(1024, stages=3, width=512, seed=0)
    atomic_save(e2style_checkpoint(model), ckpt)
    del model
    torch.cuda.empty_cache()
    print(f"inputs and checkpoint ready in {time.time() - t:.0f}s", flush=True)

    # Model alone, same settings, same process kind as the actor (Inverter), inputs already decoded.
    worker = Inverter(ckpt, precision=a.precision, stages=a.stages, batch_size=a.batch, return_images=a.image_size > 0)
    from pipeline.prepare import PreparedChunk, Row

    faces = np.stack(sample[: a.batch * 16])
    chunk = PreparedChunk("b", 0, [Row(str(i), "x") for i in range(len(faces))], faces, {}, len(faces))
    worker.invert_chunks(chunk)  # compile + warm-up
    torch.cuda.synchronize()
    t = time.time()
    reps = 3
    for _ in range(reps):
        worker.invert_chunks(chunk)
    model_only = reps * len(faces) / (time.time() - t)
    print(f"model only: {model_only:.1f} images/s", flush=True)
    del worker
    torch.cuda.empty_cache()

    out = os.path.join(a.work, "out")
    cfg = resolve({"input": {"url": os.path.join(a.work, "in"), "format": "webdataset"},
                   "output": {"url": out, "image_size": a.image_size},
                   "model": {"checkpoint": ckpt, "batch_size": a.batch, "stages": a.stages, "precision": a.precision},
                   "align": {"enabled": False}, "ray": {"num_cpus": a.num_cpus}, "progress": False}, {})
    res = run(cfg, echo=lambda s: print(s, flush=True))
    pipeline_rate, _ = steady_rate(read_stats(out))
    result = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "images": a.images, "batch": a.batch,
              "stages": a.stages, "image_size": a.image_size, "model_only_img_s": round(model_only, 1),
              "pipeline_steady_img_s": round(pipeline_rate, 1), "ratio": round(pipeline_rate / model_only, 3),
              "exit_code": res.exit_code, "stage_share": res.summary.get("stage_share"), "stage_seconds": res.summary.get("stage_seconds")}
    report(result, a.out)


if __name__ == "__main__":
    main()
