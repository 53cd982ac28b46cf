"""Submit one job: prepare the run folder, fit the TorchTrainer, finish the run folder.

The driver writes what only it knows (the resolved config, the source commit and patch of the
checkout it was started from, the submitted/finished/failed events, and the manifest, last);
rank 0 of the workers writes what the training produces (CSVs, environment, model, summary).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import yaml

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.heartbeat import Heartbeat
from resnet_cluster.artifacts.manifest import write_manifest
from resnet_cluster.artifacts.provenance import git_provenance
from resnet_cluster.artifacts.run import RunWriter
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.config import JobConfig, from_dict
from resnet_cluster.errors import ClusterError, DataError, StoreError, UserError
from resnet_cluster.launch import cluster, failures
from resnet_cluster.launch.trainer import build_trainer, scaling_plan, start_timeout_env


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
    if cfg.data.dataset not in ("cifar10", "imagenet"):
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
    store = ArtifactStore.from_config(cfg.artifacts)
    # Endpoint, credentials and bucket are checked before Ray starts: one clear StoreError
    # naming the store, in seconds, instead of a botocore traceback from a worker later.
    store.check()
    run_id = run_id or new_run_id(cfg.name)
    check_dataset(cfg)
    resuming = prepare_run(cfg, store, run_id, source_dir=source_dir, provenance=provenance)
    writer = RunWriter(store, run_id)
    submission = secrets.token_hex(4)
    info = cluster.connect(address)
    writer.event(
        "submitted",
        submission=submission,
        resuming=resuming,
        address=info["address"],
        dashboard=info["dashboard_url"],
        **(tags or {}),
    )
    if on_progress:
        on_progress({"kind": "cluster", "run_id": run_id, "uri": store.run_uri(run_id), **info})
    try:
        _check_resources(cfg, info)
    except UserError as e:
        writer.event("failed", submission=submission, error=str(e))
        raise

    import ray
    from ray.util.queue import Queue

    nodes_before = failures.alive_nodes()  # to name the nodes a failed run lost
    # "running" means driven: runs list shows `lost` once this stops (artifacts.heartbeat)
    driver_beat = Heartbeat(store, run_id, "driver")
    progress_q = Queue(actor_options={"num_cpus": 0}) if on_progress else None
    stop = threading.Event()

    def pump() -> None:  # queue -> on_progress, in a thread so fit() keeps the main thread
        while not stop.is_set():
            try:
                waiting = progress_q.qsize()
                items = progress_q.get_nowait_batch(waiting) if waiting else []
            except Exception:  # the queue actor is gone at shutdown: nothing more to show
                items = []
            for item in items:
                on_progress(item)
            stop.wait(0.5)

    pump_thread = threading.Thread(target=pump, daemon=True) if progress_q is not None else None
    if pump_thread:
        pump_thread.start()
    t0 = time.time()
    stopped_recorded: list[dict[str, Any]] = []

    def record_stop() -> None:  # once: at the first SIGINT, or when fit() ends interrupted
        if not stopped_recorded:
            stopped_recorded.append(writer.event("stopped", submission=submission, reason="interrupted (SIGINT)"))

    try:
        driver_beat.start()
        trainer = build_trainer(
            cfg, run_id=run_id, store=store, submission=submission, progress_queue=progress_q, callbacks=callbacks
        )
        _bounded_sigint_abort(trainer, record_stop)
        with start_timeout_env(cfg):
            trainer.fit()
    except (KeyboardInterrupt, SystemExit):
        # Ray Train's own SIGINT handler aborts the controller and may exit via SystemExit.
        record_stop()
        raise RunStopped(_stopped_msg(run_id), run_id=run_id, uri=store.run_uri(run_id)) from None
    except Exception as e:
        user = _user_error_in(e)
        explained = None if user else failures.explain(
            e, cfg, store, run_id, nodes_before=nodes_before, nodes_now=failures.alive_nodes()
        )
        cause, msg = explained or (None, str(user) if user else _first_lines(e))
        writer.event("failed", submission=submission, error=msg, **({"cause": cause} if cause else {}))
        if user:
            raise user from None
        raise RunFailed(msg, run_id=run_id, uri=store.run_uri(run_id)) from e
    finally:
        driver_beat.stop()
        stop.set()
        if pump_thread:
            pump_thread.join(timeout=5)
            try:  # drain what arrived after the last poll
                while progress_q.qsize():
                    on_progress(progress_q.get_nowait())
            except Exception:
                pass
            ray.kill(progress_q.actor)

    if not store.exists(run_id, layout.SUMMARY):
        # fit() also returns normally when Ray Train's SIGINT handler aborted the run.
        if not stopped_recorded:
            writer.event("stopped", submission=submission, reason="training ended before the last epoch")
        raise RunStopped(_stopped_msg(run_id), run_id=run_id, uri=store.run_uri(run_id))
    summary = store.read_json(run_id, layout.SUMMARY)
    writer.event("finished", submission=submission, seconds=round(time.time() - t0, 1))
    write_manifest(store, run_id)  # last: a run without a manifest is not finished
    return {
        "run_id": run_id,
        "status": "finished",
        "uri": store.run_uri(run_id),
        "store": store.root,
        "resumed": resuming,
        "seconds": round(time.time() - t0, 1),
        "final": summary.get("final", {}),
        "best": summary.get("best", {}),
        "images_per_sec": summary.get("images_per_sec"),
        "dashboard": info["dashboard_url"],
    }


ABORT_WAIT_S = 30  # Ray Train's graceful abort, before the controller is killed (< remote.STOP_WAIT_S)


def _bounded_sigint_abort(trainer: Any, on_stop: Callable[[], None]) -> None:
    """Make the first SIGINT (Ctrl-C, or `resnet-cluster stop` through the Jobs API) record the
    run as stopped at once and end ``fit()`` within ABORT_WAIT_S.

    Ray Train 2.60's own handler (``_register_sigint_handler``, installed by ``fit()`` in the main
    thread) waits without a limit for its controller's ``abort``; a controller that is waiting
    for resources for a worker group answers only when that wait ends (up to
    ``failure.start_timeout_s``), so the driver was killed before it could record anything and
    the run looked alive forever. Here the stop is recorded first, the controller gets
    ABORT_WAIT_S to abort gracefully, and is killed if it does not answer (it was not training:
    nothing is lost that a checkpoint had not saved).
    """
    import signal

    if not callable(getattr(trainer, "_register_sigint_handler", None)):
        return  # another Ray: its own handler stays

    def register(controller: Any) -> None:
        import ray

        def handler(signum, frame) -> None:
            first = not handler.fired
            handler.fired = True
            try:
                on_stop()
            except Exception:  # the store may be unreachable; stopping must not fail
                pass
            if first:
                try:
                    ray.get(controller.abort.remote(), timeout=ABORT_WAIT_S)
                    return  # aborted: fit() returns, and the run is recorded as stopped
                except ray.exceptions.GetTimeoutError:
                    ray.kill(controller)
                except ray.exceptions.RayActorError:
                    pass
            raise KeyboardInterrupt

        handler.fired = False
        signal.signal(signal.SIGINT, handler)

    trainer._register_sigint_handler = register


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
