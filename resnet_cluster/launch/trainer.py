"""JobConfig -> Ray Train ``TorchTrainer`` (the V2 API of the pinned Ray)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.config import JobConfig
from resnet_cluster.engine.accumulation import StepPlan

CHECKPOINTS_DIR = "checkpoints"  # Ray Train's run folder, inside the run: runs/<id>/checkpoints
# How long Ray Train's controller waits for a worker group's placement group; the driver's
# value travels to the controller (Ray Train propagates it), default 60 s.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def scaling_plan(cfg: JobConfig) -> dict[str, Any]:
    """What Ray Train will be asked for, in plain numbers (shown by ``submit --dry-run``)."""
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    if s.workers_per_node is not None:
        # N bundles of 1/N each fit on a node that declares node_resource: 1, and N+1 do not.
        resources[s.node_resource] = round(1.0 / s.workers_per_node, 4)
    plan = {
        "workers": {"min": s.min_workers, "max": s.max_workers} if s.elastic else s.max_workers,
        "global_batch": cfg.train.batch_size,
        "per_worker_batch": cfg.per_worker_batch,
        "use_gpu": s.use_gpu,
        "resources_per_worker": resources,
        "total_resources": {k: v * s.max_workers for k, v in resources.items()},
        "backend": "nccl" if s.use_gpu else "gloo",
        "placement_strategy": s.placement,
        "workers_per_node": s.workers_per_node,
    }
    if s.elastic:
        # What each world size Ray Train may pick does (engine.accumulation.StepPlan): the
        # global batch is train.batch_size at all of them.
        plan["elastic"] = {
            "micro_batch": cfg.per_worker_batch,
            "resize_check_s": s.resize_check_s,
            "min_total_resources": {k: v * s.min_workers for k, v in resources.items()},
            "sizes": [
                {"workers": w, "training_workers": p.active, "micro_batches_per_worker": p.accumulate}
                for w in range(s.min_workers, s.max_workers + 1)
                for p in [StepPlan.for_world(s.max_workers, w, 0)]
            ],
        }
    return plan


def ray_storage(store: ArtifactStore, run_id: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) that put Ray Train's checkpoints in the run folder.

    A local store is a plain path. Any other fsspec store (s3:// through s3fs) goes through
    pyarrow's FSSpecHandler, so Ray uses exactly the endpoint the store uses (credentials come
    from each node's environment or instance role, never from the job), and checkpoints live
    in the run prefix, where a cluster without a shared disk resumes them from. Each file Ray
    writes there is uploaded whole (multipart, aborted on failure), not streamed.
    """
    if store.is_local:
        return store.run_uri(run_id), None
    from resnet_cluster.artifacts.fs_compat import strip_protocol
    from resnet_cluster.artifacts.store import pyarrow_filesystem

    path = strip_protocol(store.fs, store.run_uri(run_id))
    return path, pyarrow_filesystem(store)


def failure_config(cfg: JobConfig):
    """Ray Train's FailureConfig for the job.

    ``max_failures`` counts failures of a running worker group (a crashed worker, a lost node).
    A (re)start that cannot get its resources is a "controller failure" to Ray Train, retried
    every 60 s forever by default; with ``failure.start_timeout_s`` set, the one wait is that
    long (see :func:`start_timeout_env`) and is not retried, so the run fails instead of hanging.
    """
    from ray.train import FailureConfig

    bounded = cfg.failure.start_timeout_s != -1
    if cfg.scaling.elastic:
        # A lost node's first restart still counts it (Ray's reserved resources lag): that start
        # times out after start_timeout_s as a controller failure, and the retry starts at the
        # size that fits (docs/ray-notes.md, measured). Ray counts these for the whole run, so an elastic
        # run retries them without limit; it waits for scaling.workers min like Ray Train does.
        return FailureConfig(max_failures=cfg.failure.max_failures, controller_failure_limit=-1)
    return FailureConfig(max_failures=cfg.failure.max_failures, controller_failure_limit=0 if bounded else -1)


@contextmanager
def start_timeout_env(cfg: JobConfig) -> Iterator[None]:
    """Set Ray Train's worker-group start timeout in this (driver) process around ``fit()``."""
    if cfg.failure.start_timeout_s == -1:
        yield
        return
    with scoped_env({START_TIMEOUT_ENV: f"{cfg.failure.start_timeout_s:g}"}):
        yield


@contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables of this process for the ``with`` block, then restore them."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_trainer(
    cfg: JobConfig,
    *,
    run_id: str,
    store: ArtifactStore,
    submission: str,
    progress_queue: Any = None,
    callbacks: list[Any] | None = None,
):
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from resnet_cluster.launch.controller import FailureRecorder
    from resnet_cluster.worker import train_loop_per_worker

    plan = scaling_plan(cfg)
    storage_path, storage_fs = ray_storage(store, run_id)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": cfg.to_dict(),
            "run_id": run_id,
            "store": store.root,
            "submission": submission,
            "progress_queue": progress_queue,
        },
        torch_config=TorchConfig(backend=plan["backend"]),
        scaling_config=ScalingConfig(
            num_workers=(
                (cfg.scaling.min_workers, cfg.scaling.max_workers) if cfg.scaling.elastic else cfg.scaling.max_workers
            ),
            # Elastic runs: how often a running group checks for room to grow back to max.
            elastic_resize_monitor_interval_s=cfg.scaling.resize_check_s,
            use_gpu=plan["use_gpu"],
            resources_per_worker=plan["resources_per_worker"],
            placement_strategy=plan["placement_strategy"],
        ),
        run_config=RunConfig(
            # Same name + storage => Ray Train resumes from the run's latest checkpoint.
            name=CHECKPOINTS_DIR,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=failure_config(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            # in the controller: each failure of the worker group becomes an event of the run
            callbacks=[FailureRecorder(store.root, cfg.artifacts.endpoint_url, run_id, submission), *(callbacks or [])],
        ),
    )
