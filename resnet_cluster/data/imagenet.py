"""Prepare ImageNet as Parquet shards (:mod:`.shards`) on any fsspec URI.

Inputs, in either of the forms ImageNet comes in:

- The official archives (:mod:`.archives`, read in place, never extracted):
  ``ILSVRC2012_img_train.tar`` (a tar of per-class tars), ``ILSVRC2012_img_val.tar`` (flat) and
  ``ILSVRC2012_devkit_t12.tar.gz`` (the val labels and the ILSVRC2012_ID -> wnid map), each a
  local path or any fsspec URI. The shards are byte for byte those of the extracted folders.
- Extracted folders: ``train/<wnid>/*.JPEG``; ``val/`` sorted into ``<wnid>/`` folders, or flat
  with labels from the devkit, ``LOC_val_solution.csv`` (Kaggle: ``ImageId,PredictionString``,
  the first token of the prediction string is the wnid) or
  ``ILSVRC2012_validation_ground_truth.txt`` (devkit: one 1-based ILSVRC2012_ID per line, for
  ILSVRC2012_val_00000001.JPEG onwards) together with a synset list giving the wnid of each ID
  in order (one wnid first on each line).

The sorted train wnids are the classes (label = index), as in torchvision's ImageFolder.

Each image is decoded once (a file that does not decode is skipped and listed); one whose
shorter side is above ``max_side`` (default 480, the top of the paper's scale range), or that is
not an RGB JPEG, is re-encoded; any other is stored byte for byte. Training images are shuffled
with a fixed seed before being cut into shards, so every shard samples all classes.

Safe resume: a shard is written to a temporary name and renamed (local) or uploaded in one PUT
(object stores), so a shard under its final name is always complete; its Parquet metadata
records a hash of exactly which inputs and options produced it, and a re-run reuses every shard
whose hash matches. ``manifest.json`` is written last.

:func:`prepare_imagenet` reads top to bottom as its steps: check the options, scan the sources,
plan the shards, check ``dest``, write the shards (here, or through a runner such as the Ray
one in ``launch/prepare.py``), compute the statistics, write the manifest.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from resnet_cluster.data.archives import (
    DEVKIT_META,
    DEVKIT_TRUTH,
    Devkit,
    index_class_tars,
    index_flat_tar,
    is_archive,
    is_local,
    read_devkit,
    read_ranges,
)
from resnet_cluster.data.shards import (
    VERSION,
    build_manifest,
    check_dest,
    existing_shard,
    shard_table,
    splits_of,
    url_to_fs,
    write_manifest,
    write_shard,
)
from resnet_cluster.errors import DataError

EXTENSIONS = (".jpeg", ".jpg", ".png")
SHUFFLE_SEED = 0  # fixed: the shard contents must not change between a run and its resume
STATS_SEED = 1  # the --stats-sample draw (a stream of its own, apart from the shuffle)
STATS_SIDE = 64  # about 64x64 pixels per training image feed the mean and PCA (a strided grid)
READ_CHUNK = 64  # archive members fetched together (concurrent ranged GETs on an object store)


@dataclass(frozen=True)
class Item:
    path: str  # the file that holds the image: the image itself, or the archive it is in
    rel: str  # path relative to the split folder, as listed in the manifest
    label: int
    size: int  # bytes of the image file
    offset: int = -1  # where the image starts inside ``path`` (an archive member); -1: all of it


@dataclass(frozen=True)
class Sources:
    """What a prepare reads: the classes and every image with its label, in dataset order."""

    classes: list[str]
    train: list[Item]
    val: list[Item]
    source: dict  # the inputs as given, for the manifest


# --------------------------------------------------------------------------------------------
# Scanning the inputs: extracted folders, or the official tars plus the devkit
# --------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in EXTENSIONS


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p.name))


def _missing_local(path: str) -> bool:
    fs, p = url_to_fs(path)
    return is_local(fs) and not os.path.exists(p)


def scan_train(train: str | os.PathLike, index_map=None) -> tuple[list[str], list[Item]]:
    """(sorted wnids, images labelled by their wnid's index) of a train/ folder or tar;
    ``index_map``: see :func:`~resnet_cluster.data.archives.index_class_tars`."""
    train = os.path.expanduser(str(train))
    if _missing_local(train):
        raise DataError(f"--train {train} is not a folder or an archive that exists; pass the "
                        "ILSVRC2012 train/ folder that holds one <wnid>/ folder of JPEGs per "
                        "class, or ILSVRC2012_img_train.tar as downloaded.")
    if is_archive(train):
        by_class = index_class_tars(train, map_batches=index_map)
        classes = list(by_class)
        items = [Item(train, f"{wnid}/{m.name}", label, m.size, m.offset)
                 for label, wnid in enumerate(classes) for m in by_class[wnid]
                 if _is_image(m.name)]
    else:
        root = Path(train).expanduser()
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"--train {root} holds no class folders; expected train/<wnid>/*.JPEG "
                            "(for example train/n01440764/n01440764_10026.JPEG).")
        items = [Item(str(p), f"{wnid}/{p.name}", label, p.stat().st_size)
                 for label, wnid in enumerate(classes) for p in _images_in(root / wnid)]
    if not items:
        raise DataError(f"--train {train} has classes but no .JPEG/.jpg/.png files in them.")
    return classes, items


def _val_number(name: str) -> int | None:
    m = re.search(r"(\d+)\.[A-Za-z]+$", name)
    return int(m.group(1)) if m else None


def _labelled_by_ids(flat: list[tuple[str, str, int, int]], ids: list[int],
                     wnid_of_id: dict[int, str], label_of, ids_where: str,
                     names_where: str) -> list[Item]:
    """Flat val images labelled by ILSVRC2012_IDs: ``ids[n - 1]`` is the ID of
    ILSVRC2012_val_<n>.JPEG (or of the n-th file in name order), ``wnid_of_id`` its wnid."""
    items = []
    for k, (name, path, size, offset) in enumerate(flat):
        n = _val_number(name) or (k + 1)
        if not 1 <= n <= len(ids):
            raise DataError(f"{name} is image {n} but {ids_where} has {len(ids)} labels.")
        cid = ids[n - 1]
        if cid not in wnid_of_id:
            raise DataError(f"{ids_where} line {n}: ID {cid} is not one of the {len(wnid_of_id)} "
                            f"class IDs of {names_where}.")
        items.append(Item(path, name, label_of(wnid_of_id[cid], names_where), size, offset))
    return items


def scan_val(val: str | os.PathLike, classes: list[str], *, labels: str | None = None,
             synsets: str | None = None, devkit: Devkit | None = None,
             devkit_where: str = "--devkit") -> list[Item]:
    val = os.path.expanduser(str(val))
    index = {w: i for i, w in enumerate(classes)}

    def label_of(wnid: str, where: str) -> int:
        if wnid not in index:
            raise DataError(f"{where}: class {wnid!r} is not one of the {len(classes)} training "
                            "classes (the train/ folder names). Check that --train and --val "
                            "come from the same release.")
        return index[wnid]

    root = None
    if is_archive(val) and not _missing_local(val):
        flat = [(m.name, val, m.size, m.offset) for m in index_flat_tar(val) if _is_image(m.name)]
        if not flat:
            raise DataError(f"--val {val} holds no images; pass ILSVRC2012_img_val.tar.")
    else:
        root = Path(val).expanduser()
        if not root.is_dir():
            raise DataError(f"--val {root} is not a folder; pass the ILSVRC2012 val/ folder or "
                            "ILSVRC2012_img_val.tar.")
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        if subdirs:  # already sorted into <wnid>/ folders
            return [Item(str(p), f"{d.name}/{p.name}", label_of(d.name, str(d)), p.stat().st_size)
                    for d in subdirs for p in _images_in(d)]
        files = _images_in(root)
        if not files:
            raise DataError(f"--val {root} holds no images and no <wnid>/ folders.")
        flat = [(p.name, str(p), p.stat().st_size, -1) for p in files]
    if devkit is not None:
        return _labelled_by_ids(flat, devkit.val_ids, devkit.wnid_of_id, label_of,
                                f"{devkit_where} ({DEVKIT_TRUTH})", f"{devkit_where} ({DEVKIT_META})")
    if labels is None:
        for cand in ((root / "LOC_val_solution.csv", root.parent / "LOC_val_solution.csv")
                     if root is not None else ()):
            if cand.is_file():
                labels = str(cand)
                break
        else:
            raise DataError(
                f"--val {val} is flat (no <wnid>/ folders), so its labels must come from a file: "
                "pass --devkit ILSVRC2012_devkit_t12.tar.gz, or --val-labels "
                "LOC_val_solution.csv, or --val-labels ILSVRC2012_validation_ground_truth.txt "
                "with --synsets FILE (the wnid of each ILSVRC2012_ID, in ID order)."
            )
    lpath = Path(labels).expanduser()
    if not lpath.is_file():
        raise DataError(f"--val-labels {lpath} does not exist.")
    if lpath.suffix.lower() == ".csv":
        wnid_of: dict[str, str] = {}
        with open(lpath, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
                raise DataError(f"--val-labels {lpath}: expected the columns ImageId,"
                                f"PredictionString of LOC_val_solution.csv, got {reader.fieldnames}.")
            for row in reader:
                pred = row["PredictionString"].split()
                if pred:
                    wnid_of[row["ImageId"]] = pred[0]
        items = []
        for name, path, size, offset in flat:
            stem = PurePosixPath(name).stem
            if stem not in wnid_of:
                raise DataError(f"{name} has no row in {lpath}; every flat val image needs one.")
            items.append(Item(path, name, label_of(wnid_of[stem], str(lpath)), size, offset))
        return items
    # ILSVRC2012_validation_ground_truth.txt: ILSVRC2012_IDs (1-based) in val-file order.
    if synsets is None:
        raise DataError(
            f"--val-labels {lpath} holds ILSVRC2012_IDs, which are not in sorted-wnid order; pass "
            "--devkit ILSVRC2012_devkit_t12.tar.gz instead, or --synsets FILE listing the wnid of "
            "ID 1, 2, ... one per line (exported from the devkit's meta.mat)."
        )
    order = [line.split()[0] for line in Path(synsets).expanduser().read_text().splitlines()
             if line.strip()]
    try:
        ids = [int(line) for line in lpath.read_text().split()]
    except ValueError as err:
        raise DataError(f"--val-labels {lpath}: expected one integer per line ({err}).") from None
    return _labelled_by_ids(flat, ids, {k + 1: w for k, w in enumerate(order)}, label_of,
                            str(lpath), str(synsets))


def scan_sources(train: str, val: str, *, val_labels: str | None = None,
                 synsets: str | None = None, devkit: str | None = None,
                 index_map=None) -> Sources:
    """Classes and labelled images of the inputs (folders or tars), the devkit checked against
    the train classes. ``index_map`` indexes the class tars elsewhere (the Ray runner's)."""
    if devkit is not None and (val_labels is not None or synsets is not None):
        raise DataError("--devkit gives the val labels and the synset order; leave out "
                        "--val-labels and --synsets when you pass it.")
    kit = read_devkit(devkit) if devkit is not None else None
    classes, train_items = scan_train(train, index_map)
    if kit is not None:
        unknown = sorted(set(classes) - set(kit.wnid_of_id.values()))
        if unknown:
            raise DataError(f"--train {train} has {len(unknown)} classes that are not leaf "
                            f"synsets of --devkit {devkit} (first: {unknown[0]}). Check that the "
                            "train archive and the devkit come from the same release (ILSVRC2012).")
    val_items = scan_val(val, classes, labels=val_labels, synsets=synsets, devkit=kit,
                         devkit_where=f"--devkit {devkit}")
    source = {"train": str(train), "val": str(val), "val_labels": val_labels, "synsets": synsets}
    if devkit is not None:
        source["devkit"] = devkit
    return Sources(classes, train_items, val_items, source)


# --------------------------------------------------------------------------------------------
# Encoding one image and writing one shard
# --------------------------------------------------------------------------------------------


def encode_image(data: bytes, *, max_side: int, quality: int, want_stats: bool,
                 full_decode: bool = True):
    """(stored bytes, width, height, stats or None) for one source file; raises on bad input.

    stats = (sum of RGB in [0,1], sum of outer products, pixel count) over a strided grid.
    ``full_decode=False`` (an image outside the --stats-sample): an image stored byte for byte
    is checked with a 1/8-scale DCT decode, which still reads the whole entropy-coded stream
    (a truncated file still raises) at a fraction of the cost.
    """
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    w, h = img.size
    keep = img.format == "JPEG" and img.mode == "RGB" and min(w, h) <= max_side
    if keep and not full_decode and not want_stats:
        img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        img.load()
        return data, w, h, None
    if min(w, h) > max_side:
        f = max_side / min(w, h)
        nw, nh = max(1, round(w * f)), max(1, round(h * f))
        img.draft("RGB", (nw, nh))  # DCT-reduced decode first, then an exact antialiased resize
        img = img.convert("RGB").resize((nw, nh), Image.BICUBIC)
    else:
        img = img.convert("RGB")  # decodes the whole file: truncated or corrupt data raises here
    if keep:
        out = data
    else:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        out = buf.getvalue()
    stats = None
    if want_stats:
        a = np.asarray(img)
        step = max(1, min(a.shape[:2]) // STATS_SIDE)
        px = a[::step, ::step].reshape(-1, 3).astype(np.float64) / 255.0
        stats = (px.sum(0), px.T @ px, len(px))
    return out, img.size[0], img.size[1], stats


def _plan_hash(split: str, items: list[Item], max_side: int, quality: int,
               stats_rows: tuple[int, ...] | None = None) -> str:
    h = hashlib.sha256(json.dumps([VERSION, split, max_side, quality]).encode())
    for it in items:
        h.update(f"\n{it.rel}\t{it.label}\t{it.size}".encode())
    if stats_rows is not None:  # a --stats-sample run: its shards hold other statistics
        h.update(f"\nstats {list(stats_rows)}".encode())
    return h.hexdigest()


@dataclass
class ShardJob:
    """One shard to write: everything a process (or a Ray task on another node) needs."""

    dest: str
    rel: str  # e.g. train/00003.parquet
    split: str
    items: list[Item]
    plan: str
    max_side: int
    quality: int
    stats_rows: tuple[int, ...] | None = None  # rows whose pixels feed the statistics; None: all


def _read_items(items: list[Item]):
    """(item, bytes or the exception reading raised) for each item, in order; archive members
    are fetched READ_CHUNK at a time (one pread or ranged GET each, concurrent on S3)."""
    for start in range(0, len(items), READ_CHUNK):
        chunk = items[start:start + READ_CHUNK]
        ranged: dict[str, list[int]] = {}
        for i, it in enumerate(chunk):
            if it.offset >= 0:
                ranged.setdefault(it.path, []).append(i)
        got: dict[int, bytes | Exception] = {}
        for path, idx in ranged.items():
            got.update(zip(idx, read_ranges(path, [(chunk[i].offset, chunk[i].size) for i in idx])))
        for i, it in enumerate(chunk):
            if it.offset >= 0:
                yield it, got[i]
                continue
            try:
                with open(it.path, "rb") as f:
                    yield it, f.read()
            except OSError as err:
                yield it, err


def write_shard_job(job: ShardJob, on_image: Callable[[], None] | None = None) -> dict:
    """Encode the job's images and put the shard in place atomically. Returns its record."""
    want_stats = job.split == "train"
    sampled = None if job.stats_rows is None else set(job.stats_rows)
    images, labels, widths, heights, paths, skipped = [], [], [], [], [], []
    s1, s2, count = np.zeros(3), np.zeros((3, 3)), 0
    for row, (it, data) in enumerate(_read_items(job.items)):
        stats_here = want_stats and (sampled is None or row in sampled)
        try:
            if isinstance(data, Exception):
                raise data
            out, w, h, stats = encode_image(data, max_side=job.max_side, quality=job.quality,
                                            want_stats=stats_here, full_decode=sampled is None)
        except Exception as err:  # any undecodable/unreadable file: skip it, list it
            msg = str(err).split(" <_io.")[0]  # PIL names the in-memory buffer; drop that
            skipped.append({"path": f"{job.split}/{it.rel}", "error": f"{type(err).__name__}: {msg}"})
        else:
            images.append(out)
            labels.append(it.label)
            widths.append(w)
            heights.append(h)
            paths.append(it.rel)
            if stats is not None:
                s1 += stats[0]
                s2 += stats[1]
                count += stats[2]
        if on_image is not None:
            on_image()
    meta = {"plan": job.plan, "skipped": skipped,
            "stats": {"sum": s1.tolist(), "outer": s2.tolist(), "count": count}}
    return write_shard(job.dest, job.rel,
                       shard_table(images, labels, widths, heights, paths, meta))


def existing_record(job: ShardJob) -> dict | None:
    """The record of a finished shard already at the final name with the same plan, or None."""
    return existing_shard(job.dest, job.rel, job.plan)


def run_shard_job(job: ShardJob, on_image: Callable[[], None] | None = None) -> dict:
    """The shard's record: reused when it is already there, written otherwise."""
    return existing_record(job) or write_shard_job(job, on_image)


# --------------------------------------------------------------------------------------------
# Running the shard jobs: here (one process or a pool), or elsewhere through a runner
# --------------------------------------------------------------------------------------------

# runner(jobs, images, done): run every job; ``images(n)`` reports n more images encoded,
# ``done(job, record, counted)`` a finished job, of whose images ``counted`` went to images().
# A runner may also have ``index_map(fn, uri, classes)``: the class tars' headers read there.
Runner = Callable[[list[ShardJob], Callable[[int], None], Callable[[ShardJob, dict, int], None]],
                  None]


def local_runner(workers: int) -> Runner:
    """Jobs in this process (per-image progress) or in a pool of ``workers`` processes."""

    def run(jobs, images, done) -> None:
        if workers == 1:
            for job in jobs:
                rec = existing_record(job)
                if rec is None:
                    done(job, write_shard_job(job, on_image=lambda: images(1)), len(job.items))
                else:
                    done(job, rec, 0)
            return
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(run_shard_job, job): job for job in jobs}
            for fut in concurrent.futures.as_completed(futures):
                done(futures[fut], fut.result(), 0)

    return run


# --------------------------------------------------------------------------------------------
# prepare_imagenet, step by step
# --------------------------------------------------------------------------------------------


def prepare_imagenet(
    train: str,
    val: str,
    dest: str,
    *,
    val_labels: str | None = None,
    synsets: str | None = None,
    devkit: str | None = None,
    max_side: int = 480,
    quality: int = 90,
    shard_images: int = 512,
    workers: int = 1,
    stats_sample: int | None = None,
    progress: Callable[[dict], None] | None = None,
    runner: Runner | None = None,
) -> dict:
    """Write ImageNet (``train``/``val`` folders or the official tars) as shards + manifest
    under ``dest``.

    ``progress`` receives ``{"images_done", "images_total", "shards_done", "shards_total",
    "reused"}`` as work finishes (per image with ``workers == 1``, per shard otherwise).
    ``runner`` runs the shard jobs somewhere else (the Ray cluster: launch/prepare.py); by
    default they run here with ``workers`` processes. Returns the summary that ``--json`` prints.
    """
    _check_options(max_side, quality, shard_images, workers, stats_sample)
    t0 = time.time()
    src = scan_sources(train, val, val_labels=val_labels, synsets=synsets, devkit=devkit,
                       index_map=getattr(runner, "index_map", None))
    jobs = plan_shards(dest, src, max_side=max_side, quality=quality, shard_images=shard_images,
                       stats_sample=stats_sample)
    old = check_dest(dest, _manifest_plan(jobs), dataset="imagenet")
    if old is not None:
        return {**old["summary"], "dest": dest, "already_prepared": True}
    records, reused = write_shards(jobs, runner or local_runner(workers), progress)
    stats = training_stats(records, train, len(src.train))
    skipped = [s for rec in records for s in rec["skipped"]]
    splits = splits_of(records, ("train", "val"))
    summary = {
        "dataset": "imagenet",
        "dest": dest,
        "classes": len(src.classes),
        "train_images": splits["train"]["num_images"],
        "val_images": splits["val"]["num_images"],
        "shards": len(jobs),
        "reused_shards": reused,
        "bytes": splits["train"]["bytes"] + splits["val"]["bytes"],
        "skipped": skipped,
        "seconds": round(time.time() - t0, 3),
    }
    extra = {} if stats_sample is None else {"stats_sample": stats_sample}
    manifest = build_manifest(
        dataset="imagenet", classes=src.classes, splits=splits, skipped=skipped, summary=summary,
        source=src.source, image={"encoding": "jpeg", "max_side": max_side, "quality": quality},
        plan=_manifest_plan(jobs), **stats, **extra)
    write_manifest(dest, manifest)
    return summary


def _check_options(max_side: int, quality: int, shard_images: int, workers: int,
                   stats_sample: int | None) -> None:
    if max_side < 1 or shard_images < 1 or not 1 <= quality <= 100 or workers < 1:
        raise DataError("--max-side and --shard-images must be >= 1, --quality in 1..100 and "
                        "--workers >= 1.")
    if stats_sample is not None and stats_sample < 1:
        raise DataError(f"--stats-sample {stats_sample}: give the number of training images "
                        "(>= 1) whose pixels feed the mean and PCA, or leave it out to use all.")


def stats_rows(n: int, sample: int | None) -> np.ndarray | None:
    """Indices (into the shuffled training list) of the --stats-sample images; None: all."""
    if sample is None:
        return None
    return np.sort(np.random.default_rng(STATS_SEED).choice(n, size=min(sample, n), replace=False))


def plan_shards(dest: str, src: Sources, *, max_side: int, quality: int, shard_images: int,
                stats_sample: int | None = None) -> list[ShardJob]:
    """The shards to write: training images shuffled with a fixed seed, then both splits cut
    into runs of ``shard_images``."""
    rng = np.random.default_rng(SHUFFLE_SEED)
    train_items = [src.train[i] for i in rng.permutation(len(src.train))]
    sampled = stats_rows(len(train_items), stats_sample)
    jobs: list[ShardJob] = []
    for split, items in (("train", train_items), ("val", src.val)):
        for k, start in enumerate(range(0, len(items), shard_images)):
            part = items[start:start + shard_images]
            rows = None
            if split == "train" and sampled is not None:
                lo, hi = np.searchsorted(sampled, [start, start + len(part)])
                rows = tuple(int(r) - start for r in sampled[lo:hi])
            jobs.append(ShardJob(dest, f"{split}/{k:05d}.parquet", split, part,
                                 _plan_hash(split, part, max_side, quality, rows), max_side,
                                 quality, rows))
    return jobs


def write_shards(jobs: list[ShardJob], runner: Runner,
                 progress: Callable[[dict], None] | None) -> tuple[list[dict], int]:
    """Run every job through ``runner``; (records in job order, number of reused shards)."""
    state = {"images_done": 0, "images_total": sum(len(j.items) for j in jobs),
             "shards_done": 0, "shards_total": len(jobs), "reused": 0}
    records: dict[str, dict] = {}

    def images(n: int) -> None:
        state["images_done"] += n
        if progress:
            progress(dict(state))

    def done(job: ShardJob, rec: dict, counted: int) -> None:
        records[job.rel] = rec
        state["shards_done"] += 1
        state["reused"] += rec["reused"]
        state["images_done"] += len(job.items) - counted
        if progress:
            progress(dict(state))

    runner(jobs, images, done)
    return [records[j.rel] for j in jobs], state["reused"]


def training_stats(records: list[dict], train: str, n_train: int) -> dict:
    """The manifest's mean (0..255), std and PCA (in [0, 1] units) from the shards' sums."""
    s1, s2, count = np.zeros(3), np.zeros((3, 3)), 0
    for rec in records:
        if rec["path"].startswith("train/"):
            s1 += rec["stats"]["sum"]
            s2 += rec["stats"]["outer"]
            count += rec["stats"]["count"]
    if count == 0:
        raise DataError(f"none of the {n_train} training images under {train} could be "
                        "decoded; nothing was prepared.")
    mu = s1 / count
    cov = s2 / count - np.outer(mu, mu)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    return {
        # Per-channel mean of the training pixels in 0..255; std and PCA in [0, 1] units.
        "mean": (mu * 255).tolist(),
        "std": np.sqrt(np.diag(cov)).tolist(),
        "pca": {"eigval": eigval.tolist(), "eigvec": eigvec.tolist(),
                "units": "covariance of training RGB in [0,1]; eigvec columns, eigval descending"},
    }


def _manifest_plan(jobs: list[ShardJob]) -> str:
    return hashlib.sha256("\n".join(j.plan for j in jobs).encode()).hexdigest()
