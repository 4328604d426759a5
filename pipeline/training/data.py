"""Training data: (w, G(w)) pairs sampled from the generator (``synthetic``), or aligned faces read with the
pipeline's readers (``images``: folders, WebDataset tars, Parquet; local or S3) at the encoders' 256 px.

Everything is deterministic given the seed, the stage, the step and the rank, so a resumed run sees the same
batches as an uninterrupted one, and each DDP rank sees its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterator

import torch

from models.e2style import face_pool

from ..decode import decode_image
from ..images import to_model_input
from ..read import plan_shards, read_shard
from ..storage import get_fs
from .config import DataConfig, TrainConfig


def stream_seed(*parts) -> int:
    """A 63-bit seed named by its parts (seed, purpose, stage, step, rank): independent streams per name."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def seeded_generator(*parts) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(stream_seed(*parts))


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@torch.no_grad()
def synthetic_batch(G, latent_avg_w: torch.Tensor | None, n: int, gen: torch.Generator, truncation: float = 1.0,
                    quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, w): x = pool256(G.synthesis(w)) in [-1, 1] with the stored noise, w = mapping(z) (B, style_dim)."""
    dev = next(G.parameters()).device
    z = torch.randn(n, G.style_dim, generator=gen).to(dev)
    w = G.mapping(z)
    if truncation != 1.0 and latent_avg_w is not None:
        w = latent_avg_w.to(w) + truncation * (w - latent_avg_w.to(w))
    x = face_pool(G.synthesis(w, randomize_noise=False)).float()
    return (_quantize(x) if quantize else x), w


def _image_shards(d: DataConfig):
    """(fs, shards) of ``d.url`` via the pipeline's planner."""
    fs, root = get_fs(d.url, d.endpoint_url)
    _, shards = plan_shards(fs, root, d.format, d.shard_size)
    if not shards:
        raise FileNotFoundError(f"data.url: {d.url}: no input shards found")
    return fs, shards


def decode_to_tensor(data: bytes) -> torch.Tensor:
    """Image bytes -> (3, 256, 256) float32 in [-1, 1], as the inversion pipeline feeds the encoders."""
    return to_model_input(decode_image(data)[None])[0]


def _try_decode(data: bytes) -> torch.Tensor | None:
    try:
        return decode_to_tensor(data)
    except Exception:  # noqa: BLE001 - a bad file costs its batch one slot, training goes on
        return None


def _iter_raw(fs, shards, rank: int, world: int, order: list[int], exclude: set[str]) -> Iterator[tuple[str, bytes]]:
    """This rank's (source, bytes): whole shards per rank when there are enough, else every world-th item."""
    if len(shards) >= world:
        mine = [shards[i] for i in order[rank::world]]
        by_item = False
    else:
        mine, by_item = [shards[i] for i in order], True
    idx = 0
    for shard in mine:
        for item in read_shard(fs, shard):
            if item.data is None or item.source in exclude:
                continue
            if by_item:
                idx += 1
                if (idx - 1) % world != rank:
                    continue
            yield item.source, item.data


def load_image_set(d: DataConfig, url: str | None, count: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``count`` decodable images of ``url`` (or of data.url) in planned order: the held-out set."""
    sub = dataclasses.replace(d, url=url) if url else d
    fs, shards = _image_shards(sub)
    xs, sources = [], []
    for source, data in _iter_raw(fs, shards, 0, 1, list(range(len(shards))), set()):
        x = _try_decode(data)
        if x is None:
            continue
        xs.append(x)
        sources.append(source)
        if len(xs) >= count:
            break
    if not xs:
        raise FileNotFoundError(f"no decodable images for the validation set in {sub.url}")
    return torch.stack(xs), sources


def image_batches(d: DataConfig, rank: int, world: int, batch_size: int, seed: int, exclude: set[str],
                  skip_batches: int = 0) -> Iterator[torch.Tensor]:
    """Endless shuffled batches (B, 3, 256, 256) in [-1, 1] for this rank. Deterministic given (seed, rank,
    world), so a resumed run skips ``skip_batches`` batches (without decoding them) and continues in place.
    Batches are formed before decoding: an undecodable file makes its batch one smaller."""
    fs, shards = _image_shards(d)
    buf_size = d.shuffle_buffer
    formed = 0
    epoch = 0
    while True:
        order = torch.randperm(len(shards), generator=seeded_generator(seed, "shards", epoch)).tolist()
        g = seeded_generator(seed, "buffer", epoch, rank)
        buf: list[tuple[str, bytes]] = []
        batch: list[bytes] = []
        got_any = False

        def emit_one():
            """Move a random buffered item into the batch; yield the batch when full (decoded unless skipped)."""
            nonlocal formed
            batch.append(buf.pop(int(torch.randint(len(buf), (1,), generator=g)))[1])
            while len(batch) >= batch_size:
                raw, batch[:] = batch[:batch_size], batch[batch_size:]
                if formed >= skip_batches:
                    xs = [t for t in (_try_decode(b) for b in raw) if t is not None]
                    if xs:
                        yield torch.stack(xs)
                formed += 1

        for item in _iter_raw(fs, shards, rank, world, order, exclude):
            got_any = True
            buf.append(item)
            if len(buf) >= buf_size:
                yield from emit_one()
        while buf:
            yield from emit_one()
        if not got_any:
            raise FileNotFoundError(f"data.url: {d.url}: no training images for worker {rank} of {world} "
                                    f"(after holding out {len(exclude)} for validation)")
        epoch += 1


def held_out_set(cfg: TrainConfig, G, avg_w: torch.Tensor | None, rank: int) -> tuple[torch.Tensor | None, torch.Tensor | None, set[str]]:
    """(x, true w or None, sources to keep out of training). Only rank 0 validates, so other ranks get x = None;
    with images and no ``data.val_url`` every rank still reads the held-out sources, to skip them."""
    d, seed = cfg.data, cfg.train.seed
    if d.mode == "synthetic":
        if rank != 0:
            return None, None, set()
        xs, ws = [], []
        g = seeded_generator(seed, "val")
        for i in range(0, d.val_count, d.val_batch_size):
            x, w = synthetic_batch(G, avg_w, min(d.val_batch_size, d.val_count - i), g, d.truncation, d.quantize)
            xs.append(x.cpu())
            ws.append(w.cpu())
        return torch.cat(xs), torch.cat(ws), set()
    vx, sources = load_image_set(d, d.val_url, d.val_count)
    return (vx if rank == 0 else None), None, (set() if d.val_url else set(sources))


def training_batches(cfg: TrainConfig, k: int, G, avg_w: torch.Tensor | None, start_step: int, rank: int, world: int,
                     exclude: set[str], device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Stage k's endless (x, true w or None) batches for this rank, from ``start_step`` on."""
    d, seed, bs = cfg.data, cfg.train.seed, cfg.train.batch_size
    if d.mode == "synthetic":
        step = start_step
        while True:
            yield synthetic_batch(G, avg_w, bs, seeded_generator(seed, "train", k, step, rank), d.truncation, d.quantize)
            step += 1
    for x in image_batches(d, rank, world, bs, stream_seed(seed, "stage", k), exclude, skip_batches=start_step):
        yield x.to(device, non_blocking=True), None
