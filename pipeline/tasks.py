"""The E2Style tasks (used by stage 6, invert): what the encoder sees for each (``task:`` in the config).

Faces arrive as (B, H, W, 3) uint8, are normalised to [-1, 1] on the model's device
(``model.preprocess_uint8``), and ``make_input`` turns them into the task's encoder input at 256x256,
following the official ``configs/transforms_config.py`` where it specifies the input:

==================  ==========  =============================================================================
task                input_nc    encoder input
==================  ==========  =============================================================================
invert              3 (or 1)    the face in [-1, 1] (1-channel models: its luma)
colorize            3 or 1      the face's luma (ITU-R BT.601), repeated to 3 channels for 3-channel models
denoise             3           the face plus Gaussian noise, sigma = 25/255 of the [0, 1] range, clipped
inpaint             3           the face with the centre square (the middle half of each side) set to black
super_resolution    3           the face down-sampled by ``resize_factor`` (bilinear, antialiased), up again
sketch              1           the input's luma in [0, 1] (the official sketch input is not normalised)
segmentation        label_nc    the input is a label map (class id = its first channel's value), one-hot
                                encoded in {0, 1}, resized nearest-neighbour; ids >= label_nc give all-zero
==================  ==========  =============================================================================

Choices where the official code leaves the degradation to its datasets (denoise, inpaint, colorize)
are documented in docs/editing_and_tasks.md. The noise is seeded per face from the face's pixels, so a
rerun gives the same input whatever the batching. The reconstruction metrics compare the output with
the clean face (restoration tasks) and are NaN for sketch and segmentation, which have no target.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F

from .config import TASKS
from .images import MODEL_INPUT_SIZE, luma, resize_to_model_input

__all__ = ["RESTORATION", "check_model", "make_input", "NOISE_SIGMA"]

RESTORATION = ("invert", "colorize", "denoise", "inpaint", "super_resolution")
NOISE_SIGMA = 25.0 / 255.0   # of the [0, 1] range; 2x that in the model's [-1, 1] units
SIZE = MODEL_INPUT_SIZE


def check_model(task: str, input_nc: int, label_nc: int = 0) -> None:
    """Raise ValueError when the checkpoint's input channels do not fit ``task``."""
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}; one of {', '.join(TASKS)}")
    if task == "segmentation":
        if not label_nc or input_nc != label_nc:
            raise ValueError(f"task segmentation needs a checkpoint trained on one-hot label maps "
                             f"(opts.label_nc = input_nc, 19 officially); this one has input_nc={input_nc}, "
                             f"label_nc={label_nc}")
        return
    if label_nc:
        raise ValueError(f"task {task}: the checkpoint takes label maps (label_nc={label_nc}); use task segmentation")
    want = {"sketch": (1,), "invert": (3, 1), "colorize": (3, 1)}.get(task, (3,))
    if input_nc not in want:
        raise ValueError(f"task {task} needs a checkpoint with input_nc {' or '.join(map(str, want))}; "
                         f"this one has input_nc={input_nc}")


def _face_seeds(faces: np.ndarray | None, n: int) -> list[int]:
    if faces is None:
        return list(range(n))
    return [zlib.crc32(np.ascontiguousarray(f).tobytes()) for f in faces[:n]]


def make_input(x: torch.Tensor, task: dict | None, input_nc: int, faces: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: (B, 3, H, W) float in [-1, 1] on the model's device -> (encoder input (B, input_nc, 256, 256),
    target (B, 3, 256, 256) in [-1, 1] or None). ``task``: {"name", "resize_factor", "label_nc"}."""
    name = task["name"] if task else "invert"
    if name == "segmentation":
        label_nc = int(task["label_nc"])
        ids = x[:, 0].add(1).mul(127.5).round().long()                       # (B, H, W) class ids
        if ids.shape[-1] != SIZE or ids.shape[-2] != SIZE:
            ids = F.interpolate(ids[:, None].float(), size=(SIZE, SIZE), mode="nearest")[:, 0].long()
        valid = ids < label_nc
        onehot = F.one_hot(ids.clamp(max=label_nc - 1), label_nc).permute(0, 3, 1, 2).to(x.dtype)
        return onehot * valid[:, None].to(x.dtype), None
    clean = resize_to_model_input(x, SIZE)
    if name == "sketch":
        return luma(clean).add(1).div(2), None
    if name == "invert":
        return (luma(clean) if input_nc == 1 else clean), clean
    if name == "colorize":
        g = luma(clean)
        return (g if input_nc == 1 else g.expand(-1, 3, -1, -1).contiguous()), clean
    if name == "denoise":
        noise = torch.empty_like(clean)
        for i, seed in enumerate(_face_seeds(faces, len(clean))):
            gen = torch.Generator(device="cpu").manual_seed(seed)
            noise[i] = torch.randn(clean.shape[1:], generator=gen).to(clean.device, clean.dtype)
        return (clean + noise * (2 * NOISE_SIGMA)).clamp(-1, 1), clean
    if name == "inpaint":
        out = clean.clone()
        a, b = SIZE // 4, SIZE - SIZE // 4
        out[:, :, a:b, a:b] = -1.0
        return out, clean
    if name == "super_resolution":
        f = int(task["resize_factor"])
        small = max(1, SIZE // f)
        low = F.interpolate(clean, size=(small, small), mode="bilinear", align_corners=False, antialias=True)
        return F.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False), clean
    raise ValueError(f"unknown task {name!r}")
