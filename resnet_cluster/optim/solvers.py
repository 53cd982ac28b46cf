"""Solvers built from ``JobConfig.optim``: SGD in three momentum conventions, and the adaptive
solvers of gcr/torch-residual-networks' solver study (docs/references.md §4).

The lr set here is the schedule's starting point only: :class:`~resnet_cluster.optim.LRSchedule`
writes ``group["lr"]`` before every step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from resnet_cluster.config import OptimConfig

# Torch7 optim defaults (what gcr ran): rmsprop epsilon 1e-8, adagrad 1e-10, adadelta 1e-6.
DEFAULT_EPS = {"rmsprop": 1e-8, "adagrad": 1e-10, "adadelta": 1e-6}


class MomentumSGD(torch.optim.Optimizer):
    """SGD with L2 weight decay and momentum in the convention of PyTorch, Caffe or Torch7.

    With ``d = g + weight_decay * w`` (the decay is part of the gradient in all three):

    - ``pytorch``: ``v = m*v + d`` (``v = d`` on the first step), ``w -= lr*v``
    - ``caffe``:   ``v = m*v + lr*d`` (``v = 0`` before the first step), ``w -= v``
    - ``torch7``:  ``v = m*v + (1-m)*d`` (``v = d`` on the first step, as Torch7's
      optim.sgd with ``dampening = momentum``), ``w -= lr*v``

    Nesterov (pytorch, caffe): the step uses ``d + m*v`` (pytorch, times lr) or ``lr*d + m*v``
    (caffe) instead of ``v``. The conventions agree while lr is constant (caffe's v is lr times
    pytorch's) and differ at every lr change: caffe's buffer still carries the old lr, so after
    a /10 drop the first steps are larger than pytorch's. The momentum buffer is
    ``state[p]["momentum_buffer"]``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        style: str = "pytorch",
        nesterov: bool = False,
        foreach: bool | None = None,
    ) -> None:
        if style not in ("pytorch", "caffe", "torch7"):
            raise ValueError(f"momentum style {style!r}: choose pytorch, caffe or torch7")
        if nesterov and (momentum <= 0 or style == "torch7"):
            raise ValueError("nesterov needs momentum > 0 and style pytorch or caffe")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, style=style, nesterov=nesterov,
                        foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient.

        ``foreach`` (None: on when every parameter is on a GPU, as torch.optim decides): as
        multi-tensor ``torch._foreach_*`` ops, 4 operators per group and step instead of ~4 per
        parameter tensor (ResNet-152 has 467: 1,870 small kernel launches, each costing more
        than its work on a GPU; tests/test_gpu_path.py counts them). On a CPU the per-tensor
        loop is faster (each tensor goes through all its ops while in cache:
        benchmarks/RESULTS.md), so it stays the CPU's path.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            foreach = group.get("foreach")
            if foreach is None:
                foreach = all(p.device.type == "cuda" for p in params)
            (self._update_foreach if foreach else self._update_each)(group, params)
        return loss

    def _update_each(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
        style, nesterov = group["style"], group["nesterov"]
        for p in params:
            d = p.grad
            if wd:
                d = d.add(p, alpha=wd)
            if m == 0:
                p.add_(d, alpha=-lr)
                continue
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if style == "caffe":
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(m).add_(d, alpha=lr)
                p.sub_(buf if not nesterov else d.mul(lr).add_(buf, alpha=m))
                continue
            if buf is None:
                buf = state["momentum_buffer"] = d.detach().clone()
            else:
                buf.mul_(m).add_(d, alpha=(1.0 - m) if style == "torch7" else 1.0)
            p.add_(buf if not nesterov else d.add(buf, alpha=m), alpha=-lr)

    def _update_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
        style, nesterov = group["style"], group["nesterov"]
        grads = [p.grad for p in params]
        # d = g + wd * w: new tensors, so the gradients themselves are never changed.
        d = torch._foreach_add(grads, params, alpha=wd) if wd else grads
        if m == 0:
            torch._foreach_add_(params, d, alpha=-lr)
            return
        states = [self.state[p] for p in params]
        # First step of a parameter: caffe starts from v = 0 (so v = lr*d after it); pytorch and
        # torch7 take v = d and skip this step's m*v + ... update.
        fresh = {i for i, st in enumerate(states) if st.get("momentum_buffer") is None}
        for i in fresh:
            states[i]["momentum_buffer"] = (
                torch.zeros_like(params[i]) if style == "caffe" else d[i].detach().clone()
            )
        bufs = [st["momentum_buffer"] for st in states]
        if style == "caffe":
            torch._foreach_mul_(bufs, m)  # v = m*v + lr*d; w -= v (or lr*d + m*v: nesterov)
            torch._foreach_add_(bufs, d, alpha=lr)
            if nesterov:
                step = torch._foreach_mul(bufs, m)
                torch._foreach_add_(step, d, alpha=lr)
                torch._foreach_sub_(params, step)
            else:
                torch._foreach_sub_(params, bufs)
            return
        keep = [i for i in range(len(bufs)) if i not in fresh] if fresh else range(len(bufs))
        old, dd = [bufs[i] for i in keep], [d[i] for i in keep]
        if old:  # pytorch v = m*v + d; torch7 v = m*v + (1-m)*d
            torch._foreach_mul_(old, m)
            torch._foreach_add_(old, dd, alpha=(1.0 - m) if style == "torch7" else 1.0)
        if nesterov:  # w -= lr * (d + m*v)
            step = torch._foreach_add(d, bufs, alpha=m)
            torch._foreach_add_(params, step, alpha=-lr)
        else:
            torch._foreach_add_(params, bufs, alpha=-lr)


def _no_decay(name: str, param: nn.Parameter, owner: nn.Module) -> bool:
    return isinstance(owner, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) or (
        name.endswith("bias")
    )


def param_groups(model: nn.Module, weight_decay: float, decay_bn_and_bias: bool) -> list[dict]:
    """One group with every parameter, or two: decayed (conv/fc weights) and not decayed (BN
    gamma and beta, and every bias) when ``decay_bn_and_bias`` is false."""
    if decay_bn_and_bias or weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if _no_decay(name, p, module) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """The solver ``cfg.solver`` over ``model``'s parameters (``lr`` overrides ``cfg.lr``, e.g.
    after the linear scaling rule).

    ``sgd`` with ``momentum_style: pytorch`` (the default) is ``torch.optim.SGD`` itself (its
    fused/foreach kernels, identical updates); ``caffe`` and ``torch7`` are :class:`MomentumSGD`.
    ``rmsprop``, ``adagrad`` and ``adadelta`` are PyTorch's, whose updates equal Torch7's optim
    package that gcr ran: rmsprop ``ms = a*ms + (1-a)*g^2, w -= lr*g/(sqrt(ms)+eps)``; adagrad
    ``s += g^2, w -= lr*g/(sqrt(s)+eps)``; adadelta (Zeiler) with ``rho`` and ``eps``.
    """
    lr = cfg.lr if lr is None else lr
    groups = param_groups(model, cfg.weight_decay, cfg.decay_bn_and_bias)
    eps = cfg.eps if cfg.eps is not None else DEFAULT_EPS.get(cfg.solver)
    if cfg.solver == "sgd":
        if cfg.momentum_style == "pytorch":
            return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        return MomentumSGD(groups, lr=lr, momentum=cfg.momentum, style=cfg.momentum_style, nesterov=cfg.nesterov)
    if cfg.solver == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=cfg.alpha, eps=eps)
    if cfg.solver == "adagrad":
        return torch.optim.Adagrad(groups, lr=lr, eps=eps)
    if cfg.solver == "adadelta":
        return torch.optim.Adadelta(groups, lr=lr, rho=cfg.rho, eps=eps)
    raise AssertionError(f"unhandled solver {cfg.solver}")  # the config refuses others
