"""Datasets: prepare CIFAR-10 and ImageNet as Parquet shards on any fsspec URI, and stream them.

- :mod:`.cifar`: read the official CIFAR-10 archive, download it, ``prepare_cifar10``.
- :mod:`.imagenet`: ILSVRC2012 folders -> shards, ``prepare_imagenet``.
- :mod:`.shards`: the shard format shared by both (manifest, reading, writing, epoch order).
- :mod:`.streaming`: ``ShardBatches``, the one reader of prepared datasets.
- :mod:`.synthetic`: learnable CIFAR-shaped data for smoke jobs and tests.
- :mod:`.loaders`: ``build_loaders_for`` (the loop's entry point) and ``ImageBatches``
  (in-memory batches of synthetic data).
"""

from resnet_cluster.data.cifar import (
    OFFICIAL_MD5,
    OFFICIAL_URL,
    CifarArrays,
    download_cifar10,
    prepare_cifar10,
    read_cifar10_archive,
)
from resnet_cluster.data.loaders import (
    ImageBatches,
    build_loaders_for,
    build_synthetic_loaders,
    random_crop_flip,
)
from resnet_cluster.data.synthetic import make_synthetic

__all__ = [
    "OFFICIAL_MD5",
    "OFFICIAL_URL",
    "CifarArrays",
    "ImageBatches",
    "build_loaders_for",
    "build_synthetic_loaders",
    "download_cifar10",
    "make_synthetic",
    "prepare_cifar10",
    "random_crop_flip",
    "read_cifar10_archive",
]
