"""Prepare ILSVRC2012-layout folders as Parquet shards (:mod:`.shards`) on any fsspec URI.

Inputs (the layouts of the ImageNet downloads):

- ``train/<wnid>/*.JPEG``; the sorted wnids are the classes (label = index).
- ``val/`` sorted into ``<wnid>/`` folders, or flat with labels from either
  ``LOC_val_solution.csv`` (Kaggle: ``ImageId,PredictionString``, the first token of the
  prediction string is the wnid) or ``ILSVRC2012_validation_ground_truth.txt`` (devkit: one
  1-based ILSVRC2012_ID per line, for ILSVRC2012_val_00000001.JPEG onwards) together with a
  synset list giving the wnid of each ID in order (one wnid first on each line).

Each image is decoded once (a file that does not decode is skipped and listed); one whose
shorter side is above ``max_side`` (default 480, the top of the paper's scale range), or that is
not an RGB JPEG, is re-encoded; any other is stored byte for byte. Training images are shuffled
with a fixed seed before being cut into shards, so every shard samples all classes.

Safe resume: a shard is written to a temporary name and renamed (local) or uploaded in one PUT
(object stores), so a shard under its final name is always complete; its Parquet metadata
records a hash of exactly which inputs and options produced it, and a re-run reuses every shard
whose hash matches. ``manifest.json`` is written last.
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
from pathlib import Path
from typing import Callable

import numpy as np

from resnet_cluster.data.shards import (
    VERSION,
    build_manifest,
    check_dest,
    existing_shard,
    shard_table,
    splits_of,
    write_manifest,
    write_shard,
)
from resnet_cluster.errors import DataError

EXTENSIONS = (".jpeg", ".jpg", ".png")
SHUFFLE_SEED = 0  # fixed: the shard contents must not change between a run and its resume
STATS_SIDE = 64  # about 64x64 pixels per training image feed the mean and PCA (a strided grid)


@dataclass(frozen=True)
class Item:
    path: str  # absolute source path
    rel: str  # path relative to the split folder, as listed in the manifest
    label: int


# --------------------------------------------------------------------------------------------
# Scanning the layouts
# --------------------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def scan_train(train: str | os.PathLike) -> tuple[list[str], list[Item]]:
    root = Path(train).expanduser()
    if not root.is_dir():
        raise DataError(f"--train {root} is not a folder; pass the ILSVRC2012 train/ folder that "
                        "holds one <wnid>/ folder of JPEGs per class.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"--train {root} holds no class folders; expected train/<wnid>/*.JPEG "
                        "(for example train/n01440764/n01440764_10026.JPEG).")
    items = [Item(str(p), f"{wnid}/{p.name}", label)
             for label, wnid in enumerate(classes) for p in _images_in(root / wnid)]
    if not items:
        raise DataError(f"--train {root} has class folders but no .JPEG/.jpg/.png files in them.")
    return classes, items


def _val_number(name: str) -> int | None:
    m = re.search(r"(\d+)\.[A-Za-z]+$", name)
    return int(m.group(1)) if m else None


def scan_val(val: str | os.PathLike, classes: list[str], *, labels: str | None = None,
             synsets: str | None = None) -> list[Item]:
    root = Path(val).expanduser()
    if not root.is_dir():
        raise DataError(f"--val {root} is not a folder; pass the ILSVRC2012 val/ folder.")
    index = {w: i for i, w in enumerate(classes)}

    def label_of(wnid: str, where: str) -> int:
        if wnid not in index:
            raise DataError(f"{where}: class {wnid!r} is not one of the {len(classes)} training "
                            "classes (the train/ folder names). Check that --train and --val "
                            "come from the same release.")
        return index[wnid]

    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs:  # already sorted into <wnid>/ folders
        return [Item(str(p), f"{d.name}/{p.name}", label_of(d.name, str(d)))
                for d in subdirs for p in _images_in(d)]
    files = _images_in(root)
    if not files:
        raise DataError(f"--val {root} holds no images and no <wnid>/ folders.")
    if labels is None:
        for cand in (root / "LOC_val_solution.csv", root.parent / "LOC_val_solution.csv"):
            if cand.is_file():
                labels = str(cand)
                break
        else:
            raise DataError(
                f"--val {root} is flat (no <wnid>/ folders), so its labels must come from a file: "
                "pass --val-labels LOC_val_solution.csv, or --val-labels "
                "ILSVRC2012_validation_ground_truth.txt with --synsets FILE (the wnid of each "
                "ILSVRC2012_ID, in ID order)."
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
        for p in files:
            if p.stem not in wnid_of:
                raise DataError(f"{p.name} has no row in {lpath}; every flat val image needs one.")
            items.append(Item(str(p), p.name, label_of(wnid_of[p.stem], str(lpath))))
        return items
    # ILSVRC2012_validation_ground_truth.txt: ILSVRC2012_IDs (1-based) in val-file order.
    if synsets is None:
        raise DataError(
            f"--val-labels {lpath} holds ILSVRC2012_IDs, which are not in sorted-wnid order; pass "
            "--synsets FILE listing the wnid of ID 1, 2, ... one per line (exported from the "
            "devkit's meta.mat)."
        )
    order = [line.split()[0] for line in Path(synsets).expanduser().read_text().splitlines()
             if line.strip()]
    try:
        ids = [int(line) for line in lpath.read_text().split()]
    except ValueError as err:
        raise DataError(f"--val-labels {lpath}: expected one integer per line ({err}).") from None
    items = []
    for k, p in enumerate(files):
        n = _val_number(p.name) or (k + 1)
        if not 1 <= n <= len(ids):
            raise DataError(f"{p.name} is image {n} but {lpath} has {len(ids)} labels.")
        cid = ids[n - 1]
        if not 1 <= cid <= len(order):
            raise DataError(f"{lpath} line {n}: ID {cid} is outside 1..{len(order)} of --synsets.")
        items.append(Item(str(p), p.name, label_of(order[cid - 1], str(synsets))))
    return items


# --------------------------------------------------------------------------------------------
# Encoding one image and writing one shard
# --------------------------------------------------------------------------------------------


def encode_image(data: bytes, *, max_side: int, quality: int, want_stats: bool):
    """(stored bytes, width, height, stats or None) for one source file; raises on bad input.

    stats = (sum of RGB in [0,1], sum of outer products, pixel count) over a strided grid.
    """
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    w, h = img.size
    keep = img.format == "JPEG" and img.mode == "RGB" and min(w, h) <= max_side
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


def _plan_hash(split: str, items: list[Item], max_side: int, quality: int) -> str:
    h = hashlib.sha256(json.dumps([VERSION, split, max_side, quality]).encode())
    for it in items:
        h.update(f"\n{it.rel}\t{it.label}\t{os.path.getsize(it.path)}".encode())
    return h.hexdigest()




@dataclass
class _ShardJob:
    dest: str
    rel: str  # e.g. train/00003.parquet
    split: str
    items: list[Item]
    plan: str
    max_side: int
    quality: int


def _write_shard(job: _ShardJob, on_image: Callable[[], None] | None = None) -> dict:
    """Encode the job's images and put the shard in place atomically. Returns its record."""
    want_stats = job.split == "train"
    images, labels, widths, heights, paths, skipped = [], [], [], [], [], []
    s1, s2, count = np.zeros(3), np.zeros((3, 3)), 0
    for it in job.items:
        try:
            with open(it.path, "rb") as f:
                data = f.read()
            out, w, h, stats = encode_image(data, max_side=job.max_side, quality=job.quality,
                                            want_stats=want_stats)
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


