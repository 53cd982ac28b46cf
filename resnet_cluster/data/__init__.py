"""Datasets: prepare CIFAR-10 as Parquet on any fsspec URI, load it, and serve sharded batches.

- :mod:`.cifar`: read the official archive, download it, ``prepare_cifar10``.
- :mod:`.synthetic`: learnable CIFAR-shaped data for smoke jobs and tests.
- :mod:`.loaders`: ``load_cifar10``, ``ImageBatches`` (rank sharding, paper augmentation),
  ``build_loaders``.
"""

from resnet_cluster.data.cifar import (
    OFFICIAL_MD5,
    OFFICIAL_URL,
    CifarArrays,
    download_cifar10,
    prepare_cifar10,
    read_cifar10_archive,
)
from resnet_cluster.data.loaders import ImageBatches, build_loaders, load_cifar10, random_crop_flip
from resnet_cluster.data.synthetic import make_synthetic

__all__ = [
    "OFFICIAL_MD5",
    "OFFICIAL_URL",
    "CifarArrays",
    "ImageBatches",
    "build_loaders",
    "download_cifar10",
    "load_cifar10",
    "make_synthetic",
    "prepare_cifar10",
    "random_crop_flip",
    "read_cifar10_archive",
]
