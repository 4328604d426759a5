"""The training loop: one stage at a time on one device, as one rank of a DDP group when world_size > 1.

A stage trains to ``train.steps`` optimizer steps, resuming from its latest checkpoint (same step, optimizer
state and RNG, and the same batches, so a resumed run ends where an uninterrupted one would), validates on
rank 0 every ``val_every`` steps and at the end, and writes its final checkpoint. A stage whose final
checkpoint exists is skipped. What it writes where: pipeline/training/paths.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models.losses import E2StyleLoss
from models.lpips import load_lpips
from models.optim import build_optimizer

from ..checkpoints import resolve_device, use_threads
from ..progress import Progress
from .config import TrainConfig
from .data import held_out_set, training_batches
from .metrics import MetricsLogger
from .model import build_stage_model, load_resume_point, restore_rng, save_checkpoint, stage_forward, validate_model
from .paths import RUN_CONFIG, check_files, stage_paths

__all__ = ["StageRun", "train_step", "train_stage", "run_training"]


@dataclass
class StageRun:
    """Everything one rank's stage k works with; built by ``_start_stage``."""
    cfg: TrainConfig
    k: int
    rank: int
    world_size: int
    device: torch.device
    paths: dict[str, str]
    log: Callable[[str], None]
    report: Callable[[dict], None] | None
    model: torch.nn.Module
    train_enc: torch.nn.Module           # the trainable encoder, DDP-wrapped when world_size > 1
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    loss_fn: E2StyleLoss
    lpips_metric: torch.nn.Module | None
    val_x: torch.Tensor | None = None
    val_w: torch.Tensor | None = None
    exclude: set[str] = field(default_factory=set)
    logger: MetricsLogger | None = None
    t0: float = 0.0


def _configure_device(cfg: TrainConfig, device: torch.device) -> None:
    if device.type == "cpu":
        use_threads(cfg.train.num_threads)
    if device.type == "cuda":
        # Speed over bit-exactness, for training only: TF32 matmuls and autotuned cuDNN kernels (the inversion
        # pipeline leaves both off, so its outputs stay those checked against the float32 reference).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def _build_losses(cfg: TrainConfig, device: torch.device, rank: int, log) -> tuple[E2StyleLoss, torch.nn.Module | None]:
    """The weighted loss, and the LPIPS net for validation (the loss's own, or loaded for rank 0 alone when
    its files are configured but the LPIPS loss is off)."""
    loss_fn = E2StyleLoss(dataclasses.asdict(cfg.loss), dataclasses.asdict(cfg.pretrained)).to(device)
    lpips_metric = loss_fn.lpips.net if loss_fn.lpips is not None else None
    if lpips_metric is None and cfg.pretrained.alexnet and rank == 0:
        try:
            lpips_metric = load_lpips(cfg.pretrained.alexnet, cfg.pretrained.lpips_lin).to(device)
        except Exception as e:  # noqa: BLE001 - the metric is optional
            log(f"LPIPS metric unavailable: {e}")
    return loss_fn, lpips_metric


