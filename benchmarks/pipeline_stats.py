"""What the pipeline benchmarks read back from a run's output: the per-shard stats files, the steady-state rate,
and the result written as JSON (printed, and to a file when asked)."""
from __future__ import annotations

import json
import os


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
        return float("nan")
    return (at_end - at_start) / (end - start)


def report(result: dict, path: str = "") -> None:
    """Print ``result`` as JSON, and write it to ``path`` when one is given."""
    print(json.dumps(result, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
