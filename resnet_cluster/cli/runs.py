"""``resnet-cluster runs``: the runs in an artifact store."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import typer
from rich.table import Table

from resnet_cluster.cli.common import STATUS_STYLE, STORE_HELP, console, fmt_err, print_json, resolve_store

app = typer.Typer(
    help="List, inspect, compare, download and delete stored runs; restore a run's source.",
    no_args_is_help=True,
)



ENDPOINT_HELP = "S3-compatible endpoint URL (default: $RESNET_CLUSTER_STORE_ENDPOINT, else AWS_ENDPOINT_URL)."


def _store(store: Optional[str], endpoint_url: Optional[str] = None):
    from resnet_cluster.artifacts.store import ArtifactStore

    return ArtifactStore(resolve_store(store), endpoint_url=endpoint_url)


@app.command("list")
def list_runs(
    store: Optional[str] = typer.Option(None, help=STORE_HELP),
    endpoint_url: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="Only the runs of this sweep id."),
    status: Optional[list[str]] = typer.Option(
        None, "--status", help="Only runs with this status (finished, failed, stopped, running, lost, incomplete); repeatable."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List runs, newest first."""
    from resnet_cluster.artifacts.registry import list_runs as _list

    st = _store(store, endpoint_url)
    wanted = [x for v in (status or []) for x in v.split(",") if x]
    records = _list(st, sweep=sweep, status=wanted or None)
    if json_out:
        print_json([dataclasses.asdict(r) for r in records])
        return
    if not records:
        which = " matching the filters" if sweep or wanted else ""
        console.print(f"No runs{which} in {st.root}. Start one with `resnet-cluster submit jobs/smoke.yaml`.")
        return
    table = Table(title=f"Runs in {st.root}")
    sweeps = any(r.sweep_id for r in records)
    cols = ("run id", "job", "model", "status", "epochs", "best test err", "started") + (("sweep",) if sweeps else ())
    for col in cols:
        table.add_column(
            col,
            justify="right" if col in ("epochs", "best test err") else "left",
            no_wrap=col in ("status", "epochs"),
            overflow="fold",
        )
    for r in records:
        style = STATUS_STYLE.get(r.status, "")
        table.add_row(
            r.run_id,
            r.job or "-",
            r.model or "-",
            f"[{style}]{r.status}[/]" if style else r.status,
            "-" if r.epochs is None else str(r.epochs),
            fmt_err(r.best_top1_err),
            (r.started or "-").replace("T", " ")[:19],
            *((r.sweep_id or "-",) if sweeps else ()),
        )
    console.print(table)


