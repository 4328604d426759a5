"""Where a training run writes each stage, and the check of every file a run needs before anything is built.

Output layout (``output_dir``):
    train_config.json                      the resolved config
    stage{k}/checkpoints/latest_model.pt   official layout + ``train_state`` (step, optimizer, RNG): resume point
    stage{k}/e2style_stage{k}.pt           the stage's final model, official layout (``load_e2style``)
    stage{k}/logs/metrics.jsonl            train and validation scalars, one JSON object per line
    stage{k}/logs/events.out.tfevents.*    the same scalars for TensorBoard
"""
from __future__ import annotations

import dataclasses
import os

from models.losses import MissingPretrainedError, check_pretrained

from .config import TrainConfig, TrainConfigError

__all__ = ["RUN_CONFIG", "STAGE_FINAL", "LATEST", "stage_paths", "check_files"]

RUN_CONFIG = "train_config.json"
STAGE_FINAL = "e2style_stage{k}.pt"
LATEST = "latest_model.pt"


def stage_paths(cfg: TrainConfig, k: int) -> dict[str, str]:
    """Stage k's folder ('dir'), final model ('final'), resume point ('latest') and log folder ('logs')."""
    root = os.path.join(cfg.output_dir, f"stage{k}")
    return {"dir": root, "final": os.path.join(root, STAGE_FINAL.format(k=k)),
            "latest": os.path.join(root, "checkpoints", LATEST), "logs": os.path.join(root, "logs")}


def check_files(cfg: TrainConfig) -> None:
    """Every file the run will need, checked before anything is built or trained; errors name the key."""
    pretrained = dataclasses.asdict(cfg.pretrained)
    check_pretrained(dataclasses.asdict(cfg.loss), pretrained)
    for key, p in pretrained.items():
        if p is not None and not os.path.isfile(p):
            raise MissingPretrainedError(f"pretrained.{key}: {p}: no such file")
    first = cfg.train.stages[0]
    needs_generator = first == 1 and not os.path.isfile(stage_paths(cfg, 1)["final"])
    if needs_generator:
        if not cfg.generator:
            raise TrainConfigError("generator", "is required to train stage 1 (a StyleGAN2 checkpoint with 'g_ema')")
        if not os.path.isfile(cfg.generator):
            raise FileNotFoundError(f"generator: {cfg.generator}: no such file")
    first_paths = stage_paths(cfg, first)
    if first > 1 and not os.path.isfile(first_paths["final"]) and not os.path.isfile(first_paths["latest"]):
        init = cfg.model.init_checkpoint or stage_paths(cfg, first - 1)["final"]
        if not os.path.isfile(init):
            raise FileNotFoundError(f"model.init_checkpoint: {init}: no such file "
                                    f"(stage {first} starts from a stage {first - 1} checkpoint)")
