"""How much detector work DeviceAligner.detect makes per setting of align.device_detect_max_side: detector calls,
batches, scored pyramid-level steps (each a chain of host steps and kernel launches) and the pixels of the levels
scored (what the fHOG and filter kernels cost), counted on any device with the GPU's batch limit. A count, not
a timing: it runs on the CPU in minutes and tells the host steps and the kernel work apart before a GPU run.

    python benchmarks/count_detector_work.py --photos 32 --max-sides 384,null
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.bench_pipeline_raw_gpu import face_like_model, make_photos  # noqa: E402
from models.alignment.detector import FrontalFaceDetector  # noqa: E402
from models.alignment.landmarks import ShapePredictor  # noqa: E402
from pipeline.config import AlignConfig  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402
from pipeline.device_align import DeviceAligner  # noqa: E402

GPU_BATCH_PIXELS = 256 * 2 ** 20  # FrontalFaceDetector's batch limit on a GPU


class CountingDetector(FrontalFaceDetector):
    """The detector, counting its calls, batches, scored level steps and scored pixels."""

    def reset(self) -> None:
        self.counts = {"calls": 0, "batches": 0, "scored level steps": 0, "scored MP": 0.0}

    def detect_levels(self, images, *args, **kwargs):
        self.counts["calls"] += 1
        return super().detect_levels(images, *args, **kwargs)

    def _detect_batch(self, *args, **kwargs):
        self.counts["batches"] += 1
        return super()._detect_batch(*args, **kwargs)

    def _score_level(self, batch, sizes):
        self.counts["scored level steps"] += 1
        self.counts["scored MP"] += sum(h * w for h, w in sizes) / 1e6
        return super()._score_level(batch, sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=32)
    ap.add_argument("--min-side", type=int, default=1024)
    ap.add_argument("--max-side", type=int, default=1800)
    ap.add_argument("--max-sides", default="384,null", help="device_detect_max_side values, 'null' for None")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    photos = [torch.from_numpy(decode_image(p).copy())
              for p, _ in make_photos(a.photos, a.min_side, a.max_side, faceless=0.1)]
    detector = CountingDetector(device=a.device, max_batch_pixels=GPU_BATCH_PIXELS)
    predictor = ShapePredictor.from_model(face_like_model(0), a.device, cuda_graphs=False)
    for text in a.max_sides.split(","):
        max_side = None if text == "null" else int(text)
        aligner = DeviceAligner(AlignConfig(backend="torch", device_detect_max_side=max_side), detector, predictor,
                                GPU_BATCH_PIXELS)
        detector.reset()
        t = time.time()
        found = aligner.detect(photos)
        counts = {k: round(v, 1) for k, v in detector.counts.items()}
        print(f"device_detect_max_side {max_side}: {sum(map(len, found))} faces in {len(photos)} photos, "
              f"{counts} ({time.time() - t:.0f} s on {a.device})", flush=True)


if __name__ == "__main__":
    main()
