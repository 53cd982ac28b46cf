"""Stream rank-sharded, augmented ImageNet batches from shards through DataLoader workers.

Per epoch and rank (:class:`ShardBatches`):

1. :func:`~resnet_cluster.data.shards.epoch_order` gives the epoch's global order, the same on
   every rank (seeded from ``seed`` and the epoch); :func:`rank_slice` takes this rank's
   contiguous part, so a rank reads only its own shards.
2. The part is cut into batches; DataLoader worker ``w`` of ``W`` (``data.loader_workers``)
   builds a contiguous block of them, so each shard is fetched by one worker (two at a block's
   edge), and the DataLoader serves the workers' batches round-robin.
3. A worker fetches each shard whole when first needed (the next one is read ahead on a
   thread, which hides S3 latency), decodes and augments each image in
   :mod:`resnet_cluster.data.transforms`, and sends uint8 NHWC plus the per-image lighting shift.
4. The main process pins the batch (CUDA), copies it to the device as uint8, and there converts
   to float, subtracts the mean and adds the lighting: ``x = (img - mean) / 255 + shift``.

Each image's random crop, flip and lighting are drawn from a generator seeded by
(seed, epoch, image id), so they do not depend on the rank, the number of ranks or workers,
or the serving order. The order in which one rank sees its batches does depend on the worker
count (the round-robin), the set does not.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Iterator

import numpy as np
import torch

from resnet_cluster.data import transforms as T
from resnet_cluster.data.shards import Split, epoch_order, locate, rank_slice, read_shard, url_to_fs
from resnet_cluster.errors import DataError

AUGMENTS = ("paper", "inception", "none")
VIEWS = ("train", "1crop", "10crop", "multiscale")
_AUG_TAG = 7  # stream tag separating per-image augmentation draws from the shuffle streams


class _ShardCache:
    """The shards one worker needs, fetched on first use with one read-ahead, freed after last."""

    def __init__(self, split: Split, verify: bool, sequence: list[int]) -> None:
        self.split, self.verify = split, verify
        self._fs = self._base = None
        self._tables: dict[int, object] = {}
        self._order = list(dict.fromkeys(sequence))  # shards in first-use order
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._pending: dict[int, concurrent.futures.Future] = {}

    def _fetch(self, shard: int):
        if self._fs is None:  # created in the worker process: fsspec instances are not fork-safe
            self._fs, self._base = url_to_fs(self.split.root)
        return read_shard(self._fs, self._base, self.split, shard, verify=self.verify)

    def get(self, shard: int):
        if shard not in self._tables:
            fut = self._pending.pop(shard, None)
            table = fut.result() if fut is not None else self._fetch(shard)
            self._tables[shard] = (table.column("image").combine_chunks(),
                                   table.column("label").to_numpy())
            pos = self._order.index(shard)
            if pos + 1 < len(self._order):
                nxt = self._order[pos + 1]
                if nxt not in self._tables and nxt not in self._pending:
                    self._pending[nxt] = self._pool.submit(self._fetch, nxt)
        return self._tables[shard]

    def release(self, shard: int) -> None:
        self._tables.pop(shard, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Plan:
    """What one rank serves in one epoch: batches of global ids, and how to build them."""

    def __init__(self, loader: ShardBatches) -> None:
        self.loader = loader
        ids = rank_slice(
            epoch_order(loader.split, seed=loader.seed, epoch=loader.epoch, shuffle=loader.train,
                        shuffle_shards=loader.shuffle_shards),
            rank=loader.rank, world_size=loader.world_size, batch_size=loader.batch_size,
            train=loader.train)
        b = loader.batch_size
        self.batches = [ids[i:i + b] for i in range(0, len(ids), b)]


class _WorkerStream(torch.utils.data.IterableDataset):
    """Builds a contiguous block of the epoch's batches in each DataLoader worker."""

    def __init__(self, loader: ShardBatches, batches: list[np.ndarray]) -> None:
        self.loader, self.batches = loader, batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        n = len(self.batches)
        mine = self.batches[w * n // nw:(w + 1) * n // nw]
        yield from self.loader._build_batches(mine)


class ShardBatches:
    """Iterable over this rank's (x, y) batches of a sharded split; ``len()`` batches per epoch.

    ``view``: ``train`` (``augment`` paper | inception | none), ``1crop`` -> x [B, 3, 224, 224],
    ``10crop`` -> x [B, 10, 3, 224, 224], ``multiscale`` -> x a list of [B, 3, S, S'] tensors,
    one per shorter side in (224, 256, 384, 480, 640) (use batch_size 1: sizes differ between
    images). ``augment: none`` trains on the 1-crop view. y is int64 [B].
    """

    def __init__(self, split: Split, *, batch_size: int, rank: int, world_size: int, seed: int,
                 train: bool, view: str = "train", augment: str = "paper",
                 mean: np.ndarray, eigval: np.ndarray, eigvec: np.ndarray,
                 lighting_std: float = 0.1, loader_workers: int = 0, prefetch_batches: int = 2,
                 shuffle_shards: int = 2, verify: bool = True,
                 device: str | torch.device = "cpu") -> None:
        if augment not in AUGMENTS:
            raise DataError(f"data.augment is {augment!r}; choose one of {list(AUGMENTS)}.")
        if view not in VIEWS:
            raise ValueError(f"view {view!r} not in {VIEWS}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.split = split
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.train, self.view, self.augment = train, view, augment
        self.lighting_std = lighting_std if train and augment != "none" else 0.0
        self.eigval = np.asarray(eigval, np.float64)
        self.eigvec = np.asarray(eigvec, np.float64)
        self.loader_workers, self.prefetch_batches = loader_workers, prefetch_batches
        self.shuffle_shards, self.verify = shuffle_shards, verify
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.mean = torch.as_tensor(np.asarray(mean, np.float32)).view(1, 3, 1, 1).to(self.device)
        self.epoch = 0
        self.yield_ids = False  # when True, batches are (x, y, ids): for checks and tests
        if train and split.num_images // world_size < batch_size:
            raise DataError(
                f"the training split at {split.root} has {split.num_images} images, fewer than "
                f"one batch of {batch_size} per worker on each of {world_size} workers. Lower "
                "train.batch_size or scaling.workers, or prepare more images."
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def plan(self) -> list[np.ndarray]:
        """This rank's batches of global image ids for the current epoch."""
        return _Plan(self).batches

    def __len__(self) -> int:
        n = self.split.num_images
        if self.train:
            return (n // self.world_size) // self.batch_size
        per = (self.rank + 1) * n // self.world_size - self.rank * n // self.world_size
        return -(-per // self.batch_size)

    # ---- runs in the DataLoader workers (or in-process with loader_workers: 0) ------------

    def _one(self, data: bytes, gid: int):
        if self.view == "train" and self.augment != "none":
            rng = np.random.default_rng([self.seed, self.epoch, _AUG_TAG, int(gid)])
            fn = T.paper_train if self.augment == "paper" else T.inception_train
            img = fn(data, rng)
            return img, T.lighting_shift(rng, self.eigval, self.eigvec, self.lighting_std)
        if self.view in ("train", "1crop"):
            return T.center_crop(data), None
        if self.view == "10crop":
            return T.ten_crop(data), None
        return T.multiscale(data), None

    def _build_batches(self, batches: list[np.ndarray]):
        where = [locate(self.split, ids) for ids in batches]
        sequence = [int(s) for shards, _ in where for s in shards]
        last_use = {s: i for i, (shards, _) in enumerate(where) for s in shards}
        cache = _ShardCache(self.split, self.verify, sequence)
        try:
            for i, (ids, (shards, rows)) in enumerate(zip(batches, where)):
                images, shifts, labels = [], [], np.empty(len(ids), np.int64)
                for j, (gid, s, r) in enumerate(zip(ids, shards, rows)):
                    col, lab = cache.get(int(s))
                    img, shift = self._one(col[int(r)].as_py(), int(gid))
                    images.append(img)
                    shifts.append(shift)
                    labels[j] = lab[r]
                for s in set(shards.tolist()):
                    if last_use[s] == i:
                        cache.release(s)
                if self.view == "multiscale":
                    x = [torch.from_numpy(np.stack([im[k] for im in images]))
                         for k in range(len(images[0]))]
                else:
                    x = torch.from_numpy(np.stack(images))
                shift = torch.from_numpy(np.stack(shifts)) if shifts[0] is not None else None
                yield x, torch.from_numpy(labels), shift, torch.from_numpy(np.asarray(ids))
        finally:
            cache.close()

    # ---- runs in the training process -----------------------------------------------------

    def _raw(self) -> Iterator:
        batches = _Plan(self).batches
        if self.loader_workers == 0:
            yield from self._build_batches(batches)
            return
        workers = min(self.loader_workers, max(1, len(batches)))
        dl = torch.utils.data.DataLoader(
            _WorkerStream(self, batches), batch_size=None, num_workers=workers,
            prefetch_factor=self.prefetch_batches, pin_memory=self._pin,
            # fork is the Linux default; forkserver/spawn would re-import torch per epoch.
            multiprocessing_context="fork" if os.name == "posix" else None)
        yield from dl

    def _finish(self, xb: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        nb = self.device.type == "cuda"
        if self._pin and not xb.is_pinned():
            xb = xb.pin_memory()
        xb = xb.to(self.device, non_blocking=nb)  # uint8: a quarter of float32's bytes
        x = xb.movedim(-1, -3).float()  # NHWC -> NCHW (also [B,10,H,W,3] -> [B,10,3,H,W])
        x = x.sub_(self.mean).div_(255.0)  # mean [1, 3, 1, 1] broadcasts over 10-crop views too
        if shift is not None:
            x = x.add_(shift.to(self.device, non_blocking=nb)[:, :, None, None])
        return x.contiguous()

    def __iter__(self):
        nb = self.device.type == "cuda"
        for xb, y, shift, ids in self._raw():
            if isinstance(xb, list):
                x = [self._finish(v, None) for v in xb]
            else:
                x = self._finish(xb, shift)
            y = y.to(self.device, non_blocking=nb)
            yield (x, y, ids) if self.yield_ids else (x, y)


def build_imagenet_loaders(cfg, *, rank: int, world_size: int,
                           device: str | torch.device = "cpu"):
    """(train, test, info) for ``data.dataset: imagenet`` read from ``data.root``."""
    from resnet_cluster.data.shards import read_manifest

    root = cfg.data.root
    manifest = read_manifest(root)
    d = cfg.data
    common = dict(rank=rank, world_size=world_size, seed=cfg.seed, mean=manifest["mean"],
                  eigval=manifest["pca"]["eigval"], eigvec=manifest["pca"]["eigvec"],
                  lighting_std=d.lighting_std, loader_workers=d.loader_workers,
                  prefetch_batches=d.prefetch_batches, shuffle_shards=d.shuffle_shards,
                  verify=d.verify_shards, device=device)
    train = ShardBatches(Split.from_manifest(root, manifest, "train"),
                         batch_size=cfg.per_worker_batch, train=True, view="train",
                         augment=d.augment, **common)
    protocol = cfg.eval.protocol
    # Multi-scale views differ in size between images (aspect ratios), so they go one image
    # per batch rather than being padded or cropped into a shape they do not have.
    test = ShardBatches(Split.from_manifest(root, manifest, "val"),
                        batch_size=1 if protocol == "multiscale" else cfg.per_worker_batch,
                        train=False, view=protocol, augment="none", **common)
    info = {"num_train": train.split.num_images, "num_test": test.split.num_images,
            "classes": list(manifest["classes"])}
    return train, test, info
