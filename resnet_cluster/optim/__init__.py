"""Solvers and learning-rate schedules."""

from resnet_cluster.optim.schedules import LRSchedule, scaled_lr
from resnet_cluster.optim.solvers import MomentumSGD, build_optimizer, param_groups

__all__ = ["LRSchedule", "MomentumSGD", "build_optimizer", "param_groups", "scaled_lr"]
