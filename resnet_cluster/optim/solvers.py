"""Solvers built from ``JobConfig.optim``."""

from __future__ import annotations

import torch
from torch import nn

from resnet_cluster.config import OptimConfig


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum and L2 weight decay on every parameter, as in the paper (Section 3.4:
    weight decay 1e-4, momentum 0.9). PyTorch's momentum convention: v = m*v + g, w -= lr*v.
    The lr set here is a placeholder: :class:`LRSchedule` sets it before every step."""
    if cfg.solver == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    raise AssertionError(f"unhandled solver {cfg.solver}")  # the config refuses others
