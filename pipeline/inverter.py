"""The inversion actor's logic without Ray: ``Inverter`` loads the model once (device, precision, compile warm-up,
CUDA graph capture), aligns chunks of photos on its device when it aligns (alignment lanes, GIL switch interval),
and inverts the faces of several chunks as one stream of batches. ``workers/invert_worker.py`` runs it as a Ray
actor; tests, benchmarks and the Ray Data entry point (pipeline/photo_inversion.py) call it directly.

The lane rule (``aligning_lanes``) is the one the driver also calls to size an actor's concurrent calls
(``aligning_actor_calls``), so the two cannot drift.
"""
from __future__ import annotations

import contextlib
import queue
import sys
import time

import numpy as np
import torch

from .checkpoints import load_model, resolve_batch_size, resolve_device, use_threads
from .config import AlignConfig
from .device_align import DeviceAligner, PartClock, align_photos, resolve_align_backend
from .edit import apply_edit
from .images import MODEL_INPUT_SIZE, resize_square
from .invert import SharedInversion, invert_faces
from .records import InvertResult, PreparedChunk
from .tasks import check_model

__all__ = ["Inverter", "aligning_lanes", "aligning_actor_calls", "ALIGN_GIL_SWITCH_S"]

# The GIL switch interval of an actor that aligns on its GPU (seconds; Python's default is 0.005).
ALIGN_GIL_SWITCH_S = 0.0005
# Chunks an actor aligns at once on a GPU, each on a CUDA stream of its own (on a CPU: one). Alignment is a chain
# of host steps and short kernels with host synchronisations between them; while one chunk's thread waits for
# its kernels (the GIL released), another's runs its host steps. More lanes pay on large GPUs (BENCHMARKS.md);
# each lane holds a chunk's photos and the detector's buffers on the device (a few GB), so smaller GPUs keep 2.
ALIGN_LANES_GPU = 2
ALIGN_LANES_LARGE_GPU = 4
LARGE_GPU_BYTES = 64 * 2 ** 30
# Calls of an aligning actor beside its alignment lanes: one copies its photos into pinned memory, one inverts.
ALIGN_EXTRA_CALLS = 2


def aligning_lanes(align: AlignConfig, device: str, total_memory: int | None = None) -> int:
    """Alignment lanes of an actor on ``device`` that aligns: ``align.device_lanes``, by default
    ALIGN_LANES_LARGE_GPU on a GPU of at least LARGE_GPU_BYTES, ALIGN_LANES_GPU on a smaller one and 1 on a CPU
    (where device work does not overlap). ``total_memory``: the GPU's bytes; None where they are not known (the
    driver, before any actor runs): then the most lanes any GPU gets."""
    if align.device_lanes is not None:
        return int(align.device_lanes)
    if not str(device).startswith("cuda"):
        return 1
    if total_memory is None:
        return ALIGN_LANES_LARGE_GPU
    return ALIGN_LANES_LARGE_GPU if total_memory >= LARGE_GPU_BYTES else ALIGN_LANES_GPU


def aligning_actor_calls(align: AlignConfig) -> int:
    """Calls at once in an actor that aligns photos on its GPU: one per step of Inverter.invert_chunks (the
    photos' host copy into pinned memory, alignment, inversion), alignment taken by as many calls as the actor
    may have lanes (aligning_lanes on a GPU of unknown size: on a smaller GPU the extra calls wait for a lane
    with their photos staged)."""
    return aligning_lanes(align, "cuda") + ALIGN_EXTRA_CALLS


def _gpu_memory(device: str) -> int | None:
    return torch.cuda.get_device_properties(torch.device(device)).total_memory if device.startswith("cuda") else None


