"""Read ImageNet as it is downloaded: the ILSVRC2012 tars and devkit, on a disk or any fsspec URI.

- ``ILSVRC2012_img_train.tar``: a tar of 1,000 per-class tars (``n01440764.tar`` ...), each a
  flat tar of that class's JPEGs.
- ``ILSVRC2012_img_val.tar``: a flat tar of 50,000 JPEGs (``ILSVRC2012_val_00000001.JPEG`` ...).
- ``ILSVRC2012_devkit_t12.tar.gz``: ``data/meta.mat`` (the ``synsets`` struct array: fields
  ``ILSVRC2012_ID``, ``WNID``, ``words``, ``gloss``, ``num_children``, ...; the 1,000 classes
  are the leaves, ``num_children == 0``) and ``data/ILSVRC2012_validation_ground_truth.txt``
  (the ILSVRC2012_ID of each val image, in sorted filename order). torchvision's
  ``datasets.ImageNet`` (``parse_devkit_archive``, ``parse_meta_mat``) reads the same files.

Nothing is extracted. A tar stores its members uncompressed and contiguous, so every image,
nested class tars included, is one byte range of the outer file: :func:`index_class_tars` and
:func:`index_flat_tar` read only the 512-byte headers (a seek per member; on S3 a small ranged
GET each, 256 class tars at a time) and return each image's ``(offset, size)``.
:func:`read_ranges` then fetches any set of ranges: ``pread`` on a local file, concurrent
ranged GETs (``fs.cat_ranges``) on an object store.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import posixpath
import tarfile
from dataclasses import dataclass

from resnet_cluster.data.shards import url_to_fs
from resnet_cluster.errors import DataError

# Bytes fetched per header read on an object store (one ranged GET): a 512-byte header, a
# GNU/pax name record, and the next header of a small member; larger blocks would move
# ImageNet's data (110 KB per image) to the indexing process for nothing.
INDEX_BLOCK = 1 << 12
INDEX_THREADS = 16  # class tars indexed at once from a local disk
# ... from an object store. A class tar's headers are a chain (each gives the next one's
# offset), so each costs one GET latency per member; 256 chains in flight divide the
# ImageNet total (1.28M members) by 256.
INDEX_THREADS_REMOTE = 256
DEVKIT_META = "data/meta.mat"
DEVKIT_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"


@dataclass(frozen=True)
class Member:
    """One file inside an archive: its name and where its bytes are in the OUTER file."""

    name: str
    offset: int
    size: int


def is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _open(uri: str):
    """A seekable binary file on ``uri``: the OS file locally, a small-block reader elsewhere
    (the default 5-50 MB read-ahead of an object-store file would fetch whole class tars just
    to read their headers). On S3 the client gets a connection pool as large as the index's
    thread pool (botocore's default is 10 connections)."""
    fs, path = url_to_fs(uri)
    if is_local(fs):
        return open(path, "rb")
    if "s3" in fs.protocol:
        import fsspec

        fs = fsspec.filesystem("s3", **{**fs.storage_options, "config_kwargs": {
            **fs.storage_options.get("config_kwargs", {}),
            "max_pool_connections": INDEX_THREADS_REMOTE}})
    return fs.open(path, "rb", block_size=INDEX_BLOCK, cache_type="readahead")


class _Window:
    """``size`` bytes of ``f`` from ``start``, as a file of their own (positions from 0).

    tarfile needs this for a nested tar: it only treats a bad first header as "not a tar" at
    position 0, and the window stops it from reading past the member into the next one.
    """

    def __init__(self, f, start: int, size: int):
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        left = max(0, self._size - self._pos)
        n = left if n is None or n < 0 else min(n, left)
        if n == 0:
            return b""
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data


def _members(f, size: int, where: str, *, base: int = 0) -> list[Member]:
    """The regular files of the tar held in ``f`` (``size`` bytes), offsets plus ``base``.

    Raises DataError naming ``where`` when it is not a tar, a member runs past its end, or a
    header in the middle is damaged (tarfile would otherwise stop there without a word).
    """
    try:
        tf = tarfile.open(fileobj=f, mode="r:")
        out = []
        for m in tf:
            if m.offset_data + m.size > size:
                raise DataError(f"{where}: member {m.name} runs past the end of the archive "
                                f"({m.offset_data + m.size} > {size} bytes); the file is "
                                "truncated. Download it again.")
            if m.isfile():
                out.append(Member(m.name, base + m.offset_data, m.size))
        end = tf.offset
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{where} is not a readable tar ({type(err).__name__}: {err}). Download "
                        "it again (ILSVRC2012 archives are plain, uncompressed tars).") from None
    f.seek(end)
    rest = f.read(tarfile.BLOCKSIZE)
    if rest.strip(b"\0"):  # not the end-of-archive zeros: tarfile stopped at a bad header
        raise DataError(f"{where}: the tar header at byte {end} is damaged, so the members after "
                        f"it cannot be listed ({len(out)} were). Download the archive again.")
    return out


