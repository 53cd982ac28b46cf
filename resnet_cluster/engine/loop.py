"""``train_one_epoch`` and ``evaluate`` return metric dicts; ``fit`` strings them together.

Everything here is plain PyTorch. Distribution enters only through :class:`WorkerContext`
(rank, world size, device, all-reduce) and an optional ``wrap_model`` (DDP); reporting and
storage enter only through :class:`Callback` objects.

Metric conventions: losses are mean cross-entropy per image; errors are percentages; every
number a callback sees is already reduced over all ranks, so rank 0 can record it alone.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resnet_cluster.config import JobConfig
from resnet_cluster.engine.accumulation import StepPlan
from resnet_cluster.engine.bn import DynamicMomentum, bn_layers, convert_sync_bn, precise_bn, set_bn_momentum
from resnet_cluster.engine.checkpoint import restore_rng, train_state
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

    def on_checkpoint(self, record: dict[str, Any], state: Callable[[], dict[str, Any]]) -> None:
        """Every ``checkpoint.every_iterations`` steps within an epoch, on every rank; ``record``
        holds epoch, iteration, epoch_step and lr; ``state()`` resumes at exactly this step."""

    def wants_checkpoint(self, record: dict[str, Any]) -> bool:
        """Asked on every rank at each log point; True (on every rank alike) takes a mid-epoch
        checkpoint there (the worker's answer to a node's announced preemption). It may add
        keys to ``record`` that say why (nodes, deadline); ``on_checkpoint`` gets them, with
        ``reason: "preemption"``."""
        return False

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


@dataclass
class Progress:
    """Running sums of [loss_sum, wrong, images] on the device, for the log window (this rank's
    share, reduced at each log point) and for the epoch (already reduced over all ranks)."""

    window: torch.Tensor
    epoch: torch.Tensor
    steps_in_window: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> Progress:
        z = functools.partial(torch.zeros, 3, dtype=torch.float64, device=device)
        return cls(z(), z())


@dataclass
class Session:
    """Everything one process trains with, built once by :func:`setup` (fresh or resumed)."""

    cfg: JobConfig
    ctx: WorkerContext
    plan: StepPlan
    model: nn.Module  # the bare module (evaluation, precise BN, checkpoints)
    net: nn.Module  # what trains: the DDP wrapper when there is one
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler | None
    train_batches: Any
    test_batches: Any
    data_info: dict[str, Any]
    iters_per_epoch: int
    total_iters: int
    total_epochs: int
    epoch: int = 0  # the epoch being trained (or next, at an epoch end)
    epoch_step: int = 0  # optimizer steps done in `epoch`
    iteration: int = 0  # optimizer steps done in the run
    history: list[dict[str, Any]] = field(default_factory=list)
    progress: Progress | None = None
    dynamic_bn: DynamicMomentum | None = None  # bn.policy dynamic: 1/(1+n), n counted on the host

    def autocast(self):
        return _autocast(self.cfg, self.ctx.device)

    def state(self, **extra: Any) -> dict[str, Any]:
        """The resumable TrainState at the current position (see ``engine.checkpoint``)."""
        return train_state(
            model=self.model,
            optimizer=self.optimizer,
            schedule=self.schedule,
            scaler=self.scaler,
            epoch=self.epoch,
            epoch_step=self.epoch_step,
            iteration=self.iteration,
            history=self.history,
            config=self.cfg.to_dict(),
            **extra,
        )


def setup(
    cfg: JobConfig,
    ctx: WorkerContext,
    *,
    resume: dict[str, Any] | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
) -> Session:
    """Build model, optimizer, schedule and data for this rank, and restore ``resume``."""
    from resnet_cluster.data.loaders import build_loaders_for

    set_determinism(cfg.precision.deterministic)
    plan = StepPlan.for_world(cfg.scaling.max_workers, ctx.world_size, ctx.rank)
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
    # Training batches: this rank's slot group of the N-worker layout (engine.accumulation).
    share = (plan.slot_group, plan.active, plan.accumulate)
    train_batches, test_batches, data_info = build_loaders_for(
        cfg, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
        train_share=None if share == (ctx.rank, ctx.world_size, 1) else share,
    )  # fmt: skip
    iters_per_epoch = len(train_batches)
    if iters_per_epoch == 0:
        raise ConfigError(
            f"train.batch_size {cfg.train.batch_size} is larger than the training set "
            f"({data_info['num_train']} images): not one full batch per epoch. Lower the batch."
        )
    schedule = LRSchedule.from_config(cfg, iters_per_epoch=iters_per_epoch)
    total_iters = cfg.train.iterations or cfg.train.epochs * iters_per_epoch
    scaler = torch.amp.GradScaler("cuda") if cfg.precision.amp == "fp16" else None
    s = Session(
        cfg=cfg, ctx=ctx, plan=plan, model=model, net=model, optimizer=optimizer,
        schedule=schedule, scaler=scaler, train_batches=train_batches, test_batches=test_batches,
        data_info=data_info, iters_per_epoch=iters_per_epoch, total_iters=total_iters,
        total_epochs=math.ceil(total_iters / iters_per_epoch), progress=Progress.zeros(ctx.device),
        dynamic_bn=dynamic_bn,
    )  # fmt: skip
    if resume is not None:
        restore(s, resume)
        if dynamic_bn is not None:  # mid-epoch: the batches this epoch already counted (one a step)
            dynamic_bn.n = s.epoch_step
    if cfg.precision.compile:
        # Compile the module in place (its __call__), so the bare model used for evaluation
        # and precise BN is compiled too and state-dict keys keep their names.
        model.compile(backend=cfg.precision.compile_backend)
    s.net = wrap_model(model) if wrap_model else model
    return s


def restore(s: Session, resume: dict[str, Any]) -> None:
    s.model.load_state_dict(resume["model"])
    s.optimizer.load_state_dict(resume["optimizer"])
    s.schedule.load_state_dict(resume["schedule"])
    if s.scaler is not None and resume.get("scaler"):
        s.scaler.load_state_dict(resume["scaler"])
    restore_rng(resume["rng"], s.ctx.device)
    s.epoch, s.iteration = resume["epoch"], resume["iteration"]
    s.epoch_step = resume.get("epoch_step", 0)
    s.history = list(resume.get("history", []))
    saved = resume.get("progress")
    if saved is not None and s.epoch_step:
        # Mid-epoch: the epoch's sums so far, and the open log window's (already summed over
        # the ranks when saved, so rank 0 alone carries them on).
        s.progress.epoch.copy_(torch.as_tensor(saved["epoch"], dtype=torch.float64))
        if s.ctx.is_main:
            s.progress.window.copy_(torch.as_tensor(saved["window"], dtype=torch.float64))
        s.progress.steps_in_window = int(saved["steps_in_window"])


def accumulate_step(s: Session, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step on this rank's ``plan.accumulate`` micro-batches of (x, y).

    DDP all-reduces the gradients once, in the backward of the last micro-batch (``no_sync``
    before it). BatchNorm sees one micro-batch per forward; its running statistics move on the
    first micro-batch only (``track_running_stats`` off for the others): rank 0's statistics
    are then those an N-worker run's rank 0 has (see ``engine.accumulation``).
    """
    plan, net, w = s.plan, s.net, s.plan.loss_weight
    m = plan.accumulate
    micro = [(x, y)] if m == 1 else list(zip(x.split(s.cfg.per_worker_batch), y.split(s.cfg.per_worker_batch)))
    bns = bn_layers(s.model) if m > 1 else []
    s.optimizer.zero_grad(set_to_none=True)
    try:
        for j, (xj, yj) in enumerate(micro):
            last = j == len(micro) - 1
            sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
            if j == 1:
                for bn in bns:
                    bn.track_running_stats = False
            with sync:
                if s.cfg.precision.channels_last:
                    xj = xj.contiguous(memory_format=torch.channels_last)
                with s.autocast():
                    logits = net(xj)
                    loss = F.cross_entropy(logits, yj)
                scaled = loss if w == 1.0 else loss * w
                (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
            if not plan.spare:
                with torch.no_grad():
                    b = yj.shape[0]
                    window = s.progress.window
                    window[0] += loss.detach().double() * b
                    window[1] += (logits.argmax(1) != yj).sum()
                    window[2] += b
    finally:
        for bn in bns:
            bn.track_running_stats = True
    if s.scaler is not None:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        s.optimizer.step()


def train_one_epoch(
    s: Session,
    *,
    log_every: int = 20,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_wanted: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Train ``s.epoch`` from ``s.epoch_step`` until its batches run out or the run's
    ``total_iters`` is reached.

    ``on_checkpoint(record)`` is called on every rank after each ``checkpoint_every``-th step of
    the run that is not the epoch's last (the epoch end has its own checkpoint decision), and
    at a log point where ``checkpoint_wanted(record)`` says so (it must answer alike on every
    rank).
    Returns the epoch's train loss and error (all ranks), the last lr, the iteration reached, and
    ``images_per_sec``: global training images per second of wall time in this run of the epoch.
    """
    ctx, schedule, prog = s.ctx, s.schedule, s.progress
    s.net.train()
    lr = schedule.lr(s.iteration, s.epoch)
    t_epoch = t_window = time.perf_counter()
    images_at_start = prog.epoch[2].item()
    # Seconds this rank spent waiting for its next batch (host side): in this window, this epoch.
    wait_window = wait_epoch = 0.0

    def flush_window() -> None:
        nonlocal t_window, wait_window
        totals = ctx.all_reduce_sum(prog.window.clone())
        prog.epoch.add_(totals)
        loss_sum, wrong, n = totals.tolist()
        now = time.perf_counter()
        err = 100.0 * wrong / max(n, 1)
        schedule.observe_train_error(err)
        if on_log is not None and n:
            on_log(
                {
                    "iteration": s.iteration,
                    "epoch": s.epoch,
                    "loss": loss_sum / n,
                    "train_err": err,
                    "lr": lr,
                    "images_per_sec": n / max(now - t_window, 1e-9),
                    "data_wait_fraction": wait_window / max(now - t_window, 1e-9),
                }
            )
        prog.window.zero_()
        t_window, prog.steps_in_window, wait_window = now, 0, 0.0

    s.train_batches.set_epoch(s.epoch, start=s.epoch_step)
    batch_iter = iter(s.train_batches)
    while s.iteration < s.total_iters:
        t_wait = time.perf_counter()
        try:
            x, y = next(batch_iter)
        except StopIteration:
            break
        waited = time.perf_counter() - t_wait
        wait_window += waited
        wait_epoch += waited
        lr = schedule.lr(s.iteration, s.epoch)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        accumulate_step(s, x, y)
        s.iteration += 1
        s.epoch_step += 1
        prog.steps_in_window += 1
        logged = s.iteration % log_every == 0
        if logged:
            flush_window()
        more = s.epoch_step < s.iters_per_epoch and s.iteration < s.total_iters
        if on_checkpoint is not None and more:
            record = {"epoch": s.epoch, "iteration": s.iteration, "epoch_step": s.epoch_step, "lr": lr}
            if checkpoint_every and s.iteration % checkpoint_every == 0:
                on_checkpoint(record)
            elif logged and checkpoint_wanted is not None and checkpoint_wanted(record):
                on_checkpoint({**record, "reason": "preemption"})
    if prog.steps_in_window:
        flush_window()
    elapsed = time.perf_counter() - t_epoch
    loss_sum, wrong, n = prog.epoch.tolist()
    return {
        "iteration": s.iteration,
        "train_loss": loss_sum / max(n, 1),
        "train_err": 100.0 * wrong / max(n, 1),
        "lr": lr,
        "train_images": int(n),
        "train_time_s": elapsed,
        "images_per_sec": (n - images_at_start) / max(elapsed, 1e-9),
        "data_wait_s": wait_epoch,
    }


def progress_state(s: Session) -> dict[str, Any]:
    """The open log window and the epoch's sums, for a mid-epoch checkpoint (a collective:
    every rank calls it)."""
    window = s.ctx.all_reduce_sum(s.progress.window.clone())
    return {
        "window": window.cpu().tolist(),
        "epoch": s.progress.epoch.cpu().tolist(),
        "steps_in_window": s.progress.steps_in_window,
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


def _micro_batches(s: Session) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's training batches cut into the micro-batches of N workers; nothing on a
    spare rank (its batches are slot-group 0's, which rank 0 already counts)."""
    if s.plan.spare:
        return
    b = s.cfg.per_worker_batch
    for x, y in s.train_batches:
        yield from zip(x.split(b), y.split(b))


def run_precise_bn(s: Session, epoch: int) -> None:
    """Recompute BN statistics over the first ``bn.precise_batches`` iterations of ``epoch``'s
    training order (augmented, as in training), micro-batch by micro-batch."""
    s.train_batches.set_epoch(epoch)
    precise_bn(
        s.model,
        _micro_batches(s),
        s.ctx,
        min(s.cfg.bn.precise_batches, s.iters_per_epoch) * s.plan.accumulate,
        autocast=s.autocast,
        channels_last=s.cfg.precision.channels_last,
    )


def share_bn_stats(s: Session) -> None:
    """Give every rank rank 0's BN running statistics (the ones model.pt keeps) before an
    evaluation, so the test error is that of one model whatever the world size."""
    if s.ctx.distributed:
        import torch.distributed as dist

        for buf in s.model.buffers():
            dist.broadcast(buf, src=0)


def evaluate_epoch(s: Session, record: dict[str, Any]) -> None:
    if s.cfg.bn.precise_batches:
        run_precise_bn(s, record["epoch"])
    else:
        share_bn_stats(s)
    # The bare model: DDP's forward would broadcast buffers, a collective, and ranks may
    # hold different numbers of test batches.
    record.update(
        evaluate(s.model, s.test_batches, s.ctx, autocast=s.autocast, channels_last=s.cfg.precision.channels_last)
    )
    if s.schedule.observe_test_error(record["top1_err"]):
        record["lr_dropped"] = 1


def fit(
    cfg: JobConfig,
    ctx: WorkerContext | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    resume: dict[str, Any] | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on this process's share of the data and return the final summary.

    ``resume`` is a TrainState dict as built by the ``state`` argument of the callbacks;
    training continues where it was taken (an epoch end, or mid-epoch at the exact step).
    ``wrap_model`` wraps the model for data parallelism (DDP) after it is on ``ctx.device``.
    The steps: :func:`setup`, then per epoch :func:`train_one_epoch` (made of
    :func:`accumulate_step`), :func:`evaluate_epoch` when due, and the callbacks.
    """
    ctx = ctx or WorkerContext()
    s = setup(cfg, ctx, resume=resume, wrap_model=wrap_model)
    info = {
        "iters_per_epoch": s.iters_per_epoch,
        "total_iterations": s.total_iters,
        "total_epochs": s.total_epochs,
        "start_epoch": s.epoch,
        "start_iteration": s.iteration,
        "start_epoch_step": s.epoch_step,
        "resumed": resume is not None,
        "parameters": sum(p.numel() for p in s.model.parameters()),
        "world_size": ctx.world_size,
        "training_workers": s.plan.active,
        "micro_batches_per_step": s.plan.accumulate,
        **s.data_info,
    }
    for cb in callbacks:
        cb.on_start(info)

    def on_log(record: dict[str, Any]) -> None:
        for cb in callbacks:
            cb.on_log(record)

    # The hooks elastic runs added are optional: a callback written before them (any object
    # with on_start/on_log/on_epoch_end/on_finish) keeps working.
    def on_checkpoint(record: dict[str, Any]) -> None:
        progress = progress_state(s)  # a collective, so on every rank before any callback
        for cb in callbacks:
            getattr(cb, "on_checkpoint", lambda r, st: None)(record, lambda: s.state(progress=progress))

    def checkpoint_wanted(record: dict[str, Any]) -> bool:
        # a list, not any(): every callback is asked (they may hold collectives)
        return any([getattr(cb, "wants_checkpoint", lambda r: False)(record) for cb in callbacks])

    while s.epoch < s.total_epochs:
        epoch = s.epoch
        if s.dynamic_bn is not None and s.epoch_step == 0:
            s.dynamic_bn.reset()
        t0 = time.time()
        metrics = train_one_epoch(
            s,
            log_every=cfg.train.log_every_iterations,
            on_log=on_log,
            on_checkpoint=on_checkpoint,
            checkpoint_every=cfg.checkpoint.every_iterations,
            checkpoint_wanted=checkpoint_wanted,
        )
        record = {"epoch": epoch, **metrics}
        if (epoch + 1) % cfg.train.eval_every_epochs == 0 or epoch + 1 == s.total_epochs:
            evaluate_epoch(s, record)
        record["epoch_time_s"] = time.time() - t0
        s.history.append({k: record[k] for k in ("epoch", "iteration", "top1_err") if k in record})
        # The epoch is done: a checkpoint from here resumes at the start of the next one.
        s.epoch, s.epoch_step = epoch + 1, 0
        s.progress = Progress.zeros(ctx.device)
        state = functools.partial(s.state)
        for cb in callbacks:
            cb.on_epoch_end(record, state)

    evaluated = [h for h in s.history if "top1_err" in h]
    summary = {
        "epochs": s.total_epochs,
        "iterations": s.iteration,
        "final_top1_err": evaluated[-1]["top1_err"] if evaluated else None,
        "best_top1_err": min(h["top1_err"] for h in evaluated) if evaluated else None,
        "best_epoch": min(evaluated, key=lambda h: h["top1_err"])["epoch"] if evaluated else None,
    }
    for cb in callbacks:
        cb.on_finish(summary, s.model)
    return summary