@app.command("show")
def show(
    run: str = typer.Argument(..., help="Run id (see `resnet-cluster runs list`)."),
    store: Optional[str] = typer.Option(None, help=STORE_HELP),
    endpoint_url: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show a run: its job, final and best metrics, a text plot of the test error, its files."""
    from resnet_cluster.artifacts.registry import show_run, text_plot

    st = _store(store, endpoint_url)
    info = show_run(st, run)
    if json_out:
        print_json(info)
        return
    rec, cfg, summary = info["record"], info["config"] or {}, info["summary"] or {}
    head = Table(title=f"Run {run}", show_header=False)
    head.add_row("status", rec["status"])
    head.add_row("location", rec["uri"])
    head.add_row("job", str(rec["job"]))
    if cfg:
        m, t, o, s = cfg.get("model", {}), cfg.get("train", {}), cfg.get("optim", {}), cfg.get("scaling", {})
        head.add_row("model", f"{m.get('arch')} (shortcut {m.get('shortcut')}, block {m.get('block')})")
        head.add_row("data", f"{cfg.get('data', {}).get('dataset')} at {cfg.get('data', {}).get('root')}")
        length = f"{t.get('iterations')} iterations" if t.get("iterations") else f"{t.get('epochs')} epochs"
        head.add_row("training", f"batch {t.get('batch_size')}, {length}")
        head.add_row("solver", f"{o.get('solver')} lr {o.get('lr')} momentum {o.get('momentum')} wd {o.get('weight_decay')}")
        head.add_row("scaling", f"{s.get('workers')} workers, gpu={s.get('use_gpu')}")
    head.add_row("started", str(rec["started"]))
    head.add_row("finished", str(rec["finished"]))
    beat = info.get("heartbeat")
    if beat:
        head.add_row("last heartbeat", f"{beat.get('time')} ({beat.get('who')}"
                     + (f", iteration {beat['iteration']}" if beat.get("iteration") is not None else "") + ")")
    if rec["status"] == "lost":
        head.add_row("resume", f"resnet-cluster submit <job> --name {run}   (no heartbeat: nobody drives this run)")
    console.print(head)
    if info.get("resizes"):
        rt = Table(title="Resizes (elastic)")
        for col in ("time", "iteration", "workers", "training", "micro-batches per step"):
            rt.add_column(col)
        for e in info["resizes"]:
            rt.add_row(str(e.get("time")), str(e.get("iteration")), f"{e.get('from_world_size')} -> {e.get('to_world_size')}",
                       str(e.get("training_workers")), str(e.get("micro_batches_per_step")))
        console.print(rt)
    if info.get("preemptions"):
        pt = Table(title="Preemption notices (a checkpoint was taken at each)")
        for col in ("time", "epoch", "iteration", "nodes", "ranks", "deadline"):
            pt.add_column(col)
        for e in info["preemptions"]:
            nodes = ", ".join(n[:12] for n in e.get("nodes") or [])
            pt.add_row(str(e.get("time")), str(e.get("epoch")), str(e.get("iteration")), nodes,
                       ", ".join(map(str, e.get("ranks") or [])), str(e.get("deadline") or "none given"))
        console.print(pt)
    if info.get("worker_failures"):
        ft = Table(title="Worker group failures")
        for col in ("time", "rank", "error"):
            ft.add_column(col)
        for e in info["worker_failures"]:
            for rank, text in (e.get("errors") or {}).items():
                ft.add_row(str(e.get("time")), rank, text)
        console.print(ft)
    if summary:
        final, best = summary.get("final", {}), summary.get("best", {})
        mt = Table(title="Metrics")
        for col in ("", "epoch", "iteration", "top-1 err", "top-5 err", "test loss"):
            mt.add_column(col)
        for name, row in (("final", final), ("best", best)):
            mt.add_row(name, str(row.get("epoch")), str(row.get("iteration")), fmt_err(row.get("top1_err")),
                       fmt_err(row.get("top5_err")), f"{row.get('test_loss') or 0:.4f}")
        console.print(mt)
    curve = info.get("test_error") or []
    plot = text_plot([r["top1_err"] for r in curve])
    if plot:
        first, last = curve[0], curve[-1]
        unit = "iteration" if last.get("iteration") is not None else "epoch"
        console.print(f"[bold]test top-1 error (%)[/], {len(curve)} evaluations, {unit} "
                      f"{first.get(unit)} … {last.get(unit)}", highlight=False)
        console.print("\n".join(plot), highlight=False, markup=False)
    ft = Table(title="Files")
    ft.add_column("path")
    ft.add_column("bytes", justify="right")
    for path, size in info["files"]:
        if not path.startswith("checkpoints/"):
            ft.add_row(path, f"{size:,}")
    ckpts = [p for p, _ in info["files"] if p.startswith("checkpoints/")]
    if ckpts:
        ft.add_row(f"checkpoints/ ({len(ckpts)} files)", f"{sum(s for p, s in info['files'] if p in ckpts):,}")
    console.print(ft)
    if info["manifest_problems"] and rec["status"] == "finished":
        console.print("[red]manifest problems:[/] " + "; ".join(info["manifest_problems"]))


class _RichCallback:
    """fsspec Callback -> one rich progress task (only for files of at least 8 MiB)."""

    def __new__(cls, progress, name: str, size: int):
        from fsspec.callbacks import Callback

        class _CB(Callback):
            def __init__(self):
                super().__init__()
                self.task = progress.add_task(name, total=size or None)

            def call(self, *args, **kwargs):
                progress.update(self.task, completed=self.value, total=self.size or None)

        return _CB()


@app.command("download")
def download(
    run: str = typer.Argument(..., help="Run id (see `resnet-cluster runs list`)."),
    dest: Optional[str] = typer.Argument(None, help="Local folder for the run's files (default: ./RUN)."),
    only: Optional[str] = typer.Option(
        None, "--only", help="Comma-separated groups: model, csv, patch (= source), config, environment, "
        "events, summary, checkpoints. manifest.json always comes along.",
    ),
    store: Optional[str] = typer.Option(None, help=STORE_HELP),
    endpoint_url: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Download a finished run, checking every file's sha256 against its manifest."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from resnet_cluster.artifacts.layout import validate_run_id
    from resnet_cluster.artifacts.transfer import download_run

    validate_run_id(run)  # refuses ../ and absolute paths before anything is touched
    st = _store(store, endpoint_url)
    groups = [g.strip() for g in only.split(",") if g.strip()] if only else None
    target = dest or run
    if json_out:
        done = download_run(st, run, target, only=groups)
        print_json({"run_id": run, "dest": os.path.abspath(target), "files": done})
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console, transient=True) as progress:  # fmt: skip
        big = 8 * 2**20  # bytes: smaller files finish before a bar would show anything
        done = download_run(
            st, run, target, only=groups,
            callback_for=lambda rel, size: _RichCallback(progress, rel, size) if size >= big else None,
        )  # fmt: skip
    table = Table(title=f"Run {run} -> {os.path.abspath(target)} (sha256 verified)")
    table.add_column("path")
    table.add_column("bytes", justify="right")
    table.add_column("sha256")
    for f in done:
        table.add_row(f["path"], f"{f['size']:,}", f["sha256"][:16] + "…")
    console.print(table)


@app.command("compare")
def compare(
    runs: list[str] = typer.Argument(..., help="Two or more run ids."),
    plot: Optional[str] = typer.Option(
        None, "--plot", help="Write both test-error curves to this PNG (e.g. --plot compare.png)."
    ),
    store: Optional[str] = typer.Option(None, help=STORE_HELP),
    endpoint_url: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Compare runs: config differences, and final and best metrics side by side."""
    from resnet_cluster.artifacts.registry import compare_runs, plot_curves

    st = _store(store, endpoint_url)
    doc = compare_runs(st, runs)
    if plot:
        doc["plot"] = plot_curves(doc["curves"], plot, title=" vs ".join(runs))
    if json_out:
        print_json(doc)
        return
    diff = Table(title="Config differences" if doc["config_diff"] else "Config: identical")
    diff.add_column("key")
    for rid in runs:
        diff.add_column(rid, overflow="fold")
    for key, values in doc["config_diff"].items():
        diff.add_row(key, *[str(v) for v in values])
    console.print(diff)
    mt = Table(title="Metrics (test error, %)")
    mt.add_column("")
    for rid in runs:
        mt.add_column(rid, justify="right", overflow="fold")
    m = doc["metrics"]
    mt.add_row("status", *[m[r]["status"] for r in runs])
    for section in ("final", "best"):
        mt.add_row(f"{section} top-1", *[fmt_err(m[r][section].get("top1_err")) for r in runs])
        mt.add_row(f"{section} top-5", *[fmt_err(m[r][section].get("top5_err")) for r in runs])
        mt.add_row(f"{section} at epoch", *[str(m[r][section].get("epoch", "-")) for r in runs])
    console.print(mt)
    if plot:
        console.print(f"plot: {os.path.abspath(plot)}")


@app.command("restore-source")
def restore_source(
    run: str = typer.Argument(..., help="Run id."),
    dest: str = typer.Argument(..., help="New folder for the restored checkout."),
    repo: str = typer.Option(".", help="A git checkout that has the run's commit (else its recorded remote)."),
    store: Optional[str] = typer.Option(None, help=STORE_HELP),
    endpoint_url: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check out the run's recorded commit in a new clone and apply its recorded patch."""
    from resnet_cluster.artifacts.transfer import restore_source as _restore

    st = _store(store, endpoint_url)
    out = _restore(st, run, dest, repo=repo)
    if json_out:
        print_json(out)
        return
    what = "with source.git-patch applied" if out["patched"] else "(the tree was clean)"
    console.print(f"Restored the source of {run} at {out['dest']}: commit {out['commit']} {what}.")
    console.print(
        f"Its job: `resnet-cluster runs download {run} --only config` gives config.yaml, which "
        f"`resnet-cluster submit config.yaml` runs again from that folder.", highlight=False
    )


@app.command("delete")
def delete(
    run: str = typer.Argument(..., help="Run id."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
    store: Optional[str] = typer.Option(None, help=STORE_HELP),
    endpoint_url: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
) -> None:
    """Delete one run (every file under its folder, nothing else). Asks first."""
    from resnet_cluster.artifacts.registry import require_run

    st = _store(store, endpoint_url)
    require_run(st, run)
    files = st.list_files(run)
    size = sum(s for _, s in files)
    if not yes:
        ok = typer.confirm(f"Delete run {run} ({len(files)} files, {size:,} bytes) at {st.run_uri(run)}?")
        if not ok:
            console.print("Nothing deleted.")
            raise typer.Exit(1)
    n = st.delete_run(run)
    console.print(f"Deleted run {run}: {n} files.")
