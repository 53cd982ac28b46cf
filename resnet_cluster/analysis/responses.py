"""Layer responses, the paper's Fig. 7 (Section 4.2, "Analysis of Layer Responses").

"The responses are the outputs of each 3x3 layer, after BN and before other nonlinearity
(ReLU/addition)." For each such layer we take the standard deviation of all its output values
(batch, channel and spatial positions together) over the test images, with the net in eval mode
(BN uses its running statistics, as at test time). The paper's finding: residual functions are
generally closer to zero than their plain counterparts, and deeper ResNets have smaller
responses.

Which module's output is "the response" is decided by each net (``net.responses()``): the BN
after a 3x3 conv in post-activation blocks; for pre-activation units and ``bn_after_add``
blocks, whose last 3x3 feeds the addition with no BN of its own, the bare conv output.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from resnet_cluster.artifacts.plots import pyplot
from resnet_cluster.errors import ConfigError

CSV_FIELDS = ["run", "label", "arch", "layer_index", "layer", "std", "sorted_rank", "images"]


def _first_view(x: Tensor | list[Tensor]) -> Tensor:
    # ImageNet test batches may hold several views ([B, V, 3, H, W]) or scales (a list); the
    # responses are defined on single images, so take the first view / scale.
    if isinstance(x, (list, tuple)):
        x = x[0]
    return x[:, 0] if x.dim() == 5 else x


@torch.no_grad()
def layer_responses(
    model: nn.Module, batches: Iterable, *, max_images: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Std of each 3x3 layer's response over the images of ``batches`` ((x, y) pairs).

    Returns ``([{"layer_index" (1-based, network order), "layer" (module name), "std"}], images)``.
    """
    if not hasattr(model, "responses"):
        raise ConfigError(
            f"{type(model).__name__} does not say which modules are its 3x3 layers' responses; "
            "layer responses work on the nets of resnet_cluster.models."
        )
    layers = model.responses()
    # Running sums in float64: 10,000 images x 16 x 32 x 32 values would lose digits in fp32.
    sums = [torch.zeros((), dtype=torch.float64) for _ in layers]
    sumsq = [torch.zeros((), dtype=torch.float64) for _ in layers]
    counts = [0 for _ in layers]

    def hook(i: int):
        def fn(_m: nn.Module, _inp: Any, out: Tensor) -> None:
            o = out.detach().double()
            sums[i] += o.sum().cpu()
            sumsq[i] += (o * o).sum().cpu()
            counts[i] += o.numel()

        return fn

    handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(layers)]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            x = _first_view(batch[0])
            if max_images is not None:
                x = x[: max_images - seen]
            if len(x) == 0:
                break
            model(x)
            seen += len(x)
            if max_images is not None and seen >= max_images:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ConfigError("no test images to compute layer responses on; check the run's dataset.")
    rows = []
    for i, (name, _) in enumerate(layers):
        n = counts[i]
        mean = sums[i].item() / n
        var = max(sumsq[i].item() / n - mean * mean, 0.0) * n / max(n - 1, 1)
        rows.append({"layer_index": i + 1, "layer": name, "std": math.sqrt(var)})
    return rows, seen


def responses_of(
    path_or_run: str,
    *,
    store: str | None = None,
    images: int | None = None,
    data_overrides: tuple[str, ...] | list[str] = (),
    label: str | None = None,
) -> dict[str, Any]:
    """Load a run / model.pt / checkpoint, read its job's test set, and compute the responses.

    ``data_overrides`` are ``--set``-style overrides applied to the run's job (for example
    ``data.root=./data/cifar10`` when the run was trained where the data lived elsewhere).
    """
    from resnet_cluster import config as config_mod
    from resnet_cluster.models import jobs
    from resnet_cluster.data.loaders import build_loaders_for
    from resnet_cluster.models.files import read_model_file
    from resnet_cluster.models.registry import build

    doc = read_model_file(path_or_run, store=store)
    if not doc.get("config"):
        raise ConfigError(
            f"{doc['source']} carries no job config, so its test set is unknown; pass a run or "
            "a model.pt written by a run."
        )
    data = config_mod.apply_overrides(doc["config"], list(data_overrides))
    # One process reads the whole test set: the per-worker batch is the global batch here.
    data.setdefault("scaling", {})["workers"] = 1
    cfg = jobs.from_dict(data, source=f"the job of {doc['source']}")
    net = build(doc["arch"], **doc["model_options"])
    net.load_state_dict(doc["state_dict"])
    _, test, info = build_loaders_for(cfg, rank=0, world_size=1)
    if hasattr(test, "set_epoch"):
        test.set_epoch(0)
    rows, seen = layer_responses(net, test, max_images=images)
    ranked = sorted(range(len(rows)), key=lambda i: -rows[i]["std"])
    for rank, i in enumerate(ranked, 1):
        rows[i]["sorted_rank"] = rank
    run = os.path.basename(os.path.dirname(doc["source"])) if doc["source"].endswith("model.pt") else doc["source"]
    return {
        "run": run,
        "source": doc["source"],
        "label": label or f"{doc['arch']} ({run})",
        "arch": doc["arch"],
        "images": seen,
        "dataset": cfg.data.dataset,
        "rows": rows,
    }


def write_csv(results: list[dict[str, Any]], path: str) -> None:
    """One row per (run, layer): ``run, label, arch, layer_index, layer, std, sorted_rank, images``."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            for row in r["rows"]:
                w.writerow({"run": r["run"], "label": r["label"], "arch": r["arch"],
                            "images": r["images"], **row})  # fmt: skip


def plot_responses(results: list[dict[str, Any]], path: str) -> None:
    """Fig. 7's two panels: std by layer index (network order), and sorted by magnitude."""
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), constrained_layout=True)
    for r in results:
        stds = [row["std"] for row in r["rows"]]
        xs = range(1, len(stds) + 1)
        ax1.plot(xs, stds, marker=".", label=r["label"])
        ax2.plot(xs, sorted(stds, reverse=True), marker=".", label=r["label"])
    ax1.set_xlabel("layer index (original)")
    ax2.set_xlabel("layer index (sorted by magnitude)")
    for ax in (ax1, ax2):
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Standard deviations of 3x3 layer responses (He et al. 2015, Fig. 7)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
