"""E2Style training: multi-stage encoders with the paper's losses, on one device or under Ray Train (DDP).

    python -m pipeline.train --config configs/train_synthetic.yaml [--set train.steps=200 ...]
    (to become: python run_pipeline.py train --config ...)

Stage 1 trains the first-stage encoder (initialised from IR-SE50 when ``pretrained.ir_se50`` is given and
fits); stage k > 1 loads the stage k-1 checkpoint, freezes all of it (eval mode, no gradients) and trains
one new refinement encoder. The generator is always frozen. ``train.stages: [1, 2, 3]`` runs the stages
one after the other, each starting from the previous one's final checkpoint.

Output layout (``output_dir``):
    stage{k}/checkpoints/latest_model.pt   official layout + ``train_state`` (step, optimizer, RNG): resume point
    stage{k}/e2style_stage{k}.pt           the stage's final model, official layout (``load_e2style``)
    stage{k}/logs/metrics.jsonl            train and validation scalars, one JSON object per line
    stage{k}/logs/events.out.tfevents.*    the same scalars for TensorBoard
A rerun with the same ``output_dir`` skips finished stages and resumes an unfinished one at its saved step
with its optimizer state. Checkpoints are written to a temporary file and renamed (atomic).

Data (``data.mode``): ``synthetic`` samples (w, G(w)) pairs from the generator on the fly (deterministic per
step, so a resumed run sees the same batches); ``images`` reads aligned faces with the pipeline's readers
(image folders, WebDataset tars, Parquet; local or S3) and resizes them to 256.

This module imports only torch/numpy at import time; yaml, fsspec/s3fs and ray are imported where used.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .config import ConfigError, merge_config, parse_overrides, read_config_file

__all__ = ["TrainConfigError", "DEFAULTS", "resolve_config", "load_train_config", "run_training", "train_stage",
           "stage_paths", "validate_model", "EventWriter", "MetricsLogger", "main"]

STAGE_FINAL = "e2style_stage{k}.pt"
LATEST = "latest_model.pt"


class SimulatedCrash(RuntimeError):
    """Raised by ``train_stage(crash_after=n)``: the process 'dies' mid-stage, nothing more is saved."""


class TrainConfigError(ConfigError):
    def __init__(self, key: str, reason: str):
        super().__init__(key, reason)
        self.args = (f"invalid training config: {key}: {reason}",)


DEFAULTS: dict[str, Any] = {
    "output_dir": None,              # local folder for checkpoints and logs (shared by all workers)
    "generator": None,               # StyleGAN2 checkpoint {'g_ema', 'latent_avg'}; needed by stage 1
    "pretrained": {
        "ir_se50": None,             # ArcFace IR-SE50 (identity loss; also the encoders' initialisation)
        "parsing": None,             # face-parsing U-Net (parse loss)
        "alexnet": None,             # torchvision AlexNet state dict (LPIPS loss and metric)
        "lpips_lin": None,           # lpips' alex.pth linear layers (if not inside the alexnet file)
    },
    "model": {
        "encoder_base_width": 64,    # IR-SE50 widths (w, 2w, 4w, 8w); 64 = official, >= 16
        "learn_in_w": False,
        "start_from_latent_avg": True,
        "init_from_ir_se50": "auto",  # auto: when pretrained.ir_se50 is given and fits | true | false
        "init_checkpoint": None,     # stage k-1 checkpoint when the first stage trained here is k > 1
    },
    "loss": {"l2": 1.0, "lpips": 0.8, "id": 0.5, "parse": 1.0, "w_norm": 0.0, "latent": 0.0},
    "optim": {"name": "ranger", "lr": 1e-4, "weight_decay": 0.0},
    "train": {
        "stages": [1],               # stages to train, in order (an int k means [k])
        "steps": 1000,               # optimizer steps per stage
        "batch_size": 4,             # per worker
        "seed": 0,
        "randomize_noise": False,    # False: the generator's stored noise (as at inference)
        "precision": "fp32",         # fp32 | bf16 (autocast on CUDA)
        "device": "auto",            # auto | cpu | cuda (single-process runs; Ray picks the worker's device)
        "log_every": 50,
        "val_every": 500,
        "save_every": 500,
        "max_seconds": None,         # per stage wall-clock budget: stop early, validate and save
        "grad_clip": None,
        "num_threads": None,         # torch intra-op threads on CPU
    },
    "data": {
        "mode": "synthetic",         # synthetic | images
        "url": None,                 # images: folder / tar / parquet, local or s3://
        "format": "auto",
        "endpoint_url": None,
        "shard_size": 1000,
        "val_url": None,             # images: held-out set; null = hold out the first val_count inputs
        "val_count": 64,
        "val_batch_size": 16,
        "truncation": 1.0,           # synthetic: w = avg + psi * (w - avg)
        "quantize": True,            # synthetic: round images to 8-bit levels, as stored images are
        "shuffle_buffer": 256,       # images: samples shuffled in memory
    },
    "num_workers": None,             # null: one process, no Ray; an int: Ray Train TorchTrainer with DDP
    "use_gpu": False,                # Ray: one GPU per worker
    "ray": {"address": None, "cpus_per_worker": 1},
    "progress": True,
}

_LOSS_KEYS = tuple(DEFAULTS["loss"])


# ------------------------------------------------------------------------------------------------
# Config


def _num(cfg, key, lo=None, integer=False, allow_none=False):
    cur = cfg
    for p in key.split("."):
        cur = cur[p]
    if cur is None and allow_none:
        return
    ok = isinstance(cur, int) if integer else isinstance(cur, (int, float))
    if isinstance(cur, bool) or not ok:
        raise TrainConfigError(key, f"must be {'an integer' if integer else 'a number'}, got {cur!r}")
    if lo is not None and cur < lo:
        raise TrainConfigError(key, f"must be >= {lo}, got {cur}")


def resolve_config(file_cfg: dict | None = None, overrides: dict | None = None) -> dict:
    """Defaults <- file <- overrides, validated; paths are checked later, before any step (``check_files``)."""
    cfg = copy.deepcopy(DEFAULTS)
    if file_cfg is not None and not isinstance(file_cfg, dict):
        raise TrainConfigError("<root>", "a config must be a mapping")
    merge_config(cfg, file_cfg or {}, TrainConfigError)
    merge_config(cfg, overrides or {}, TrainConfigError)
    if not cfg["output_dir"]:
        raise TrainConfigError("output_dir", "is required")
    st = cfg["train"]["stages"]
    st = [st] if isinstance(st, int) and not isinstance(st, bool) else st
    if not isinstance(st, list) or not st or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in st):
        raise TrainConfigError("train.stages", f"must be a stage number >= 1 or a list of them, got {cfg['train']['stages']!r}")
    if st != list(range(st[0], st[0] + len(st))):
        raise TrainConfigError("train.stages", f"must be consecutive and increasing, got {st}")
    cfg["train"]["stages"] = st
    for k in _LOSS_KEYS:
        _num(cfg, f"loss.{k}", lo=0)
    _num(cfg, "optim.lr", lo=0)
    _num(cfg, "optim.weight_decay", lo=0)
    if str(cfg["optim"]["name"]).lower() not in ("ranger", "adamw", "adam"):
        raise TrainConfigError("optim.name", f"must be ranger, adamw or adam, got {cfg['optim']['name']!r}")
    for k in ("steps", "batch_size", "log_every", "val_every", "save_every"):
        _num(cfg, f"train.{k}", lo=1, integer=True)
    _num(cfg, "train.seed", lo=0, integer=True)
    _num(cfg, "train.max_seconds", lo=0, allow_none=True)
    _num(cfg, "train.grad_clip", lo=0, allow_none=True)
    _num(cfg, "train.num_threads", lo=1, integer=True, allow_none=True)
    if cfg["train"]["precision"] not in ("fp32", "bf16"):
        raise TrainConfigError("train.precision", f"must be fp32 or bf16, got {cfg['train']['precision']!r}")
    if cfg["train"]["device"] not in ("auto", "cpu", "cuda"):
        raise TrainConfigError("train.device", f"must be auto, cpu or cuda, got {cfg['train']['device']!r}")
    _num(cfg, "model.encoder_base_width", lo=16, integer=True)
    if cfg["model"]["init_from_ir_se50"] not in ("auto", True, False):
        raise TrainConfigError("model.init_from_ir_se50", "must be auto, true or false")
    d = cfg["data"]
    if d["mode"] not in ("synthetic", "images"):
        raise TrainConfigError("data.mode", f"must be synthetic or images, got {d['mode']!r}")
    if d["mode"] == "images" and not d["url"]:
        raise TrainConfigError("data.url", "is required when data.mode is images")
    if d["mode"] == "images" and cfg["loss"]["latent"] > 0:
        raise TrainConfigError("loss.latent", "needs the true w: only available with data.mode: synthetic")
    for k in ("val_count", "val_batch_size", "shard_size", "shuffle_buffer"):
        _num(cfg, f"data.{k}", lo=1, integer=True)
    _num(cfg, "data.truncation", lo=0)
    _num(cfg, "num_workers", lo=1, integer=True, allow_none=True)
    for key in ("use_gpu", "progress", "model.learn_in_w", "model.start_from_latent_avg", "train.randomize_noise", "data.quantize"):
        cur = cfg
        for p in key.split("."):
            cur = cur[p]
        if not isinstance(cur, bool):
            raise TrainConfigError(key, f"must be true or false, got {cur!r}")
    return cfg


def load_train_config(path: str | None, overrides: list[str] | dict | None = None) -> dict:
    ov = overrides if isinstance(overrides, dict) else parse_overrides(overrides, TrainConfigError)
    return resolve_config(read_config_file(path, TrainConfigError), ov)


def stage_paths(cfg: dict, k: int) -> dict[str, str]:
    root = os.path.join(cfg["output_dir"], f"stage{k}")
    return {"dir": root, "final": os.path.join(root, STAGE_FINAL.format(k=k)), "latest": os.path.join(root, "checkpoints", LATEST),
            "logs": os.path.join(root, "logs")}


def check_files(cfg: dict) -> None:
    """Every file the run will need, checked before anything is built or trained; errors name the key."""
    from models.losses import check_pretrained

    check_pretrained(cfg["loss"], cfg["pretrained"])
    for key in ("ir_se50", "alexnet", "lpips_lin", "parsing"):
        p = cfg["pretrained"][key]
        if p is not None and not os.path.isfile(p):
            from models.losses import MissingPretrainedError

            raise MissingPretrainedError(f"pretrained.{key}: {p}: no such file")
    first = cfg["train"]["stages"][0]
    needs_generator = first == 1 and not os.path.isfile(stage_paths(cfg, 1)["final"])
    if needs_generator:
        g = cfg["generator"]
        if not g:
            raise TrainConfigError("generator", "is required to train stage 1 (a StyleGAN2 checkpoint with 'g_ema')")
        if not os.path.isfile(g):
            raise FileNotFoundError(f"generator: {g}: no such file")
    if first > 1 and not os.path.isfile(stage_paths(cfg, first)["final"]) and not os.path.isfile(stage_paths(cfg, first)["latest"]):
        init = cfg["model"]["init_checkpoint"] or stage_paths(cfg, first - 1)["final"]
        if not os.path.isfile(init):
            raise FileNotFoundError(f"model.init_checkpoint: {init}: no such file (stage {first} starts from a stage {first - 1} checkpoint)")


# ------------------------------------------------------------------------------------------------
# Logging: JSONL always, TensorBoard event files (torch's SummaryWriter when tensorboard is installed,
# else a minimal writer of the same record format).


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _event_bytes(wall_time: float, step: int, *, file_version: str | None = None, scalars: dict[str, float] | None = None) -> bytes:
    """A tensorflow.Event protobuf: wall_time (1, double), step (2, int64), file_version (3) or summary (5)."""
    msg = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        fv = file_version.encode()
        msg += b"\x1a" + _varint(len(fv)) + fv
    if scalars:
        summary = b""
        for tag, value in scalars.items():
            t = tag.encode()
            val = b"\x0a" + _varint(len(t)) + t + b"\x15" + struct.pack("<f", float(value))  # tag (1), simple_value (2)
            summary += b"\x0a" + _varint(len(val)) + val
        msg += b"\x2a" + _varint(len(summary)) + summary
    return msg


class EventWriter:
    """Appends TFRecord-framed Event protos to ``events.out.tfevents.<time>.<host>`` (TensorBoard's format)."""

    def __init__(self, log_dir: str):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}")
        self._f = open(self.path, "ab")
        self._write(_event_bytes(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._f.write(header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        self._write(_event_bytes(time.time(), int(step), scalars=scalars))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_events(path: str) -> list[dict]:
    """Decode an event file written by ``EventWriter`` (checks both CRCs): [{'step', 'scalars'}]."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8:pos + 12])[0] != _masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        rec = data[pos + 12:pos + 12 + n]
        if struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] != _masked_crc(rec):
            raise ValueError(f"{path}: bad data CRC at byte {pos}")
        pos += 16 + n
        out.append(_parse_event(rec))
    return out


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return n, i


def _fields(b: bytes):
    i = 0
    while i < len(b):
        key, i = _read_varint(b, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(b, i)
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        elif wt == 2:
            n, i = _read_varint(b, i)
            v, i = b[i:i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wt}")
        yield field, v


def _parse_event(rec: bytes) -> dict:
    ev: dict = {"step": 0, "scalars": {}}
    for field, v in _fields(rec):
        if field == 1:
            ev["wall_time"] = struct.unpack("<d", v)[0]
        elif field == 2:
            ev["step"] = v
        elif field == 3:
            ev["file_version"] = v.decode()
        elif field == 5:
            for f2, val in _fields(v):
                if f2 == 1:
                    tag, value = None, None
                    for f3, x in _fields(val):
                        if f3 == 1:
                            tag = x.decode()
                        elif f3 == 2:
                            value = struct.unpack("<f", x)[0]
                    ev["scalars"][tag] = value
    return ev


class MetricsLogger:
    """Rank 0's scalars: ``metrics.jsonl`` plus TensorBoard event files."""

    def __init__(self, log_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.log_dir = log_dir
        self._tb = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", encoding="utf-8")
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=log_dir)
        except Exception:  # noqa: BLE001 - tensorboard absent: our own writer, same file format
            self._tb = EventWriter(log_dir)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled or not scalars:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **scalars}) + "\n")
        self._jsonl.flush()
        if isinstance(self._tb, EventWriter):
            self._tb.add_scalars(scalars, step)
        elif self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


