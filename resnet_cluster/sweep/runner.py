"""Run a sweep with Ray Tune: one Tune trial per (row, seed), each a normal Ray Train run.

Each trial is a function trainable that calls :func:`launch.submit.submit` with the trial's job
and run id, so it is exactly a run that ``resnet-cluster submit`` would make (same worker loop,
same artifacts, same resume rules), tagged with the sweep id on its ``submitted`` event. The
trial's own process needs almost nothing; the training workers' resources come from the job's
``scaling`` section (the sweep's ``trial_resources``), and Ray Train's metrics reach Tune
through ``TuneReportCallback`` (the way Ray 2.60 composes Tune and Train).

The sweep itself lives at ``<store>/sweeps/<sweep_id>/``: ``sweep.json`` (rows, every trial's
run id and complete job), the sweep file as given, and the source commit and patch taken when it
started. Resuming reruns only the trials whose runs have not finished; an interrupted trial's
run resumes from its last checkpoint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from resnet_cluster import datasets
from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.provenance import git_provenance
from resnet_cluster.artifacts.registry import get_run, list_runs, parse_events
from resnet_cluster.artifacts.run import RunWriter, utc_now
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.config import JobConfig
from resnet_cluster.errors import ConfigError, StoreError
from resnet_cluster.launch import cluster
from resnet_cluster.launch.submit import check_dataset
from resnet_cluster.launch.trainer import scaling_plan, scoped_env
from resnet_cluster.models.jobs import from_dict
from resnet_cluster.sweep.spec import Sweep

SWEEP_JSON = "sweep.json"
SWEEP_FILE = "sweep.yaml"
# The trial's own process only waits on its TorchTrainer. Tune refuses empty resources, and a
# fraction of a CPU would keep a whole-CPU training worker of another trial from fitting.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 64 * 1024**2}
PG_REMOVED = "placement group was removed"  # Ray's words when Tune ends a trial's placement group
ASHA_REASON = "stopped early by the ASHA scheduler"


def check_datasets(jobs: list[dict[str, Any]], source: str) -> None:
    """Every distinct dataset of the trials is prepared and readable (before anything runs)."""
    for job in {str(j["data"]): j for j in jobs}.values():
        check_dataset(from_dict(job, source=source))


def _first_cfg(meta: dict[str, Any]) -> JobConfig:
    return from_dict(meta["trials"][0]["job"], source=f"sweep {meta.get('sweep_id')}")


def save(store: ArtifactStore, sweep: Sweep, provenance: tuple[str, str]) -> dict[str, Any]:
    """Write the sweep's record (create-only: a sweep id is never reused)."""
    sweep_id = sweep.sweep_id
    views = store.sweeps()
    meta = {**sweep.as_dict(), "created": utc_now()}
    with open(sweep.file, encoding="utf-8") as f:
        views.write_text(sweep_id, SWEEP_FILE, f.read())
    views.write_text(sweep_id, layout.GIT_COMMIT, provenance[0])
    views.write_text(sweep_id, layout.GIT_PATCH, provenance[1])
    views.write_json(sweep_id, SWEEP_JSON, meta, exclusive=True)  # last: the sweep exists
    return meta