def _start_stage(cfg: TrainConfig, k: int, rank: int, world_size: int, device: torch.device, log, report) -> tuple[StageRun, int]:
    """Build (or resume) stage k on this rank: model, optimizer, losses, held-out data. Returns (run, step).
    The order of the steps is the order of their RNG draws, which a resumed run must repeat."""
    paths = stage_paths(cfg, k)
    model, enc = build_stage_model(cfg, k, log)
    resume_state = None
    if os.path.isfile(paths["latest"]):
        resume_state = load_resume_point(paths["latest"], model, k)
        log(f"stage {k}: resuming from {paths['latest']} at step {int(resume_state['step'])}")
    model.to(device)
    model.decoder.set_modconv_mode("shared")  # same function as the grouped form, one dense conv per layer
    model.eval()
    enc.train()
    train_enc = DistributedDataParallel(enc, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else enc
    params = [p for p in enc.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optim.name, params, lr=float(cfg.optim.lr), weight_decay=float(cfg.optim.weight_decay))
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        restore_rng(resume_state, device)
    loss_fn, lpips_metric = _build_losses(cfg, device, rank, log)
    run = StageRun(cfg, k, rank, world_size, device, paths, log, report, model, train_enc, params, optimizer, loss_fn, lpips_metric)
    run.val_x, run.val_w, run.exclude = held_out_set(cfg, model.decoder, _avg_w(model), rank)
    return run, int(resume_state["step"]) if resume_state is not None else 0


def _avg_w(model) -> torch.Tensor | None:
    return model.latent_avg.reshape(-1, model.decoder.style_dim)[0] if model.start_from_latent_avg else None


def train_step(run: StageRun, x: torch.Tensor, w: torch.Tensor | None) -> tuple[float, dict[str, torch.Tensor]]:
    """One optimizer step on batch ``x`` (true codes ``w`` or None); returns (loss, its weighted parts)."""
    tcfg, model = run.cfg.train, run.model
    x = x.to(run.device)
    if tcfg.precision == "bf16":
        with torch.autocast(run.device.type, dtype=torch.bfloat16):
            y_hat, codes = stage_forward(model, run.train_enc, run.k, x, tcfg.randomize_noise)
        y_hat, codes = y_hat.float(), codes.float()
    else:
        y_hat, codes = stage_forward(model, run.train_enc, run.k, x, tcfg.randomize_noise)
    loss, parts = run.loss_fn(y_hat, x, codes, model.latent_avg if model.start_from_latent_avg else None, w)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DDP: gradients all-reduced (averaged) across ranks here
    if tcfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.params, tcfg.grad_clip)
    run.optimizer.step()
    return float(loss.detach()), parts


def _validate(run: StageRun, at: int) -> dict[str, float]:
    if run.rank != 0:
        return {}
    m = validate_model(run.model, run.val_x, run.k, run.cfg.data.val_batch_size, run.device, run.lpips_metric, run.val_w)
    run.logger.log(at, {f"val/{kk}": v for kk, v in m.items()})
    run.log(f"stage {run.k} step {at}: " + ", ".join(f"{kk} {v:.4f}" for kk, v in m.items() if kk.endswith(("psnr", "lpips"))))
    return m


def _out_of_time(run: StageRun) -> bool:
    """Past ``train.max_seconds`` on any rank (all ranks stop at the same step)."""
    limit = run.cfg.train.max_seconds
    out = limit is not None and time.time() - run.t0 > limit
    if run.world_size > 1 and limit is not None:
        flag = torch.tensor([float(out)], device=run.device)
        dist.all_reduce(flag)
        out = bool(flag.item() > 0)
    return out


def _run_steps(run: StageRun, batches: Iterator, step: int) -> dict:
    """Steps until ``train.steps`` or ``max_seconds``; logs, validates and saves the resume point on schedule."""
    tcfg, k = run.cfg.train, run.k
    steps = tcfg.steps
    out = {"step": step, "loss_first": None, "loss_last": None, "stopped_early": False}
    # The bar on rank 0 when ``progress`` is on; no periodic lines (the stage's own log lines say where it is).
    progress = Progress(run.cfg.progress and run.rank == 0, steps, interval_s=0, unit="steps", initial=step,
                        desc=f"stage {k}")
    try:
        while step < steps:
            lv, parts = train_step(run, *next(batches))
            step += 1
            if not math.isfinite(lv):
                raise FloatingPointError(f"stage {k} step {step}: loss is {lv}")
            out.update(step=step, loss_last=lv, loss_first=lv if out["loss_first"] is None else out["loss_first"])
            progress.commit(1)
            progress.note(f"loss {lv:.4f}")
            if run.rank == 0 and (step % tcfg.log_every == 0 or step == 1):
                run.logger.log(step, {"train/loss": lv, **{f"train/{kk}": float(v) for kk, v in parts.items()},
                                      "train/steps_per_s": step / max(time.time() - run.t0, 1e-9)})
            out_of_time = _out_of_time(run)
            if step % tcfg.val_every == 0 and step < steps and not out_of_time:
                val = _validate(run, step)
                if run.report is not None:
                    run.report({"stage": k, "step": step, "loss": lv, **val})
            if run.rank == 0 and step % tcfg.save_every == 0 and step < steps and not out_of_time:
                save_checkpoint(run.paths["latest"], run.model, run.cfg, k, step, run.optimizer)
            if out_of_time:
                run.log(f"stage {k}: max_seconds reached at step {step}")
                out["stopped_early"] = True
                break
    finally:
        progress.close()
    return out


