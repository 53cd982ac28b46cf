"""Tests for resnet_cluster.data: archive parsing, prepare/load, sharding, augmentation, synthetic.

Archives are built here in the genuine cifar-10-python layout (a tar.gz of
cifar-10-batches-py/ holding pickled dicts), with a few images per batch. Nothing touches the
network: downloads are exercised through file:// URLs.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from resnet_cluster.data import (
    ImageBatches,
    build_loaders,
    download_cifar10,
    load_cifar10,
    make_synthetic,
    prepare_cifar10,
    random_crop_flip,
    read_cifar10_archive,
)
from resnet_cluster.errors import DataError

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


def _make_batches(seed: int = 0):
    rng = np.random.default_rng(seed)
    train = [(rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8),
              rng.integers(0, 10, PER_BATCH).tolist()) for _ in range(5)]
    test = (rng.integers(0, 256, (N_TEST, 3072), dtype=np.uint8),
            rng.integers(0, 10, N_TEST).tolist())
    return train, test


def _batch_dict(data, labels, name, bytes_keys: bool):
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    fnames = [k(f"img_{i}.png") for i in range(len(labels))]
    return {k("batch_label"): k(name), k("labels"): labels, k("data"): data,
            k("filenames"): fnames}


def write_archive(path: Path, *, bytes_keys: bool, skip: str | None = None, seed: int = 0,
                  style: str | None = None):
    """Write a genuine-format cifar-10-python.tar.gz; returns (train_batches, test_batch).

    ``bytes_keys``: dict keys and names as bytes, as Python 2 pickles load in Python 3.
    ``style``: how to pickle (see ``_dumps``); defaults to "py2" with bytes keys, else
    "py3-default"."""
    style = style or ("py2" if bytes_keys else "py3-default")
    train, test = _make_batches(seed)
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
# Prepare and load
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bytes_keys", [True, False], ids=["py2-bytes-keys", "str-keys"])
def test_prepare_writes_layout_and_load_round_trips(tmp_path, bytes_keys):
    archive = tmp_path / "cifar-10-python.tar.gz"
    train, test = write_archive(archive, bytes_keys=bytes_keys)
    dest = tmp_path / "prepared"
    messages = []
    summary = prepare_cifar10(str(archive), str(dest), progress=messages.append)
    tx, ty, vx, vy = _expected(train, test)

    assert {p.name for p in dest.iterdir()} == {"train.parquet", "test.parquet", "mean.npy",
                                                "meta.json"}
    assert summary["num_train"] == len(tx) and summary["num_test"] == len(vx)
    assert summary["dest"] == str(dest) and summary["total_bytes"] > 0 and messages

    meta = json.loads((dest / "meta.json").read_text())
    assert meta["dataset"] == "cifar10" and meta["format"] == 1
    assert meta["classes"] == CLASSES and meta["num_train"] == len(tx)
    assert meta["num_test"] == len(vx) and meta["mean"] == "mean.npy"
    assert meta["source"] == str(archive)
    assert set(meta["sha256"]) == {"train.parquet", "test.parquet", "mean.npy"}

    mean = np.load(dest / "mean.npy")
    assert mean.dtype == np.float32 and mean.shape == (3, 32, 32)
    np.testing.assert_allclose(mean, tx.astype(np.float64).mean(axis=0), rtol=0, atol=1e-4)

    table = pq.read_table(dest / "train.parquet")
    assert table.schema.field("image").type == pa.binary(3072)
    assert table.schema.field("label").type == pa.int16()
    assert table.column("image")[0].as_py() == tx[0].tobytes()
    np.testing.assert_array_equal(table.column("label").to_numpy(), ty)

    arrays, loaded_mean = load_cifar10(str(dest))
    np.testing.assert_array_equal(arrays.train_x, tx)
    np.testing.assert_array_equal(arrays.train_y, ty)
    np.testing.assert_array_equal(arrays.test_x, vx)
    np.testing.assert_array_equal(arrays.test_y, vy)
    np.testing.assert_array_equal(loaded_mean, mean)
    assert arrays.classes == CLASSES


def test_prepare_to_fsspec_uri_writes_meta_last(tmp_path, monkeypatch):
    from fsspec.implementations.memory import MemoryFileSystem

    archive = tmp_path / "cifar-10-python.tar.gz"
    train, test = write_archive(archive, bytes_keys=True)
    order = []
    original = MemoryFileSystem.put_file

    def recording_put_file(self, lpath, rpath, *args, **kwargs):
        order.append(rpath.rsplit("/", 1)[-1])
        return original(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "put_file", recording_put_file)
    uri = "memory://resnet-cluster-test/cifar10"
    try:
        prepare_cifar10(str(archive), uri)
        assert order[-1] == "meta.json" and set(order) == {"train.parquet", "test.parquet",
                                                          "mean.npy", "meta.json"}
        arrays, _ = load_cifar10(uri)
        np.testing.assert_array_equal(arrays.train_x, _expected(train, test)[0])
    finally:
        MemoryFileSystem().rm("/resnet-cluster-test", recursive=True)


def test_load_missing_root_says_data_prepare(tmp_path):
    root = str(tmp_path / "nothing-here")
    with pytest.raises(DataError) as err:
        load_cifar10(root)
    msg = str(err.value)
    assert "data prepare" in msg and root in msg and "meta.json" in msg


def test_load_detects_tampered_file_and_bad_format(tmp_path):
    archive = tmp_path / "a.tar.gz"
    write_archive(archive, bytes_keys=True)
    dest = tmp_path / "d"
    prepare_cifar10(str(archive), str(dest))
    np.save(dest / "mean.npy", np.zeros((3, 32, 32), np.float32))
    with pytest.raises(DataError, match="mean.npy"):
        load_cifar10(str(dest))

    prepare_cifar10(str(archive), str(dest))
    meta = json.loads((dest / "meta.json").read_text())
    (dest / "meta.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(DataError, match="format"):
        load_cifar10(str(dest))


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
    train, test, info = build_loaders(dataset="synthetic", root="unused", augment="paper",
                                      batch_size=32, rank=1, world_size=2, seed=0,
                                      synthetic_train=256, synthetic_test=50)
    assert info["num_train"] == 256 and info["num_test"] == 50 and len(info["classes"]) == 10
    assert len(train) == 4 and train.augment and not test.augment
    x, y = next(iter(train))
    assert x.shape == (32, 3, 32, 32) and y.shape == (32,)
    assert sum(len(y) for _, y in test) == 25

    archive = tmp_path / "a.tar.gz"
    write_archive(archive, bytes_keys=True)
    prepare_cifar10(str(archive), str(tmp_path / "d"))
    train, test, info = build_loaders(dataset="cifar10", root=str(tmp_path / "d"), augment="none",
                                      batch_size=4, rank=0, world_size=1, seed=0)
    assert info == {"num_train": 20, "num_test": N_TEST, "classes": CLASSES}
    assert len(train) == 5 and not train.augment

    with pytest.raises(DataError, match="data prepare"):
        build_loaders(dataset="cifar10", root=str(tmp_path / "missing"), augment="paper",
                      batch_size=4, rank=0, world_size=1, seed=0)
    with pytest.raises(DataError, match="augment"):
        build_loaders(dataset="synthetic", root="", augment="fancy", batch_size=4, rank=0,
                      world_size=1, seed=0)
