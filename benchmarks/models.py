"""CPU train-step time (forward + backward + SGD step) at batch 32, eager vs channels_last vs
torch.compile, for ResNet-50 at 224 and ResNet-110 / ResNet-1202 at 32.

    python benchmarks/models.py [--models resnet50,cifar_resnet110,cifar_resnet1202]
                                [--modes eager,channels_last,compile] [--steps 3] [--threads 2]

Modes are interleaved step by step (eager, channels_last, compile, eager, ...) so that load from
other processes on a shared machine hits them alike; the ratio to eager is what to compare.
Prints one JSON line per (model, mode) with the median step time, plus the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from resnet_cluster import models


def make_step(name: str, mode: str, batch: int, device: str):
    torch.manual_seed(0)
    size = models.info(name).input_size
    net = models.build(name).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    if mode in ("channels_last", "compile_channels_last"):
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, net.fc.out_features, (batch,), device=device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    run = torch.compile(net) if mode.startswith("compile") else net

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(run(x), y).backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,cifar_resnet110,cifar_resnet1202")
    ap.add_argument("--modes", default="eager,channels_last,compile")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        steps, warm = {}, {}
        for mode in args.modes.split(","):
            steps[mode] = make_step(name, mode, args.batch, args.device)
            t = time.perf_counter()
            steps[mode]()  # first step: compile / allocator warm-up, reported apart
            warm[mode] = time.perf_counter() - t
        times = {m: [] for m in steps}
        for _ in range(args.steps):
            for m, fn in steps.items():
                times[m].append(fn())
        base = statistics.median(times[next(iter(times))])
        for m, ts in times.items():
            med = statistics.median(ts)
            print(json.dumps({
                "model": name, "mode": m, "batch": args.batch, "device": args.device,
                "threads": args.threads, "step_s": round(med, 4), "first_step_s": round(warm[m], 2),
                "images_per_s": round(args.batch / med, 2), "ratio_to_first_mode": round(med / base, 3),
                "loadavg": [round(v, 2) for v in os.getloadavg()], "torch": torch.__version__,
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
