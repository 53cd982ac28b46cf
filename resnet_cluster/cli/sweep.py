"""``resnet-cluster sweep``: run a published table as a Ray Tune sweep, resume it, report it.

``resnet-cluster sweep NAME_OR_FILE`` is short for ``resnet-cluster sweep run NAME_OR_FILE``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, List, Optional

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from resnet_cluster.cli.common import (
    STATUS_STYLE, STORE_HELP, console, err_console, fmt_err, print_json, reserve_stdout_for_json, resolve_store,
)
from resnet_cluster.cli.progress import PlainTrialLog


class _DefaultRun(TyperGroup):
    """``sweep depth`` means ``sweep run depth``: a first word that is not a subcommand is the
    sweep to run."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=_DefaultRun,
    no_args_is_help=True,
    help=(
        "Reproduce a published table with Ray Tune: `resnet-cluster sweep depth` (or "
        "architecture, solvers, bn-momentum, or your own sweep YAML) runs every row × seed as a "
        "normal run tagged with the sweep id; `sweep report SWEEP_ID` prints the table."
    ),
)



class TrialTable:
    """The live table of trials (status, epoch, training loss, test error), fed by events."""

    def __init__(self, sweep_id: str, trials: list[dict[str, Any]]) -> None:
        self.sweep_id = sweep_id
        self.rows: dict[str, dict[str, Any]] = {
            t["run_id"]: {"row": t["label"], "seed": t["seed"], "status": "pending"} for t in trials
        }
        self.note = ""
        self.lock = threading.Lock()
        self.live = Live(self.render(), console=err_console, refresh_per_second=2, vertical_overflow="visible")

    def __enter__(self) -> TrialTable:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.update(self.render())
        self.live.__exit__(*exc)

    def __call__(self, ev: dict[str, Any]) -> None:
        with self.lock:
            if ev.get("kind") == "cluster":
                dash = ev.get("dashboard_url")
                self.note = (
                    f"{ev['pending']} trials to run, {ev['concurrent']} at a time"
                    + (f" · Ray dashboard: {dash if str(dash).startswith('http') else 'http://' + str(dash)}" if dash else "")
                )
            elif ev.get("kind") == "trial" and ev.get("run_id") in self.rows:
                row = self.rows[ev["run_id"]]
                row.update({k: v for k, v in ev.items() if k in ("status", "epoch", "iteration", "loss", "top1_err")})
            self.live.update(self.render())

    def render(self) -> Table:
        counts: dict[str, int] = {}
        for r in self.rows.values():
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        caption = " · ".join(f"{n} {s}" for s, n in sorted(counts.items())) + (f"\n{self.note}" if self.note else "")
        table = Table(title=f"sweep {self.sweep_id}", caption=caption, show_lines=False)
        for col in ("run", "row", "seed", "status", "epoch", "iteration", "train loss", "test err"):
            table.add_column(col, justify="right" if col in ("seed", "epoch", "iteration", "train loss", "test err") else "left")
        for run_id, r in self.rows.items():
            style = STATUS_STYLE.get(r["status"], "")
            table.add_row(
                run_id.rsplit("-", 2)[-2] + "-" + run_id.rsplit("-", 1)[-1],
                escape(r["row"]),
                str(r["seed"]),
                f"[{style}]{r['status']}[/]" if style else r["status"],
                str(r.get("epoch", "-")),
                str(r.get("iteration", "-")),
                f"{r['loss']:.4f}" if isinstance(r.get("loss"), (int, float)) else "-",
                fmt_err(r.get("top1_err")),
            )
        return table


def _report_table(rep: dict[str, Any]) -> Table:
    from resnet_cluster.sweep.report import HEADER, cells, not_comparable_note

    title = rep.get("title") or rep["sweep_id"]
    comparable = rep.get("comparable", True)
    table = Table(title=escape(title), caption=escape(
        f"{rep['metric']} test error, mean ± sample std over seeds; diff = mean − reference"
        + (f"; reference: {rep['source']}" if rep.get("source") else "")
        + ("" if comparable else "\n" + not_comparable_note(rep))
    ))
    for col in HEADER:
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in rep["rows"]:
        c = cells(r, comparable)
        table.add_row(escape(c[0]), *c[1:])
    return table


