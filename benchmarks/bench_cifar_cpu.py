"""Time per 1k training iterations of the paper's CIFAR nets on this machine's CPU, and the
projected time of the paper's 64k-iteration schedule.

In-process ``engine.fit`` (no Ray), one worker, global batch 128 as in the paper, synthetic
CIFAR-shaped data (the same loop, augmentation and solver as a real run; no CIFAR download
is possible offline), fp32. Each net runs ``--iters`` iterations; the seconds per iteration
are the median of the per-iteration log windows after ``--skip`` warm-up iterations (the
first steps allocate). ResNet-20 and ResNet-110 are interleaved over ``--rounds`` rounds so
that load from other processes hits both alike.

    python benchmarks/bench_cifar_cpu.py --threads 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from resnet_cluster.engine import Callback, WorkerContext, fit
from resnet_cluster.models import jobs

SMOKE = os.path.join(os.path.dirname(__file__), "..", "jobs", "smoke.yaml")


class Times(Callback):
    def __init__(self):
        self.ips: list[float] = []

    def on_log(self, record):
        self.ips.append(record["images_per_sec"])


def measure(arch: str, iters: int, skip: int) -> float:
    cfg = jobs.load(SMOKE, [
        f"model.arch={arch}", "scaling.workers=1", "train.batch_size=128", f"train.iterations={iters}",
        "train.log_every_iterations=1", f"data.synthetic_train={128 * iters}", "data.synthetic_test=128",
        "schedule.milestones=[]", "train.eval_every_epochs=1000",
    ])
    t = Times()
    fit(cfg, WorkerContext(), callbacks=[t])
    return statistics.median(128.0 / ips for ips in t.ips[skip:])  # seconds per iteration


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=json.loads, default={"cifar_resnet20": 12, "cifar_resnet110": 5})
    ap.add_argument("--skip", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, list[float]] = {a: [] for a in args.iters}
    for r in range(args.rounds):
        for arch, n in args.iters.items():
            load = os.getloadavg()[0]
            s = measure(arch, n, args.skip)
            results[arch].append(s)
            print(f"round {r} {arch}: {s:.3f} s/iteration ({1000 * s / 60:.1f} min per 1k), load {load:.2f}", flush=True)
    summary = {}
    for arch, vals in results.items():
        s = statistics.median(vals)
        summary[arch] = {"s_per_iter": s, "min_per_1k": 1000 * s / 60, "hours_64k": 64000 * s / 3600, "rounds": vals}
    r20, r110 = summary["cifar_resnet20"]["s_per_iter"], summary["cifar_resnet110"]["s_per_iter"]
    summary["ratio_r110_over_r20"] = r110 / r20
    summary["threads"] = args.threads
    summary["torch"] = torch.__version__
    summary["loadavg_end"] = os.getloadavg()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
