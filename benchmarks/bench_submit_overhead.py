"""Training throughput through `resnet-cluster submit` vs a bare PyTorch loop.

Both train CIFAR ResNet-20 with the same batch and the same torch thread count, on the same
machine, in the same invocation (bare, submit, bare again, to expose drift). The submit path
is the real one: a local Ray cluster, Ray Train with 1 worker, the synthetic CIFAR-shaped
dataset with the paper's augmentation, CSVs, checkpoints every epoch and the manifest.

Its figure is the median over epochs 2.. of the per-epoch training images/s that the worker
records in testing_error.csv (epoch 1 includes warm-up). The bare loop's figure is the median
over blocks of the same number of iterations after one warm-up block.

    python benchmarks/bench_submit_overhead.py [--batch 128] [--threads 2] [--iterations 400]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bare_loop(batch: int, threads: int, iterations: int, block: int) -> float:
    import torch
    import torch.nn.functional as F

    from resnet_cluster import models
    from resnet_cluster.data.synthetic import make_synthetic

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = make_synthetic(batch * block, 0, seed=0)
    x_all = (torch.from_numpy(data.train_x).float() - 127.5) / 255.0
    y_all = torch.from_numpy(data.train_y)
    model = models.build("cifar_resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    rates = []
    n_blocks = max(2, iterations // block)
    for b in range(n_blocks):
        t0 = time.perf_counter()
        for i in range(block):
            x, y = x_all[i * batch:(i + 1) * batch], y_all[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if b:  # block 0 is warm-up
            rates.append(block * batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def submit_run(batch: int, threads: int, iterations: int, block: int) -> tuple[float, dict]:
    store = tempfile.mkdtemp(prefix="bench-store-")
    cli = str(Path(sys.executable).parent / "resnet-cluster")
    cmd = [
        cli, "submit", str(REPO / "jobs" / "smoke.yaml"), "--json", "--name", "bench",
        "--workers", "1",
        "--set", f"scaling.cpus_per_worker={threads}",
        "--set", f"train.batch_size={batch}",
        "--set", f"train.iterations={iterations}",
        "--set", f"data.synthetic_train={batch * block}",
        "--set", "train.log_every_iterations=20",
        "--set", "schedule.milestones=[]",
    ]  # fmt: skip
    env = {**os.environ, "RESNET_CLUSTER_STORE": store}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"submit failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    with open(Path(result["uri"]) / "testing_error.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["images_per_sec"]) for r in rows[1:]]
    return statistics.median(rates), {"epochs": len(rows), "wall_s": result["seconds"], "per_epoch": rates}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--block", type=int, default=40, help="iterations per epoch / per bare block")
    a = ap.parse_args()
    bare1 = bare_loop(a.batch, a.threads, a.iterations, a.block)
    sub, detail = submit_run(a.batch, a.threads, a.iterations, a.block)
    bare2 = bare_loop(a.batch, a.threads, a.iterations, a.block)
    bare = (bare1 + bare2) / 2
    import ray
    import torch

    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "torch": torch.__version__,
        "ray": ray.__version__,
        "batch": a.batch,
        "threads": a.threads,
        "bare_images_per_sec": [round(bare1, 1), round(bare2, 1)],
        "submit_images_per_sec": round(sub, 1),
        "submit_detail": detail,
        "ratio": round(sub / bare, 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
