"""Decode + paper augmentation throughput: per-file baseline vs our shards (local and S3).

Builds an ImageNet-like folder from the natural photographs scikit-learn and scikit-image ship
(random crops of china, flower, astronaut, coffee, chelsea, rocket, ..., re-encoded as JPEG
quality 90 at ImageNet's usual sizes, see SIZES), prepares it with ``prepare_imagenet``
(shorter side <= 480), and times three readers in ONE process with ``torch.set_num_threads(1)``
(so images/s is per core), interleaved over several rounds (the order rotates every round):

- baseline: what torchvision's ImageFolder + Resize(S) + RandomCrop(224) + flip + ToTensor +
  Normalize does: open each file, full PIL decode, resize the whole image, crop, float tensor;
- shards: :class:`ShardBatches` from the local shards, ``loader_workers: 0`` (the same code a
  DataLoader worker runs), paper augmentation, lighting and mean subtraction;
- s3: the same from a moto S3 server (a separate process on 127.0.0.1).

Each shard reader is built once and serves one epoch per round (``set_epoch(round)``), as in
training, so its storage client is built once; the untimed first pass (client, connection,
page cache) is reported separately as ``first_pass_s``. Besides wall-clock images/s, each
reader's CPU seconds per image in this process are recorded (``time.process_time``: not
charged for waiting, nor for the moto server's own process), and the 1-minute load average.

Optionally ``--loader-workers N`` also times local vs S3 with N persistent DataLoader worker
processes (the training configuration, all cores), and ``--ray-data`` Ray Data's
``read_parquet().map_batches(decode+augment)`` vs a DataLoader with as many processes.

``--cifar N`` also times CIFAR-10-shaped shards (N random 32x32 images written by the CIFAR
prepare, raw encoding): training epochs with the paper's pad-crop-flip, batch 128, read in the
training process (``loader_workers: 0``) against 2 DataLoader workers, from disk and from S3.

    python benchmarks/data.py --images 400 --rounds 7 [--loader-workers 2] [--cifar 50000]
                              [--ray-data] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# (width, height, weight): ImageNet's most common sizes (500x375 and its portrait, 500x333,
# 500x500) plus the larger originals it also holds (about 1 in 8 train images has a shorter side
# above 480; some are several megapixels).
SIZES = [(500, 375, 40), (375, 500, 15), (500, 333, 15), (500, 500, 10), (640, 480, 8),
         (1024, 768, 8), (1600, 1200, 4)]
CLASSES = 10


def photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images
    import skimage.data as sd

    out = list(load_sample_images().images)
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                 "hubble_deep_field", "retina"):
        out.append(np.asarray(getattr(sd, name)())[..., :3])
    return out


def build_folder(root: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pics = photos()
    sizes = np.array([(w, h) for w, h, _ in SIZES])
    p = np.array([wt for *_, wt in SIZES], float)
    p /= p.sum()
    for i in range(n):
        pic = pics[rng.integers(len(pics))]
        w, h = sizes[rng.choice(len(sizes), p=p)]
        ph, pw = pic.shape[:2]
        # a random crop with the target aspect ratio covering >= 60% of the photo's height
        ch = int(ph * rng.uniform(0.6, 1.0))
        cw = min(pw, int(ch * w / h))
        ch = int(cw * h / w)
        y0, x0 = rng.integers(0, ph - ch + 1), rng.integers(0, pw - cw + 1)
        img = Image.fromarray(pic[y0:y0 + ch, x0:x0 + cw]).resize((int(w), int(h)), Image.BICUBIC)
        d = root / "train" / f"n{i % CLASSES:08d}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"img_{i:05d}.JPEG", quality=90)
    val = root / "val" / f"n{0:08d}"
    val.mkdir(parents=True, exist_ok=True)
    first = next((root / "train" / f"n{0:08d}").iterdir())
    (val / first.name).write_bytes(first.read_bytes())


def baseline_pass(files: list[Path], batch: int, seed: int) -> int:
    """torchvision-style per-file pipeline; returns images processed."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(seed)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    n = 0
    for start in range(0, len(files) - batch + 1, batch):
        out = []
        for f in files[start:start + batch]:
            with open(f, "rb") as fh:
                img = Image.open(fh).convert("RGB")
            w, h = img.size
            s = int(rng.integers(256, 481))
            nw, nh = (s, int(s * h / w)) if w < h else (int(s * w / h), s)
            img = img.resize((nw, nh), Image.BILINEAR)  # transforms.Resize(s)
            x0, y0 = rng.integers(0, nw - 223), rng.integers(0, nh - 223)
            img = img.crop((x0, y0, x0 + 224, y0 + 224))  # RandomCrop(224)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)
            out.append(t.sub_(mean).div_(std))  # ToTensor + Normalize
        torch.stack(out)  # default_collate
        n += len(out)
    return n


