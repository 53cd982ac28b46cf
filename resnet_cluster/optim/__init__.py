"""Solvers and learning-rate schedules."""

from resnet_cluster.optim.schedules import LRSchedule
from resnet_cluster.optim.solvers import build_optimizer

__all__ = ["LRSchedule", "build_optimizer"]
