"""The inversion actor on Ray: ``pipeline.inverter.Inverter`` (the model loaded once, alignment on its device,
batched inversion) with its Ray entry point, its options in one place, and the call that submits to it.
"""
from __future__ import annotations

from typing import Any

import ray

from pipeline.inverter import Inverter
from pipeline.records import PreparedChunk

__all__ = ["InvertWorker", "start_invert_actors", "submit_invert"]

# A crashed actor (OOM, driver-level CUDA error, its node lost) is restarted, and the calls sent while it restarts
# are retried by Ray (invert_many is a pure function of its inputs; bounded, so a batch that kills the actor every
# time still ends the shard's attempt); shards that still fail are retried by the shard scheduler.
ACTOR_RESTARTS = 2
CALL_RETRIES = 2


class InvertWorker(Inverter):
    """The Ray actor's class (its name is what Ray's state API lists)."""

    def invert_many(self, *chunks: PreparedChunk):
        """Ray entry point, called with ``num_returns=len(chunks)``: a tuple, or the single result."""
        out = self.invert_chunks(*chunks)
        return out[0] if len(out) == 1 else tuple(out)


def start_invert_actors(n: int, resources: dict[str, Any], calls: int, checkpoint: str, **inverter_kwargs) -> list:
    """``n`` inversion actors, each asking for ``resources`` (num_gpus, num_cpus, custom resources:
    pipeline.cluster sizes them) and running up to ``calls`` calls at once (max_concurrency: while one call's
    batches run on the device, the next call's inputs are unpacked, pinned and copied, and an aligning actor's
    calls align meanwhile); ``inverter_kwargs`` go to Inverter."""
    actor = ray.remote(InvertWorker).options(max_restarts=ACTOR_RESTARTS, max_task_retries=CALL_RETRIES,
                                             max_concurrency=calls, **resources)
    return [actor.remote(checkpoint, **inverter_kwargs) for _ in range(n)]


def submit_invert(actor, chunks: list) -> list:
    """One call inverting ``chunks`` (refs) on ``actor``: one result ref per chunk."""
    refs = actor.invert_many.options(num_returns=len(chunks)).remote(*chunks)
    return refs if isinstance(refs, list) else [refs]
