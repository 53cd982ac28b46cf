"""Submit one job: prepare the run folder, fit the TorchTrainer, finish the run folder.

The driver writes what only it knows (the resolved config, the source commit and patch of the
checkout it was started from, the submitted/finished/failed events, and the manifest, last);
rank 0 of the workers writes what the training produces (CSVs, environment, model, summary).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import yaml

from resnet_cluster import datasets
from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.heartbeat import Heartbeat
from resnet_cluster.artifacts.manifest import write_manifest
from resnet_cluster.artifacts.provenance import git_provenance
from resnet_cluster.artifacts.run import RunWriter
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.config import JobConfig
from resnet_cluster.errors import ClusterError, DataError, StoreError, UserError
from resnet_cluster.launch import cluster, failures
from resnet_cluster.launch.ray_compat import bound_sigint_abort
from resnet_cluster.launch.trainer import build_trainer, scaling_plan, start_timeout_env
from resnet_cluster.models.jobs import from_dict

log = logging.getLogger(__name__)


class RunFailed(Exception):
    """Training failed for a reason that is not the user's input (see ``run_id``, ``uri``)."""

    status = "failed"

    def __init__(self, message: str, *, run_id: str, uri: str):
        super().__init__(message)
        self.run_id, self.uri = run_id, uri


class RunStopped(RunFailed):
    """Training was stopped (Ctrl-C) before it finished; the run can be resumed."""

    status = "stopped"


def new_run_id(job_name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{job_name}-{stamp}-{secrets.token_hex(2)}"


def check_dataset(cfg: JobConfig) -> None:
    """Fail before starting Ray when the dataset is missing, unreadable, or in an old layout
    (driver-side: the same manifest check the workers' reader makes, in seconds)."""
    if not datasets.get(cfg.data.dataset).prepared:
        return
    from resnet_cluster.data.shards import read_manifest

    read_manifest(cfg.data.root, cfg.data.dataset)


def _check_resources(cfg: JobConfig, info: dict[str, Any]) -> None:
    """Refuse a job the local cluster can never run (Ray would wait for resources forever).

    Only for the local cluster this process started: a remote cluster may autoscale (the AWS
    config starts with no GPU nodes), so there Ray Train waits for the autoscaler instead.
    """
    if not info["local"]:
        return
    plan = scaling_plan(cfg)
    need = plan.get("elastic", {}).get("min_total_resources", plan["total_resources"])  # a range starts at min
    have = info["resources"]
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v - 1e-9}
    if short:
        detail = ", ".join(f"{k}: needs {n:g}, cluster has {h:g}" for k, (n, h) in short.items())
        if "GPU" in short:
            hint = "Set scaling.use_gpu: false to train on CPUs"
        elif set(short) - {"CPU"}:
            hint = (
                f"Every worker node must declare the custom resource "
                f"(ray start --resources='{{\"{cfg.scaling.node_resource}\": 1}}') for "
                "scaling.workers_per_node; drop workers_per_node to run here"
            )
        else:
            hint = "Lower scaling.workers or scaling.cpus_per_worker (or use --workers N)"
        raise ClusterError(
            f"the Ray cluster ({info['address']}) is too small for this job ({detail}). "
            f"{hint}, or connect to a larger cluster with --address."
        )


def prepare_run(
    cfg: JobConfig,
    store: ArtifactStore,
    run_id: str,
    *,
    source_dir: str = ".",
    provenance: tuple[str, str] | None = None,
) -> bool:
    """Create the run folder, or check that an existing one may be resumed. Returns resuming.

    ``provenance`` is a ``(commit, patch)`` pair taken earlier (a sweep takes it once, on the
    machine the user ran it from); without it the git state of ``source_dir`` is read now.
    """
    layout.validate_run_id(run_id)
    resuming = store.exists(run_id, layout.CONFIG)
    if resuming:
        if store.exists(run_id, layout.MANIFEST):
            raise StoreError(
                f"run {run_id} in {store.root} already finished (it has a manifest); nothing to "
                "resume. Choose another --name, or leave --name out for a fresh run id."
            )
        old = yaml.safe_load(store.read_text(run_id, layout.CONFIG))
        try:  # a key added to JobConfig since the run started takes its default, as it did then
            old = from_dict(old, source=f"run {run_id}").to_dict()
        except (UserError, TypeError):
            pass  # not a job this version can read: compared as it is, and reported as different
        new = cfg.to_dict()
        if old != new:
            diff = _diff_keys(old, new)
            raise StoreError(
                f"run {run_id} in {store.root} was started with a different job "
                f"(differs in: {', '.join(diff) or 'unknown'}). Resuming needs the same job; "
                "choose another --name to start a new run."
            )
        return True
    store.write_text(run_id, layout.CONFIG, cfg.to_yaml())
    commit, patch = provenance or git_provenance(source_dir)
    store.write_text(run_id, layout.GIT_COMMIT, commit)
    store.write_text(run_id, layout.GIT_PATCH, patch)
    return False


