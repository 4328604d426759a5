"""The training command line: ``run_pipeline.py train --config configs/train_*.yaml [--set key=value ...]``
(``python -m pipeline.training`` is the same). Every check (config keys, every file the run needs) happens
before anything is built or written; a refused run exits 2. ``num_workers: N`` runs the loop on N Ray Train
workers (workers/train_worker.py), otherwise in this process. What ``--help`` says of stages, resuming and data
is ``EPILOG``."""
from __future__ import annotations

import argparse
import json
import sys

from models.checkpoint import CheckpointError
from models.losses import MissingPretrainedError
from workers.train_worker import run_ray_training

from .config import TrainConfigError, load_train_config
from .loop import run_training
from .paths import check_files

__all__ = ["main"]

DESCRIPTION = "E2Style training: multi-stage encoders, on one device or on Ray Train workers (DDP)."
EPILOG = """\
stages: train.stages [1, 2, 3] trains them one after the other, each from the previous one's final checkpoint;
  a rerun with the same output_dir skips finished stages and resumes an unfinished one at its last saved step.
data: data.mode synthetic samples (w, G(w)) pairs from the generator; images reads aligned faces (folders,
  WebDataset tars, Parquet; local or s3://).
keys: every key with its default and meaning is in pipeline/training/config.py.
exit codes: 0 trained; 2 an invalid config or a missing file (nothing is written)."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="run_pipeline.py train", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", required=True, help="YAML training config (configs/train_*.yaml)")
    ap.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, dotted (train.steps=100); repeatable")
    args = ap.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        check_files(cfg)
    except (TrainConfigError, MissingPretrainedError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = run_ray_training(cfg) if cfg.num_workers is not None else run_training(cfg)
    print(json.dumps(results, indent=2, default=str))
    return 0
