"""CIFAR-10: read the official archive, download it, and prepare it as shards on any fsspec URI.

The official ``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/`` with five training
batches of 10,000 images, one test batch and ``batches.meta``. Each batch is a Python 2 pickle of
a dict whose ``data`` entry is a uint8 array [10000, 3072] in CHW order (1024 red values, then
1024 green, then 1024 blue, each row-major over 32x32) and whose ``labels`` entry is a list of
ints. Loaded in Python 3 the keys come back as bytes (``b"data"``); pickles re-written by Python 3
tools have str keys. Both are accepted.

``prepare_cifar10`` writes the archive in the shard format of :mod:`resnet_cluster.data.shards`,
the one ImageNet uses, read by the same streaming reader (:mod:`resnet_cluster.data.streaming`)::

    <dest>/train/00000.parquet ...  50 shards of 1,000 training images (shuffled once, seed 0)
    <dest>/test/00000.parquet ...   10 shards of the 10,000 test images, in the official order
    <dest>/manifest.json            encoding raw (32x32x3 uint8, HWC), per-shard rows, bytes and
                                    sha256, the classes, the per-pixel training mean [3, 32, 32]
    <dest>/meta.json                written after the manifest: a pointer to it, for tools that
                                    look for a prepared CIFAR-10 folder by this name

Images are stored raw: 3,072 bytes each, exact, nothing to decode (see the shards module for
why not PNG or JPEG). The ``path`` column holds ``train/i`` or ``test/i``, the image's index in
the official order (data_batch_1..5 concatenated, test_batch).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import posixpath
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from resnet_cluster.data.shards import VERSION as SHARDS_VERSION
from resnet_cluster.data.shards import (
    build_manifest,
    check_dest,
    existing_shard,
    shard_table,
    splits_of,
    write_manifest,
    write_shard,
)
from resnet_cluster.errors import DataError
from resnet_cluster.fileutil import hash_file

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_BATCH = "batches.meta"

IMAGE_SHAPE = (3, 32, 32)
IMAGE_BYTES = 3 * 32 * 32  # 3072


@dataclass
class CifarArrays:
    """A CIFAR-shaped dataset held in memory.

    ``train_x``/``test_x``: uint8 [N, 3, 32, 32] (CHW, 0..255); ``train_y``/``test_y``: int64 [N].
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading the archive
# --------------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, strings, numbers and numpy arrays.

    The batches are pickles from the internet, and a pickle can run arbitrary code when loaded;
    this refuses every global except the few numpy uses to rebuild an array.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),  # how Python 3 writes bytes objects in protocol-2 pickles
    }

    def __init__(self, file: io.BufferedIOBase, where: str) -> None:
        # encoding="bytes": Python 2 str objects (the dict keys, the raw array bytes) load as
        # bytes, which is also what numpy needs to rebuild arrays pickled by Python 2.
        super().__init__(file, encoding="bytes")
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        # numpy < 2 (and so every pickle from Python 2) names numpy.core; numpy 2 calls it _core.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if module == "__builtin__":
            module = "builtins"
        if (module, name) not in self._ALLOWED:
            raise DataError(
                f"{self._where} is not a CIFAR-10 batch: its pickle asks for {module}.{name}, "
                "which a genuine batch never does, so it was not loaded. Use the official "
                f"archive from {OFFICIAL_URL}."
            )
        return super().find_class(module, name)


def _get(d: dict, key: str, where: str) -> Any:
    """``d[key]`` accepting the key as str or bytes (Python 3 vs Python 2 pickles)."""
    if key in d:
        return d[key]
    if key.encode() in d:
        return d[key.encode()]
    keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d)
    raise DataError(
        f"{where} has no '{key}' entry (it has {keys}); it is not in the official "
        f"cifar-10-python format. Use the archive from {OFFICIAL_URL}."
    )


