"""Device helpers shared by the alignment ports: small host arrays uploaded in one copy, photos staged in one
pinned buffer and copied to the device in one transfer."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = ["DEVICE_ALIGNMENT", "aligned", "upload", "upload_many", "StagedPhotos", "stage_photos", "photos_to_device"]

# Bytes: every table upload_many packs, and every level of a detector batch's buffers (batch_plan.py), starts at
# a multiple of this. Triton compiles a kernel once per specialisation of its arguments, among them whether each
# pointer is 16-byte aligned: views at arbitrary offsets would make a new variant (seconds of compilation each,
# the filter kernel's much more) for many of a run's batches.
DEVICE_ALIGNMENT = 16


def aligned(offset: int) -> int:
    """The first multiple of DEVICE_ALIGNMENT at or after ``offset`` (bytes, or elements of a uint8 buffer)."""
    return -(-offset // DEVICE_ALIGNMENT) * DEVICE_ALIGNMENT


def upload(array: np.ndarray, device) -> torch.Tensor:
    """A small host array on ``device`` (upload_many of one)."""
    return upload_many([array], device)[0]


def upload_many(arrays: Sequence[np.ndarray], device) -> list[torch.Tensor]:
    """Small host arrays on ``device`` in one host -> device copy: packed into one buffer (each at a
    DEVICE_ALIGNMENT boundary) and viewed back with their dtypes and shapes. To a CUDA device the buffer is pinned,
    so that the host does not wait for the work already queued on the stream (a pageable copy would); a kernel's
    tables travel together, as each copy costs the host tens of microseconds whatever its size."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    offsets, end = [], 0
    for a in arrays:
        start = aligned(end)
        offsets.append(start)
        end = start + a.nbytes
    on_cuda = torch.device(device).type == "cuda"
    host = torch.empty(max(end, 1), dtype=torch.uint8, pin_memory=on_cuda)  # (packed on CPUs too: one code)
    packed = host.numpy()
    for a, start in zip(arrays, offsets):
        packed[start:start + a.nbytes] = a.reshape(-1).view(np.uint8)
    on_device = host.to(device, non_blocking=True) if on_cuda else host
    return [on_device[start:start + a.nbytes].view(torch.from_numpy(a[:0].reshape(-1)).dtype).view(a.shape)
            for a, start in zip(arrays, offsets)]


@dataclass
class StagedPhotos:
    """Photos ready for their one host -> device copy (stage_photos): the host photos' pixels in ``staging``,
    one flat (P, 3) uint8 buffer (pinned for a CUDA device), photo i from row ``starts[i]``; photos already on
    the device are kept in ``photos`` and copied on the device."""

    photos: list
    staging: torch.Tensor | None
    starts: np.ndarray  # (n + 1,) int64
    sizes: list  # (w, h) of each photo
    on_host: list


def stage_photos(photos: Sequence, device) -> StagedPhotos:
    """The host half of photos_to_device: the host photos copied into one buffer, pinned for a CUDA ``device``
    (on a CPU device, the buffer photos_to_device returns). Needs no device work, so a caller may stage one
    group of photos while another group's device work runs."""
    device = torch.device(device)
    for p in photos:
        if str(p.dtype) not in ("uint8", "torch.uint8") or len(p.shape) != 3 or p.shape[2] != 3:
            raise ValueError(f"expected HxWx3 uint8 photos, got {tuple(p.shape)} {p.dtype}")
    sizes = [(int(p.shape[1]), int(p.shape[0])) for p in photos]
    starts = np.concatenate([[0], np.cumsum([w * h for w, h in sizes])]).astype(np.int64)
    on_host = [not isinstance(p, torch.Tensor) or p.device.type == "cpu" for p in photos]
    staging = None
    if device.type == "cpu" or any(on_host):
        staging = torch.empty((int(starts[-1]), 3), dtype=torch.uint8, pin_memory=device.type == "cuda")
    with warnings.catch_warnings():
        # Read-only arrays (np.asarray of a PIL image, Ray's zero-copy arrays) are only read here.
        warnings.simplefilter("ignore", UserWarning)
        for i, p in enumerate(photos):
            if on_host[i] or device.type == "cpu":
                # torch's copy runs on several threads for large photos, numpy's assignment on one.
                source = p if isinstance(p, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(p))
                staging[int(starts[i]):int(starts[i + 1])].copy_(source.reshape(-1, 3))
    return StagedPhotos(list(photos), staging, starts, sizes, on_host)


def photos_to_device(photos: Sequence | StagedPhotos, device) -> tuple[torch.Tensor, list[int], list[tuple[int, int]]]:
    """All photos (or photos stage_photos staged for ``device``) in one flat (P, 3) uint8 tensor on ``device``:
    (buffer, start row of each photo, (w, h) of each). Host photos travel as uint8 in one copy from pinned
    memory to a CUDA device."""
    device = torch.device(device)
    staged = photos if isinstance(photos, StagedPhotos) else stage_photos(photos, device)
    starts = staged.starts
    if device.type == "cpu":
        return staged.staging, [int(s) for s in starts[:-1]], staged.sizes
    buffer = torch.empty((int(starts[-1]), 3), dtype=torch.uint8, device=device)
    if staged.staging is not None:
        # One transfer for all host photos; device photos' rows are written after it, in stream order.
        buffer.copy_(staged.staging, non_blocking=True)
    for i, p in enumerate(staged.photos):
        if not staged.on_host[i]:
            buffer[int(starts[i]):int(starts[i + 1])].copy_(p.reshape(-1, 3))
    return buffer, [int(s) for s in starts[:-1]], staged.sizes
