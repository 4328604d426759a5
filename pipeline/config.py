"""Pipeline configuration: YAML file + ``--set key=value`` overrides, validated up front.

Every key has a default here, so a config file only names what it changes. Validation happens before
Ray starts or anything is read, and each error names the dotted key and the reason: a typo in a
batch job found after an hour of queueing is the expensive kind of typo.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any

__all__ = ["ConfigError", "DEFAULTS", "load_config", "parse_overrides", "read_config_file", "merge_config", "resolve",
           "validate", "redact", "fingerprint", "FINGERPRINT_KEYS"]


class ConfigError(ValueError):
    """An invalid configuration; ``key`` is the dotted key at fault."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"invalid config: {key}: {reason}")
        self.key = key
        self.reason = reason


DEFAULTS: dict[str, Any] = {
    "input": {
        "url": None,             # s3://bucket/prefix, a local dir, or one file
        "format": "auto",        # auto | images | webdataset | parquet
        "image_column": "auto",  # parquet only: auto finds jpg/png/webp/image/img/bytes
        "key_column": "auto",    # parquet only: auto finds key/__key__/id, else the row number
        "max_pixels": 50_000_000,  # decompression-bomb limit per image
    },
    "output": {
        "url": None,
        "image_format": "jpg",   # jpg | png | webp
        "image_size": 256,       # 0 = latents only: no reconstructions, the last generator pass is skipped
        "save_aligned": False,
        "overwrite": False,
        "jpeg_quality": 95,
        "contact_sheet": False,  # write contact_sheet.png (aligned inputs above reconstructions; needs save_aligned)
        "paste_back": False,     # also write <key>.[<variant>.]paste.<ext>: the face pasted into the original photo
    },
    "edit": {                    # latent editing after inversion (docs/editing_and_tasks.md)
        "directions": None,      # {name: path or URL of a .npy of shape (D,), (1, D) or (n_latent, D)}
        "alphas": [-3, 3],       # edit = codes + alpha * direction, one variant per direction and alpha
        "layers": None,          # [start, end): W+ layers the edit touches; null = all
        "save_codes": False,     # edited codes as extra Parquet columns codes_edit_<name>_<alpha>
    },
    "task": "invert",            # invert | colorize | denoise | inpaint | super_resolution | sketch | segmentation
    "resize_factor": 4,          # super_resolution: the encoder sees the face down-sampled by this factor
    "model": {
        "checkpoint": None,      # local path or any fsspec URL (s3://...)
        "stages": None,          # null = all stages of the checkpoint
        "batch_size": 16,
        "precision": "auto",     # auto (fp16 on GPUs, fp32 on CPUs) | fp32 | bf16 | fp16
        "compile": "auto",       # torch.compile the networks: auto (on GPUs) | true | false
        "device": "auto",        # auto (cuda when the actor has a GPU) | cpu | cuda
        "num_threads": None,     # torch CPU threads per actor; null = the actor's Ray CPU share (1)
    },
    "align": {
        "enabled": True,
        "policy": "largest",     # largest | all
        "output_size": 256,
        "transform_size": 1024,  # FFHQ's 4x output; 512: up to 1.5x faster alignment, crops within ~54 dB
        "min_face_size": 0,      # ignore faces whose detector box side (source px) is smaller
        "detect_max_side": 384,  # detector runs on dlib's pyramid level at most this long (null: full size)
        "max_upsample": 1,       # dlib upsamplings tried when nothing was found (0: never; each ~4x the cost)
    },
    "storage": {
        "endpoint_url": None,    # S3-compatible endpoint (MinIO, Ceph, a test server)
    },
    "ray": {
        "address": None,         # null = embedded local Ray; "auto" or an address = join a cluster
        "num_cpus": None,        # embedded Ray only; null = all cores
        "num_actors": None,      # inversion actors; null = one per GPU, or 1 without GPUs
        "max_shards_in_flight": None,  # null = CPUs available for CPU work + 1
        "chunk_size": 64,        # inputs per prepared chunk handed from CPU to GPU work
    },
    "shard_size": 1000,          # images per shard for folder inputs
    "retries": 2,                # extra attempts per failing shard
    "progress": True,
}

# Keys whose values change what a shard's output contains. A rerun into an existing output must agree
# on these (plus the checkpoint's sha256); the rest (Ray sizing, endpoint, batch size) only changes how
# fast it goes.
FINGERPRINT_KEYS = (
    "input.url", "input.format", "input.image_column", "input.key_column", "input.max_pixels",
    "output.image_format", "output.image_size", "output.save_aligned", "output.jpeg_quality",
    "model.stages", "model.precision",
    "align.enabled", "align.policy", "align.output_size", "align.transform_size",
)
# Keys added later: part of the fingerprint only when they differ from their defaults, so that the outputs
# of runs made before they existed keep their fingerprint.
OPTIONAL_FINGERPRINT_KEYS = ("output.paste_back", "edit.directions", "edit.alphas", "edit.layers", "edit.save_codes",
                             "task", "resize_factor", "align.min_face_size", "align.detect_max_side", "align.max_upsample")