def _finish_stage(run: StageRun, step: int) -> dict[str, float]:
    """Final validation and checkpoints (rank 0), with every rank past its last step first."""
    if run.world_size > 1:
        dist.barrier()
    val = _validate(run, step)
    if run.rank == 0:
        save_checkpoint(run.paths["latest"], run.model, run.cfg, run.k, step, run.optimizer)
        save_checkpoint(run.paths["final"], run.model, run.cfg, run.k, step)
    if run.world_size > 1:
        dist.barrier()
    return val


def train_stage(cfg: TrainConfig, k: int, *, rank: int = 0, world_size: int = 1, device=None,
                report: Callable[[dict], None] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Train stage k to ``train.steps`` (resuming from its latest checkpoint), write its final checkpoint.
    ``device``: this rank's device (Ray Train's, a DDP rank's); None: ``train.device``.
    Returns {'stage', 'step', 'final', 'val': {...}, 'loss_first', 'loss_last', 'seconds', 'stopped_early'}."""
    log = log or (lambda msg: print(f"[train] {msg}", file=sys.stderr, flush=True) if rank == 0 else None)
    paths = stage_paths(cfg, k)
    device = torch.device(device if device is not None else resolve_device(cfg.train.device))
    _configure_device(cfg, device)
    if os.path.isfile(paths["final"]):
        log(f"stage {k}: already trained ({paths['final']}), skipping")
        return {"stage": k, "final": paths["final"], "skipped": True}
    run, step = _start_stage(cfg, k, rank, world_size, device, log, report)
    batches = training_batches(cfg, k, run.model.decoder, _avg_w(run.model), step, rank, world_size, run.exclude, device)
    run.logger = MetricsLogger(paths["logs"], enabled=rank == 0)
    run.t0 = time.time()
    log(f"stage {k}: training {sum(p.numel() for p in run.params)} parameters, steps {step}->{cfg.train.steps}, "
        f"batch {cfg.train.batch_size} x {world_size} worker(s), {cfg.data.mode} data, "
        f"losses {({kk: v for kk, v in run.loss_fn.weights.items() if v > 0})}, device {device}")
    steps = _run_steps(run, batches, step)
    val = _finish_stage(run, steps["step"])
    run.logger.close()
    result = {"stage": k, "step": steps["step"], "final": paths["final"], "val": val, "loss_first": steps["loss_first"],
              "loss_last": steps["loss_last"], "seconds": round(time.time() - run.t0, 2), "stopped_early": steps["stopped_early"]}
    if report is not None:
        report({"stage": k, "step": steps["step"], "done": True, **val})
    return result


def run_training(cfg: TrainConfig, *, rank: int = 0, world_size: int = 1, device=None, report=None, log=None) -> list[dict]:
    """Train ``train.stages`` in order in this process (one rank of a DDP group when world_size > 1)."""
    check_files(cfg)
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, RUN_CONFIG), "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    return [train_stage(cfg, k, rank=rank, world_size=world_size, device=device, report=report, log=log)
            for k in cfg.train.stages]
