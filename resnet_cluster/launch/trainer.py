"""JobConfig -> Ray Train ``TorchTrainer`` (the V2 API of the pinned Ray)."""

from __future__ import annotations

from typing import Any

from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.config import JobConfig

CHECKPOINTS_DIR = "checkpoints"  # Ray Train's run folder, inside the run: runs/<id>/checkpoints


def scaling_plan(cfg: JobConfig) -> dict[str, Any]:
    """What Ray Train will be asked for, in plain numbers (shown by ``submit --dry-run``)."""
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    if s.workers_per_node is not None:
        # N bundles of 1/N each fit on a node that declares node_resource: 1, and N+1 do not.
        resources[s.node_resource] = round(1.0 / s.workers_per_node, 4)
    return {
        "workers": s.workers,
        "global_batch": cfg.train.batch_size,
        "per_worker_batch": cfg.per_worker_batch,
        "use_gpu": s.use_gpu,
        "resources_per_worker": resources,
        "total_resources": {k: v * s.workers for k, v in resources.items()},
        "backend": "nccl" if s.use_gpu else "gloo",
        "placement_strategy": s.placement,
        "workers_per_node": s.workers_per_node,
    }


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
    from resnet_cluster.artifacts.store import pyarrow_filesystem

    path = store.fs._strip_protocol(store.run_uri(run_id))
    return path, pyarrow_filesystem(store)


def build_trainer(
    cfg: JobConfig,
    *,
    run_id: str,
    store: ArtifactStore,
    submission: str,
    progress_queue: Any = None,
    callbacks: list[Any] | None = None,
):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

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
            num_workers=plan["workers"],
            use_gpu=plan["use_gpu"],
            resources_per_worker=plan["resources_per_worker"],
            placement_strategy=plan["placement_strategy"],
        ),
        run_config=RunConfig(
            # Same name + storage => Ray Train resumes from the run's latest checkpoint.
            name=CHECKPOINTS_DIR,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            callbacks=callbacks,
        ),
    )
