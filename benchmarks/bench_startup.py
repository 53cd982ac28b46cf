"""Time from `submit` to the first training step, against a bare `torchrun` of the same loop.

Three ways to start the same 2-worker smoke job (ResNet-20, synthetic data, 20 iterations):
  torchrun    python -m torch.distributed.run --nproc_per_node 2 (gloo DDP, no Ray)
  gcs         resnet-cluster submit --address HOST:PORT to a running 1-node `ray start` cluster
  jobs-api    resnet-cluster submit --address http://HEAD:8265 --follow to a running 2-node
              cluster (STRICT_SPREAD: one worker per node)
The first step is when rank 0 calls the loop's on_start (just before its first batch): for the
Ray paths, the `started` event in events.jsonl. Each path runs --repeats times; medians reported.

    python benchmarks/bench_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from raynodes import RayNode, base_env, start_head, wait_for_nodes  # noqa: E402

JOB = str(REPO / "jobs" / "smoke.yaml")
SETS = ["train.iterations=20", "data.synthetic_train=640", "train.log_every_iterations=10"]
CLI = str(Path(sys.executable).parent / "resnet-cluster")


def torchrun_once() -> float:
    env = {**base_env(), "BENCH_T0": repr(time.time())}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(REPO / "benchmarks" / "_torchrun_loop.py"), JOB, *SETS],
        env=env, capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    line = next(x for x in out.stdout.splitlines() if x.startswith("FIRST_STEP_S="))
    return float(line.split("=")[1])


def submit_once(address: str, extra: list[str]) -> float:
    store = tempfile.mkdtemp(prefix="bench-startup-")
    env = {**base_env(), "RESNET_CLUSTER_STORE": store}
    sets = [a for s in SETS for a in ("--set", s)]
    t0 = time.time()
    out = subprocess.run([CLI, "submit", JOB, "--json", "--name", "startup", "--address", address, *sets, *extra],
                         env=env, capture_output=True, text=True, cwd=REPO)  # fmt: skip
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    events = [json.loads(x) for x in (Path(store) / "runs" / "startup" / "events.jsonl").read_text().splitlines()]
    started = next(e for e in events if e["event"] == "started")
    return datetime.fromisoformat(started["time"]).timestamp() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-nodes-"))
    results: dict[str, list[float]] = {"torchrun": [], "gcs": [], "jobs-api": []}
    head = start_head(tmp, num_cpus=2, resources={"worker_node": 1})
    second = None
    try:
        for _ in range(a.repeats):
            results["torchrun"].append(torchrun_once())
            results["gcs"].append(submit_once(head.gcs, []))
        second = RayNode(head_gcs=head.gcs, num_cpus=2, resources={"worker_node": 1}, log=tmp / "b.log")
        wait_for_nodes(head, 2)
        for _ in range(a.repeats):
            results["jobs-api"].append(
                submit_once(head.dashboard, ["--follow", "--set", "scaling.placement=STRICT_SPREAD"])
            )
    finally:
        if second:
            second.kill()
        head.kill()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(json.dumps({"seconds": results, "median": med,
                      "ratio_vs_torchrun": {k: round(v / med["torchrun"], 2) for k, v in med.items()},
                      "load_avg": os.getloadavg()}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
