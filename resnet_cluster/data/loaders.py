"""Read a prepared dataset and serve rank-sharded, augmented batches from memory.

CIFAR-10 is 150 MB as uint8, so every worker holds the whole set in memory and batches are
cut from it by index; there is no DataLoader and no worker processes. Sharding, shuffling and
augmentation are all decided by seeded ``torch.Generator``s, so a run is reproducible for a
given (seed, world_size) and every rank agrees on the epoch's permutation without talking.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from resnet_cluster.data.cifar import FORMAT_VERSION, IMAGE_BYTES, IMAGE_SHAPE, CifarArrays
from resnet_cluster.errors import DataError

DATASETS = ("cifar10", "synthetic")
AUGMENTS = ("paper", "none")
PAD = 4  # paper §4.2: "4 pixels are padded on each side, and a 32x32 crop is randomly sampled"


# --------------------------------------------------------------------------------------------
# Reading what prepare wrote
# --------------------------------------------------------------------------------------------


def _read_bytes(fs, path: str, root: str, name: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError as err:
        raise DataError(
            f"the prepared dataset at {root} is incomplete: {name} is missing although "
            f"meta.json lists it. Run `resnet-cluster data prepare cifar10 --dest {root}` again."
        ) from err
    except Exception as err:
        raise DataError(
            f"could not read {name} from {root} ({type(err).__name__}: {err}). Check data.root "
            "and that your credentials allow reading it."
        ) from err


def _read_split(blob: bytes, root: str, name: str, expected: int) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(blob))
    except Exception as err:
        raise DataError(
            f"{root}/{name} is not a readable Parquet file ({err}). Run `resnet-cluster data "
            f"prepare cifar10 --dest {root}` again."
        ) from err
    if table.column_names[:2] != ["image", "label"] or table.schema.field(
        "image"
    ).type != pa.binary(IMAGE_BYTES):
        raise DataError(
            f"{root}/{name} has schema {table.schema}, expected image: "
            f"fixed_size_binary({IMAGE_BYTES}) and label: int16. It was not written by "
            f"`resnet-cluster data prepare`; run `resnet-cluster data prepare cifar10 --dest "
            f"{root}` again."
        )
    if table.num_rows != expected:
        raise DataError(
            f"{root}/{name} has {table.num_rows} rows but meta.json says {expected}; the "
            f"dataset is inconsistent. Run `resnet-cluster data prepare cifar10 --dest {root}` "
            "again."
        )
    images = table.column("image").combine_chunks()
    buf = images.buffers()[1]
    x = np.frombuffer(buf, dtype=np.uint8, count=len(images) * IMAGE_BYTES,
                      offset=images.offset * IMAGE_BYTES)
    x = x.reshape(-1, *IMAGE_SHAPE).copy()  # own the memory; the Arrow buffer is then freed
    y = table.column("label").to_numpy().astype(np.int64)
    return x, y


def load_cifar10(root: str) -> tuple[CifarArrays, np.ndarray]:
    """Load the dataset that ``prepare_cifar10`` wrote under ``root`` (local path or fsspec URI).

    Returns the arrays and the float32 [3, 32, 32] per-pixel training mean in 0..255 units. Each
    file is checked against the sha256 recorded in meta.json.
    """
    import hashlib

    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    meta_path = posixpath.join(base, "meta.json")
    try:
        raw = fs.cat_file(meta_path)
    except FileNotFoundError as err:
        raise DataError(
            f"no prepared CIFAR-10 dataset at {root} (data.root): meta.json is missing. Run "
            f"`resnet-cluster data prepare cifar10 --dest {root}` to download and prepare it "
            "there (add `--source PATH` to use an archive you already have), or point "
            "data.root at the folder or URI where you prepared it. A folder without meta.json "
            "may hold an interrupted prepare."
        ) from err
    except Exception as err:
        raise DataError(
            f"could not read {root}/meta.json ({type(err).__name__}: {err}). Check data.root "
            "and that your credentials allow reading it."
        ) from err
    try:
        meta = json.loads(raw)
        ok = isinstance(meta, dict)
    except ValueError:
        ok = False
    if not ok or meta.get("format") != FORMAT_VERSION or meta.get("dataset") != "cifar10":
        found = (meta.get("dataset"), meta.get("format")) if ok else "unparseable JSON"
        raise DataError(
            f"{root}/meta.json does not describe a CIFAR-10 dataset in format {FORMAT_VERSION} "
            f"(found {found}). Run `resnet-cluster data prepare cifar10 --dest {root}` again "
            "with this version of resnet-cluster."
        )
    hashes = meta.get("sha256", {})
    blobs = {}
    for name in ("train.parquet", "test.parquet", meta.get("mean", "mean.npy")):
        blob = _read_bytes(fs, posixpath.join(base, name), root, name)
        want = hashes.get(name)
        if want is not None and hashlib.sha256(blob).hexdigest() != want:
            raise DataError(
                f"{root}/{name} does not match the sha256 in meta.json; it was changed or only "
                f"partly written after prepare. Run `resnet-cluster data prepare cifar10 --dest "
                f"{root}` again."
            )
        blobs[name] = blob
    train_x, train_y = _read_split(blobs["train.parquet"], root, "train.parquet",
                                   meta.get("num_train", -1))
    test_x, test_y = _read_split(blobs["test.parquet"], root, "test.parquet",
                                 meta.get("num_test", -1))
    try:
        mean = np.load(io.BytesIO(blobs[meta.get("mean", "mean.npy")]), allow_pickle=False)
    except Exception as err:
        raise DataError(
            f"{root}/mean.npy is not a numpy file ({err}). Run `resnet-cluster data prepare "
            f"cifar10 --dest {root}` again."
        ) from err
    if mean.shape != IMAGE_SHAPE:
        raise DataError(
            f"{root}/mean.npy has shape {list(mean.shape)}, expected {list(IMAGE_SHAPE)}. Run "
            f"`resnet-cluster data prepare cifar10 --dest {root}` again."
        )
    classes = [str(c) for c in meta.get("classes", [])]
    for split, y in (("train", train_y), ("test", test_y)):
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(
                f"{root}/{split}.parquet has labels outside 0..{len(classes) - 1} (meta.json "
                f"names {len(classes)} classes). Run `resnet-cluster data prepare cifar10 "
                f"--dest {root}` again."
            )
    arrays = CifarArrays(train_x, train_y, test_x, test_y, classes)
    return arrays, mean.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = PAD) -> torch.Tensor:
    """Paper §4.2 augmentation for a batch ``x`` [b, c, h, w]: zero-pad ``pad`` pixels on each
    side, take a random h x w crop, and flip it horizontally with probability 1/2.

    Vectorised: one gather with per-image row/column index grids, no per-image loop. Random
    draws come from ``generator`` (a CPU generator) in a fixed order: b crop offsets (y, x)
    then b flip coins, so results are reproducible for a seeded generator on any device.
    ``x`` is expected already normalised, so zero padding equals padding with the mean image.
    """
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)  # [b, (dy, dx)]
    flip = torch.rand(b, generator=generator) < 0.5
    offsets, flip = offsets.to(x.device), flip.to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # [b, h+2p, w+2p, c]
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # [b, h]
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # [b, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads columns backwards
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, rows[:, :, None], cols[:, None, :]]  # [b, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (e.g. seed, epoch, rank), well mixed."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


_PERM, _AUG = 0, 1  # stream tags, so the permutation and augmentation streams never coincide


class ImageBatches:
    """Iterable over (x float32 [b, 3, 32, 32], y int64 [b]) batches for one rank.

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
            x = (xb.float() - self.mean) / 255.0
            if aug_gen is not None:
                x = random_crop_flip(x, aug_gen)
            yield x, yb


