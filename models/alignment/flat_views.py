"""Images that are views of one flat pixel buffer, recognised as such: the alignment steps after detection (the
predictor, the upright regions, the FFHQ crop) read a chunk's photos where the upload left them, one (P, 3)
uint8 buffer on the device, instead of copying every photo into a buffer of their own.

    found = shared_flat(images)   # (flat (P, 3) uint8, first pixel row of each image, (w, h) of each) or None
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["shared_flat", "views_of"]


def shared_flat(images: Sequence) -> tuple[torch.Tensor, list[int], list[tuple[int, int]]] | None:
    """When every image is a contiguous (H, W, 3) uint8 tensor over one storage, at a whole pixel of it: the
    storage as one flat (P, 3) uint8 tensor, each image's first pixel row in it and its (w, h). None otherwise
    (numpy arrays, tensors of several storages or devices): the caller copies them into a buffer of their own."""
    if not images or not all(isinstance(t, torch.Tensor) for t in images):
        return None
    first = images[0]
    storage = first.untyped_storage()
    for t in images:
        if (t.dtype != torch.uint8 or t.ndim != 3 or t.shape[2] != 3 or not t.is_contiguous()
                or t.device != first.device or t.untyped_storage().data_ptr() != storage.data_ptr()
                or t.storage_offset() % 3):
            return None
    flat = first.as_strided((storage.nbytes() // 3, 3), (3, 1), 0)
    return (flat, [t.storage_offset() // 3 for t in images],
            [(int(t.shape[1]), int(t.shape[0])) for t in images])


def views_of(flat: torch.Tensor, starts: Sequence[int], sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """The (h, w, 3) views of a flat (P, 3) buffer at ``starts`` with (w, h) ``sizes``: images shared_flat
    recognises."""
    return [flat[s:s + w * h].view(h, w, 3) for s, (w, h) in zip(starts, sizes)]
