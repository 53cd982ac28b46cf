"""The bare baseline for bench_startup.py: the same loop under torchrun (gloo DDP, no Ray).

Prints the seconds from $BENCH_T0 (set by the benchmark just before it launches torchrun) to
the moment rank 0 is about to run its first training step.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from resnet_cluster.engine import Callback, WorkerContext, fit
from resnet_cluster.models import jobs


class FirstStep(Callback):
    def on_start(self, info):
        if int(os.environ["RANK"]) == 0:
            print(f"FIRST_STEP_S={time.time() - float(os.environ['BENCH_T0']):.3f}", flush=True)


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    cfg = jobs.load(sys.argv[1], sys.argv[2:])
    ctx = WorkerContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ["LOCAL_RANK"]))
    fit(cfg, ctx, callbacks=[FirstStep()], wrap_model=torch.nn.parallel.DistributedDataParallel)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
