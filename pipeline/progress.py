"""Progress of a run, and its summary at the end. One class counts work *committed* (and, apart, work in
flight), and derives the one throughput figure and the ETA that the bar, the log lines and the summary all
show: on a terminal a tqdm bar (``progress: true``), otherwise one plain log line every ``progress_interval_s``
(what ``ray job logs`` of a cluster job can show) and a last one at the end. Training uses the same class
for its steps (``unit="steps"``, no shards)."""
from __future__ import annotations

import collections
import logging
import sys
import time
from typing import Callable, Hashable

from tqdm import tqdm

__all__ = ["Progress", "format_duration", "format_rate", "summarise", "format_summary"]

log = logging.getLogger("e2style.progress")
# The bar shows our rate and ETA (from committed work), not tqdm's own (from whatever it was last updated with).
_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def format_duration(s: float) -> str:
    s = int(round(s))
    h, m = divmod(s, 3600)
    m, sec = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def format_rate(rate: float | None, unit: str) -> str:
    """The one way a throughput is printed (bar, log line, summary), so that the three read the same."""
    return f"{rate or 0:.2f} {unit}/s"


class Progress:
    """Counts of work committed and in flight, the rate of committed work and the ETA.

    ``in_flight(key, n)``: n more inputs of shard ``key`` are being worked on (read, aligned, inverted);
    ``commit(n, key)``: n inputs are committed (the shard ``key``'s stats are written; its in-flight count
    ends); ``drop(key, failed)``: an attempt's in-flight work is discarded (retried, or failed for good).
    ``rate()`` is committed work over ``elapsed_s()``; the summary's throughput is the same figure.
    ``initial``: work done before this run (a resumed training's steps): counted as committed, not in the rate.
    ``desc`` names what is counted (a training stage); ``note(text)`` adds a figure to the bar's tail and the
    log line (training's loss).
    """

    def __init__(self, bar: bool, total: int | None, total_shards: int | None = None, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] = log.info,
                 unit: str = "images", initial: int = 0, desc: str | None = None):
        self.total, self.total_shards, self.unit, self.initial, self.desc = total, total_shards, unit, initial, desc
        self.committed = initial
        self.shards_done = self.shards_failed = 0
        self._note = ""
        self._in_flight: dict[Hashable, int] = collections.defaultdict(int)
        self.interval_s, self.clock, self.emit = interval_s, clock, emit
        self.t0 = self.last = clock()
        self.bar = None
        if bar:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                            bar_format=_BAR_FORMAT)
            self._refresh_bar()

    @property
    def in_flight_total(self) -> int:
        return sum(self._in_flight.values())

    def in_flight(self, key: Hashable, n: int) -> None:
        self._in_flight[key] += n
        self._refresh_bar()

    def commit(self, n: int, key: Hashable | None = None) -> None:
        self.committed += n
        if key is not None:
            self._in_flight.pop(key, None)
            self.shards_done += 1
        if self.bar is not None:
            if self.total is None and self.estimated_total() is not None:
                self.bar.total = self.estimated_total()
            self.bar.update(n)
        self._refresh_bar()

    def note(self, text: str) -> None:
        self._note = text
        self._refresh_bar()

    def drop(self, key: Hashable, failed: bool = False) -> None:
        self._in_flight.pop(key, None)
        if failed:
            self.shards_failed += 1
        self._refresh_bar()

    def elapsed_s(self) -> float:
        return max(self.clock() - self.t0, 1e-9)

    def rate(self) -> float:
        """Work committed by this run per second since its start."""
        return (self.committed - self.initial) / self.elapsed_s()

    def estimated_total(self) -> int | None:
        """The run's whole work: known (image folders, training steps), else extrapolated from committed shards."""
        if self.total is not None:
            return self.total
        if not self.shards_done or self.total_shards is None:
            return None
        left = self.total_shards - self.shards_done - self.shards_failed
        return self.committed + round(self.committed / self.shards_done * left)

    def eta(self) -> str:
        total, rate = self.estimated_total(), self.rate()
        if total is None or not rate:
            return "?"
        return format_duration(max(total - self.committed, 0) / rate)

    def _status(self) -> str:
        """What the bar's tail and the log line share: rate, in flight, shards, ETA."""
        parts = [format_rate(self.rate(), self.unit)]
        if self.total_shards is not None:
            parts.append(f"{self.in_flight_total} in flight")
            failed = f" ({self.shards_failed} failed)" if self.shards_failed else ""
            parts.append(f"shards {self.shards_done}/{self.total_shards} done{failed}")
        parts.append(f"ETA {self.eta()}")
        return ", ".join(parts + ([self._note] if self._note else []))

    def line(self) -> str:
        total = self.estimated_total()
        of = f"/{total}" if total is not None else ""
        what = f"progress ({self.desc})" if self.desc else "progress"
        return (f"{what}: {self.committed}{of} {self.unit} committed in {format_duration(self.elapsed_s())}, "
                f"{self._status()}")

    def _refresh_bar(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self._status(), refresh=True)

    def tick(self) -> None:
        """Called often: refreshes the bar's rate and ETA, or logs ``line()`` once per interval."""
        if self.bar is not None:
            self._refresh_bar()
            return
        t = self.clock()
        if self.interval_s and t - self.last >= self.interval_s:
            self.last = t
            self.emit(self.line())

    def close(self) -> float:
        """Ends the bar, or logs the last line; returns elapsed_s(), the time the summary's throughput is over."""
        elapsed = self.elapsed_s()
        if self.bar is not None:
            self._refresh_bar()
            self.bar.close()
        elif self.interval_s:
            self.emit(self.line())
        return elapsed


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
            "images_per_s": inputs / processing if processing > 0 else None,  # the progress's rate at its end
            "stage_seconds": {k: round(v, 3) for k, v in sorted(timings.items())},
            "stage_share": {k: round(v / busy, 4) for k, v in sorted(timings.items())}}


def format_summary(s: dict, failed: dict[str, str], out_uri: str, failure_lines: list[str] = ()) -> str:
    """The summary printed at the end; ``failure_lines``: the inputs that failed (pipeline/failures.py)."""
    lines = ["", "=== summary ===",
             f"inputs: {s['inputs']}   rows: {s['rows']}   wall: {s['wall_s']:.1f} s   "
             f"throughput: {format_rate(s['images_per_s'], 'images')} (over {s['processing_s']:.1f} s of processing)",
             "status counts: " + (", ".join(f"{k}={v}" for k, v in sorted(s["counts"].items())) or "(none)"),
             *failure_lines]
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
