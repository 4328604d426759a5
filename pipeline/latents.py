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
that holds a run of other options unless ``output.overwrite``; one run writes an output at a time (the
output's lease, pipeline/lease.py, taken before the cleanup: another run meanwhile is refused, exit 2).

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
import hashlib
import json
import logging
import sys
from typing import Any

import pyarrow.parquet as pq
import ray

from workers.latents_worker import start_latents_actors

from .cli import cli_exit_code, setup_logging
from .cluster import actor_plan, init_ray, wait_one
from .config import ConfigError, PipelineConfig, load_config, parse_overrides, redact
from .edit import DirectionError, directions_sha256, make_edit_options
from .latents_ops import PAIRS_SHARD, LatentsJob, latents_files, read_codes
from .ledger import RunLedger, read_run_record
from .options import checkpoint_identity, e2style_dims
from .scheduler import ActorPool, Attempt, Scheduler
from .storage import get_fs, storage_errors, to_uri

__all__ = ["main", "build_config", "run_latents", "OPS"]

log = logging.getLogger("e2style.latents")
OPS = ("decode", "edit", "mix", "interpolate")
# Each subcommand's --help: what it does and what it writes per ok row.
OP_HELP = {
    "decode": "Decode an inversion run's latents into images, with no re-inversion: <key>.recon.<ext> per ok row, "
              "codes as they were.",
    "edit": "Edit an inversion run's latents along directions (codes + alpha * direction) and decode them, with no "
            "re-inversion: <key>.edit_<name>_<alpha>.<ext> per direction and alpha for each ok row; with "
            "--save-codes also the edited codes in columns codes_edit_<name>_<alpha>.",
    "mix": "Style mixing, with no re-inversion: each ok row's W+ layers [START, END) taken from the reference "
           "row, decoded to <key>.mix.<ext>.",
    "interpolate": "Images between pairs of an inversion run's rows, with no re-inversion: one row per step, "
                   "key <a>__<b>__<k>, image <that key>.interp.<ext>, codes (1 - t) a + t b.",
}
LATENTS_EPILOG = ("The output has the inversion run's layout and exactly-once rules (docs/editing_and_tasks.md). "
                  "--set takes the pipeline's config keys: docs/CONFIG.md, or run_pipeline.py --help-config.")
ACTOR_QUEUE = 2  # outstanding shards per actor


def _parse_range(s: str, what: str) -> list[int]:
    try:
        a, b = s.split(":")
        return [int(a), int(b)]
    except ValueError:
        raise ConfigError(what, f"expected START:END (W+ layers [START, END)), got {s!r}") from None


def build_config(op: str, args: argparse.Namespace) -> tuple[PipelineConfig, dict | None]:
    """(the pipeline's config for a subcommand, the input's run record): --latents is input.url, --output
    output.url; the checkpoint defaults to the one the latents were made with (the input's _run.json)."""
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
    fs_in, in_root = get_fs(cfg0.input.url, cfg0.storage.endpoint_url)
    with storage_errors("--latents", cfg0.input.url, cfg0.storage.endpoint_url):  # credentials, endpoint: exit 2
        rec = read_run_record(fs_in, in_root)
    if not (over.get("model") or {}).get("checkpoint"):
        ck = ((rec or {}).get("config") or {}).get("model", {}).get("checkpoint")
        if not ck or "***" in ck:
            raise ConfigError("--checkpoint", "not given, and the input's _run.json names no usable checkpoint")
        over.setdefault("model", {})["checkpoint"] = ck
    return load_config(args.config, over), rec


def _fingerprint(op: str, cfg: PipelineConfig, input_record: dict, sha: str, params: dict) -> tuple[str, dict]:
    o = cfg.output
    values = {"op": op, "input.url": cfg.input.url, "input_fingerprint": input_record.get("fingerprint"),
              "checkpoint_sha256": sha, "output.image_format": o.image_format, "output.image_size": o.image_size,
              "output.jpeg_quality": o.jpeg_quality, "model.precision": cfg.model.precision, **params}
    if o.paste_back:  # only when set: runs made before the option keep their fingerprint
        values["output.paste_back"] = True
    values = json.loads(json.dumps(values, default=str))  # as they read back from _run.json
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest(), values


def _job(op: str, cfg: PipelineConfig, input_record: dict, *, steps: int, reference: str | None,
         layers: list[int] | None, pairs: list[str] | None) -> tuple[LatentsJob, list[str], str, dict]:
    """Every driver-side check of a subcommand's run, reading only: (the job, its shards, checkpoint sha256,
    the values of its fingerprint)."""
    ep = cfg.storage.endpoint_url
    if op in ("decode", "edit") and cfg.output.image_size == 0 and not (op == "edit" and cfg.edit.save_codes):
        raise ConfigError("output.image_size", f"{op} writes images: must be > 0")
    fs_in, in_root = get_fs(cfg.input.url, ep)
    files = latents_files(fs_in, in_root)
    if not files:
        raise ConfigError("input.url", f"no committed latents shards under {cfg.input.url} (expected latents/ and stats/)")
    sha = checkpoint_identity(cfg.model.checkpoint, ep)
    dims = e2style_dims(cfg.model.checkpoint, ep, sha)  # a file that is not an E2Style checkpoint, named
    n_latent, width = dims["n_latent"], dims["style_dim"]
    with fs_in.open(next(iter(files.values())), "rb") as f:
        md = pq.read_schema(f).metadata or {}
    shape = json.loads(md.get(b"codes_shape", b"null"))
    if shape is not None and list(shape) != [n_latent, width]:
        raise ConfigError("model.checkpoint", f"the latents have codes of shape {shape} but this checkpoint's "
                                              f"generator takes ({n_latent}, {width})")
    if input_record.get("checkpoint_sha256") and input_record["checkpoint_sha256"] != sha:
        log.warning("the checkpoint differs from the one the latents were made with (sha256 %s..., not %s...)",
                    sha[:12], input_record["checkpoint_sha256"][:12])
    paste = cfg.output.paste_back
    if paste and op == "interpolate":
        raise ConfigError("output.paste_back", "interpolate makes faces of no single photo: nothing to paste into")
    job = LatentsJob(op, n_latent, width, files, cfg.input.url, cfg.output, ep, cfg.input.max_pixels, paste,
                     ((input_record.get("config") or {}).get("input") or {}).get("image_column", "auto"))
    params: dict[str, Any] = {}
    shards = list(files)
    if op == "edit":
        if not cfg.edit.directions:
            raise ConfigError("edit.directions", "edit needs at least one --direction NAME=PATH")
        try:
            job.edit = make_edit_options(cfg.edit, n_latent, width, cfg.output.image_size > 0, ep)
        except DirectionError as e:
            raise ConfigError("edit.directions", str(e)) from None
        edit = cfg.to_dict()["edit"]
        params = {k: edit[k] for k in ("directions", "alphas", "layers", "save_codes")}
        params["directions_sha256"] = directions_sha256(job.edit["directions"])
    elif op == "mix":
        if not reference or not layers:
            raise ConfigError("--reference", "mix needs --reference KEY and --layers START:END")
        if not 0 <= layers[0] < layers[1] <= n_latent:
            raise ConfigError("--layers", f"[{layers[0]}, {layers[1]}) is not within the {n_latent} W+ layers")
        found = read_codes(fs_in, files, [reference], n_latent, width)
        if reference not in found:
            raise ConfigError("--reference", f"no ok row with key {reference!r} in {cfg.input.url}")
        job.reference, job.layers = found[reference][0], list(layers)
        params = {"reference": reference, "layers": list(layers),
                  "reference_sha256": hashlib.sha256(job.reference.tobytes()).hexdigest()}
    elif op == "interpolate":
        if steps < 2:
            raise ConfigError("--steps", f"must be >= 2 (both ends included), got {steps}")
        job.steps = steps
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
                raise ConfigError("--pair", f"no ok row with key(s) {missing} in {cfg.input.url}")
            job.pairs = [(a, b, found[a][0], found[b][0]) for a, b in parsed]
            shards = [PAIRS_SHARD]
    job.fingerprint, fp_values = _fingerprint(op, cfg, input_record, sha, params)
    return job, shards, sha, fp_values


def run_latents(op: str, cfg: PipelineConfig, input_record: dict | None = None, *, steps: int = 5,
                reference: str | None = None, layers: list[int] | None = None, pairs: list[str] | None = None,
                dry_run: bool = False, echo=print) -> int:
    input_record = input_record or {}
    job, shards, sha, fp_values = _job(op, cfg, input_record, steps=steps, reference=reference, layers=layers,
                                       pairs=pairs)
    ledger = RunLedger(cfg.output.url, cfg.storage.endpoint_url)
    committed = ledger.admit(job.fingerprint, fp_values, cfg.output.overwrite)
    if dry_run:
        echo(f"{op}: {len(shards)} shard(s), {len(set(shards) & set(committed))} already committed, "
             f"{len(set(shards) - set(committed))} to do")
        for s in shards:
            echo(f"  {'done' if s in committed else 'todo'}  {s}")
        echo(ledger.lease_report(cfg.output.lease_stale_s))
        return 0
    # The first write, everything checked: the output's lease (one writer per output), then admitted again.
    ledger.hold(cfg.output.lease_wait_s, cfg.output.lease_stale_s)
    try:
        return _run_held(op, cfg, ledger, job, shards, sha, fp_values, echo)
    finally:
        ledger.release()


def _run_held(op: str, cfg: PipelineConfig, ledger: RunLedger, job: LatentsJob, shards: list[str], sha: str,
              fp_values: dict, echo) -> int:
    """The subcommand's run under the output's lease: cleanup, run record, the shards, _SUCCESS."""
    todo = [s for s in shards if s not in ledger.committed]
    echo(f"{op}: {len(shards)} shard(s), {len(shards) - len(todo)} already committed, {len(todo)} to do")
    ledger.prepare()
    ledger.start({"op": op, "input": cfg.input.url, "config": redact(cfg.to_dict()), "checkpoint_sha256": sha,
                  "fingerprint": job.fingerprint, "fingerprint_values": fp_values, "argv": sys.argv},
                 work_to_do=bool(todo))
    failed: dict[str, str] = {}
    done: list[dict] = []
    if todo:
        failed, done = _execute(cfg, sha, todo, job)
    ledger.finish(failed, {"shards_committed_now": len(done), "rows": sum(s["rows"] for s in done),
                           "images": sum(s.get("images", 0) for s in done)}, len(shards))
    for name, why in sorted(failed.items()):
        echo(f"FAILED shard {name}: {why}")
    echo(f"{op}: {len(done)} shard(s) committed now, {len(failed)} failed; outputs: {to_uri(ledger.fs, ledger.root)}")
    return 0 if not failed else 1


def _execute(cfg: PipelineConfig, sha: str, todo: list[str], job: LatentsJob) -> tuple[dict[str, str], list[dict]]:
    """The shards on Ray: one call per shard on a pool of latents actors (the model loaded once each)."""
    started = init_ray(cfg.ray)
    try:
        n_actors, opts, _, _ = actor_plan(cfg.ray)
        m = cfg.model
        actors = start_latents_actors(n_actors, opts, m.checkpoint, endpoint_url=cfg.storage.endpoint_url, sha256=sha,
                                      precision=m.precision, device=m.device, num_threads=m.num_threads,
                                      batch_size=m.batch_size)
        try:
            job_ref = ray.put(job)
            pool = ActorPool(actors, ACTOR_QUEUE)

            def on_commit(attempt: Attempt, st: dict) -> None:
                log.info("committed shard %s: %d rows, %d images", attempt.name, st["rows"], st.get("images", 0))

            sched = Scheduler(wait_one, retries=cfg.retries, max_in_flight=ACTOR_QUEUE * n_actors, on_commit=on_commit)

            def start(attempt: Attempt) -> None:
                index, actor = pool.acquire()
                ref = actor.process.remote(attempt.name, job_ref)
                sched.watch(ref, lambda r: pool.release(index))
                sched.watch(ref, lambda r: sched.commit(attempt, ray.get(r)), attempt)

            sched.run(todo, start, name=str)
            return sched.failed, [st for _, st in sched.committed]
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
    ap = argparse.ArgumentParser(prog=f"run_pipeline.py {op}", description=OP_HELP[op], epilog=LATENTS_EPILOG)
    ap.add_argument("--latents", required=True, help="an inversion run's output (local or s3://...)")
    ap.add_argument("--output", required=True, help="where to write (local or s3://...)")
    ap.add_argument("--checkpoint", help="E2Style checkpoint (default: the one in the input's _run.json)")
    ap.add_argument("--config", "-c", help="YAML config (pipeline keys; input/output/checkpoint come from the flags)")
    ap.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, dotted (output.image_format=png); repeatable")
    ap.add_argument("--dry-run", action="store_true", help="plan and print the shards, then exit")
    ap.add_argument("--log-level", default="INFO")
    if op == "edit":
        ap.add_argument("--direction", action="append", default=[], metavar="NAME=PATH",
                        help="a direction: a .npy of shape (style_dim,), (1, style_dim) or (n_latent, style_dim); "
                             "repeatable")
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
    setup_logging(args.log_level)
    if op != "edit":
        args.direction = args.alphas = args.save_codes = None
        if op != "mix":
            args.layers = None

    def job() -> int:
        cfg, input_record = build_config(op, args)
        return run_latents(op, cfg, input_record, steps=getattr(args, "steps", 5), reference=getattr(args, "reference", None),
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
