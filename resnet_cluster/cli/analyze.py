"""``resnet-cluster analyze``: analyses of finished runs."""

from __future__ import annotations

import os
from typing import Optional

import typer
from rich.table import Table

from resnet_cluster.cli.common import STORE_HELP, console, print_json, resolve_store

app = typer.Typer(help="Analyse trained runs (layer responses, Fig. 7).", no_args_is_help=True)


@app.command("responses")
def responses(
    runs: list[str] = typer.Argument(
        ..., help="Runs or checkpoints: run ids, run folders/URIs, model.pt or train_state.pt files."
    ),
    out: str = typer.Option("responses", "--out", "-o", help="Folder for responses.csv and responses.png."),
    images: Optional[int] = typer.Option(
        None, "--images", min=1, help="Use only the first N test images (default: the whole test set)."
    ),
    label: list[str] = typer.Option([], "--label", help="Legend label for each run, in order."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override the runs' job, e.g. --set data.root=./data/cifar10."
    ),
    store: Optional[str] = typer.Option(None, help=STORE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Std of every 3x3 layer's response (after BN, before addition/ReLU) over test images.

    Writes OUT/responses.csv and OUT/responses.png (two panels: layers in network order, and
    sorted by magnitude), with all RUNS in one plot, like the paper's Fig. 7 (plain-20,
    ResNet-20, ResNet-56 ...).
    """
    from resnet_cluster.analysis.responses import plot_responses, responses_of, write_csv
    from resnet_cluster.errors import ConfigError

    if label and len(label) != len(runs):
        raise ConfigError(f"--label was given {len(label)} times for {len(runs)} runs; give one per run or none.")
    results = []
    for i, run in enumerate(runs):
        with console.status(f"computing responses of {run}"):
            results.append(
                responses_of(run, store=resolve_store(store), images=images,
                             data_overrides=overrides, label=label[i] if label else None)  # fmt: skip
            )
    os.makedirs(out, exist_ok=True)
    csv_path, png_path = os.path.join(out, "responses.csv"), os.path.join(out, "responses.png")
    write_csv(results, csv_path)
    plot_responses(results, png_path)
    if json_out:
        print_json({"csv": os.path.abspath(csv_path), "png": os.path.abspath(png_path), "runs": results})
        return
    table = Table(title="Layer responses (std over the test images)")
    for col in ("run", "arch", "images", "3x3 layers", "mean std", "max std"):
        table.add_column(col, justify="left" if col in ("run", "arch") else "right")
    for r in results:
        stds = [row["std"] for row in r["rows"]]
        table.add_row(r["label"], r["arch"], str(r["images"]), str(len(stds)),
                      f"{sum(stds) / len(stds):.3f}", f"{max(stds):.3f}")  # fmt: skip
    console.print(table)
    console.print(f"wrote {csv_path} and {png_path}")
