"""The training config: defaults, file <- ``--set`` merging (pipeline/config_files.py), validation whose errors
name the key, the per-stage output paths, and the check of every file a run needs before anything is built."""
from __future__ import annotations

import copy
import os
from typing import Any

from models.losses import MissingPretrainedError, check_pretrained

from .config_files import ConfigError, merge_config, parse_overrides, read_config_file

STAGE_FINAL = "e2style_stage{k}.pt"
LATEST = "latest_model.pt"


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

LOSS_KEYS = tuple(DEFAULTS["loss"])
_BOOLEAN_KEYS = ("use_gpu", "progress", "model.learn_in_w", "model.start_from_latent_avg", "train.randomize_noise", "data.quantize")


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
    for k in LOSS_KEYS:
        _check_number(cfg, f"loss.{k}", lo=0)
    _check_number(cfg, "optim.lr", lo=0)
    _check_number(cfg, "optim.weight_decay", lo=0)
    if str(cfg["optim"]["name"]).lower() not in ("ranger", "adamw", "adam"):
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
    if d["mode"] == "images" and not d["url"]:
        raise TrainConfigError("data.url", "is required when data.mode is images")
    if d["mode"] == "images" and cfg["loss"]["latent"] > 0:
        raise TrainConfigError("loss.latent", "needs the true w: only available with data.mode: synthetic")
    for k in ("val_count", "val_batch_size", "shard_size", "shuffle_buffer"):
        _check_number(cfg, f"data.{k}", lo=1, integer=True)
    _check_number(cfg, "data.truncation", lo=0)
    _check_number(cfg, "num_workers", lo=1, integer=True, allow_none=True)
    for key in _BOOLEAN_KEYS:
        if not isinstance(_get(cfg, key), bool):
            raise TrainConfigError(key, f"must be true or false, got {_get(cfg, key)!r}")


def resolve_config(file_cfg: dict | None = None, overrides: dict | None = None) -> dict:
    """Defaults <- file <- overrides, validated; paths are checked later, before any step (``check_files``)."""
    cfg = copy.deepcopy(DEFAULTS)
    if file_cfg is not None and not isinstance(file_cfg, dict):
        raise TrainConfigError("<root>", "a config must be a mapping")
    merge_config(cfg, file_cfg or {}, TrainConfigError)
    merge_config(cfg, overrides or {}, TrainConfigError)
    if not cfg["output_dir"]:
        raise TrainConfigError("output_dir", "is required")
    cfg["train"]["stages"] = _stage_list(cfg["train"]["stages"])
    _check_optim_and_train(cfg)
    _check_data_and_workers(cfg)
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
    check_pretrained(cfg["loss"], cfg["pretrained"])
    for key in ("ir_se50", "alexnet", "lpips_lin", "parsing"):
        p = cfg["pretrained"][key]
        if p is not None and not os.path.isfile(p):
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