def shard_reader(root: str, batch: int, workers: int = 0):
    from resnet_cluster.data.shards import Split, read_manifest
    from resnet_cluster.data.streaming import ShardBatches

    m = read_manifest(root)
    return ShardBatches(Split.from_manifest(root, m, "train"), batch_size=batch, rank=0,
                        world_size=1, seed=0, train=True, augment="paper", mean=m["mean"],
                        eigval=m["pca"]["eigval"], eigvec=m["pca"]["eigvec"],
                        loader_workers=workers, shuffle_shards=2)


def shards_pass(reader, epoch: int) -> int:
    """One epoch of an existing reader (its storage client and worker processes are reused)."""
    reader.set_epoch(epoch)
    return sum(len(y) for _, y in reader)


def ray_data_pass(root: str, batch: int, cpus: int) -> tuple[int, float]:
    import ray

    from resnet_cluster.data import transforms as T

    def decode(b):
        rng = np.random.default_rng(0)
        imgs = np.stack([T.paper_train(bytes(x), rng) for x in b["image"]])
        return {"image": imgs, "label": b["label"]}

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ds = ray.data.read_parquet(f"{root}/train", columns=["image", "label"])
    ds = ds.map_batches(decode, batch_size=batch, batch_format="numpy")
    t = time.perf_counter()
    n = sum(len(b["label"]) for b in ds.iter_torch_batches(batch_size=batch))
    return n, time.perf_counter() - t


def timed(fn, *a, **k) -> tuple[float, float]:
    """(images per wall-clock second, CPU seconds of this process per image) of one call."""
    t, c = time.perf_counter(), time.process_time()
    n = fn(*a, **k)
    return n / (time.perf_counter() - t), (time.process_time() - c) / n


def cifar_epochs(work: Path, s3_root: str, n: int, rounds: int, say) -> dict:
    """CIFAR-shaped shards: images/s of training epochs, in-process vs 2 DataLoader workers."""
    from resnet_cluster.data.cifar import CifarArrays, write_shards
    from resnet_cluster.data.shards import Split, read_manifest
    from resnet_cluster.data.streaming import ShardBatches

    rng = np.random.default_rng(0)
    arrays = CifarArrays(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                         rng.integers(0, 10, n), np.zeros((0, 3, 32, 32), np.uint8),
                         np.zeros(0, np.int64), [f"c{i}" for i in range(10)])
    local = str(work / "cifar")
    write_shards(arrays, local, source="random")
    write_shards(arrays, s3_root, source="random")
    readers = {}
    for where, root in (("local", local), ("s3", s3_root)):
        m = read_manifest(root, "cifar10")
        for workers in (0, 2):
            readers[f"{where}_w{workers}"] = ShardBatches(
                Split.from_manifest(root, m, "train"), batch_size=128, rank=0, world_size=1,
                seed=0, train=True, augment="paper", mean=m["mean"], loader_workers=workers)
    for rd in readers.values():
        shards_pass(rd, 1000)  # untimed: client, worker processes
    rows = []
    for r in range(rounds):
        row = {"load_1min": round(os.getloadavg()[0], 2)}
        names = list(readers)
        for name in names[r % len(names):] + names[:r % len(names)]:
            row[name] = timed(shards_pass, readers[name], r)[0]
        rows.append(row)
        say(f"cifar round {r}: " + "  ".join(f"{k} {v:.0f}" for k, v in row.items()))
    for rd in readers.values():
        rd.close()
    return {"images": n, "batch": 128, "rounds": rows,
            "median_img_s": {k: float(np.median([row[k] for row in rows])) for k in readers}}


