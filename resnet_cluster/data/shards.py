"""The shard format: Parquet files of images on any fsspec URI, plus ``manifest.json``.

One format for every dataset (``data prepare imagenet`` and ``data prepare cifar10`` write it)::

    <root>/<split>/00000.parquet ...   columns: image (binary), label (int16),
                                                width, height (int32), path (string, source)
    <root>/manifest.json               written LAST: a root without it is not a finished dataset

``manifest.json`` holds ``dataset``, ``image.encoding``, ``splits.<name>.shards`` (path, rows,
bytes, sha256 per shard), the class list, the training mean (0..255: per channel for ImageNet,
per pixel [3, 32, 32] for CIFAR-10), for ImageNet the PCA of the training RGB covariance (AlexNet
lighting), and the skipped (corrupt) source files.

``image.encoding`` says what the ``image`` bytes are:

- ``jpeg`` (ImageNet): one JPEG file per row, decoded and augmented in the loader workers.
- ``raw`` (CIFAR-10): ``image.shape`` uint8 values in HWC order (32 x 32 x 3 = 3072 bytes). At
  32x32 an encoder buys nothing: PNG saves a few percent at a decode cost per image, JPEG changes
  the pixels of a dataset whose published results are on the exact originals, and the whole raw
  training set is 150 MB.

A shard is the unit of I/O: a reader fetches a whole shard with one request (one ranged GET of
the size the manifest records, so no HEAD first), checks its sha256 and reads rows from memory.
Training images are shuffled once when the shards are written, so every shard is a random sample
of all classes; each epoch then permutes the shard order and the rows within windows of
``shuffle_shards`` consecutive shards.

Writing (:func:`write_shard`, :func:`existing_shard`, :func:`check_dest`, :func:`write_manifest`)
is shared by both prepare commands: a shard is written to a temporary name and renamed (local) or
uploaded in one PUT (object stores), so a final name only ever holds a whole shard; its Parquet
metadata records a ``plan`` hash of exactly which inputs produced it, so a re-run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resnet_cluster.datasets import DATASETS
from resnet_cluster.errors import DataError
from resnet_cluster.fileutil import hash_file

FORMAT = "resnet-cluster/shards"
VERSION = 1
MANIFEST = "manifest.json"
META_KEY = b"resnet_cluster.shard"  # Parquet schema metadata: the shard's plan hash and stats
ENCODINGS = ("jpeg", "raw")

# What `resnet-cluster data prepare cifar10` wrote before CIFAR-10 used shards (format 1).
LEGACY_CIFAR_FILES = ("meta.json", "train.parquet", "test.parquet", "mean.npy")


def prepare_hint(root: str, dataset: str = "imagenet") -> str:
    """The registry's hint for ``dataset`` (a manifest naming no known dataset: ImageNet's)."""
    info = DATASETS.get(dataset)
    return (info if info is not None and info.prepared else DATASETS["imagenet"]).prepare_hint(root)


def url_to_fs(root: str):
    """(filesystem, path) for a folder or fsspec URI.

    The filesystem comes from fsspec's instance cache, so one process (a training rank, one
    DataLoader worker) builds one client per store and reuses it for every shard, pass and
    epoch: an s3fs client costs 0.1-0.3 s to build and connect. That is fork-safe: fsspec
    clears its instance cache and its event-loop thread in a forked child (``os.register_at_fork``
    in ``fsspec.spec`` and ``fsspec.asyn``), so a DataLoader worker builds its own client and
    never touches the parent's aiohttp session.
    """
    import fsspec

    return fsspec.core.url_to_fs(root)


def _legacy_cifar(fs, base: str) -> bool:
    """Whether ``base`` holds CIFAR-10 as the pre-shard prepare wrote it (meta.json format 1)."""
    try:
        meta = json.loads(fs.cat_file(posixpath.join(base, "meta.json")))
    except Exception:
        return False
    return isinstance(meta, dict) and meta.get("dataset") == "cifar10" and meta.get("format") == 1


def read_manifest(root: str, dataset: str | None = None) -> dict:
    """Read and check ``<root>/manifest.json``; DataError naming the root and the fix.

    ``dataset`` (``imagenet`` / ``cifar10``), when given, must be the manifest's, and picks the
    prepare command the error messages suggest.
    """
    fs, base = url_to_fs(root)
    hint = prepare_hint(root, dataset or "imagenet")
    try:
        raw = fs.cat_file(posixpath.join(base, MANIFEST))
    except FileNotFoundError as err:
        if _legacy_cifar(fs, base):
            raise DataError(
                f"{root} holds CIFAR-10 in the old single-file layout (train.parquet, "
                "test.parquet, mean.npy, meta.json format 1), which this version no longer reads: "
                "CIFAR-10 now uses the same shards and manifest.json as ImageNet. Run "
                f"`resnet-cluster data prepare cifar10 --dest {root}` (with `--source PATH` if you "
                "have the archive) to rewrite it in place; the old files are removed."
            ) from err
        what = {"cifar10": "CIFAR-10", "imagenet": "ImageNet-style"}.get(dataset or "", "sharded")
        raise DataError(
            f"no prepared {what} dataset at {root} (data.root): manifest.json is missing. {hint} "
            "A folder without manifest.json may hold an interrupted prepare; running the same "
            "prepare command again resumes it."
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
            f"{found}). {hint}"
        )
    have = manifest.get("dataset", "imagenet")
    if dataset is not None and have != dataset:
        raise DataError(
            f"data.root {root} holds a prepared {have} dataset but the job says data.dataset: "
            f"{dataset}. Set data.dataset: {have}, or point data.root at a {dataset} dataset. "
            f"{hint}"
        )
    encoding = manifest.get("image", {}).get("encoding", "jpeg")
    if encoding not in ENCODINGS:
        raise DataError(f"{root}/manifest.json stores images as {encoding!r}; this version reads "
                        f"{list(ENCODINGS)}. {hint}")
    return manifest


@dataclass(frozen=True)
class Split:
    """One split of a prepared dataset: where its shards are, their sizes, and the encoding."""

    root: str
    name: str
    paths: tuple[str, ...]  # relative to root
    rows: tuple[int, ...]
    sha256: tuple[str, ...]
    nbytes: tuple[int, ...] = ()  # per shard, as the manifest records them
    dataset: str = "imagenet"
    encoding: str = "jpeg"
    shape: tuple[int, ...] = ()  # raw encoding: (H, W, C) of every image

    @classmethod
    def from_manifest(cls, root: str, manifest: dict, name: str) -> Split:
        dataset = manifest.get("dataset", "imagenet")
        split = manifest.get("splits", {}).get(name)
        if split is None:
            raise DataError(
                f"the dataset at {root} has no '{name}' split (it has "
                f"{sorted(manifest.get('splits', {}))}). {prepare_hint(root, dataset)}"
            )
        shards = split["shards"]
        image = manifest.get("image", {})
        return cls(root, name, tuple(s["path"] for s in shards),
                   tuple(int(s["rows"]) for s in shards), tuple(s["sha256"] for s in shards),
                   tuple(int(s["bytes"]) for s in shards), dataset,
                   image.get("encoding", "jpeg"), tuple(image.get("shape", ())))

    @property
    def num_images(self) -> int:
        return sum(self.rows)

    @property
    def offsets(self) -> np.ndarray:
        """Global id of each shard's first row; a row's id is offsets[shard] + row."""
        return np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)


def read_shard(fs, base: str, split: Split, index: int, *, verify: bool = True):
    """Fetch shard ``index`` whole, check it, and return (images, labels int64 [n]).

    One request of the size the manifest records (a ranged GET on S3: s3fs would otherwise send
    a HEAD first to learn the size). ``images`` is the pyarrow binary column for ``jpeg`` (row i
    = ``images[i].as_py()``) and a uint8 array [n, H, W, C] viewing the shard's bytes for ``raw``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rel = split.paths[index]
    where = f"{split.root}/{rel}"
    hint = prepare_hint(split.root, split.dataset)
    try:
        end = split.nbytes[index] if split.nbytes else None
        blob = fs.cat_file(posixpath.join(base, rel), start=0 if end else None, end=end)
    except FileNotFoundError as err:
        raise DataError(f"{where} is missing although manifest.json lists it; the dataset is "
                        f"incomplete. {hint}") from err
    except Exception as err:
        raise DataError(f"could not read {where} ({type(err).__name__}: {err}). Check data.root "
                        "and your credentials.") from err
    if verify and hashlib.sha256(blob).hexdigest() != split.sha256[index]:
        raise DataError(f"{where} does not match the sha256 in manifest.json; it was changed or "
                        f"only partly copied. Copy it again or {hint[0].lower()}{hint[1:]}")
    try:
        table = pq.read_table(pa.BufferReader(blob), columns=["image", "label"])
    except Exception as err:
        raise DataError(f"{where} is not a readable shard ({type(err).__name__}: {err}). "
                        f"{hint}") from err
    if table.num_rows != split.rows[index]:
        raise DataError(f"{where} has {table.num_rows} rows, manifest.json says "
                        f"{split.rows[index]}. {hint}")
    images = table.column("image").combine_chunks()
    labels = table.column("label").to_numpy().astype(np.int64)
    if split.encoding == "raw":
        images = _raw_images(images, split.shape, where, hint)
    return images, labels


