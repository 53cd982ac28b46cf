"""Prepare ImageNet from the official tars vs from the extracted folders, and as Ray tasks vs
one process (issue 16).

Builds N ImageNet-like JPEGs (benchmarks/data.py ``build_folder``: crops of the photos
scikit-learn and scikit-image ship, at ImageNet's usual sizes, about 1 in 8 above 480 px),
a flat val of V of them with devkit-style labels, and the three archives
(tests/test_imagenet_archives.py ``make_archives``: nested class tars, val tar, devkit with a
scipy-written meta.mat). Then, interleaved over rounds with the order rotated each round, each
into a fresh --dest with --shard-images per shard (64 by default, for many tasks):

- folder: ``prepare_imagenet`` on the extracted folders, one process;
- tar: the same from the three archives, one process (shards checked identical to folder's);
- tar_sample: the tar prepare with ``--stats-sample S`` (the cost of full statistics);
- pool: the tar prepare with ``--workers C`` (C processes on this machine: the same
  parallelism as Ray, without Ray);
- ray: the tar prepare with its shard writers as Ray tasks (``RayRunner``) on a local Ray
  cluster of C CPUs, started once and warmed by one untimed prepare.

Per core, two ways: wall-clock images/s divided by the cores used (1, or C for Ray), and
images per CPU second: this process's ``process_time`` for the one-process runs; for Ray, this
process plus EVERY process of the local cluster (raylet, GCS, dashboard, workers: psutil over
this process's descendants), so Ray's own overhead is paid for (the pool's processes likewise).
Also the index alone (headers only) from local disk, and with ``--s3-index`` from a moto S3
server (its own process) with the requests and bytes counted (moto's own time per ranged GET
grows with the object's size, as it copies the object for each one, so only the counts carry
over to real S3).

    python benchmarks/prepare_tars.py --images 2000 --val 200 --rounds 5 --stats-sample 200 \
        [--ray-cpus C] [--s3-index] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from data import build_folder, loadavg, moto_server  # noqa: E402  (benchmarks/data.py)


def make_sources(work: Path, n: int, n_val: int) -> dict:
    """Extracted folders (train/, flat val/, ground truth + synset list) and the archives."""
    from test_imagenet_archives import make_archives

    build_folder(work / "src", n)
    train = work / "src" / "train"
    classes = sorted(p.name for p in train.iterdir())
    files = sorted(train.rglob("*.JPEG"))
    rng = np.random.default_rng(1)
    val = work / "src" / "flatval"
    val.mkdir()
    synsets = list(rng.permutation(classes))  # devkit IDs are not in sorted-wnid order
    ids = []
    for k, i in enumerate(rng.choice(len(files), n_val, replace=False), start=1):
        f = files[i]
        (val / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(f.read_bytes())
        ids.append(synsets.index(f.parent.name) + 1)
    (work / "src" / "synsets.txt").write_text("".join(f"{w}\n" for w in synsets))
    (work / "src" / "gt.txt").write_text("".join(f"{i}\n" for i in ids))
    layout = {"train": str(train), "val": str(val), "synsets": str(work / "src" / "synsets.txt"),
              "val_labels": str(work / "src" / "gt.txt")}
    tars = make_archives(work, layout, dest=work / "download")
    return {"layout": layout, "tars": tars}


class ClusterCPU:
    """CPU seconds used by this process and every process below it (the local Ray cluster)
    between start() and stop(). Sampled every 0.1 s on a thread, keeping each process's last
    reading, so a worker or actor that exits during the run is still counted (all but its last
    0.1 s)."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()

    def _read(self) -> dict[int, float]:
        import psutil

        out = {}
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                out[p.pid] = sum(p.cpu_times()[:2])
            except psutil.Error:
                pass
        return out

    def start(self) -> None:
        import threading

        self.base, self.last = self._read(), {}
        self.stopping = threading.Event()

        def sample() -> None:
            while not self.stopping.wait(0.1):
                self.last.update(self._read())

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()

    def stop(self) -> float:
        self.stopping.set()
        self.thread.join()
        self.last.update(self._read())
        return sum(max(0.0, t - self.base.get(pid, 0.0)) for pid, t in self.last.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stats-sample", type=int, default=50)
    ap.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--shard-images", type=int, default=64)
    ap.add_argument("--s3-index", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from resnet_cluster.data.archives import index_class_tars
    from resnet_cluster.data.imagenet import prepare_imagenet
    from resnet_cluster.data.shards import read_manifest
    from resnet_cluster.launch.prepare import RayRunner

    work = Path(tempfile.mkdtemp(prefix="rc-bench-tars-"))
    src = make_sources(work, args.images, args.val)
    lay, tars = src["layout"], src["tars"]
    opts = {"shard_images": args.shard_images}
    n_total = args.images + args.val
    say = (lambda msg: None) if args.json else (lambda msg: print(msg, flush=True))

    def folder(dest):
        return prepare_imagenet(lay["train"], lay["val"], dest, val_labels=lay["val_labels"],
                                synsets=lay["synsets"], **opts)

    def tar(dest, **kw):
        return prepare_imagenet(tars["train"], tars["val"], dest, devkit=tars["devkit"],
                                **opts, **kw)

    import ray

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=True, logging_level="ERROR",
             log_to_driver=False)
    runner = RayRunner(None)  # connect(None) finds this process's cluster already up
    tar(str(work / "warm"), runner=runner)  # workers started, modules imported

    meter = ClusterCPU()  # what the idle cluster burns (raylet, GCS, dashboard, agents)
    meter.start()
    time.sleep(10)
    idle_cpu_per_s = meter.stop() / 10

    runs = {
        "folder": (1, lambda d: folder(d)),
        "tar": (1, lambda d: tar(d)),
        "tar_sample": (1, lambda d: tar(d, stats_sample=args.stats_sample)),
        "pool": (args.ray_cpus, lambda d: tar(d, workers=args.ray_cpus)),
        "ray": (args.ray_cpus, lambda d: tar(d, runner=runner)),
    }
    names = list(runs)
    rows = []
    for r in range(args.rounds):
        row = {"round": r, "load_1min": round(os.getloadavg()[0], 2)}
        for name in names[r % len(names):] + names[:r % len(names)]:
            cores, fn = runs[name]
            dest = str(work / f"{name}-{r}")
            meter = ClusterCPU()
            meter.start()
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            fn(dest)
            wall = time.perf_counter() - t0
            cpu = meter.stop() if name in ("ray", "pool") else time.process_time() - cpu0
            row[name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                         "img_s_per_core_wall": round(n_total / wall / cores, 1),
                         "img_per_cpu_s": round(n_total / cpu, 1)}
            if name == "ray":  # the same without the idle cluster's own use over the run
                row[name]["img_per_cpu_s_less_idle"] = round(
                    n_total / (cpu - idle_cpu_per_s * wall), 1)
        a, b = read_manifest(str(work / f"folder-{r}")), read_manifest(str(work / f"tar-{r}"))
        row["tar_identical"] = a["splits"] == b["splits"]
        rows.append(row)
        say(f"round {r} (load {row['load_1min']}): " + ", ".join(
            f"{k} {row[k]['img_per_cpu_s']} img/cpu-s, {row[k]['img_s_per_core_wall']} img/s/core"
            for k in names))

    def med(name, key):
        return float(np.median([row[name][key] for row in rows]))

    result = {
        "images": n_total, "train": args.images, "val": args.val, "rounds": rows,
        "shard_images": args.shard_images,
        "ray_cpus": args.ray_cpus, "cpu_count": os.cpu_count(),
        "source_bytes": sum(Path(p).stat().st_size for p in (tars["train"], tars["val"])),
        "median": {k: {m: med(k, m) for m in ("img_per_cpu_s", "img_s_per_core_wall")}
                   for k in names},
    }
    m = result["median"]
    # Paired per round (the same load for all four), then the median over rounds: on a shared
    # machine the load moves both sides of a ratio together, and the absolute figures with it.
    pairs = {"tar_over_folder": ("tar", "folder"), "ray_over_single": ("ray", "tar"),
             "ray_over_pool": ("ray", "pool"), "pool_over_single": ("pool", "tar"),
             "sample_over_full": ("tar_sample", "tar")}
    result["ratios"] = {
        f"{k}_{unit}": float(np.median([row[a][key] / row[b][key] for row in rows]))
        for k, (a, b) in pairs.items()
        for unit, key in (("cpu", "img_per_cpu_s"), ("wall", "img_s_per_core_wall"))}
    result["ratios"]["ray_over_single_cpu_less_idle"] = float(np.median(
        [row["ray"]["img_per_cpu_s_less_idle"] / row["tar"]["img_per_cpu_s"] for row in rows]))
    result["idle_cluster_cpu_per_s"] = round(idle_cpu_per_s, 3)
    ray.shutdown()

    # the index alone: header reads of the train tar, from disk and from S3 (moto)
    t0 = time.perf_counter()
    members = sum(len(v) for v in index_class_tars(tars["train"]).values())
    index = {"members": members, "local_s": round(time.perf_counter() - t0, 3)}
    with moto_server() if args.s3_index else contextlib.nullcontext(None) as endpoint:
        if endpoint is None:
            return _report(result, index, args)
        import fsspec

        fs = fsspec.filesystem("s3")
        fs.put_file(tars["train"], "s3://bench/train.tar")
        from s3fs import S3FileSystem

        calls = {"n": 0, "bytes": 0}
        orig = S3FileSystem._call_s3

        async def counting(self, method, *a, **k):
            calls["n"] += 1
            if k.get("Range"):
                lo, hi = k["Range"].split("=")[1].split("-")
                calls["bytes"] += int(hi) - int(lo) + 1
            return await orig(self, method, *a, **k)

        S3FileSystem._call_s3 = counting
        try:
            t0 = time.perf_counter()
            index_class_tars("s3://bench/train.tar")
            index["s3_s"] = round(time.perf_counter() - t0, 3)
            index["s3_requests"], index["s3_bytes"] = calls["n"], calls["bytes"]
        finally:
            S3FileSystem._call_s3 = orig
    _report(result, index, args)


def _report(result: dict, index: dict, args) -> None:
    result["index"] = index
    result["load_end"] = loadavg()
    print(json.dumps(result if args.json else {k: v for k, v in result.items() if k != "rounds"},
                     indent=1))


if __name__ == "__main__":
    main()
