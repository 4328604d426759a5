"""Stage 6, invert: aligned uint8 faces -> W+ codes, reconstructions and reconstruction metrics.

Plain functions over a loaded model; ``pipeline/inverter.py`` (the actor's logic) holds the model and calls them.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from .images import MODEL_INPUT_SIZE, luma, resize_to_model_input, to_uint8
from .records import EditResult, EditVariant, InvertResult
from .tasks import make_input

__all__ = ["recon_metrics", "invert_faces", "SharedInversion"]


def recon_metrics(recon: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-image MSE and PSNR on a [0, 1] scale; inputs (N, 3, 256, 256) in [-1, 1]."""
    r = recon.detach().float().clamp(-1, 1).add(1).div(2)
    t = target.detach().float().to(r.device)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    t = t.clamp(-1, 1).add(1).div(2)
    mse = (r - t).pow(2).flatten(1).mean(1)
    psnr = 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return mse.cpu().numpy().astype(np.float32), psnr.cpu().numpy().astype(np.float32)


def _prepare_batch(model, faces: np.ndarray, pad_to: int | None, pin: bool, task: dict | None = None):
    """uint8 faces -> (model input, target of the reconstruction metrics) on the model's device. The bytes
    travel as uint8 (pinned, non-blocking: a quarter of a float32 copy) and are normalised, resized and
    (for 1-channel models) greyed there. ``task``: the E2Style task's input (pipeline.tasks)."""
    if pad_to and len(faces) < pad_to:
        # Compiled models are specialised to one batch shape: pad the last batch instead of recompiling.
        faces = np.concatenate([faces, np.zeros((pad_to - len(faces),) + faces.shape[1:], faces.dtype)])
    u8 = torch.from_numpy(np.ascontiguousarray(faces))
    if pin:
        u8 = u8.pin_memory()
    x = model.preprocess_uint8(u8)
    if task is not None:
        return make_input(x, task, model.input_nc, faces)
    x = resize_to_model_input(x)
    if model.input_nc == 1:
        x = luma(x)
    return x, x


@torch.inference_mode()
def invert_faces(model, faces: np.ndarray, *, stages: int | None = None, batch_size: int = 16,
                 device: str = "cpu", return_images: bool = True, pad_batches: bool = False,
                 task: dict | None = None) -> InvertResult:
    """Invert (N, H, W, 3) uint8 aligned faces in mini-batches of ``batch_size``.

    ``return_images=False`` is the latents-only mode: the last stage's generator pass is skipped, and
    ``recon``/``mse``/``psnr`` are empty/NaN. ``pad_batches`` keeps every batch at ``batch_size``."""
    n = len(faces)
    n_stages = model.num_stages if stages is None else int(stages)
    empty = np.zeros((0, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE, 3), np.uint8)
    if n == 0:
        return InvertResult(np.zeros((0, model.n_latent, model.decoder.style_dim), np.float32), empty,
                            np.zeros((0,), np.float32), np.zeros((0,), np.float32), n_stages)
    t0 = time.perf_counter()
    pin = str(device).startswith("cuda")
    codes, recons, mses, psnrs = [], [], [], []
    for i in range(0, n, batch_size):
        real = min(batch_size, n - i)
        x, target = _prepare_batch(model, faces[i:i + batch_size], batch_size if pad_batches else None, pin, task)
        out = model.invert(x, stages=stages, return_images=return_images)
        codes.append(out.codes[:real].float().cpu().numpy())
        if return_images:
            images = out.images[:real]
            if target is None:  # sketch / segmentation: no image to compare with
                mse = psnr = np.full((real,), np.nan, np.float32)
            else:
                mse, psnr = recon_metrics(images, target[:real])
            recons.append(to_uint8(images))
            mses.append(mse)
            psnrs.append(psnr)
    if not return_images:
        nan = np.full((n,), np.nan, np.float32)
        return InvertResult(np.concatenate(codes), empty, nan, nan.copy(), n_stages, time.perf_counter() - t0)
    return InvertResult(np.concatenate(codes).astype(np.float32, copy=False), np.concatenate(recons),
                        np.concatenate(mses), np.concatenate(psnrs), n_stages, time.perf_counter() - t0)


# -- one actor's calls inverted together -------------------------------------------------------------------

# What SharedInversion runs on a batch of faces and their keys: the inversion and the edit variants (or None).
BatchInverter = Callable[[np.ndarray, list], "tuple[InvertResult, EditResult | None]"]


@dataclass
class _Claim:
    """One call's faces in SharedInversion: the pieces of batches inverted so far, by start index."""
    faces: np.ndarray
    keys: list
    taken: int = 0                                   # faces handed to a batch so far
    parts: list = field(default_factory=list)        # (start, InvertResult, EditResult | None)
    finished: int = 0                                # faces whose results came back
    error: BaseException | None = None