class _Progress:
    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar = None
        self.enabled = enabled
        self.last_print = 0.0
        self.total, self.n, self.desc = total, initial, desc
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, loss: float | None = None) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif self.enabled and time.time() - self.last_print > 10:
            self.last_print = time.time()
            print(f"{self.desc}: step {self.n}/{self.total}" + (f" loss {loss:.4f}" if loss is not None else ""), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------
# Data


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _gen(*parts) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(_seed(*parts))


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@torch.no_grad()
def synthetic_batch(G, latent_avg_w: torch.Tensor | None, n: int, gen: torch.Generator, truncation: float = 1.0,
                    quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, w): x = pool256(G.synthesis(w)) in [-1, 1] with the stored noise, w = mapping(z) (B, style_dim)."""
    from models.e2style import face_pool

    dev = next(G.parameters()).device
    z = torch.randn(n, G.style_dim, generator=gen).to(dev)
    w = G.mapping(z)
    if truncation != 1.0 and latent_avg_w is not None:
        w = latent_avg_w.to(w) + truncation * (w - latent_avg_w.to(w))
    x = face_pool(G.synthesis(w, randomize_noise=False)).float()
    return (_quantize(x) if quantize else x), w


def _image_items(cfg: dict):
    """(fs, shards) of data.url via the pipeline's planner."""
    from .read import plan_shards
    from .storage import get_fs

    d = cfg["data"]
    fs, root = get_fs(d["url"], d["endpoint_url"])
    _, shards = plan_shards(fs, root, d["format"], d["shard_size"])
    if not shards:
        raise FileNotFoundError(f"data.url: {d['url']}: no input shards found")
    return fs, shards


def _decode_to_tensor(data: bytes) -> torch.Tensor:
    from .decode import decode_image
    from .invert import to_model_input

    img = decode_image(data)
    return to_model_input(img[None])[0]


def _iter_raw(fs, shards, rank: int, world: int, order: list[int], exclude: set[str]) -> Iterator[tuple[str, bytes]]:
    from .read import read_shard

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


def load_image_set(cfg: dict, url: str | None, count: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``count`` decodable images of ``url`` (or of data.url) in planned order: the held-out set."""
    sub = copy.deepcopy(cfg)
    if url:
        sub["data"]["url"] = url
    fs, shards = _image_items(sub)
    xs, sources = [], []
    for source, data in _iter_raw(fs, shards, 0, 1, list(range(len(shards))), set()):
        try:
            xs.append(_decode_to_tensor(data))
        except Exception:  # noqa: BLE001 - a bad file is skipped, as in training
            continue
        sources.append(source)
        if len(xs) >= count:
            break
    if not xs:
        raise FileNotFoundError(f"no decodable images for the validation set in {sub['data']['url']}")
    return torch.stack(xs), sources


def image_batches(cfg: dict, rank: int, world: int, batch_size: int, seed: int, exclude: set[str],
                  skip_batches: int = 0) -> Iterator[torch.Tensor]:
    """Endless shuffled batches (B, 3, 256, 256) in [-1, 1] for this rank. Deterministic given (seed, rank,
    world), so a resumed run skips ``skip_batches`` batches (without decoding them) and continues in place."""
    fs, shards = _image_items(cfg)
    buf_size = cfg["data"]["shuffle_buffer"]
    done = 0
    epoch = 0
    while True:
        order = torch.randperm(len(shards), generator=_gen(seed, "shards", epoch)).tolist()
        g = _gen(seed, "buffer", epoch, rank)
        buf: list[tuple[str, bytes]] = []
        batch: list[bytes] = []
        got_any = False

        def emit_one():
            """Move a random buffered item into the batch; yield the batch when full (decoded unless skipped)."""
            nonlocal done
            batch.append(buf.pop(int(torch.randint(len(buf), (1,), generator=g)))[1])
            while len(batch) >= batch_size:
                raw, batch[:] = batch[:batch_size], batch[batch_size:]
                if done >= skip_batches:
                    xs = [t for t in (_try_decode(b) for b in raw) if t is not None]
                    if xs:
                        yield torch.stack(xs)
                done += 1

        for item in _iter_raw(fs, shards, rank, world, order, exclude):
            got_any = True
            buf.append(item)
            if len(buf) >= buf_size:
                yield from emit_one()
        while buf:
            yield from emit_one()
        if not got_any:
            raise FileNotFoundError(f"data.url: {cfg['data']['url']}: no training images for worker {rank} of {world} "
                                    f"(after holding out {len(exclude)} for validation)")
        epoch += 1


def _try_decode(data: bytes) -> torch.Tensor | None:
    try:
        return _decode_to_tensor(data)
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------------------------------------
# Model


def _latent_avg_for(G, n_latent: int, learn_in_w: bool) -> torch.Tensor:
    avg = getattr(G, "latent_avg", None)
    if avg is None:
        avg = G.mean_latent(4096)
    avg = avg.reshape(-1)[: G.style_dim].float()
    return avg.clone() if learn_in_w else avg.repeat(n_latent, 1)


def _small_head_init(enc: torch.nn.Module) -> None:
    # Small heads: the first codes stay near latent_avg (stage 1) or near the previous stage's (k > 1).
    for m in enc.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02 / math.sqrt(m.in_features))
            torch.nn.init.zeros_(m.bias)


def _maybe_init_irse(cfg: dict, enc: torch.nn.Module, include_input_layer: bool, log: Callable[[str], None]) -> None:
    mode = cfg["model"]["init_from_ir_se50"]
    path = cfg["pretrained"]["ir_se50"]
    if mode is False or path is None:
        if mode is True:
            raise TrainConfigError("model.init_from_ir_se50", "is true but pretrained.ir_se50 is not set")
        return
    from models.checkpoint import CheckpointError, read_checkpoint
    from models.losses import _state_dict, irse_encoder_init

    sd = _state_dict(read_checkpoint(path), path)
    try:
        n = irse_encoder_init(enc, sd, path, include_input_layer)
        log(f"initialised the new encoder from {path} ({n} tensors)")
    except CheckpointError:
        if mode is True:
            raise
        log(f"not initialising from {path}: its widths do not fit model.encoder_base_width")


def build_stage_model(cfg: dict, k: int, log: Callable[[str], None] = print):
    """The E2Style model for training stage k: stages 1..k-1 loaded and frozen, stage k new."""
    from models.checkpoint import e2style_from_checkpoint, load_stylegan2, read_checkpoint
    from models.e2style import E2Style, build_encoder
    from models.factory import encoder_widths, split_head_codes

    m = cfg["model"]
    torch.manual_seed(_seed(cfg["train"]["seed"], "init", k))
    if k == 1:
        G = load_stylegan2(cfg["generator"])
        base = m["encoder_base_width"]
        widths = (base, base * 2, base * 4, base * 8)
        head_codes = None if m["learn_in_w"] else split_head_codes(G.n_latent)
        first = build_encoder(3, head_codes, widths, 50, G.style_dim)
        _small_head_init(first)
        _maybe_init_irse(cfg, first, True, log)
        latent_avg = _latent_avg_for(G, G.n_latent, m["learn_in_w"]) if m["start_from_latent_avg"] else None
        model = E2Style(first, [], G, latent_avg, m["start_from_latent_avg"], m["learn_in_w"], 3, 0)
        trainable = first
    else:
        init = m["init_checkpoint"] if k == cfg["train"]["stages"][0] and m["init_checkpoint"] else stage_paths(cfg, k - 1)["final"]
        prev = e2style_from_checkpoint(read_checkpoint(init), init)
        if prev.num_stages < k - 1:
            raise TrainConfigError("model.init_checkpoint", f"{init} has {prev.num_stages} stage(s); training stage {k} needs {k - 1}")
        first = prev.encoder_firststage
        sd = first.state_dict()
        head_codes = None if prev.learn_in_w else tuple(int(sd[f"output_layer_{i}.3.bias"].shape[0]) // prev.decoder.style_dim for i in (3, 4, 5))
        from models.checkpoint import irse_spec

        widths = irse_spec(sd, init)["widths"]
        new = build_encoder(prev.input_nc + 3, head_codes, widths, 50, prev.decoder.style_dim)
        _small_head_init(new)
        _maybe_init_irse(cfg, new, False, log)
        refines = list(prev.encoder_refinestage_list)[: k - 2] + [new]
        model = E2Style(first, refines, prev.decoder, prev.latent_avg if prev.start_from_latent_avg else None,
                        prev.start_from_latent_avg, prev.learn_in_w, prev.input_nc, prev.label_nc)
        trainable = new
    model.requires_grad_(False)
    trainable.requires_grad_(True)
    # IR-SE units 22-24 are stored but never run: no gradient, so keep them out of DDP and the optimizer.
    for unit in list(trainable.body)[21:]:
        unit.requires_grad_(False)
    return model, trainable


def _wplus(codes: torch.Tensor, n_latent: int) -> torch.Tensor:
    return codes.unsqueeze(1).expand(-1, n_latent, -1) if codes.ndim == 2 else codes


def stage_forward(model, enc, k: int, x: torch.Tensor, randomize_noise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Training forward of stage k: frozen stages 1..k-1 without gradients, then ``enc`` (the trainable
    encoder, possibly DDP-wrapped). Returns (y_hat pooled to 256, W+ or W codes of stage k)."""
    from models.e2style import face_pool

    G = model.decoder
    n = G.n_latent

    def synth(c):
        return face_pool(G.synthesis(_wplus(c, n), randomize_noise=randomize_noise))

    def add_avg(c):
        if model.start_from_latent_avg:
            avg = model.latent_avg
            c = c + avg.reshape((1,) * (c.ndim - avg.ndim) + tuple(avg.shape)).to(c.dtype)
        return c

    if k == 1:
        codes = add_avg(enc(x))
    else:
        with torch.no_grad():
            codes = add_avg(model.encoder_firststage(x))
            for i in range(k - 2):
                codes = codes + model.encoder_refinestage_list[i](torch.cat((x, synth(codes).to(x.dtype)), 1))
            prev = synth(codes).to(x.dtype)
        codes = codes + enc(torch.cat((x, prev), 1))
    return synth(codes), codes


@torch.no_grad()
def validate_model(model, xs: torch.Tensor, stages: int, batch_size: int, device, lpips_net=None,
                   ws: torch.Tensor | None = None) -> dict[str, float]:
    """Per-stage held-out metrics: MSE and PSNR on a [0, 1] scale (per image, averaged), LPIPS when a net is
    given, latent MSE when the true w is known. Keys: ``stage{s}/mse`` etc."""
    was = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(xs), batch_size):
        x = xs[i:i + batch_size].to(device)
        b = len(x)
        for s in range(1, stages + 1):
            out = model.invert(x, stages=s)
            r = out.images.float().clamp(-1, 1).add(1).div(2)
            t = x.float().clamp(-1, 1).add(1).div(2)
            mse = (r - t).pow(2).flatten(1).mean(1)
            psnr = 10 * torch.log10(1 / mse.clamp_min(1e-10))
            acc = {f"stage{s}/mse": mse.sum(), f"stage{s}/psnr": psnr.sum()}
            if lpips_net is not None:
                acc[f"stage{s}/lpips"] = lpips_net.per_sample(out.images.float(), x.float()).sum()
            if ws is not None:
                w = ws[i:i + batch_size].to(device)
                acc[f"stage{s}/latent_mse"] = (out.codes - w.unsqueeze(1)).pow(2).flatten(1).mean(1).sum()
            for key, v in acc.items():
                sums[key] = sums.get(key, 0.0) + float(v)
        n += b
    model.train(was)
    return {k: v / n for k, v in sums.items()}


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _opts(cfg: dict, k: int, step: int) -> dict:
    L = cfg["loss"]
    return {"training_stage": k, "start_from_latent_avg": cfg["model"]["start_from_latent_avg"], "learn_in_w": cfg["model"]["learn_in_w"],
            "l2_lambda": L["l2"], "lpips_lambda": L["lpips"], "id_lambda": L["id"], "parse_lambda": L["parse"],
            "w_norm_lambda": L["w_norm"], "latent_lambda": L["latent"], "optim_name": cfg["optim"]["name"],
            "learning_rate": cfg["optim"]["lr"], "batch_size": cfg["train"]["batch_size"], "max_steps": cfg["train"]["steps"],
            "step": int(step), "stylegan_weights": cfg["generator"], "data_mode": cfg["data"]["mode"]}


def save_checkpoint(path: str, model, cfg: dict, k: int, step: int, optimizer=None, extra: dict | None = None) -> None:
    from models.factory import atomic_save, e2style_checkpoint

    ckpt = e2style_checkpoint(model, _opts(cfg, k, step))
    ckpt["state_dict"] = {kk: v.cpu() for kk, v in ckpt["state_dict"].items()}
    ckpt["latent_avg"] = ckpt["latent_avg"].cpu()
    if optimizer is not None:
        ckpt["train_state"] = {
            "stage": k, "step": int(step), "optimizer": optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            **(extra or {}),
        }
    atomic_save(ckpt, path)


def _resolve_device(cfg: dict, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    d = cfg["train"]["device"]
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(d)


# ------------------------------------------------------------------------------------------------
# The loop


def train_stage(cfg: dict, k: int, *, rank: int = 0, world_size: int = 1, device=None,
                report: Callable[[dict], None] | None = None, log: Callable[[str], None] | None = None,
                crash_after: int | None = None) -> dict:
    """Train stage k to ``train.steps`` (resuming from its latest checkpoint), write its final checkpoint.
    Returns {'stage', 'step', 'final', 'val': {...}, 'loss_first', 'loss_last'}.
    ``crash_after``: raise ``SimulatedCrash`` after that many steps in this call (tests of resume)."""
    from models.checkpoint import read_checkpoint
    from models.losses import E2StyleLoss, load_lpips
    from models.optim import build_optimizer

    log = log or (lambda msg: print(f"[train] {msg}", file=sys.stderr, flush=True) if rank == 0 else None)
    paths = stage_paths(cfg, k)
    tcfg, dcfg = cfg["train"], cfg["data"]
    device = _resolve_device(cfg, device)
    if tcfg["num_threads"] and device.type == "cpu":
        torch.set_num_threads(tcfg["num_threads"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if os.path.isfile(paths["final"]):
        log(f"stage {k}: already trained ({paths['final']}), skipping")
        return {"stage": k, "final": paths["final"], "skipped": True}

    model, enc = build_stage_model(cfg, k, log)
    step = 0
    resume_state = None
    if os.path.isfile(paths["latest"]):
        ck = read_checkpoint(paths["latest"])
        ts = ck.get("train_state")
        if ts is None or int(ts.get("stage", -1)) != k:
            raise RuntimeError(f"{paths['latest']}: not a stage-{k} training checkpoint (no matching train_state)")
        sd = {kk: (v.float() if v.is_floating_point() else v) for kk, v in ck["state_dict"].items()}
        model.load_state_dict(sd, strict=True)
        step = int(ts["step"])
        resume_state = ts
        log(f"stage {k}: resuming from {paths['latest']} at step {step}")
    model.to(device)
    model.decoder.set_modconv_mode("shared")  # same function as the grouped form, one dense conv per layer
    model.eval()
    enc.train()

    train_enc = enc
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_enc = DDP(enc, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in enc.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg["optim"]["name"], params, lr=float(cfg["optim"]["lr"]), weight_decay=float(cfg["optim"]["weight_decay"]))
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        torch.set_rng_state(resume_state["rng_cpu"])
        if device.type == "cuda" and resume_state.get("rng_cuda"):
            try:
                torch.cuda.set_rng_state_all(resume_state["rng_cuda"])
            except Exception:  # noqa: BLE001 - another GPU count: keep the fresh CUDA RNG
                pass

    loss_fn = E2StyleLoss({kk: cfg["loss"][kk] for kk in _LOSS_KEYS}, cfg["pretrained"]).to(device)
    lpips_metric = loss_fn.lpips.net if loss_fn.lpips is not None else None
    if lpips_metric is None and cfg["pretrained"]["alexnet"] and rank == 0:
        try:
            lpips_metric = load_lpips(cfg["pretrained"]["alexnet"], cfg["pretrained"]["lpips_lin"]).to(device)
        except Exception as e:  # noqa: BLE001 - the metric is optional
            log(f"LPIPS metric unavailable: {e}")

    G = model.decoder
    synthetic = dcfg["mode"] == "synthetic"
    avg_w = model.latent_avg.reshape(-1, G.style_dim)[0] if model.start_from_latent_avg else None
    seed = tcfg["seed"]
    bs = tcfg["batch_size"]

    # Held-out data (rank 0 validates).
    val_x = val_w = None
    exclude: set[str] = set()
    if synthetic:
        if rank == 0:
            xs, ws = [], []
            g = _gen(seed, "val")
            for i in range(0, dcfg["val_count"], dcfg["val_batch_size"]):
                x, w = synthetic_batch(G, avg_w, min(dcfg["val_batch_size"], dcfg["val_count"] - i), g, dcfg["truncation"], dcfg["quantize"])
                xs.append(x.cpu())
                ws.append(w.cpu())
            val_x, val_w = torch.cat(xs), torch.cat(ws)
    else:
        vx, sources = load_image_set(cfg, dcfg["val_url"], dcfg["val_count"])
        if not dcfg["val_url"]:
            exclude = set(sources)
        val_x = vx if rank == 0 else None

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if synthetic:
            s = step
            while True:
                x, w = synthetic_batch(G, avg_w, bs, _gen(seed, "train", k, s, rank), dcfg["truncation"], dcfg["quantize"])
                s += 1
                yield x, w
        else:
            for x in image_batches(cfg, rank, world_size, bs, _seed(seed, "stage", k), exclude, skip_batches=step):
                yield x.to(device, non_blocking=True), None

    logger = MetricsLogger(paths["logs"], enabled=rank == 0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if tcfg["precision"] == "bf16" else None
    t0 = time.time()
    loss_first = loss_last = None
    steps = tcfg["steps"]
    progress = _Progress(cfg["progress"] and rank == 0, steps, step, f"stage {k}")
    last_val: dict[str, float] = {}
    log(f"stage {k}: training {sum(p.numel() for p in params)} parameters, steps {step}->{steps}, batch {bs} x {world_size} worker(s), "
        f"{dcfg['mode']} data, losses {({kk: v for kk, v in loss_fn.weights.items() if v > 0})}, device {device}")

    def run_validation(at: int) -> dict[str, float]:
        if rank != 0:
            return {}
        m = validate_model(model, val_x, k, dcfg["val_batch_size"], device, lpips_metric, val_w)
        logger.log(at, {f"val/{kk}": v for kk, v in m.items()})
        log(f"stage {k} step {at}: " + ", ".join(f"{kk} {v:.4f}" for kk, v in m.items() if kk.endswith(("psnr", "lpips"))))
        return m

    it = batches()
    stopped_early = False
    start_step = step
    try:
        while step < steps:
            x, w = next(it)
            x = x.to(device)
            if amp is not None:
                with amp:
                    y_hat, codes = stage_forward(model, train_enc, k, x, tcfg["randomize_noise"])
                y_hat, codes = y_hat.float(), codes.float()
            else:
                y_hat, codes = stage_forward(model, train_enc, k, x, tcfg["randomize_noise"])
            loss, parts = loss_fn(y_hat, x, codes, model.latent_avg if model.start_from_latent_avg else None, w)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(params, tcfg["grad_clip"])
            optimizer.step()
            step += 1
            if crash_after is not None and step - start_step >= crash_after:
                raise SimulatedCrash(f"stage {k}: simulated crash after step {step}")
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"stage {k} step {step}: loss is {lv}")
            loss_first = lv if loss_first is None else loss_first
            loss_last = lv
            progress.update(lv)
            if rank == 0 and (step % tcfg["log_every"] == 0 or step == 1):
                logger.log(step, {"train/loss": lv, **{f"train/{kk}": float(v) for kk, v in parts.items()},
                                  "train/steps_per_s": step / max(time.time() - t0, 1e-9)})
            out_of_time = tcfg["max_seconds"] is not None and time.time() - t0 > tcfg["max_seconds"]
            if world_size > 1 and tcfg["max_seconds"] is not None:
                flag = torch.tensor([float(out_of_time)], device=device)
                torch.distributed.all_reduce(flag)
                out_of_time = bool(flag.item() > 0)
            if step % tcfg["val_every"] == 0 and step < steps and not out_of_time:
                last_val = run_validation(step)
                if report is not None:
                    report({"stage": k, "step": step, "loss": lv, **last_val})
            if rank == 0 and step % tcfg["save_every"] == 0 and step < steps and not out_of_time:
                save_checkpoint(paths["latest"], model, cfg, k, step, optimizer)
            if out_of_time:
                log(f"stage {k}: max_seconds reached at step {step}")
                stopped_early = True
                break
    finally:
        progress.close()
    if world_size > 1:
        torch.distributed.barrier()
    last_val = run_validation(step)
    if rank == 0:
        save_checkpoint(paths["latest"], model, cfg, k, step, optimizer)
        save_checkpoint(paths["final"], model, cfg, k, step)
    if world_size > 1:
        torch.distributed.barrier()
    logger.close()
    result = {"stage": k, "step": step, "final": paths["final"], "val": last_val, "loss_first": loss_first, "loss_last": loss_last,
              "seconds": round(time.time() - t0, 2), "stopped_early": stopped_early}
    if report is not None:
        report({"stage": k, "step": step, "done": True, **{kk: v for kk, v in last_val.items()}})
    return result


def run_training(cfg: dict, *, rank: int = 0, world_size: int = 1, device=None, report=None, log=None,
                 crash_after: int | None = None) -> list[dict]:
    """Train ``train.stages`` in order in this process (one rank of a DDP group when world_size > 1)."""
    check_files(cfg)
    if rank == 0:
        os.makedirs(cfg["output_dir"], exist_ok=True)
        with open(os.path.join(cfg["output_dir"], "train_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, default=str)
    results = []
    for k in cfg["train"]["stages"]:
        results.append(train_stage(cfg, k, rank=rank, world_size=world_size, device=device, report=report, log=log,
                                   crash_after=crash_after))
    return results


def _ddp_worker(rank: int, world_size: int, cfg: dict, port: int) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    use_cuda = cfg["train"]["device"] != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    try:
        if use_cuda:
            torch.cuda.set_device(rank)
        run_training(cfg, rank=rank, world_size=world_size, device=f"cuda:{rank}" if use_cuda else "cpu")
    finally:
        dist.destroy_process_group()


def run_local_ddp(cfg: dict, world_size: int) -> list[dict]:
    """DDP on this machine without Ray: ``world_size`` processes (one per GPU, or gloo on CPU)."""
    import torch.multiprocessing as mp

    check_files(cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(world_size, cfg, port), nprocs=world_size, join=True)
    return [{"stage": k, "final": stage_paths(cfg, k)["final"]} for k in cfg["train"]["stages"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", "-c", required=True, help="YAML training config (configs/train_*.yaml)")
    ap.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, dotted (train.steps=100); repeatable")
    args = ap.parse_args(argv)
    from models.checkpoint import CheckpointError
    from models.losses import MissingPretrainedError

    try:
        cfg = load_train_config(args.config, args.overrides)
        check_files(cfg)
    except (TrainConfigError, MissingPretrainedError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg["num_workers"] is not None:
        from workers.train_worker import run_ray_training

        results = run_ray_training(cfg)
    else:
        results = run_training(cfg)
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
