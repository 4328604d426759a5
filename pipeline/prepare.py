"""Stage 5, prepare: the CPU side of a shard before inversion, read -> decode -> align, cut into chunks and
streamed with a small header each (``prepare_shard``, the prepare task's body).

A chunk carries the rows of up to ``chunk_size`` inputs (one row per input, or per face with
``align.policy: all``) and the stacked aligned faces of its ``ok``-so-far rows. Chunks are what travels
from CPU workers to the inversion actors, so a shard of 1000 images never sits in memory whole and the
GPU starts on a shard's first chunk while its last ones are still being aligned.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Iterator

import numpy as np

from .align import align_faces, face_rows, get_aligner
from .config import PrepareConfig
from .decode import DecodeError, decode_image
from .images import resize_nearest, resize_square
from .read import InputItem, Shard, read_shard
from .records import ALIGN_PENDING, PreparedChunk, Row
from .storage import get_fs

__all__ = ["prepare_item", "prepare_photo", "prepare_chunks", "prepare_shard", "ChunkHeader", "lower_priority"]


def prepare_item(item: InputItem, cfg: PrepareConfig, timings: dict[str, float]) -> list[tuple[Row, np.ndarray | None]]:
    """One input -> its rows (and aligned face per ok row). Never raises for bad data. With
    ``align.backend: torch`` (as the driver resolved it) a decodable input is one ``ALIGN_PENDING`` row with
    its decoded photo: the inversion actor aligns it (pipeline.device_align)."""
    if item.status is not None:
        return [(Row(item.key, item.source, status=item.status, error=item.error, meta=item.meta), None)]
    t0 = time.perf_counter()
    try:
        img = decode_image(item.data, max_pixels=cfg.input.max_pixels)
    except DecodeError as e:
        return [(Row(item.key, item.source, status=e.status, error=e.message, meta=item.meta), None)]
    finally:
        timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t0
    return prepare_photo(Row(item.key, item.source, meta=item.meta), img, cfg, timings)


def prepare_photo(row: Row, img: np.ndarray, cfg: PrepareConfig, timings: dict[str, float]
                  ) -> list[tuple[Row, np.ndarray | None]]:
    """A decoded photo (HxWx3 uint8) of the input ``row`` -> its rows (and aligned face per ok row): aligned
    (dlib), handed on for the actor to align (``ALIGN_PENDING``, backend torch), or resized when alignment is
    off. Never raises for bad data: a photo alignment fails on is an ``align_error`` row."""
    t1 = time.perf_counter()
    al = cfg.align
    try:
        if not al.enabled:
            if cfg.task == "segmentation":  # label maps: class ids must not be interpolated
                return [(row, resize_nearest(img, al.output_size))]
            return [(row, resize_square(img, al.output_size))]
        if al.backend == "torch":  # the inversion actor aligns: hand it the decoded photo
            return [(dataclasses.replace(row, status=ALIGN_PENDING), img)]
        # dlib's models load on first use, once per worker process
        aligner = get_aligner(detect_max_side=al.detect_max_side, max_upsample=al.max_upsample,
                              upsample_max_side=al.upsample_max_side)
        faces = align_faces(img, output_size=al.output_size, transform_size=al.transform_size,
                            policy=al.policy, min_face_size=al.min_face_size, aligner=aligner)
    except Exception as e:  # noqa: BLE001 - a pathological image must cost one row, not the shard
        return [(dataclasses.replace(row, status="align_error", error=f"{type(e).__name__}: {e}"), None)]
    finally:
        timings["align"] = timings.get("align", 0.0) + time.perf_counter() - t1
    return face_rows(row, faces)


def prepare_chunks(fs, shard: Shard, cfg: PrepareConfig) -> Iterator[PreparedChunk]:
    chunk_size = cfg.chunk_size
    size = cfg.align.output_size
    rows: list[Row] = []
    faces: list[np.ndarray] = []
    photos: list[np.ndarray] = []   # decoded photos of ALIGN_PENDING rows (the actor aligns them)
    timings: dict[str, float] = {}
    n_inputs = 0
    index = 0
    seen: dict[str, int] = {}
    paste = cfg.keep_originals
    originals: list[bytes] = []
    actor_aligns = cfg.align.enabled and cfg.align.backend == "torch"

    def emit() -> PreparedChunk:
        arr = np.stack(faces) if faces else np.zeros((0, size, size, 3), np.uint8)
        return PreparedChunk(shard.name, index, list(rows), arr, dict(timings), n_inputs,
                             list(originals) if paste else None, list(photos) if actor_aligns else None)

    it = read_shard(fs, shard, image_column=cfg.input.image_column, key_column=cfg.input.key_column)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            break
        finally:
            timings["read"] = timings.get("read", 0.0) + time.perf_counter() - t0
        # Keys must be unique per row within the output; an input with a duplicate key (a.jpg + a.png,
        # or a tar with two samples of one key) gets a numbered suffix instead of a silent collision.
        if item.key in seen:
            seen[item.key] += 1
            item.key = f"{item.key}_dup{seen[item.key]}"
        else:
            seen[item.key] = 0
        n_inputs += 1
        for row, image in prepare_item(item, cfg, timings):
            rows.append(row)
            if image is not None:
                (photos if row.status == ALIGN_PENDING else faces).append(image)
                if paste:
                    originals.append(item.data)
        if n_inputs % chunk_size == 0:
            yield emit()
            index += 1
            rows, faces, photos, timings, n_inputs, originals = [], [], [], {}, 0, []
    if rows or index == 0:
        yield emit()


class ChunkHeader(tuple):
    """(n_faces, n_rows, n_inputs): what the driver needs to batch a chunk without fetching its pixels. With
    align.backend torch, n_faces counts the chunk's photos (the actor aligns them): batches count photos."""


def prepare_shard(shard: Shard, cfg: PrepareConfig) -> Iterator:
    """One shard's CPU work before inversion, streamed: a ChunkHeader then the PreparedChunk, for each chunk
    (the prepare task of workers/cpu_worker.py)."""
    if cfg.align.enabled and cfg.align.backend == "torch":
        # The actors align: on a node they share, their host steps come first (ray.cpu_task_niceness).
        lower_priority(cfg.niceness)
    fs, _ = get_fs(cfg.input.url, cfg.endpoint_url)
    for chunk in prepare_chunks(fs, shard, cfg):
        yield ChunkHeader((chunk.n_faces + chunk.n_photos, len(chunk.rows), chunk.n_inputs))
        yield chunk


def lower_priority(niceness: int) -> None:
    """Raise this process's niceness to ``niceness``. Never lowers it (that needs privileges): a Ray worker
    process keeps it for the later tasks it runs, all of them throughput work."""
    current = os.nice(0)
    if niceness > current:
        os.nice(niceness - current)
