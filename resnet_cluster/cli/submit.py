"""``resnet-cluster submit``: run one job on Ray Train and store the run."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import TimeRemainingColumn
from rich.syntax import Syntax
from rich.table import Table

from resnet_cluster.cli.common import console, err_console, fmt_err, fmt_num, print_json, reserve_stdout_for_json
from resnet_cluster.cli.progress import PlainProgress
from resnet_cluster.errors import ConfigError


class LiveDisplay:
    """Epoch, iteration, loss, lr, last test error and images/s, fed by ``on_progress``."""

    def __init__(self) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  test err {task.fields[err]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self.task = self.progress.add_task("starting Ray", total=None, loss="-", lr="-", err="-", ips="-")
        self.total_epochs = 0
        self.lock = threading.Lock()

    def __enter__(self) -> LiveDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, item: dict[str, Any]) -> None:
        with self.lock:
            kind = item.get("kind")
            if kind == "cluster":
                where = item.get("dashboard_url")
                if where and not where.startswith("http"):
                    where = f"http://{where}"
                self.progress.console.print(
                    f"run [bold]{item['run_id']}[/] -> {item['uri']}" + (f"\nRay dashboard: {where}" if where else ""),
                    highlight=False,
                )
                self.progress.update(self.task, description="starting Ray Train workers")
            elif kind == "start":
                self.total_epochs = int(item["total_epochs"])
                self.progress.update(
                    self.task,
                    total=item["total_iterations"],
                    completed=item["start_iteration"],
                    description=f"epoch {int(item['start_epoch']) + 1}/{self.total_epochs}",
                )
                self.progress.reset(self.task, total=item["total_iterations"], completed=item["start_iteration"])
            elif kind == "log":
                self.progress.update(
                    self.task,
                    completed=item["iteration"],
                    description=f"epoch {int(item['epoch']) + 1}/{self.total_epochs}",
                    loss=f"{item['loss']:.4f}",
                    lr=f"{item['lr']:.3g}",
                    ips=f"{item['images_per_sec']:.0f}",
                )
            elif kind == "epoch" and "top1_err" in item:
                self.progress.update(self.task, err=fmt_err(item["top1_err"]))


def _summary_table(result: dict[str, Any]) -> Table:
    t = Table(title=f"Run {result['run_id']}: {result['status']}", show_header=False)
    final, best = result.get("final") or {}, result.get("best") or {}
    t.add_row("final test error (top-1 / top-5)", f"{fmt_err(final.get('top1_err'))} / {fmt_err(final.get('top5_err'))}")
    t.add_row("best test error", f"{fmt_err(best.get('top1_err'))} (epoch {best.get('epoch')})")
    t.add_row("epochs / iterations", f"{final.get('epoch', -1) + 1} / {final.get('iteration')}")
    t.add_row("training images/s (last epoch)", fmt_num(result.get("images_per_sec"), ".1f"))
    t.add_row("wall time", f"{result['seconds']:.0f} s")
    t.add_row("artifacts", result["uri"])
    return t


def workers_override(text: str) -> str:
    """``--workers 8`` -> scaling.workers=8; ``--workers 4-8`` -> scaling.workers={min: 4, max: 8}."""
    lo, sep, hi = text.partition("-")
    if lo.strip().isdigit() and (not sep or hi.strip().isdigit()):
        return f"scaling.workers={{min: {lo.strip()}, max: {hi.strip()}}}" if sep else f"scaling.workers={lo.strip()}"
    raise ConfigError(f"--workers {text!r}: give a number of workers (8) or a range MIN-MAX (4-8).")


def submit(
    job: str = typer.Argument(..., help="The job file, e.g. jobs/smoke.yaml."),
    set_: List[str] = typer.Option(
        [], "--set", help="Override a field: --set optim.lr=0.01 (value parsed as YAML). Repeatable."
    ),
    workers: Optional[str] = typer.Option(
        None, "--workers", help="Shorthand for --set scaling.workers=N; M-N for an elastic range {min: M, max: N}."
    ),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local cluster)."
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="Run id. Re-submitting with the same --name resumes that run from its last checkpoint."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved job and the scaling plan; start nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document instead of the live display."),
    follow: bool = typer.Option(
        False, "--follow", help="With a Jobs API address: stream the job's logs until it ends (Ctrl-C stops following)."
    ),
    local: bool = typer.Option(
        False, "--local", help="Run the driver in this process even if RAY_ADDRESS is a Jobs API URL (used on the cluster)."
    ),
) -> None:
    """Train a job with Ray Train (DDP over scaling.workers) and store the run's artifacts.

    With --address http://HEAD:8265 (or RAY_ADDRESS) the job goes to that cluster through the
    Ray Jobs API and this command returns once it is submitted (or, with --follow, ended)."""
    from resnet_cluster.models import jobs
    from resnet_cluster.launch.submit import RunFailed
    from resnet_cluster.launch.submit import submit as run_submit
    from resnet_cluster.launch.trainer import scaling_plan

    overrides = list(set_) + ([workers_override(workers)] if workers is not None else [])
    cfg = jobs.load(job, overrides)
    if name is not None:
        from resnet_cluster.artifacts.layout import validate_run_id

        validate_run_id(name)
    plan = scaling_plan(cfg)

    if dry_run:
        if json_out:
            print_json({"job": cfg.to_dict(), "scaling_plan": plan, "run_id": name})
            return
        console.print(Panel(Syntax(cfg.to_yaml(), "yaml", theme="ansi_dark"), title=f"resolved job: {job}"))
        t = Table(title="Ray Train scaling plan", show_header=False)
        t.add_row("workers", cfg.scaling.describe_workers())
        t.add_row("global batch", str(plan["global_batch"]))
        t.add_row("per-worker batch", str(plan["per_worker_batch"]))
        for size in plan.get("elastic", {}).get("sizes", []):
            t.add_row(
                f"at {size['workers']} workers",
                f"{size['training_workers']} train, {size['micro_batches_per_worker']} micro-batches of "
                f"{plan['per_worker_batch']} each per step (global batch {plan['global_batch']})",
            )
        t.add_row("resources per worker", ", ".join(f"{k}={v:g}" for k, v in plan["resources_per_worker"].items()))
        t.add_row("total resources", ", ".join(f"{k}={v:g}" for k, v in plan["total_resources"].items()))
        t.add_row("DDP backend", plan["backend"])
        t.add_row("placement", plan["placement_strategy"])
        console.print(t)
        return

    from resnet_cluster.launch import remote
    from resnet_cluster.launch.cluster import resolve_address

    target = resolve_address(address)
    if remote.is_jobs_address(target) and not local:
        _submit_remote(target, job, cfg, name, overrides, json_out, follow)
        return
    if local and remote.is_jobs_address(target):
        target = None  # on the cluster: Ray sets RAY_ADDRESS for the job's driver; else start locally
    address = target
    try:
        if json_out or not sys.stdout.isatty():
            # A log, a pipe, CI: whole lines instead of a live display. With --json stdout keeps
            # the one document and the lines go to stderr (a Ray job's log shows both).
            if json_out:
                reserve_stdout_for_json()
            lines = PlainProgress(sys.stderr if json_out else sys.stdout)
            result = run_submit(cfg, run_id=name, address=address, on_progress=lines, source_dir=os.getcwd())
            lines.summary(result)
            if json_out:
                print_json(result)
            return
        with LiveDisplay() as live:
            result = run_submit(cfg, run_id=name, address=address, on_progress=live, source_dir=os.getcwd())
        console.print(_summary_table(result))
    except RunFailed as e:
        if json_out:
            print_json({"run_id": e.run_id, "status": e.status, "uri": e.uri, "error": str(e)})
        else:
            err_console.print(
                f"[bold red]run {e.run_id} {e.status}[/] (artifacts so far: {escape(e.uri)}):\n{escape(str(e))}",
                highlight=False,
            )
        sys.exit(130 if e.status == "stopped" else 1)


def _submit_remote(address: str, job: str, cfg, name: str | None, overrides: list[str], json_out: bool, follow: bool) -> None:
    from resnet_cluster.launch import remote
    from resnet_cluster.launch.submit import new_run_id

    run_id = name or new_run_id(cfg.name)
    info = remote.submit_remote(
        address, job, run_id=run_id, overrides=overrides, cwd=os.getcwd(), job_name=cfg.name, store=cfg.artifacts.store
    )
    follow_job(address, info, what=f"run {run_id}", follow=follow, json_out=json_out)


def follow_job(address: str, info: dict[str, Any], *, what: str, follow: bool, json_out: bool, hint: str = "") -> None:
    """After a Jobs API submit of ``what`` ("run ID", "sweep ID"): say how to watch and stop it;
    with ``follow``, stream the job's log (Ctrl-C stops following, not the job) and exit 1 if
    the job failed or was stopped; then the ``--json`` document."""
    from resnet_cluster.launch import remote

    ident = what.split()[-1]
    if not json_out:
        console.print(
            f"submitted Ray job [bold]{info['job_id']}[/] for {what.split()[0]} [bold]{ident}[/]\n"
            f"dashboard: {info['dashboard']}\n"
            f"follow:    resnet-cluster status {ident} --address {address}   "
            f"(stop: resnet-cluster stop {ident} --address {address}{hint})",
            highlight=False,
        )
    if follow:
        try:
            # whole lines, never folded: the log's progress lines are meant to be read as lines
            status = remote.follow(address, info["job_id"], lambda line: print(line, file=sys.stderr, flush=True))
        except KeyboardInterrupt:
            err_console.print(f"stopped following; Ray job {info['job_id']} keeps running.")
            status = "RUNNING"
        info["status"] = status
    if json_out:
        print_json(info)
    if follow and info.get("status") in ("FAILED", "STOPPED"):
        sys.exit(1)
