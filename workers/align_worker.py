"""Thin Ray wrapper around pipeline.align (usable without Ray: it is a plain callable class).

    worker = AlignWorker(output_size=256, transform_size=1024, policy="largest")
    results = worker([img0, img1, ...])      # list (one per image) of lists of AlignedFace

With Ray Data: ``ds.map_batches(AlignWorker, fn_constructor_kwargs={...}, concurrency=n)``; a batch may be
a list of images or a dict with an "image" column (then the same dict comes back with a "faces" column).
To align and invert in a Ray Data pipeline, as the pipeline does: ``workers.ray_data.InvertPhotos``.
"""
from __future__ import annotations

from pipeline.align import FaceAligner, get_aligner


class AlignWorker:
    def __init__(
        self,
        output_size: int = 256,
        transform_size: int = 1024,
        policy: str = "largest",
        min_face_size: float = 0.0,
        **aligner_kwargs,
    ):
        # Built once per worker process (the 68-point model takes ~2 s to load).
        self.aligner: FaceAligner = get_aligner(**aligner_kwargs)
        self.kwargs = dict(output_size=output_size, transform_size=transform_size, policy=policy, min_face_size=min_face_size)

    def align_one(self, image):
        return self.aligner.align(image, **self.kwargs)

    def __call__(self, batch):
        if isinstance(batch, dict):
            out = dict(batch)
            out["faces"] = [self.align_one(img) for img in batch["image"]]
            return out
        return [self.align_one(img) for img in batch]
