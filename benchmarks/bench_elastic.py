"""Elastic training costs (issue 13), each against a baseline measured in the same invocation.

    python benchmarks/bench_elastic.py accumulation [--iterations 40] [--reps 3]
    python benchmarks/bench_elastic.py checkpoint [--reps 3] [--gap 8]

accumulation: per-worker training throughput of a resized run (W = N/2 = 1 worker of an N = 2
recipe, accumulating 2 micro-batches of 32 per step through ``engine.fit``) against a
fixed-size worker (N = 1, one batch of 32 per step): the same images per forward, the same
model (cifar_resnet20), synthetic CIFAR-shaped data with the paper's augmentation, 1 torch
thread. Alternates fixed, resized, fixed, ... ``--reps`` times; figures are the median
per-epoch images/s (epochs 2..), the ratio is resized / fixed.

checkpoint: the time a rank is held per checkpoint with ``checkpoint_upload_mode`` SYNC vs ASYNC
for a ResNet-50-sized train state (weights + SGD momentum, about 205 MB) stored on moto's S3
server through the same path the runs use (``launch.trainer.ray_storage``: pyarrow
FSSpecHandler over s3fs). One Ray Train worker alternates SYNC and ASYNC reports, ``--gap``
seconds of simulated training between them; held = writing train_state.pt locally + the
``ray.train.report`` call. The ratio is async / sync of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def machine() -> str:
    import ray
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, Ray {ray.__version__}, load {os.getloadavg()[0]:.2f}")


# ---------------------------------------------------------------------------- accumulation
def accumulation(args) -> None:
    import torch

    from resnet_cluster.models.jobs import from_dict
    from resnet_cluster.engine import Callback, fit

    torch.set_num_threads(1)
    base = {"model": {"arch": "cifar_resnet20"}, "data": {"dataset": "synthetic", "synthetic_train": 32 * 2 * 20,
                                                          "synthetic_test": 64},
            "train": {"iterations": None, "epochs": 0, "eval_every_epochs": 1000, "log_every_iterations": 10},
            "schedule": {"policy": "constant"}}

    class Speed(Callback):
        def __init__(self):
            self.rates = []

        def on_epoch_end(self, record, state):
            self.rates.append(record["images_per_sec"])

    def run(workers, batch) -> float:
        cfg = dict(base, train={**base["train"], "batch_size": batch, "epochs": args.epochs},
                   scaling={"workers": workers})
        sp = Speed()
        fit(from_dict(cfg), callbacks=[sp])
        return statistics.median(sp.rates[1:])  # per worker: one process here

    fixed, resized = [], []
    for _ in range(args.reps):
        fixed.append(run(1, 32))  # N = 1: one batch of 32 per step
        resized.append(run({"min": 1, "max": 2}, 64))  # N = 2 on W = 1: 2 micro-batches of 32
        print(f"fixed {fixed[-1]:.1f} img/s, resized {resized[-1]:.1f} img/s", flush=True)
    f, r = statistics.median(fixed), statistics.median(resized)
    print(json.dumps({"machine": machine(), "fixed": fixed, "resized": resized, "fixed_median": f,
                      "resized_median": r, "ratio": r / f}, indent=1))


# ---------------------------------------------------------------------------- checkpoint
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loop(config):
    import shutil

    import ray.train
    import torch
    from ray.train import CheckpointUploadMode

    from resnet_cluster import models
    from resnet_cluster.engine.checkpoint import save_train_state

    model = models.build("resnet50", shortcut="B")  # 25.6 M parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0}
    held = {"sync": [], "async": []}
    for i in range(2 * config["reps"]):
        mode = "sync" if i % 2 == 0 else "async"
        time.sleep(config["gap"])  # training between checkpoints: the async upload runs here
        t0 = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix="bench-ckpt-")
        save_train_state(tmp, state)
        ray.train.report(
            {"i": i}, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"c{i:03d}",
            checkpoint_upload_mode=CheckpointUploadMode.SYNC if mode == "sync" else CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
        )
        held[mode].append(time.perf_counter() - t0)
        if mode == "sync":
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs) if os.path.isdir(tmp) else 0
    time.sleep(config["gap"])  # let the last async upload finish before the run ends
    with open(config["out"], "w") as f:
        json.dump({"held": held, "bytes": size}, f)


def checkpoint(args) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    moto = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=url)
        time.sleep(3)
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from resnet_cluster.artifacts.store import ArtifactStore
        from resnet_cluster.launch.trainer import ray_storage

        store = ArtifactStore("s3://bench-elastic/store", endpoint_url=url)
        store.fs.mkdir("bench-elastic")
        path, fs = ray_storage(store, "bench-run")
        out = os.path.join(tempfile.mkdtemp(), "held.json")
        ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR")
        trainer = TorchTrainer(
            _loop, train_loop_config={"reps": args.reps, "gap": args.gap, "out": out},
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(name="checkpoints", storage_path=path, storage_filesystem=fs),
        )
        trainer.fit()
        res = json.load(open(out))
        s, a = statistics.median(res["held"]["sync"]), statistics.median(res["held"]["async"])
        print(json.dumps({"machine": machine(), **res, "sync_median_s": s, "async_median_s": a, "ratio": a / s},
                         indent=1))
    finally:
        moto.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("accumulation")
    a.add_argument("--epochs", type=int, default=4)
    a.add_argument("--reps", type=int, default=3)
    c = sub.add_parser("checkpoint")
    c.add_argument("--reps", type=int, default=3)
    c.add_argument("--gap", type=float, default=8.0)
    args = ap.parse_args()
    accumulation(args) if args.what == "accumulation" else checkpoint(args)


if __name__ == "__main__":
    main()
