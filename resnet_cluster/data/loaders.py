"""The loop's entry point to the data (:func:`build_loaders_for`), and synthetic batches.

Prepared datasets (CIFAR-10 and ImageNet, both in the shard format) stream through
:class:`resnet_cluster.data.streaming.ShardBatches`. Synthetic CIFAR-shaped data for smoke jobs
and benchmarks is generated in memory and served by :class:`ImageBatches`: there is nothing to
read, so there is no DataLoader and no worker processes. Sharding, shuffling and augmentation
are all decided by seeded ``torch.Generator``s, so a run is reproducible for a given
(seed, world_size) and every rank agrees on the epoch's permutation without talking.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from resnet_cluster.data.transforms import CIFAR_PAD, crop_flip
from resnet_cluster.datasets import DATASETS as _REGISTRY
from resnet_cluster.datasets import names
from resnet_cluster.errors import DataError

DATASETS = names()
AUGMENTS = ("paper", "none")
PAD = CIFAR_PAD


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = PAD, *,
                     channels_last: bool = False) -> torch.Tensor:
    """Paper §4.2 augmentation for a batch ``x`` [b, c, h, w]: zero-pad ``pad`` pixels on each
    side, take a random h x w crop, and flip it horizontally with probability 1/2.

    Vectorised: one gather with per-image row/column index grids, no per-image loop. Random
    draws come from ``generator`` (a CPU generator) in a fixed order: b crop offsets (y, x)
    then b flip coins, so results are reproducible for a seeded generator on any device.
    ``x`` is expected already normalised, so zero padding equals padding with the mean image.
    """
    b = x.shape[0]
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)  # [b, (dy, dx)]
    flip = torch.rand(b, generator=generator) < 0.5
    return crop_flip(x, offsets, flip, pad, channels_last=channels_last)  # copied without a sync


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (e.g. seed, epoch, rank), well mixed."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


_PERM, _AUG = 0, 1  # stream tags, so the permutation and augmentation streams never coincide


class ImageBatches:
    """Iterable over (x float32 [b, 3, H, W], y int64 [b]) batches for one rank; with
    ``channels_last`` x has NHWC strides (the model's memory format, no copy in the loop).

    ``x = (image - mean) / 255``: per-pixel mean subtraction as in the paper; the /255 only
    rescales. ``batch_size`` is per worker.

    Train mode: each epoch draws one permutation from a generator seeded by (seed, epoch),
    identical on every rank; rank r takes ``perm[r::world_size]`` cut to ``N // world_size`` so
    all ranks run the same number of steps, and the last partial batch is dropped. With
    ``augment`` the paper's pad-crop-flip is applied, drawn from (seed, epoch, rank).

    Eval mode: no shuffle, no augmentation; rank r takes ``indices[r::world_size]`` and keeps
    the last partial batch, so the ranks together see every image exactly once.

    Call :meth:`set_epoch` before iterating each epoch.
    """

    def __init__(
        self,
        images_uint8: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        train: bool,
        augment: bool,
        mean: torch.Tensor | np.ndarray,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
    ) -> None:
        images = torch.as_tensor(images_uint8)
        labels = torch.as_tensor(labels).to(torch.int64)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images must be uint8 [N, C, H, W] with one label each; got {images.dtype} "
                f"{list(images.shape)} and {list(labels.shape)} labels"
            )
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.train, self.augment = seed, train, augment and train
        self.device = torch.device(device)
        mean = torch.as_tensor(mean, dtype=torch.float32)
        if mean.shape != images.shape[1:]:
            raise ValueError(f"mean has shape {list(mean.shape)}, images {list(images.shape[1:])}")
        self.mean = mean.to(self.device)
        # channels_last: keep the images NHWC, so a batch is channels_last after one pass
        self.channels_last = channels_last
        if channels_last:
            self.images = images.permute(0, 2, 3, 1).contiguous()
        self.epoch = 0
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        n = images.shape[0]
        if train and n // world_size < batch_size:
            raise DataError(
                f"the training set has {n} images, fewer than one batch of {batch_size} per "
                f"worker on each of {world_size} workers. Lower train.batch_size or "
                "scaling.workers, or use a larger dataset."
            )

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """This rank's image indices for the current epoch, in the order they are served."""
        n = self.images.shape[0]
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        perm = torch.randperm(n, generator=_generator(self.seed, self.epoch, _PERM))
        return perm[self.rank :: self.world_size][: n // self.world_size]

    def __len__(self) -> int:
        n = self.images.shape[0]
        if self.train:
            return (n // self.world_size) // self.batch_size
        per_rank = len(range(self.rank, n, self.world_size))
        return -(-per_rank // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Images this rank serves per epoch (after dropping the last partial train batch)."""
        if self.train:
            return len(self) * self.batch_size
        return len(range(self.rank, self.images.shape[0], self.world_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        aug_gen = (
            _generator(self.seed, self.epoch, self.rank, _AUG) if self.augment else None
        )
        non_blocking = self.device.type == "cuda"
        for i in range(len(self)):
            sel = idx[i * self.batch_size : (i + 1) * self.batch_size]
            xb, yb = self.images[sel], self.labels[sel]
            if self._pin:
                xb, yb = xb.pin_memory(), yb.pin_memory()
            # Move uint8 (4x fewer bytes than float), then normalise and augment on the device.
            xb = xb.to(self.device, non_blocking=non_blocking)
            yb = yb.to(self.device, non_blocking=non_blocking)
            if not self.channels_last:
                x = (xb.float() - self.mean) / 255.0
            else:  # NHWC storage: the permuted float batch is already channels_last
                x = xb.permute(0, 3, 1, 2).float().sub_(self.mean).div_(255.0)
            if aug_gen is not None:
                x = random_crop_flip(x, aug_gen, channels_last=self.channels_last)
            yield x, yb


def build_synthetic_loaders(
    *,
    augment: str,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    synthetic_train: int = 2560,
    synthetic_test: int = 512,
    device: str | torch.device = "cpu",
    size: int = 32,
    channels_last: bool = False,
) -> tuple[ImageBatches, ImageBatches, dict]:
    """This rank's train and test :class:`ImageBatches` of synthetic data, ``size`` x ``size``
    images (32: CIFAR-shaped; 224: ImageNet-shaped, for GPU benchmarks).

    :func:`make_synthetic` with the fixed data seed 0, so runs with different seeds see the same
    data. ``augment``: "paper" (pad 4, random crop, flip) or "none". Returns (train, test, info)
    with info = {num_train, num_test, classes}.
    """
    from resnet_cluster.data.synthetic import make_synthetic

    if augment not in AUGMENTS:
        raise DataError(f"data.augment is {augment!r}; choose one of {list(AUGMENTS)}.")
    arrays = make_synthetic(synthetic_train, synthetic_test, seed=0, size=size)
    mean = arrays.train_x.mean(axis=0, dtype=np.float64).astype(np.float32)  # no float copy
    common = dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                  mean=torch.from_numpy(mean), device=device, channels_last=channels_last)
    train = ImageBatches(torch.from_numpy(arrays.train_x), torch.from_numpy(arrays.train_y),
                         train=True, augment=augment == "paper", **common)
    test = ImageBatches(torch.from_numpy(arrays.test_x), torch.from_numpy(arrays.test_y),
                        train=False, augment=False, **common)
    info = {"num_train": len(arrays.train_x), "num_test": len(arrays.test_x),
            "classes": list(arrays.classes)}
    return train, test, info


def build_loaders_for(cfg, *, rank: int, world_size: int, device: str | torch.device = "cpu"):
    """The loop's entry point: this rank's (train, test, info) for a JobConfig.

    The training loop calls only this, so the data package decides which job keys it reads.
    ``cifar10`` and ``imagenet`` stream shards from ``data.root``
    (:func:`resnet_cluster.data.streaming.build_shard_loaders`); ``synthetic`` is generated.
    """
    dataset = _REGISTRY.get(cfg.data.dataset)
    if dataset is None:
        raise DataError(f"data.dataset is {cfg.data.dataset!r}; choose one of {list(DATASETS)}.")
    # Config accepts every augment and protocol; CIFAR-shaped data (32x32) takes fewer.
    if cfg.data.augment not in dataset.augments:
        raise DataError(
            "data.augment inception is the ImageNet random-resized crop; CIFAR-10 and "
            "synthetic data use paper (pad 4, random crop, flip) or none."
        )
    if cfg.eval.protocol not in dataset.eval_protocols:
        raise DataError(
            f"eval.protocol {cfg.eval.protocol!r} needs ImageNet-sized images; CIFAR is "
            "tested on the single original 32x32 view. Use eval.protocol: 1crop (the default)."
        )
    if dataset.reader == "shards":
        from resnet_cluster.data.streaming import build_shard_loaders

        return build_shard_loaders(cfg, rank=rank, world_size=world_size, device=device)
    return build_synthetic_loaders(
        augment=cfg.data.augment,
        batch_size=cfg.per_worker_batch,
        rank=rank,
        world_size=world_size,
        seed=cfg.seed,
        synthetic_train=cfg.data.synthetic_train,
        synthetic_test=cfg.data.synthetic_test,
        device=device,
        size=cfg.data.synthetic_size,
        channels_last=cfg.precision.channels_last,
    )
