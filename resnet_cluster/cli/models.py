"""``resnet-cluster models``: the registered networks."""

from __future__ import annotations

import typer
from rich.table import Table

from resnet_cluster.cli.common import console, print_json

app = typer.Typer(help="The registered networks.", no_args_is_help=True)


@app.command("list")
def list_models(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List every network by name, with its dataset, depth and parameter count."""
    from resnet_cluster import models

    rows = []
    for m in models.available():
        net = models.build(m.name)
        rows.append({**m.__dict__, "parameters": sum(p.numel() for p in net.parameters())})
    if json_out:
        print_json(rows)
        return
    table = Table(title="Registered networks")
    for col in ("name", "dataset", "family", "depth", "parameters"):
        table.add_column(col, justify="right" if col in ("depth", "parameters") else "left")
    for r in rows:
        table.add_row(r["name"], r["dataset"], r["family"], str(r["depth"]), f"{r['parameters'] / 1e6:.2f}M")
    console.print(table)
