"""Why a Ray Train fit failed, in one paragraph a user can act on.

Ray Train raises a ``ControllerError`` or ``WorkerGroupError`` whose text is a page of worker
tracebacks. Two causes have a plain explanation here: nodes that hosted the run's workers left
the cluster and ``failure.max_failures`` allowed no more restarts, and a (re)start that could
not get its resources within ``failure.start_timeout_s`` (typically after such a loss, when the
remaining nodes cannot host the workers). Either way the run keeps everything up to its last
checkpoint and resumes with ``--name``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from resnet_cluster.artifacts import checkpoints, layout
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.config import JobConfig
from resnet_cluster.launch.trainer import scaling_plan

log = logging.getLogger(__name__)


def causes(e: BaseException) -> Iterator[BaseException]:
    """``e`` and every exception wrapped in it: causes, contexts, Ray Train's worker and
    controller failures, a health check's underlying actor error."""
    seen: set[int] = set()
    stack: list[Any] = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        stack.extend([cur.__cause__, cur.__context__, getattr(cur, "cause", None)])
        stack.extend(getattr(cur, "worker_failures", {}).values())
        stack.append(getattr(cur, "controller_failure", None))
        stack.append(getattr(cur, "health_check_failure", None))


def alive_nodes() -> dict[str, str] | None:
    """{node id: IP} of the cluster's alive nodes (the driver is connected); None if Ray cannot
    tell."""
    import ray

    try:
        return {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    except Exception:
        log.debug("ray.nodes() failed", exc_info=True)
        return None


def lost_worker_nodes(
    store: ArtifactStore, run_id: str, before: dict[str, str] | None, now: dict[str, str] | None
) -> dict[str, str]:
    """Nodes alive at ``before`` and gone ``now`` that hosted the run's workers (as rank 0
    recorded them at the last worker-group start in environment.json)."""
    if before is None or now is None:
        return {}
    try:
        hosted = {w.get("node_id") for w in store.read_json(run_id, layout.ENVIRONMENT).get("workers", [])}
    except Exception:  # no worker group ever started
        log.debug("no readable environment.json for run %s", run_id, exc_info=True)
        return {}
    return {nid: ip for nid, ip in before.items() if nid not in now and nid in hosted}


def explain(
    e: BaseException,
    cfg: JobConfig,
    store: ArtifactStore,
    run_id: str,
    *,
    nodes_before: dict[str, str] | None,
    nodes_now: dict[str, str] | None,
) -> tuple[str, str] | None:
    """(cause, message) for a node loss or a start that found no resources; None otherwise.
    ``nodes_before`` / ``nodes_now``: :func:`alive_nodes` at submit and after the failure."""
    timed_out = any(type(x).__name__ == "WorkerGroupStartupTimeoutError" for x in causes(e))
    lost = lost_worker_nodes(store, run_id, nodes_before, nodes_now)
    if not (timed_out or lost):
        return None
    gone = ", ".join(f"{nid[:8]} ({ip})" for nid, ip in sorted(lost.items()))
    plural = "s" if len(lost) > 1 else ""
    if timed_out:
        s = cfg.scaling
        cause = "no_resources"
        what = (
            f"the cluster could not place the {s.workers} workers ({_resources(cfg)} each, "
            f"placement {s.placement}) within failure.start_timeout_s ({cfg.failure.start_timeout_s:g} s)"
        )
        if lost:
            what += f" after Ray node{plural} {gone}, which hosted workers of this run, left the cluster"
    else:
        cause = "node_lost"
        allowed = cfg.failure.max_failures
        what = (
            f"Ray node{plural} {gone}, which hosted workers of this run, left the cluster, and "
            f"failure.max_failures ({allowed}) allowed no "
            + ("restart" if allowed == 0 else f"restart beyond the {allowed} already made")
        )
    ckpt = checkpoints.latest(store, run_id)
    if ckpt:
        kept = (
            f"Everything up to the last checkpoint ({ckpt['dir']}: {ckpt['epochs']} epochs, iteration "
            f"{ckpt['iteration']}) is in {store.run_uri(run_id)}; re-submit the same job with "
            f"--name {run_id} to resume from it"
        )
    else:
        kept = (
            f"No checkpoint had been reported yet; re-submit the same job with --name {run_id} "
            "to run it again from the start"
        )
    return cause, f"{what[0].upper()}{what[1:]}. {kept} once the cluster has room for its workers again."


def _resources(cfg: JobConfig) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in scaling_plan(cfg)["resources_per_worker"].items())
