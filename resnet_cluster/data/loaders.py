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
    offsets, flip = random_crop_draws(x.shape[0], generator, pad)
    return crop_flip(x, offsets, flip, pad, channels_last=channels_last)  # copied without a sync


def random_crop_draws(b: int, generator: torch.Generator, pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers :func:`random_crop_flip` takes for ``b`` images, in its order."""
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)  # [b, (dy, dx)]
    flip = torch.rand(b, generator=generator) < 0.5
    return offsets, flip


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

    ``accumulate`` m > 1 (train only; elastic runs, see ``engine.accumulation``): the epoch is
    laid out for ``world_size * m`` ranks ("slots"), and this rank serves slots ``rank * m`` to
    ``rank * m + m - 1`` together: batch i is the concatenation of those slots' i-th batches
    (m * batch_size images), each augmented from its slot's own stream, so every slot's images
    and augmentations are those of a run with one rank per slot.

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
        accumulate: int = 1,
    ) -> None:
        images = torch.as_tensor(images_uint8)
        labels = torch.as_tensor(labels).to(torch.int64)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images must be uint8 [N, C, H, W] with one label each; got {images.dtype} "
                f"{list(images.shape)} and {list(labels.shape)} labels"
            )
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or accumulate < 1:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                             f"accumulate={accumulate}")
        if accumulate > 1 and not train:
            raise ValueError("accumulate is for training batches")
        # Slots: the ranks of the layout this epoch is cut for (see the class docstring).
        self.slots = [rank * accumulate + j for j in range(accumulate)]
        self.slot_world = world_size * accumulate
        self.start = 0
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
        if train and n // self.slot_world < batch_size:
            raise DataError(
                f"the training set has {n} images, fewer than one batch of {batch_size} per "
                f"worker on each of {self.slot_world} workers. Lower train.batch_size or "
                "scaling.workers, or use a larger dataset."
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch whose permutation and augmentation the next iteration uses, and
        the batch it starts at (``start`` > 0: a run resumed mid-epoch skips exactly the
        batches it has trained on)."""
        self.epoch, self.start = int(epoch), int(start)

    def _slot_indices(self, perm: torch.Tensor, slot: int) -> torch.Tensor:
        n = self.images.shape[0]
        return perm[slot :: self.slot_world][: n // self.slot_world]

    def indices(self) -> torch.Tensor:
        """This rank's image indices for the current epoch, in the order they are served
        (from batch 0; with ``accumulate``, batch by batch the slots' images in slot order)."""
        n = self.images.shape[0]
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        perm = torch.randperm(n, generator=_generator(self.seed, self.epoch, _PERM))
        if len(self.slots) == 1:
            return self._slot_indices(perm, self.slots[0])
        parts = [self._slot_indices(perm, k)[: len(self) * self.batch_size] for k in self.slots]
        b = self.batch_size
        return torch.stack([p.view(-1, b) for p in parts], dim=1).reshape(-1)

    def __len__(self) -> int:
        n = self.images.shape[0]
        if self.train:
            return (n // self.slot_world) // self.batch_size
        per_rank = len(range(self.rank, n, self.world_size))
        return -(-per_rank // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Images this rank serves per epoch (after dropping the last partial train batch)."""
        if self.train:
            return len(self) * self.batch_size * len(self.slots)
        return len(range(self.rank, self.images.shape[0], self.world_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        # One augmentation stream per slot, seeded as that slot's rank would seed it.
        aug_gens = [_generator(self.seed, self.epoch, k, _AUG) for k in self.slots] if self.augment else []
        for _ in range(self.start):  # the draws of the batches a resumed epoch skips
            for g in aug_gens:
                random_crop_draws(self.batch_size, g)
        non_blocking = self.device.type == "cuda"
        per_batch = self.batch_size * len(self.slots)
        for i in range(self.start, len(self)):
            sel = idx[i * per_batch : (i + 1) * per_batch]
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
            if len(aug_gens) == 1:
                x = random_crop_flip(x, aug_gens[0], channels_last=self.channels_last)
            elif aug_gens:
                parts = zip(x.split(self.batch_size), aug_gens)
                x = torch.cat([random_crop_flip(part, g, channels_last=self.channels_last) for part, g in parts])
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
    train_share: tuple[int, int, int] | None = None,
) -> tuple[ImageBatches, ImageBatches, dict]:
    """This rank's train and test :class:`ImageBatches` of synthetic data, ``size`` x ``size``
    images (32: CIFAR-shaped; 224: ImageNet-shaped, for GPU benchmarks).

    :func:`make_synthetic` with the fixed data seed 0, so runs with different seeds see the same
    data. ``augment``: "paper" (pad 4, random crop, flip) or "none". Returns (train, test, info)
    with info = {num_train, num_test, classes}. ``train_share`` (rank, world_size, accumulate)
    of the training batches when they differ from (rank, world_size, 1); see
    :func:`build_loaders_for`.
    """
    from resnet_cluster.data.synthetic import make_synthetic

    if augment not in AUGMENTS:
        raise DataError(f"data.augment is {augment!r}; choose one of {list(AUGMENTS)}.")
    arrays = make_synthetic(synthetic_train, synthetic_test, seed=0, size=size)
    mean = arrays.train_x.mean(axis=0, dtype=np.float64).astype(np.float32)  # no float copy
    common = dict(batch_size=batch_size, seed=seed, mean=torch.from_numpy(mean), device=device,
                  channels_last=channels_last)
    t_rank, t_world, accumulate = train_share or (rank, world_size, 1)
    train = ImageBatches(torch.from_numpy(arrays.train_x), torch.from_numpy(arrays.train_y),
                         train=True, augment=augment == "paper", rank=t_rank, world_size=t_world,
                         accumulate=accumulate, **common)
    test = ImageBatches(torch.from_numpy(arrays.test_x), torch.from_numpy(arrays.test_y),
                        train=False, augment=False, rank=rank, world_size=world_size, **common)
    info = {"num_train": len(arrays.train_x), "num_test": len(arrays.test_x),
            "classes": list(arrays.classes)}
    return train, test, info


def build_loaders_for(cfg, *, rank: int, world_size: int, device: str | torch.device = "cpu",
                      train_share: tuple[int, int, int] | None = None):
    """The loop's entry point: this rank's (train, test, info) for a JobConfig.

    ``train_share`` = (r, w, m): the training batches are those of slots r*m .. r*m+m-1 of the
    epoch laid out for w*m ranks, served together (elastic runs: see ``engine.accumulation``);
    default (rank, world_size, 1). The test batches are always rank's share of world_size.

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

        return build_shard_loaders(cfg, rank=rank, world_size=world_size, device=device,
                                   train_share=train_share)
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
        train_share=train_share,
    )
