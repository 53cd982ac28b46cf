"""Stream rank-sharded, augmented batches of a prepared dataset (ImageNet or CIFAR-10) from its
shards through DataLoader worker processes.

Per epoch and rank (:class:`ShardBatches`):

1. :func:`~resnet_cluster.data.shards.epoch_order` gives the epoch's global order, the same on
   every rank (seeded from ``seed`` and the epoch); :func:`rank_slice` takes this rank's
   contiguous part, so a rank reads only its own shards.
2. The part is cut into batches; DataLoader worker ``w`` of ``W`` (``data.loader_workers``)
   builds a contiguous block of them, so each shard is fetched by one worker (two at a block's
   edge), and the DataLoader serves the workers' batches round-robin. The workers are started
   once and kept for every epoch (``persistent_workers``): each learns the epoch from a value in
   shared memory when the next pass starts, and keeps its one storage client (an s3fs client
   costs 0.1-0.3 s to build) for the whole run.
3. A worker fetches each shard whole when first needed, with the next :data:`READ_AHEAD` shards
   read ahead on a thread (which hides S3 latency), and turns rows into uint8 NHWC images: JPEGs
   are decoded and augmented in :mod:`resnet_cluster.data.transforms` (plus the per-image
   lighting shift), raw CIFAR images are sliced out of the shard as they are (plus the
   per-image pad-crop offsets and flip).
4. The main process pins the batch (CUDA), copies it to the device as uint8, and there converts
   to float and normalises, ``x = (img - mean) / 255 + shift``, with the per-channel (ImageNet)
   or per-pixel (CIFAR-10) training mean; CIFAR batches are then padded by 4 and cropped.

Each image's random crop, flip and lighting are drawn from (seed, epoch, image id) alone, so
they do not depend on the rank, the number of ranks or workers, or the serving order. The order
in which one rank sees its batches does depend on the worker count (the round-robin), the set
does not.

Elastic runs (``accumulate`` m > 1): the epoch is cut for ``world_size * m`` "slots" and rank r
serves slots r*m .. r*m+m-1 together, its batch i being the concatenation of those slots' i-th
plan batches. The DataLoader serves plan positions in the same round-robin order whatever m is
(same plan length, same worker count), so serving step j is the same images for every slot at
any world size. A pass can start at serving step ``start`` (a run resumed mid-epoch): see
:func:`served_order`.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from typing import Iterator

import numpy as np
import torch

from resnet_cluster.data import transforms as T
from resnet_cluster.data.shards import (
    Split,
    epoch_order,
    locate,
    rank_slice,
    read_manifest,
    read_shard,
    url_to_fs,
)
from resnet_cluster.datasets import get as get_dataset
from resnet_cluster.errors import DataError

AUGMENTS = ("paper", "inception", "none")
VIEWS = ("train", "1crop", "10crop", "multiscale")
READ_AHEAD = 2  # shards fetched ahead of the one being decoded, per worker
# ~627 JPEGs/s per core with the paper's augmentation (benchmarks/RESULTS.md, issue 4): one
# GPU's 2.5-7k img/s (ResNet-50 AMP on an A100 .. ResNet-18 bf16 on an H100) needs 4-11 decoders.
_AUG_TAG = 7  # stream tag separating per-image augmentation draws from the shuffle streams
# fork is the Linux default and starts a worker in milliseconds; spawn would re-import torch.
_FORK = multiprocessing.get_context("fork") if os.name == "posix" else None


class _ShardCache:
    """The shards one pass of one worker needs: fetched on first use with read-ahead, freed
    after their last use."""

    def __init__(self, split: Split, verify: bool, sequence: list[int]) -> None:
        self.split, self.verify = split, verify
        # The process's cached filesystem (see shards.url_to_fs): the same client every pass.
        self._fs, self._base = url_to_fs(split.root)
        self._shards: dict[int, tuple] = {}
        self._order = list(dict.fromkeys(sequence))  # shards in first-use order
        self._pos = {s: i for i, s in enumerate(self._order)}
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._pending: dict[int, concurrent.futures.Future] = {}

    def _fetch(self, shard: int):
        return read_shard(self._fs, self._base, self.split, shard, verify=self.verify)

    def get(self, shard: int):
        """(images, labels) of ``shard``; see :func:`read_shard`."""
        if shard not in self._shards:
            fut = self._pending.pop(shard, None)
            self._shards[shard] = fut.result() if fut is not None else self._fetch(shard)
            pos = self._pos[shard]
            for nxt in self._order[pos + 1:pos + 1 + READ_AHEAD]:
                if nxt not in self._shards and nxt not in self._pending:
                    self._pending[nxt] = self._pool.submit(self._fetch, nxt)
        return self._shards[shard]

    def release(self, shard: int) -> None:
        self._shards.pop(shard, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _WorkerDataError(str):
    """A DataError's message, sent from a DataLoader worker in place of a batch."""


