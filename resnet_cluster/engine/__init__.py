"""The training loop: plain PyTorch, callable without Ray."""

from resnet_cluster.engine.context import WorkerContext
from resnet_cluster.engine.loop import Callback, evaluate, fit, train_one_epoch

__all__ = ["Callback", "WorkerContext", "evaluate", "fit", "train_one_epoch"]
