"""The latents subcommands' actor on Ray: ``pipeline.latents_ops.LatentsProcessor`` (the generator loaded once,
one call per shard), with its options in one place."""
from __future__ import annotations

from typing import Any

import ray

from pipeline.latents_ops import LatentsProcessor

__all__ = ["start_latents_actors"]

# A crashed actor is restarted; its shard's call is not retried by Ray (max_task_retries=0): the shard
# scheduler retries the shard as a new attempt.
ACTOR_RESTARTS = 2


def start_latents_actors(n: int, resources: dict[str, Any], checkpoint: str, **processor_kwargs) -> list:
    """``n`` latents actors, each asking for ``resources`` (pipeline.cluster.actor_plan's); ``processor_kwargs``
    go to LatentsProcessor."""
    actor = ray.remote(LatentsProcessor).options(max_restarts=ACTOR_RESTARTS, max_task_retries=0, **resources)
    return [actor.remote(checkpoint, **processor_kwargs) for _ in range(n)]