class Inverter:
    def __init__(self, checkpoint: str, *, endpoint_url: str | None = None, sha256: str | None = None,
                 precision: str = "auto", device: str = "auto", stages: int | None = None,
                 batch_size: int | str = "auto", num_threads: int | None = None, edit_options: dict | None = None,
                 compile: str | bool = "auto", return_images: bool = True, task: dict | None = None,
                 align: AlignConfig | None = None, landmark_predictor=None):
        """``align``: the alignment settings when photos need alignment (None: the inputs are faces); the
        actor aligns when its backend resolves to torch. ``landmark_predictor``: a ShapePredictor instead of
        dlib's model file (benchmarks). Chunks aligned at once: aligning_lanes."""
        self.init_seconds: dict[str, float] = {}   # what the actor's start took, by step (the run's log says it)
        self.graphed = False                       # inversion replayed as a CUDA graph (E2Style.capture_invert)
        lap = PartClock(self.init_seconds).lap
        self.device = resolve_device(device)
        batch_size = resolve_batch_size(batch_size, self.device)
        use_threads(num_threads)
        on_gpu = self.device.startswith("cuda")
        self.model = load_model(checkpoint, self.device, precision=precision, endpoint_url=endpoint_url, sha256=sha256)
        lap("load")
        self.compiled = on_gpu if compile == "auto" else bool(compile)
        if on_gpu or self.compiled:
            self.model.optimize_for_gpu(channels_last=on_gpu, compile=self.compiled)
        self.return_images = return_images
        self.stages = stages
        if stages is not None and not 1 <= stages <= self.model.num_stages:
            raise ValueError(f"model.stages: must be in 1..{self.model.num_stages} for this checkpoint, got {stages}")
        if self.compiled:
            # Compile now, single-threaded, at the one batch shape the actor will use (batches are padded):
            # the actor runs several calls at once, and two first calls must not both trigger compilation.
            warm = np.zeros((batch_size, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE, 3), np.uint8)
            invert_faces(self.model, warm, stages=stages, batch_size=batch_size, device=self.device,
                         return_images=return_images, pad_batches=True)
            # Each batch's inversion then reaches the GPU as one graph launch: the actor's other calls
            # (alignment's host steps) cannot starve it of kernels (BENCHMARKS.md).
            self.graphed = on_gpu and self.model.capture_invert(batch_size, stages, return_images)
            lap("compile")
        self.batch_size = batch_size
        self.edit_options = edit_options
        self.task = task
        if task is not None:
            check_model(task["name"], self.model.input_nc, self.model.label_nc)
        self.align_backend = (None if align is None or not align.enabled
                              else resolve_align_backend(align.backend, self.device))
        self.aligner = (DeviceAligner.build(align, self.device, predictor=landmark_predictor)
                        if self.align_backend == "torch" else None)
        if self.aligner is not None:
            lap("aligner")
        # An actor that aligns runs several calls at once (staging, alignment, inversion): their faces are
        # inverted together, in full batches, so that no batch is padded while another call's faces are coming.
        # One batch at a time, or two through the CUDA graph: its launch returns at once, and the next batch
        # waits on the GPU while the last one's results come back to the host.
        self._shared = (SharedInversion(self._invert_batch, batch_size, batches_at_once=2 if self.graphed else 1)
                        if self.aligner is not None else None)
        # Alignment lanes: each aligning call takes one for its device work. On a GPU each is a stream of its own,
        # so that its host syncs (detections, crops) wait for its own work only, not for the inversion queued on
        # the default stream nor another lane's. At the highest priority: alignment is a chain of small kernels
        # and host steps, what the actor waits for; inversion's large kernels fill the GPU around it. (None on
        # a CPU: torch.cuda.stream(None) does nothing.)
        self.set_align_lanes(aligning_lanes(align, self.device, _gpu_memory(self.device))
                             if self.aligner is not None else 0)
        if self.aligner is not None and on_gpu:
            # The calls' threads are busy in Python (alignment's host steps, inversion's kernel launches): with
            # the default 5 ms GIL switch interval, each time alignment waits on the GPU it may wait up to 5 ms
            # more for the GIL. (The actor's process does nothing else; BENCHMARKS.md has what was measured.)
            sys.setswitchinterval(ALIGN_GIL_SWITCH_S)

    def info(self) -> dict:
        m = self.model
        return {"n_latent": int(m.n_latent), "num_stages": int(m.num_stages), "input_nc": int(m.input_nc),
                "resolution": int(m.resolution), "style_dim": int(m.decoder.style_dim), "device": self.device,
                "stages": int(self.stages or m.num_stages), "batch_size": self.batch_size,
                "align_backend": self.align_backend, "align_lanes": self.align_lanes,
                "init_seconds": dict(self.init_seconds), "cuda_graph": self.graphed}

    def invert_chunks(self, *chunks: PreparedChunk) -> list[InvertResult | None]:
        """Invert the faces of several chunks (of any shards) as one stream of batches; one result per chunk
        (None: a chunk without faces). Chunks of photos are aligned first, all in one pass; their results
        always come back, carrying the chunk's rows as alignment made them."""
        with self._shared.pending() if self._shared is not None else contextlib.nullcontext() as call:
            aligned = {}
            for k, c in enumerate(chunks):
                if c.photos is not None:
                    if self.aligner is None:
                        raise ValueError("this inversion actor does not align (align.backend resolved to "
                                         f"{self.align_backend!r}), but a chunk of photos came")
                    # Up to align_lanes calls align at once (their photos staged before, outside the lanes);
                    # another call's inversion runs meanwhile, and another's staging.
                    aligned[k] = align_photos(self.aligner, c.photos, c.rows, serial=self._alignment_lane)
            chunk_faces = [aligned[k][1] if k in aligned else c.faces for k, c in enumerate(chunks)]
            sizes = [len(f) for f in chunk_faces]
            faces = [f for f in chunk_faces if len(f)]
            if not faces:
                return [self._aligned_only(aligned[k]) if k in aligned else None for k in range(len(chunks))]
            if len({f.shape[1:] for f in faces}) > 1:
                # Chunks from runs of different align.output_size cannot stack; bring all to the model's size.
                faces = [f if f.shape[1:3] == (MODEL_INPUT_SIZE,) * 2
                         else np.stack([resize_square(x, MODEL_INPUT_SIZE) for x in f]) for f in faces]
            rows = [aligned[k][0] if k in aligned else c.rows for k, c in enumerate(chunks)]
            keys = [r.key for chunk_rows in rows for r in chunk_rows if r.status == "ok"]
            faces = np.concatenate(faces)
            res, edit = call.invert(faces, keys) if call is not None else self._invert_batch(faces, keys)
        out: list[InvertResult | None] = []
        start = 0
        total = max(1, sum(sizes))
        for k, n in enumerate(sizes):
            if n == 0:
                out.append(self._aligned_only(aligned[k]) if k in aligned else None)
                continue
            s = slice(start, start + n)
            r = InvertResult(res.codes[s], res.recon[s], res.mse[s], res.psnr[s], res.stages,
                             res.seconds * n / total, finished_unix=time.time(),
                             edits=None if edit is None else edit.slice(s))
            if k in aligned:
                r.rows, r.faces, r.face_photo, r.align_seconds = aligned[k]
            out.append(r)
            start += n
        return out

    def _invert_batch(self, faces: np.ndarray, keys: list[str]):
        """Faces -> (InvertResult, EditResult or None): the model's inversion in batches, then the edits."""
        res = invert_faces(self.model, faces, stages=self.stages, batch_size=self.batch_size, device=self.device,
                           return_images=self.return_images, pad_batches=self.compiled, task=self.task)
        return res, apply_edit(self.model, res.codes, keys, self.edit_options, self.batch_size)

    def set_align_lanes(self, lanes: int) -> None:
        """``lanes`` alignment lanes from now on (a profile compares counts on one actor, whose start costs a
        compile); call it while no call aligns."""
        on_gpu = self.device.startswith("cuda")
        self.align_lanes = int(lanes)
        self._free_lanes: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.align_lanes):
            self._free_lanes.put(torch.cuda.Stream(device=self.device, priority=-100)  # clamped to the highest
                                 if on_gpu else None)

    @contextlib.contextmanager
    def _alignment_lane(self):
        """Held around a group's alignment on the device: a free lane (waiting for one), its stream current."""
        lane = self._free_lanes.get()
        try:
            with torch.cuda.stream(lane):
                yield
        finally:
            self._free_lanes.put(lane)

    def align_part_seconds(self) -> dict[str, float]:
        """Seconds this actor's alignment spent in each part so far (pipeline.device_align.ALIGN_PARTS);
        empty when it does not align."""
        return dict(self.aligner.part_seconds) if self.aligner is not None else {}

    def _aligned_only(self, aligned) -> InvertResult:
        """The result of a chunk of photos in which no face was found: its rows, nothing inverted."""
        m = self.model
        rows, faces, face_photo, seconds = aligned
        return InvertResult(np.zeros((0, m.n_latent, m.decoder.style_dim), np.float32),
                            np.zeros((0, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE, 3), np.uint8),
                            np.zeros((0,), np.float32), np.zeros((0,), np.float32), int(self.stages or m.num_stages),
                            finished_unix=time.time(), rows=rows, faces=faces, face_photo=face_photo,
                            align_seconds=seconds)
