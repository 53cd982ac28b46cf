"""Batch-norm statistics policies: dynamic momentum, precise BN, SyncBatchNorm.

Convention throughout (PyTorch's and Torch7's): ``momentum`` is the weight of the new batch,
``running = (1 - momentum) * running + momentum * batch``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from resnet_cluster.engine.context import WorkerContext

_BN = nn.modules.batchnorm._BatchNorm


def bn_layers(model: nn.Module) -> list[_BN]:
    return [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    for m in bn_layers(model):
        m.momentum = momentum


def dynamic_momentum(batches_seen_this_epoch: int) -> float:
    """gcr's "dynamic" policy: 1/(1+n) with n the batches already seen this epoch, so after
    k batches the running stats are the plain average of those k batch statistics."""
    return 1.0 / (1.0 + batches_seen_this_epoch)


class DynamicMomentum:
    """``bn.policy: dynamic`` with the batch count on the host: no BN layer reads anything back
    from the device, and a compiled model stays one graph.

    PyTorch's own cumulative average (``momentum=None``) computes ``1/num_batches_tracked`` with
    a float() of a device tensor in every BN layer's forward: a host sync per layer per step on
    a GPU, and a torch.compile graph break each (16 graphs for ResNet-20 instead of 1). Here
    every BN layer has the constant momentum 1 (its running stats become the batch's), and hooks
    on the whole model, outside any compiled graph, average them in: before the forward the
    running stats are saved, after it ``running = w * batch + (1 - w) * saved`` with the float
    ``w = 1/(1+n)``, n counted here. Two multi-tensor ops per forward for all layers together.
    Each training forward counts as one batch; forwards in eval mode are not counted.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = bn_layers(model)
        self.n = 0  # batches seen this epoch, on the host
        self._scratch: list[torch.Tensor] = []
        set_bn_momentum(model, 1.0)
        # torch.compiler.disable: when model.compile() compiles the module's call (hooks
        # included), these run eagerly beside the graph instead of being traced with n.
        self._handles = [
            model.register_forward_pre_hook(torch.compiler.disable(self._save)),
            model.register_forward_hook(torch.compiler.disable(self._average)),
        ]

    def _stats(self) -> list[torch.Tensor]:
        # Read every time: model.to(device) replaces buffer tensors. ``.data``: the same memory
        # without autograd's version counter, which the update after the forward would bump
        # while the graph still holds the buffers (a training-mode backward does not read them).
        return [t.data for m in self.layers for t in (m.running_mean, m.running_var)]

    def _counts(self, module: nn.Module) -> bool:
        # Eval forwards do not count, nor do forwards whose BN layers keep no running stats (an
        # elastic run's later micro-batches of a step: engine.loop.accumulate_step).
        return module.training and bool(self.layers) and self.layers[0].track_running_stats

    def _save(self, module: nn.Module, args) -> None:
        if not self._counts(module):
            return
        stats = self._stats()
        if len(self._scratch) != len(stats) or self._scratch[0].device != stats[0].device:
            self._scratch = [torch.empty_like(t) for t in stats]
        torch._foreach_copy_(self._scratch, stats)

    def _average(self, module: nn.Module, args, output) -> None:
        if not self._counts(module):
            return
        w = dynamic_momentum(self.n)
        if w < 1.0:  # n = 0: the running stats are this batch's, as they should be
            # lerp_(a, b, t) = a + t * (b - a): w * batch + (1 - w) * saved
            torch._foreach_lerp_(self._stats(), self._scratch, 1.0 - w)
        self.n += 1

    def reset(self) -> None:
        """A new epoch: n = 0 (num_batches_tracked too, which then counts this epoch)."""
        self.n = 0
        for m in self.layers:
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.zero_()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """Every BatchNorm*d becomes ``nn.SyncBatchNorm`` (statistics over the global batch of all
    DDP ranks); parameters and buffers keep their names, so state dicts stay interchangeable."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


@torch.no_grad()
def precise_bn(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, object]],
    ctx: WorkerContext,
    num_batches: int,
    *,
    autocast=None,
    channels_last: bool = False,
) -> int:
    """Replace every BN layer's running mean and variance by the exact statistics of its input
    over ``num_batches`` batches of ``batches`` on every rank together.

    The forward passes run in train mode, as during training, so each layer sees the inputs it
    sees while training (earlier layers normalise with batch statistics). For each channel the
    sums of x and x^2 over all N pixels of all images on all ranks are accumulated in float64
    and all-reduced; then ``mean = S1/N`` and ``var = (S2 - S1^2/N) / (N - 1)`` (unbiased, as
    PyTorch's running_var). This is the average over one large batch that the released
    ImageNet models used, not a moving average. Every rank must call it with the same
    ``num_batches`` (the collectives are one all-reduce per call). Returns the batches used on
    this rank. ``model`` must be the bare module (no DDP wrapper).
    """
    layers = bn_layers(model)
    if not layers or num_batches <= 0:
        return 0
    dev = ctx.device
    sums = [torch.zeros(2, m.num_features, dtype=torch.float64, device=dev) for m in layers]
    counts = torch.zeros(len(layers), dtype=torch.float64, device=dev)
    hooks = []

    def make_hook(i: int):
        def hook(module, args):
            x = args[0].detach().to(torch.float64)
            dims = [d for d in range(x.dim()) if d != 1]
            sums[i][0] += x.sum(dims)
            sums[i][1] += (x * x).sum(dims)
            counts[i] += x.numel() / x.shape[1]

        return hook

    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in layers]
    was_training = model.training
    used = 0
    try:
        for i, m in enumerate(layers):
            hooks.append(m.register_forward_pre_hook(make_hook(i)))
            m.momentum = 0.0  # the forward passes must not move the running stats themselves
        model.train()
        for x, _ in batches:
            if used >= num_batches:
                break
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if autocast is not None:
                with autocast():
                    model(x)
            else:
                model(x)
            used += 1
    finally:
        for h in hooks:
            h.remove()
        for m, (mom, nbt) in zip(layers, saved):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
        model.train(was_training)
    flat = torch.cat([torch.cat([s.flatten() for s in sums]), counts])
    flat = ctx.all_reduce_sum(flat)
    offset = 0
    for i, m in enumerate(layers):
        c = m.num_features
        s1, s2 = flat[offset : offset + c], flat[offset + c : offset + 2 * c]
        offset += 2 * c
        n = flat[-len(layers) + i].item()
        if n < 2:
            continue
        mean = s1 / n
        var = (s2 - s1 * s1 / n) / (n - 1)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.clamp_min(0).to(m.running_var.dtype))
    return used
