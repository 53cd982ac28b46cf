"""Optimizer step time and operator count: the Caffe/Torch7 momentum SGD (optim/solvers.py) in
its multi-tensor form (``foreach``, the default for parameters on a GPU) and its per-tensor
loop (the CPU's default) against ``torch.optim.SGD(foreach=True)`` and, when git can show it,
the solver before issue 14 (the per-tensor loop only: ~4 small kernels per parameter tensor,
1,870 operators per step on ResNet-152).

    python benchmarks/bench_solvers.py [--archs resnet50,resnet152] [--device cpu|cuda]
                                       [--steps 15] [--threads 2] [--baseline 7caa449]

Solvers are interleaved step by step, in an order rotated every round, so that load from other
processes (and the caches and allocator state one leaves to the next) hit them alike; each
figure is the median step time (weight decay 1e-4, momentum 0.9, gradients random, no
forward/backward). Prints one JSON line per (arch, solver) with the operator count of one step
(TorchDispatchMode) and the ratio to foreach SGD.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from resnet_cluster import models
from resnet_cluster.optim.solvers import MomentumSGD

HERE = os.path.dirname(os.path.abspath(__file__))


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        if not str(func).startswith("profiler."):
            self.n += 1
        return func(*args, **(kwargs or {}))


def baseline_class(commit: str):
    """MomentumSGD as it was at ``commit`` (the per-parameter loop), or None without git."""
    try:
        src = subprocess.run(["git", "show", f"{commit}:resnet_cluster/optim/solvers.py"], cwd=HERE,
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    mod = types.ModuleType("solvers_before")
    exec(compile(src, f"{commit}:resnet_cluster/optim/solvers.py", "exec"), mod.__dict__)
    return mod.MomentumSGD


def make_solvers(params, baseline, only: set[str] | None = None):
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    out = {
        "sgd_foreach": torch.optim.SGD(params, foreach=True, **kw),
        "caffe_foreach": MomentumSGD(params, style="caffe", foreach=True, **kw),
        "torch7_foreach": MomentumSGD(params, style="torch7", foreach=True, **kw),
        "caffe_per_tensor": MomentumSGD(params, style="caffe", foreach=False, **kw),
    }
    if baseline is not None:
        out["caffe_before"] = baseline(params, style="caffe", **kw)
    return {k: v for k, v in out.items() if only is None or k in only}


def run(arch: str, device: str, steps: int, baseline, only: set[str] | None = None) -> list[dict]:
    torch.manual_seed(0)
    net = models.build(arch, **({"shortcut": "B"} if arch.startswith("resnet") else {})).to(device)
    params = list(net.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    solvers = make_solvers(params, baseline, only)
    times: dict[str, list[float]] = {k: [] for k in solvers}
    ops = {}
    for name, opt in solvers.items():
        opt.step()  # momentum buffers
        c = _Count()
        with c:
            opt.step()
        ops[name] = c.n
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    names = list(solvers)
    for i in range(steps):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotated: no solver always follows another
            opt = solvers[name]
            sync()
            t = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["sgd_foreach"]) if "sgd_foreach" in times else float("nan")
    rows = []
    for name in solvers:
        med = statistics.median(times[name])
        rows.append({"arch": arch, "params": len(params), "device": device, "solver": name,
                     "step_ms": round(1e3 * med, 3), "ratio_to_sgd_foreach": round(med / base, 3),
                     "operators": ops[name], "steps": steps, "load1": round(os.getloadavg()[0], 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="resnet50,resnet152")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", default="7caa449", help="commit whose MomentumSGD is the per-parameter loop")
    ap.add_argument("--solvers", default=None, help="comma-separated subset, e.g. caffe_per_tensor (one per process "
                    "compares without one solver's allocations changing the next one's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    baseline = baseline_class(args.baseline) if args.baseline else None
    for arch in args.archs.split(","):
        only = set(args.solvers.split(",")) if args.solvers else None
        for row in run(arch, args.device, args.steps, baseline, only):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