class _Reader(torch.utils.data.IterableDataset):
    """What a DataLoader worker runs: this rank's batches of the current epoch (its block of
    them in a worker), built from the shards. Holds no reference to the DataLoader, so dropping
    a :class:`ShardBatches` shuts its workers down at once."""

    def __init__(self, split: Split, *, batch_size: int, rank: int, world_size: int, seed: int,
                 train: bool, view: str, augment: str, eigval, eigvec, lighting_std: float,
                 shuffle_shards: int, verify: bool, accumulate: int = 1) -> None:
        self.split = split
        self.accumulate = accumulate
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.train, self.view, self.augment = train, view, augment
        self.raw = split.encoding == "raw"
        self.lighting_std = lighting_std if train and augment != "none" and eigval is not None \
            else 0.0
        self.eigval = None if eigval is None else np.asarray(eigval, np.float64)
        self.eigvec = None if eigvec is None else np.asarray(eigvec, np.float64)
        self.shuffle_shards, self.verify = shuffle_shards, verify
        # The epoch and the serving step a pass starts at, shared with the worker processes
        # forked once at the first pass.
        self._epoch = (_FORK or multiprocessing).RawValue("q", 0)
        self._start = (_FORK or multiprocessing).RawValue("q", 0)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = int(value)

    @property
    def start(self) -> int:
        return int(self._start.value)

    @start.setter
    def start(self, value: int) -> None:
        self._start.value = int(value)

    def plan(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of global image ids for ``epoch``."""
        order = epoch_order(self.split, seed=self.seed, epoch=epoch, shuffle=self.train,
                            shuffle_shards=self.shuffle_shards)
        b, m = self.batch_size, self.accumulate
        slots = []
        for k in range(self.rank * m, self.rank * m + m):
            ids = rank_slice(order, rank=k, world_size=self.world_size * m, batch_size=b,
                             train=self.train)
            slots.append([ids[i:i + b] for i in range(0, len(ids), b)])
        return slots[0] if m == 1 else [np.concatenate(parts) for parts in zip(*slots)]

    def __iter__(self):
        epoch, start = self.epoch, self.start  # read when the pass starts (after set_epoch)
        batches = self.plan(epoch)
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        n = len(batches)
        blocks = [range(v * n // nw, (v + 1) * n // nw) for v in range(nw)]
        if start:
            blocks = resumed_blocks(blocks, start)
        try:
            yield from self._build_batches([batches[i] for i in blocks[w]], epoch)
        except DataError as err:
            if info is None:
                raise
            # The DataLoader would re-raise it with the worker's traceback pasted into the
            # message; the user gets the message alone (ShardBatches raises it again).
            yield _WorkerDataError(str(err))

    def _one(self, data: bytes, gid: int, epoch: int):
        """(uint8 image HWC or views, lighting shift or None) of one JPEG row."""
        if self.view == "train" and self.augment != "none":
            rng = np.random.default_rng([self.seed, epoch, _AUG_TAG, int(gid)])
            fn = T.paper_train if self.augment == "paper" else T.inception_train
            img = fn(data, rng)
            return img, T.lighting_shift(rng, self.eigval, self.eigvec, self.lighting_std)
        if self.view in ("train", "1crop"):
            return T.center_crop(data), None
        if self.view == "10crop":
            return T.ten_crop(data), None
        return T.multiscale(data), None

    def _build_batches(self, batches: list[np.ndarray], epoch: int):
        where = [locate(self.split, ids) for ids in batches]
        sequence = [int(s) for shards, _ in where for s in shards]
        last_use = {s: i for i, (shards, _) in enumerate(where) for s in shards}
        cache = _ShardCache(self.split, self.verify, sequence)
        build = self._raw_batch if self.raw else self._decoded_batch
        try:
            for i, (ids, (shards, rows)) in enumerate(zip(batches, where)):
                x, labels, shift, params = build(cache, ids, shards, rows, epoch)
                for s in set(shards.tolist()):
                    if last_use[s] == i:
                        cache.release(s)
                yield x, torch.from_numpy(labels), shift, params, torch.from_numpy(np.asarray(ids))
        finally:
            cache.close()

    def _decoded_batch(self, cache: _ShardCache, ids, shards, rows, epoch: int):
        """JPEG rows: decode and augment image by image (uint8 NHWC, or views)."""
        images, shifts, labels = [], [], np.empty(len(ids), np.int64)
        for j, (gid, s, r) in enumerate(zip(ids, shards, rows)):
            col, lab = cache.get(int(s))
            img, shift = self._one(col[int(r)].as_py(), int(gid), epoch)
            images.append(img)
            shifts.append(shift)
            labels[j] = lab[r]
        if self.view == "multiscale":
            x = [torch.from_numpy(np.stack([im[k] for im in images]))
                 for k in range(len(images[0]))]
        else:
            x = torch.from_numpy(np.stack(images))
        shift = torch.from_numpy(np.stack(shifts)) if shifts[0] is not None else None
        return x, labels, shift, None

    def _raw_batch(self, cache: _ShardCache, ids, shards, rows, epoch: int):
        """Raw rows (CIFAR): gather them shard by shard (no per-image Python), plus the
        per-image pad-crop offsets and flip that the training process applies."""
        x = np.empty((len(ids), *self.split.shape), np.uint8)
        labels = np.empty(len(ids), np.int64)
        for s in dict.fromkeys(shards.tolist()):  # first-use order, for the read-ahead
            images, lab = cache.get(s)
            m = shards == s
            x[m] = images[rows[m]]
            labels[m] = lab[rows[m]]
        params = None
        if self.view == "train" and self.augment == "paper":
            params = torch.from_numpy(T.pad_crop_params(self.seed, epoch, ids))
        return torch.from_numpy(x), labels, None, params


def served_order(blocks: list[range]) -> list[int]:
    """The plan positions a DataLoader serves, in order, when worker v yields ``blocks[v]``.

    PyTorch's DataLoader asks its workers in turn and skips a worker once it has run out
    (``_MultiProcessingDataLoaderIter._try_put_index`` / ``_next_data``), so it serves the
    blocks round-robin: position r of every block that has one, for r = 0, 1, ...
    """
    return [b[r] for r in range(max((len(b) for b in blocks), default=0)) for b in blocks if r < len(b)]


def resumed_blocks(blocks: list[range], start: int) -> list[list[int]]:
    """What each DataLoader worker yields so that a pass serves ``served_order(blocks)[start:]``:
    every worker drops the positions already served, and the workers are rotated so that the
    one whose turn it was comes first (the DataLoader always asks worker 0 first)."""
    served = served_order(blocks)
    if start >= len(served):
        return [[] for _ in blocks]
    done = set(served[:start])
    first = next(v for v, b in enumerate(blocks) if served[start] in b)
    rest = [[i for i in b if i not in done] for b in blocks]
    return [rest[(first + v) % len(blocks)] for v in range(len(blocks))]


class ShardBatches:
    """Iterable over this rank's (x, y) batches of a sharded split; ``len()`` batches per epoch.

    ``view``: ``train`` (``augment`` paper | inception | none), ``1crop`` -> x [B, 3, 224, 224],
    ``10crop`` -> x [B, 10, 3, 224, 224], ``multiscale`` -> x a list of [B, 3, S, S'] tensors,
    one per shorter side in (224, 256, 384, 480, 640) (use batch_size 1: sizes differ between
    images). ``augment: none`` trains on the 1-crop view. y is int64 [B].

    For a split stored ``raw`` (CIFAR-10) every view is the stored 32x32 image; ``augment:
    paper`` pads it by 4 (after mean subtraction, so with the mean), takes a random 32x32 crop
    and flips it at random (paper section 4.2). ``mean`` is per channel [3] or per pixel
    [3, H, W]; ``eigval``/``eigvec`` (PCA lighting) may be None.
    """

    def __init__(self, split: Split, *, batch_size: int, rank: int, world_size: int, seed: int,
                 train: bool, view: str = "train", augment: str = "paper",
                 mean, eigval=None, eigvec=None,
                 lighting_std: float = 0.1, loader_workers: int = 0, prefetch_batches: int = 2,
                 shuffle_shards: int = 2, verify: bool = True,
                 device: str | torch.device = "cpu", channels_last: bool = False,
                 accumulate: int = 1) -> None:
        if augment not in AUGMENTS:
            raise DataError(f"data.augment is {augment!r}; choose one of {list(AUGMENTS)}.")
        if view not in VIEWS:
            raise ValueError(f"view {view!r} not in {VIEWS}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or accumulate < 1:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}, "
                             f"accumulate={accumulate}")
        if accumulate > 1 and not train:
            raise ValueError("accumulate is for training batches")
        if split.encoding == "raw" and (view in ("10crop", "multiscale") or augment == "inception"):
            raise DataError(
                f"the {split.dataset} images at {split.root} are {'x'.join(map(str, split.shape))}"
                f" raw pixels: no {view if view != 'train' else augment} view of them. Use "
                "eval.protocol 1crop and data.augment paper or none."
            )
        self.split = split
        self.reader = _Reader(split, batch_size=batch_size, rank=rank, world_size=world_size,
                              seed=seed, train=train, view=view, augment=augment, eigval=eigval,
                              eigvec=eigvec, lighting_std=lighting_std,
                              shuffle_shards=shuffle_shards, verify=verify,
                              accumulate=accumulate)
        self.accumulate = accumulate
        slot_world = world_size * accumulate
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.train, self.view, self.augment = train, view, augment
        self.loader_workers, self.prefetch_batches = loader_workers, prefetch_batches
        self.device = torch.device(device)
        self.channels_last = channels_last  # serve x in the model's memory format (NHWC strides)
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        m = np.asarray(mean, np.float32)
        m = m.reshape(3, 1, 1) if m.ndim == 1 else m  # per channel, or per pixel [3, H, W]
        self.mean = torch.from_numpy(m).to(self.device)
        self.epoch = self.start = 0
        self.yield_ids = False  # when True, batches are (x, y, ids): for checks and tests
        self._loader: torch.utils.data.DataLoader | None = None
        if train and split.num_images // slot_world < batch_size:
            raise DataError(
                f"the training split at {split.root} has {split.num_images} images, fewer than "
                f"one batch of {batch_size} per worker on each of {slot_world} workers. Lower "
                "train.batch_size or scaling.workers, or prepare more images."
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch the next pass serves, from serving step ``start`` (> 0: a run resumed
        mid-epoch skips exactly the batches it has trained on)."""
        self.epoch, self.start = int(epoch), int(start)
        self.reader.epoch, self.reader.start = self.epoch, self.start

    def plan(self) -> list[np.ndarray]:
        """This rank's batches of global image ids for the current epoch."""
        return self.reader.plan(self.epoch)

    def __len__(self) -> int:
        n = self.split.num_images
        if self.train:
            return (n // (self.world_size * self.accumulate)) // self.batch_size
        per = (self.rank + 1) * n // self.world_size - self.rank * n // self.world_size
        return -(-per // self.batch_size)

    def close(self) -> None:
        """Stop the DataLoader worker processes (they also stop when this object is dropped)."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()

    # ---- runs in the training process -----------------------------------------------------

    def _raw(self) -> Iterator:
        self.reader.epoch, self.reader.start = self.epoch, self.start
        if self.loader_workers == 0:
            return iter(self.reader)
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self.reader, batch_size=None,
                num_workers=min(self.loader_workers, max(1, len(self))),
                prefetch_factor=self.prefetch_batches, pin_memory=self._pin,
                # Training keeps its decoders for the run; a test loader's exist only while it
                # is iterated, so they do not sit idle beside the training decoders all epoch.
                persistent_workers=self.train, multiprocessing_context=_FORK)
        return iter(self._loader)

    def _finish(self, xb: torch.Tensor, shift: torch.Tensor | None,
                crop: torch.Tensor | None) -> torch.Tensor:
        xb = T.to_device(xb, self.device)  # uint8: a quarter of float32's bytes; pinned
        if self.channels_last:
            # The model wants NHWC strides: .float() of the permuted view keeps them, so the
            # batch is channels_last after one pass (not NCHW and then a second copy).
            x = xb.movedim(-1, -3).float()
        else:
            # NHWC uint8 -> NCHW float in one pass (also [B,10,H,W,3] -> [B,10,3,H,W]); then
            # normalising in place on a contiguous tensor is about 4x faster on a CPU than on
            # the permuted (channels-last) view that .float() would give.
            *lead, h, w, c = xb.shape
            x = torch.empty((*lead, c, h, w), dtype=torch.float32, device=self.device)
            x.copy_(xb.movedim(-1, -3))
        x.sub_(self.mean).div_(255.0)  # the mean [3, 1, 1] or [3, H, W] broadcasts
        if shift is not None:
            x.add_(T.to_device(shift, self.device)[:, :, None, None])
        if crop is not None:  # CIFAR: pad with zeros (= the mean), crop, flip; section 4.2
            crop = T.to_device(crop, self.device)  # pinned, not waited for
            x = T.crop_flip(x, crop[:, :2], crop[:, 2].bool(), channels_last=self.channels_last)
        return x

    def __iter__(self):
        for item in self._raw():
            if isinstance(item, _WorkerDataError):
                raise DataError(str(item))
            xb, y, shift, crop, ids = item
            if isinstance(xb, list):
                x = [self._finish(v, None, None) for v in xb]
            else:
                x = self._finish(xb, shift, crop)
            y = T.to_device(y, self.device)
            yield (x, y, ids) if self.yield_ids else (x, y)


def default_decoders(cpus_per_worker: float) -> int:
    """``data.loader_workers: null`` on JPEG shards: a decoder process for every CPU the worker
    reserved (``scaling.cpus_per_worker``) but the one its training process runs on; at least 1.
    The test loader's decoders exist only during evaluation, when the training ones wait, so
    the two never compete for those CPUs."""
    return max(1, int(cpus_per_worker) - 1)


def build_shard_loaders(cfg, *, rank: int, world_size: int,
                        device: str | torch.device = "cpu",
                        train_share: tuple[int, int, int] | None = None):
    """(train, test, info) for ``data.dataset`` imagenet or cifar10, read from ``data.root``;
    ``train_share`` as in :func:`resnet_cluster.data.loaders.build_loaders_for`."""
    root, d = cfg.data.root, cfg.data
    dataset = get_dataset(d.dataset)
    manifest = read_manifest(root, d.dataset)
    pca = manifest.get("pca") or {}
    workers = d.loader_workers
    if workers is None:  # measured: raw CIFAR batches are cheaper in-process than through IPC
        raw = manifest.get("image", {}).get("encoding") == "raw"
        workers = 0 if raw else default_decoders(cfg.scaling.cpus_per_worker)
    t_rank, t_world, accumulate = train_share or (rank, world_size, 1)
    common = dict(seed=cfg.seed, mean=manifest["mean"],
                  eigval=pca.get("eigval"), eigvec=pca.get("eigvec"),
                  lighting_std=d.lighting_std, loader_workers=workers,
                  prefetch_batches=d.prefetch_batches, shuffle_shards=d.shuffle_shards,
                  verify=d.verify_shards, device=device,
                  channels_last=cfg.precision.channels_last)
    train = ShardBatches(Split.from_manifest(root, manifest, dataset.train_split),
                         batch_size=cfg.per_worker_batch, train=True, view="train",
                         augment=d.augment, rank=t_rank, world_size=t_world,
                         accumulate=accumulate, **common)
    protocol = cfg.eval.protocol
    # Multi-scale views differ in size between images (aspect ratios), so they go one image
    # per batch rather than being padded or cropped into a shape they do not have.
    test = ShardBatches(Split.from_manifest(root, manifest, dataset.eval_split),
                        batch_size=1 if protocol == "multiscale" else cfg.per_worker_batch,
                        train=False, view=protocol, augment="none", rank=rank,
                        world_size=world_size, **common)
    info = {"num_train": train.split.num_images, "num_test": test.split.num_images,
            "classes": list(manifest["classes"])}
    return train, test, info
