"""``resnet-cluster data``: prepare datasets where jobs read them."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from resnet_cluster.cli.common import console, err_console, print_json

app = typer.Typer(help="Prepare datasets.", no_args_is_help=True)
prepare_app = typer.Typer(help="Download and convert a dataset.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")


@prepare_app.command("cifar10")
def prepare_cifar10(
    source: Optional[str] = typer.Option(
        None, help="cifar-10-python.tar.gz as a local path or URL; default: download the official archive."
    ),
    dest: str = typer.Option("./data/cifar10", help="Where jobs read it (data.root): a folder or fsspec URI."),
    shard_images: int = typer.Option(1000, help="Images per shard (3 KB each, stored raw)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Write the official CIFAR-10 python archive as shards plus manifest.json, the format ImageNet uses (resumable: re-run the same command)."""
    from resnet_cluster.data.cifar import prepare_cifar10 as prepare

    if json_out:
        summary = prepare(source, dest, shard_images=shard_images)
        print_json(summary)
        return
    with console.status("preparing CIFAR-10") as status:
        summary = prepare(source, dest, shard_images=shard_images,
                          progress=lambda msg: status.update(msg))
    table = Table(title=f"CIFAR-10 prepared at {summary['dest']}", show_header=False)
    if summary.get("already_prepared"):
        table.title += " (already complete; nothing written)"
    table.add_row("training images", f"{summary['num_train']:,}")
    table.add_row("test images", f"{summary['num_test']:,}")
    table.add_row("classes", ", ".join(summary["classes"]))
    table.add_row("shards", f"{summary['shards']} ({summary.get('reused_shards', 0)} reused)")
    table.add_row("bytes", f"{summary['bytes']:,}")
    console.print(table)
    console.print(f"Jobs read it with [bold]data.dataset: cifar10[/] and [bold]data.root: {summary['dest']}[/]")


@prepare_app.command("imagenet")
def prepare_imagenet(
    train: str = typer.Option(..., help="ILSVRC2012_img_train.tar as downloaded (a local path or fsspec URI such as s3://bucket/ILSVRC2012_img_train.tar), or the extracted train/ folder: train/<wnid>/*.JPEG."),
    val: str = typer.Option(..., help="ILSVRC2012_img_val.tar (path or URI), or the extracted val/ folder: flat, or sorted into <wnid>/ folders."),
    dest: str = typer.Option(..., help="Where jobs read it (data.root): a folder or fsspec URI such as s3://bucket/imagenet."),
    devkit: Optional[str] = typer.Option(
        None, help="ILSVRC2012_devkit_t12.tar.gz (path or URI): the labels of a flat val and the synset order, from data/meta.mat and the val ground truth."
    ),
    val_labels: Optional[str] = typer.Option(
        None, help="Labels of a flat val/ without --devkit: LOC_val_solution.csv, or ILSVRC2012_validation_ground_truth.txt (with --synsets). Default: LOC_val_solution.csv next to val/ if there."
    ),
    synsets: Optional[str] = typer.Option(None, help="With the ground-truth .txt: the wnid of ILSVRC2012_ID 1, 2, ... one per line."),
    max_side: int = typer.Option(480, help="Re-encode images whose shorter side is larger to this many pixels (480: the top of the paper's scale range)."),
    quality: int = typer.Option(90, help="JPEG quality of re-encoded images."),
    shard_images: int = typer.Option(512, help="Images per shard (the unit a reader fetches in one request)."),
    workers: int = typer.Option(1, help="Processes encoding shards in parallel (on this machine; with --address the cluster's CPUs are used)."),
    stats_sample: Optional[int] = typer.Option(
        None, help="Compute the mean and PCA from this many training images (a fixed, seeded sample). Default: all, each fully decoded; with a sample the others stored as they are get only a cheap 1/8-scale decode check."
    ),
    address: Optional[str] = typer.Option(
        None, help="Write the shards as Ray tasks across this cluster: its GCS address HOST:PORT (as `ray start --head` prints), or a Jobs API URL http://HEAD:8265 (the whole command then runs on the cluster as a Ray job). Inputs and --dest must be reachable from every node (s3://...)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document instead of a progress bar and table."),
) -> None:
    """Write ImageNet (the official tars + devkit, or extracted folders) as Parquet shards plus manifest.json (resumable: re-run the same command)."""
    import functools

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from resnet_cluster.launch import remote

    kwargs = dict(val_labels=val_labels, synsets=synsets, devkit=devkit, max_side=max_side,
                  quality=quality, shard_images=shard_images, workers=workers,
                  stats_sample=stats_sample)
    if address and remote.is_jobs_address(address):
        from resnet_cluster.launch.prepare import submit_prepare

        args = ["--train", train, "--val", val, "--dest", dest]
        for flag, value in (("--devkit", devkit), ("--val-labels", val_labels), ("--synsets", synsets),
                            ("--max-side", max_side), ("--quality", quality),
                            ("--shard-images", shard_images), ("--stats-sample", stats_sample)):
            if value is not None:
                args += [flag, str(value)]
        summary = submit_prepare(address, args, lambda line: err_console.print(line, markup=False, highlight=False))
        if json_out:
            print_json(summary)
        else:
            _imagenet_table(summary)
        return
    if address:
        from resnet_cluster.launch.prepare import prepare_on_cluster

        prepare = functools.partial(prepare_on_cluster, address)
    else:
        from resnet_cluster.data.imagenet import prepare_imagenet as prepare
    if json_out:
        print_json(prepare(train, val, dest, **kwargs))
        return
    with Progress(TextColumn("[bold]preparing[/]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("images, {task.fields[shards]} shards"), TimeRemainingColumn(),
                  console=console) as bar:
        task = bar.add_task("prepare", total=None, shards="0")

        def progress(ev: dict) -> None:
            bar.update(task, total=ev["images_total"], completed=ev["images_done"],
                       shards=f"{ev['shards_done']}/{ev['shards_total']} ({ev['reused']} reused)")

        summary = prepare(train, val, dest, progress=progress, **kwargs)
    _imagenet_table(summary)


def _imagenet_table(summary: dict) -> None:
    table = Table(title=f"ImageNet prepared at {summary['dest']}", show_header=False)
    if summary.get("already_prepared"):
        table.title += " (already complete; nothing written)"
    table.add_row("training images", f"{summary['train_images']:,}")
    table.add_row("validation images", f"{summary['val_images']:,}")
    table.add_row("classes", str(summary["classes"]))
    table.add_row("shards", f"{summary['shards']} ({summary.get('reused_shards', 0)} reused)")
    table.add_row("bytes", f"{summary['bytes']:,}")
    table.add_row("skipped files", str(len(summary["skipped"])))
    if summary.get("nodes"):
        table.add_row("Ray nodes that wrote shards", str(summary["nodes"]))
    console.print(table)
    for s in summary["skipped"][:20]:
        console.print(f"  skipped {s['path']}: {s['error']}", markup=False)
    if len(summary["skipped"]) > 20:
        console.print(f"  ... and {len(summary['skipped']) - 20} more (all listed in manifest.json)")
    console.print(f"Jobs read it with [bold]data.dataset: imagenet[/] and [bold]data.root: {summary['dest']}[/]")
