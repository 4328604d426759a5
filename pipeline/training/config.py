"""The training configuration: typed, frozen sections built once from YAML + ``--set`` and validated before
anything is built, like the pipeline's (pipeline/config.py). The dataclass fields are the one list of keys and
defaults, so a config file names only what it changes; each error names the dotted key and the reason. The
keys are those of configs/train_*.yaml."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from models.losses import OFFICIAL_WEIGHTS

from ..config_files import ConfigError, as_mapping, from_mapping, merge_config, parse_overrides, read_config_file

__all__ = ["TrainConfigError", "TrainConfig", "PretrainedFiles", "EncoderConfig", "LossWeights", "OptimConfig",
           "StepsConfig", "DataConfig", "RayTrainConfig", "DEFAULTS", "resolve_config", "load_train_config"]


class TrainConfigError(ConfigError):
    def __init__(self, key: str, reason: str):
        super().__init__(key, reason)
        self.args = (f"invalid training config: {key}: {reason}",)


@dataclass(frozen=True)
class PretrainedFiles:
    ir_se50: str | None = None         # ArcFace IR-SE50 (identity loss; also the encoders' initialisation)
    parsing: str | None = None         # face-parsing U-Net (parse loss)
    alexnet: str | None = None         # torchvision AlexNet state dict (LPIPS loss and metric)
    lpips_lin: str | None = None       # lpips' alex.pth linear layers (if not inside the alexnet file)


@dataclass(frozen=True)
class EncoderConfig:
    encoder_base_width: int = 64       # IR-SE50 widths (w, 2w, 4w, 8w); 64 = official, >= 16
    learn_in_w: bool = False           # one w for all layers instead of W+ codes
    start_from_latent_avg: bool = True  # codes are offsets from the generator's average latent
    init_from_ir_se50: str | bool = "auto"  # auto: when pretrained.ir_se50 is given and fits | true | false
    init_checkpoint: str | None = None  # stage k-1 checkpoint when the first stage trained here is k > 1


@dataclass(frozen=True)
class LossWeights:                     # the paper's defaults; 0 turns a loss off (and needs no file)
    l2: float = OFFICIAL_WEIGHTS["l2"]  # pixel MSE
    lpips: float = OFFICIAL_WEIGHTS["lpips"]  # LPIPS-AlexNet (pretrained.alexnet)
    id: float = OFFICIAL_WEIGHTS["id"]  # multi-layer identity (pretrained.ir_se50)
    parse: float = OFFICIAL_WEIGHTS["parse"]  # multi-layer face parsing (pretrained.parsing)
    w_norm: float = OFFICIAL_WEIGHTS["w_norm"]  # distance of the codes from the average latent
    latent: float = OFFICIAL_WEIGHTS["latent"]  # MSE to the true w: synthetic data only


@dataclass(frozen=True)
class OptimConfig:
    name: str = "ranger"               # ranger | adamw | adam
    lr: float = 1e-4                   # learning rate
    weight_decay: float = 0.0          # the optimizer's weight decay (0: none)


@dataclass(frozen=True)
class StepsConfig:
    stages: tuple[int, ...] = (1,)     # stages to train, in order (an int k means [k]); consecutive
    steps: int = 1000                  # optimizer steps per stage
    batch_size: int = 4                # per worker
    seed: int = 0                      # model initialisation and every data stream (resumes see the same batches)
    randomize_noise: bool = False      # false: the generator's stored noise (as at inference)
    precision: str = "fp32"            # fp32 | bf16 (autocast on CUDA)
    device: str = "auto"               # auto | cpu | cuda (single-process runs; Ray picks the worker's device)
    log_every: int = 50                # steps between training scalars in the logs
    val_every: int = 500               # steps between validations (rank 0); also at each stage's end
    save_every: int = 500              # steps between resume points (latest_model.pt)
    max_seconds: float | None = None   # per stage wall-clock budget: stop early, validate and save
    grad_clip: float | None = None     # gradient norm clipped to this; null: none
    num_threads: int | None = None     # torch intra-op threads on CPU


@dataclass(frozen=True)
class DataConfig:
    mode: str = "synthetic"            # synthetic | images
    url: str | None = None             # images: folder / tar / parquet, local or s3://
    format: str = "auto"               # images: auto | images | webdataset | parquet
    endpoint_url: str | None = None    # images: S3-compatible endpoint
    shard_size: int = 1000             # images: files per shard of a folder (each rank reads whole shards)
    val_url: str | None = None         # images: held-out set; null = hold out the first val_count inputs
    val_count: int = 64                # held-out samples validated on
    val_batch_size: int = 16           # their batch size
    truncation: float = 1.0            # synthetic: w = avg + psi * (w - avg)
    quantize: bool = True              # synthetic: round images to 8-bit levels, as stored images are
    shuffle_buffer: int = 256          # images: samples shuffled in memory


@dataclass(frozen=True)
class RayTrainConfig:
    address: str | None = None         # null: a fresh embedded local Ray; an address: join that cluster
    cpus_per_worker: float = 1         # Ray CPUs each training worker holds (its torch threads)


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str | None = None      # local folder for checkpoints and logs (shared by all workers); required
    generator: str | None = None       # StyleGAN2 checkpoint {'g_ema', 'latent_avg'}; needed by stage 1
    pretrained: PretrainedFiles = field(default_factory=PretrainedFiles)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: StepsConfig = field(default_factory=StepsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    num_workers: int | None = None     # null: one process, no Ray; an int: Ray Train TorchTrainer with DDP
    use_gpu: bool = False              # Ray: one GPU per worker
    ray: RayTrainConfig = field(default_factory=RayTrainConfig)
    progress: bool = True              # a progress bar of each stage's steps (rank 0)

    def to_dict(self) -> dict[str, Any]:
        """The plain nested mapping (lists, not tuples), as a config file would write it."""
        return as_mapping(self)


# The defaults as the mapping that files and --set are merged into.
DEFAULTS: dict[str, Any] = TrainConfig().to_dict()
OPTIMIZERS = ("ranger", "adamw", "adam")
DATA_FORMATS = ("auto", "images", "webdataset", "parquet")
_BOOLEAN_KEYS = ("use_gpu", "progress", "model.learn_in_w", "model.start_from_latent_avg", "train.randomize_noise",
                 "data.quantize")
_OPTIONAL_STRING_KEYS = ("generator", "model.init_checkpoint", "data.url", "data.endpoint_url", "data.val_url",
                         "ray.address", *(f"pretrained.{k}" for k in DEFAULTS["pretrained"]))


def _get(cfg: dict, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _check_number(cfg: dict, key: str, lo=None, integer: bool = False, allow_none: bool = False) -> None:
    value = _get(cfg, key)
    if value is None and allow_none:
        return
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise TrainConfigError(key, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    if lo is not None and value < lo:
        raise TrainConfigError(key, f"must be >= {lo}, got {value}")


def _check_choice(cfg: dict, key: str, choices: tuple, wording: str) -> None:
    if _get(cfg, key) not in choices:
        raise TrainConfigError(key, f"must be {wording}, got {_get(cfg, key)!r}")


def _stage_list(stages: Any) -> list[int]:
    """``train.stages`` as a list: an int k means [k]; stages must be consecutive and increasing."""
    st = [stages] if isinstance(stages, int) and not isinstance(stages, bool) else stages
    if not isinstance(st, list) or not st or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in st):
        raise TrainConfigError("train.stages", f"must be a stage number >= 1 or a list of them, got {stages!r}")
    if st != list(range(st[0], st[0] + len(st))):
        raise TrainConfigError("train.stages", f"must be consecutive and increasing, got {st}")
    return st


def _check_optim_and_train(cfg: dict) -> None:
    for k in DEFAULTS["loss"]:
        _check_number(cfg, f"loss.{k}", lo=0)
    _check_number(cfg, "optim.lr", lo=0)
    _check_number(cfg, "optim.weight_decay", lo=0)
    if str(cfg["optim"]["name"]).lower() not in OPTIMIZERS:
        raise TrainConfigError("optim.name", f"must be ranger, adamw or adam, got {cfg['optim']['name']!r}")
    for k in ("steps", "batch_size", "log_every", "val_every", "save_every"):
        _check_number(cfg, f"train.{k}", lo=1, integer=True)
    _check_number(cfg, "train.seed", lo=0, integer=True)
    _check_number(cfg, "train.max_seconds", lo=0, allow_none=True)
    _check_number(cfg, "train.grad_clip", lo=0, allow_none=True)
    _check_number(cfg, "train.num_threads", lo=1, integer=True, allow_none=True)
    _check_choice(cfg, "train.precision", ("fp32", "bf16"), "fp32 or bf16")
    _check_choice(cfg, "train.device", ("auto", "cpu", "cuda"), "auto, cpu or cuda")
    _check_number(cfg, "model.encoder_base_width", lo=16, integer=True)
    if cfg["model"]["init_from_ir_se50"] not in ("auto", True, False):
        raise TrainConfigError("model.init_from_ir_se50", "must be auto, true or false")


def _check_data_and_workers(cfg: dict) -> None:
    d = cfg["data"]
    _check_choice(cfg, "data.mode", ("synthetic", "images"), "synthetic or images")
    _check_choice(cfg, "data.format", DATA_FORMATS, ", ".join(DATA_FORMATS))
    if d["mode"] == "images" and not d["url"]:
        raise TrainConfigError("data.url", "is required when data.mode is images")
    if d["mode"] == "images" and cfg["loss"]["latent"] > 0:
        raise TrainConfigError("loss.latent", "needs the true w: only available with data.mode: synthetic")
    for k in ("val_count", "val_batch_size", "shard_size", "shuffle_buffer"):
        _check_number(cfg, f"data.{k}", lo=1, integer=True)
    _check_number(cfg, "data.truncation", lo=0)
    _check_number(cfg, "num_workers", lo=1, integer=True, allow_none=True)
    _check_number(cfg, "ray.cpus_per_worker", lo=0)
    for key in _BOOLEAN_KEYS:
        if not isinstance(_get(cfg, key), bool):
            raise TrainConfigError(key, f"must be true or false, got {_get(cfg, key)!r}")
    for key in _OPTIONAL_STRING_KEYS:
        value = _get(cfg, key)
        if value is not None and not isinstance(value, str):
            raise TrainConfigError(key, f"must be a path or URL (a string) or null, got {value!r}")


def resolve_config(file_cfg: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- file <- overrides, validated, then frozen into the typed config; paths are checked later,
    before any step (pipeline/training/paths.py ``check_files``)."""
    cfg = copy.deepcopy(DEFAULTS)
    if file_cfg is not None and not isinstance(file_cfg, dict):
        raise TrainConfigError("<root>", "a config must be a mapping")
    merge_config(cfg, file_cfg or {}, TrainConfigError)
    merge_config(cfg, overrides or {}, TrainConfigError)
    if not cfg["output_dir"] or not isinstance(cfg["output_dir"], str):
        raise TrainConfigError("output_dir", f"is required (a folder path), got {cfg['output_dir']!r}")
    cfg["train"]["stages"] = _stage_list(cfg["train"]["stages"])
    _check_optim_and_train(cfg)
    _check_data_and_workers(cfg)
    return from_mapping(TrainConfig, cfg)


def load_train_config(path: str | None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """The config file at ``path`` with ``--set`` overrides (``["train.steps=100"]`` or a nested mapping)."""
    ov = overrides if isinstance(overrides, dict) else parse_overrides(overrides, TrainConfigError)
    return resolve_config(read_config_file(path, TrainConfigError), ov)
