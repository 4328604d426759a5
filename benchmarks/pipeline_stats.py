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


def report(result: dict, path: str = "") -> None:
    """Print ``result`` as JSON, and write it to ``path`` when one is given."""
    print(json.dumps(result, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
