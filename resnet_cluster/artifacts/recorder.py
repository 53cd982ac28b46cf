"""The loop callback that writes a run's growing files (rank 0 only).

``training_loss.csv`` gets one row per log window and ``testing_error.csv`` one row per
evaluation; both are uploaded while training runs (at most every few seconds, and at every
epoch end), so a user can plot a run that is still going. On resume, rows logged after the
checkpoint being resumed are dropped, so each CSV reads as one uninterrupted run. Both are
uploaded at every checkpoint too (epoch end or mid-epoch), so a run resumed from a mid-epoch
checkpoint has every row up to it. Rank 0 also keeps ``heartbeat.rank0.json`` fresh (see
``artifacts.heartbeat``) and records each world-size change of an elastic run as a ``resized``
event.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.heartbeat import Heartbeat
from resnet_cluster.artifacts.provenance import environment_snapshot
from resnet_cluster.artifacts.run import CsvLog, RunWriter, utc_now
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.config import JobConfig
from resnet_cluster.engine.loop import Callback, model_options

TRAIN_FIELDS = ["iteration", "epoch", "loss", "train_err", "lr", "images_per_sec", "time"]
TEST_FIELDS = [
    "epoch", "iteration", "top1_err", "top5_err", "test_loss",
    "train_loss", "train_err", "lr", "images_per_sec", "epoch_time_s", "time",
]  # fmt: skip
MODEL_FORMAT = 1


def save_model_file(path: str, model: torch.nn.Module, cfg: JobConfig, summary: dict[str, Any]) -> None:
    """``model.pt``: the final weights plus what is needed to rebuild the module."""
    torch.save(
        {
            "format": MODEL_FORMAT,
            "arch": cfg.model.arch,
            "model_options": model_options(cfg),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": cfg.to_dict(),
            "summary": summary,
        },
        path,
    )


def _number(text: str | None) -> Any:
    if text in (None, ""):
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


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
        import json

        if not self.store.exists(self.run_id, layout.EVENTS):
            return []
        out = []
        for line in self.store.read_text(self.run_id, layout.EVENTS).splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

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
                rec = {k: _number(v) for k, v in row.items()}
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
