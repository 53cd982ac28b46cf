"""Models: a registry of builders by name (``model.arch``), the paper's blocks and nets.

    >>> from resnet_cluster import models
    >>> net = models.build("cifar_resnet20", shortcut="A")
"""

from resnet_cluster.models import cifar  # noqa: F401  (fills the registry on import)
from resnet_cluster.models.registry import ModelInfo, available, build, register

__all__ = ["ModelInfo", "available", "build", "register"]