def _print_report(rep: dict[str, Any], fmt: str) -> None:
    from resnet_cluster.sweep import report

    if fmt == "json":
        print_json(rep)
    elif fmt == "markdown":
        sys.stdout.write(report.markdown(rep))
    elif fmt == "csv":
        sys.stdout.write(report.to_csv(rep))
    else:
        console.print(_report_table(rep))


def _execute(meta: dict[str, Any], store, *, address: Optional[str], scheduler: Optional[str], as_json: bool) -> None:
    from resnet_cluster.launch.cluster import resolve_address
    from resnet_cluster.sweep import report, runner

    if as_json:
        reserve_stdout_for_json()
    header = (
        f"sweep {meta['sweep_id']}: {len(meta['rows'])} rows × {meta['seeds']} seeds = "
        f"{len(meta['trials'])} trials -> {store.root}"
    )
    if as_json or not sys.stdout.isatty():
        # A Ray job's log, a pipe, CI: one line per trial state change and a table every few
        # minutes; with --json on stderr, so that stdout keeps the one document.
        lines = PlainTrialLog(meta["sweep_id"], meta["trials"], sys.stderr if as_json else sys.stdout)
        lines.line(header)
        outcome = runner.run(meta, store, address=resolve_address(address), scheduler=scheduler, on_event=lines)
        lines.table()
    else:
        err_console.print(header, highlight=False)
        with TrialTable(meta["sweep_id"], meta["trials"]) as display:
            outcome = runner.run(meta, store, address=resolve_address(address), scheduler=scheduler, on_event=display)
    rep = report.build(store, meta["sweep_id"])
    png = report.plot(store, rep)
    if as_json:
        print_json({**rep, "outcome": outcome, "curves": png, "trials": meta["trials"]})
    else:
        console.print(_report_table(rep))
        if png:
            console.print(f"curves: {png}", highlight=False)
        for rid, msg in outcome["errors"].items():
            err_console.print(f"[red]trial {rid} failed:[/] {escape(msg)}", highlight=False)
        if outcome["interrupted"] or outcome["not_started"]:
            err_console.print(
                f"sweep {meta['sweep_id']} is not complete ({rep['finished_trials']}/{rep['total_trials']} runs "
                f"finished). Continue it with `resnet-cluster sweep resume {meta['sweep_id']}"
                f"{'' if store.root == resolve_store(None) else ' --store ' + store.root}`.",
                highlight=False,
            )
    if outcome["interrupted"]:
        raise typer.Exit(130)
    if outcome["failed"] or outcome["errors"]:
        raise typer.Exit(1)


ADDRESS_HELP = (
    "Ray cluster: a Jobs API URL (http://HEAD:8265) submits the sweep's driver as a Ray job and "
    "returns; a GCS address (HOST:6379) runs it here. Default: RAY_ADDRESS, else a new local cluster."
)


def _jobs_url(address: Optional[str], local: bool) -> Optional[str]:
    """The Jobs API URL to submit the sweep's driver to, or None to run it in this process.

    ``--local`` (the command line the cluster runs) never submits: there Ray sets RAY_ADDRESS
    to the cluster's own GCS address for the job's driver.
    """
    from resnet_cluster.launch import remote
    from resnet_cluster.launch.cluster import resolve_address

    target = resolve_address(address)
    if local:
        return None
    return target if remote.is_jobs_address(target) else None


def _driver_address(address: Optional[str]) -> Optional[str]:
    """The address for a driver in this process (a Jobs URL here means: we are the job)."""
    from resnet_cluster.launch import remote
    from resnet_cluster.launch.cluster import resolve_address

    target = resolve_address(address)
    return None if remote.is_jobs_address(target) else target


