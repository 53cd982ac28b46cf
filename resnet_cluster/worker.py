"""``train_loop_per_worker``: the only module of the training path that imports ``ray.train``.

Ray Train calls it on every worker with a plain dict (see ``launch.trainer``). It rebuilds the
JobConfig, takes rank, world size and device from Ray Train's context, resumes from
``ray.train.get_checkpoint()`` when there is one, and runs :func:`engine.fit` with three
callbacks from :mod:`resnet_cluster.callbacks`: the run recorder (rank 0 writes CSVs, events,
environment and model to the store), the progress forwarder (rank 0 -> the driver's live
display), Ray metrics, and the Ray reporter (``ray.train.report`` once per epoch on every rank,
with a checkpoint when one is due).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch

from resnet_cluster.config import JobConfig
from resnet_cluster.engine import Callback, WorkerContext, fit
from resnet_cluster.engine.checkpoint import load_train_state
from resnet_cluster.engine.device import setup_device

log = logging.getLogger(__name__)


def worker_info(ctx: WorkerContext) -> dict[str, Any]:
    info = {
        "rank": ctx.rank,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(ctx.device),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import ray

        info["node_id"] = ray.get_runtime_context().get_node_id()
    except Exception:  # outside a Ray worker (tests): no node id
        log.debug("no Ray runtime context", exc_info=True)
    if ctx.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(ctx.device)
    return info


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from resnet_cluster.callbacks import ProgressForwarder, RayMetrics, RayReporter, RunRecorder
    from resnet_cluster.models.jobs import from_dict

    cfg = from_dict(config["job"], source="job (on worker)")
    # Ray sets OMP_NUM_THREADS from the worker's CPUs; make torch agree with the job's request.
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    tc = ray.train.get_context()
    ctx = WorkerContext(
        rank=tc.get_world_rank(),
        world_size=tc.get_world_size(),
        local_rank=tc.get_local_rank(),
        device=ray.train.torch.get_device(),
    )
    # Before anything uses CUDA: a node whose driver cannot run this torch gets a message
    # naming both, not a traceback from set_device (engine/device.py).
    setup_device(ctx.device, deterministic=cfg.precision.deterministic)

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_train_state(d)

    workers = ctx.all_gather_object(worker_info(ctx))  # a collective: every rank calls it
    callbacks: list[Callback] = []
    if ctx.is_main:
        callbacks.append(
            RunRecorder(
                cfg, config["store"], config["run_id"], workers=workers, submission=config.get("submission")
            )
        )
        if config.get("progress_queue") is not None:
            callbacks.append(ProgressForwarder(config["progress_queue"], workers))
    callbacks.append(RayMetrics(config["run_id"], ctx.rank))
    callbacks.append(RayReporter(cfg, ctx, run_id=config["run_id"]))

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        # DDP through Ray Train: gloo on the CPU, nccl on GPUs (TorchConfig in launch.trainer).
        return ray.train.torch.prepare_model(model, move_to_device=ctx.device)

    fit(cfg, ctx, callbacks=callbacks, resume=resume, wrap_model=wrap)
