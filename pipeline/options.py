"""Driver-side checks of the config against the checkpoint, before any shard starts and before anything is
written: the checkpoint is sniffed and read (a folder, an empty or truncated file, a photo, a generator's or
another model's file are named as what they are; a file that would run code when unpickled is refused here),
``model.stages`` and ``task`` are checked against it, and the edit directions are loaded and checked. What
comes out is what the inversion actors are given."""
from __future__ import annotations

from typing import Any

from models.checkpoint import e2style_state_dict, read_checkpoint
from models.checkpoint_kinds import CheckpointError, sniff_checkpoint

from .checkpoints import checkpoint_dims, checkpoint_sha256, fetch_checkpoint
from .config import ConfigError, PipelineConfig
from .edit import DirectionError, make_edit_options
from .storage import get_fs, is_local, storage_errors
from .tasks import check_model

__all__ = ["checkpoint_identity", "e2style_dims", "stage_options"]

FACTORY_PREFIX = "factory:"


def checkpoint_identity(url: str, endpoint_url: str | None = None) -> str:
    """The sha256 of ``model.checkpoint``; a local file is sniffed first, so a folder, an empty file or a photo
    is named as such (ConfigError) before it is hashed, and a storage failure is a StorageError."""
    if not url.startswith(FACTORY_PREFIX):
        fs, path = get_fs(url, endpoint_url)
        if is_local(fs):
            try:
                sniff_checkpoint(path)
            except CheckpointError as e:
                raise ConfigError("model.checkpoint", str(e)) from None
    with storage_errors("model.checkpoint", url, endpoint_url):
        return checkpoint_sha256(url, endpoint_url)


def e2style_dims(url: str, endpoint_url: str | None = None, sha256: str | None = None) -> dict[str, int]:
    """checkpoint_dims of the E2Style checkpoint at ``url`` (fetched when remote); ConfigError naming the file
    and what it is when it is not one, StorageError when it cannot be fetched."""
    with storage_errors("model.checkpoint", url, endpoint_url):
        local = fetch_checkpoint(url, endpoint_url, sha256)
    remote = not url.startswith(FACTORY_PREFIX) and not is_local(get_fs(url, endpoint_url)[0])
    fetched = f"{url} (fetched to) " if remote else ""
    try:
        e2style_state_dict(read_checkpoint(local), local)  # a generator's or another model's file, named as such
        return checkpoint_dims(local)
    except CheckpointError as e:  # names the file and what it is
        raise ConfigError("model.checkpoint", fetched + str(e)) from None
    except Exception as e:  # noqa: BLE001 - an E2Style file whose tensors do not fit is the checkpoint key's fault
        raise ConfigError("model.checkpoint", f"{fetched}{local}: cannot read the checkpoint: {e}") from None


def stage_options(cfg: PipelineConfig, checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """{"task": {...} or None, "edit": {...} or None, "dims": checkpoint_dims(...)}; raises ConfigError."""
    dims = e2style_dims(cfg.model.checkpoint, cfg.storage.endpoint_url, checkpoint_sha256)
    stages = cfg.model.stages
    if stages is not None and not 1 <= stages <= dims["num_stages"]:
        raise ConfigError("model.stages", f"must be in 1..{dims['num_stages']} for this checkpoint, got {stages}")
    try:
        check_model(cfg.task, dims["input_nc"], dims["label_nc"])
    except ValueError as e:
        raise ConfigError("task", str(e)) from None
    task = None if cfg.task == "invert" else {"name": cfg.task, "resize_factor": cfg.resize_factor,
                                              "label_nc": dims["label_nc"]}
    try:
        edit = make_edit_options(cfg.edit, dims["n_latent"], dims["style_dim"], cfg.output.image_size > 0,
                                 cfg.storage.endpoint_url)
    except DirectionError as e:
        key = "edit.layers" if str(e).startswith("edit.layers") else "edit.directions"
        raise ConfigError(key, str(e)) from None
    return {"task": task, "edit": edit, "dims": dims}