TASKS = ("invert", "colorize", "denoise", "inpaint", "super_resolution", "sketch", "segmentation")
# shard_size is not in it: committed image shards keep their membership whatever it is now, so changing
# it only changes how the files not yet processed are grouped.

_SECRET_RE = re.compile(r"(secret|password|token|credential|access_key|session)", re.I)


def _get(cfg: dict, dotted: str) -> Any:
    cur: Any = cfg
    for part in dotted.split("."):
        cur = cur[part]
    return cur


def parse_overrides(items: list[str] | None, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """``["model.batch_size=8", "align.enabled=false"]`` -> nested dict; values are parsed as YAML.
    ``error``: the ConfigError subclass raised (the training config has its own)."""
    import yaml  # here, not at import time: the GPU training script runs without PyYAML

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise error(item, "--set expects key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise error(key or item, "empty key in --set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise error(key, f"cannot parse value {raw!r}: {e}") from None
        cur = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise error(key, "conflicts with another --set")
            cur = nxt
        cur[parts[-1]] = value
    return out


def merge_config(base: dict, over: dict, error: type[ConfigError] = ConfigError, prefix: str = "") -> dict:
    """``over`` merged into ``base`` in place (nested mappings key by key); a key ``base`` does not have is an
    error naming it, with the closest known key."""
    for k, v in over.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise error(key, "unknown key" + _suggest(k, base))
        if isinstance(base[k], dict):
            if v is None:
                continue
            if not isinstance(v, dict):
                raise error(key, f"must be a mapping, got {type(v).__name__}")
            merge_config(base[k], v, error, key + ".")
        else:
            base[k] = v
    return base


def _suggest(k: str, base: dict) -> str:
    import difflib
    close = difflib.get_close_matches(k, list(base), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(base))})"


def resolve(file_cfg: dict | None, overrides: dict | None = None) -> dict:
    """Defaults <- config file <- overrides, then validated. Returns a new plain dict."""
    cfg = copy.deepcopy(DEFAULTS)
    if file_cfg is not None and not isinstance(file_cfg, dict):
        raise ConfigError("<root>", "a config file must be a mapping")
    merge_config(cfg, file_cfg or {})
    merge_config(cfg, overrides or {})
    validate(cfg)
    return cfg


def read_config_file(path: str | None, error: type[ConfigError] = ConfigError) -> dict:
    """The YAML mapping in ``path`` ({} for no path); a missing or unparsable file is a ``--config`` error."""
    import yaml

    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise error("--config", f"file not found: {path}") from None
    except yaml.YAMLError as e:
        raise error("--config", f"not valid YAML: {e}") from None


def load_config(path: str | None, overrides: list[str] | dict | None = None) -> dict:
    ov = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    return resolve(read_config_file(path), ov)


def _check_int(cfg, key, lo=None, hi=None, allow_none=False):
    v = _get(cfg, key)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ConfigError(key, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ConfigError(key, f"must be <= {hi}, got {v}")


def _check_bool(cfg, key):
    v = _get(cfg, key)
    if not isinstance(v, bool):
        raise ConfigError(key, f"must be true or false, got {v!r}")


def _check_choice(cfg, key, choices):
    v = _get(cfg, key)
    if v not in choices:
        raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}; got {v!r}")


def _check_str(cfg, key, allow_none=False):
    v = _get(cfg, key)
    if v is None and allow_none:
        return
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(key, "is required (a non-empty string)" if v is None else f"must be a string, got {v!r}")


