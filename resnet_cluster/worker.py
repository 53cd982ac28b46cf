"""``train_loop_per_worker``: the only module of the training path that imports ``ray.train``.

Ray Train calls it on every worker with a plain dict (see ``launch.trainer``). It rebuilds the
JobConfig, takes rank, world size and device from Ray Train's context, resumes from
``ray.train.get_checkpoint()`` when there is one, and runs :func:`engine.fit` with three
callbacks: the run recorder (rank 0 writes CSVs, events, environment and model to the store),
the progress forwarder (rank 0 -> the driver's live display), and the Ray reporter
(``ray.train.report`` once per epoch on every rank, with a checkpoint when one is due).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

import torch

from resnet_cluster.config import JobConfig
from resnet_cluster.engine import Callback, WorkerContext, fit
from resnet_cluster.engine.checkpoint import load_train_state, save_train_state


PREEMPTION_CHECK_WINDOWS = 5


def _numbers(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RayReporter(Callback):
    """Calls ``ray.train.report`` once per epoch and once per mid-epoch checkpoint on every rank
    (it is a barrier), attaching a checkpoint from rank 0 every ``checkpoint.every_epochs``,
    every ``checkpoint.every_iterations`` steps, when a node's preemption is announced, and at
    the end.

    Uploads are asynchronous by default (``checkpoint.upload: async``,
    ``CheckpointUploadMode.ASYNC``): rank 0 writes ``train_state.pt``
    to a local folder and goes on training while Ray Train copies it to the store and deletes
    the folder; the checkpoint is registered (and becomes what a restart resumes from) only
    once its upload has finished, so a failed or interrupted upload leaves the previous
    checkpoint in charge. A failed upload fails the worker group (Ray Train raises it in the
    training thread), which restarts from that previous checkpoint.
    """

    def __init__(self, cfg: JobConfig, ctx: WorkerContext):
        self.cfg, self.ctx, self.total_epochs = cfg, ctx, 0
        self.upload = cfg.checkpoint.upload
        self.preemption_seen: set[tuple] = set()

    def on_start(self, info: dict[str, Any]) -> None:
        self.total_epochs = info["total_epochs"]

    def _report(self, metrics: dict[str, Any], state, name: str | None) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        mode = CheckpointUploadMode.ASYNC if self.upload == "async" else CheckpointUploadMode.SYNC
        if name is None or not self.ctx.is_main:
            ray.train.report(metrics, checkpoint_upload_mode=mode)
            return
        tmp = tempfile.mkdtemp(prefix="rc-ckpt-")
        try:
            save_train_state(tmp, state())
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
                checkpoint_upload_mode=mode,
                # Ray deletes the folder after the upload (async: in its upload thread)
                delete_local_checkpoint_after_upload=True,
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if mode == CheckpointUploadMode.SYNC:
            shutil.rmtree(tmp, ignore_errors=True)

    def on_epoch_end(self, record, state) -> None:
        epoch, k = record["epoch"], self.cfg.checkpoint.every_iterations
        due = (
            (epoch + 1) % self.cfg.checkpoint.every_epochs == 0
            or epoch + 1 == self.total_epochs
            or (k is not None and record["iteration"] % k == 0)
        )
        self._report(_numbers(record), state, f"epoch_{epoch + 1:05d}" if due else None)

    def on_checkpoint(self, record, state) -> None:
        self._report(_numbers(record), state, f"iter_{record['iteration']:09d}")

    def wants_checkpoint(self, record: dict[str, Any]) -> bool:
        """True once per announced preemption of a node this run uses (every rank gets the
        same answer: ``ray.train.get_preemption_info`` agrees on one value, a barrier).

        Asked every PREEMPTION_CHECK_WINDOWS log windows (100 iterations by default), the same
        iterations on every rank: each ask is a cross-worker barrier through Ray, too dear for
        every step, and a notice comes about 120 s before the node goes.
        """
        import ray.train

        if record["iteration"] % (PREEMPTION_CHECK_WINDOWS * self.cfg.train.log_every_iterations):
            return False

        get = getattr(ray.train, "get_preemption_info", None)
        if get is None:  # a Ray without the preemption watcher (before 2.57)
            return False
        info = get()
        if info is None:
            return False
        key = (tuple(sorted(info.preempted_node_to_ranks)), info.deadline_ms)
        if key in self.preemption_seen:
            return False
        self.preemption_seen.add(key)
        return True


class ProgressForwarder(Callback):
    """Sends log and epoch records to the driver's ``ray.util.queue.Queue`` (rank 0 only)."""

    def __init__(self, queue):
        self.queue = queue

    def _put(self, kind: str, record: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait({"kind": kind, **_numbers(record)})
        except Exception:  # a full or vanished queue must never stop training
            pass

    def on_start(self, info):
        self._put("start", info)

    def on_log(self, record):
        self._put("log", record)

    def on_epoch_end(self, record, state):
        self._put("epoch", record)


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
    except Exception:
        pass
    if ctx.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(ctx.device)
    return info


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from resnet_cluster.artifacts.recorder import RunRecorder
    from resnet_cluster.config import from_dict
    from resnet_cluster.metrics import RayMetrics

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
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
        torch.backends.cudnn.benchmark = True

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
            callbacks.append(ProgressForwarder(config["progress_queue"]))
    callbacks.append(RayMetrics(config["run_id"], ctx.rank))
    callbacks.append(RayReporter(cfg, ctx))

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        # DDP through Ray Train: gloo on the CPU, nccl on GPUs (TorchConfig in launch.trainer).
        return ray.train.torch.prepare_model(model, move_to_device=ctx.device)

    fit(cfg, ctx, callbacks=callbacks, resume=resume, wrap_model=wrap)
