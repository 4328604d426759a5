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

from models.checkpoint import CheckpointError, e2style_state_dict, load_stylegan2, read_checkpoint
from models.losses import MissingPretrainedError, check_pretrained

from ..checkpoints import checkpoint_dims
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
    """Every file the run will need, checked before anything is built, trained or written: there, and of the kind
    the run needs (the generator a StyleGAN2 one, a stage's starting point an E2Style one with enough stages).
    Errors name the key and the file."""
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
            raise FileNotFoundError(f"generator: {cfg.generator}: no such file (a StyleGAN2 checkpoint; the demo's "
                                    f"is demo/generator.pt)")
        try:
            load_stylegan2(cfg.generator)
        except CheckpointError as e:
            raise CheckpointError(f"generator: {e}") from None
    # A stage k > 1 is built from its stage k-1 checkpoint, a resumed one too (its resume point then loads over it).
    if first > 1 and not os.path.isfile(stage_paths(cfg, first)["final"]):
        init = cfg.model.init_checkpoint or stage_paths(cfg, first - 1)["final"]
        if not os.path.isfile(init):
            raise FileNotFoundError(f"model.init_checkpoint: {init}: no such file "
                                    f"(stage {first} starts from a stage {first - 1} checkpoint)")
        try:
            e2style_state_dict(read_checkpoint(init), init)  # a generator's or another model's file, named as such
        except CheckpointError as e:
            raise CheckpointError(f"model.init_checkpoint: {e}") from None
        if checkpoint_dims(init)["num_stages"] < first - 1:
            raise TrainConfigError("model.init_checkpoint", f"{init} has {checkpoint_dims(init)['num_stages']} "
                                                            f"stage(s); training stage {first} needs {first - 1}")
