"""``resnet-cluster models``: the registered networks, their stage tables, and weight import."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from resnet_cluster.cli.common import console, print_json

app = typer.Typer(help="The registered networks.", no_args_is_help=True)


@app.command("list")
def list_models(json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List every network: dataset, depth, parameters, multiply-adds at the native input size.

    Multiply-adds are counted (torch.utils.flop_counter on the meta device; convs and fc, one
    image of 32x32 on CIFAR, 224x224 on ImageNet) with each net's default options, and cached
    under ~/.cache/resnet-cluster so only the first listing pays for counting.
    """
    from resnet_cluster import models
    from resnet_cluster.models.summary import counts

    rows = []
    infos = models.available()
    with console.status("counting parameters and multiply-adds (cached after the first time)"):
        for m in infos:
            rows.append({**m.__dict__, "input_size": m.input_size, **counts(m.name)})
    if json_out:
        print_json(rows)
        return
    table = Table(title="Registered networks (model.arch)")
    for col in ("name", "dataset", "family", "block", "depth", "parameters", "multiply-adds"):
        right = col in ("depth", "parameters", "multiply-adds")
        table.add_column(col, justify="right" if right else "left", no_wrap=True)
    for r in rows:
        table.add_row(
            r["name"], r["dataset"], r["family"], r["block"], str(r["depth"]),
            f"{r['parameters'] / 1e6:.2f}M", f"{r['multiply_adds'] / 1e9:.3f}G",
        )  # fmt: skip
    console.print(table)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="A model name (see `resnet-cluster models list`)."),
    option: list[str] = typer.Option(
        [], "--set", "-s", help="A model option as KEY=VALUE, e.g. --set shortcut=C or --set bottleneck_stride=v1.5."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """The stage table of one network, laid out like the paper's Table 1."""
    from resnet_cluster.config import parse_override
    from resnet_cluster.errors import ConfigError
    from resnet_cluster.models.summary import stage_table

    options = {}
    for text in option:
        key, value = parse_override(text)
        if len(key) != 1:
            raise ConfigError(f"--set {text!r}: give a model option as KEY=VALUE, e.g. --set shortcut=B.")
        options[key[0].removeprefix("model.")] = value
    doc = stage_table(name, **options)
    if json_out:
        print_json(doc)
        return
    opts = ", ".join(f"{k} {v}" for k, v in doc["options"].items())
    table = Table(title=f"{name}: {doc['depth']} layers ({opts})")
    table.add_column("layer name")
    table.add_column("output size", justify="right")
    table.add_column("layers")
    for r in doc["rows"]:
        table.add_row(r["stage"], r["output"], r["layers"])
    console.print(table)
    console.print(
        f"parameters {doc['parameters']:,}   multiply-adds {doc['multiply_adds'] / 1e9:.3f}G "
        "(one image at the native input size)"
    )


@app.command("import")
def import_weights(
    path: str = typer.Argument(..., help="The checkpoint to convert, e.g. resnet50-0676ba61.pth."),
    source: str = typer.Option("torchvision", "--from", help="Its layout: torchvision."),
    arch: str = typer.Option(..., "--arch", help="Our name for the net: resnet18 ... resnet152."),
    out: str = typer.Option("model.pt", "--out", help="Where to write our model.pt."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Convert a torchvision-layout ResNet state dict into a model.pt of ours.

    The result is option B shortcuts with the stride in the bottleneck's 3x3
    (model.bottleneck_stride v1.5), and gives exactly the outputs torchvision's net gives.
    Load it with resnet_cluster.models.load(OUT) or in eval and fine-tuning jobs.
    """
    from resnet_cluster.models.convert import import_weights as run_import

    doc = run_import(path, source=source, arch=arch, out=out)
    if json_out:
        print_json(doc)
        return
    opts = ", ".join(f"{k}={v}" for k, v in doc["model_options"].items() if v is not None)
    console.print(
        f"wrote {doc['out']}: {arch} ({opts}), {doc['parameters']:,} parameters from "
        f"{doc['tensors']} tensors of {path}"
    )


_ = Optional  # typer resolves annotations at runtime