def load(store: ArtifactStore, sweep_id: str) -> dict[str, Any]:
    views = store.sweeps()
    layout.validate_run_id(sweep_id)
    if not views.exists(sweep_id, SWEEP_JSON):
        known = list_sweep_ids(store)
        import difflib

        close = difflib.get_close_matches(sweep_id, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise StoreError(
            f"no sweep {sweep_id!r} in artifact store {store.root}.{hint} List the sweeps with "
            f"`resnet-cluster sweep list --store {store.root}`, or pass the store it was run "
            "with (--store)."
        )
    return views.read_json(sweep_id, SWEEP_JSON)


def list_sweep_ids(store: ArtifactStore) -> list[str]:
    return store.sweeps().list_run_ids()


def trial_states(store: ArtifactStore, meta: dict[str, Any]) -> dict[str, Any]:
    """``{run_id: RunRecord or None}`` for every trial of the sweep (None: never started)."""
    records = {r.run_id: r for r in list_runs(store, sweep=meta["sweep_id"])}
    return {t["run_id"]: records.get(t["run_id"]) for t in meta["trials"]}


def _settled(store: ArtifactStore, run_id: str, *, wait_s: float) -> Any:
    """The run's record once it shows an end (finished, stopped, failed), or after ``wait_s``."""
    import time

    deadline = time.time() + wait_s
    while True:
        rec = get_run(store, run_id)
        if rec is None or rec.status in ("finished", "stopped") or time.time() >= deadline:
            return rec
        time.sleep(0.5)


def _done(store: ArtifactStore, rec: Any) -> bool:
    """A trial needs no more work: its run finished, or ASHA stopped it early on purpose."""
    if rec is None:
        return False
    if rec.status == "finished":
        return True
    if rec.status != "stopped":
        return False
    events = parse_events(store.read_text(rec.run_id, layout.EVENTS))
    last = [e for e in events if e["event"] == "stopped"][-1]
    return bool(last.get("early_stop"))


def _epochs(cfg: JobConfig) -> int:
    if cfg.train.epochs:
        return cfg.train.epochs
    size = datasets.get(cfg.data.dataset).num_train or cfg.data.synthetic_train
    per_epoch = max(1, size // cfg.train.batch_size)
    return max(1, math.ceil((cfg.train.iterations or 1) / per_epoch))


def concurrency(meta: dict[str, Any], pending: int, info: dict[str, Any]) -> int:
    """Trials at once: the sweep's max_concurrent, and no more than the cluster holds now.

    A trial that waits for resources fails after ``failure.start_timeout_s`` (900 s by default),
    so trials are not started beyond what fits, except on a remote cluster whose jobs wait
    forever (``failure.start_timeout_s: -1``): there the waiting trials are what asks an
    autoscaler for nodes.
    """
    cfg = _first_cfg(meta)
    limit = meta.get("max_concurrent") or pending
    if info["local"] or cfg.failure.start_timeout_s != -1:
        have = info["resources"]
        need = scaling_plan(cfg)["total_resources"]  # one trial's workers, as Ray Train asks
        fits = min(int(have.get(k, 0) / v + 1e-9) for k, v in need.items())
        limit = min(limit, max(1, fits))
    return max(1, min(limit, pending))


def _trial(config: dict[str, Any], *, sweep_id: str, provenance: tuple[str, str], early_stopping: bool = False) -> None:
    """The Tune function trainable: one normal run, its metrics forwarded to Tune."""
    import time

    trial_start = time.time()  # benchmarks/sweeps.py: trial start -> first training step
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from resnet_cluster.launch.submit import submit

    from resnet_cluster.launch.submit import RunFailed

    t = config["trial"]
    cfg = from_dict(t["job"], source=f"sweep {sweep_id}, trial {t['run_id']}")
    try:
        result = submit(
            cfg,
            run_id=t["run_id"],
            provenance=provenance,
            tags={"sweep_id": sweep_id, "sweep_row": t["label"], "sweep_seed": t["seed"], "trial_start_unix": round(trial_start, 3)},
            callbacks=[TuneReportCallback()],
        )
    except RunFailed as e:
        if early_stopping and PG_REMOVED in str(e):
            # ASHA stopped this trial: Tune removed its placement group, and with it the run's
            # Ray Train controller. That is a stop on purpose, not a failure.
            store = ArtifactStore.from_config(cfg.artifacts)
            RunWriter(store, t["run_id"]).event("stopped", reason=ASHA_REASON, sweep_id=sweep_id, early_stop=True)
        raise
    final = {k: v for k, v in (result.get("final") or {}).items() if isinstance(v, (int, float))}
    tune.report({**final, "finished": 1})


def _forward_events(on_event: Callable[[dict[str, Any]], None]):
    """A Tune callback for the driver: trial start/result/end -> ``on_event`` dicts."""
    from ray import tune

    class Forward(tune.Callback):
        def __init__(self, on_event: Callable[[dict[str, Any]], None] | None) -> None:
            self.on_event = on_event
            self.last: dict[str, dict[str, Any]] = {}

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its callbacks into the experiment state; the display they feed (locks,
            # open streams) stays in this process and is not part of it.
            return {"on_event": None, "last": {}}

        def _emit(self, trial, status: str, result: dict[str, Any] | None = None) -> None:
            if self.on_event is None:
                return
            t = trial.config.get("trial", {})
            ev = {"kind": "trial", "run_id": t.get("run_id"), "row": t.get("label"), "seed": t.get("seed"), "status": status}
            for k in ("epoch", "iteration", "loss", "top1_err"):
                if result and isinstance(result.get(k), (int, float)):
                    ev[k] = result[k] + (1 if k == "epoch" else 0)  # epochs done
            self.on_event(ev)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._emit(trial, "running")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.last[trial.trial_id] = result
            self._emit(trial, "running", result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = self.last.get(trial.trial_id, {})
            self._emit(trial, "finished" if last.get("finished") else "stopped")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._emit(trial, "failed")

    return Forward(on_event)


def run(
    meta: dict[str, Any],
    store: ArtifactStore,
    *,
    address: str | None = None,
    scheduler: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every trial of the sweep whose run has not finished; return the sweep's state."""
    emit = on_event or (lambda ev: None)
    pending, done_before = _announce(store, meta, emit)
    if not pending:
        return _outcome(store, meta, ran=0, skipped=done_before)
    views, sweep_id = store.sweeps(), meta["sweep_id"]
    provenance = (views.read_text(sweep_id, layout.GIT_COMMIT), views.read_text(sweep_id, layout.GIT_PATCH))
    info = cluster.connect(address)
    n = concurrency(meta, len(pending), info)
    emit({"kind": "cluster", "sweep_id": sweep_id, "concurrent": n, "pending": len(pending), **info})
    tuner = _tuner(meta, store, pending, n, scheduler, on_event, provenance)
    interrupted, errors, cut_short = _fit(tuner)
    _record_unfinished(store, sweep_id, pending, asha=scheduler == "asha",
                       interrupted=interrupted, cut_short=cut_short)  # fmt: skip
    return _outcome(store, meta, ran=len(pending), skipped=done_before, errors=errors, interrupted=interrupted)


def _announce(store: ArtifactStore, meta: dict[str, Any], emit: Callable[[dict[str, Any]], None]):
    """Emit every trial's state; return (the trials to run, how many are done already)."""
    states = trial_states(store, meta)
    done = {rid: _done(store, rec) for rid, rec in states.items()}
    pending = [t for t in meta["trials"] if not done[t["run_id"]]]
    for t in meta["trials"]:
        rec = states[t["run_id"]]
        emit({"kind": "trial", "run_id": t["run_id"], "row": t["label"], "seed": t["seed"],
              "status": rec.status if done[t["run_id"]] else "pending",
              **({"top1_err": rec.final_top1_err} if rec and rec.final_top1_err is not None else {})})
    return pending, len(meta["trials"]) - len(pending)


def _scheduler(meta: dict[str, Any], scheduler: str | None):
    """Tune's trial scheduler for ``--scheduler`` (None: run every trial to the end)."""
    if scheduler in (None, "none", "fifo"):
        return None
    if scheduler != "asha":
        raise ConfigError(f"--scheduler {scheduler!r}: use asha (early stopping) or leave it out (full runs).")
    from ray.tune.schedulers import ASHAScheduler

    max_t = _epochs(_first_cfg(meta))
    return ASHAScheduler(
        time_attr="training_iteration",
        metric="top1_err",
        mode="min",
        max_t=max_t,
        grace_period=max(1, max_t // 10),
        reduction_factor=3,
        # Never stop a trial at its last epoch: that report comes while the run is writing
        # its model and manifest. Rungs lie below max_t, at earlier epochs.
        stop_last_trials=False,
    )


def _tuner(meta: dict[str, Any], store: ArtifactStore, pending: list[dict[str, Any]], n: int,
           scheduler: str | None, on_event: Callable[[dict[str, Any]], None] | None,
           provenance: tuple[str, str]):
    """A Tuner with one trial per pending run, ``n`` at once."""
    from ray import tune

    sweep_id = meta["sweep_id"]
    tune_config: dict[str, Any] = {"max_concurrent_trials": n}
    chosen = _scheduler(meta, scheduler)
    if chosen is not None:
        tune_config["scheduler"] = chosen
    trainable = tune.with_resources(
        tune.with_parameters(_trial, sweep_id=sweep_id, provenance=provenance, early_stopping=scheduler == "asha"),
        TRIAL_DRIVER_RESOURCES,
    )
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(pending)},
        tune_config=tune.TuneConfig(**tune_config),
        run_config=tune.RunConfig(
            name=f"tune-{sweep_id}",
            storage_path=store.sweeps().uri(sweep_id, "tune") if store.is_local else None,
            verbose=0,
            callbacks=[_forward_events(on_event)] if on_event else None,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


# Ctrl-C raises KeyboardInterrupt in _fit instead of Tune's own handler saving experiment state:
# a sweep resumes from its runs in the store, not from Tune's experiment folder. The live table
# is ours; Tune's own console reporter (new engine) prints its header anyway. Both are set for
# tuner.fit() only, then restored.
TUNE_ENV = {"TUNE_DISABLE_SIGINT_HANDLER": "1", "RAY_AIR_NEW_OUTPUT": "0"}


def _fit(tuner) -> tuple[bool, dict[str, str], set[str]]:
    """Run the trials: (interrupted by Ctrl-C, {run_id: error}, run ids the scheduler cut short)."""
    interrupted = False
    errors: dict[str, str] = {}
    cut_short: set[str] = set()
    with scoped_env(TUNE_ENV):
        try:
            for result in tuner.fit():
                rid = (result.config or {}).get("trial", {}).get("run_id")
                if result.error is not None:
                    text = str(result.error).strip()
                    errors[rid] = text.splitlines()[-1][:500] if text else type(result.error).__name__
                elif not (result.metrics or {}).get("finished"):
                    cut_short.add(rid)  # ended by the scheduler before its run finished
        except KeyboardInterrupt:
            interrupted = True
    return interrupted, errors, cut_short


def _record_unfinished(store: ArtifactStore, sweep_id: str, pending: list[dict[str, Any]], *, asha: bool,
                       interrupted: bool, cut_short: set[str]) -> None:
    """Record a stop for each run Tune ended while it was going, so it does not look alive forever."""
    for t in pending:
        rid = t["run_id"]
        # ASHA stops a trial by removing its placement group, which takes the run's Ray Train
        # controller with it; the trial then records the stop itself (see _trial). Give it a
        # moment, so that two writers do not append to the run's events at once.
        asha_stop = asha and not interrupted and rid in cut_short
        rec = _settled(store, rid, wait_s=5 if asha_stop else 0)
        if rec is None or not (rec.status == "running" or (asha_stop and rec.status == "failed")):
            continue
        if interrupted:
            reason = "sweep interrupted (Ctrl-C); `resnet-cluster sweep resume` continues it"
        elif asha_stop:
            reason = ASHA_REASON
        else:
            reason = "its sweep trial ended before the run finished"
        RunWriter(store, rid).event("stopped", reason=reason, sweep_id=sweep_id, early_stop=asha_stop)


def _outcome(store: ArtifactStore, meta: dict[str, Any], **fields: Any) -> dict[str, Any]:
    states = trial_states(store, meta)
    count = lambda status: sum(1 for r in states.values() if r is not None and r.status == status)  # noqa: E731
    return {
        "sweep_id": meta["sweep_id"],
        "finished": count("finished"),
        "failed": count("failed"),
        "stopped": count("stopped"),
        "not_started": sum(1 for r in states.values() if r is None),
        "errors": {},
        "interrupted": False,
        **fields,
    }


def start(sweep: Sweep, *, source_dir: str = ".") -> tuple[ArtifactStore, dict[str, Any]]:
    """Check the store and record the sweep in it (nothing runs yet)."""
    endpoint = sweep.trials[0].job.get("artifacts", {}).get("endpoint_url")
    store = ArtifactStore(sweep.store, endpoint_url=endpoint)
    store.check()
    check_datasets([t.job for t in sweep.trials], f"sweep {sweep.name}")
    meta = save(store, sweep, git_provenance(os.path.abspath(source_dir)))
    return store, meta
