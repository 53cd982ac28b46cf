"""Models: a registry of builders by name (``model.arch``), the paper's blocks and nets.

    >>> from resnet_cluster import models
    >>> net = models.build("cifar_resnet20", shortcut="A")
    >>> net = models.build("resnet50", bottleneck_stride="v1.5")   # torchvision's layout
    >>> net = models.load("runs-store/runs/<run_id>/model.pt")     # or a run id / run URI
"""

from resnet_cluster.models import cifar, imagenet  # noqa: F401  (fill the registry on import)
from resnet_cluster.models.files import load
from resnet_cluster.models.registry import ModelInfo, available, build, info, register
from resnet_cluster.models.summary import count_macs, stage_table

__all__ = ["ModelInfo", "available", "build", "count_macs", "info", "load", "register", "stage_table"]