def _size(uri: str, where: str, expected: str) -> int:
    fs, path = url_to_fs(uri)
    try:
        return fs.size(path)
    except FileNotFoundError:
        raise DataError(f"{where} does not exist; pass {expected} (a local path or an fsspec URI "
                        f"such as s3://bucket/{expected}).") from None


def _basename(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def index_class_tars(uri: str, *, threads: int | None = None,
                     map_batches=None) -> dict[str, list[Member]]:
    """``{wnid: [image members]}`` of a train tar of per-class tars, wnids sorted, each list in
    name order. Member names are the file names inside the class tar (``n01440764_10026.JPEG``);
    files in subfolders of a class tar are left out, as the folder layout leaves them out.

    The outer tar's headers are read here; the class tars' headers by :func:`index_classes`
    on a thread pool here, or, given ``map_batches(fn, uri, classes)`` (the Ray runner's), by
    ``fn`` on batches of class tars elsewhere, whose results it returns concatenated.
    """
    where = f"--train {uri}"
    total = _size(uri, where, "ILSVRC2012_img_train.tar")
    with _open(uri) as f:
        outer = _members(f, total, where)
    classes = sorted((posixpath.basename(m.name)[:-4], m) for m in outer
                     if m.name.endswith(".tar"))
    if not classes:
        raise DataError(f"{where} holds no per-class tars; expected ILSVRC2012_img_train.tar, "
                        "whose members are n01440764.tar, n01443537.tar, ...")
    if map_batches is not None:
        return dict(sorted(map_batches(index_classes, uri, classes)))
    return dict(index_classes(uri, classes, threads))


def index_classes(uri: str, classes: list[tuple[str, Member]],
                  threads: int | None = None) -> list[tuple[str, list[Member]]]:
    """``(wnid, image members)`` of each class tar (a member of the train tar at ``uri``),
    ``threads`` class tars at a time (each one's headers are a chain of dependent reads)."""
    where = f"--train {uri}"

    def one(item):
        wnid, m = item
        with _open(uri) as f:
            inner = _members(_Window(f, m.offset, m.size), m.size, f"{where}: {m.name}",
                             base=m.offset)
        return wnid, sorted((Member(_basename(x.name), x.offset, x.size) for x in inner
                             if "/" not in _basename(x.name)), key=lambda x: x.name)

    if threads is None:
        threads = INDEX_THREADS if is_local(url_to_fs(uri)[0]) else INDEX_THREADS_REMOTE
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(classes)))) as pool:
        return list(pool.map(one, classes))


def index_flat_tar(uri: str, flag: str = "--val") -> list[Member]:
    """The top-level files of a flat tar (the val tar), in name order."""
    where = f"{flag} {uri}"
    total = _size(uri, where, "ILSVRC2012_img_val.tar")
    with _open(uri) as f:
        members = _members(f, total, where)
    return sorted((Member(_basename(m.name), m.offset, m.size) for m in members
                   if "/" not in _basename(m.name)), key=lambda m: m.name)


