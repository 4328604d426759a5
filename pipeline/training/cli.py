"""The training command line: ``run_pipeline.py train --config configs/train_*.yaml [--set key=value ...]``
(``python -m pipeline.training`` is the same). Every check (config keys, every file the run needs) happens
before anything is built or written; a refused run exits 2. ``num_workers: N`` runs the loop on N Ray Train
workers (workers/train_worker.py), otherwise in this process.

``train.stages: [1, 2, 3]`` runs the stages one after the other, each starting from the previous one's final
checkpoint; a rerun with the same ``output_dir`` skips finished stages and resumes an unfinished one at its
saved step with its optimizer state. Data (``data.mode``): ``synthetic`` samples (w, G(w)) pairs from the
generator on the fly; ``images`` reads aligned faces with the pipeline's readers (image folders, WebDataset
tars, Parquet; local or S3).
"""
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="run_pipeline.py train", description=DESCRIPTION, epilog=__doc__.split("\n\n", 1)[1],
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
