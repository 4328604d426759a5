"""The pipeline's configuration: typed, frozen sections built once from YAML + ``--set`` and validated up front.

Every key has a default here (the dataclass fields are the one list of keys and defaults), so a config file
only names what it changes. Validation happens before Ray starts or anything is read, and each error names
the dotted key and the reason: a typo in a batch job found after an hour of queueing is the expensive kind
of typo. Each stage and worker is handed the section it uses (``cfg.model``, ``cfg.output``, ...), not the
whole tree.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .config_files import ConfigError, as_mapping, from_mapping, merge_config, parse_overrides, plain, read_config_file

__all__ = ["ConfigError", "PipelineConfig", "InputConfig", "OutputConfig", "EditConfig", "ModelConfig",
           "AlignConfig", "StorageConfig", "RayConfig", "PrepareConfig", "DEFAULTS", "TASKS", "DIRECTION_NAME",
           "load_config", "parse_overrides", "read_config_file", "merge_config", "resolve", "validate", "redact",
           "fingerprint", "FINGERPRINT_KEYS"]

TASKS = ("invert", "colorize", "denoise", "inpaint", "super_resolution", "sketch", "segmentation")
# Names of edit directions: they become tar member tags and Parquet column names.
DIRECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class InputConfig:
    url: str | None = None             # s3://bucket/prefix, a local dir, or one file
    format: str = "auto"               # auto | images | webdataset | parquet
    image_column: str = "auto"         # parquet only: auto finds jpg/png/webp/image/img/bytes
    key_column: str = "auto"           # parquet only: auto finds key/__key__/id, else the row number
    max_pixels: int | None = 50_000_000  # decompression-bomb limit per image


@dataclass(frozen=True)
class OutputConfig:
    url: str | None = None             # where the outputs go: s3://bucket/prefix or a local dir (not inside input.url)
    image_format: str = "jpg"          # jpg | png | webp
    image_size: int = 256              # 0 = latents only: no reconstructions, the last generator pass is skipped
    save_aligned: bool = False         # also write each aligned input face, <key>.aligned.<ext>
    overwrite: bool = False            # replace an output made with another checkpoint or output-changing config
    jpeg_quality: int = 95             # 1-100, for image_format jpg
    contact_sheet: bool = False        # write contact_sheet.png (aligned inputs above reconstructions; needs save_aligned)
    paste_back: bool = False           # also write <key>.[<variant>.]paste.<ext>: the face pasted into the original photo
    lease_wait_s: int = 0              # another run holds the output's lease (pipeline/lease.py): wait up to this
                                       # long for it to end (a scheduler's queue), then refuse; 0: refuse at once
    lease_stale_s: int = 300           # a lease whose heartbeat (every lease_stale_s / 20 s) is older than this is a
                                       # dead run's and is taken over (at once on the holder's machine if its process
                                       # is gone); keep it above the longest pause of a driver (not in the fingerprint)


@dataclass(frozen=True)
class EditConfig:                      # latent editing after inversion (docs/editing_and_tasks.md)
    directions: dict[str, str] | None = None  # {name: path or URL of a .npy of shape (D,), (1, D) or (n_latent, D)}
    alphas: tuple[float, ...] = (-3, 3)  # edit = codes + alpha * direction, one variant per direction and alpha
    layers: tuple[int, int] | None = None  # [start, end): W+ layers the edit touches; null = all
    save_codes: bool = False           # edited codes as extra Parquet columns codes_edit_<name>_<alpha>


@dataclass(frozen=True)
class ModelConfig:
    checkpoint: str | None = None      # local path or any fsspec URL (s3://...)
    stages: int | None = None          # null = all stages of the checkpoint
    batch_size: int | str = "auto"     # faces per batch: auto (64 on GPUs, 16 on CPUs) | an integer (<= 128 on GPUs)
    precision: str = "auto"            # auto (fp16 on GPUs, fp32 on CPUs) | fp32 | bf16 | fp16
    compile: str | bool = "auto"       # torch.compile the networks: auto (on GPUs) | true | false
    device: str = "auto"               # auto (cuda when the actor has a GPU) | cpu | cuda
    num_threads: int | None = None     # torch CPU threads per actor; null = the actor's Ray CPU share (1)


@dataclass(frozen=True)
class AlignConfig:
    enabled: bool = True               # FFHQ face alignment of photos; false: inputs are already aligned faces
    policy: str = "largest"            # largest | all
    output_size: int = 256             # side of the aligned face (px) the encoder sees
    transform_size: int = 1024         # FFHQ's 4x output; 512: up to 1.5x faster alignment, crops within ~54 dB
    min_face_size: int = 0             # ignore faces whose detector box side (source px) is smaller
    detect_max_side: int | None = 384  # dlib backend: detection from the pyramid level at most this long (null: full)
    device_detect_max_side: int | None = None  # the same for the torch backend; null: the photo's full pyramid,
                                       # which takes less wall time on a GPU than the coarse start's many steps
                                       # (BENCHMARKS.md)
    max_upsample: int = 1              # dlib upsamplings tried when nothing was found (0: never; each ~4x the cost)
    upsample_max_side: int | None = 800  # upsampling only on photos at most this long (null: any): bounds the
                                       # cost of a photo without a face
    device_lanes: int | None = None    # torch backend: chunks an actor aligns at once, each on a CUDA stream of its
                                       # own; null: 4 on a GPU of 64 GB or more, 2 on a smaller one, 1 on a CPU
                                       # (speed only: not in the fingerprint)
    backend: str = "auto"              # where alignment runs: dlib (CPU tasks) | torch (on the inversion actor's
                                       # device, GPU or CPU) | auto (torch when the actor has a GPU)


@dataclass(frozen=True)
class StorageConfig:
    endpoint_url: str | None = None    # S3-compatible endpoint (MinIO, Ceph, a test server)


# The largest batch benchmarks/check_gpu.py checks every GPU path at against the official function
# (BENCHMARKS.md): a cuDNN defect made one formulation wrong above some batch sizes and right below them, so
# GPU batches stay within what was checked (larger batches gain little: BENCHMARKS.md).
MAX_GPU_BATCH_SIZE = 128


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None         # null = a fresh embedded local Ray; "auto" or an address = join a cluster
    num_cpus: int | None = None        # embedded Ray only; null = all cores
    num_actors: int | None = None      # inversion actors; null = one per GPU, or 1 without GPUs
    max_shards_in_flight: int | None = None  # null = CPUs available for CPU work + 1
    chunk_size: int = 64               # inputs per prepared chunk handed from CPU to GPU work
    # Niceness of the CPU tasks that read and decode while the inversion actors align photos (align.backend
    # torch): the actors' host steps are alignment's serial path, the tasks are throughput work that should
    # yield a core to them at once. 0: none. (Results do not depend on it: not in the run's fingerprint.)
    cpu_task_niceness: int = 10
    actor_resources: dict[str, float] | None = None  # Ray custom resources of each inversion actor (placement:
                                       # {inverter: 1} runs them on nodes started with --resources '{"inverter": 1}')


@dataclass(frozen=True)
class PrepareConfig:
    """What the CPU side needs before inversion (read -> decode -> align -> chunks): a view of the config."""
    input: InputConfig
    align: AlignConfig
    endpoint_url: str | None
    chunk_size: int
    task: str
    keep_originals: bool               # output.paste_back: chunks carry each face's original bytes
    niceness: int = 0                  # ray.cpu_task_niceness: applied when the actors align (backend torch)


@dataclass(frozen=True)
class PipelineConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    task: str = "invert"               # invert | colorize | denoise | inpaint | super_resolution | sketch | segmentation
    resize_factor: int = 4             # super_resolution: the encoder sees the face down-sampled by this factor
    model: ModelConfig = field(default_factory=ModelConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    shard_size: int = 1000             # images per shard for folder inputs
    retries: int = 2                   # extra attempts per failing shard
    progress: bool = True              # a progress bar on the terminal
    progress_interval_s: int = 60      # seconds between one-line progress log records without the bar (0: none)

    def to_dict(self) -> dict[str, Any]:
        """The plain nested mapping (lists, not tuples), as a config file would write it."""
        return as_mapping(self)

    def get(self, dotted: str) -> Any:
        cur: Any = self
        for part in dotted.split("."):
            cur = getattr(cur, part)
        return cur

    @property
    def prepare(self) -> PrepareConfig:
        return PrepareConfig(self.input, self.align, self.storage.endpoint_url, self.ray.chunk_size, self.task,
                             self.output.paste_back, self.ray.cpu_task_niceness)


# The defaults as the mapping that files and --set are merged into.
DEFAULTS: dict[str, Any] = PipelineConfig().to_dict()

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
                             "task", "resize_factor", "align.min_face_size", "align.detect_max_side", "align.max_upsample",
                             "align.device_detect_max_side",
                             "align.upsample_max_side")
# shard_size is not in it: committed image shards keep their membership whatever it is now, so changing
# it only changes how the files not yet processed are grouped.

_SECRET_RE = re.compile(r"(secret|password|token|credential|access_key|session)", re.I)


def _get(cfg: dict, dotted: str) -> Any:
    cur: Any = cfg
    for part in dotted.split("."):
        cur = cur[part]
    return cur


def resolve(file_cfg: dict | None, overrides: dict | None = None) -> PipelineConfig:
    """Defaults <- config file <- overrides, validated, then frozen into the typed config."""
    cfg = copy.deepcopy(DEFAULTS)
    if file_cfg is not None and not isinstance(file_cfg, dict):
        raise ConfigError("<root>", "a config file must be a mapping")
    merge_config(cfg, file_cfg or {})
    merge_config(cfg, overrides or {})
    validate(cfg)
    return from_mapping(PipelineConfig, cfg)


def load_config(path: str | None, overrides: list[str] | dict | None = None) -> PipelineConfig:
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
    _check_int(cfg, "output.lease_wait_s", lo=0)
    _check_int(cfg, "output.lease_stale_s", lo=20)
    _check_bool(cfg, "output.contact_sheet")
    _check_int(cfg, "output.jpeg_quality", lo=1, hi=100)
    _check_str(cfg, "model.checkpoint")
    _check_int(cfg, "model.stages", lo=1, allow_none=True)
    batch_size = _get(cfg, "model.batch_size")
    if isinstance(batch_size, str) and batch_size != "auto":
        raise ConfigError("model.batch_size", f"must be 'auto' or an integer, got {batch_size!r}")
    if batch_size != "auto":
        _check_int(cfg, "model.batch_size", lo=1, hi=4096)
    _check_choice(cfg, "model.precision", ("auto", "fp32", "bf16", "fp16"))
    _check_choice(cfg, "model.compile", ("auto", True, False))
    _check_choice(cfg, "model.device", ("auto", "cpu", "cuda"))
    if batch_size != "auto" and batch_size > MAX_GPU_BATCH_SIZE and _get(cfg, "model.device") != "cpu":
        # Refused here, before anything is written, where the actors could land on a GPU.
        raise ConfigError("model.batch_size", f"at most {MAX_GPU_BATCH_SIZE} unless model.device is cpu (the "
                                              f"largest batch checked on GPUs), got {batch_size}")
    _check_int(cfg, "model.num_threads", lo=1, hi=1024, allow_none=True)
    _check_bool(cfg, "align.enabled")
    _check_choice(cfg, "align.policy", ("largest", "all"))
    _check_int(cfg, "align.output_size", lo=16, hi=4096)
    _check_int(cfg, "align.transform_size", lo=16, hi=8192)
    if cfg["align"]["transform_size"] < cfg["align"]["output_size"]:
        raise ConfigError("align.transform_size", "must be >= align.output_size")
    _check_int(cfg, "align.min_face_size", lo=0, hi=100_000)
    _check_int(cfg, "align.detect_max_side", lo=160, allow_none=True)
    _check_int(cfg, "align.device_detect_max_side", lo=160, allow_none=True)
    _check_int(cfg, "align.device_lanes", lo=1, hi=16, allow_none=True)
    _check_int(cfg, "align.max_upsample", lo=0, hi=3)
    _check_int(cfg, "align.upsample_max_side", lo=1, allow_none=True)
    _check_choice(cfg, "align.backend", ("auto", "dlib", "torch"))
    _check_str(cfg, "storage.endpoint_url", allow_none=True)
    ep = cfg["storage"]["endpoint_url"]
    if ep is not None and not re.match(r"^https?://", ep):
        raise ConfigError("storage.endpoint_url", f"must start with http:// or https://, got {ep!r}")
    _check_str(cfg, "ray.address", allow_none=True)
    _check_int(cfg, "ray.num_cpus", lo=1, allow_none=True)
    _check_int(cfg, "ray.num_actors", lo=1, allow_none=True)
    _check_int(cfg, "ray.max_shards_in_flight", lo=1, allow_none=True)
    _check_int(cfg, "ray.chunk_size", lo=1, hi=100_000)
    _check_int(cfg, "ray.cpu_task_niceness", lo=0, hi=19)
    res = cfg["ray"]["actor_resources"]
    if res is not None:
        if not isinstance(res, dict):
            raise ConfigError("ray.actor_resources", f"must be a mapping resource: amount, got {type(res).__name__}")
        for name, amount in res.items():
            if not isinstance(name, str) or not name or isinstance(amount, bool) or not isinstance(amount, (int, float)) \
                    or not 0 <= amount < float("inf"):
                raise ConfigError("ray.actor_resources", f"{name!r}: amount must be a number >= 0, got {amount!r}")
    _check_int(cfg, "shard_size", lo=1)
    _check_int(cfg, "retries", lo=0, hi=100)
    _check_bool(cfg, "progress")
    _check_int(cfg, "progress_interval_s", lo=0)
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
            if not isinstance(name, str) or not DIRECTION_NAME.match(name):
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


def fingerprint(cfg: PipelineConfig, checkpoint_sha256: str, extra: dict | None = None) -> tuple[str, dict]:
    """Hash of everything that changes the outputs, and the values that went into it. ``extra``: values
    that are not config keys (hashes of files the config names)."""
    default = PipelineConfig()
    values = {k: cfg.get(k) for k in FINGERPRINT_KEYS}
    values.update({k: cfg.get(k) for k in OPTIONAL_FINGERPRINT_KEYS if cfg.get(k) != default.get(k)})
    values.update(extra or {})
    values["checkpoint_sha256"] = checkpoint_sha256
    values = plain(values)  # as they read back from _run.json
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
    return digest, values
