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
from resnet_cluster.engine.bn import DynamicMomentum, convert_sync_bn, precise_bn, set_bn_momentum
from resnet_cluster.engine.checkpoint import capture_rng, restore_rng
from resnet_cluster.engine.context import WorkerContext
from resnet_cluster.engine.device import cudnn_benchmark_off, set_determinism
from resnet_cluster.errors import ConfigError
from resnet_cluster.optim import LRSchedule, build_optimizer, scaled_lr


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
    # bn.policy dynamic: fit attaches engine.bn.DynamicMomentum (1/(1+n), n on the host).
    set_bn_momentum(model, cfg.bn.momentum)
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
    # Seconds this rank spent waiting for its next batch (host side): in this window, this epoch.
    wait_window = wait_epoch = 0.0

    def flush_window() -> None:
        nonlocal t_window, steps_in_window, window, wait_window
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
                    "data_wait_fraction": wait_window / max(now - t_window, 1e-9),
                }
            )
        window.zero_()
        t_window, steps_in_window, wait_window = now, 0, 0.0

    batch_iter = iter(batches)
    while iteration < stop_at:
        t_wait = time.perf_counter()
        try:
            x, y = next(batch_iter)
        except StopIteration:
            break
        waited = time.perf_counter() - t_wait
        wait_window += waited
        wait_epoch += waited
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
        "data_wait_s": wait_epoch,
    }


def _forward(model: nn.Module, x: torch.Tensor, autocast, channels_last: bool) -> torch.Tensor:
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast():
        out = model(x)
    # bf16/fp16 logits from autocast are summed and soft-maxed in float32
    return out if out.dtype in (torch.float32, torch.float64) else out.float()


def view_scores(
    model: nn.Module,
    x: torch.Tensor | Sequence[torch.Tensor],
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    channels_last: bool = False,
) -> tuple[torch.Tensor, bool]:
    """The model's class scores for one test batch in any of the data contract's forms.

    - ``x`` [B, 3, H, W]: one view; returns (logits [B, C], False).
    - ``x`` [B, V, 3, H, W]: V views of each image (10-crop: 4 corners + centre and their
      flips); returns (softmax averaged over the V views [B, C], True), as the paper does.
    - ``x`` a list of [B, 3, Hs, Ws]: one fully-convolutional pass per scale (the global
      average pool makes any size valid); returns (logits averaged over the scales [B, C],
      False): the paper's multi-scale test averages the scores.

    The bool says whether the result is already a probability (so the loss is -log p).
    """
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError("a multi-scale test batch needs at least one scale")
        total = None
        with cudnn_benchmark_off():  # a new shape every call: autotuning would never pay back
            for xs in x:
                s = _forward(model, xs, autocast, channels_last)
                total = s if total is None else total + s
        return total / len(x), False
    if x.dim() == 5:
        b, v = x.shape[:2]
        logits = _forward(model, x.reshape(b * v, *x.shape[2:]), autocast, channels_last)
        return logits.softmax(dim=1).view(b, v, -1).mean(dim=1), True
    return _forward(model, x, autocast, channels_last), False


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor | Sequence[torch.Tensor], torch.Tensor]],
    ctx: WorkerContext,
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Top-1/top-5 test error and mean loss over every image of ``batches`` on all ranks.

    Each rank evaluates its own shard (the data side gives rank r a disjoint share, keeping the
    last partial batch, so the shards cover the set exactly once) and one all-reduce of
    [loss_sum, wrong1, wrong5, images] in float64 makes the totals exact whatever the set and
    world sizes. Batches take any form of :func:`view_scores`; the loss is the cross-entropy of
    the averaged scores (-log of the averaged softmax for multi-view batches). Pass the bare
    model, not a DDP wrapper: ranks may run different numbers of batches here.
    """
    model.eval()
    acc = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # loss_sum, wrong1, wrong5, n
    for x, y in batches:
        scores, is_prob = view_scores(model, x, autocast=autocast, channels_last=channels_last)
        k = min(5, scores.shape[1])
        top = scores.topk(k, dim=1).indices
        if is_prob:
            loss = F.nll_loss(scores.clamp_min(1e-12).log(), y, reduction="sum")
        else:
            loss = F.cross_entropy(scores, y, reduction="sum")
        acc[0] += loss.double()
        acc[1] += (top[:, 0] != y).sum()
        acc[2] += (~(top == y[:, None]).any(dim=1)).sum()
        acc[3] += y.shape[0]
    loss_sum, w1, w5, n = ctx.all_reduce_sum(acc).tolist()
    n_img = int(n)
    n = max(n, 1)
    return {
        "test_loss": loss_sum / n,
        "top1_err": 100.0 * w1 / n,
        "top5_err": 100.0 * w5 / n,
        "test_images": n_img,
    }


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
    set_determinism(cfg.precision.deterministic)
    # The same seed on every rank gives the same initial weights (DDP also broadcasts them).
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    if cfg.bn.sync and ctx.world_size > 1:
        model = convert_sync_bn(model)  # before DDP wraps it (PyTorch's documented order)
    model = model.to(ctx.device)
    if cfg.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dynamic_bn = DynamicMomentum(model) if cfg.bn.policy == "dynamic" else None
    optimizer = build_optimizer(cfg.optim, model, lr=scaled_lr(cfg))
    train_batches, test_batches, data_info = build_loaders_for(cfg, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
    iters_per_epoch = len(train_batches)
    if iters_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size {cfg.train.batch_size} is larger than the training set "
            f"({data_info['num_train']} images): not one full batch per epoch. Lower the batch."
        )
    schedule = LRSchedule.from_config(cfg, iters_per_epoch=iters_per_epoch)
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

    if cfg.precision.compile:
        # Compile the module in place (its __call__), so the bare model used for evaluation
        # and precise BN is compiled too and state-dict keys keep their names.
        model.compile(backend=cfg.precision.compile_backend)
    net = wrap_model(model) if wrap_model else model
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

    def run_precise_bn(epoch: int) -> None:
        # The first N batches of this epoch's training order (augmented, as in training).
        train_batches.set_epoch(epoch)
        precise_bn(
            model,
            train_batches,
            ctx,
            min(cfg.bn.precise_batches, iters_per_epoch),
            autocast=autocast,
            channels_last=cfg.precision.channels_last,
        )

    for epoch in range(start_epoch, total_epochs):
        train_batches.set_epoch(epoch)
        if dynamic_bn is not None:
            dynamic_bn.reset()
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
            if cfg.bn.precise_batches:
                run_precise_bn(epoch)
            # The bare model: DDP's forward would broadcast buffers, a collective, and ranks may
            # hold different numbers of test batches.
            record.update(
                evaluate(model, test_batches, ctx, autocast=autocast, channels_last=cfg.precision.channels_last)
            )
            if schedule.observe_test_error(record["top1_err"]):
                record["lr_dropped"] = 1
        record["epoch_time_s"] = time.time() - t0
        history.append({k: record[k] for k in ("epoch", "iteration", "top1_err") if k in record})

        def state(epoch=epoch, iteration=iteration) -> dict[str, Any]:
            return {
                "model": model.state_dict(),
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
        cb.on_finish(summary, model)
    return summary