def validate(cfg: dict) -> None:
    _check_str(cfg, "input.url")
    _check_choice(cfg, "input.format", ("auto", "images", "webdataset", "parquet"))
    _check_str(cfg, "input.image_column")
    _check_str(cfg, "input.key_column")
    _check_int(cfg, "input.max_pixels", lo=1, allow_none=True)
    _check_str(cfg, "output.url")
    _check_choice(cfg, "output.image_format", ("jpg", "png", "webp"))
    _check_int(cfg, "output.image_size", lo=0, hi=4096)
    if 0 < cfg["output"]["image_size"] < 16:
        raise ConfigError("output.image_size", f"must be 0 (latents only) or at least 16, got {cfg['output']['image_size']}")
    _check_bool(cfg, "output.save_aligned")
    _check_bool(cfg, "output.overwrite")
    _check_bool(cfg, "output.contact_sheet")
    _check_int(cfg, "output.jpeg_quality", lo=1, hi=100)
    _check_str(cfg, "model.checkpoint")
    _check_int(cfg, "model.stages", lo=1, allow_none=True)
    _check_int(cfg, "model.batch_size", lo=1, hi=4096)
    _check_choice(cfg, "model.precision", ("auto", "fp32", "bf16", "fp16"))
    _check_choice(cfg, "model.compile", ("auto", True, False))
    _check_choice(cfg, "model.device", ("auto", "cpu", "cuda"))
    _check_int(cfg, "model.num_threads", lo=1, hi=1024, allow_none=True)
    _check_bool(cfg, "align.enabled")
    _check_choice(cfg, "align.policy", ("largest", "all"))
    _check_int(cfg, "align.output_size", lo=16, hi=4096)
    _check_int(cfg, "align.transform_size", lo=16, hi=8192)
    if cfg["align"]["transform_size"] < cfg["align"]["output_size"]:
        raise ConfigError("align.transform_size", "must be >= align.output_size")
    _check_int(cfg, "align.min_face_size", lo=0, hi=100_000)
    _check_int(cfg, "align.detect_max_side", lo=160, allow_none=True)
    _check_int(cfg, "align.max_upsample", lo=0, hi=3)
    _check_str(cfg, "storage.endpoint_url", allow_none=True)
    ep = cfg["storage"]["endpoint_url"]
    if ep is not None and not re.match(r"^https?://", ep):
        raise ConfigError("storage.endpoint_url", f"must start with http:// or https://, got {ep!r}")
    _check_str(cfg, "ray.address", allow_none=True)
    _check_int(cfg, "ray.num_cpus", lo=1, allow_none=True)
    _check_int(cfg, "ray.num_actors", lo=1, allow_none=True)
    _check_int(cfg, "ray.max_shards_in_flight", lo=1, allow_none=True)
    _check_int(cfg, "ray.chunk_size", lo=1, hi=100_000)
    _check_int(cfg, "shard_size", lo=1)
    _check_int(cfg, "retries", lo=0, hi=100)
    _check_bool(cfg, "progress")
    _check_bool(cfg, "output.paste_back")
    if cfg["output"]["paste_back"] and not cfg["align"]["enabled"]:
        raise ConfigError("output.paste_back", "needs align.enabled: the face is pasted back along its alignment quad")
    if cfg["output"]["paste_back"] and cfg["output"]["image_size"] == 0:
        raise ConfigError("output.paste_back", "needs images (output.image_size > 0)")
    _validate_edit(cfg)
    _check_choice(cfg, "task", TASKS)
    _check_int(cfg, "resize_factor", lo=1, hi=64)
    if cfg["task"] == "segmentation" and cfg["align"]["enabled"]:
        raise ConfigError("align.enabled", "must be false for task segmentation (inputs are label maps, not photos)")
    if _same_place(cfg["input"]["url"], cfg["output"]["url"]):
        raise ConfigError("output.url", "must not be the input location or inside it")


def _validate_edit(cfg: dict) -> None:
    e = cfg["edit"]
    d = e["directions"]
    if d is not None:
        if not isinstance(d, dict):
            raise ConfigError("edit.directions", f"must be a mapping name: path, got {type(d).__name__}")
        for name, url in d.items():
            if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", name):
                raise ConfigError("edit.directions", f"bad name {name!r} (letters, digits, _ and - only)")
            if not isinstance(url, str) or not url.strip():
                raise ConfigError(f"edit.directions.{name}", f"must be a path or URL, got {url!r}")
    a = e["alphas"]
    if not isinstance(a, list) or not a or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in a):
        raise ConfigError("edit.alphas", f"must be a non-empty list of numbers, got {a!r}")
    if any(x != x or abs(x) == float("inf") for x in a):
        raise ConfigError("edit.alphas", f"must be finite, got {a!r}")
    if len(set(map(float, a))) != len(a):
        raise ConfigError("edit.alphas", f"has duplicates: {a!r}")
    ly = e["layers"]
    if ly is not None and (not isinstance(ly, list) or len(ly) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in ly)
                           or not 0 <= ly[0] < ly[1]):
        raise ConfigError("edit.layers", f"must be null or [start, end) with 0 <= start < end, got {ly!r}")
    _check_bool(cfg, "edit.save_codes")
    if d and cfg["output"]["image_size"] == 0 and not e["save_codes"]:
        raise ConfigError("edit.save_codes", "with output.image_size 0 an edit writes nothing unless save_codes is true")


def _same_place(a: str, b: str) -> bool:
    # Writing into the input would make the next listing pick up our own outputs as inputs.
    na, nb = a.rstrip("/"), b.rstrip("/")
    return nb == na or nb.startswith(na + "/")


def redact(obj: Any) -> Any:
    """A copy with secret-looking values (and credentials inside URLs) replaced by '***'."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET_RE.search(str(k)) and v is not None else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return re.sub(r"(://)[^/@\s]+@", r"\1***@", obj)
    return obj


def fingerprint(cfg: dict, checkpoint_sha256: str, extra: dict | None = None) -> tuple[str, dict]:
    """Hash of everything that changes the outputs, and the values that went into it. ``extra``: values
    that are not config keys (hashes of files the config names)."""
    values = {k: _get(cfg, k) for k in FINGERPRINT_KEYS}
    values.update({k: _get(cfg, k) for k in OPTIONAL_FINGERPRINT_KEYS if _get(cfg, k) != _get(DEFAULTS, k)})
    values.update(extra or {})
    values["checkpoint_sha256"] = checkpoint_sha256
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
    return digest, values
