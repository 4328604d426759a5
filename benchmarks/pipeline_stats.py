"""What the pipeline benchmarks read back from a run's output: the per-shard stats files, the steady-state rate,
the GPU's utilisation over a window, and the result written as JSON (printed, and to a file when asked)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time


def read_stats(out: str) -> list[dict]:
    """The run's per-shard stats files (``out``/stats/*), in name order."""
    folder = os.path.join(out, "stats")
    stats = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            stats.append(json.load(f))
    return stats


def steady_rate(stats: list[dict]) -> tuple[float, float]:
    """(faces/s, seconds) from the end of the actor's first call (model loaded and compiled) to the last
    commit; only the faces inverted after that instant count."""
    calls = sorted(t for s in stats for _n, t in s["inverted_at"])
    t0 = calls[0]
    faces = sum(n for s in stats for n, t in s["inverted_at"] if t > t0)
    seconds = max(s["committed_unix"] for s in stats) - t0
    return (faces / seconds if seconds > 0 else float("nan")), seconds


def middle_rate(stats: list[dict], low: float = 0.1, high: float = 0.9) -> float:
    """Faces/s between the inversion calls that bring the run to ``low`` and to ``high`` of its faces: the
    rate with neither the start (first calls, compilation) nor the tail (the last shards' wave, their
    writes), closer to what a job of many more shards than CPUs sustains. nan when fewer than two calls
    lie between."""
    window = middle_window(stats, low, high)
    if window is None:
        return float("nan")
    start, end, faces = window
    return faces / (end - start)


def middle_window(stats: list[dict], low: float = 0.1, high: float = 0.9) -> tuple[float, float, int] | None:
    """(start, end, faces between) of middle_rate's window, unix seconds; None when it is empty."""
    calls = sorted((t, n) for s in stats for n, t in s["inverted_at"])
    total = sum(n for _t, n in calls)
    done, start, end = 0, None, None
    for t, n in calls:
        done += n
        if start is None and done >= low * total:
            start, at_start = t, done
        if done >= high * total:
            end, at_end = t, done
            break
    if start is None or end is None or end <= start:
        return None
    return start, end, at_end - at_start


class GpuBusy:
    """GPU 0's utilisation (the share of time a kernel ran, nvidia-smi's utilization.gpu) sampled every
    ``period_ms`` while the context is open; ``mean(start, end)``: its mean over samples in that window (unix
    seconds), None without nvidia-smi or samples."""

    def __init__(self, period_ms: int = 200):
        self.period_ms = period_ms
        self.proc = None
        fd, self.path = tempfile.mkstemp(prefix="gpu_busy_", suffix=".csv")
        os.close(fd)  # nvidia-smi writes it

    def __enter__(self) -> "GpuBusy":
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--id=0", "--query-gpu=timestamp,utilization.gpu",
                                          "--format=csv,noheader,nounits", f"-lms={self.period_ms}", "-f", self.path])
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def samples(self) -> list[tuple[float, float]]:
        """(unix seconds, percent) of each sample (nvidia-smi's timestamps are local time, as time.mktime's)."""
        out = []
        with open(self.path) as f:
            for line in f:
                try:
                    stamp, busy = (v.strip() for v in line.split(","))
                    whole, _, frac = stamp.partition(".")
                    t = time.mktime(time.strptime(whole, "%Y/%m/%d %H:%M:%S")) + float("0." + (frac or "0"))
                    out.append((t, float(busy)))
                except ValueError:
                    continue  # a line cut by the termination
        return out

    def mean(self, start: float, end: float) -> float | None:
        inside = [busy for t, busy in self.samples() if start <= t <= end]
        return round(sum(inside) / len(inside), 1) if inside else None


def report(result: dict, path: str = "") -> None:
    """Print ``result`` as JSON, and write it to ``path`` when one is given."""
    print(json.dumps(result, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
