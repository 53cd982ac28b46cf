"""Tests for resnet_cluster.data on CIFAR-10: archive parsing, prepare to shards, reading them
through the shared shard reader (local and S3), augmentation; and synthetic data.

Archives are built here in the genuine cifar-10-python layout (a tar.gz of
cifar-10-batches-py/ holding pickled dicts), with a few images per batch. Nothing touches the
network: downloads are exercised through file:// URLs, S3 is moto's server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from resnet_cluster.models.jobs import from_dict
from resnet_cluster.data import (
    ImageBatches,
    build_loaders_for,
    build_synthetic_loaders,
    download_cifar10,
    make_synthetic,
    prepare_cifar10,
    random_crop_flip,
    read_cifar10_archive,
)
from resnet_cluster.data.shards import read_manifest
from resnet_cluster.data.streaming import ShardBatches
from resnet_cluster.errors import DataError, UserError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 4  # images per training batch file; 5 files -> 20 training images
N_TEST = 6


class Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2's cPickle wrote the originals: every str (dict keys,
    dtype codes, the raw array bytes) as a py2 ``str`` (BINSTRING) and numpy globals under
    ``numpy.core``, so loading them exercises the real bytes-key path."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else (
            pickle.BINSTRING + struct.pack("<i", n))
        self.write(head + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "").replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str
    dispatch[type] = save_global
    dispatch[type(len)] = save_global


def _dumps(obj, style: str) -> bytes:
    if style == "py2":
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(obj)
        return buf.getvalue()
    return pickle.dumps(obj, protocol=2 if style == "py3-protocol2" else None)


STYLES = ["py2", "py3-protocol2", "py3-default"]


def _make_batches(seed: int = 0, per_batch: int = PER_BATCH, n_test: int = N_TEST):
    rng = np.random.default_rng(seed)
    train = [(rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
              rng.integers(0, 10, per_batch).tolist()) for _ in range(5)]
    test = (rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
            rng.integers(0, 10, n_test).tolist())
    return train, test


def _batch_dict(data, labels, name, bytes_keys: bool):
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    fnames = [k(f"img_{i}.png") for i in range(len(labels))]
    return {k("batch_label"): k(name), k("labels"): labels, k("data"): data,
            k("filenames"): fnames}


def write_archive(path: Path, *, bytes_keys: bool, skip: str | None = None, seed: int = 0,
                  style: str | None = None, per_batch: int = PER_BATCH, n_test: int = N_TEST):
    """Write a genuine-format cifar-10-python.tar.gz; returns (train_batches, test_batch).

    ``bytes_keys``: dict keys and names as bytes, as Python 2 pickles load in Python 3.
    ``style``: how to pickle (see ``_dumps``); defaults to "py2" with bytes keys, else
    "py3-default". ``per_batch`` images in each of the 5 training batches, ``n_test`` in the
    test batch."""
    style = style or ("py2" if bytes_keys else "py3-default")
    train, test = _make_batches(seed, per_batch, n_test)
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    members = {f"data_batch_{i + 1}": _batch_dict(x, y, f"training batch {i + 1} of 5", bytes_keys)
               for i, (x, y) in enumerate(train)}
    members["test_batch"] = _batch_dict(*test, "testing batch 1 of 1", bytes_keys)
    members["batches.meta"] = {k("num_cases_per_batch"): PER_BATCH,
                               k("label_names"): [k(c) for c in CLASSES], k("num_vis"): 3072}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            if name == skip:
                continue
            blob = _dumps(obj, style)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return train, test


def _expected(train, test):
    tx = np.concatenate([x for x, _ in train]).reshape(-1, 3, 32, 32)
    ty = np.concatenate([y for _, y in train]).astype(np.int64)
    return tx, ty, test[0].reshape(-1, 3, 32, 32), np.asarray(test[1], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Archive parsing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("bytes_keys", [True, False], ids=["bytes-keys", "str-keys"])
def test_read_archive_matches_what_was_written(tmp_path, bytes_keys, style):
    path = tmp_path / "cifar-10-python.tar.gz"
    train, test = write_archive(path, bytes_keys=bytes_keys, style=style)
    arrays = read_cifar10_archive(path)
    tx, ty, vx, vy = _expected(train, test)
    assert arrays.train_x.dtype == np.uint8 and arrays.train_x.shape == (5 * PER_BATCH, 3, 32, 32)
    assert arrays.train_y.dtype == np.int64
    np.testing.assert_array_equal(arrays.train_x, tx)
    np.testing.assert_array_equal(arrays.train_y, ty)
    np.testing.assert_array_equal(arrays.test_x, vx)
    np.testing.assert_array_equal(arrays.test_y, vy)
    assert arrays.classes == CLASSES
    # CHW: the first 1024 bytes of a row are the red plane, row-major over 32x32.
    assert arrays.train_x[0, 0, 0, 1] == train[0][0][0, 1]
    assert arrays.train_x[0, 1, 0, 0] == train[0][0][0, 1024]
    assert arrays.train_x[0, 2, 31, 31] == train[0][0][0, 3071]


def test_read_extracted_folder(tmp_path):
    path = tmp_path / "a.tar.gz"
    train, test = write_archive(path, bytes_keys=True)
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    arrays = read_cifar10_archive(tmp_path / "x")
    np.testing.assert_array_equal(arrays.train_x, _expected(train, test)[0])


def test_missing_archive_names_path(tmp_path):
    missing = tmp_path / "nope.tar.gz"
    with pytest.raises(DataError, match="nope.tar.gz"):
        read_cifar10_archive(missing)


def test_corrupt_archive_names_path(tmp_path):
    bad = tmp_path / "corrupt.tar.gz"
    bad.write_bytes(b"this is not a tar archive at all" * 10)
    with pytest.raises(DataError, match="corrupt.tar.gz") as err:
        read_cifar10_archive(bad)
    assert "--source" in str(err.value) or "download" in str(err.value).lower()


def test_missing_member_names_member(tmp_path):
    path = tmp_path / "partial.tar.gz"
    write_archive(path, bytes_keys=True, skip="test_batch")
    with pytest.raises(DataError, match="cifar-10-batches-py/test_batch"):
        read_cifar10_archive(path)


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        blob = pickle.dumps({"data": Evil()}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(DataError, match="data_batch_1"):
        read_cifar10_archive(path)


# --------------------------------------------------------------------------------------------
# Download (file:// URLs only; no network)
# --------------------------------------------------------------------------------------------


def test_download_checks_md5_and_renames(tmp_path):
    import hashlib

    src = tmp_path / "src" / "cifar-10-python.tar.gz"
    src.parent.mkdir()
    write_archive(src, bytes_keys=True)
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    got = download_cifar10(tmp_path / "cache", src.as_uri(), md5=md5)
    assert got == tmp_path / "cache" / "cifar-10-python.tar.gz"
    assert got.read_bytes() == src.read_bytes()

    with pytest.raises(DataError, match="md5"):
        download_cifar10(tmp_path / "cache2", src.as_uri(), md5="0" * 32)
    assert list((tmp_path / "cache2").iterdir()) == []  # no partial file left behind


def test_download_failure_suggests_source(tmp_path):
    with pytest.raises(DataError, match="--source PATH"):
        download_cifar10(tmp_path, (tmp_path / "absent.tar.gz").as_uri(), md5=None)


# --------------------------------------------------------------------------------------------
# Prepare: the shard format ImageNet uses
# --------------------------------------------------------------------------------------------


def _shard_rows(dest: Path, split: str) -> list[dict]:
    """Every row of a split's shards, in the manifest's order (row k has global id k)."""
    m = json.loads((dest / "manifest.json").read_text())
    rows = []
    for s in m["splits"][split]["shards"]:
        rows += pq.read_table(dest / s["path"]).to_pylist()
    return rows


def _official(train, test, path: str) -> tuple[np.ndarray, int]:
    """(CHW uint8 image, label) of the archive image a row's ``path`` names."""
    tx, ty, vx, vy = _expected(train, test)
    split, i = path.split("/")
    x, y = (tx, ty) if split == "train" else (vx, vy)
    return x[int(i)], int(y[int(i)])


