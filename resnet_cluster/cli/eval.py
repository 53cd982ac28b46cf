"""``resnet-cluster eval``: test a stored run or checkpoint under a protocol."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from resnet_cluster.cli.common import STORE_HELP, console, fmt_err, print_json, resolve_store



def eval_command(
    target: str = typer.Argument(
        ...,
        metavar="RUN_OR_CHECKPOINT",
        help="A run id of the store, or a path/URI of a model.pt, a train_state.pt, or a folder with one.",
    ),
    protocol: Optional[str] = typer.Option(
        None, "--protocol", help="1crop | 10crop | multiscale (default: the run's eval.protocol). CIFAR: 1crop."
    ),
    data: Optional[str] = typer.Option(None, "--data", help="Test data root (folder or fsspec URI); sets data.root."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Test batch (default: the run's train.batch_size)."),
    precise_bn: int = typer.Option(
        0, "--precise-bn", min=0, help="Recompute BN statistics over N training batches first (precise BN)."
    ),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a key of the run's job, e.g. data.dataset=synthetic."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)."),
    store: Optional[str] = typer.Option(None, "--store", help=STORE_HELP),
    record: bool = typer.Option(True, "--record/--no-record", help="Write eval-<protocol>.json into the run's folder."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Test a stored model: top-1 and top-5 error under a test protocol, in this process.

    The run's own job rebuilds the network and names the data; CIFAR runs are tested on the
    single original view of every test image. When the target is a run, the result is also
    written to eval-<protocol>.json in the run's folder (the run's other files are untouched).
    """
    import torch

    from resnet_cluster.engine.evaluation import evaluate_loaded, load_target, record_result

    overrides = list(set_ or [])
    if protocol is not None:
        overrides.append(f"eval.protocol={protocol}")
    if data is not None:
        overrides.append(f"data.root={data}")
    overrides.append("scaling.workers=1")  # one process; the global test batch stays as trained
    if batch_size is not None:
        overrides.append(f"train.batch_size={batch_size}")
    root = resolve_store(store)
    loaded = load_target(target, root, overrides)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate_loaded(loaded, device=dev, precise_batches=precise_bn)
    if record and loaded.run_id:
        result["recorded_to"] = record_result(root, result)
    if json_out:
        print_json(result)
        return
    t = Table(title=f"{loaded.cfg.model.arch} from {loaded.source}", show_header=False)
    t.add_row("protocol", result["protocol"])
    t.add_row("data", f"{result['dataset']} ({result['data']})")
    t.add_row("images", f"{result['test_images']:,}")
    t.add_row("top-1 error", fmt_err(result["top1_err"]))
    t.add_row("top-5 error", fmt_err(result["top5_err"]))
    t.add_row("test loss", f"{result['test_loss']:.4f}")
    t.add_row("time", f"{result['seconds']:.1f} s ({result['images_per_sec']:.0f} images/s on {result['device']})")
    if result.get("recorded_to"):
        t.add_row("recorded", result["recorded_to"])
    console.print(t)
