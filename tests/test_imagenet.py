"""ImageNet-style data: prepare from real JPEG files in the ILSVRC2012 layouts, shard round
trips and per-rank sharding, augmentation geometry, a real S3 endpoint, and resuming a killed
prepare. Images are small (64-300 px) so the module stays fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from resnet_cluster.cli import app
from resnet_cluster.data import transforms as T
from resnet_cluster.data.imagenet import prepare_imagenet
from resnet_cluster.data.loaders import build_loaders_for
from resnet_cluster.data.shards import Split, read_manifest
from resnet_cluster.data.streaming import ShardBatches
from resnet_cluster.errors import DataError
from resnet_cluster.models.jobs import from_dict

torch.set_num_threads(1)

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
PER_CLASS = 6
N_VAL = 8


def colour(label: int, i: int) -> tuple[int, int, int]:
    """A distinct flat colour per image, so a decoded crop says which image it came from."""
    return (30 + 60 * label, 20 + 35 * i, 200 - 20 * i)


def make_layout(root: Path, val_style: str, *, corrupt: bool = True) -> dict:
    """Write train/<wnid>/*.JPEG and a val/ in one of the three layouts; return what to pass."""
    rng = np.random.default_rng(1)
    for c, w in enumerate(WNIDS):
        d = root / "train" / w
        d.mkdir(parents=True)
        for i in range(PER_CLASS):
            h, wd = int(rng.integers(64, 300)), int(rng.integers(64, 300))
            a = np.empty((h, wd, 3), np.uint8)
            a[...] = colour(c, i)
            Image.fromarray(a).save(d / f"{w}_{i}.JPEG", quality=95)
    if corrupt:
        (root / "train" / WNIDS[1] / f"{WNIDS[1]}_bad.JPEG").write_bytes(b"\xff\xd8\xff\xe0broken")
    val = root / "val"
    val.mkdir()
    labels = [k % len(WNIDS) for k in range(N_VAL)]
    out = {"train": str(root / "train"), "val": str(val), "labels": labels}
    for k, lab in enumerate(labels, start=1):
        name = f"ILSVRC2012_val_{k:08d}.JPEG"
        a = np.full((80 + 10 * k, 120, 3), 10 + 25 * k, np.uint8)
        if val_style == "sorted":
            (val / WNIDS[lab]).mkdir(exist_ok=True)
            Image.fromarray(a).save(val / WNIDS[lab] / name)
        else:
            Image.fromarray(a).save(val / name)
    if val_style == "csv":
        rows = ["ImageId,PredictionString"] + [
            f"ILSVRC2012_val_{k:08d},{WNIDS[lab]} 1 2 30 40 {WNIDS[lab]} 5 6 7 8"
            for k, lab in enumerate(labels, start=1)]
        (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
        out["val_labels"] = str(root / "LOC_val_solution.csv")
    elif val_style == "txt":
        # Devkit IDs are NOT sorted-wnid order: give the synsets in a shuffled order.
        synset_order = [WNIDS[2], WNIDS[0], WNIDS[3], WNIDS[1]]
        (root / "synsets.txt").write_text("".join(f"{w} some name\n" for w in synset_order))
        ids = [synset_order.index(WNIDS[lab]) + 1 for lab in labels]
        (root / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{i}\n" for i in ids))
        out["val_labels"] = str(root / "ILSVRC2012_validation_ground_truth.txt")
        out["synsets"] = str(root / "synsets.txt")
    return out


def prepare(layout: dict, dest: str, **kw) -> dict:
    return prepare_imagenet(layout["train"], layout["val"], dest,
                            val_labels=layout.get("val_labels"), synsets=layout.get("synsets"),
                            **{"shard_images": 5, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("inet")
    layout = make_layout(root / "src", "csv")
    dest = str(root / "dest")
    summary = prepare(layout, dest, max_side=100)
    return layout, dest, summary


def _shard_rows(dest: str, split: str):
    rows = []
    for p in sorted((Path(dest) / split).glob("*.parquet")):
        rows += pq.read_table(p).to_pylist()
    return rows


# --------------------------------------------------------------------------------------------
# Prepare: layouts, corrupt files, manifest


@pytest.mark.parametrize("val_style", ["csv", "txt", "sorted"])
def test_prepare_reads_each_val_layout(tmp_path, val_style):
    layout = make_layout(tmp_path / "src", val_style)
    summary = prepare(layout, str(tmp_path / "dest"))
    assert summary["classes"] == 4 and summary["val_images"] == N_VAL
    assert summary["train_images"] == 4 * PER_CLASS  # the corrupt file is not counted
    val = _shard_rows(str(tmp_path / "dest"), "val")
    by_name = {Path(r["path"]).name: r["label"] for r in val}
    assert by_name == {f"ILSVRC2012_val_{k:08d}.JPEG": lab
                       for k, lab in enumerate(layout["labels"], start=1)}
    # the stored pixels are the source's (flat grey 10 + 25k), decoded from the shard
    for r in val:
        k = int(Path(r["path"]).stem[-8:])
        px = np.asarray(Image.open(__import__("io").BytesIO(r["image"])))
        assert abs(float(px.mean()) - (10 + 25 * k)) < 3


def test_corrupt_file_is_skipped_listed_and_nothing_else_lost(prepared):
    layout, dest, summary = prepared
    bad = f"train/{WNIDS[1]}/{WNIDS[1]}_bad.JPEG"
    assert [s["path"] for s in summary["skipped"]] == [bad]
    manifest = read_manifest(dest)
    assert [s["path"] for s in manifest["skipped"]] == [bad]
    rows = _shard_rows(dest, "train")
    assert sorted(r["path"] for r in rows) == sorted(
        f"{w}/{w}_{i}.JPEG" for w in WNIDS for i in range(PER_CLASS))
    for r in rows:  # labels preserved: the folder's index in the sorted wnids
        assert r["label"] == WNIDS.index(r["path"].split("/")[0])


def test_manifest_records_shards_mean_pca_and_resizes(prepared):
    import hashlib

    _, dest, _ = prepared
    m = read_manifest(dest)
    assert m["classes"] == WNIDS
    for split, n in (("train", 4 * PER_CLASS), ("val", N_VAL)):
        shards = m["splits"][split]["shards"]
        assert sum(s["rows"] for s in shards) == n == m["splits"][split]["num_images"]
        for s in shards:
            blob = (Path(dest) / s["path"]).read_bytes()
            assert len(blob) == s["bytes"] and hashlib.sha256(blob).hexdigest() == s["sha256"]
    # training shards are shuffled: the first shard does not hold one class only
    first = pq.read_table(Path(dest) / "train/00000.parquet").column("label").to_pylist()
    assert len(set(first)) > 1
    # mean of flat-coloured images = the area-weighted mean of their colours (within JPEG error)
    rows = _shard_rows(dest, "train")
    cols = np.array([colour(WNIDS.index(r["path"].split("/")[0]),
                            int(r["path"].split("_")[-1].split(".")[0])) for r in rows], float)
    lo, hi = cols.min(0), cols.max(0)
    assert np.all(np.array(m["mean"]) > lo - 2) and np.all(np.array(m["mean"]) < hi + 2)
    # PCA: orthonormal eigenvectors (columns), descending non-negative eigenvalues
    vec, val = np.array(m["pca"]["eigvec"]), np.array(m["pca"]["eigval"])
    np.testing.assert_allclose(vec.T @ vec, np.eye(3), atol=1e-9)
    assert np.all(np.diff(val) <= 0) and val[-1] > -1e-9
    # max_side 100: every stored shorter side <= 100, and images already smaller are unchanged
    for r in rows:
        assert min(r["width"], r["height"]) <= 100


def test_pca_matches_numpy_on_a_known_covariance(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "train" / WNIDS[0]
    d.mkdir(parents=True)
    pixels = []
    for i in range(3):
        base = rng.normal(0, 1, (128, 128, 1))
        a = np.clip(128 + np.concatenate([40 * base, 20 * base, 5 * rng.normal(0, 1, (128, 128, 1))],
                                         -1), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(d / f"{i}.png")  # lossless source: stats are exact
        pixels.append(a[::2, ::2].reshape(-1, 3) / 255.0)
    (tmp_path / "val" / WNIDS[0]).mkdir(parents=True)
    Image.fromarray(a).save(tmp_path / "val" / WNIDS[0] / "v.png")
    prepare_imagenet(str(tmp_path / "train"), str(tmp_path / "val"), str(tmp_path / "dest"))
    m = read_manifest(str(tmp_path / "dest"))
    px = np.concatenate(pixels)
    np.testing.assert_allclose(m["mean"], px.mean(0) * 255, rtol=1e-6)
    ev, vec = np.linalg.eigh(np.cov(px.T, bias=True))
    np.testing.assert_allclose(m["pca"]["eigval"], ev[::-1], rtol=1e-6, atol=1e-12)
    top = np.array(m["pca"]["eigvec"])[:, 0]
    assert abs(abs(top @ vec[:, -1]) - 1) < 1e-6


def test_bad_inputs_are_clear_errors(tmp_path):
    layout = make_layout(tmp_path / "src", "txt")
    with pytest.raises(DataError, match="--synsets"):
        prepare_imagenet(layout["train"], layout["val"], str(tmp_path / "d"),
                         val_labels=layout["val_labels"])
    with pytest.raises(DataError, match="is not a folder"):
        prepare_imagenet(str(tmp_path / "nope"), layout["val"], str(tmp_path / "d"))
    flat = make_layout(tmp_path / "src2", "flat")
    with pytest.raises(DataError, match="--val-labels"):
        prepare_imagenet(flat["train"], flat["val"], str(tmp_path / "d"))
    with pytest.raises(DataError, match="manifest.json is missing"):
        read_manifest(str(tmp_path / "empty"))


def test_cli_prepare_json_and_refuses_other_inputs(tmp_path):
    layout = make_layout(tmp_path / "src", "csv")
    args = ["data", "prepare", "imagenet", "--train", layout["train"], "--val", layout["val"],
            "--dest", str(tmp_path / "d"), "--shard-images", "7", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["train_images"] == 24 and doc["val_images"] == N_VAL and doc["shards"] == 4 + 2
    assert [s["path"] for s in doc["skipped"]] == [f"train/{WNIDS[1]}/{WNIDS[1]}_bad.JPEG"]
    again = json.loads(CliRunner().invoke(app, args).output)
    assert again["already_prepared"] and again["train_images"] == 24
    r = CliRunner().invoke(app, args[:-3] + ["--shard-images", "3"])
    # main() turns this DataError into exit code 2 with the message
    assert isinstance(r.exception, DataError) and "already holds a prepared" in str(r.exception)


# --------------------------------------------------------------------------------------------
# Reading: sharding over ranks, epochs, workers


def _loader(dest, *, train, rank=0, world=1, batch=3, view="train", augment="none",
            workers=0, seed=0, **kw):
    m = read_manifest(dest)
    split = Split.from_manifest(dest, m, "train" if train else "val")
    return ShardBatches(split, batch_size=batch, rank=rank, world_size=world, seed=seed,
                        train=train, view=view, augment=augment, mean=m["mean"],
                        eigval=m["pca"]["eigval"], eigvec=m["pca"]["eigvec"],
                        loader_workers=workers, **kw)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_image_once_per_epoch_across_ranks(prepared, world):
    _, dest, _ = prepared
    n, batch = 4 * PER_CLASS, 3
    orders = {}
    for epoch in (0, 1):
        per_rank = []
        for r in range(world):
            ld = _loader(dest, train=True, rank=r, world=world, batch=batch)
            ld.set_epoch(epoch)
            plan = ld.plan()
            assert len(plan) == len(ld) == (n // world) // batch  # equal steps on every rank
            assert all(len(b) == batch for b in plan)
            per_rank.append(np.concatenate(plan))
        ids = np.concatenate(per_rank)
        assert len(set(ids.tolist())) == len(ids)  # disjoint, no repeats
        assert n - len(ids) < world * batch  # only the remainder sits out
        orders[epoch] = ids
        # evaluation: every image exactly once over the ranks
        ev = np.concatenate([np.concatenate(_loader(dest, train=False, rank=r, world=world,
                                                    view="1crop").plan())
                             for r in range(world)])
        assert sorted(ev.tolist()) == list(range(N_VAL))
    assert not np.array_equal(orders[0], orders[1])  # reshuffled each epoch
    again = _loader(dest, train=True, world=world, batch=batch)
    again.set_epoch(1)
    assert np.array_equal(np.concatenate(again.plan()), orders[1][:len(np.concatenate(again.plan()))])


def test_batches_hold_the_planned_images_with_workers(prepared):
    """Decoded pixels identify the image: the served ids, labels and pixels agree with the plan,
    and two DataLoader worker processes serve the same set (and same tensors) as none."""
    _, dest, _ = prepared
    m = read_manifest(dest)
    rows = {}
    for split in ("train",):
        offset = 0
        for s in m["splits"][split]["shards"]:
            for r in pq.read_table(Path(dest) / s["path"], columns=["label", "path"]).to_pylist():
                rows[offset] = r
                offset += 1
    seen = {}
    for workers in (0, 2):
        ld = _loader(dest, train=True, rank=1, world=2, batch=4, workers=workers)
        ld.set_epoch(3)
        ld.yield_ids = True
        got = {}
        for x, y, ids in ld:
            assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
            for xi, yi, gid in zip(x, y.tolist(), ids.tolist()):
                r = rows[gid]
                assert yi == r["label"]
                i = int(r["path"].split("_")[-1].split(".")[0])
                rgb = (xi.mean((1, 2)) * 255 + torch.tensor(m["mean"])).numpy()
                np.testing.assert_allclose(rgb, colour(r["label"], i), atol=4)
                got[gid] = xi
        assert sorted(got) == sorted(np.concatenate(ld.plan()).tolist())
        seen[workers] = got
    assert seen[0].keys() == seen[2].keys()
    for k in seen[0]:
        assert torch.equal(seen[0][k], seen[2][k])


def test_paper_augmentation_and_lighting_are_per_image_deterministic(prepared):
    _, dest, _ = prepared
    out = {}
    for std in (0.0, 0.1):
        ld = _loader(dest, train=True, batch=4, augment="paper", lighting_std=std, seed=5)
        ld.set_epoch(2)
        ld.yield_ids = True
        x, _, ids = next(iter(ld))
        out[std] = (x, ids)
    (x0, i0), (x1, i1) = out[0.0], out[0.1]
    assert torch.equal(i0, i1)
    diff = x1 - x0  # same crop and flip; lighting adds one RGB offset per image
    per_image = diff.mean((2, 3), keepdim=True)
    assert torch.allclose(diff, per_image.expand_as(diff), atol=1e-5)
    assert per_image.abs().max() > 0
    m = read_manifest(dest)
    # |shift| <= |alpha| * eigval summed; alpha ~ N(0, 0.1) is below 0.6 with near certainty
    assert per_image.abs().max() < 0.6 * sum(m["pca"]["eigval"]) + 1e-6


# --------------------------------------------------------------------------------------------
# Augmentation geometry on a gradient photo


def _gradient(w: int, h: int) -> bytes:
    """R encodes x, G encodes y (0..255 across the image); B is flat."""
    import io

    xs = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    ys = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    a = np.stack([xs, ys, np.full_like(xs, 128)], -1).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=98)
    return buf.getvalue()


def test_paper_crop_scale_range_and_flip():
    w, h = 480, 360
    data = _gradient(w, h)
    scales, flips = [], 0
    for k in range(120):
        crop = T.paper_train(data, np.random.default_rng(k)).astype(float)
        assert crop.shape == (224, 224, 3) and crop.dtype == float
        r = crop[112, :, 0]
        slope = np.polyfit(np.arange(224), r, 1)[0]  # R levels per output pixel
        flips += slope < 0
        # one output pixel spans 1/f source pixels; R rises 255/(w-1) per source pixel
        f = (255 / (w - 1)) / abs(slope)
        g = np.polyfit(np.arange(224), crop[:, 112, 1], 1)[0]
        assert abs((255 / (h - 1)) / g - f) < 0.03 * f  # the same scale on both axes
        scales.append(f * h)  # the sampled shorter side S
    scales = np.array(scales)
    assert scales.min() > 256 * 0.97 and scales.max() < 480 * 1.03
    assert scales.min() < 290 and scales.max() > 440  # the whole range is sampled
    assert 35 < flips < 85


def test_inception_box_and_output():
    areas, ratios = [], []
    for k in range(300):
        x0, y0, cw, ch = T.inception_box(400, 300, np.random.default_rng(k))
        assert 0 <= x0 and x0 + cw <= 400 and 0 <= y0 and y0 + ch <= 300
        areas.append(cw * ch / (400 * 300))
        ratios.append(cw / ch)
    assert min(areas) > 0.07 and max(areas) <= 1.0 and min(areas) < 0.2
    assert 0.74 < min(ratios) and max(ratios) < 1.35
    assert T.inception_train(_gradient(400, 300), np.random.default_rng(0)).shape == (224, 224, 3)


def test_ten_crop_positions_center_crop_and_multiscale():
    import io

    data = _gradient(320, 256)  # shorter side already 256: the crops are plain slices
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    views = T.ten_crop(data)
    assert views.shape == (10, 224, 224, 3)
    corners = [(0, 0), (96, 0), (0, 32), (96, 32), (48, 16)]
    for k, (x, y) in enumerate(corners):
        np.testing.assert_array_equal(views[k], full[y:y + 224, x:x + 224])
        np.testing.assert_array_equal(views[5 + k], full[y:y + 224, x:x + 224][:, ::-1])
    c = T.center_crop(data).astype(int)
    assert np.abs(c - full[16:240, 48:272]).max() <= 1
    for s, v in zip(T.MULTISCALE, T.multiscale(_gradient(300, 200))):
        assert v.shape == (s, round(300 * s / 200), 3)


def test_eval_views_from_loaders(prepared):
    _, dest, _ = prepared
    base = {"data": {"dataset": "imagenet", "root": dest, "loader_workers": 0},
            "train": {"batch_size": 4, "iterations": 2}, "scaling": {"workers": 2}}
    for protocol, check in [
        ("1crop", lambda x: x.shape == (2, 3, 224, 224)),
        ("10crop", lambda x: x.shape == (2, 10, 3, 224, 224)),
        ("multiscale", lambda x: [v.shape[2] if v.shape[2] <= v.shape[3] else v.shape[3]
                                  for v in x] == list(T.MULTISCALE) and x[0].shape[0] == 1),
    ]:
        cfg = from_dict({**base, "eval": {"protocol": protocol}})
        train, test, info = build_loaders_for(cfg, rank=0, world_size=2)
        assert info["num_train"] == 24 and info["num_test"] == N_VAL and info["classes"] == WNIDS
        x, y = next(iter(test))
        assert check(x), protocol
        assert sum(len(y) for _, y in test) == N_VAL // 2
    # 10-crop views are the 1-crop view's neighbours: view 4 (centre) equals the 1-crop batch
    one = build_loaders_for(from_dict({**base, "eval": {"protocol": "1crop"}}), rank=0,
                            world_size=2)[1]
    ten = build_loaders_for(from_dict({**base, "eval": {"protocol": "10crop"}}), rank=0,
                            world_size=2)[1]
    (x1, _), (x10, _) = next(iter(one)), next(iter(ten))
    assert (x1 - x10[:, 4]).abs().max() < 3 / 255


def test_job_keys_validate():
    with pytest.raises(Exception, match="loader_workers"):
        from_dict({"data": {"dataset": "imagenet", "loader_workers": -1},
                   "train": {"iterations": 1}})
    cfg = from_dict({"data": {"dataset": "cifar10", "augment": "inception"},
                     "train": {"iterations": 1}})
    with pytest.raises(DataError, match="inception"):
        build_loaders_for(cfg, rank=0, world_size=1)


# --------------------------------------------------------------------------------------------
# S3 and resume


@pytest.fixture
def s3_bucket(s3_endpoint):
    """The shared moto endpoint (conftest) with the bucket ``data`` created."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="data")
    return s3_endpoint


def test_s3_prepare_and_read_equal_local(prepared, s3_bucket):
    layout, local, _ = prepared
    uri = "s3://data/imagenet"
    prepare(layout, uri, max_side=100)
    ml, ms = read_manifest(local), read_manifest(uri)
    assert [s["sha256"] for s in ml["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in ms["splits"]["train"]["shards"]]
    for train, view in ((True, "train"), (False, "10crop")):
        a = _loader(local, train=train, rank=1, world=2, batch=2, view=view, augment="paper")
        b = _loader(uri, train=train, rank=1, world=2, batch=2, view=view, augment="paper",
                    workers=2)
        a.set_epoch(1)
        b.set_epoch(1)
        la, lb = list(a), list(b)
        assert len(la) == len(lb) == len(a)
        for (xa, ya), (xb, yb) in zip(sorted(la, key=lambda t: t[1].tolist()),
                                      sorted(lb, key=lambda t: t[1].tolist())):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_resume_after_kill(tmp_path):
    layout = make_layout(tmp_path / "src", "sorted")
    dest = tmp_path / "dest"
    script = textwrap.dedent(f"""
        import os, signal
        from resnet_cluster.data.imagenet import prepare_imagenet
        def progress(ev):
            if ev["images_done"] >= 13:  # mid-way through the third shard of 5
                os.kill(os.getpid(), signal.SIGKILL)
        prepare_imagenet({layout['train']!r}, {layout['val']!r}, {str(dest)!r},
                         shard_images=5, progress=progress)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not (dest / "manifest.json").exists()
    finished = sorted(p.name for p in (dest / "train").glob("*.parquet"))
    assert finished == ["00000.parquet", "00001.parquet"]  # the shard in progress is not there
    for name in finished:
        pq.read_table(dest / "train" / name)  # complete files
    # a torn copy under a final name (e.g. a non-atomic copy by hand) is detected and redone
    (dest / "train" / "00002.parquet").write_bytes(b"PAR1 torn")
    summary = prepare_imagenet(layout["train"], layout["val"], str(dest), shard_images=5)
    assert summary["reused_shards"] == 2
    fresh = prepare_imagenet(layout["train"], layout["val"], str(tmp_path / "fresh"),
                             shard_images=5)
    assert fresh["reused_shards"] == 0
    a, b = read_manifest(str(dest)), read_manifest(str(tmp_path / "fresh"))
    assert a["splits"] == b["splits"] and a["skipped"] == b["skipped"]
    assert a["mean"] == b["mean"] and a["pca"] == b["pca"]


def test_fit_trains_resnet18_on_prepared_shards(prepared):
    """engine.fit end to end on the tiny prepared set: 2 iterations of resnet18 at 224x224."""
    from resnet_cluster.engine import fit

    _, dest, _ = prepared
    cfg = from_dict({"model": {"arch": "resnet18", "shortcut": "B"},
                     "data": {"dataset": "imagenet", "root": dest, "loader_workers": 0},
                     "train": {"batch_size": 2, "iterations": 2, "log_every_iterations": 1},
                     "scaling": {"workers": 1}, "schedule": {"policy": "constant"}})

    class Grab:
        def __init__(self):
            self.logs, self.records = [], []

        def on_start(self, info): self.info = info
        def on_log(self, rec): self.logs.append(rec)
        def on_epoch_end(self, rec, state): self.records.append(rec)
        def on_finish(self, summary, model): self.summary = summary

    g = Grab()
    summary = fit(cfg, callbacks=[g])
    assert summary["iterations"] == 2 and g.info["num_train"] == 24
    assert [r["iteration"] for r in g.logs] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in g.logs)
    assert g.records[-1]["test_images"] == N_VAL and 0 <= g.records[-1]["top1_err"] <= 100