@contextlib.contextmanager
def moto_server(bucket: str = "bench"):
    """A moto S3 server in its own process (its request handling is not charged to the
    benchmark's core), the AWS variables pointing at it, and ``bucket`` created."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="x",
                          AWS_SECRET_ACCESS_KEY="x", AWS_DEFAULT_REGION="us-east-1")
        import boto3

        for _ in range(600):
            try:
                boto3.client("s3").create_bucket(Bucket=bucket)
                break
            except Exception:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        moto.terminate()
        moto.wait()


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--loader-workers", type=int, default=0,
                    help="also time local vs S3 with this many DataLoader worker processes")
    ap.add_argument("--cifar", type=int, default=0, metavar="N",
                    help="also time N CIFAR-shaped images: in-process vs DataLoader workers")
    ap.add_argument("--ray-data", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from resnet_cluster.data.imagenet import prepare_imagenet

    work = Path(tempfile.mkdtemp(prefix="rc-bench-data-"))
    build_folder(work / "src", args.images)
    files = sorted((work / "src" / "train").rglob("*.JPEG"))
    local = str(work / "shards")
    t = time.perf_counter()
    prep = prepare_imagenet(str(work / "src/train"), str(work / "src/val"), local,
                            shard_images=64)
    prep_s = time.perf_counter() - t
    src_bytes = sum(f.stat().st_size for f in files)

    with moto_server():
        s3 = "s3://bench/shards"
        import fsspec

        fs = fsspec.filesystem("s3")
        fs.put(local + "/", s3, recursive=True)

        readers = {"shards": shard_reader(local, args.batch), "s3": shard_reader(s3, args.batch)}
        first = {}
        for name, rd in readers.items():  # untimed in the rounds: client, connection, caches
            t = time.perf_counter()
            shards_pass(rd, 1000)
            first[name] = round(time.perf_counter() - t, 3)
        runs = {"baseline": lambda r: timed(baseline_pass, files, args.batch, r),
                "shards": lambda r: timed(shards_pass, readers["shards"], r),
                "s3": lambda r: timed(shards_pass, readers["s3"], r)}
        names = list(runs)
        rows = []
        for r in range(args.rounds):
            row = {"round": r, "load_1min": round(os.getloadavg()[0], 2)}
            for name in names[r % 3:] + names[:r % 3]:  # rotate the order every round
                row[name], row[f"{name}_cpu_ms"] = runs[name](r)
                row[f"{name}_cpu_ms"] *= 1000
            row["shards_over_baseline"] = row["shards"] / row["baseline"]
            row["s3_over_local"] = row["s3"] / row["shards"]
            rows.append(row)
            if not args.json:
                print(f"round {r}: baseline {row['baseline']:.0f}  shards {row['shards']:.0f}  "
                      f"s3 {row['s3']:.0f} img/s/core  ({row['shards_over_baseline']:.2f}x, "
                      f"s3 {row['s3_over_local']:.2f}x; load {row['load_1min']})", flush=True)

        def median(key):
            return float(np.median([row[key] for row in rows]))

        med = {k: median(k) for k in ("baseline", "shards", "s3")}
        result = {
            "images": len(files), "source_bytes": src_bytes, "shard_bytes": prep["bytes"],
            "prepare_s": round(prep_s, 2), "first_pass_s": first, "rounds": rows,
            "median_img_s_per_core": med,
            "median_cpu_ms_per_image": {k: median(f"{k}_cpu_ms") for k in med},
            "shards_over_baseline": med["shards"] / med["baseline"],
            "s3_over_local": med["s3"] / med["shards"],
            "median_round_ratio": {k: median(k) for k in ("shards_over_baseline",
                                                          "s3_over_local")},
            "load_1min": [row["load_1min"] for row in rows],
            # docs/references.md section 5: ResNet-50 at 2,470 img/s on one A100 (mixed precision)
            # and about 6.9k img/s per H100 in MLPerf.
            "cores_per_gpu": {"A100_2470": 2470 / med["shards"], "H100_6900": 6900 / med["shards"]},
            "cpu_count": os.cpu_count(),
        }
        if args.loader_workers:
            w = args.loader_workers
            par = {"shards": shard_reader(local, args.batch, w),
                   "s3": shard_reader(s3, args.batch, w)}
            for rd in par.values():
                shards_pass(rd, 1000)  # starts the persistent workers
            prow = []
            for r in range(args.rounds):
                order = ["shards", "s3"] if r % 2 == 0 else ["s3", "shards"]
                row = {"load_1min": round(os.getloadavg()[0], 2)}
                for name in order:
                    row[name] = timed(shards_pass, par[name], r)[0]
                prow.append(row)
                if not args.json:
                    print(f"workers {w}, round {r}: shards {row['shards']:.0f}  s3 "
                          f"{row['s3']:.0f} img/s (load {row['load_1min']})", flush=True)
            pm = {k: float(np.median([row[k] for row in prow])) for k in ("shards", "s3")}
            result["loader_workers"] = {"workers": w, "rounds": prow, "median_img_s": pm,
                                        "s3_over_local": pm["s3"] / pm["shards"]}
            for rd in par.values():
                rd.close()
        if args.cifar:
            result["cifar"] = cifar_epochs(
                work, "s3://bench/cifar", args.cifar, args.rounds,
                say=(lambda msg: None) if args.json else (lambda msg: print(msg, flush=True)))
        if args.ray_data:
            cpus = os.cpu_count() or 2
            torch.set_num_threads(1)
            dl_reader = shard_reader(local, args.batch, workers=cpus)
            dl = [timed(shards_pass, dl_reader, 10 + k)[0] for k in range(2)]
            dl_reader.close()
            n, secs = ray_data_pass(local, args.batch, cpus)
            n2, secs2 = ray_data_pass(local, args.batch, cpus)  # second pass: Ray is warm
            result["all_cores"] = {"dataloader_workers": cpus, "dataloader_img_s": dl,
                                   "ray_data_img_s": [n / secs, n2 / secs2], "load": loadavg()}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))


if __name__ == "__main__":
    main()
