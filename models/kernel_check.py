"""The one way a port trusts its Triton kernels: a group of kernels is run against its torch reference on probe
inputs once per device and process, and used only where the two agree bit for bit.

Every port (the detector's resize, fHOG and filter groups, the landmark kernels, Pillow's QUAD transform) keeps
its torch path as the reference and exposes ``use_triton``: None picks the kernels on CUDA when their group
passed its check there (a disagreement or a failure to compile warns, naming the group and the device, and the
torch path serves); True forces the kernels (tests, and Triton's interpreter on CPU tensors); False forces the
torch path. The probes are public functions of each port (``check_*_kernels``), so CI runs the same comparisons
under the interpreter (tests/helpers/triton_interpreter_checks.py).
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Hashable

import torch

try:  # Triton kernels for the hot loops on CUDA (optional: the torch paths are the references)
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None
    tl = None

__all__ = ["triton", "tl", "kernels_runnable", "use_kernels", "KernelCheck"]

# A probe returns None when the kernels equal the torch path on it, else what differs.
KernelCheck = Callable[[torch.device], "str | None"]

_verdicts: dict[tuple, bool] = {}
_lock = threading.Lock()


def kernels_runnable(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device``: a CUDA device with triton installed, or CPU tensors under
    Triton's interpreter (TRITON_INTERPRET=1, chosen before triton is imported)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def use_kernels(group: str, device, use_triton: bool | None, check: KernelCheck, variant: Hashable = None) -> bool:
    """Whether ``group``'s kernels serve on ``device``.

    ``use_triton`` None: on CUDA, when ``check(device)`` passed (run once per (group, variant, device) and
    process; ``variant`` names what the kernels are specialised on, e.g. a model's tree shape); elsewhere the
    torch path. True: the kernels, unchecked (ValueError where they cannot run). False: the torch path."""
    device = torch.device(device)
    if use_triton is False:
        return False
    if use_triton:
        if not kernels_runnable(device):
            raise ValueError(f"use_triton needs a CUDA device (or Triton's interpreter, TRITON_INTERPRET=1) and "
                             f"the triton package; got device {device}, triton "
                             f"{'installed' if triton is not None else 'not installed'}")
        return True
    if device.type != "cuda" or triton is None:
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (group, variant, str(device))
    with _lock:
        if key not in _verdicts:
            try:
                problem = check(device)
            except Exception as e:  # noqa: BLE001 - a compile or launch failure means: use torch
                problem = f"{type(e).__name__}: {e}"
            if problem is not None:
                warnings.warn(f"Triton {group} kernels disagree with the torch path on {device} ({problem}); "
                              "using the torch path for them", RuntimeWarning, stacklevel=3)
            _verdicts[key] = problem is None
        return _verdicts[key]