class SharedInversion:
    """The faces of an actor's calls that run at once, inverted together in full batches of ``batch_size``
    (one batch at a time), each call getting back the results of its own faces, in order.

    An aligning actor's calls bring as many faces as their photos have (about 58 per 64 photos), and a batch
    padded to the compiled size costs a full batch: sharing batches across calls saves that. Each call runs
    inside ``pending()`` (its alignment), then brings its faces (``call.invert``); a batch short of
    ``batch_size`` runs only when no call inside pending() is still to bring any, so the last faces of a run
    never wait for ever. A waiting call whose faces are queued runs the next batch, for all of them, when the
    device is free (``batches_at_once`` batches may run together: 2 where a batch's launch returns at once, a
    CUDA graph, so that the next batch is queued on the GPU while the last one's results travel back); an
    error in a batch is raised in every call that had faces in it.

        with shared.pending() as call:
            faces = align(...)
            result, edits = call.invert(faces, keys)
    """

    def __init__(self, invert_batch: BatchInverter, batch_size: int, batches_at_once: int = 1):
        self._invert_batch = invert_batch
        self.batch_size = int(batch_size)
        self.batches_at_once = int(batches_at_once)
        self._cond = threading.Condition()
        self._claims: list[_Claim] = []              # claims with faces not yet taken, in arrival order
        self._queued = 0                             # faces of those claims not yet taken
        self._announced = 0                          # calls in pending() that have not brought their faces
        self._running = 0                            # batches being inverted

    @contextlib.contextmanager
    def pending(self) -> Iterator["_Call"]:
        """Around the work of a call that will bring faces (its alignment): batches short of full wait for it
        until it brings them (``call.invert``) or leaves."""
        call = _Call(self)
        with self._cond:
            self._announced += 1
        try:
            yield call
        finally:
            with self._cond:
                if not call.brought:
                    self._announced -= 1
                    self._cond.notify_all()

    def _invert(self, call: "_Call", faces: np.ndarray, keys: list) -> tuple[InvertResult, EditResult | None]:
        if call.brought:
            raise RuntimeError("a call brings its faces once")
        if not len(faces):
            raise ValueError("SharedInversion: a call brings at least one face")
        claim = _Claim(faces, list(keys))
        with self._cond:
            call.brought = True
            self._announced -= 1
            self._claims.append(claim)
            self._queued += len(faces)
            self._cond.notify_all()
        while True:
            with self._cond:
                while not (claim.finished == len(faces) or claim.error is not None or self._may_run(claim)):
                    self._cond.wait()
                if claim.finished == len(faces) or claim.error is not None:
                    break
                batch = self._take()
                self._running += 1
            try:
                result: tuple | BaseException = self._invert_batch(
                    np.concatenate([c.faces[a:a + n] for c, a, n in batch]),
                    [k for c, a, n in batch for k in c.keys[a:a + n]])
            except BaseException as e:  # noqa: BLE001 - raised in each call of the batch
                result = e
            with self._cond:
                self._deliver(batch, result)
                self._running -= 1
                self._cond.notify_all()
        if claim.error is not None:
            raise claim.error
        return _assemble(claim)

    def _may_run(self, claim: _Claim) -> bool:
        """Whether the waiting owner of ``claim`` runs the next batch now: room for a batch on the device, some of
        its own faces still queued (otherwise another owner runs it), and a full batch or no other call still to
        bring faces."""
        return (self._running < self.batches_at_once and claim.taken < len(claim.faces)
                and (self._queued >= self.batch_size or self._announced == 0))

    def _take(self) -> list[tuple[_Claim, int, int]]:
        batch, room = [], self.batch_size
        while room and self._claims:
            c = self._claims[0]
            n = min(room, len(c.faces) - c.taken)
            batch.append((c, c.taken, n))
            c.taken += n
            room -= n
            self._queued -= n
            if c.taken == len(c.faces):
                self._claims.pop(0)
        return batch

    def _deliver(self, batch, result) -> None:
        start = 0
        for c, a, n in batch:
            if isinstance(result, BaseException):
                c.error = result
            else:
                res, edit = result
                s = slice(start, start + n)
                total = max(1, len(res.codes))
                c.parts.append((a, InvertResult(res.codes[s], res.recon[s], res.mse[s], res.psnr[s], res.stages,
                                                res.seconds * n / total),
                                None if edit is None else edit.slice(s)))
                c.finished += n
            start += n


class _Call:
    """A call inside SharedInversion.pending(): ``invert(faces, keys)`` once, with its faces."""

    def __init__(self, shared: SharedInversion):
        self._shared = shared
        self.brought = False

    def invert(self, faces: np.ndarray, keys: list) -> tuple[InvertResult, EditResult | None]:
        """The results of ``faces`` (N, H, W, 3) uint8, N >= 1 (and their ``keys``), in order, once every batch
        holding them ran."""
        return self._shared._invert(self, faces, keys)


def _assemble(claim: _Claim) -> tuple[InvertResult, EditResult | None]:
    """A claim's pieces, in the order of its faces, as one result."""
    parts = sorted(claim.parts, key=lambda p: p[0])
    results = [r for _, r, _ in parts]
    first = results[0]
    res = InvertResult(np.concatenate([r.codes for r in results]), np.concatenate([r.recon for r in results]),
                       np.concatenate([r.mse for r in results]), np.concatenate([r.psnr for r in results]),
                       first.stages, sum(r.seconds for r in results))
    edits = [e for _, _, e in parts]
    if edits[0] is None:
        return res, None
    variants = [EditVariant(v.tag, np.concatenate([e.variants[k].codes for e in edits]),
                            None if v.images is None else np.concatenate([e.variants[k].images for e in edits]))
                for k, v in enumerate(edits[0].variants)]
    return res, EditResult(variants, edits[0].save_codes, sum(e.seconds for e in edits))