def _load_pickle(data: bytes, where: str) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), where).load()
    except DataError:
        raise
    except Exception as err:  # a truncated or foreign file: any unpickling error
        raise DataError(
            f"{where} could not be unpickled ({type(err).__name__}: {err}); the archive is "
            f"corrupt or not in the cifar-10-python format. Download it again from {OFFICIAL_URL}."
        ) from err
    if not isinstance(obj, dict):
        raise DataError(
            f"{where} holds a {type(obj).__name__}, not the dict a CIFAR-10 batch holds; use the "
            f"archive from {OFFICIAL_URL}."
        )
    return obj


def _parse_batch(d: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(_get(d, "data", where))
    labels = np.asarray(_get(d, "labels", where), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise DataError(
            f"{where}: 'data' is {data.dtype} {list(data.shape)}, expected uint8 [n, {IMAGE_BYTES}]"
            f" (32x32 RGB in CHW order); use the archive from {OFFICIAL_URL}."
        )
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{where}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images; "
            f"the batch is corrupt. Download the archive again from {OFFICIAL_URL}."
        )
    return data.reshape(-1, *IMAGE_SHAPE), labels


class _Members:
    """Member files of ``cifar-10-batches-py/``, from a tar archive or an extracted folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._dir: Path | None = None
        if not path.exists():
            raise DataError(
                f"CIFAR-10 source {path} does not exist. Pass the path of "
                f"{ARCHIVE_NAME} (downloaded from {OFFICIAL_URL}) as --source PATH, or leave "
                "--source out to download it."
            )
        if path.is_dir():
            self._dir = path / ARCHIVE_DIR if (path / ARCHIVE_DIR).is_dir() else path
            return
        try:
            self._tar = tarfile.open(path, "r:*")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(
                f"CIFAR-10 source {path} is not a readable tar archive ({err}). Expected the "
                f"official {ARCHIVE_NAME} from {OFFICIAL_URL}; download it again if it is "
                "truncated."
            ) from err
        self._names = {m.name.removeprefix("./"): m for m in self._tar.getmembers()}

    def read(self, name: str) -> tuple[bytes, str]:
        member = f"{ARCHIVE_DIR}/{name}"
        where = f"{self.path}:{member}"
        if self._dir is not None:
            file = self._dir / name
            if not file.is_file():
                raise DataError(
                    f"{file} is missing; a CIFAR-10 folder must hold {ARCHIVE_DIR}/"
                    f"{{data_batch_1..5, test_batch, batches.meta}}. Pass the official "
                    f"{ARCHIVE_NAME} from {OFFICIAL_URL} as --source instead."
                )
            return file.read_bytes(), str(file)
        assert self._tar is not None
        info = self._names.get(member)
        if info is None or not info.isfile():
            raise DataError(
                f"CIFAR-10 archive {self.path} has no member {member}; it is not the official "
                f"{ARCHIVE_NAME} (or is truncated). Download it again from {OFFICIAL_URL}."
            )
        try:
            f = self._tar.extractfile(info)
            assert f is not None
            return f.read(), where
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(
                f"could not read {where} ({err}); the archive is corrupt or truncated. Download "
                f"it again from {OFFICIAL_URL}."
            ) from err

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def read_cifar10_archive(path: str | os.PathLike) -> CifarArrays:
    """Read the official ``cifar-10-python.tar.gz`` (or its extracted folder) into memory.

    Returns uint8 [50000, 3, 32, 32] training and [10000, 3, 32, 32] test images in CHW order,
    int64 labels, and the ten class names from ``batches.meta``.
    """
    members = _Members(Path(path))
    try:
        xs, ys = [], []
        for name in TRAIN_BATCHES:
            raw, where = members.read(name)
            x, y = _parse_batch(_load_pickle(raw, where), where)
            xs.append(x)
            ys.append(y)
        raw, where = members.read(TEST_BATCH)
        test_x, test_y = _parse_batch(_load_pickle(raw, where), where)
        raw, where = members.read(META_BATCH)
        names = _get(_load_pickle(raw, where), "label_names", where)
    finally:
        members.close()
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    train_x, train_y = np.concatenate(xs), np.concatenate(ys)
    for split, y in (("training", train_y), ("test", test_y)):
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(
                f"{path}: {split} labels span {y.min()}..{y.max()} but batches.meta names "
                f"{len(classes)} classes; the archive is corrupt. Download it again from "
                f"{OFFICIAL_URL}."
            )
    return CifarArrays(train_x, train_y, test_x, test_y, classes)


# --------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where downloads go: ``$RESNET_CLUSTER_CACHE`` or ``~/.cache/resnet-cluster``."""
    env = os.environ.get("RESNET_CLUSTER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "resnet-cluster"




def download_cifar10(
    dest_dir: str | os.PathLike,
    url: str = OFFICIAL_URL,
    *,
    md5: str | None = OFFICIAL_MD5,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Download the CIFAR-10 archive into ``dest_dir`` and return its path.

    Streams to a temporary file in ``dest_dir``, checks its md5 (skipped when ``md5`` is None,
    e.g. for a mirror that repacked the archive), then renames it into place, so an interrupted
    download never leaves a file under the final name. A file already there with the right md5
    is reused.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    name = posixpath.basename(url.split("?", 1)[0]) or ARCHIVE_NAME
    final = dest / name
    if final.is_file() and (md5 is None or hash_file(final, "md5") == md5):
        if progress:
            progress(f"using cached {final}")
        return final
    if progress:
        progress(f"downloading {url} -> {final}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=dest)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as resp:
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        out.write(chunk)
                        h.update(chunk)
            except (urllib.error.URLError, OSError, ValueError) as err:
                raise DataError(
                    f"could not download CIFAR-10 from {url} ({err}). If this machine has no "
                    f"internet access, download {ARCHIVE_NAME} elsewhere and pass it with "
                    "`--source PATH`."
                ) from err
        if md5 is not None and h.hexdigest() != md5:
            raise DataError(
                f"the file downloaded from {url} has md5 {h.hexdigest()}, not the official "
                f"{md5}; it is truncated or not the CIFAR-10 archive. Try again, or download "
                f"{ARCHIVE_NAME} yourself and pass it with `--source PATH`."
            )
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


# --------------------------------------------------------------------------------------------
# Preparing shards on any fsspec URI
# --------------------------------------------------------------------------------------------

SHARD_IMAGES = 1000  # 3 MB per shard; 50 training shards, 10 test shards
SHUFFLE_SEED = 0  # fixed: shard contents must not change between a run and its resume
ENCODING = {"encoding": "raw", "shape": [32, 32, 3], "layout": "HWC uint8"}
# meta.json, written after manifest.json: the name `data prepare cifar10` has always finished
# with, which the submit command checks for before it starts Ray.
_META = {"dataset": "cifar10", "format": 2, "manifest": "manifest.json",
         "note": "CIFAR-10 in the shard format; manifest.json describes the shards."}


def _shard_plan(split: str, x_hwc: np.ndarray, y: np.ndarray, paths: list[str]) -> str:
    """What a shard holds, as a hash: equal plans mean byte-identical content, so it is reused."""
    h = hashlib.sha256(json.dumps([SHARDS_VERSION, "cifar10", split, ENCODING]).encode())
    h.update(np.ascontiguousarray(x_hwc).tobytes())
    h.update(np.asarray(y, np.int64).tobytes())
    h.update("\n".join(paths).encode())
    return h.hexdigest()


def _cifar_shard(split: str, x_hwc: np.ndarray, y: np.ndarray, paths: list[str], plan: str):
    n = len(x_hwc)
    return shard_table([x_hwc[i].tobytes() for i in range(n)], np.asarray(y, np.int16),
                       [IMAGE_SHAPE[2]] * n, [IMAGE_SHAPE[1]] * n, paths,
                       {"plan": plan, "skipped": []})


def write_shards(
    arrays: CifarArrays,
    dest: str,
    *,
    source: str,
    shard_images: int = SHARD_IMAGES,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write ``arrays`` under ``dest`` (local path or fsspec URI) as shards + manifest.json.

    Resumable like ImageNet's prepare: each shard lands whole (atomic rename or one PUT) and
    records a hash of its content; a re-run reuses every shard whose hash matches, and a
    ``dest`` that already holds a CIFAR-10 prepared from another archive is refused.
    """
    if shard_images < 1:
        raise DataError("--shard-images must be >= 1.")
    say = progress or (lambda _msg: None)
    t0 = time.time()
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(arrays.train_x))
    jobs = []  # (split, rel, images HWC, labels, paths, plan)
    for split, x, y, idx in (("train", arrays.train_x, arrays.train_y, order),
                             ("test", arrays.test_x, arrays.test_y, np.arange(len(arrays.test_x)))):
        for k, start in enumerate(range(0, len(idx), shard_images)):
            part = idx[start:start + shard_images]
            xs = np.ascontiguousarray(x[part].transpose(0, 2, 3, 1))  # CHW -> HWC, as stored
            ys = y[part]
            paths = [f"{split}/{i:05d}" for i in part.tolist()]
            jobs.append((split, f"{split}/{k:05d}.parquet", xs, ys, paths,
                         _shard_plan(split, xs, ys, paths)))
    plan = hashlib.sha256("\n".join(j[-1] for j in jobs).encode()).hexdigest()
    old = check_dest(dest, plan, dataset="cifar10")
    if old is not None:
        write_manifest(dest, _META, name="meta.json")  # in case a kill came between the two
        say(f"{dest} already holds this CIFAR-10; nothing written")
        return {**old["summary"], "dest": dest, "already_prepared": True}

    records = []
    for n, (split, rel, xs, ys, paths, shard_plan) in enumerate(jobs, start=1):
        rec = existing_shard(dest, rel, shard_plan)
        if rec is None:
            say(f"writing {rel} ({n}/{len(jobs)})")
            rec = write_shard(dest, rel, _cifar_shard(split, xs, ys, paths, shard_plan))
        else:
            say(f"reusing {rel} ({n}/{len(jobs)})")
        records.append(rec)

    splits = splits_of(records, ("train", "test"))
    # Per-pixel mean of the training images (paper section 4.2), [3, 32, 32] CHW, 0..255.
    mean = arrays.train_x.astype(np.float64).mean(axis=0)
    summary = {
        "dataset": "cifar10",
        "dest": dest,
        "classes": list(arrays.classes),
        "num_train": splits["train"]["num_images"],
        "num_test": splits["test"]["num_images"],
        "shards": len(jobs),
        "reused_shards": sum(r["reused"] for r in records),
        "bytes": splits["train"]["bytes"] + splits["test"]["bytes"],
        "seconds": round(time.time() - t0, 3),
    }
    manifest = build_manifest(
        dataset="cifar10", source={"archive": source}, image=ENCODING,
        classes=list(arrays.classes), splits=splits, mean=mean.tolist(), skipped=[], plan=plan,
        summary=summary)
    say(f"writing manifest.json to {dest}")
    write_manifest(dest, manifest)
    write_manifest(dest, _META, name="meta.json")
    return summary


def prepare_cifar10(
    source: str | None,
    dest: str,
    *,
    shard_images: int = SHARD_IMAGES,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Turn the CIFAR-10 archive into shards + manifest.json under ``dest``.

    ``source``: a local path to ``cifar-10-python.tar.gz`` (or its extracted folder), an
    http(s) URL, or None for the official URL; downloads go to :func:`default_cache_dir`. The
    md5 is checked for the official URL only, since a mirror may repack the archive (its
    contents are still checked as they are read).

    Returns a summary: dataset, dest, classes, num_train, num_test, shards, reused_shards,
    bytes (and already_prepared when ``dest`` held exactly this dataset).
    """
    if source is None:
        source = OFFICIAL_URL
    if source.startswith(("http://", "https://")):
        md5 = OFFICIAL_MD5 if source == OFFICIAL_URL else None
        path = download_cifar10(default_cache_dir(), source, md5=md5, progress=progress)
    else:
        path = Path(source).expanduser()
    if progress:
        progress(f"reading {path}")
    arrays = read_cifar10_archive(path)
    return write_shards(arrays, dest, source=source, shard_images=shard_images,
                        progress=progress)
