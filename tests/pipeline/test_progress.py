"""Progress counts what is committed: the bar, the log lines and the summary show one throughput figure, and
the ETA comes from committed work (work in flight is shown apart and never counted as done)."""
from __future__ import annotations

import io
import re

from pipeline import progress as progress_module
from pipeline.progress import Progress, format_summary, summarise


def _clocked(total=1000, shards=4, interval_s=30.0, bar=False):
    now = [0.0]
    lines: list[str] = []
    p = Progress(bar, total, shards, interval_s=interval_s, clock=lambda: now[0], emit=lines.append)
    return p, now, lines


def test_log_line_counts_committed_work_not_work_in_flight():
    p, now, lines = _clocked()
    p.in_flight("s0", 250)  # a whole shard read and aligned, not yet written
    now[0] = 40.0
    p.tick()
    assert lines == ["progress: 0/1000 images committed in 40s, 0.00 images/s, 250 in flight, shards 0/4 done, ETA ?"]
    p.commit(250, "s0")
    p.in_flight("s1", 100)
    now[0] = 80.0
    p.tick()
    assert lines[-1] == ("progress: 250/1000 images committed in 1m20s, 3.12 images/s, 100 in flight, "
                         "shards 1/4 done, ETA 4m00s")


def test_a_retried_attempt_s_work_in_flight_is_dropped_and_a_failure_counted():
    p, now, _ = _clocked()
    p.in_flight("s0", 100)
    p.drop("s0")                # retried: its work starts again
    p.in_flight("s0", 30)
    assert p.in_flight_total == 30
    p.drop("s0", failed=True)   # failed for good
    assert p.in_flight_total == 0 and p.shards_failed == 1 and p.committed == 0
    now[0] = 5.0
    assert "shards 0/4 done (1 failed)" in p.line() and p.line().endswith("ETA ?")


def test_eta_from_committed_shards_when_the_total_is_unknown():
    p, now, _ = _clocked(total=None)
    assert p.estimated_total() is None
    p.in_flight("a", 999)           # in flight never feeds the estimate
    assert p.estimated_total() is None
    p.commit(50, "a")
    assert p.estimated_total() == 200  # 50 per shard, 3 shards left
    now[0] = 10.0
    assert p.line() == "progress: 50/200 images committed in 10s, 5.00 images/s, 0 in flight, shards 1/4 done, ETA 30s"


def test_log_mode_logs_once_per_interval_and_a_last_line_at_close():
    p, now, lines = _clocked(interval_s=30)
    now[0] = 10.0
    p.tick()
    assert lines == []
    now[0] = 31.0
    p.tick()
    p.tick()
    assert len(lines) == 1
    p.commit(1000, "s")
    now[0] = 50.0
    assert p.close() == 50.0
    assert lines[-1].startswith("progress: 1000/1000 images committed in 50s, 20.00 images/s")


def test_bar_log_line_and_summary_agree_on_one_throughput(monkeypatch):
    """The same run seen three ways: the bar's tail, the last log line, the summary's throughput."""
    stream = io.StringIO()
    monkeypatch.setattr(progress_module.sys, "stderr", stream)
    now = [0.0]
    bar = Progress(True, 30, 1, clock=lambda: now[0], emit=lambda s: None)
    lines: list[str] = []
    logged = Progress(False, 30, 1, interval_s=60, clock=lambda: now[0], emit=lines.append)
    for p in (bar, logged):
        p.in_flight("demo-000000", 30)
    now[0] = 6.0   # everything read and aligned at 6 s: a bar of prepared work would say 5 images/s here
    for p in (bar, logged):
        p.tick()
    assert "0/30" in stream.getvalue() and "30 in flight" in stream.getvalue()
    now[0] = 19.0  # the shard commits at 19 s
    stats = [{"counts": {"ok": 28, "no_face": 2}, "timings": {"invert": 10.0}, "inputs_read": 30}]
    for p in (bar, logged):
        p.commit(stats[0]["inputs_read"], "demo-000000")
    processing = bar.close()
    assert logged.close() == processing
    summary = summarise(stats, wall=25.0, processing=processing)
    summary.update({"shards_total": 1, "shards_committed_now": 1, "shards_skipped": 0, "shards_failed": []})
    text = format_summary(summary, {}, "/tmp/out")
    rates = {
        "bar": re.findall(r"([\d.]+ images/s)", stream.getvalue())[-1],
        "log": re.search(r"([\d.]+ images/s)", lines[-1]).group(1),
        "summary": re.search(r"throughput: ([\d.]+ images/s)", text).group(1),
    }
    assert set(rates.values()) == {"1.58 images/s"}, rates   # 30 / 19
    assert "30/30" in stream.getvalue()


def test_progress_without_shards_for_training_steps_resumed():
    """Training's use: steps, no shards, a resumed stage's earlier steps not in the rate, the loss as a note."""
    now = [0.0]
    lines: list[str] = []
    p = Progress(False, 200, None, interval_s=10, clock=lambda: now[0], emit=lines.append, unit="steps",
                 initial=100, desc="stage 1")
    now[0] = 10.0
    p.tick()
    assert lines == ["progress (stage 1): 100/200 steps committed in 10s, 0.00 steps/s, ETA ?"]
    p.commit(50)
    p.note("loss 0.1234")
    now[0] = 20.0
    p.tick()
    assert lines[-1] == "progress (stage 1): 150/200 steps committed in 20s, 2.50 steps/s, ETA 20s, loss 0.1234"