def _submit_sweep_job(url: str, args: list[str], *, sweep_id: str, name: str, store: str, follow: bool, as_json: bool) -> None:
    """Run ``resnet-cluster ARGS`` (the sweep's driver) as a Ray job; print how to watch it."""
    from resnet_cluster.cli.submit import follow_job
    from resnet_cluster.launch import remote

    info = remote.submit_command(
        url,
        args,
        submission_id=f"resnet-cluster-sweep-{sweep_id}",
        metadata={"kind": "sweep", "sweep_id": sweep_id, "sweep_name": name, "store": store},
    )
    info = {"sweep_id": sweep_id, **info}
    hint = f"; table: resnet-cluster sweep report {sweep_id} --store {store}"
    follow_job(url, info, what=f"sweep {sweep_id}", follow=follow, json_out=as_json, hint=hint)


@app.command("run")
def run_command(
    sweep: str = typer.Argument(..., metavar="NAME_OR_FILE", help="A shipped sweep (depth, architecture, solvers, bn-momentum) or a sweep YAML."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Runs per row (overrides the file's `seeds`)."),
    overrides: List[str] = typer.Option([], "--set", help="KEY.PATH=VALUE applied to every trial's job, e.g. --set train.iterations=20."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="asha: stop hopeless trials early (off by default: the tables need full runs)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the trials (row, overrides, seed) and run nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (sweep id, trials, results)."),
    follow: bool = typer.Option(False, "--follow", help="With a Jobs API address: stream the sweep's log until it ends (Ctrl-C stops following)."),
    local: bool = typer.Option(False, "--local", hidden=True, help="Run the driver in this process (the command the cluster runs)."),
    sweep_id: Optional[str] = typer.Option(None, "--sweep-id", hidden=True, help="The sweep id to use (set by a remote submit)."),
) -> None:
    """Run a sweep: every row of the table × every seed, as Ray Tune trials.

    With --address http://HEAD:8265 (or RAY_ADDRESS) the sweep's driver runs on the cluster as a
    Ray job and this command returns once it is submitted (or, with --follow, ended)."""
    from resnet_cluster.sweep import runner
    from resnet_cluster.sweep.spec import find_sweep_file, load_sweep, shipped_sweeps

    if scheduler not in (None, "asha"):
        raise typer.BadParameter(f"{scheduler!r}: the only scheduler is asha", param_hint="--scheduler")
    if sweep_id is not None:
        from resnet_cluster.artifacts.layout import validate_run_id

        validate_run_id(sweep_id)
    sw = load_sweep(sweep, overrides=overrides, seeds=seeds, sweep_id=sweep_id)
    if dry_run:
        doc = sw.as_dict()
        if as_json:
            print_json({**doc, "dry_run": True})
            return
        table = Table(title=f"sweep {sw.name} (dry run): {len(sw.rows)} rows × {sw.seeds} seeds = {len(sw.trials)} trials")
        for col in ("#", "row", "seed", "overrides", "reference"):
            table.add_column(col, justify="right" if col in ("#", "seed", "reference") else "left")
        rows = {r.index: r for r in sw.rows}
        for t in sw.trials:
            r = rows[t.row]
            o = ", ".join(f"{k}={v}" for k, v in r.overrides.items())
            table.add_row(str(t.row + 1), escape(t.label), str(t.seed), escape(o), fmt_err(r.reference))
        console.print(table)
        if sw.overrides:
            console.print(f"--set on every trial: {', '.join(sw.overrides)}", highlight=False)
        console.print(
            f"run ids: {sw.sweep_id}-<#>-s<k>; store: {sw.store}; per training worker: {sw.trial_resources}. "
            "Nothing was run.",
            highlight=False,
        )
        return
    url = _jobs_url(address, local)
    if url:
        from resnet_cluster.launch import remote

        name = sweep if sweep in shipped_sweeps() else remote.project_relative(find_sweep_file(sweep), remote.project_root(), "sweep file")
        args = ["sweep", "run", name, "--local", "--json", "--sweep-id", sw.sweep_id]
        args += [a for o in overrides for a in ("--set", o)]
        args += (["--seeds", str(seeds)] if seeds is not None else []) + (["--scheduler", scheduler] if scheduler else [])
        _submit_sweep_job(url, args, sweep_id=sw.sweep_id, name=sw.name, store=str(sw.store), follow=follow, as_json=as_json)
        return
    store, meta = runner.start(sw)
    _execute(meta, store, address=_driver_address(address), scheduler=scheduler, as_json=as_json)


@app.command("resume")
def resume_command(
    sweep_id: str = typer.Argument(..., help="The sweep to continue (see `resnet-cluster sweep list`)."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="asha: stop hopeless trials early."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    follow: bool = typer.Option(False, "--follow", help="With a Jobs API address: stream the sweep's log until it ends."),
    local: bool = typer.Option(False, "--local", hidden=True, help="Run the driver in this process (the command the cluster runs)."),
) -> None:
    """Continue an interrupted sweep: finished runs are kept, the others run (or resume from
    their last checkpoint). With --address http://HEAD:8265 the driver runs on the cluster."""
    from resnet_cluster.artifacts.store import ArtifactStore
    from resnet_cluster.sweep import runner

    st = ArtifactStore(resolve_store(store))
    url = _jobs_url(address, local)
    if url:
        meta = runner.load(st, sweep_id)  # the sweep must exist in the store the cluster writes to
        args = ["sweep", "resume", sweep_id, "--local", "--json"] + (["--store", store] if store else [])
        args += ["--scheduler", scheduler] if scheduler else []
        _submit_sweep_job(url, args, sweep_id=sweep_id, name=meta.get("name") or "", store=st.root, follow=follow, as_json=as_json)
        return
    meta = runner.load(st, sweep_id)
    runner.check_datasets([t["job"] for t in meta["trials"]], f"sweep {sweep_id}")
    _execute(meta, st, address=_driver_address(address), scheduler=scheduler, as_json=as_json)


@app.command("report")
def report_command(
    sweep_id: str = typer.Argument(..., help="The sweep (see `resnet-cluster sweep list`)."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    fmt: str = typer.Option("table", "--format", "-f", help="table, markdown (paste into a README), csv or json."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Save training-loss and test-error curves as curves.png in the sweep folder."),
) -> None:
    """The sweep's table: mean ± std over seeds, best, the published figure and the difference."""
    from resnet_cluster.artifacts.store import ArtifactStore
    from resnet_cluster.sweep import report

    if fmt not in report.FORMATS:
        raise typer.BadParameter(f"{fmt!r}: choose one of {', '.join(report.FORMATS)}", param_hint="--format")
    st = ArtifactStore(resolve_store(store))
    rep = report.build(st, sweep_id)
    png = report.plot(st, rep) if plot else None
    if fmt == "json":
        rep = {**rep, "curves": png}
    _print_report(rep, fmt)
    if png and fmt == "table":
        console.print(f"curves: {png}", highlight=False)


@app.command("list")
def list_command(
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """The sweeps in the store, with how many of their runs finished."""
    from resnet_cluster.artifacts.store import ArtifactStore
    from resnet_cluster.sweep import report, runner

    st = ArtifactStore(resolve_store(store))
    docs = []
    for sid in reversed(runner.list_sweep_ids(st)):
        try:
            rep = report.build(st, sid)
        except Exception as e:  # a damaged sweep folder must not hide the others
            docs.append({"sweep_id": sid, "error": str(e)})
            continue
        docs.append({k: rep[k] for k in ("sweep_id", "name", "title", "created", "finished_trials", "total_trials", "complete")})
    if as_json:
        print_json({"store": st.root, "sweeps": docs})
        return
    if not docs:
        console.print(f"no sweeps in {st.root}", highlight=False)
        return
    table = Table(title=f"sweeps in {st.root}")
    for col in ("sweep id", "name", "created", "runs finished"):
        table.add_column(col)
    for d in docs:
        table.add_row(d["sweep_id"], d.get("name") or "?", str(d.get("created") or "?")[:19], f"{d.get('finished_trials', '?')}/{d.get('total_trials', '?')}" if "error" not in d else escape(d["error"]))
    console.print(table)