def submit(
    cfg: JobConfig,
    *,
    run_id: str | None = None,
    address: str | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    source_dir: str = ".",
    provenance: tuple[str, str] | None = None,
    tags: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` on Ray Train and return ``{run_id, status, uri, metrics, ...}``.

    ``tags`` go on the run's ``submitted`` event (a sweep tags its trials with ``sweep_id``);
    ``callbacks`` are Ray Train callbacks (a Tune trial passes ``TuneReportCallback``).
    Raises UserError subclasses for anything the user can fix, RunFailed when training fails.
    """
    session = RunSession(cfg, run_id=run_id, on_progress=on_progress)
    session.open(address, source_dir=source_dir, provenance=provenance, tags=tags)
    with ProgressPump(on_progress) as pump:
        session.fit(pump.queue, callbacks)
    return session.finish()


class RunSession:
    """One submission of a run, in the order :func:`submit` takes the steps: ``open`` (store,
    dataset, run folder, cluster), ``fit`` (the TorchTrainer, SIGINT, failures), ``finish``."""

    def __init__(self, cfg: JobConfig, *, run_id: str | None, on_progress: Callable[[dict], None] | None):
        self.cfg, self.on_progress = cfg, on_progress
        self.store = ArtifactStore.from_config(cfg.artifacts)
        self.run_id = run_id or new_run_id(cfg.name)
        self.writer = RunWriter(self.store, self.run_id)
        self.submission = secrets.token_hex(4)
        self.resuming = False
        self.info: dict[str, Any] = {}
        self.t0 = 0.0
        self.stopped_recorded: list[dict[str, Any]] = []

    @property
    def uri(self) -> str:
        return self.store.run_uri(self.run_id)

    def open(self, address: str | None, *, source_dir: str, provenance: tuple[str, str] | None,
             tags: dict[str, Any] | None) -> None:
        """Check what the user can fix, before training: store, dataset, run folder, resources."""
        cfg, writer = self.cfg, self.writer
        # Endpoint, credentials and bucket are checked before Ray starts: one clear StoreError
        # naming the store, in seconds, instead of a botocore traceback from a worker later.
        self.store.check()
        check_dataset(cfg)
        self.resuming = prepare_run(cfg, self.store, self.run_id, source_dir=source_dir, provenance=provenance)
        self.info = info = cluster.connect(address)
        writer.event("submitted", submission=self.submission, resuming=self.resuming,
                     address=info["address"], dashboard=info["dashboard_url"], **(tags or {}))  # fmt: skip
        if self.on_progress:
            self.on_progress({"kind": "cluster", "run_id": self.run_id, "uri": self.uri, **info})
        try:
            _check_resources(cfg, info)
        except UserError as e:
            writer.event("failed", submission=self.submission, error=str(e))
            raise

    def record_stop(self) -> None:
        """Once: at the first SIGINT, or when fit() ends interrupted."""
        if not self.stopped_recorded:
            self.stopped_recorded.append(
                self.writer.event("stopped", submission=self.submission, reason="interrupted (SIGINT)")
            )

    def fit(self, progress_queue: Any, callbacks: list[Any] | None) -> None:
        """Train; a stop or a failure is recorded in the run's events and raised."""
        cfg, store, run_id = self.cfg, self.store, self.run_id
        nodes_before = failures.alive_nodes()  # to name the nodes a failed run lost
        self.t0 = time.time()
        # "running" means driven: runs list shows `lost` once this stops (artifacts.heartbeat)
        driver_beat = Heartbeat(store, run_id, "driver")
        try:
            driver_beat.start()
            trainer = build_trainer(cfg, run_id=run_id, store=store, submission=self.submission,
                                    progress_queue=progress_queue, callbacks=callbacks)  # fmt: skip
            bound_sigint_abort(trainer, self.record_stop)
            with start_timeout_env(cfg):
                trainer.fit()
        except (KeyboardInterrupt, SystemExit):
            # Ray Train's own SIGINT handler aborts the controller and may exit via SystemExit.
            self.record_stop()
            raise RunStopped(_stopped_msg(run_id), run_id=run_id, uri=self.uri) from None
        except Exception as e:
            user = _user_error_in(e)
            explained = None if user else failures.explain(
                e, cfg, store, run_id, nodes_before=nodes_before, nodes_now=failures.alive_nodes()
            )
            cause, msg = explained or (None, str(user) if user else _first_lines(e))
            self.writer.event("failed", submission=self.submission, error=msg, **({"cause": cause} if cause else {}))
            if user:
                raise user from None
            raise RunFailed(msg, run_id=run_id, uri=self.uri) from e
        finally:
            driver_beat.stop()

    def finish(self) -> dict[str, Any]:
        """The finished event and the manifest (last), or RunStopped if training ended early."""
        store, run_id = self.store, self.run_id
        if not store.exists(run_id, layout.SUMMARY):
            # fit() also returns normally when Ray Train's SIGINT handler aborted the run.
            if not self.stopped_recorded:
                self.writer.event("stopped", submission=self.submission, reason="training ended before the last epoch")
            raise RunStopped(_stopped_msg(run_id), run_id=run_id, uri=self.uri)
        summary = store.read_json(run_id, layout.SUMMARY)
        self.writer.event("finished", submission=self.submission, seconds=round(time.time() - self.t0, 1))
        write_manifest(store, run_id)  # last: a run without a manifest is not finished
        return {
            "run_id": run_id,
            "status": "finished",
            "uri": self.uri,
            "store": store.root,
            "resumed": self.resuming,
            "seconds": round(time.time() - self.t0, 1),
            "final": summary.get("final", {}),
            "best": summary.get("best", {}),
            "images_per_sec": summary.get("images_per_sec"),
            "dashboard": self.info["dashboard_url"],
        }


class ProgressPump:
    """The workers' progress queue (``callbacks.ProgressForwarder``) forwarded to ``on_progress``
    in a thread, so ``fit()`` keeps the main thread. Without ``on_progress`` there is no queue."""

    def __init__(self, on_progress: Callable[[dict[str, Any]], None] | None):
        self.on_progress = on_progress
        self.queue: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProgressPump:
        if self.on_progress is not None:
            from ray.util.queue import Queue

            self.queue = Queue(actor_options={"num_cpus": 0})
            self._thread = threading.Thread(target=self._pump, daemon=True)
            self._thread.start()
        return self

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                waiting = self.queue.qsize()
                items = self.queue.get_nowait_batch(waiting) if waiting else []
            except Exception:  # the queue actor is gone at shutdown: nothing more to show
                log.debug("progress queue unreadable", exc_info=True)
                items = []
            for item in items:
                self.on_progress(item)
            self._stop.wait(0.5)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is None:
            return
        import ray

        self._thread.join(timeout=5)
        try:  # drain what arrived after the last poll
            while self.queue.qsize():
                self.on_progress(self.queue.get_nowait())
        except Exception:
            log.debug("progress queue gone while draining", exc_info=True)
        ray.kill(self.queue.actor)


def _stopped_msg(run_id: str) -> str:
    return (
        f"run {run_id} was stopped before it finished. Re-submit the same job with "
        f"--name {run_id} to resume it from its last checkpoint."
    )


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _user_error_in(e: BaseException) -> UserError | None:
    """A UserError raised inside a worker arrives wrapped; dig it out."""
    return next((x for x in failures.causes(e) if isinstance(x, UserError)), None)


def _first_lines(e: BaseException, n: int = 12) -> str:
    text = str(e).strip() or type(e).__name__
    lines = text.splitlines()
    return "\n".join(lines[-n:]) if len(lines) > n else text
