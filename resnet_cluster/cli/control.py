"""``resnet-cluster status`` and ``stop``: runs in the store and jobs on a cluster."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import typer
from rich.table import Table

from resnet_cluster.cli.common import STORE_HELP, console, fmt_err, print_json, resolve_store
from resnet_cluster.errors import ClusterError, StoreError

ADDRESS_HELP = "Ray Jobs API address, http://HEAD:8265 (default: $RAY_ADDRESS)."


def _jobs_address(address: Optional[str]) -> Optional[str]:
    from resnet_cluster.launch import remote
    from resnet_cluster.launch.cluster import resolve_address

    a = resolve_address(address)
    return a if remote.is_jobs_address(a) else None


def _run_record(store, target: str):
    from resnet_cluster.artifacts.registry import show_run

    try:
        return show_run(store, target, last_events=1)["record"]
    except StoreError:
        return None


def _sweep_state(store, target: str) -> Optional[dict]:
    """A sweep's progress from the store (trials per status), or None if ``target`` is no sweep."""
    from resnet_cluster.sweep import runner

    if not store.sweeps().exists(target, runner.SWEEP_JSON):
        return None
    meta = runner.load(store, target)
    states = runner.trial_states(store, meta)
    counts: dict[str, int] = {}
    for t in meta["trials"]:
        rec = states[t["run_id"]]
        status = rec.status if rec is not None else "not started"
        counts[status] = counts.get(status, 0) + 1
    return {
        "sweep_id": target,
        "name": meta.get("name"),
        "trials": len(meta["trials"]),
        "statuses": counts,
        "running": counts.get("running", 0),
        "finished": counts.get("finished", 0),
    }


def status(
    target: Optional[str] = typer.Argument(None, help="A run id, a sweep id or a Ray job id; none: every running run."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    store: Optional[str] = typer.Option(None, help=STORE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Status of a run (from the artifact store) and of its Ray job (from the cluster)."""
    from resnet_cluster.artifacts.registry import list_runs
    from resnet_cluster.artifacts.store import ArtifactStore
    from resnet_cluster.launch import remote

    st = ArtifactStore(resolve_store(store))
    addr = _jobs_address(address)
    if target is None:
        # lost: recorded as running, but no heartbeat for minutes (artifacts.heartbeat)
        rows = [dataclasses.asdict(r) for r in list_runs(st) if r.status in ("running", "lost")]
        if json_out:
            print_json(rows)
        elif not rows:
            console.print(f"No running runs in {st.root}.")
        else:
            for r in rows:
                hint = f" (resume: submit <job> --name {r['run_id']})" if r["status"] == "lost" else ""
                console.print(f"{r['run_id']}: {r['status']}, {r['epochs'] or 0} epochs, "
                              f"best {fmt_err(r['best_top1_err'])}{hint}")
        return
    doc: dict = {"target": target}
    rec = _run_record(st, target)
    if rec is not None:
        doc["run"] = rec
        if addr:
            try:
                doc["job"] = remote.job_status(addr, remote.find_job(addr, run_id=target))
            except ClusterError as e:
                doc["job_error"] = str(e)
    elif (sweep := _sweep_state(st, target)) is not None:
        doc["sweep"] = sweep
        if addr:
            try:
                doc["job"] = remote.job_status(addr, remote.find_job(addr, sweep_id=target))
            except ClusterError as e:
                doc["job_error"] = str(e)
    elif addr:
        doc["job"] = remote.job_status(addr, target)
    else:
        raise StoreError(
            f"no run or sweep {target!r} in {st.root}. For a Ray job id pass the cluster with --address "
            "http://HEAD:8265; `resnet-cluster runs list` and `sweep list` list them."
        )
    if json_out:
        print_json(doc)
        return
    t = Table(title=f"Status of {target}", show_header=False)
    if "sweep" in doc:
        sw = doc["sweep"]
        t.add_row("sweep", f"{sw['name']}: {sw['finished']}/{sw['trials']} runs finished")
        t.add_row("trials", ", ".join(f"{n} {k}" for k, n in sorted(sw["statuses"].items())))
    if "run" in doc:
        r = doc["run"]
        t.add_row("run status", r["status"])
        t.add_row("epochs", str(r["epochs"]))
        t.add_row("best test error", fmt_err(r["best_top1_err"]))
        t.add_row("location", r["uri"])
    if "job" in doc:
        j = doc["job"]
        t.add_row("Ray job", f"{j['job_id']}: {j['status']}")
        if j.get("message"):
            t.add_row("message", str(j["message"]))
    if "job_error" in doc:
        t.add_row("Ray job", doc["job_error"])
    console.print(t)


def stop(
    target: str = typer.Argument(..., help="A run id, a sweep id or a Ray job id."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    store: Optional[str] = typer.Option(None, help=STORE_HELP),
    wait: float = typer.Option(150.0, help="Seconds to wait for the run to record itself as stopped."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Stop a remotely submitted run or sweep: Ctrl-C to its driver, which records the run (or
    the sweep's running trials) as `stopped`."""
    from resnet_cluster.artifacts.store import ArtifactStore
    from resnet_cluster.launch import remote

    addr = _jobs_address(address)
    if not addr:
        raise ClusterError(
            "stop needs the cluster's Jobs API address: --address http://HEAD:8265 or RAY_ADDRESS. "
            "A run started in your terminal stops with Ctrl-C."
        )
    st = ArtifactStore(resolve_store(store))
    rec = _run_record(st, target)
    if rec is not None:
        job_id = remote.find_job(addr, run_id=target)
    elif _sweep_state(st, target) is not None:
        job_id = remote.find_job(addr, sweep_id=target)
    else:
        job_id = target
    remote.stop(addr, job_id)

    def state() -> dict:
        """The job, and its run or sweep as the store shows them; ``ended`` once the job has
        ended and its run (every trial of its sweep) is no longer running."""
        job = remote.job_status(addr, job_id)
        done = job["status"] in ("STOPPED", "SUCCEEDED", "FAILED")
        if job.get("sweep_id"):
            sweep = _sweep_state(st, job["sweep_id"])
            return {"job": job, "sweep": sweep, "ended": done and (sweep is None or sweep["running"] == 0)}
        run = _run_record(st, job.get("run_id") or target) if (job.get("run_id") or rec) else None
        return {"job": job, "run": run, "ended": done and (run is None or run["status"] != "running")}

    deadline = time.time() + wait
    final = state()
    while not final["ended"] and time.time() < deadline:
        time.sleep(2)
        final = state()
    if not final.pop("ended"):
        final["timed_out"] = True
    if json_out:
        print_json(final)
    elif "sweep" in final:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(((final["sweep"] or {}).get("statuses") or {}).items()))
        console.print(f"Ray job {job_id}: {final['job']['status']}; sweep {final['job']['sweep_id']}: {counts or '-'}")
    else:
        run_status = final["run"]["status"] if final.get("run") else "-"
        console.print(f"Ray job {job_id}: {final['job']['status']}; run: {run_status}")
