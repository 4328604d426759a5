"""Subcommands over an existing latents dataset (the output of an inversion run), with no re-inversion:

    python run_pipeline.py decode      --latents out/demo --output out/decoded
    python run_pipeline.py edit        --latents out/demo --output out/aged --direction age=dirs/age.npy \
                                       [--direction smile=s3://b/smile.npy] [--alphas=-3,3] [--layers 0:8] [--save-codes]
    python run_pipeline.py mix         --latents out/demo --output out/mixed --reference KEY --layers 8:18
    python run_pipeline.py interpolate --latents out/demo --output out/interp --steps 5 [--pair KEY_A:KEY_B ...]

Common options: ``--checkpoint`` (default: the one recorded in the input's ``_run.json``), ``--config`` and
``--set key=value`` (the pipeline's config keys: output.image_format/image_size/overwrite, model.*,
storage.endpoint_url, ray.*, retries, edit.*), ``--dry-run``.

Each committed input shard ``latents/<shard>.parquet`` gives the output shard of the same name, in the
inversion run's layout (``latents/``, ``images/<shard>.tar``, ``stats/``, ``_run.json``, ``_SUCCESS``) and
under the same exactly-once rules: images, then latents, then stats as the commit marker; a rerun skips
committed shards of the same fingerprint, deletes what an interrupted run left, and refuses an output
that holds a run of other options unless ``output.overwrite``.

What each writes, per ``ok`` input row (rows of other statuses are copied with null codes):

* decode: ``<key>.recon.<ext>``; codes as they were.
* edit: ``<key>.edit_<name>_<alpha>.<ext>`` per direction and alpha; codes as they were, and with
  ``--save-codes`` the edited codes in columns ``codes_edit_<name>_<alpha>``.
* mix: ``<key>.mix.<ext>``; codes = the row's with W+ layers [i, j) taken from the reference row.
* interpolate: one output row per step, key ``<a>__<b>__<k>`` (k = 0..steps-1, 0 is a and steps-1 is b),
  image ``<that key>.interp.<ext>``, codes = (1 - t) a + t b. Without ``--pair``, consecutive ok rows of
  each shard are paired (1st with 2nd, 3rd with 4th, ...); with ``--pair``, the listed pairs (from any
  shards) go to one output shard named ``pairs``.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import posixpath
import sys
import time
from typing import Any

import numpy as np

from .config import ConfigError
from .storage import get_fs, to_uri

__all__ = ["main", "LatentsWorker", "run_latents", "read_codes", "OPS"]

log = logging.getLogger("e2style.latents")
OPS = ("decode", "edit", "mix", "interpolate")
PAIRS_SHARD = "pairs"


# ----------------------------------------------------------------------------------------------------
# Reading


def _latents_files(fs, root: str) -> dict[str, str]:
    """Committed input shards: name -> latents path (a shard without stats is not there yet)."""
    from .write import read_committed

    committed = read_committed(fs, root)
    out = {}
    for name in sorted(committed):
        p = posixpath.join(root, "latents", f"{name}.parquet")
        out[name] = p
    return out


def read_shard_table(fs, path: str):
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def _codes_of(table, n_latent: int, width: int) -> list[np.ndarray | None]:
    col = table.column("codes").combine_chunks()
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    flat = col.flatten().to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, np.float32)
    # flatten() drops the null slots: walk the valid rows in order
    out: list[np.ndarray | None] = []
    k = 0
    size = n_latent * width
    for v in valid:
        if v:
            out.append(np.asarray(flat[k * size:(k + 1) * size], np.float32).reshape(n_latent, width))
            k += 1
        else:
            out.append(None)
    return out


def read_codes(fs, files: dict[str, str], keys: list[str], n_latent: int, width: int) -> dict[str, tuple[np.ndarray, str]]:
    """key -> (codes, shard) for the given keys of ok rows, reading only the rows asked for."""
    import pyarrow.compute as pc

    want = set(keys)
    found: dict[str, tuple[np.ndarray, str]] = {}
    for name, path in files.items():
        t = read_shard_table(fs, path).select(["key", "status", "codes"])
        t = t.filter(pc.and_(pc.is_in(t.column("key"), value_set=_pa_array(sorted(want))), pc.equal(t.column("status"), "ok")))
        for key, codes in zip(t.column("key").to_pylist(), _codes_of(t, n_latent, width)):
            found.setdefault(key, (codes, name))
    return found


def _pa_array(values):
    import pyarrow as pa

    return pa.array(values, pa.string())


# ----------------------------------------------------------------------------------------------------
# The per-shard work (in a Ray actor that holds the model)


class LatentsWorker:
    """Holds the generator once; ``process`` turns one input shard into one committed output shard."""

    def __init__(self, checkpoint: str, *, endpoint_url: str | None = None, sha256: str | None = None,
                 precision: str = "auto", device: str = "auto", num_threads: int | None = None, batch_size: int = 16):
        import torch

        from models import load_e2style

        from .invert import fetch_checkpoint, resolve_device

        self.device = resolve_device(device)
        if num_threads:
            torch.set_num_threads(num_threads)
        elif self.device == "cpu" and os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        precision = ("fp16" if self.device.startswith("cuda") else "fp32") if precision == "auto" else precision
        self.model = load_e2style(fetch_checkpoint(checkpoint, endpoint_url, sha256), device=self.device, precision=precision)
        self.batch_size = batch_size

    def info(self) -> dict:
        return {"n_latent": int(self.model.n_latent), "style_dim": int(self.model.decoder.style_dim), "device": self.device}

    def process(self, shard: str, cfg: dict, job: dict) -> dict:
        return process_shard(self.model, shard, cfg, job, self.batch_size)


def _rows_from_table(table) -> list:
    from .prepare import Row

    d = table.select(["key", "source", "face_index", "status", "error", "quad", "landmarks", "score"]).to_pylist()
    return [Row(r["key"], r["source"], r["face_index"] or 0, r["status"], r["error"], r["quad"], r["landmarks"], r["score"])
            for r in d]


def shard_outputs(job: dict, rows: list, codes: list[np.ndarray | None], pairs: list | None = None):
    """-> (out rows, out codes, [(member stem, codes, index of the row in ``rows`` or None)], per-row extra
    columns) for one shard."""
    from .edit import apply_direction, edit_variants
    from .prepare import Row

    op = job["op"]
    out_rows, out_codes, images, extra = [], [], [], []
    if op == "interpolate":
        if pairs is None:
            ok = [(r, c) for r, c in zip(rows, codes) if r.status == "ok" and c is not None]
            pairs = [(ok[i][0].key, ok[i + 1][0].key, ok[i][1], ok[i + 1][1]) for i in range(0, len(ok) - 1, 2)]
        steps = job["steps"]
        for a, b, ca, cb in pairs:
            for k in range(steps):
                t = k / (steps - 1)
                c = ((1.0 - t) * ca + t * cb).astype(np.float32)
                key = f"{a}__{b}__{k}"
                out_rows.append(Row(key, f"interpolate {a} -> {b} t={t:.4g}"))
                out_codes.append(c)
                images.append((f"{key}.interp", c, None))
                extra.append({})
        return out_rows, out_codes, images, extra
    variants = edit_variants(job["edit"]["directions"], job["edit"]["alphas"]) if op == "edit" else []
    for ri, (r, c) in enumerate(zip(rows, codes)):
        cols: dict[str, np.ndarray] = {}
        extra.append(cols)
        out_rows.append(r)
        if r.status != "ok" or c is None:
            out_codes.append(None)
            continue
        if op == "decode":
            out_codes.append(c)
            images.append((f"{r.key}.recon", c, ri))
        elif op == "mix":
            i, j = job["layers"]
            m = c.copy()
            m[i:j] = job["reference"][i:j]
            out_codes.append(m)
            images.append((f"{r.key}.mix", m, ri))
        elif op == "edit":
            out_codes.append(c)
            for tag, name, alpha in variants:
                e = apply_direction(c[None], job["edit"]["directions"][name], alpha, job["edit"]["layers"])[0]
                if job["edit"]["images"]:
                    images.append((f"{r.key}.{tag}", e, ri))
                if job["edit"]["save_codes"]:
                    cols[f"codes_{tag}"] = e
        else:
            raise ValueError(f"unknown op {op!r}")
    return out_rows, out_codes, images, extra


class _Paster:
    """output.paste_back for the subcommands: each face pasted into its original photo along the row's quad
    (``<stem>.paste.<ext>``, as the inversion pipeline names them). The originals are read back from the rows'
    ``source`` URIs, each archive once per shard; a row whose original cannot be read or decoded gets no pasted
    image (counted in the shard's stats as ``paste_missing``, and logged). Memory: the shard's originals as
    stored (compressed), each dropped after its last row, and one decoded photo at a time (a row's images
    come one after another)."""

    def __init__(self, rows: list, images: list, cfg: dict, job: dict):
        from .read import read_sources

        o = cfg["output"]
        self.rows, self.fmt, self.quality = rows, o["image_format"], o["jpeg_quality"]
        self.max_pixels = cfg["input"]["max_pixels"]
        wanted = sorted({ri for _, _, ri in images if ri is not None and rows[ri].quad is not None})
        self.data = read_sources([rows[ri].source for ri in wanted], cfg["storage"]["endpoint_url"],
                                 job.get("input_image_column", "auto"))
        # Rows still to come per original (faces of one photo share it with align.policy: all).
        self.left = collections.Counter(rows[ri].source for ri in wanted)
        self.last_row: int | None = None
        self.current: tuple[str, np.ndarray | None] | None = None  # (source, its decoded original)
        self.missing_rows: set[int] = set()

    def _original(self, ri: int) -> np.ndarray | None:
        from .decode import decode_image

        source = self.rows[ri].source
        if ri != self.last_row:
            self.last_row = ri
            self.left[source] -= 1
        if self.current is None or self.current[0] != source:
            data, img = self.data.get(source), None
            try:
                if isinstance(data, Exception):
                    raise data
                img = decode_image(data, max_pixels=self.max_pixels)
            except Exception as e:  # noqa: BLE001 - one row's paste, not the shard
                log.warning("paste_back: cannot read the original %s (%s: %s)", source, type(e).__name__, e)
            self.current = (source, img)
        if self.left[source] == 0:
            self.data.pop(source, None)  # its last row: the bytes are no longer needed
        return self.current[1]

    def paste(self, stem: str, ri: int | None, face: np.ndarray) -> list[tuple[str, bytes]]:
        from .align import paste_back
        from .write import encode_image

        if ri is None or self.rows[ri].quad is None:
            return []
        src = self._original(ri)
        if src is None:
            self.missing_rows.add(ri)
            return []
        quad = np.asarray(self.rows[ri].quad, np.float64).reshape(4, 2)
        return [(f"{stem}.paste.{self.fmt}", encode_image(paste_back(src, face, quad), self.fmt, None, self.quality))]


def process_shard(model, shard: str, cfg: dict, job: dict, batch_size: int = 16) -> dict:
    from .edit import ExtraOutputs, decode_codes
    from .write import build_table, build_tar, encode_image, shard_stats, write_shard

    t0 = time.perf_counter()
    n_latent, width = job["n_latent"], job["style_dim"]
    fs_in, _ = get_fs(cfg["input"]["url"], cfg["storage"]["endpoint_url"])
    fs_out, out_root = get_fs(cfg["output"]["url"], cfg["storage"]["endpoint_url"])
    if shard == PAIRS_SHARD and job.get("pairs") is not None:
        rows, codes, stages = [], [], None
        pairs = job["pairs"]
    else:
        table = read_shard_table(fs_in, job["files"][shard])
        rows, codes = _rows_from_table(table), _codes_of(table, n_latent, width)
        st = [s for s in table.column("stages").to_pylist() if s is not None]
        stages = st[0] if st else None
        pairs = None
    t1 = time.perf_counter()
    out_rows, out_codes, images, extra = shard_outputs(job, rows, codes, pairs)
    o = cfg["output"]
    fmt, size, q = o["image_format"], o["image_size"], o["jpeg_quality"]
    members = []
    t_dec = 0.0
    paster = _Paster(rows, images, cfg, job) if size > 0 and job.get("paste_back") else None
    if size > 0:
        for i in range(0, len(images), batch_size):
            part = images[i:i + batch_size]
            td = time.perf_counter()
            px = decode_codes(model, np.stack([c for _, c, _ in part]), batch_size)
            t_dec += time.perf_counter() - td
            for (stem, _, ri), im in zip(part, px):
                members.append((f"{stem}.{fmt}", encode_image(im, fmt, size, q)))
                if paster is not None:
                    members.extend(paster.paste(stem, ri, im))
    t2 = time.perf_counter()
    md = {"fingerprint": job["fingerprint"], "style_dim": str(width), "op": job["op"]}
    if stages is not None:
        md["stages"] = str(stages)
    none = [None] * len(out_rows)
    table = build_table(out_rows, out_codes, none, none, stages, n_latent, md)
    ex = ExtraOutputs(cfg)
    ex.codes = extra
    table = ex.extend_table(table)
    tar = build_tar(members)
    info = {"op": job["op"], "fingerprint": job["fingerprint"], "input": job["files"].get(shard),
            "n_latent": n_latent, "images": len(members)}
    if paster is not None:
        info["paste_missing"] = len(paster.missing_rows)  # rows whose original could not be read or decoded
    stats = shard_stats(shard, out_rows, {"read": t1 - t0, "decode_latents": t_dec, "encode": t2 - t1 - t_dec}, info)
    write_shard(fs_out, out_root, shard, table, tar, stats)
    stats["timings"]["write"] = round(time.perf_counter() - t2, 4)
    return stats


# ----------------------------------------------------------------------------------------------------
# Driver


def _parse_range(s: str, what: str) -> list[int]:
    try:
        a, b = s.split(":")
        return [int(a), int(b)]
    except ValueError:
        raise ConfigError(what, f"expected START:END (W+ layers [START, END)), got {s!r}") from None


def build_config(op: str, args: argparse.Namespace) -> dict:
    """The pipeline's config for a subcommand: --latents is input.url, --output output.url; the checkpoint
    defaults to the one the latents were made with (the input's _run.json)."""
    from .config import load_config, parse_overrides
    from .write import read_run_record

    over = parse_overrides(args.overrides)
    over.setdefault("input", {})["url"] = args.latents
    over.setdefault("output", {})["url"] = args.output
    if args.checkpoint:
        over.setdefault("model", {})["checkpoint"] = args.checkpoint
    if op == "edit":
        e = over.setdefault("edit", {})
        if args.direction:
            dirs = {}
            for d in args.direction:
                name, sep, url = d.partition("=")
                if not sep:
                    raise ConfigError("--direction", f"expected NAME=PATH, got {d!r}")
                dirs[name] = url
            e["directions"] = dirs
        if args.alphas:
            try:
                e["alphas"] = [float(a) for a in args.alphas.split(",")]
            except ValueError:
                raise ConfigError("--alphas", f"expected comma-separated numbers, got {args.alphas!r}") from None
        if args.layers:
            e["layers"] = _parse_range(args.layers, "--layers")
        if args.save_codes:
            e["save_codes"] = True
    cfg0 = load_config(args.config, {k: v for k, v in over.items() if k != "model"} | {"model": {"checkpoint": "-"}})
    fs_in, in_root = get_fs(cfg0["input"]["url"], cfg0["storage"]["endpoint_url"])
    rec = read_run_record(fs_in, in_root)
    if not (over.get("model") or {}).get("checkpoint"):
        ck = ((rec or {}).get("config") or {}).get("model", {}).get("checkpoint")
        if not ck or "***" in ck:
            raise ConfigError("--checkpoint", "not given, and the input's _run.json names no usable checkpoint")
        over.setdefault("model", {})["checkpoint"] = ck
    cfg = load_config(args.config, over)
    cfg["_input_record"] = rec
    return cfg


def _fingerprint(op: str, cfg: dict, sha: str, params: dict) -> tuple[str, dict]:
    o = cfg["output"]
    rec = cfg.get("_input_record") or {}
    values = {"op": op, "input.url": cfg["input"]["url"], "input_fingerprint": rec.get("fingerprint"),
              "checkpoint_sha256": sha, "output.image_format": o["image_format"], "output.image_size": o["image_size"],
              "output.jpeg_quality": o["jpeg_quality"], "model.precision": cfg["model"]["precision"], **params}
    if o["paste_back"]:  # only when set: runs made before the option keep their fingerprint
        values["output.paste_back"] = True
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest(), values


def run_latents(op: str, cfg: dict, *, steps: int = 5, reference: str | None = None, layers: list[int] | None = None,
                pairs: list[str] | None = None, dry_run: bool = False, echo=print) -> int:
    from .edit import DirectionError, directions_sha256, make_edit_options
    from .invert import fetch_checkpoint
    from .runner import RefusedError, _init_ray, _now, _short, checkpoint_sha256
    from .tasks import checkpoint_dims
    from .write import (clean_uncommitted, clear_outputs, clear_success, mark_success, read_committed,
                        read_run_record, write_run_record)

    ep = cfg["storage"]["endpoint_url"]
    if op in ("decode", "edit") and cfg["output"]["image_size"] == 0 and not (op == "edit" and cfg["edit"]["save_codes"]):
        raise ConfigError("output.image_size", f"{op} writes images: must be > 0")
    fs_in, in_root = get_fs(cfg["input"]["url"], ep)
    files = _latents_files(fs_in, in_root)
    if not files:
        raise ConfigError("input.url", f"no committed latents shards under {cfg['input']['url']} (expected latents/ and stats/)")
    sha = checkpoint_sha256(cfg)
    dims = checkpoint_dims(fetch_checkpoint(cfg["model"]["checkpoint"], ep, sha))
    n_latent, width = dims["n_latent"], dims["style_dim"]
    import pyarrow.parquet as pq

    with fs_in.open(next(iter(files.values())), "rb") as f:
        md = pq.read_schema(f).metadata or {}
    shape = json.loads(md.get(b"codes_shape", b"null"))
    if shape is not None and list(shape) != [n_latent, width]:
        raise ConfigError("model.checkpoint", f"the latents have codes of shape {shape} but this checkpoint's "
                                              f"generator takes ({n_latent}, {width})")
    rec_in = cfg.get("_input_record") or {}
    if rec_in.get("checkpoint_sha256") and rec_in["checkpoint_sha256"] != sha:
        log.warning("the checkpoint differs from the one the latents were made with (sha256 %s..., not %s...)",
                    sha[:12], rec_in["checkpoint_sha256"][:12])

    paste = bool(cfg["output"]["paste_back"])
    if paste and op == "interpolate":
        raise ConfigError("output.paste_back", "interpolate makes faces of no single photo: nothing to paste into")
    job: dict[str, Any] = {"op": op, "n_latent": n_latent, "style_dim": width, "files": files, "paste_back": paste,
                           "input_image_column": ((rec_in.get("config") or {}).get("input") or {}).get("image_column", "auto")}
    params: dict[str, Any] = {}
    shards = list(files)
    if op == "edit":
        if not cfg["edit"]["directions"]:
            raise ConfigError("edit.directions", "edit needs at least one --direction NAME=PATH")
        try:
            job["edit"] = make_edit_options(cfg, n_latent, width, cfg["output"]["image_size"] > 0)
        except DirectionError as e:
            raise ConfigError("edit.directions", str(e)) from None
        params = {k: cfg["edit"][k] for k in ("directions", "alphas", "layers", "save_codes")}
        params["directions_sha256"] = directions_sha256(job["edit"]["directions"])
    elif op == "mix":
        if not reference or not layers:
            raise ConfigError("--reference", "mix needs --reference KEY and --layers START:END")
        if not 0 <= layers[0] < layers[1] <= n_latent:
            raise ConfigError("--layers", f"[{layers[0]}, {layers[1]}) is not within the {n_latent} W+ layers")
        found = read_codes(fs_in, files, [reference], n_latent, width)
        if reference not in found:
            raise ConfigError("--reference", f"no ok row with key {reference!r} in {cfg['input']['url']}")
        job["reference"], job["layers"] = found[reference][0], list(layers)
        params = {"reference": reference, "layers": list(layers),
                  "reference_sha256": hashlib.sha256(job["reference"].tobytes()).hexdigest()}
    elif op == "interpolate":
        if steps < 2:
            raise ConfigError("--steps", f"must be >= 2 (both ends included), got {steps}")
        job["steps"] = steps
        params = {"steps": steps, "pairs": pairs or None}
        if pairs:
            parsed = []
            for p in pairs:
                a, sep, b = p.partition(":")
                if not sep or not a or not b:
                    raise ConfigError("--pair", f"expected KEY_A:KEY_B, got {p!r}")
                parsed.append((a, b))
            found = read_codes(fs_in, files, [k for ab in parsed for k in ab], n_latent, width)
            missing = sorted({k for ab in parsed for k in ab} - set(found))
            if missing:
                raise ConfigError("--pair", f"no ok row with key(s) {missing} in {cfg['input']['url']}")
            job["pairs"] = [(a, b, found[a][0], found[b][0]) for a, b in parsed]
            shards = [PAIRS_SHARD]
    fp, fp_values = _fingerprint(op, cfg, sha, params)
    job["fingerprint"] = fp

    fs_out, out_root = get_fs(cfg["output"]["url"], ep)
    prior = read_run_record(fs_out, out_root)
    if prior is not None and prior.get("fingerprint") != fp:
        if not cfg["output"]["overwrite"]:
            old = prior.get("fingerprint_values") or {}
            diff = sorted(k for k in set(old) | set(fp_values) if old.get(k) != fp_values.get(k))
            raise RefusedError(f"output {cfg['output']['url']} holds a run with other options ({', '.join(diff) or '?'}); "
                               f"set output.overwrite=true to replace it, or choose another output")
        if not dry_run:
            clear_outputs(fs_out, out_root)
    committed = {n for n, st in read_committed(fs_out, out_root).items() if st.get("fingerprint") == fp}
    todo = [s for s in shards if s not in committed]
    echo(f"{op}: {len(shards)} shard(s), {len(shards) - len(todo)} already committed, {len(todo)} to do")
    if dry_run:
        for s in shards:
            echo(f"  {'done' if s in committed else 'todo'}  {s}")
        return 0
    clean_uncommitted(fs_out, out_root, committed)
    record = {"status": "running", "op": op, "started_at": _now(), "ended_at": None, "input": cfg["input"]["url"],
              "config": _redacted(cfg), "checkpoint_sha256": sha, "fingerprint": fp, "fingerprint_values": fp_values,
              "argv": sys.argv}
    write_run_record(fs_out, out_root, record)
    failed: dict[str, str] = {}
    done: list[dict] = []
    if todo:
        clear_success(fs_out, out_root)
        failed, done = _execute(cfg, sha, todo, job, echo)
    ok = not failed
    record.update({"status": "succeeded" if ok else "failed", "ended_at": _now(), "failed_shards": failed,
                   "summary": {"shards_committed_now": len(done), "rows": sum(s["rows"] for s in done),
                               "images": sum(s.get("images", 0) for s in done)}})
    write_run_record(fs_out, out_root, record)
    if ok:
        mark_success(fs_out, out_root, {"ended_at": record["ended_at"], "shards": len(shards)})
    for name, why in sorted(failed.items()):
        echo(f"FAILED shard {name}: {why}")
    echo(f"{op}: {len(done)} shard(s) committed now, {len(failed)} failed; outputs: {to_uri(fs_out, out_root)}")
    return 0 if ok else 1


def _redacted(cfg: dict) -> dict:
    from .config import redact

    return redact({k: v for k, v in cfg.items() if not k.startswith("_")})


def _execute(cfg: dict, sha: str, todo: list[str], job: dict, echo) -> tuple[dict[str, str], list[dict]]:
    import ray

    from .runner import _init_ray, _short

    started = _init_ray(cfg)
    try:
        n_gpus = int(ray.cluster_resources().get("GPU", 0))
        n_actors = cfg["ray"]["num_actors"] or max(1, n_gpus)
        opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if n_gpus else {"num_cpus": 1}
        Actor = ray.remote(max_restarts=2, max_task_retries=0)(LatentsWorker)
        m = cfg["model"]
        actors = [Actor.options(**opts).remote(m["checkpoint"], endpoint_url=cfg["storage"]["endpoint_url"], sha256=sha,
                                               precision=m["precision"], device=m["device"],
                                               num_threads=m["num_threads"], batch_size=m["batch_size"])
                  for _ in range(n_actors)]
        try:
            job_ref = ray.put(job)
            attempts = {s: 0 for s in todo}
            queue = list(todo)
            running: dict[Any, tuple[str, int]] = {}
            load = [0] * n_actors
            failed: dict[str, str] = {}
            done: list[dict] = []
            while queue or running:
                while queue and min(load) < 2:
                    a = load.index(min(load))
                    s = queue.pop(0)
                    attempts[s] += 1
                    running[actors[a].process.remote(s, cfg, job_ref)] = (s, a)
                    load[a] += 1
                ready, _ = ray.wait(list(running), num_returns=1)
                for r in ready:
                    s, a = running.pop(r)
                    load[a] -= 1
                    try:
                        st = ray.get(r)
                    except Exception as e:  # noqa: BLE001 - a failing shard is retried, then reported
                        if attempts[s] <= cfg["retries"]:
                            log.warning("shard %s failed (attempt %d), retrying: %s", s, attempts[s], _short(e))
                            queue.append(s)
                        else:
                            failed[s] = _short(e)
                        continue
                    done.append(st)
                    log.info("committed shard %s: %d rows, %d images", s, st["rows"], st.get("images", 0))
            return failed, done
        finally:
            for a in actors:
                ray.kill(a)
    finally:
        if started:
            ray.shutdown()


def main(argv: list[str] | None = None, op: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if op is None:
        if not argv or argv[0] not in OPS:
            print(f"usage: run_pipeline.py {{{','.join(OPS)}}} ...", file=sys.stderr)
            return 2
        op, argv = argv[0], argv[1:]
    ap = argparse.ArgumentParser(prog=f"run_pipeline.py {op}", description=__doc__.split("\n\n")[0])
    ap.add_argument("--latents", required=True, help="an inversion run's output (local or s3://...)")
    ap.add_argument("--output", required=True, help="where to write (local or s3://...)")
    ap.add_argument("--checkpoint", help="E2Style checkpoint (default: the one in the input's _run.json)")
    ap.add_argument("--config", "-c", help="YAML config (pipeline keys; input/output/checkpoint come from the flags)")
    ap.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--log-level", default="INFO")
    if op == "edit":
        ap.add_argument("--direction", action="append", default=[], metavar="NAME=PATH", help="repeatable")
        ap.add_argument("--alphas", help="comma-separated, e.g. --alphas=-3,3 (default: edit.alphas)")
        ap.add_argument("--layers", help="START:END, the W+ layers the edit touches (default: all)")
        ap.add_argument("--save-codes", action="store_true", help="edited codes as extra Parquet columns")
    if op == "mix":
        ap.add_argument("--reference", required=True, help="key of the row whose layers are taken")
        ap.add_argument("--layers", required=True, help="START:END: W+ layers [START, END) from the reference")
    if op == "interpolate":
        ap.add_argument("--steps", type=int, default=5, help="images per pair, both ends included")
        ap.add_argument("--pair", action="append", default=[], metavar="KEY_A:KEY_B",
                        help="repeatable; default: consecutive ok rows of each shard")
    args = ap.parse_args(argv)
    from .runner import setup_logging

    setup_logging(args.log_level)
    from .runner import cli_exit_code

    if op != "edit":
        args.direction = args.alphas = args.save_codes = None
        if op != "mix":
            args.layers = None

    def job() -> int:
        cfg = build_config(op, args)
        return run_latents(op, cfg, steps=getattr(args, "steps", 5), reference=getattr(args, "reference", None),
                           layers=_parse_range(args.layers, "--layers") if op == "mix" else None,
                           pairs=getattr(args, "pair", None), dry_run=args.dry_run)

    return cli_exit_code(job)


def decode_main(argv: list[str] | None = None) -> int:
    return main(argv, "decode")


def edit_main(argv: list[str] | None = None) -> int:
    return main(argv, "edit")


def mix_main(argv: list[str] | None = None) -> int:
    return main(argv, "mix")


def interpolate_main(argv: list[str] | None = None) -> int:
    return main(argv, "interpolate")
