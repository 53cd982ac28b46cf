"""``resnet-cluster data``: prepare datasets where jobs read them."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from resnet_cluster.cli.common import console, print_json

app = typer.Typer(help="Prepare datasets.", no_args_is_help=True)
prepare_app = typer.Typer(help="Download and convert a dataset.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")


@prepare_app.command("cifar10")
def prepare_cifar10(
    source: Optional[str] = typer.Option(
        None, help="cifar-10-python.tar.gz as a local path or URL; default: download the official archive."
    ),
    dest: str = typer.Option("./data/cifar10", help="Where jobs read it (data.root): a folder or fsspec URI."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Convert the official CIFAR-10 python archive into Parquet files plus the per-pixel mean."""
    from resnet_cluster.data.cifar import prepare_cifar10 as prepare

    if json_out:
        summary = prepare(source, dest)
        print_json(summary)
        return
    with console.status("preparing CIFAR-10") as status:
        summary = prepare(source, dest, progress=lambda msg: status.update(msg))
    table = Table(title=f"CIFAR-10 prepared at {summary['dest']}", show_header=False)
    table.add_row("training images", str(summary["num_train"]))
    table.add_row("test images", str(summary["num_test"]))
    table.add_row("classes", ", ".join(summary["classes"]))
    table.add_row("bytes", f"{summary.get('total_bytes', 0):,}")
    console.print(table)
    console.print(f"Jobs read it with [bold]data.root: {summary['dest']}[/]")
