"""Where the aligning actor's time goes when alignment and inversion share one GPU: ``Inverter`` (align.backend
torch) on chunks of new raw photos from 1 thread, then from as many threads at once as Ray runs it with 1 and
with 2 alignment lanes (``--lanes``), without Ray, with each call's alignment and inversion timed in wall and in
CPU time of its own thread, and the rows' statuses counted (an align_error stops the profile). Per chunk, inside
the actor (the pipeline's own calls, not alignment alone): alignment's wall and host (its thread's CPU) time per
part (stage, upload, detect, landmarks, crop: pipeline.device_align.ALIGN_PARTS), and in a run of its own
("syncs counted", 1 thread) the device -> host synchronisations of each part (on CUDA every synchronising call,
torch.cuda.set_sync_debug_mode; on a CPU the reads a GPU would wait for: Tensor.cpu, .item, .tolist), the time spent
inside those reads (read-ms: on a GPU mostly waiting for the device, which CUDA spends spinning, so it counts as CPU
time; the part's host work is about its CPU time less that) and its torch operations (kernel launches and copies
on a GPU; Triton kernels not counted). Every run: Python's garbage collections per generation and their
milliseconds (a full collection holds the GIL while it walks every object), and on a GPU the allocators' calls into
CUDA per chunk (cudaMalloc, cudaFree, retries; new pinned host blocks). The last lane count's run again
under torch.profiler: how busy the GPU was (the union of all kernels' intervals) and each
stream's kernel time per chunk. (cProfile cannot profile the aligning threads: in Python 3.12 one profiler
serves the whole process.) A profile, not a benchmark (the pipeline's figures come from
bench_pipeline_raw_gpu.py).

    python benchmarks/profile_actor.py --chunks 6 --lanes 1,2 --out actor_profile.json   # GPU
    python benchmarks/profile_actor.py --smoke                                    # CPU: checks it runs

Photos, checkpoint and landmark trees: bench_pipeline_raw_gpu's (1024-1800 px, 0-2 faces, 10% faceless; the
official architecture with seeded random weights; face-like random trees).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import sys
import tempfile
import re
import statistics
import threading
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import pipeline.inverter as inverter  # noqa: E402
from benchmarks.bench_pipeline_raw_gpu import (allocator_calls, allocator_state, face_like_model,  # noqa: E402
                                                make_photos, per_chunk_ms, photo_chunks)
from models.factory import atomic_save, build_e2style, e2style_checkpoint  # noqa: E402
from models.alignment.landmarks import ShapePredictor  # noqa: E402
from pipeline.config import AlignConfig, RayConfig  # noqa: E402
from pipeline.device_align import ALIGN_PARTS  # noqa: E402
from pipeline.decode import decode_image  # noqa: E402


class StepTimes:
    """Wall and own-thread CPU seconds of each call of a step (thread_time: what the thread itself ran, not
    the time it waited for the GIL or a lock; CUDA's spin-wait in a synchronisation does count as CPU time)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def wrap(self, fn):
        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.wall.append(time.perf_counter() - w)
                    self.cpu.append(time.thread_time() - c)
        return timed

    def summary(self) -> dict:
        n = max(1, len(self.wall))
        return {"calls": len(self.wall), "wall_ms_per_call": round(1e3 * sum(self.wall) / n, 1),
                "cpu_ms_per_call": round(1e3 * sum(self.cpu) / n, 1)}


class SyncCounter:
    """Device -> host synchronisations per thread while ``counting``: on CUDA each call torch's sync debug mode
    warns about (the warnings are counted, not shown); on a CPU each Tensor.cpu / .item / .tolist call, the
    reads that would wait for the device on a GPU. ``count()``: the calling thread's total so far; ``waited()``:
    its seconds inside Tensor.cpu / .item / .tolist (where alignment reads results back: on a GPU mostly the wait
    for the device; other synchronising calls' waits are not in it)."""

    _SYNC = re.compile("synchronizing CUDA operation")
    _READS = ("cpu", "item", "tolist")

    def __init__(self, on_gpu: bool):
        self.on_gpu, self.local, self.counting = on_gpu, threading.local(), False
        self._patched: dict = {}
        self._showwarning = None

    def count(self) -> int:
        return getattr(self.local, "n", 0)

    def waited(self) -> float:
        return getattr(self.local, "wait", 0.0)

    def _add(self) -> None:
        self.local.n = self.count() + 1

    def start(self) -> None:
        self.counting = True
        for name in self._READS:
            real = getattr(torch.Tensor, name)
            self._patched[name] = real

            def timed_read(t, *args, _real=real, **kwargs):
                if not self.on_gpu:
                    self._add()
                t0 = time.perf_counter()
                try:
                    return _real(t, *args, **kwargs)
                finally:
                    self.local.wait = self.waited() + time.perf_counter() - t0
            setattr(torch.Tensor, name, timed_read)
        if self.on_gpu:
            self._showwarning = warnings.showwarning
            warnings.filterwarnings("always", message=".*synchronizing CUDA operation")

            def show(message, category, filename, lineno, file=None, line=None):
                if self._SYNC.search(str(message)):
                    self._add()
                else:
                    self._showwarning(message, category, filename, lineno, file, line)
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        self.counting = False
        if self.on_gpu:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._showwarning
        for name, real in self._patched.items():
            setattr(torch.Tensor, name, real)
        self._patched.clear()


class GcPauses:
    """Python's garbage collections during a run, per generation: how many and their milliseconds (gc.callbacks).
    A full (generation 2) collection walks every object of the process, the models' and Ray's included, holding
    the GIL: every thread of the actor waits for it."""

    def __init__(self):
        self.started: float | None = None
        self.reset()
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.count = [0, 0, 0]
        self.ms = [0.0, 0.0, 0.0]

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            self.count[info["generation"]] += 1
            self.ms[info["generation"]] += 1e3 * (time.perf_counter() - self.started)
            self.started = None

    def summary(self) -> dict:
        return {f"gen{g}": {"collections": self.count[g], "ms": round(self.ms[g], 1)} for g in range(3)}


class OpCounter(TorchDispatchMode):
    """Counts the torch operations that do work (views and detach left out) run in the thread that entered it
    (dispatch modes are per thread): on a GPU each is a kernel launch or a copy, what alignment's host time is
    mostly made of. Triton kernels are not torch operations and are not counted."""

    def __init__(self, counter: "SyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in ("detach", "lift_fresh"):
            self.counter.local.ops = getattr(self.counter.local, "ops", 0) + 1
        return func(*args, **(kwargs or {}))


class ChunkParts:
    """Each align_photos call (a chunk) of the actor: its wall and CPU time, and per part of ALIGN_PARTS the wall
    and CPU time (DeviceAligner.on_part, in the aligning thread) and the synchronisations (SyncCounter)."""

    def __init__(self, syncs: SyncCounter):
        self.syncs, self.local, self.lock = syncs, threading.local(), threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.chunks: list[dict] = []

    def on_part(self, part: str, wall: float, cpu: float) -> None:
        rec = getattr(self.local, "rec", None)
        if rec is None:
            return
        entry = rec["parts"].setdefault(part, {"wall_ms": 0.0, "cpu_ms": 0.0, "syncs": 0, "ops": 0, "read_ms": 0.0})
        entry["wall_ms"] += 1e3 * wall
        entry["cpu_ms"] += 1e3 * cpu
        now = (self.syncs.count(), self._ops(), self.syncs.waited())
        entry["syncs"] += now[0] - self.local.mark[0]
        entry["ops"] += now[1] - self.local.mark[1]
        entry["read_ms"] += 1e3 * (now[2] - self.local.mark[2])
        self.local.mark = now

    def _ops(self) -> int:
        return getattr(self.syncs.local, "ops", 0)

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self.local.rec = {"parts": {}}
            self.local.mark = start = (self.syncs.count(), self._ops(), self.syncs.waited())
            counting = OpCounter(self.syncs) if self.syncs.counting else contextlib.nullcontext()
            w, c = time.perf_counter(), time.thread_time()
            try:
                with counting:
                    return fn(*args, **kwargs)
            finally:
                rec = self.local.rec
                rec["wall_ms"] = 1e3 * (time.perf_counter() - w)
                rec["cpu_ms"] = 1e3 * (time.thread_time() - c)
                rec["syncs"] = self.syncs.count() - start[0]
                rec["ops"] = self._ops() - start[1]
                rec["read_ms"] = 1e3 * (self.syncs.waited() - start[2])
                self.local.rec = None
                with self.lock:
                    self.chunks.append(rec)
        return timed

    def summary(self, counted: bool) -> dict:
        """Medians over the chunks: the call's wall and CPU ms and each part's (with syncs when counted)."""
        if not self.chunks:
            return {}
        med = lambda values: round(statistics.median(values), 1)  # noqa: E731
        keys = ("wall_ms", "cpu_ms") + (("syncs", "ops", "read_ms") if counted else ())
        out = {"chunks": len(self.chunks), **{k: med([c[k] for c in self.chunks]) for k in keys}}
        for part in ALIGN_PARTS:
            rows = [c["parts"][part] for c in self.chunks if part in c["parts"]]
            if rows:
                out[part] = {k: med([r[k] for r in rows]) for k in keys}
        return out

    def table(self, counted: bool) -> list[str]:
        """One line per chunk: the call's and each part's wall / CPU ms (and syncs when counted)."""
        head = "chunk  call wall/cpu ms" + (" syncs ops read-ms" if counted else "") + "".join(
            f" | {p} wall/cpu" + (" syncs ops read-ms" if counted else "") for p in ALIGN_PARTS)
        lines = [head]
        for k, c in enumerate(self.chunks):
            cell = lambda r: (f"{r['wall_ms']:.1f}/{r['cpu_ms']:.1f}"  # noqa: E731
                              + (f" {r['syncs']} {r['ops']} {r['read_ms']:.1f}" if counted else ""))
            lines.append(f"{k:5d}  {cell(c)}" + "".join(
                f" | {cell(c['parts'][p])}" if p in c["parts"] else " | -" for p in ALIGN_PARTS))
        return lines


def run_threads(worker, chunks, threads: int) -> tuple[float, collections.Counter]:
    """Seconds to push ``chunks`` through ``worker.invert_chunks`` from ``threads`` threads at once, and the
    statuses of the rows that came back."""
    jobs = [chunks[k::threads] for k in range(threads)]
    results: list = []
    runners = [threading.Thread(target=lambda mine=mine: results.extend(worker.invert_chunks(c)[0] for c in mine))
               for mine in jobs]
    t = time.perf_counter()
    for r in runners:
        r.start()
    for r in runners:
        r.join()
    seconds = time.perf_counter() - t
    statuses = collections.Counter(row.status for res in results for row in res.rows)
    if statuses.get("align_error") or len(results) != len(chunks):
        errors = {row.error for res in results for row in res.rows if row.status == "align_error"}
        raise SystemExit(f"profile_actor: {len(results)} of {len(chunks)} chunks came back, statuses {dict(statuses)}, "
                         f"errors {sorted(errors)[:3]}")
    return seconds, statuses


def kernel_summary(trace_path: str, wall_s: float, n_chunks: int) -> dict:
    """From a chrome trace: the GPU's busy share (union of kernel intervals over the profiled wall time) and
    each stream's kernel ms per chunk, with its 8 costliest kernels."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, end = 0.0, -1.0
    for a, b in spans:
        if b <= end:
            continue
        busy += b - max(a, end)
        end = b
    by_stream: dict = {}
    for e in kernels:
        s = by_stream.setdefault(str(e.get("args", {}).get("stream")), {"us": 0.0, "kernels": {}})
        s["us"] += e["dur"]
        s["kernels"][e["name"][:70]] = s["kernels"].get(e["name"][:70], 0.0) + e["dur"]
    streams = {k: {"kernel_ms_per_chunk": round(v["us"] / 1e3 / n_chunks, 1),
                   "top": {n: round(us / 1e3 / n_chunks, 2)
                           for n, us in sorted(v["kernels"].items(), key=lambda kv: -kv[1])[:8]}}
               for k, v in by_stream.items()}
    return {"gpu_busy_share": round(busy / 1e6 / wall_s, 3), "streams": streams}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=6, help="chunks of new photos per run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny photos and model on CPU: checks the script runs")
    ap.add_argument("--lanes", default="2,4", help="alignment lane counts, each run from lanes + 2 threads")
    ap.add_argument("--switch-intervals", default="",
                    help="GIL switch intervals (seconds, comma-separated) to run the last lane count at again, besides "
                         "the actor's own (pipeline.inverter.ALIGN_GIL_SWITCH_S)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    sides, resolution, width, group = (1024, 1800), 1024, 512, RayConfig.chunk_size
    if a.smoke:
        a.chunks, a.batch, a.stages, sides, resolution, width, group = 1, 4, 2, (200, 260), 64, 32, 4
    lane_counts = [int(v) for v in a.lanes.split(",")]
    switch_intervals = [float(v) for v in a.switch_intervals.split(",") if v]
    # 1 thread; each lane count; the last one at each other GIL switch interval; then under torch.profiler.
    runs = ([("1 thread", 1, 1, None), ("1 thread, syncs counted", 1, 1, "syncs")] + [(f"{n + 2} threads, {n} lane(s)", n + 2, n, None) for n in lane_counts]
            + [(f"{lane_counts[-1] + 2} threads, {lane_counts[-1]} lane(s), GIL switch interval {s * 1e3:g} ms",
                lane_counts[-1] + 2, lane_counts[-1], s) for s in switch_intervals]
            + [(f"{lane_counts[-1] + 2} threads, {lane_counts[-1]} lane(s), torch.profiler", lane_counts[-1] + 2,
                lane_counts[-1], "torch.profiler")])
    photos = [decode_image(p) for p, _ in make_photos(group * (1 + len(runs) * a.chunks), *sides, 0.1)]
    work = tempfile.mkdtemp(prefix="profile_actor_")
    ckpt = os.path.join(work, "e2style.pt")
    with torch.device(device):
        model = build_e2style(resolution, stages=a.stages, width=width, seed=0)
    atomic_save(e2style_checkpoint(model), ckpt)
    del model
    worker = inverter.Inverter(
        ckpt, stages=a.stages, batch_size=a.batch, align=AlignConfig(backend="torch"),
        landmark_predictor=ShapePredictor.from_model(face_like_model(seed=0), device, cuda_graphs=False))
    chunks = photo_chunks(photos, group)
    worker.invert_chunks(chunks[0])  # warm-up
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    align_times, invert_times = StepTimes(), StepTimes()
    syncs = SyncCounter(on_gpu)
    chunk_parts = ChunkParts(syncs)
    gc_pauses = GcPauses()
    worker.aligner.align = align_times.wrap(worker.aligner.align)
    worker.aligner.on_part = chunk_parts.on_part
    inverter.align_photos = chunk_parts.wrap(inverter.align_photos)
    inverter.invert_faces = invert_times.wrap(inverter.invert_faces)
    lines = [f"Inverter on {device}, {a.stages} stages, batch {a.batch}, chunks of {group} new photos "
             f"({sides[0]}-{sides[1]} px), init {worker.info()['init_seconds']}"]
    result = {}
    for k, (name, threads, lanes, how) in enumerate(runs):
        mine = chunks[1 + k * a.chunks:1 + (k + 1) * a.chunks]
        worker.set_align_lanes(lanes)
        align_times.reset()
        invert_times.reset()
        chunk_parts.reset()
        gc_pauses.reset()
        before = worker.align_part_seconds()
        actor_interval = sys.getswitchinterval()
        if isinstance(how, float):
            sys.setswitchinterval(how)
        sync()
        allocator_before = allocator_state() if on_gpu else {}
        if how == "torch.profiler":
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
            with torch.profiler.profile(activities=activities) as prof:
                seconds, statuses = run_threads(worker, mine, threads)
                sync()
            trace = os.path.join(work, "trace.json")
            prof.export_chrome_trace(trace)
        elif how == "syncs":
            syncs.start()
            try:
                seconds, statuses = run_threads(worker, mine, threads)
                sync()
            finally:
                syncs.stop()
        else:
            seconds, statuses = run_threads(worker, mine, threads)
            sync()
        sys.setswitchinterval(actor_interval)
        n_photos = sum(len(c.photos) for c in mine)
        entry = {"photos_s": round(n_photos / seconds, 1), "seconds": round(seconds, 2), "statuses": dict(statuses),
                 "align": align_times.summary(), "invert": invert_times.summary(),
                 "align_parts_ms_per_chunk": per_chunk_ms(
                     {p: v - before[p] for p, v in worker.align_part_seconds().items()}, len(mine)),
                 "align_per_chunk_median": chunk_parts.summary(counted=how == "syncs"), "gc": gc_pauses.summary(),
                 "allocator": allocator_calls(allocator_before, len(mine)) if on_gpu else {}}
        if how == "torch.profiler" and on_gpu:
            entry["kernels"] = kernel_summary(trace, seconds, len(mine))
        result[name] = entry
        lines.append(f"{name}: {json.dumps(entry)}")
        print(lines[-1], flush=True)
        if threads == 1:  # per chunk: alignment's parts inside the actor, wall / host CPU ms (and syncs)
            entry["align_chunks"] = chunk_parts.chunks
            table = chunk_parts.table(counted=how == "syncs")
            lines += table
            print("\n".join(table), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"header": lines[0], "runs": result, "lines": lines}, f, indent=1)


if __name__ == "__main__":
    main()