@pytest.mark.parametrize("bytes_keys", [True, False], ids=["py2-bytes-keys", "str-keys"])
def test_prepare_writes_shards_and_manifest(tmp_path, bytes_keys):
    archive = tmp_path / "cifar-10-python.tar.gz"
    train, test = write_archive(archive, bytes_keys=bytes_keys)
    dest = tmp_path / "prepared"
    messages = []
    summary = prepare_cifar10(str(archive), str(dest), shard_images=6, progress=messages.append)
    tx, ty, vx, vy = _expected(train, test)

    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["manifest.json", "meta.json", "test/00000.parquet",
                     "train/00000.parquet", "train/00001.parquet", "train/00002.parquet",
                     "train/00003.parquet"]  # 20 training images in shards of 6: 6, 6, 6, 2
    assert summary["num_train"] == len(tx) == 20 and summary["num_test"] == len(vx)
    assert summary["classes"] == CLASSES and summary["shards"] == 5 and messages
    assert summary["dest"] == str(dest) and summary["bytes"] > 20 * 3072

    m = read_manifest(str(dest), "cifar10")  # the same reader and checks as ImageNet's
    assert m["dataset"] == "cifar10" and m["classes"] == CLASSES
    assert m["image"]["encoding"] == "raw" and m["image"]["shape"] == [32, 32, 3]
    assert m["source"] == {"archive": str(archive)}
    for split, n in (("train", len(tx)), ("test", len(vx))):
        shards = m["splits"][split]["shards"]
        assert sum(s["rows"] for s in shards) == n == m["splits"][split]["num_images"]
        for s in shards:
            blob = (dest / s["path"]).read_bytes()
            assert len(blob) == s["bytes"] and hashlib.sha256(blob).hexdigest() == s["sha256"]
    mean = np.asarray(m["mean"])  # per pixel, CHW, 0..255: the paper's per-pixel mean
    assert mean.shape == (3, 32, 32)
    np.testing.assert_allclose(mean, tx.astype(np.float64).mean(axis=0), rtol=0, atol=1e-9)
    assert json.loads((dest / "meta.json").read_text())["manifest"] == "manifest.json"

    # ImageNet's shard schema, with raw HWC pixels in the image column
    table = pq.read_table(dest / "train/00000.parquet")
    assert table.schema.names == ["image", "label", "width", "height", "path"]
    assert [str(t) for t in table.schema.types] == ["binary", "int16", "int32", "int32", "string"]
    for split in ("train", "test"):
        rows = _shard_rows(dest, split)
        assert sorted(r["path"] for r in rows) == [f"{split}/{i:05d}" for i in range(len(rows))]
        for r in rows:  # every image stored exactly, with its label
            img, label = _official(train, test, r["path"])
            assert r["image"] == img.transpose(1, 2, 0).tobytes() and r["label"] == label
            assert (r["width"], r["height"]) == (32, 32)
    # training images are shuffled once (so each shard samples the whole set); test keeps order
    assert [r["path"] for r in _shard_rows(dest, "train")] != sorted(
        r["path"] for r in _shard_rows(dest, "train"))
    assert [r["path"] for r in _shard_rows(dest, "test")] == [f"test/{i:05d}" for i in range(N_TEST)]

    again = prepare_cifar10(str(archive), str(dest), shard_images=6)
    assert again["already_prepared"] and again["num_train"] == 20
    other = tmp_path / "other.tar.gz"
    write_archive(other, bytes_keys=True, seed=1)
    with pytest.raises(DataError, match="already holds a prepared cifar10"):
        prepare_cifar10(str(other), str(dest), shard_images=6)


