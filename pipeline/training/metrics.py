"""What a training run keeps: rank 0's scalars in ``metrics.jsonl`` and in TensorBoard event files (torch's
SummaryWriter). Its progress bar is the pipeline's (pipeline/progress.py)."""
from __future__ import annotations

import json
import os
import time

from torch.utils.tensorboard import SummaryWriter


class MetricsLogger:
    """Rank 0's scalars: one JSON object per line in ``metrics.jsonl`` plus an ``events.out.tfevents.*`` file in
    the same folder; both flushed at every call, so a crashed run keeps what it logged. Other ranks log nothing."""

    def __init__(self, log_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.log_dir = log_dir
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", encoding="utf-8")
        self._events = SummaryWriter(log_dir=log_dir)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled or not scalars:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **scalars}) + "\n")
        self._jsonl.flush()
        for tag, value in scalars.items():
            self._events.add_scalar(tag, value, int(step))
        self._events.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._events.close()

