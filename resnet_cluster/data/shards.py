"""The shard format: Parquet files of encoded images on any fsspec URI, plus ``manifest.json``.

Layout written by ``data prepare imagenet``::

    <root>/train/00000.parquet ...   columns: image (binary, JPEG), label (int16),
    <root>/val/00000.parquet ...              width, height (int32), path (string, source)
    <root>/manifest.json             written LAST: a root without it is not a finished dataset

``manifest.json`` holds ``splits.<name>.shards`` (path, rows, bytes, sha256 per shard), the class
list, the per-channel training mean (0..255), the PCA eigenvalues/eigenvectors of the training
RGB covariance (in [0, 1] units, for AlexNet lighting) and the skipped (corrupt) source files.

A shard is the unit of I/O: a reader fetches a whole shard with one request (one GET on S3),
checks its sha256, and decodes rows from memory. Training images are shuffled once when the
shards are written, so every shard is a random sample of all classes; each epoch then permutes
the shard order and the rows within windows of ``shuffle_shards`` consecutive shards.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass

import numpy as np

from resnet_cluster.errors import DataError

FORMAT = "resnet-cluster/shards"
VERSION = 1
MANIFEST = "manifest.json"


def _prepare_hint(root: str) -> str:
    return (f"Run `resnet-cluster data prepare imagenet --train DIR --val DIR --dest {root}` "
            "(or point data.root at the folder or URI where you prepared it).")


def url_to_fs(root: str):
    """(filesystem, path) for a folder or fsspec URI; a fresh instance, safe after fork()."""
    import fsspec

    return fsspec.core.url_to_fs(root, skip_instance_cache=True)


def read_manifest(root: str) -> dict:
    """Read and check ``<root>/manifest.json``; DataError naming the root if it is not there."""
    fs, base = url_to_fs(root)
    try:
        raw = fs.cat_file(posixpath.join(base, MANIFEST))
    except FileNotFoundError as err:
        raise DataError(
            f"no prepared ImageNet-style dataset at {root} (data.root): manifest.json is missing. "
            f"{_prepare_hint(root)} A folder without manifest.json may hold an interrupted "
            "prepare; running the same prepare command again resumes it."
        ) from err
    except Exception as err:
        raise DataError(
            f"could not read {root}/manifest.json ({type(err).__name__}: {err}). Check data.root "
            "and that your credentials (and AWS_ENDPOINT_URL for a non-AWS S3) allow reading it."
        ) from err
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            manifest.get("version") != VERSION:
        found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) \
            else "unparseable JSON"
        raise DataError(
            f"{root}/manifest.json is not a {FORMAT} manifest of version {VERSION} (found "
            f"{found}). {_prepare_hint(root)}"
        )
    return manifest


@dataclass(frozen=True)
class Split:
    """One split of a prepared dataset: where its shards are and how many rows each holds."""

    root: str
    name: str
    paths: tuple[str, ...]  # relative to root
    rows: tuple[int, ...]
    sha256: tuple[str, ...]

    @classmethod
    def from_manifest(cls, root: str, manifest: dict, name: str) -> Split:
        split = manifest.get("splits", {}).get(name)
        if split is None:
            raise DataError(
                f"the dataset at {root} has no '{name}' split (it has "
                f"{sorted(manifest.get('splits', {}))}). {_prepare_hint(root)}"
            )
        shards = split["shards"]
        return cls(root, name, tuple(s["path"] for s in shards), tuple(int(s["rows"]) for s in shards),
                   tuple(s["sha256"] for s in shards))

    @property
    def num_images(self) -> int:
        return sum(self.rows)

    @property
    def offsets(self) -> np.ndarray:
        """Global id of each shard's first row; a row's id is offsets[shard] + row."""
        return np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)


def read_shard(fs, base: str, split: Split, index: int, *, verify: bool = True):
    """Fetch shard ``index`` whole (one request), check its sha256, return a pyarrow Table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rel = split.paths[index]
    try:
        blob = fs.cat_file(posixpath.join(base, rel))
    except FileNotFoundError as err:
        raise DataError(
            f"{split.root}/{rel} is missing although manifest.json lists it; the dataset is "
            f"incomplete. {_prepare_hint(split.root)}"
        ) from err
    if verify and hashlib.sha256(blob).hexdigest() != split.sha256[index]:
        raise DataError(
            f"{split.root}/{rel} does not match the sha256 in manifest.json; it was changed or "
            f"only partly copied. Copy it again or {_prepare_hint(split.root)}"
        )
    table = pq.read_table(pa.BufferReader(blob), columns=["image", "label"])
    if table.num_rows != split.rows[index]:
        raise DataError(
            f"{split.root}/{rel} has {table.num_rows} rows, manifest.json says "
            f"{split.rows[index]}. {_prepare_hint(split.root)}"
        )
    return table


def _generator(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


_SHARDS, _ROWS = 0, 1  # stream tags for the two levels of the epoch shuffle


def epoch_order(split: Split, *, seed: int, epoch: int, shuffle: bool,
                shuffle_shards: int = 2) -> np.ndarray:
    """The global image ids of one epoch, in serving order, identical on every rank.

    Without ``shuffle``: shard order, row order. With it: shards permuted by (seed, epoch), then
    the rows of each window of ``shuffle_shards`` consecutive shards permuted together, so a
    reader holds at most about two windows of shards in memory.
    """
    offsets = split.offsets
    n = len(split.rows)
    if not shuffle:
        return np.arange(offsets[-1], dtype=np.int64)
    shard_perm = _generator(seed, epoch, _SHARDS).permutation(n)
    parts = []
    for w, start in enumerate(range(0, n, shuffle_shards)):
        ids = np.concatenate([np.arange(offsets[s], offsets[s + 1])
                              for s in shard_perm[start:start + shuffle_shards]])
        parts.append(_generator(seed, epoch, _ROWS, w).permutation(ids))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def rank_slice(order: np.ndarray, *, rank: int, world_size: int, batch_size: int,
               train: bool) -> np.ndarray:
    """This rank's contiguous part of the epoch order.

    Train: ``N // world_size`` ids per rank, cut to whole batches, so every rank runs the same
    number of steps; at most ``world_size - 1 + world_size * (batch_size - 1)`` images sit out an
    epoch, and a different set each epoch. Eval: near-equal parts covering every image once.
    """
    n = len(order)
    if train:
        per = n // world_size
        per -= per % batch_size
        return order[rank * (n // world_size):][:per]
    return order[rank * n // world_size:(rank + 1) * n // world_size]


def locate(split: Split, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard index, row within shard) of each global id."""
    offsets = split.offsets
    shard = np.searchsorted(offsets, ids, side="right") - 1
    return shard, ids - offsets[shard]
