"""``train_one_epoch`` and ``evaluate`` return metric dicts; ``fit`` strings them together.

Everything here is plain PyTorch. Distribution enters only through :class:`WorkerContext`
(rank, world size, device, all-reduce) and an optional ``wrap_model`` (DDP); reporting and
storage enter only through :class:`Callback` objects.

Metric conventions: losses are mean cross-entropy per image; errors are percentages; every
number a callback sees is already reduced over all ranks, so rank 0 can record it alone.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resnet_cluster.config import JobConfig
from resnet_cluster.engine.checkpoint import capture_rng, restore_rng
from resnet_cluster.engine.context import WorkerContext
from resnet_cluster.errors import ConfigError
from resnet_cluster.optim import LRSchedule, build_optimizer


class Callback:
    """Hooks the loop calls. Every rank calls them; most implementations act on rank 0 only."""

    def on_start(self, info: dict[str, Any]) -> None: ...

    def on_log(self, record: dict[str, Any]) -> None: ...

    def on_epoch_end(self, record: dict[str, Any], state: Callable[[], dict[str, Any]]) -> None:
        """``state()`` builds the resumable TrainState; call it only when checkpointing."""

    def on_finish(self, summary: dict[str, Any], model: nn.Module) -> None: ...


def model_options(cfg: JobConfig) -> dict[str, Any]:
    """Every ``model`` key but ``arch`` goes to the builder, so a new key needs no plumbing."""
    return cfg.model.model_dump(exclude={"arch"})


def build_model(cfg: JobConfig) -> nn.Module:
    from resnet_cluster import models

    model = models.build(cfg.model.arch, **model_options(cfg))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = cfg.bn.momentum
    return model


def _autocast(cfg: JobConfig, device: torch.device):
    if cfg.precision.amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    ctx: WorkerContext,
    *,
    epoch: int,
    iteration: int,
    stop_at: int,
    log_every: int = 20,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train until the epoch's batches run out or the global ``iteration`` reaches ``stop_at``.

    Returns the epoch's train loss and error (all ranks), the last lr, the iteration reached, and
    ``images_per_sec``: global training images per second of wall time in this epoch.
    """
    model.train()
    dev = ctx.device
    # [loss_sum, wrong, images] accumulated on the device; synced only at log points.
    window = torch.zeros(3, dtype=torch.float64, device=dev)
    epoch_acc = torch.zeros(3, dtype=torch.float64, device=dev)
    lr = schedule.lr(iteration, epoch)
    t_epoch = t_window = time.perf_counter()
    steps_in_window = 0

    def flush_window() -> None:
        nonlocal t_window, steps_in_window, window
        totals = ctx.all_reduce_sum(window.clone())
        epoch_acc.add_(totals)
        loss_sum, wrong, n = totals.tolist()
        now = time.perf_counter()
        err = 100.0 * wrong / max(n, 1)
        schedule.observe_train_error(err)
        if on_log is not None and n:
            on_log(
                {
                    "iteration": iteration,
                    "epoch": epoch,
                    "loss": loss_sum / n,
                    "train_err": err,
                    "lr": lr,
                    "images_per_sec": n / max(now - t_window, 1e-9),
                }
            )
        window.zero_()
        t_window, steps_in_window = now, 0

    for x, y in batches:
        if iteration >= stop_at:
            break
        lr = schedule.lr(iteration, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            b = y.shape[0]
            window[0] += loss.detach().double() * b
            window[1] += (logits.argmax(1) != y).sum()
            window[2] += b
        iteration += 1
        steps_in_window += 1
        if iteration % log_every == 0:
            flush_window()
    if steps_in_window:
        flush_window()
    elapsed = time.perf_counter() - t_epoch
    loss_sum, wrong, n = epoch_acc.tolist()
    return {
        "iteration": iteration,
        "train_loss": loss_sum / max(n, 1),
        "train_err": 100.0 * wrong / max(n, 1),
        "lr": lr,
        "train_images": int(n),
        "train_time_s": elapsed,
        "images_per_sec": n / max(elapsed, 1e-9),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    ctx: WorkerContext,
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Single-view test error over every image of ``batches`` on all ranks together."""
    model.eval()
    acc = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss_sum, wrong1, wrong5, n
    for x, y in batches:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        acc[0] += F.cross_entropy(logits, y, reduction="sum").double()
        acc[1] += (top[:, 0] != y).sum()
        acc[2] += (~(top == y[:, None]).any(dim=1)).sum()
        acc[3] += y.shape[0]
    loss_sum, w1, w5, n = ctx.all_reduce_sum(acc).tolist()
    n = max(n, 1)
    return {
        "test_loss": loss_sum / n,
        "top1_err": 100.0 * w1 / n,
        "top5_err": 100.0 * w5 / n,
        "test_images": int(n),
    }


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def fit(
    cfg: JobConfig,
    ctx: WorkerContext | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    resume: dict[str, Any] | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on this process's share of the data and return the final summary.

    ``resume`` is a TrainState dict as built by the ``state`` argument of
    ``Callback.on_epoch_end``; training continues at the epoch after it. ``wrap_model`` wraps
    the model for data parallelism (DDP) after it is on ``ctx.device``.
    """
    from resnet_cluster.data.loaders import build_loaders_for

    ctx = ctx or WorkerContext()
    # The same seed on every rank gives the same initial weights (DDP also broadcasts them).
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(ctx.device)
    if cfg.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model)
    schedule = LRSchedule.from_config(cfg)
    train_batches, test_batches, data_info = build_loaders_for(cfg, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
    iters_per_epoch = len(train_batches)
    if iters_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size {cfg.train.batch_size} is larger than the training set "
            f"({data_info['num_train']} images): not one full batch per epoch. Lower the batch."
        )
    total_iters = cfg.train.iterations or cfg.train.epochs * iters_per_epoch
    total_epochs = math.ceil(total_iters / iters_per_epoch)

    start_epoch, iteration, history = 0, 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        restore_rng(resume["rng"])
        start_epoch, iteration = resume["epoch"], resume["iteration"]
        history = list(resume.get("history", []))

    net = wrap_model(model) if wrap_model else model
    if cfg.precision.compile:
        net = torch.compile(net)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision.amp == "fp16" else None

    def autocast():
        return _autocast(cfg, ctx.device)

    info = {
        "iters_per_epoch": iters_per_epoch,
        "total_iterations": total_iters,
        "total_epochs": total_epochs,
        "start_epoch": start_epoch,
        "start_iteration": iteration,
        "resumed": resume is not None,
        "parameters": sum(p.numel() for p in model.parameters()),
        **data_info,
    }
    for cb in callbacks:
        cb.on_start(info)

    def on_log(record: dict[str, Any]) -> None:
        for cb in callbacks:
            cb.on_log(record)

    for epoch in range(start_epoch, total_epochs):
        train_batches.set_epoch(epoch)
        t0 = time.time()
        metrics = train_one_epoch(
            net,
            train_batches,
            optimizer,
            schedule,
            ctx,
            epoch=epoch,
            iteration=iteration,
            stop_at=total_iters,
            log_every=cfg.train.log_every_iterations,
            autocast=autocast,
            scaler=scaler,
            channels_last=cfg.precision.channels_last,
            on_log=on_log,
        )
        iteration = metrics["iteration"]
        record = {"epoch": epoch, **metrics}
        if (epoch + 1) % cfg.train.eval_every_epochs == 0 or epoch + 1 == total_epochs:
            record.update(
                evaluate(net, test_batches, ctx, autocast=autocast, channels_last=cfg.precision.channels_last)
            )
        record["epoch_time_s"] = time.time() - t0
        history.append({k: record[k] for k in ("epoch", "iteration", "top1_err") if k in record})

        def state(epoch=epoch, iteration=iteration) -> dict[str, Any]:
            return {
                "model": _unwrap(net).state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "rng": capture_rng(),
                "epoch": epoch + 1,
                "iteration": iteration,
                "history": list(history),
                "config": cfg.to_dict(),
            }

        for cb in callbacks:
            cb.on_epoch_end(record, state)

    evaluated = [h for h in history if "top1_err" in h]
    summary = {
        "epochs": total_epochs,
        "iterations": iteration,
        "final_top1_err": evaluated[-1]["top1_err"] if evaluated else None,
        "best_top1_err": min(h["top1_err"] for h in evaluated) if evaluated else None,
        "best_epoch": min(evaluated, key=lambda h: h["top1_err"])["epoch"] if evaluated else None,
    }
    for cb in callbacks:
        cb.on_finish(summary, _unwrap(net))
    return summary
