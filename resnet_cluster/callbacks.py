"""The training loop's callbacks on a Ray Train worker (see ``worker.train_loop_per_worker``).

- :class:`RunRecorder` (rank 0): a run's growing files in the artifact store.
- :class:`ProgressForwarder` (rank 0): log and epoch records to the driver's live display.
- :class:`RayMetrics` (every rank): ``ray.util.metrics`` gauges for Prometheus and Grafana.
- :class:`RayReporter` (every rank): ``ray.train.report`` once per epoch, with checkpoints.

RunRecorder: ``training_loss.csv`` gets one row per log window and ``testing_error.csv`` one row per
evaluation; both are uploaded while training runs (at most every few seconds, and at every
epoch end), so a user can plot a run that is still going. On resume, rows logged after the
checkpoint being resumed are dropped, so each CSV reads as one uninterrupted run. Both are
uploaded at every checkpoint too (epoch end or mid-epoch), so a run resumed from a mid-epoch
checkpoint has every row up to it. Rank 0 also keeps ``heartbeat.rank0.json`` fresh (see
``artifacts.heartbeat``) and records each world-size change of an elastic run as a ``resized``
event.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

import torch

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.heartbeat import Heartbeat
from resnet_cluster.artifacts.provenance import environment_snapshot
from resnet_cluster.artifacts.registry import parse_events, parse_number
from resnet_cluster.artifacts.run import CsvLog, RunWriter, utc_from_ms, utc_now
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.config import JobConfig
from resnet_cluster.engine import Callback, WorkerContext
from resnet_cluster.engine.checkpoint import save_train_state
from resnet_cluster.models.files import save_model_file

log = logging.getLogger(__name__)

# Rank 0 asks Ray whether a node of the run is about to be preempted every this many log windows.
PREEMPTION_CHECK_WINDOWS = 5

TRAIN_FIELDS = ["iteration", "epoch", "loss", "train_err", "lr", "images_per_sec", "time"]
TEST_FIELDS = [
    "epoch", "iteration", "top1_err", "top5_err", "test_loss",
    "train_loss", "train_err", "lr", "images_per_sec", "epoch_time_s", "time",
]  # fmt: skip


class RunRecorder(Callback):
    def __init__(
        self,
        cfg: JobConfig,
        store: str | ArtifactStore,
        run_id: str,
        *,
        workers: list[dict[str, Any]] | None = None,
        submission: str | None = None,
        csv_interval_s: float = 5.0,
    ):
        self.cfg = cfg
        # On a worker the store arrives as its root URI; the job's endpoint_url goes with it
        # (credentials come from the worker's own environment or instance role).
        self.store = (
            store
            if isinstance(store, ArtifactStore)
            else ArtifactStore(store, endpoint_url=cfg.artifacts.endpoint_url)
        )
        self.run_id = run_id
        self.workers = workers or []
        self.submission = submission
        self.writer = RunWriter(self.store, run_id)
        self.train_csv = CsvLog(self.store, run_id, layout.TRAIN_CSV, TRAIN_FIELDS, min_interval_s=csv_interval_s)
        self.test_csv = CsvLog(self.store, run_id, layout.TEST_CSV, TEST_FIELDS, min_interval_s=csv_interval_s)
        self.last_eval: dict[str, Any] = {}
        self.best_eval: dict[str, Any] = {}
        self.iteration: int | None = None
        self.heartbeat = Heartbeat(self.store, run_id, "rank0", fields=lambda: {"iteration": self.iteration})

    def _events(self) -> list[dict[str, Any]]:
        if not self.store.exists(self.run_id, layout.EVENTS):
            return []
        return parse_events(self.store.read_text(self.run_id, layout.EVENTS))

    def _earlier_start_in_this_submission(self, events: list[dict[str, Any]]) -> bool:
        if self.submission is None:
            return False
        return any(
            ev.get("submission") == self.submission and ev.get("event") in ("started", "resumed", "restarted")
            for ev in events
        )

    def _reload_evals(self) -> None:
        """Last and best evaluation from the rows kept on resume (epochs before the checkpoint)."""
        import csv

        with open(self.test_csv.local_path, newline="") as f:
            for row in csv.DictReader(f):
                rec = {k: parse_number(v) for k, v in row.items()}
                if rec.get("top1_err") is None:
                    continue
                self.last_eval = rec
                if not self.best_eval or rec["top1_err"] < self.best_eval["top1_err"]:
                    self.best_eval = rec

    def on_start(self, info: dict[str, Any]) -> None:
        start_epoch, start_iter = info["start_epoch"], info["start_iteration"]
        self.iteration = start_iter
        self.heartbeat.start()
        events = self._events() if info["resumed"] else []
        if info["resumed"]:
            kind = "restarted" if self._earlier_start_in_this_submission(events) else "resumed"
            self.train_csv.resume(lambda r: int(r["iteration"]) <= start_iter)
            self.test_csv.resume(lambda r: int(r["epoch"]) < start_epoch)
            self._reload_evals()
        else:
            kind = "started"
            self.train_csv.flush()
            self.test_csv.flush()
        world_size = info.get("world_size") or len(self.workers) or 1
        before = [e.get("world_size") for e in events if e.get("event") in ("started", "resumed", "restarted")]
        if before and before[-1] and before[-1] != world_size:
            # an elastic resize (or a fixed-size run resumed elsewhere): the recipe stays N's
            self.writer.event(
                "resized",
                submission=self.submission,
                from_world_size=before[-1],
                to_world_size=world_size,
                epoch=start_epoch,
                iteration=start_iter,
                training_workers=info.get("training_workers"),
                micro_batches_per_step=info.get("micro_batches_per_step"),
            )
        self.writer.event(
            kind,
            submission=self.submission,
            epoch=start_epoch,
            iteration=start_iter,
            world_size=world_size,
            training_workers=info.get("training_workers", world_size),
            micro_batches_per_step=info.get("micro_batches_per_step", 1),
            hosts=sorted({w.get("hostname") for w in self.workers if w.get("hostname")}),
        )
        env = environment_snapshot()
        env["workers"] = self.workers
        env["scaling"] = self.cfg.scaling.model_dump()
        env["run"] = {k: info[k] for k in ("iters_per_epoch", "total_iterations", "total_epochs", "parameters")}
        self.store.write_json(self.run_id, layout.ENVIRONMENT, env)

    def on_log(self, record: dict[str, Any]) -> None:
        self.iteration = record.get("iteration", self.iteration)
        self.train_csv.append({**{k: record.get(k) for k in TRAIN_FIELDS}, "time": utc_now()})

    def on_checkpoint(self, record: dict[str, Any], state) -> None:
        if record.get("reason") == "preemption":  # what the notice said, and where it caught the run
            self.writer.event(
                "preemption_notice",
                submission=self.submission,
                epoch=record["epoch"],
                iteration=record["iteration"],
                epoch_step=record["epoch_step"],
                nodes=record.get("preempted_nodes"),
                ranks=record.get("preempted_ranks"),
                deadline=utc_from_ms(record.get("deadline_ms")),
            )
        self.train_csv.flush()
        self.test_csv.flush()

    def on_epoch_end(self, record: dict[str, Any], state) -> None:
        if "top1_err" in record:
            self.test_csv.append({**{k: record.get(k) for k in TEST_FIELDS}, "time": utc_now()})
            self.last_eval = record
            if not self.best_eval or record["top1_err"] < self.best_eval["top1_err"]:
                self.best_eval = record
        self.train_csv.flush()
        self.test_csv.flush()

    def on_finish(self, summary: dict[str, Any], model: torch.nn.Module) -> None:
        self.heartbeat.stop()  # before the last files: the manifest covers its final state
        with tempfile.TemporaryDirectory(prefix="rc-model-") as d:
            path = os.path.join(d, layout.MODEL)
            save_model_file(path, model, self.cfg, summary)
            self.store.put_file(self.run_id, path, layout.MODEL)
        self.train_csv.close()
        self.test_csv.close()
        pick = ("top1_err", "top5_err", "test_loss", "train_loss", "epoch", "iteration")
        self.writer.write_summary(
            "finished",
            epochs=summary["epochs"],
            iterations=summary["iterations"],
            final={k: self.last_eval.get(k) for k in pick},
            best={k: self.best_eval.get(k) for k in pick},
            job=self.cfg.name,
            model=self.cfg.model.arch,
            images_per_sec=self.last_eval.get("images_per_sec"),
        )


# Training metrics in Ray's metrics system, so Prometheus and Grafana pick them up. Ray exports a
# metric named ``resnet_cluster_images_per_second`` as ``ray_resnet_cluster_images_per_second``
# on each node's metrics agent; infra/grafana has a dashboard for these. Every rank reports its
# own series (tag ``rank``), tagged with the run id.
# name -> (description, key of the loop's log record it comes from)
GAUGES: dict[str, tuple[str, str]] = {
    "resnet_cluster_images_per_second": ("Training images per second, all workers together.", "images_per_sec"),
    "resnet_cluster_train_loss": ("Training loss (mean cross-entropy) over the last log window.", "loss"),
    "resnet_cluster_train_error_percent": ("Training top-1 error over the last log window, %.", "train_err"),
    "resnet_cluster_learning_rate": ("Learning rate of the last step.", "lr"),
    "resnet_cluster_data_wait_fraction": (
        "Fraction of this worker's step time spent waiting for the next batch.",
        "data_wait_fraction",
    ),
}
EPOCH_GAUGES: dict[str, tuple[str, str]] = {
    "resnet_cluster_test_error_percent": ("Top-1 test error of the last evaluation, %.", "top1_err"),
    "resnet_cluster_epoch": ("Epochs finished.", "epoch_done"),
}
TAG_KEYS = ("run_id", "rank")


class RayMetrics(Callback):
    """Sets ``ray.util.metrics`` gauges from the loop's log and epoch records."""

    def __init__(self, run_id: str, rank: int):
        from ray.util.metrics import Gauge

        self.tags = {"run_id": run_id, "rank": str(rank)}
        self.gauges = {
            name: (Gauge(name, description=desc, tag_keys=TAG_KEYS), key)
            for name, (desc, key) in {**GAUGES, **EPOCH_GAUGES}.items()
        }

    def _set(self, names: dict[str, tuple[str, str]], record: dict[str, Any]) -> None:
        for name in names:
            gauge, key = self.gauges[name]
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                gauge.set(float(value), tags=self.tags)

    def on_log(self, record: dict[str, Any]) -> None:
        self._set(GAUGES, record)

    def on_epoch_end(self, record: dict[str, Any], state) -> None:
        self._set(EPOCH_GAUGES, {**record, "epoch_done": record["epoch"] + 1})


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

    def __init__(self, cfg: JobConfig, ctx: WorkerContext, run_id: str = "run"):
        self.cfg, self.ctx, self.total_epochs = cfg, ctx, 0
        self.upload = cfg.checkpoint.upload
        self.preemption_seen: set[tuple] = set()
        # this run's local checkpoint folders on this node: rc-ckpt-<run id>+<random> ("+" is in
        # no run id, so run "a" never takes run "a-b"'s folders for its own)
        self.prefix = f"rc-ckpt-{run_id}+"

    def on_start(self, info: dict[str, Any]) -> None:
        self.total_epochs = info["total_epochs"]
        if self.ctx.is_main:
            self._remove_left_folders()

    def _remove_left_folders(self) -> None:
        """Ray deletes a checkpoint's local folder once it is uploaded; one whose upload failed
        stays (Ray fails the worker group instead). When a worker group starts, the run's
        earlier groups are gone, and no upload of theirs is running: what is left of them in
        this node's temp folder goes (a ResNet-152 train state is about 0.5 GB)."""
        tmp = tempfile.gettempdir()
        for name in os.listdir(tmp):
            if name.startswith(self.prefix) and os.path.isdir(os.path.join(tmp, name)):
                log.info("removing %s, a checkpoint folder an earlier worker group left", name)
                shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)

    def _report(self, metrics: dict[str, Any], state, name: str | None) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        mode = CheckpointUploadMode.ASYNC if self.upload == "async" else CheckpointUploadMode.SYNC
        if name is None or not self.ctx.is_main:
            ray.train.report(metrics, checkpoint_upload_mode=mode)
            return
        tmp = tempfile.mkdtemp(prefix=self.prefix)
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
        record.update(preempted_nodes=info.preempted_node_ids, preempted_ranks=info.preempted_ranks,
                      deadline_ms=info.deadline_ms)  # fmt: skip
        return True


class ProgressForwarder(Callback):
    """Sends log and epoch records to the driver's ``ray.util.queue.Queue`` (rank 0 only)."""

    def __init__(self, queue, workers: list[dict[str, Any]] | None = None):
        self.queue = queue
        self.workers = workers or []

    def _put(self, kind: str, record: dict[str, Any]) -> None:
        # plain values only (numbers, flags, names), nothing that holds tensors or modules
        plain = {k: v for k, v in record.items() if isinstance(v, (int, float, bool, str)) or (
            isinstance(v, list) and all(isinstance(x, str) for x in v))}  # fmt: skip
        try:
            self.queue.put_nowait({"kind": kind, **plain})
        except Exception:  # a full or vanished queue must never stop training
            log.debug("progress record dropped", exc_info=True)

    def on_start(self, info):
        # the start line names the worker group: how many, and on which devices
        self._put("start", {**info, "world_size": len(self.workers), "devices": [w["device"] for w in self.workers]})

    def on_log(self, record):
        self._put("log", record)

    def on_epoch_end(self, record, state):
        self._put("epoch", record)