def build_loaders(
    *,
    dataset: str,
    root: str,
    augment: str,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    synthetic_train: int = 2560,
    synthetic_test: int = 512,
    device: str | torch.device = "cpu",
) -> tuple[ImageBatches, ImageBatches, dict]:
    """Build this rank's train and test batches.

    ``dataset``: "cifar10" (read from ``root``, written by ``data prepare``) or "synthetic"
    (:func:`make_synthetic`, fixed data seed 0 so runs with different seeds see the same
    data; ``root`` is ignored). ``augment``: "paper" (pad 4, random crop, flip) or "none".
    Returns (train, test, info) with info = {num_train, num_test, classes}.
    """
    if augment not in AUGMENTS:
        raise DataError(f"data.augment is {augment!r}; choose one of {list(AUGMENTS)}.")
    if dataset == "cifar10":
        arrays, mean = load_cifar10(root)
    elif dataset == "synthetic":
        from resnet_cluster.data.synthetic import make_synthetic

        arrays = make_synthetic(synthetic_train, synthetic_test, seed=0)
        mean = arrays.train_x.astype(np.float32).mean(axis=0)
    else:
        raise DataError(
            f"data.dataset is {dataset!r}; build_loaders serves {list(DATASETS)}. Check "
            "data.dataset in the job file."
        )
    common = dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                  mean=torch.from_numpy(mean), device=device)
    train = ImageBatches(torch.from_numpy(arrays.train_x), torch.from_numpy(arrays.train_y),
                         train=True, augment=augment == "paper", **common)
    test = ImageBatches(torch.from_numpy(arrays.test_x), torch.from_numpy(arrays.test_y),
                        train=False, augment=False, **common)
    info = {"num_train": len(arrays.train_x), "num_test": len(arrays.test_x),
            "classes": list(arrays.classes)}
    return train, test, info


def build_loaders_for(
    cfg, *, rank: int, world_size: int, device: str | torch.device = "cpu"
) -> tuple[ImageBatches, ImageBatches, dict]:
    """The loop's entry point: this rank's (train, test, info) for a JobConfig.

    The training loop calls only this, so the data package decides which job keys it reads.
    ``data.dataset: imagenet`` streams shards (:mod:`resnet_cluster.data.streaming`).
    """
    if cfg.data.dataset == "imagenet":
        from resnet_cluster.data.streaming import build_imagenet_loaders

        return build_imagenet_loaders(cfg, rank=rank, world_size=world_size, device=device)
    if cfg.data.augment == "inception":
        raise DataError(
            "data.augment inception is the ImageNet random-resized crop; CIFAR-10 and synthetic "
            "data use paper (pad 4, random crop, flip) or none."
        )
    if cfg.data.dataset in ("cifar10", "synthetic") and cfg.eval.protocol != "1crop":
        raise DataError(
            f"eval.protocol {cfg.eval.protocol!r} needs ImageNet-sized images; CIFAR is tested on "
            "the single original 32x32 view. Use eval.protocol: 1crop (the default)."
        )
    return build_loaders(
        dataset=cfg.data.dataset,
        root=cfg.data.root,
        augment=cfg.data.augment,
        batch_size=cfg.per_worker_batch,
        rank=rank,
        world_size=world_size,
        seed=cfg.seed,
        synthetic_train=cfg.data.synthetic_train,
        synthetic_test=cfg.data.synthetic_test,
        device=device,
    )
