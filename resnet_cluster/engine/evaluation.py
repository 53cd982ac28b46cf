"""Evaluate a stored model under a test protocol: the library behind ``resnet-cluster eval``.

A target is a run id in an artifact store (its ``model.pt``, or its newest checkpoint while the
run has no model yet), or a path/URI of a ``model.pt`` file, a ``train_state.pt`` checkpoint
file, or a folder holding either. The job the weights were trained with (stored next to them)
rebuilds the network and names the data; ``--data`` / ``--protocol`` change what it is
tested on. The result goes to ``eval-<protocol>.json`` in the run folder when the target is a
run: a new file, never one of the files the run's manifest lists.
"""

from __future__ import annotations

import io
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resnet_cluster.artifacts import checkpoints
from resnet_cluster.artifacts.layout import MODEL as MODEL_FILE
from resnet_cluster.config import JobConfig, apply_overrides
from resnet_cluster.engine.bn import precise_bn
from resnet_cluster.engine.checkpoint import STATE_FILE
from resnet_cluster.engine.context import WorkerContext
from resnet_cluster.engine.device import cuda_problem
from resnet_cluster.engine.loop import _autocast, evaluate
from resnet_cluster.errors import ConfigError, DeviceError, StoreError
from resnet_cluster.models.files import check_format
from resnet_cluster.models.jobs import from_dict


@dataclass
class Loaded:
    model: nn.Module
    cfg: JobConfig
    source: str  # where the weights came from (URI)
    weights: str  # "model.pt" or "checkpoints/epoch_NNNNN"
    run_id: str | None  # set when the target is a run of the store


def eval_file_name(protocol: str) -> str:
    return f"eval-{protocol}.json"


def _torch_load(blob: bytes, where: str) -> dict[str, Any]:
    try:
        obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    except Exception as e:
        raise StoreError(f"{where} is not a readable PyTorch file ({type(e).__name__}: {e}).") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{where} holds a {type(obj).__name__}, not a resnet-cluster model or checkpoint.")
    return obj


def _rebuild(saved: dict[str, Any], where: str, overrides: list[str]) -> tuple[nn.Module, JobConfig]:
    from resnet_cluster import models

    job = saved.get("config")
    if not isinstance(job, dict):
        raise StoreError(
            f"{where} has no job config, so the network cannot be rebuilt. Pass a model.pt written "
            "by resnet-cluster (format: arch, model_options, state_dict, config) or a checkpoint folder."
        )
    cfg = from_dict(apply_overrides(job, overrides), source=f"job of {where}")
    if "state_dict" in saved:  # model.pt (models.files.save_model_file)
        check_format(saved, where)
        arch, options, state = saved.get("arch", cfg.model.arch), saved.get("model_options", {}), saved["state_dict"]
    elif "model" in saved:  # train_state.pt (engine.checkpoint)
        arch, options, state = cfg.model.arch, cfg.model.model_dump(exclude={"arch"}), saved["model"]
    else:
        raise StoreError(f"{where} has neither state_dict (model.pt) nor model (train_state.pt).")
    model = models.build(arch, **options)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise StoreError(f"{where}: the weights do not fit {arch} ({str(e).splitlines()[0]}).") from None
    return model, cfg


def _latest_checkpoint(store, run_id: str) -> str | None:
    """The run's latest checkpoint that Ray Train registered (epoch end or mid-epoch): never a
    folder whose upload failed or was cut off (see ``artifacts.checkpoints``)."""
    found = checkpoints.latest(store, run_id)
    return found["path"] if found else None


