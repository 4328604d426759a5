"""Ray: start an embedded instance or join a cluster, and size the actor pool (how many actors, the resources
each asks for). The only Ray setup the inversion job and the latents jobs share; everything else of theirs runs
on pipeline/scheduler.py, and their actors and tasks are defined in workers/."""
from __future__ import annotations

import os
from typing import Any

import ray

from .config import RayConfig

__all__ = ["init_ray", "actor_plan", "cpus_per_gpu", "aligning_actor_cpus", "wait_one"]

# CPUs of a GPU actor that aligns photos (align.backend torch): its host steps are on alignment's serial path,
# above all the copy of each chunk's photos into pinned memory (~400 MB per 64 photos of 2 MP), which torch
# spreads over the actor's threads, and Ray gives an actor as many threads (OMP_NUM_THREADS) as CPUs.
ALIGNING_ACTOR_CPUS = 4


def init_ray(rc: RayConfig) -> bool:
    """Start or join Ray unless this process already did. Returns whether we started it (and stop it)."""
    if ray.is_initialized():
        return False
    if rc.address is None:
        # address="local": always a fresh embedded instance. ray.init() without an address would join a
        # running local cluster (or follow a stale ray_current_cluster file one left behind) and then
        # refuse num_cpus; only ray.address joins a cluster.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kw: dict[str, Any] = {"address": "local", "include_dashboard": False, "log_to_driver": True}
        if rc.num_cpus:
            kw["num_cpus"] = rc.num_cpus
        ray.init(**kw)
    else:
        ray.init(address=rc.address, log_to_driver=True)
    return True


def actor_plan(rc: RayConfig) -> tuple[int, dict[str, Any], int, int]:
    """(number of model actors, their Ray options, GPUs, CPUs) for the cluster as it is now: one actor per GPU
    (or ``ray.num_actors``), each holding one GPU (or one CPU), placed by ``ray.actor_resources`` if given."""
    res = ray.cluster_resources()
    n_gpus, n_cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if n_gpus else {"num_cpus": 1}
    if rc.actor_resources:
        opts["resources"] = dict(rc.actor_resources)
    return rc.num_actors or max(1, n_gpus), opts, n_gpus, n_cpus


def cpus_per_gpu() -> int:
    """The fewest CPUs per GPU on any alive node that has GPUs (0 without GPUs): the most CPUs a one-GPU actor
    can ask for and still be placed on every GPU node."""
    shares = [int(node["Resources"].get("CPU", 0) // node["Resources"]["GPU"]) for node in ray.nodes()
              if node.get("Alive") and node["Resources"].get("GPU", 0) > 0]
    return min(shares) if shares else 0


def aligning_actor_cpus(cpus_per_gpu: int) -> int:
    """CPUs for each GPU actor that aligns, given the fewest CPUs per GPU of the GPU nodes: ALIGNING_ACTOR_CPUS
    where they have at least twice that (the rest read and decode), at most half of them on smaller nodes (so
    the actor fits on every GPU node), never below one."""
    return max(1, min(ALIGNING_ACTOR_CPUS, cpus_per_gpu // 2))


def wait_one(refs: list, timeout: float | None) -> list:
    """The scheduler's ``wait``: the refs ready within ``timeout`` (at least one, or none)."""
    return ray.wait(refs, num_returns=1, timeout=timeout)[0]
