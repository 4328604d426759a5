"""Progress of a run, and its summary at the end: a tqdm bar on a terminal (``progress: true``), and otherwise one plain log line every
``progress_interval_s`` seconds (images, images/s, shards done, ETA): what ``ray job logs`` of a cluster job
can show."""
from __future__ import annotations

import collections
import logging
import sys
import time
from typing import Callable

from tqdm import tqdm

__all__ = ["Progress", "format_duration", "summarise", "format_summary"]

log = logging.getLogger("e2style.progress")


def format_duration(s: float) -> str:
    s = int(round(s))
    h, m = divmod(s, 3600)
    m, sec = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class Progress:
    def __init__(self, bar: bool, total_images: int | None, total_shards: int, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] = log.info):
        self.total_images, self.total_shards = total_images, total_shards
        self.shards_done = self.shards_failed = self.images = 0
        self.interval_s, self.clock, self.emit = interval_s, clock, emit
        self.t0 = self.last = clock()
        self.bar = None
        if bar:
            self.bar = tqdm(total=total_images, unit="img", dynamic_ncols=True, smoothing=0.1, file=sys.stderr)
            self._post()

    def _post(self):
        if self.bar is not None:
            self.bar.set_postfix_str(f"shards {self.shards_done}/{self.total_shards}")

    def add_images(self, n: int):
        self.images += n
        if self.bar is not None:
            self.bar.update(n)

    def shard_done(self, failed: bool = False):
        if failed:
            self.shards_failed += 1
        else:
            self.shards_done += 1
        if self.bar is not None:
            if self.total_images is None and self.shards_done:
                self.bar.total = max(self.estimated_total() or 0, self.images)
                self.bar.refresh()
            self._post()

    def estimated_total(self) -> int | None:
        """The images of the whole run: known for image folders, else extrapolated from the finished shards."""
        if self.total_images is not None:
            return self.total_images
        if not self.shards_done:
            return None
        left = self.total_shards - self.shards_done - self.shards_failed
        return self.images + int(self.images / self.shards_done * left)

    def line(self) -> str:
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = self.images / elapsed
        done = self.shards_done + self.shards_failed
        total = self.estimated_total()
        if total is not None and rate > 0:
            eta = format_duration(max(total - self.images, 0) / rate)
        elif done:
            eta = format_duration(elapsed / done * (self.total_shards - done))
        else:
            eta = "?"
        failed = f" ({self.shards_failed} failed)" if self.shards_failed else ""
        return (f"progress: {self.images} images in {format_duration(elapsed)}, {rate:.1f} images/s, "
                f"shards {self.shards_done}/{self.total_shards} done{failed}, ETA {eta}")

    def tick(self):
        """Called often; without a bar, logs ``line()`` once per interval."""
        if self.bar is not None or not self.interval_s:
            return
        t = self.clock()
        if t - self.last >= self.interval_s:
            self.last = t
            self.emit(self.line())

    def close(self):
        if self.bar is not None:
            self.bar.close()


def summarise(stats_all: list[dict], wall: float, processing: float = 0.0) -> dict:
    counts: dict[str, int] = collections.Counter()
    timings: dict[str, float] = collections.Counter()
    inputs = 0
    for st in stats_all:
        counts.update(st.get("counts", {}))
        timings.update(st.get("timings", {}))
        inputs += st.get("inputs_read", 0)
    busy = sum(timings.values()) or 1.0
    # images/s over the processing time (Ray start-up and planning excluded; wall_s has everything)
    return {"inputs": inputs, "rows": sum(counts.values()), "counts": dict(counts), "wall_s": round(wall, 3),
            "processing_s": round(processing, 3),
            "images_per_s": round(inputs / processing, 3) if processing > 0 else None,
            "stage_seconds": {k: round(v, 3) for k, v in sorted(timings.items())},
            "stage_share": {k: round(v / busy, 4) for k, v in sorted(timings.items())}}


def format_summary(s: dict, failed: dict[str, str], out_uri: str) -> str:
    lines = ["", "=== summary ===",
             f"inputs: {s['inputs']}   rows: {s['rows']}   wall: {s['wall_s']:.1f} s   "
             f"throughput: {s['images_per_s'] or 0:.2f} images/s (over {s['processing_s']:.1f} s of processing)",
             "status counts: " + (", ".join(f"{k}={v}" for k, v in sorted(s["counts"].items())) or "(none)")]
    if s["stage_share"]:
        lines.append("stage time share: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["stage_share"].items()))
    lines.append(f"shards: {s['shards_total']} total, {s['shards_committed_now']} committed now, "
                 f"{s['shards_skipped']} already done, {len(failed)} failed")
    for name, why in sorted(failed.items()):
        lines.append(f"FAILED shard {name}: {why}")
    lines.append(f"outputs: {out_uri}" + ("" if failed else "  (_SUCCESS written)"))
    lines.append(f"read them: pandas.read_parquet('{out_uri.rstrip('/')}/latents')  |  images: "
                 f"{out_uri.rstrip('/')}/images/*.tar (WebDataset)")
    return "\n".join(lines)
