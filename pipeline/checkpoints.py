"""Checkpoint files: a local path for any URL (cached by sha256), the file's sha256, the shapes a checkpoint
implies (read from its tensors, no network built), and how a process runs a model: its device, precision,
batch size and threads (one rule each, for the inversion actor, the latents actor and training), and the
model loaded by those rules. Imports no stage."""
from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
import torch

from models.checkpoint import load_e2style, read_checkpoint
from models.e2style import E2Style
from models.factory import write_checkpoint
from models.stylegan2 import generator_config_from_state_dict

from .config import MAX_GPU_BATCH_SIZE
from .config_files import ConfigError
from .storage import get_fs, is_local

__all__ = ["resolve_device", "resolve_precision", "use_threads", "load_model", "resolve_batch_size", "file_sha256",
           "checkpoint_sha256", "fetch_checkpoint", "factory_checkpoint",
           "checkpoint_dims"]


def resolve_device(device: str = "auto") -> str:
    """``device`` as torch names it: "auto" is the GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# model.precision "auto" on a GPU: fp16 autocast, the fastest setting within the accuracy bar (a batch whose fp16
# result overflows is recomputed in bf16: models.E2Style.invert; BENCHMARKS.md has its error against float32).
AUTO_GPU_PRECISION = "fp16"


def resolve_precision(precision: str, device: str, gpu_auto: str = AUTO_GPU_PRECISION) -> str:
    """``precision`` for a model on ``device``: "auto" is ``gpu_auto`` on a GPU and fp32 elsewhere (on CPUs
    reduced-precision autocast is slower than float32); any other value as given. Inference uses the default
    ``gpu_auto``; a caller with another GPU choice (training's bf16) passes its own."""
    if precision != "auto":
        return precision
    return gpu_auto if str(device).startswith("cuda") else "fp32"


def use_threads(num_threads: int | None) -> None:
    """torch's intra-op threads in this process: ``num_threads`` when given, else the process's CPU share as Ray
    sets it (OMP_NUM_THREADS: a task's or actor's CPUs), else torch's own default. On a GPU actor the pool serves
    host copies (the pinned staging of photos to align)."""
    if num_threads:
        torch.set_num_threads(int(num_threads))
    elif os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))


def load_model(checkpoint: str, device: str, *, precision: str = "auto", endpoint_url: str | None = None,
               sha256: str | None = None) -> E2Style:
    """The E2Style checkpoint at ``checkpoint`` (any URL, fetch_checkpoint) on ``device`` (resolved), at
    ``precision`` (resolve_precision), in eval mode."""
    path = fetch_checkpoint(checkpoint, endpoint_url, sha256)
    return load_e2style(path, device=device, precision=resolve_precision(precision, device))


# model.batch_size "auto": the fastest measured setting per device (BENCHMARKS.md; on CPUs larger batches gain
# nothing and hold more memory).
AUTO_BATCH_SIZE = {"cuda": 64, "cpu": 16}


def resolve_batch_size(batch_size: int | str, device: str) -> int:
    on_gpu = device.startswith("cuda")
    if batch_size == "auto":
        return AUTO_BATCH_SIZE["cuda" if on_gpu else "cpu"]
    if on_gpu and int(batch_size) > MAX_GPU_BATCH_SIZE:  # workers built without a pipeline config too
        raise ValueError(f"model.batch_size: at most {MAX_GPU_BATCH_SIZE} on a GPU (the largest batch checked "
                         f"against the official model there), got {batch_size}")
    return int(batch_size)


def file_sha256(fs, path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def checkpoint_sha256(url: str, endpoint_url: str | None = None) -> str:
    """sha256 of the checkpoint at ``url`` (model.checkpoint); a missing file or bad factory spec is a
    ConfigError naming that key."""
    if url.startswith("factory:"):
        try:
            url = factory_checkpoint(url)
        except ValueError as e:
            raise ConfigError("model.checkpoint", str(e).split(": ", 1)[-1]) from None
    fs, path = get_fs(url, endpoint_url)
    try:
        return file_sha256(fs, path)
    except FileNotFoundError:
        raise ConfigError("model.checkpoint", f"file not found: {url}") from None


def fetch_checkpoint(url: str, endpoint_url: str | None = None, sha256: str | None = None,
                     cache_dir: str | None = None) -> str:
    """A local path for ``url``: itself when local, else a cached download named by its sha256 (so a
    checkpoint replaced at the same URL is never served stale from the cache)."""
    if url.startswith("factory:"):
        return factory_checkpoint(url, cache_dir)
    fs, path = get_fs(url, endpoint_url)
    if is_local(fs):
        return path
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "e2style_checkpoints")
    os.makedirs(cache_dir, exist_ok=True)
    tag = sha256 or hashlib.sha1(url.encode()).hexdigest()
    local = os.path.join(cache_dir, tag[:24] + "_" + os.path.basename(path))
    if not os.path.exists(local):
        tmp = local + f".{os.getpid()}.part"
        fs.get_file(path, tmp)
        os.replace(tmp, local)  # concurrent actors on one node: the last rename wins, both are whole
    return local


def factory_checkpoint(url: str, cache_dir: str | None = None) -> str:
    """``factory:resolution=64,stages=2,seed=0``: a small random checkpoint from ``models.factory``, written
    once to a local cache. It makes the demo run on a fresh clone with no download; its outputs are
    noise-like reconstructions, which is all a random model can give."""
    params = {"resolution": 64, "stages": 2, "seed": 0}
    body = url[len("factory:"):].strip()
    for part in filter(None, (p.strip() for p in body.split(","))):
        k, _, v = part.partition("=")
        if k not in params or not v.strip().isdigit():
            raise ValueError(f"model.checkpoint: bad factory spec {url!r}; expected factory:resolution=64,stages=2,seed=0")
        params[k] = int(v)
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "e2style_checkpoints")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, "factory_r{resolution}_s{stages}_seed{seed}.pt".format(**params))
    if not os.path.exists(path):
        write_checkpoint(path, **params)
    return path


def checkpoint_dims(path: str) -> dict[str, int]:
    """n_latent, style_dim, input_nc, label_nc, num_stages of an E2Style checkpoint, from its tensors' shapes
    only (memory-mapped: no network is built, a 1.2 GB official file costs milliseconds). Reading it is also
    the safety check: a file that would run code when unpickled is refused (models.checkpoint)."""
    ckpt = read_checkpoint(path)
    sd = ckpt.get("state_dict") or {}
    g = generator_config_from_state_dict(sd, "decoder.")
    n_latent = int(np.log2(g["size"])) * 2 - 2
    w = sd.get("encoder_firststage.input_layer.0.weight")
    input_nc = int(w.shape[1]) if w is not None else 3
    opts = ckpt.get("opts") or {}
    refine = {k.split(".")[1] for k in sd if k.startswith("encoder_refinestage_list.")}
    return {"n_latent": n_latent, "style_dim": int(g["style_dim"]), "input_nc": input_nc,
            "label_nc": int(opts.get("label_nc") or 0), "num_stages": 1 + len(refine)}