def is_archive(path: str) -> bool:
    """Whether ``--train``/``--val`` names an archive (any URI, or a local file) rather than an
    extracted folder."""
    fs, p = url_to_fs(path)
    return not (is_local(fs) and os.path.isdir(p))


# --------------------------------------------------------------------------------------------
# The devkit
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Devkit:
    wnid_of_id: dict[int, str]  # ILSVRC2012_ID -> wnid, the leaf synsets (the classes)
    words: dict[str, str]  # wnid -> its words ("tench, Tinca tinca")
    val_ids: list[int]  # ILSVRC2012_ID of val image 1, 2, ... (sorted filename order)


def read_devkit(uri: str) -> Devkit:
    """Parse ILSVRC2012_devkit_t12.tar.gz (``data/meta.mat`` through scipy.io, and the val
    ground truth) from a local path or fsspec URI."""
    import scipy.io

    where = f"--devkit {uri}"
    fs, path = url_to_fs(uri)
    try:
        blob = fs.cat_file(path)
    except FileNotFoundError:
        raise DataError(f"{where} does not exist; pass ILSVRC2012_devkit_t12.tar.gz.") from None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tf:
            for m in tf:
                for want in (DEVKIT_META, DEVKIT_TRUTH):
                    if m.isfile() and (m.name == want or m.name.endswith("/" + want)):
                        files[want] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{where} is not a readable tar.gz ({type(err).__name__}: {err}).") from None
    missing = [w for w in (DEVKIT_META, DEVKIT_TRUTH) if w not in files]
    if missing:
        raise DataError(f"{where} has no {' or '.join(missing)}; pass the ILSVRC2012 devkit "
                        "(ILSVRC2012_devkit_t12.tar.gz, which holds both).")
    try:
        synsets = scipy.io.loadmat(io.BytesIO(files[DEVKIT_META]), squeeze_me=True)["synsets"]
        import numpy as np

        synsets = np.atleast_1d(synsets)
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        wnid_of_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        words = {str(s["WNID"]): str(s["words"]) for s in leaves}
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise DataError(f"{where}: {DEVKIT_META} does not hold the ILSVRC2012 'synsets' struct "
                        f"array (fields ILSVRC2012_ID, WNID, words, num_children): "
                        f"{type(err).__name__}: {err}.") from None
    try:
        val_ids = [int(x) for x in files[DEVKIT_TRUTH].split()]
    except ValueError as err:
        raise DataError(f"{where}: {DEVKIT_TRUTH} should hold one integer per line ({err}).") from None
    return Devkit(wnid_of_id, words, val_ids)


# --------------------------------------------------------------------------------------------
# Reading image bytes
# --------------------------------------------------------------------------------------------


def read_ranges(uri: str, ranges: list[tuple[int, int]]) -> list[bytes | Exception]:
    """The bytes of each ``(offset, size)`` of the file at ``uri``, or the exception that
    reading it raised (the caller lists the image as skipped).

    Local: one file handle and a ``pread`` per range. Object stores: ``fs.cat_ranges``, which
    s3fs runs as concurrent ranged GETs.
    """
    fs, path = url_to_fs(uri)
    out: list[bytes | Exception] = []
    if is_local(fs):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            return [err] * len(ranges)
        try:
            for off, size in ranges:
                try:
                    data = os.pread(fd, size, off)
                    if len(data) != size:
                        raise EOFError(f"{size - len(data)} bytes missing at the end of {uri}")
                    out.append(data)
                except (OSError, EOFError) as err:
                    out.append(err)
        finally:
            os.close(fd)
        return out
    got = fs.cat_ranges([path] * len(ranges), [o for o, _ in ranges],
                        [o + s for o, s in ranges], on_error="return")
    for (_, size), data in zip(ranges, got):
        if isinstance(data, bytes) and len(data) != size:
            data = EOFError(f"{size - len(data)} bytes missing at the end of {uri}")
        out.append(data)
    return out
