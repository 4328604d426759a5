"""Driver-side checks of the config against the checkpoint, before any shard starts and before anything is
written: the checkpoint is read (a file that would run code when unpickled is refused here), ``model.stages``
and ``task`` are checked against it, and the edit directions are loaded and checked. What comes out is what
the inversion actors are given."""
from __future__ import annotations

from typing import Any

from .checkpoints import checkpoint_dims, fetch_checkpoint
from .config import ConfigError, PipelineConfig
from .edit import DirectionError, make_edit_options
from .tasks import check_model

__all__ = ["stage_options"]


def stage_options(cfg: PipelineConfig, checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """{"task": {...} or None, "edit": {...} or None, "dims": checkpoint_dims(...)}; raises ConfigError."""
    try:
        dims = checkpoint_dims(fetch_checkpoint(cfg.model.checkpoint, cfg.storage.endpoint_url, checkpoint_sha256))
    except Exception as e:  # noqa: BLE001 - a checkpoint that cannot be read is the checkpoint key's fault
        raise ConfigError("model.checkpoint", f"cannot read the checkpoint: {e}") from None
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
