"""``resnet-cluster runs``: the runs in an artifact store."""

from __future__ import annotations

import dataclasses
from typing import Optional

import typer
from rich.table import Table

from resnet_cluster.cli.common import console, fmt_err, print_json, resolve_store

app = typer.Typer(help="List and inspect stored runs.", no_args_is_help=True)

STORE_HELP = "Artifact store: a folder or fsspec URI (default: $RESNET_CLUSTER_STORE or ./runs-store)."
STATUS_STYLE = {"finished": "green", "running": "cyan", "failed": "red", "stopped": "yellow", "incomplete": "yellow"}


@app.command("list")
def list_runs(
    store: Optional[str] = typer.Option(None, help=STORE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List runs, newest first."""
    from resnet_cluster.artifacts.registry import list_runs as _list
    from resnet_cluster.artifacts.store import ArtifactStore

    st = ArtifactStore(resolve_store(store))
    records = _list(st)
    if json_out:
        print_json([dataclasses.asdict(r) for r in records])
        return
    if not records:
        console.print(f"No runs in {st.root}. Start one with `resnet-cluster submit jobs/smoke.yaml`.")
        return
    table = Table(title=f"Runs in {st.root}")
    for col in ("run id", "job", "model", "status", "epochs", "best test err", "started"):
        table.add_column(
            col,
            justify="right" if col in ("epochs", "best test err") else "left",
            no_wrap=col in ("run id", "status", "started"),
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
        )
    console.print(table)


@app.command("show")
def show(
    run: str = typer.Argument(..., help="Run id (see `resnet-cluster runs list`)."),
    store: Optional[str] = typer.Option(None, help=STORE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show a run: its job, last metrics, events and files."""
    from resnet_cluster.artifacts.registry import show_run
    from resnet_cluster.artifacts.store import ArtifactStore

    st = ArtifactStore(resolve_store(store))
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
    console.print(head)
    if summary:
        final, best = summary.get("final", {}), summary.get("best", {})
        mt = Table(title="Metrics")
        for col in ("", "epoch", "iteration", "top-1 err", "top-5 err", "test loss"):
            mt.add_column(col)
        for name, row in (("final", final), ("best", best)):
            mt.add_row(name, str(row.get("epoch")), str(row.get("iteration")), fmt_err(row.get("top1_err")),
                       fmt_err(row.get("top5_err")), f"{row.get('test_loss') or 0:.4f}")
        console.print(mt)
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
