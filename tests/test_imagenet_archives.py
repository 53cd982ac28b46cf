"""ImageNet from the official archives: nested train tars, the flat val tar and the devkit
(meta.mat written with scipy.io.savemat in the official structure), read in place, locally and
from S3. The shards must be byte for byte those of the extracted folders."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from typer.testing import CliRunner

from resnet_cluster.cli import app
from resnet_cluster.data.archives import index_class_tars, read_devkit
from resnet_cluster.data.imagenet import prepare_imagenet
from resnet_cluster.data.shards import read_manifest
from resnet_cluster.errors import DataError
from test_imagenet import N_VAL, PER_CLASS, WNIDS, make_layout

SHARD = 5


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _tar_bytes(files: list[tuple[str, bytes]], fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in files:
            _add(tf, name, data)
    return buf.getvalue()


def write_meta_mat(path: Path, leaves: list[str]) -> None:
    """data/meta.mat as in the devkit: a synsets struct array [N x 1] whose leaves (the classes,
    num_children 0) carry ILSVRC2012_IDs 1..K in ``leaves`` order, then inner synsets."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    rows = [(k + 1, w, f"words of {w}", f"gloss of {w}", 0, np.zeros((1, 0)), 0, PER_CLASS)
            for k, w in enumerate(leaves)]
    k = len(leaves)
    rows += [(k + 1, "n00000001", "entity", "that which exists", 2, np.array([[1, 2]]), 3, 0),
             (k + 2, "n00000002", "organism", "a living thing", 2, np.array([[3, 4]]), 2, 0)]
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    scipy.io.savemat(path, {"synsets": synsets})