def _raw_images(col, shape: tuple[int, ...], where: str, hint: str) -> np.ndarray:
    """uint8 [n, *shape] viewing a binary column whose every value is one raw image."""
    size = int(np.prod(shape))
    n = len(col)
    _, offsets_buf, values = col.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, n + 1, offset=col.offset * 4)
    if n and (np.any(np.diff(offsets) != size)):
        raise DataError(f"{where}: not every image holds {size} bytes ({'x'.join(map(str, shape))}"
                        f" uint8) as manifest.json says. {hint}")
    if n == 0:
        return np.zeros((0, *shape), np.uint8)
    return np.frombuffer(values, np.uint8, n * size, offset=int(offsets[0])).reshape(n, *shape)


# --------------------------------------------------------------------------------------------
# The epoch order and each rank's part of it
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Writing: shards, the destination check and the manifest (both prepare commands)
# --------------------------------------------------------------------------------------------


def shard_table(images: list, labels, widths, heights, paths: list[str], meta: dict):
    """The one shard schema, with ``meta`` (plan, skipped, stats) in the Parquet metadata."""
    import pyarrow as pa

    return pa.table({
        "image": pa.array(images, type=pa.binary()),
        "label": pa.array(labels, type=pa.int16()),
        "width": pa.array(widths, type=pa.int32()),
        "height": pa.array(heights, type=pa.int32()),
        "path": pa.array(paths, type=pa.string()),
    }).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def put_atomic(fs, local: str, final: str) -> None:
    """Put a local file at ``final`` so that the final name only ever holds the whole file."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(final), exist_ok=True)
        staged = f"{final}.tmp-{os.getpid()}"
        shutil.copyfile(local, staged)
        os.replace(staged, final)  # rename is atomic within one filesystem
    else:
        fs.put_file(local, final)  # one PUT: an object appears whole or not at all


def write_shard(dest: str, rel: str, table) -> dict:
    """Write ``table`` (from :func:`shard_table`) as ``dest/rel`` atomically; return its record."""
    import pyarrow.parquet as pq

    fs, base = url_to_fs(dest)
    tmpdir = tempfile.mkdtemp(prefix="rc-shard-")
    try:
        tmp = os.path.join(tmpdir, "shard.parquet")
        # Images do not compress (JPEG) or barely (raw CIFAR); one row group per shard, read
        # whole by the loader.
        pq.write_table(table, tmp, compression="none", row_group_size=max(1, table.num_rows))
        size, sha = os.path.getsize(tmp), hash_file(tmp)
        try:
            put_atomic(fs, tmp, posixpath.join(base, rel))
        except Exception as err:
            raise DataError(f"could not write {rel} to {dest} ({type(err).__name__}: {err}). "
                            "Check --dest and your credentials, then run prepare again (finished "
                            "shards are kept).") from err
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    meta = json.loads(table.schema.metadata[META_KEY])
    return {"path": rel, "rows": table.num_rows, "bytes": size, "sha256": sha, **meta,
            "reused": False}


def existing_shard(dest: str, rel: str, plan: str) -> dict | None:
    """The record of a finished shard already at ``dest/rel`` with this plan, or None."""
    import io

    import pyarrow.parquet as pq

    fs, base = url_to_fs(dest)
    final = posixpath.join(base, rel)
    try:
        if not fs.exists(final):
            return None
        blob = fs.cat_file(final)
        md = pq.read_metadata(io.BytesIO(blob))
        meta = json.loads((md.metadata or {}).get(META_KEY, b"{}"))
    except Exception:  # unreadable or foreign: write it again
        return None
    if meta.get("plan") != plan:
        return None
    return {"path": rel, "rows": md.num_rows, "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(), **meta, "reused": True}


def check_dest(dest: str, plan: str, *, dataset: str) -> dict | None:
    """Before a prepare writes: the finished manifest if ``dest`` already holds this exact
    dataset (same ``plan``), None if it holds none; DataError if it holds another one.

    A CIFAR-10 folder in the old single-file layout is not refused: its files are removed (this
    version cannot read them) and the shards are written in their place.
    """
    fs, base = url_to_fs(dest)
    try:
        path = posixpath.join(base, MANIFEST)
        if fs.exists(path):
            old = json.loads(fs.cat_file(path))
            if old.get("plan") == plan:
                return old
            raise DataError(
                f"{dest} already holds a prepared {old.get('dataset', 'imagenet')} dataset made "
                "from other inputs or options; it is left untouched. Choose another --dest (or "
                "delete that one yourself)."
            )
        if dataset == "cifar10" and _legacy_cifar(fs, base):
            for name in LEGACY_CIFAR_FILES:  # meta.json first: the folder then reads as unfinished
                if fs.exists(posixpath.join(base, name)):
                    fs.rm(posixpath.join(base, name))
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"could not use --dest {dest} ({type(err).__name__}: {err}). Check the "
                        "URI and your credentials (AWS_ENDPOINT_URL for a non-AWS S3).") from err
    return None


def write_manifest(dest: str, manifest: dict, name: str = MANIFEST) -> None:
    """Put ``manifest`` as ``dest/name`` atomically (the last thing a prepare writes)."""
    fs, base = url_to_fs(dest)
    tmpdir = tempfile.mkdtemp(prefix="rc-manifest-")
    try:
        tmp = os.path.join(tmpdir, name)
        Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            put_atomic(fs, tmp, posixpath.join(base, name))
        except Exception as err:
            raise DataError(f"could not write {name} to {dest} ({type(err).__name__}: {err}); "
                            "run prepare again to finish (every shard is kept).") from err
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def splits_of(records: list[dict], names: tuple[str, ...]) -> dict:
    """The manifest's ``splits`` from shard records (path, rows, bytes, sha256), by split."""
    splits = {}
    for split in names:
        shards = [{k: r[k] for k in ("path", "rows", "bytes", "sha256")}
                  for r in records if r["path"].startswith(f"{split}/")]
        splits[split] = {"num_images": sum(s["rows"] for s in shards),
                         "bytes": sum(s["bytes"] for s in shards), "shards": shards}
    return splits


def build_manifest(*, dataset: str, source: dict, image: dict, classes: list[str], splits: dict,
                   mean: list, skipped: list, plan: str, summary: dict, **extra) -> dict:
    """The manifest both prepare commands write; ``extra`` adds dataset-specific keys (PCA)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "dataset": dataset,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "image": image,
        "classes": classes,
        "splits": splits,
        "mean": mean,
        **extra,
        "skipped": skipped,
        "plan": plan,
        # what a re-run of the same prepare prints (it writes nothing)
        "summary": {k: v for k, v in summary.items() if k not in ("dest", "reused_shards", "seconds")},
    }