def test_prepare_to_fsspec_uri_writes_manifest_last(tmp_path, monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    archive = tmp_path / "cifar-10-python.tar.gz"
    train, test = write_archive(archive, bytes_keys=True)
    order = []
    original = MemoryFileSystem.put_file

    def recording_put_file(self, lpath, rpath, *args, **kwargs):
        order.append(rpath.split("/cifar10/", 1)[-1])
        return original(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "put_file", recording_put_file)
    uri = "memory://resnet-cluster-test/cifar10"
    try:
        prepare_cifar10(str(archive), uri, shard_images=8)
        assert order == ["train/00000.parquet", "train/00001.parquet", "train/00002.parquet",
                         "test/00000.parquet", "manifest.json", "meta.json"]
        train_b, _, info = build_loaders_for(_cfg(uri, workers=0, augment="none"), rank=0,
                                             world_size=1)
        assert info["num_train"] == 20 and len(train_b) == 5
    finally:
        MemoryFileSystem().rm("/resnet-cluster-test", recursive=True)


def test_resume_after_kill_reuses_finished_shards(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_archive(archive, bytes_keys=True)
    dest = tmp_path / "dest"
    script = textwrap.dedent(f"""
        import os, signal
        from resnet_cluster.data.cifar import prepare_cifar10
        def progress(msg):
            if msg.startswith("writing train/00002.parquet"):  # before its bytes are written
                os.kill(os.getpid(), signal.SIGKILL)
        prepare_cifar10({str(archive)!r}, {str(dest)!r}, shard_images=6, progress=progress)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (dest / "manifest.json").exists() and not (dest / "meta.json").exists()
    assert sorted(p.name for p in (dest / "train").iterdir()) == ["00000.parquet", "00001.parquet"]
    with pytest.raises(DataError, match="manifest.json is missing") as err:
        read_manifest(str(dest), "cifar10")
    assert "data prepare cifar10" in str(err.value)

    summary = prepare_cifar10(str(archive), str(dest), shard_images=6)
    assert summary["reused_shards"] == 2 and summary["shards"] == 5
    fresh = prepare_cifar10(str(archive), str(tmp_path / "fresh"), shard_images=6)
    assert fresh["reused_shards"] == 0
    a, b = read_manifest(str(dest)), read_manifest(str(tmp_path / "fresh"))
    assert a["splits"] == b["splits"] and a["mean"] == b["mean"]


def _write_legacy_layout(dest: Path, train, test) -> None:
    """A folder as `data prepare cifar10` wrote it before the shard format (meta.json format 1)."""
    tx, ty, vx, vy = _expected(train, test)
    dest.mkdir(parents=True)
    for name, x, y in (("train.parquet", tx, ty), ("test.parquet", vx, vy)):
        flat = x.reshape(len(x), -1)
        images = pa.FixedSizeBinaryArray.from_buffers(pa.binary(3072), len(x),
                                                      [None, pa.py_buffer(flat.tobytes())])
        pq.write_table(pa.table({"image": images, "label": pa.array(y, pa.int16())}), dest / name)
    np.save(dest / "mean.npy", tx.mean(0).astype(np.float32))
    (dest / "meta.json").write_text(json.dumps({
        "dataset": "cifar10", "format": 1, "classes": CLASSES, "num_train": len(tx),
        "num_test": len(vx), "mean": "mean.npy", "source": "x", "sha256": {}}))


def test_old_prepared_layout_is_a_clear_error_and_prepare_rewrites_it(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    train, test = write_archive(archive, bytes_keys=True)
    old = tmp_path / "old"
    _write_legacy_layout(old, train, test)
    with pytest.raises(DataError) as err:
        build_loaders_for(_cfg(str(old)), rank=0, world_size=1)
    msg = str(err.value)
    assert isinstance(err.value, UserError) and err.value.exit_code == 2
    assert str(old) in msg and "old single-file layout" in msg
    assert f"resnet-cluster data prepare cifar10 --dest {old}" in msg

    summary = prepare_cifar10(str(archive), str(old), shard_images=8)  # the fix it names
    assert summary["num_train"] == 20 and not summary.get("already_prepared")
    assert sorted(p.name for p in old.iterdir()) == ["manifest.json", "meta.json", "test", "train"]
    _, test_b, info = build_loaders_for(_cfg(str(old)), rank=0, world_size=1)
    assert info["num_test"] == N_TEST and sum(len(y) for _, y in test_b) == N_TEST


def test_missing_tampered_and_foreign_datasets_are_data_errors(tmp_path):
    missing = str(tmp_path / "nothing-here")
    with pytest.raises(DataError) as err:
        build_loaders_for(_cfg(missing), rank=0, world_size=1)
    msg = str(err.value)
    assert "no prepared CIFAR-10 dataset" in msg and missing in msg and "manifest.json" in msg
    assert f"data prepare cifar10 --dest {missing}" in msg

    archive = tmp_path / "a.tar.gz"
    write_archive(archive, bytes_keys=True)
    dest = tmp_path / "d"
    prepare_cifar10(str(archive), str(dest), shard_images=8)
    with pytest.raises(DataError, match="holds a prepared cifar10 dataset but the job says "
                                        "data.dataset: imagenet"):
        build_loaders_for(from_dict({"data": {"dataset": "imagenet", "root": str(dest)},
                                     "train": {"iterations": 1}}), rank=0, world_size=1)
    shard = dest / "train" / "00001.parquet"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10] + b"0123456789")  # same size, different bytes
    for workers in (0, 2):
        train_b, _, _ = build_loaders_for(_cfg(str(dest), workers=workers, augment="none"),
                                          rank=0, world_size=1)
        with pytest.raises(DataError) as err:
            list(train_b)
        # the message alone, also from a DataLoader worker (no pasted traceback)
        assert str(err.value).startswith(f"{dest}/train/00001.parquet does not match the sha256")
        assert "Traceback" not in str(err.value) and "data prepare cifar10" in str(err.value)
        train_b.close()
    shard.write_bytes(good)
    manifest = json.loads((dest / "manifest.json").read_text())
    (dest / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(DataError, match="version"):
        build_loaders_for(_cfg(str(dest)), rank=0, world_size=1)


# --------------------------------------------------------------------------------------------
# Reading CIFAR-10 through the shared shard reader (the one ImageNet uses)
# --------------------------------------------------------------------------------------------

BIG_PER_BATCH, BIG_TEST = 9, 13  # 45 training images in shards of 4 (12 shards), 13 test


def _cfg(root: str, *, workers: int = 0, augment: str = "paper", batch: int = 4,
         world: int = 1, seed: int = 0, **data) -> object:
    return from_dict({"seed": seed,
                      "data": {"dataset": "cifar10", "root": root, "augment": augment,
                               "loader_workers": workers, **data},
                      "train": {"batch_size": batch * world, "iterations": 2},
                      "scaling": {"workers": world}})


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cifar-big")
    archive = tmp / "cifar-10-python.tar.gz"
    train, test = write_archive(archive, bytes_keys=True, per_batch=BIG_PER_BATCH, n_test=BIG_TEST)
    dest = tmp / "dest"
    prepare_cifar10(str(archive), str(dest), shard_images=4)
    return archive, dest, train, test


def _served(loader: ShardBatches, epoch: int) -> dict:
    """{global id: (x, y)} ``loader`` serves in ``epoch``."""
    assert isinstance(loader, ShardBatches)
    loader.set_epoch(epoch)
    loader.yield_ids = True
    out = {}
    for x, y, ids in loader:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
        for xi, yi, gid in zip(x, y.tolist(), ids.tolist()):
            assert gid not in out
            out[gid] = (xi, yi)
    assert sorted(out) == sorted(np.concatenate(loader.plan()).tolist())
    return out


def _check_rows(dest: Path, split: str, served: dict, train, test, mean, *, exact: bool):
    rows = _shard_rows(dest, split)
    for gid, (x, y) in served.items():
        img, label = _official(train, test, rows[gid]["path"])
        assert y == label  # labels preserved
        if exact:  # no augmentation: x is the original image, minus the per-pixel mean, / 255
            torch.testing.assert_close(x, (torch.from_numpy(img).float() - mean) / 255.0,
                                       rtol=0, atol=0)


@pytest.fixture
def s3_cifar(big, s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="data")
    archive, dest, _, _ = big
    uri = "s3://data/cifar10"
    prepare_cifar10(str(archive), uri, shard_images=4)
    return uri


@pytest.mark.parametrize("source", ["local", "s3"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_image_once_per_epoch_across_ranks(big, request, source, world):
    """Train: disjoint parts, equal steps, only the remainder sits out, a new order each epoch.
    Test: all images exactly once. Labels and pixels are the archive's. From S3 the reading
    runs in 2 DataLoader worker processes (forked, each with its own S3 client)."""
    _, dest, train, test = big
    root = request.getfixturevalue("s3_cifar") if source == "s3" else str(dest)
    workers = 2 if source == "s3" else 0
    mean = torch.tensor(read_manifest(str(dest))["mean"], dtype=torch.float32)
    n, batch = 5 * BIG_PER_BATCH, 4
    train_ids = {0: [], 1: []}
    test_ids, steps = [], set()
    for r in range(world):  # one loader per rank for both epochs, as in training
        train_b, test_b, _ = build_loaders_for(
            _cfg(root, workers=workers, augment="none", world=world), rank=r, world_size=world)
        for epoch in (0, 1):
            served = _served(train_b, epoch)
            _check_rows(dest, "train", served, train, test, mean, exact=True)
            train_ids[epoch] += list(served)
            steps.add(len(served) // batch)
        served = _served(test_b, 0)
        _check_rows(dest, "test", served, train, test, mean, exact=True)
        test_ids += list(served)
        train_b.close()
        test_b.close()
    assert steps == {(n // world) // batch}  # the same number of steps on every rank
    for ids in train_ids.values():
        assert len(set(ids)) == len(ids) and n - len(ids) < world * batch  # disjoint parts
    assert sorted(test_ids) == list(range(BIG_TEST))  # the whole test set, once
    orders = [train_ids[0], train_ids[1]]
    assert orders[0] != orders[1]  # reshuffled each epoch


def test_workers_and_s3_serve_the_same_augmented_batches(big, s3_cifar):
    """The paper's augmentation through the shard reader: every training image is a pad-4
    crop (padded with the mean) of its normalised original, or its mirror; the draws depend on
    (seed, epoch, image) only, so 0 or 2 workers, local or S3 give identical tensors, and a
    later epoch draws new ones. Persistent workers follow set_epoch."""
    _, dest, train, test = big
    mean = torch.tensor(read_manifest(str(dest))["mean"], dtype=torch.float32)
    rows = _shard_rows(dest, "train")
    got = {}
    for name, root, workers in (("local0", str(dest), 0), ("local2", str(dest), 2),
                                ("s3", s3_cifar, 2)):
        train_b, _, _ = build_loaders_for(_cfg(root, workers=workers, world=2, seed=3), rank=1,
                                          world_size=2)
        train_b.yield_ids = True
        for epoch in (0, 1, 0):  # the same worker processes serve every epoch
            train_b.set_epoch(epoch)
            out = {gid: (xi, yi) for x, y, ids in train_b
                   for xi, yi, gid in zip(x, y.tolist(), ids.tolist())}
            assert sorted(out) == sorted(np.concatenate(train_b.plan()).tolist())
            got.setdefault(name, []).append(out)
        train_b.close()
    ref = got["local0"]
    for name in ("local2", "s3"):
        for e in range(3):
            assert ref[e].keys() == got[name][e].keys()
            assert all(torch.equal(ref[e][k][0], got[name][e][k][0]) for k in ref[e]), name
    assert all(torch.equal(ref[0][k][0], ref[2][k][0]) for k in ref[0])  # epoch 0 again
    kinds = set()
    for gid, (x, y) in ref[0].items():
        img, label = _official(train, test, rows[gid]["path"])
        assert y == label
        cands = _candidates((torch.from_numpy(img).float() - mean) / 255.0)
        match = [k for k in range(len(cands)) if torch.equal(x, cands[k])]
        assert match, f"image {gid} is not a pad-4 crop (or its mirror) of its original"
        kinds.add(match[0])
    assert len(kinds) > 5  # offsets and flips vary
    common = ref[0].keys() & ref[1].keys()
    assert any(not torch.equal(ref[0][k][0], ref[1][k][0]) for k in common)  # new draws


def test_one_storage_client_per_process_and_a_fresh_one_after_fork(s3_endpoint):
    """What the reader relies on (shards.url_to_fs): within a process every shard, pass and
    epoch reuses one s3fs client; a forked DataLoader worker gets its own, which works."""
    import boto3

    from resnet_cluster.data.shards import url_to_fs

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="forks")
    fs, _ = url_to_fs("s3://forks/a")
    fs.pipe("forks/a/x", b"shard bytes")
    assert url_to_fs("s3://forks/b")[0] is fs
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new client on its own event loop, reading over HTTP
        try:
            child, _ = url_to_fs("s3://forks/a")
            ok = child is not fs and child.cat_file("forks/a/x", start=0, end=5) == b"shard"
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1" and status == 0
    assert url_to_fs("s3://forks/a")[0].cat_file("forks/a/x") == b"shard bytes"  # parent's still works


def test_pad_crop_params_cover_the_range_evenly():
    from resnet_cluster.data.transforms import pad_crop_params

    p = pad_crop_params(0, 0, np.arange(90_000))
    assert p.shape == (90_000, 3) and p.dtype == np.int64
    for col, k in ((0, 9), (1, 9), (2, 2)):
        counts = np.bincount(p[:, col], minlength=k)
        assert len(counts) == k and np.all(np.abs(counts / len(p) - 1 / k) < 0.01)
    assert np.array_equal(p[17:20], pad_crop_params(0, 0, np.arange(17, 20)))  # per image
    assert not np.array_equal(p[:100], pad_crop_params(0, 1, np.arange(100)))  # per epoch
    assert not np.array_equal(p[:100], pad_crop_params(1, 0, np.arange(100)))  # per seed


# --------------------------------------------------------------------------------------------
# ImageBatches: sharding and normalisation
# --------------------------------------------------------------------------------------------


def _ids_dataset(n: int):
    """Random images whose label is their own index, so batches reveal which images they hold."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    mean = images.float().mean(0)
    return images, torch.arange(n), mean


def _epoch_ids(loader: ImageBatches, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [int(i) for _, y in loader for i in y]


def test_train_sharding_disjoint_equal_and_reshuffled():
    images, labels, mean = _ids_dataset(103)
    loaders = [ImageBatches(images, labels, batch_size=8, rank=r, world_size=2, seed=7,
                            train=True, augment=False, mean=mean) for r in range(2)]
    assert [len(ld) for ld in loaders] == [(103 // 2) // 8] * 2 == [6, 6]
    ids0 = [_epoch_ids(ld, 0) for ld in loaders]
    assert len(ids0[0]) == len(ids0[1]) == 48
    assert not set(ids0[0]) & set(ids0[1])
    ids1 = [_epoch_ids(ld, 1) for ld in loaders]
    assert ids1 != ids0  # a new permutation each epoch
    # deterministic: a fresh loader with the same seed reproduces each epoch exactly
    again = ImageBatches(images, labels, batch_size=8, rank=1, world_size=2, seed=7,
                         train=True, augment=False, mean=mean)
    assert _epoch_ids(again, 1) == ids1[1] and _epoch_ids(again, 0) == ids0[1]
    # the two ranks' full shards (before dropping the partial batch) share one permutation
    shards = [set(ld.indices().tolist()) for ld in loaders]
    assert not shards[0] & shards[1] and len(shards[0]) == len(shards[1]) == 51
    other_seed = ImageBatches(images, labels, batch_size=8, rank=0, world_size=2, seed=8,
                              train=True, augment=False, mean=mean)
    assert _epoch_ids(other_seed, 0) != ids0[0]


def test_batches_are_normalised_images():
    images, labels, mean = _ids_dataset(20)
    loader = ImageBatches(images, labels, batch_size=4, rank=0, world_size=1, seed=0,
                          train=True, augment=False, mean=mean)
    x, y = next(iter(loader))
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    torch.testing.assert_close(x, (images[y].float() - mean) / 255.0)


def test_eval_sharding_covers_every_image_once():
    images, labels, mean = _ids_dataset(23)
    seen = []
    for r in range(3):
        loader = ImageBatches(images, labels, batch_size=4, rank=r, world_size=3, seed=0,
                              train=False, augment=True, mean=mean)
        batches = list(loader)
        assert len(batches) == len(loader)
        for x, y in batches:  # no augmentation in eval, even if asked
            torch.testing.assert_close(x, (images[y].float() - mean) / 255.0)
        seen += [int(i) for _, y in batches for i in y]
    assert sorted(seen) == list(range(23))


def test_too_few_images_for_one_batch_is_a_data_error():
    images, labels, mean = _ids_dataset(10)
    with pytest.raises(DataError, match="batch"):
        ImageBatches(images, labels, batch_size=8, rank=0, world_size=2, seed=0,
                     train=True, augment=False, mean=mean)


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def _candidates(img: torch.Tensor) -> torch.Tensor:
    """All 9 x 9 x 2 pad-4 crops of one normalised image [3,32,32], flipped and not."""
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    crops = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    crops += [c.flip(-1) for c in crops]
    return torch.stack(crops)


def test_random_crop_flip_is_a_shifted_or_flipped_copy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=g)
    out = random_crop_flip(x, torch.Generator().manual_seed(123))
    assert out.shape == x.shape
    kinds = set()
    for i in range(len(x)):
        cands = _candidates(x[i])
        match = [k for k in range(len(cands)) if torch.equal(out[i], cands[k])]
        assert match, f"image {i} is not a pad-4 crop (or its flip) of the input"
        kinds.add(match[0])
    assert len(kinds) > 10  # offsets and flips vary across the batch
    # exact check of one draw against manual pad + slice with the same generator stream
    g2 = torch.Generator().manual_seed(5)
    offsets = torch.randint(0, 9, (len(x), 2), generator=g2)
    flips = torch.rand(len(x), generator=g2) < 0.5
    out2 = random_crop_flip(x, torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        dy, dx = offsets[i].tolist()
        want = padded[i, :, dy:dy + 32, dx:dx + 32]
        torch.testing.assert_close(out2[i], want.flip(-1) if flips[i] else want)
    # padding sits at the mean: a zero pixel after normalisation
    assert (out2 == 0).any()


def test_augmented_batches_deterministic_per_epoch_and_rank():
    images, labels, mean = _ids_dataset(32)

    def first_batch(epoch, rank=0):
        ld = ImageBatches(images, labels, batch_size=8, rank=rank, world_size=2, seed=3,
                          train=True, augment=True, mean=mean)
        ld.set_epoch(epoch)
        return next(iter(ld))

    (xa, ya), (xb, yb) = first_batch(0), first_batch(0)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xc, _ = first_batch(1)
    assert not torch.equal(xa, xc)
    normalised = (images[ya].float() - mean) / 255.0
    for i in range(len(ya)):
        assert any(torch.equal(xa[i], c) for c in _candidates(normalised[i]))


# --------------------------------------------------------------------------------------------
# Synthetic data and build_loaders
# --------------------------------------------------------------------------------------------


def test_synthetic_deterministic_and_learnable():
    a = make_synthetic(200, 100, seed=1)
    b = make_synthetic(200, 100, seed=1)
    c = make_synthetic(200, 100, seed=2)
    for f in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.train_x, c.train_x)
    assert a.train_x.dtype == np.uint8 and a.train_x.shape == (200, 3, 32, 32)
    assert a.train_y.dtype == np.int64 and set(a.train_y.tolist()) == set(range(10))
    assert len(a.classes) == 10
    # learnable: nearest class-mean on training images already classifies test images well
    tx, vx = a.train_x.astype(np.float32), a.test_x.astype(np.float32)
    centroids = np.stack([tx[a.train_y == k].mean(0) for k in range(10)]).reshape(10, -1)
    dists = ((vx.reshape(len(vx), 1, -1) - centroids[None]) ** 2).sum(-1)
    assert (dists.argmin(1) == a.test_y).mean() > 0.9


def test_build_loaders_synthetic_and_cifar(tmp_path):
    train, test, info = build_synthetic_loaders(augment="paper", batch_size=32, rank=1,
                                                world_size=2, seed=0, synthetic_train=256,
                                                synthetic_test=50)
    assert info["num_train"] == 256 and info["num_test"] == 50 and len(info["classes"]) == 10
    assert len(train) == 4 and train.augment and not test.augment
    x, y = next(iter(train))
    assert x.shape == (32, 3, 32, 32) and y.shape == (32,)
    assert sum(len(y) for _, y in test) == 25
    cfg = from_dict({"data": {"dataset": "synthetic", "synthetic_train": 256},
                     "train": {"batch_size": 32, "iterations": 1}})
    assert isinstance(build_loaders_for(cfg, rank=0, world_size=1)[0], ImageBatches)

    archive = tmp_path / "a.tar.gz"
    write_archive(archive, bytes_keys=True)
    prepare_cifar10(str(archive), str(tmp_path / "d"))
    train, test, info = build_loaders_for(_cfg(str(tmp_path / "d"), augment="none"), rank=0,
                                          world_size=1)
    assert info == {"num_train": 20, "num_test": N_TEST, "classes": CLASSES}
    assert isinstance(train, ShardBatches) and len(train) == 5

    with pytest.raises(DataError, match="augment"):
        build_synthetic_loaders(augment="fancy", batch_size=4, rank=0, world_size=1, seed=0)