def make_archives(root: Path, layout: dict, *, dest: Path) -> dict:
    """ILSVRC2012_img_train.tar, _img_val.tar and _devkit_t12.tar.gz from a ``txt`` layout
    (also used by benchmarks/prepare_tars.py), with members in an unsorted order (the reader sorts, as the folder scan does), a folder
    entry and a non-image file in a class tar (left out, as in folders)."""
    dest.mkdir(parents=True)
    train = Path(layout["train"])
    classes = []
    for wnid in sorted((p.name for p in train.iterdir()), reverse=True):
        files = [(p.name, p.read_bytes()) for p in sorted((train / wnid).iterdir(), reverse=True)]
        files.append(("notes.txt", b"not an image"))
        classes.append((f"{wnid}.tar", _tar_bytes(files)))
    (dest / "ILSVRC2012_img_train.tar").write_bytes(_tar_bytes(classes))
    val = sorted(Path(layout["val"]).iterdir(), reverse=True)
    (dest / "ILSVRC2012_img_val.tar").write_bytes(
        _tar_bytes([(p.name, p.read_bytes()) for p in val], fmt=tarfile.PAX_FORMAT))
    synsets = [line.split()[0] for line in Path(layout["synsets"]).read_text().splitlines()]
    write_meta_mat(root / "meta.mat", synsets)
    with tarfile.open(dest / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tf:
        tf.add(root / "meta.mat", "ILSVRC2012_devkit_t12/data/meta.mat")
        tf.add(layout["val_labels"], "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
        _add(tf, "ILSVRC2012_devkit_t12/COPYING", b"licence")
    return {k: str(dest / f"ILSVRC2012_{n}") for k, n in
            (("train", "img_train.tar"), ("val", "img_val.tar"), ("devkit", "devkit_t12.tar.gz"))}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("archives")
    layout = make_layout(root / "src", "txt")
    tars = make_archives(root, layout, dest=root / "download")
    folder = str(root / "from-folders")
    prepare_imagenet(layout["train"], layout["val"], folder, val_labels=layout["val_labels"],
                     synsets=layout["synsets"], shard_images=SHARD, max_side=100)
    return layout, tars, folder


def _same_dataset(a: str, b: str) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["splits"] == mb["splits"]  # every shard's path, rows, bytes and sha256
    for key in ("classes", "skipped", "mean", "std", "pca", "plan"):
        assert ma[key] == mb[key], key


def test_devkit_meta_mat_gives_leaf_ids_and_val_truth(sources):
    layout, tars, _ = sources
    kit = read_devkit(tars["devkit"])
    order = [line.split()[0] for line in Path(layout["synsets"]).read_text().splitlines()]
    assert kit.wnid_of_id == {k + 1: w for k, w in enumerate(order)}  # inner synsets left out
    assert kit.words[order[0]] == f"words of {order[0]}"
    assert kit.val_ids == [int(x) for x in Path(layout["val_labels"]).read_text().split()]
    by_class = index_class_tars(tars["train"])
    assert list(by_class) == WNIDS
    blob = Path(tars["train"]).read_bytes()
    for wnid, members in by_class.items():  # offsets point at the images' own bytes
        assert [m.name for m in members] == sorted(m.name for m in members)
        for m in members:
            if m.name.endswith(".JPEG") and "bad" not in m.name:
                src = Path(layout["train"]) / wnid / m.name
                assert blob[m.offset:m.offset + m.size] == src.read_bytes()


def test_tars_prepare_identical_to_extracted_folders(sources, tmp_path):
    layout, tars, folder = sources
    dest = str(tmp_path / "from-tars")
    summary = prepare_imagenet(tars["train"], tars["val"], dest, devkit=tars["devkit"],
                               shard_images=SHARD, max_side=100)
    assert summary["train_images"] == len(WNIDS) * PER_CLASS and summary["val_images"] == N_VAL
    # the corrupt JPEG inside n01443537.tar is skipped and listed under the folder's name
    assert [s["path"] for s in summary["skipped"]] == [f"train/{WNIDS[1]}/{WNIDS[1]}_bad.JPEG"]
    _same_dataset(folder, dest)
    for s in read_manifest(dest)["splits"]["train"]["shards"]:
        blob = (Path(dest) / s["path"]).read_bytes()
        assert blob == (Path(folder) / s["path"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == s["sha256"]
    assert read_manifest(dest)["source"]["devkit"] == tars["devkit"]
    # the devkit also labels an extracted flat val/ folder
    mixed = str(tmp_path / "mixed")
    prepare_imagenet(layout["train"], layout["val"], mixed, devkit=tars["devkit"],
                     shard_images=SHARD, max_side=100)
    _same_dataset(folder, mixed)


def test_cli_prepares_from_s3_archives(sources, s3_endpoint, tmp_path):
    """The archives on a real S3 endpoint (moto), read with header and ranged GETs."""
    import s3fs

    _, tars, folder = sources
    fs = s3fs.S3FileSystem()
    fs.makedirs("downloads", exist_ok=True)  # moto keeps buckets across its servers
    uris = {}
    for key, path in tars.items():
        uris[key] = f"s3://downloads/imagenet/{Path(path).name}"
        fs.put_file(path, uris[key])
    args = ["data", "prepare", "imagenet", "--train", uris["train"], "--val", uris["val"],
            "--devkit", uris["devkit"], "--dest", str(tmp_path / "d"), "--shard-images",
            str(SHARD), "--max-side", "100", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["train_images"] == len(WNIDS) * PER_CLASS and len(doc["skipped"]) == 1
    _same_dataset(folder, str(tmp_path / "d"))


def test_damaged_archives_are_named(sources, tmp_path):
    layout, tars, _ = sources
    dest = str(tmp_path / "d")
    blob = Path(tars["train"]).read_bytes()
    # a class tar whose bytes are not a tar
    bad = tmp_path / "bad_class.tar"
    inner = _tar_bytes([(f"{w}.tar", b"garbage " * 300 if w == WNIDS[2] else
                         _tar_bytes([(f"{w}_0.JPEG", b"x")])) for w in WNIDS])
    bad.write_bytes(inner)
    with pytest.raises(DataError, match=f"{WNIDS[2]}.tar is not a readable tar"):
        prepare_imagenet(str(bad), tars["val"], dest, devkit=tars["devkit"])
    # the download cut short
    cut = tmp_path / "cut.tar"
    cut.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(DataError, match="truncated|damaged|not a readable tar"):
        prepare_imagenet(str(cut), tars["val"], dest, devkit=tars["devkit"])
    # a devkit without the ground truth; a devkit with val labels given twice
    kit = tmp_path / "kit.tar.gz"
    with tarfile.open(kit, "w:gz") as tf:
        _add(tf, "ILSVRC2012_devkit_t12/data/meta.mat", b"")
    with pytest.raises(DataError, match="ILSVRC2012_validation_ground_truth.txt"):
        prepare_imagenet(tars["train"], tars["val"], dest, devkit=str(kit))
    with pytest.raises(DataError, match="leave out"):
        prepare_imagenet(tars["train"], tars["val"], dest, devkit=tars["devkit"],
                         val_labels=layout["val_labels"])
    # a flat val tar needs labels; the CLI says so with exit code 2 and no traceback
    r = CliRunner().invoke(app, ["data", "prepare", "imagenet", "--train", tars["train"], "--val",
                                 tars["val"], "--dest", dest])
    assert isinstance(r.exception, DataError) and "--devkit" in str(r.exception)
    assert not Path(dest).exists()  # nothing written by any refused run


# --------------------------------------------------------------------------------------------
# Spread over a two-node Ray cluster, S3 source and destination

DRIVER = """
import json, sys
from resnet_cluster.launch.prepare import prepare_on_cluster
events = []
summary = prepare_on_cluster(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4],
                             devkit=sys.argv[5], shard_images=5, max_side=100,
                             progress=events.append)
print(json.dumps({"summary": summary, "events": events}))
"""


@pytest.mark.ray
def test_ray_tasks_on_two_nodes_from_and_to_s3(sources, s3_endpoint, tmp_path):
    """Class-tar indexing and shard writers as Ray tasks on two `ray start` nodes: identical
    shards, both nodes used, progress to the driver, resume, a refused --dest; and the Jobs API
    form of --address."""
    import subprocess
    import sys

    import s3fs

    from raynodes import RayNode, base_env, start_head, wait_for_nodes

    _, tars, folder = sources
    fs = s3fs.S3FileSystem()
    fs.makedirs("downloads", exist_ok=True)  # moto keeps buckets across its servers
    fs.makedirs("out", exist_ok=True)
    uris = {}
    for key, path in tars.items():
        uris[key] = f"s3://downloads/{Path(path).name}"
        fs.put_file(path, uris[key])
    # the nodes inherit the moto endpoint and its dummy credentials from this environment
    head = start_head(tmp_path, num_cpus=1, resources={"node_a": 1})
    second = None
    try:
        second = RayNode(head_gcs=head.gcs, num_cpus=1, resources={"node_b": 1},
                         log=tmp_path / "b.log")
        wait_for_nodes(head, 2)
        env = base_env()

        def drive(dest: str) -> dict:
            out = subprocess.run([sys.executable, "-c", DRIVER, head.gcs, uris["train"],
                                  uris["val"], dest, uris["devkit"]],
                                 env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-3000:]
            return json.loads(out.stdout.strip().splitlines()[-1])

        dest = "s3://out/imagenet"
        run = drive(dest)
        summary, events = run["summary"], run["events"]
        assert summary["nodes"] == 2 and summary["reused_shards"] == 0
        assert summary["index_tasks"] == 2  # the 4 class tars' headers read by 2 Ray tasks
        assert [s["path"] for s in summary["skipped"]] == [f"train/{WNIDS[1]}/{WNIDS[1]}_bad.JPEG"]
        _same_dataset(folder, dest)
        done = [e["images_done"] for e in events]
        assert done == sorted(done) and done[-1] == events[-1]["images_total"] == 33  # 25 train (1 bad) + 8 val
        assert [e["shards_done"] for e in events][-1] == summary["shards"] == 7

        # resume: a run killed before its manifest, with two shards not yet written
        fs.rm(["out/imagenet/manifest.json", "out/imagenet/train/00001.parquet",
               "out/imagenet/val/00000.parquet"])
        again = drive(dest)["summary"]
        assert again["reused_shards"] == 5 and again["shards"] == 7
        _same_dataset(folder, dest)

        # the CLI: other options into the same --dest are refused (exit code 2, no traceback)
        cli = str(Path(sys.executable).parent / "resnet-cluster")
        base = ["data", "prepare", "imagenet", "--train", uris["train"], "--val", uris["val"],
                "--devkit", uris["devkit"]]
        r = subprocess.run([cli, *base, "--dest", dest, "--shard-images", "3", "--address",
                            head.gcs], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "already holds a prepared" in r.stdout + r.stderr
        assert "Traceback" not in r.stdout + r.stderr

        # http://HEAD:DASHBOARD: the command itself runs as a Ray job on the cluster
        r = subprocess.run([cli, *base, "--dest", "s3://out/viajobs", "--shard-images", "5",
                            "--max-side", "100", "--address", head.dashboard, "--json"],
                           env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        doc = json.loads(r.stdout)
        assert doc["ray_job"].startswith("resnet-cluster-prepare-") and doc["nodes"] == 2
        _same_dataset(folder, "s3://out/viajobs")
    finally:
        if second is not None:
            second.kill()
        head.kill()


# --------------------------------------------------------------------------------------------
# --stats-sample


def test_stats_sample_is_a_fixed_sample_and_leaves_the_images_alone(sources, tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    from resnet_cluster.data.imagenet import encode_image, plan_shards, scan_sources

    _, tars, folder = sources
    dest = str(tmp_path / "sampled")
    summary = prepare_imagenet(tars["train"], tars["val"], dest, devkit=tars["devkit"],
                               shard_images=SHARD, max_side=100, stats_sample=7)
    m, full = read_manifest(dest), read_manifest(folder)
    assert m["stats_sample"] == 7 and summary["skipped"] == full["skipped"]
    # the same images, labels and order in every shard; only the statistics differ
    for a, b in zip(m["splits"]["train"]["shards"], full["splits"]["train"]["shards"]):
        ta, tb = pq.read_table(Path(dest) / a["path"]), pq.read_table(Path(folder) / b["path"])
        assert ta.drop(["image"]).equals(tb.drop(["image"])) and ta["image"].equals(tb["image"])
    assert m["mean"] != full["mean"]
    # the mean is exactly that of the 7 sampled training images, chosen by a fixed seed
    src = scan_sources(tars["train"], tars["val"], devkit=tars["devkit"])
    plans = [plan_shards(dest, src, max_side=100, quality=90, shard_images=k, stats_sample=7)
             for k in (SHARD, 3)]
    picked = [[j.items[r] for j in jobs for r in j.stats_rows or ()] for jobs in plans]
    assert len(picked[0]) == 7 and picked[0] == picked[1]  # independent of the shard size
    s1, n = np.zeros(3), 0
    blob = Path(tars["train"]).read_bytes()
    for it in picked[0]:
        try:
            _, _, _, st = encode_image(blob[it.offset:it.offset + it.size], max_side=100,
                                       quality=90, want_stats=True)
        except OSError:  # the corrupt file, if drawn, adds nothing
            continue
        s1, n = s1 + st[0], n + st[2]
    np.testing.assert_allclose(m["mean"], s1 / n * 255, rtol=1e-9)
    # a new sample size is another plan: the shards are not reused for it
    with pytest.raises(DataError, match="already holds"):
        prepare_imagenet(tars["train"], tars["val"], dest, devkit=tars["devkit"],
                         shard_images=SHARD, max_side=100, stats_sample=8)
    # an image outside the sample is still checked: a truncated JPEG is refused
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)).save(
        buf, "JPEG")
    with pytest.raises(OSError, match="truncated"):
        encode_image(buf.getvalue()[:-200], max_side=100, quality=90, want_stats=False,
                     full_decode=False)
    r = CliRunner().invoke(app, ["data", "prepare", "imagenet", "--train", tars["train"], "--val",
                                 tars["val"], "--devkit", tars["devkit"], "--dest", dest,
                                 "--stats-sample", "0"])
    assert isinstance(r.exception, DataError) and "--stats-sample" in str(r.exception)