def _existing(job: _ShardJob) -> dict | None:
    """The record of a finished shard already at the final name with the same plan, or None."""
    return existing_shard(job.dest, job.rel, job.plan)


def _run_job(job: _ShardJob) -> dict:
    return _existing(job) or _write_shard(job)


# --------------------------------------------------------------------------------------------
# prepare_imagenet
# --------------------------------------------------------------------------------------------


def prepare_imagenet(
    train: str,
    val: str,
    dest: str,
    *,
    val_labels: str | None = None,
    synsets: str | None = None,
    max_side: int = 480,
    quality: int = 90,
    shard_images: int = 512,
    workers: int = 1,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """Write the ILSVRC2012-layout ``train``/``val`` folders as shards + manifest under ``dest``.

    ``progress`` receives ``{"images_done", "images_total", "shards_done", "shards_total",
    "reused"}`` as work finishes (per image with ``workers == 1``, per shard otherwise).
    Returns the summary that ``--json`` prints.
    """
    if max_side < 1 or shard_images < 1 or not 1 <= quality <= 100 or workers < 1:
        raise DataError("--max-side and --shard-images must be >= 1, --quality in 1..100 and "
                        "--workers >= 1.")
    t0 = time.time()
    classes, train_items = scan_train(train)
    val_items = scan_val(val, classes, labels=val_labels, synsets=synsets)
    rng = np.random.default_rng(SHUFFLE_SEED)
    train_items = [train_items[i] for i in rng.permutation(len(train_items))]
    jobs: list[_ShardJob] = []
    for split, items in (("train", train_items), ("val", val_items)):
        for k, start in enumerate(range(0, len(items), shard_images)):
            part = items[start:start + shard_images]
            jobs.append(_ShardJob(dest, f"{split}/{k:05d}.parquet", split, part,
                                  _plan_hash(split, part, max_side, quality), max_side, quality))
    old = check_dest(dest, _manifest_plan(jobs), dataset="imagenet")
    if old is not None:
        return {**old["summary"], "dest": dest, "already_prepared": True}

    total = sum(len(j.items) for j in jobs)
    state = {"images_done": 0, "images_total": total, "shards_done": 0,
             "shards_total": len(jobs), "reused": 0}

    def tick_image() -> None:
        state["images_done"] += 1
        if progress:
            progress(dict(state))

    records: dict[str, dict] = {}

    def done(job: _ShardJob, rec: dict, per_image: bool) -> None:
        records[job.rel] = rec
        state["shards_done"] += 1
        state["reused"] += rec["reused"]
        if rec["reused"] or not per_image:
            state["images_done"] += len(job.items)
        if progress:
            progress(dict(state))

    if workers == 1:
        for job in jobs:
            rec = _existing(job)
            if rec is None:
                rec = _write_shard(job, on_image=tick_image)
                done(job, rec, per_image=True)
            else:
                done(job, rec, per_image=False)
    else:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(_run_job, job): job for job in jobs}
            for fut in concurrent.futures.as_completed(futures):
                done(futures[fut], fut.result(), per_image=False)

    ordered = [records[j.rel] for j in jobs]
    s1, s2, count = np.zeros(3), np.zeros((3, 3)), 0
    for rec in ordered:
        if rec["path"].startswith("train/"):
            s1 += rec["stats"]["sum"]
            s2 += rec["stats"]["outer"]
            count += rec["stats"]["count"]
    if count == 0:
        raise DataError(f"none of the {len(train_items)} training images under {train} could be "
                        "decoded; nothing was prepared.")
    mu = s1 / count
    cov = s2 / count - np.outer(mu, mu)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    skipped = [s for rec in ordered for s in rec["skipped"]]
    splits = splits_of(ordered, ("train", "val"))
    summary = {
        "dataset": "imagenet",
        "dest": dest,
        "classes": len(classes),
        "train_images": splits["train"]["num_images"],
        "val_images": splits["val"]["num_images"],
        "shards": len(jobs),
        "reused_shards": state["reused"],
        "bytes": splits["train"]["bytes"] + splits["val"]["bytes"],
        "skipped": skipped,
        "seconds": round(time.time() - t0, 3),
    }
    manifest = build_manifest(
        dataset="imagenet", classes=classes, splits=splits, skipped=skipped, summary=summary,
        source={"train": str(train), "val": str(val), "val_labels": val_labels, "synsets": synsets},
        image={"encoding": "jpeg", "max_side": max_side, "quality": quality},
        # Per-channel mean of the training pixels in 0..255; std and PCA in [0, 1] units.
        mean=(mu * 255).tolist(),
        std=np.sqrt(np.diag(cov)).tolist(),
        pca={"eigval": eigval.tolist(), "eigvec": eigvec.tolist(),
             "units": "covariance of training RGB in [0,1]; eigvec columns, eigval descending"},
        plan=_manifest_plan(jobs))
    write_manifest(dest, manifest)
    return summary


def _manifest_plan(jobs: list[_ShardJob]) -> str:
    return hashlib.sha256("\n".join(j.plan for j in jobs).encode()).hexdigest()