def load_target(target: str, store_root: str, overrides: list[str], endpoint_url: str | None = None) -> Loaded:
    """Resolve ``target`` (run id, or path/URI of a model or checkpoint) and rebuild its model."""
    import fsspec

    from resnet_cluster.artifacts.store import ArtifactStore

    is_path = "://" in target or os.path.exists(target) or target.endswith(".pt") or os.sep in target
    if not is_path:
        store = ArtifactStore(store_root, endpoint_url=endpoint_url) if endpoint_url else ArtifactStore(store_root)
        if not store.exists(target):
            raise StoreError(
                f"no run {target!r} in the store {store.root}, and no file or folder of that name "
                "here. Pass a run id from `resnet-cluster runs list` (with --store for another "
                "store) or the path of a model.pt / checkpoint folder."
            )
        if store.exists(target, MODEL_FILE):
            weights, rel = MODEL_FILE, MODEL_FILE
        else:
            ckpt = _latest_checkpoint(store, target)
            if ckpt is None:
                raise StoreError(
                    f"run {target!r} in {store.root} has neither {MODEL_FILE} nor a checkpoint yet; "
                    "wait for its first checkpoint (checkpoint.every_epochs or every_iterations) or for it to finish."
                )
            weights, rel = ckpt, f"{ckpt}/{STATE_FILE}"
        where = store.uri(target, rel)
        model, cfg = _rebuild(_torch_load(store.read_bytes(target, rel), where), where, overrides)
        return Loaded(model, cfg, where, weights, target)

    fs, path = fsspec.core.url_to_fs(target)
    try:
        if fs.isdir(path):
            for name in (MODEL_FILE, STATE_FILE):
                if fs.exists(posixpath.join(path, name)):
                    path = posixpath.join(path, name)
                    break
            else:
                raise StoreError(
                    f"{target} is a folder without {MODEL_FILE} or {STATE_FILE}. Pass a run folder, "
                    "a checkpoint folder (checkpoints/epoch_NNNNN) or one of those files."
                )
        blob = fs.cat_file(path)
    except FileNotFoundError:
        raise StoreError(f"{target} does not exist. Pass a run id, or the path of a model.pt or checkpoint.") from None
    where = fs.unstrip_protocol(path) if "://" in target else path
    model, cfg = _rebuild(_torch_load(blob, where), where, overrides)
    # model.pt, or the checkpoint folder's name (epoch_NNNNN) for a train_state.pt
    weights = MODEL_FILE if path.endswith(MODEL_FILE) else posixpath.basename(posixpath.dirname(path)) or STATE_FILE
    return Loaded(model, cfg, where, weights, None)


def evaluate_loaded(
    loaded: Loaded,
    *,
    device: str | torch.device = "cpu",
    precise_batches: int = 0,
) -> dict[str, Any]:
    """Test ``loaded.model`` on its job's test set under ``loaded.cfg.eval.protocol`` in this
    process (rank 0 of 1). ``precise_batches`` > 0 recomputes BN statistics over that many
    training batches first, as :func:`engine.bn.precise_bn`."""
    from resnet_cluster.data.loaders import build_loaders_for
    from resnet_cluster.artifacts.run import utc_now

    cfg = loaded.cfg
    dev = torch.device(device)
    if dev.type == "cuda" and (problem := cuda_problem(asked=f"--device {device} was asked for",
                                                       fallback="evaluate with --device cpu")):
        raise DeviceError(problem)
    ctx = WorkerContext(device=dev)
    model = loaded.model.to(dev)
    if cfg.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train, test, info = build_loaders_for(cfg, rank=0, world_size=1, device=dev)

    def autocast():
        return _autocast(cfg, dev)

    if precise_batches:
        train.set_epoch(0)
        precise_bn(model, train, ctx, min(precise_batches, len(train)), autocast=autocast,
                   channels_last=cfg.precision.channels_last)
    t0 = time.perf_counter()
    metrics = evaluate(model, test, ctx, autocast=autocast, channels_last=cfg.precision.channels_last)
    seconds = time.perf_counter() - t0
    return {
        "run_id": loaded.run_id,
        "source": loaded.source,
        "weights": loaded.weights,
        "arch": cfg.model.arch,
        "protocol": cfg.eval.protocol,
        "dataset": cfg.data.dataset,
        "data": cfg.data.root if cfg.data.dataset != "synthetic" else "synthetic",
        "precise_bn_batches": precise_batches,
        **metrics,
        "num_test": info.get("num_test"),
        "seconds": seconds,
        "images_per_sec": metrics["test_images"] / max(seconds, 1e-9),
        "device": str(dev),
        "torch": torch.__version__,
        "evaluated_at": utc_now(),
    }


def record_result(store_root: str, result: dict[str, Any], endpoint_url: str | None = None) -> str:
    """Write ``result`` as ``eval-<protocol>.json`` in its run folder; returns the URI."""
    from resnet_cluster.artifacts.store import ArtifactStore

    if not result.get("run_id"):
        raise ConfigError("only the evaluation of a stored run can be recorded in a run folder")
    store = ArtifactStore(store_root, endpoint_url=endpoint_url) if endpoint_url else ArtifactStore(store_root)
    name = eval_file_name(result["protocol"])
    store.write_json(result["run_id"], name, result)
    return store.uri(result["run_id"], name)
