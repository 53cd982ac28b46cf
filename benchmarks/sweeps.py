"""Sweep throughput (trials per hour) and per-trial overhead, against the same run submitted alone.

On one running `ray start` cluster (so no figure includes starting Ray), with tiny trials
(ResNet-20, synthetic CIFAR-shaped data, 1 worker with 1 CPU, a few iterations):
  alone       `resnet-cluster submit --address HOST:PORT` of one trial's job; overhead = from
              submit() being called (the run's `submitted` event) to rank 0's first training step
              (the `started` event); also from launching the command
  sweep N     `resnet-cluster sweep FILE --address HOST:PORT` with max_concurrent N; overhead per
              trial = from the Tune trial function starting (`trial_start_unix` on the run's
              `submitted` event) to the run's `started` event; throughput = trials / wall time of
              the whole command

  --remote    through the Jobs API of the same cluster, as a laptop user would: from launching
              `resnet-cluster sweep smoke --address http://HEAD:8265 --follow` to the first trial's
              first training step (its run's `started` event), against launching
              `resnet-cluster submit` of one trial's job the same way; alternated, same cluster

    python benchmarks/sweeps.py [--trials 4] [--concurrency 1 2] [--repeats 2]
    python benchmarks/sweeps.py --remote [--repeats 3]
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
from raynodes import base_env, start_head  # noqa: E402

CLI = str(Path(sys.executable).parent / "resnet-cluster")
SETS = {
    "train.iterations": 8, "train.batch_size": 32, "train.log_every_iterations": 4,
    "data.synthetic_train": 128, "data.synthetic_test": 64, "schedule.milestones": [6], "scaling.workers": 1,
}  # fmt: skip


def _events(store: Path, run_id: str) -> list[dict]:
    return [json.loads(x) for x in (store / "runs" / run_id / "events.jsonl").read_text().splitlines()]


def _t(event: dict) -> float:
    return datetime.fromisoformat(event["time"]).timestamp()


def alone_once(gcs: str) -> dict[str, float]:
    store = Path(tempfile.mkdtemp(prefix="bench-sweep-alone-"))
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    t0 = time.time()
    out = subprocess.run(
        [CLI, "submit", str(REPO / "jobs" / "smoke.yaml"), "--json", "--name", "alone", "--address", gcs,
         "--set", "scaling.cpus_per_worker=1", *sets],
        env={**base_env(), "RESNET_CLUSTER_STORE": str(store)}, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    ev = _events(store, "alone")
    submitted = next(e for e in ev if e["event"] == "submitted")
    started = next(e for e in ev if e["event"] == "started")
    return {"overhead_s": _t(started) - _t(submitted), "from_command_s": _t(started) - t0, "wall_s": time.time() - t0}


def sweep_once(gcs: str, trials: int, concurrent: int) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    store = tmp / "store"
    sweep = {
        "name": "bench",
        "base": str(REPO / "jobs" / "smoke.yaml"),
        "set": SETS,
        "grid": {"model.arch": ["cifar_resnet20", "cifar_plain20"]},
        "seeds": max(1, trials // 2),
        "trial_resources": {"cpu": 1},
        "max_concurrent": concurrent,
    }
    (tmp / "bench.yaml").write_text(json.dumps(sweep))  # JSON is YAML
    t0 = time.time()
    out = subprocess.run(
        [CLI, "sweep", str(tmp / "bench.yaml"), "--json", "--address", gcs],
        env={**base_env(), "RESNET_CLUSTER_STORE": str(store)}, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    wall = time.time() - t0
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    doc = json.loads(out.stdout)
    overheads = []
    for t in doc["trials"]:
        ev = _events(store, t["run_id"])
        submitted = next(e for e in ev if e["event"] == "submitted")
        started = next(e for e in ev if e["event"] == "started")
        overheads.append(_t(started) - submitted["trial_start_unix"])
    n = len(doc["trials"])
    return {"trials": n, "wall_s": wall, "trials_per_hour": n / wall * 3600, "overhead_s": overheads}


def remote_once(dashboard: str, kind: str) -> dict[str, float]:
    """Launch a remote submit (one trial's job) or a remote 2-trial sweep with --follow; seconds
    from the command's start to the first training step of its (first) run."""
    store = Path(tempfile.mkdtemp(prefix=f"bench-remote-{kind}-"))
    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    if kind == "submit":
        args = ["submit", "jobs/smoke.yaml", "--name", "remote-alone", "--set", "scaling.cpus_per_worker=1", *sets]
    else:
        args = ["sweep", "smoke", *sets]
    t0 = time.time()
    out = subprocess.run(
        [CLI, *args, "--json", "--follow", "--address", dashboard],
        env={**base_env(), "RESNET_CLUSTER_STORE": str(store)}, capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    wall = time.time() - t0
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    starts = [
        _t(e) for run in (store / "runs").iterdir() for e in _events(store, run.name) if e["event"] == "started"
    ]
    return {"to_first_step_s": min(starts) - t0, "wall_s": wall}


def remote_main(repeats: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-nodes-"))
    head = start_head(tmp, num_cpus=2, resources={})
    out: dict[str, object] = {"load_avg_start": os.getloadavg()}
    try:
        runs: dict[str, list] = {"submit": [], "sweep": []}
        for _ in range(repeats):  # alternated, so both see the same drift in load
            for kind in ("submit", "sweep"):
                runs[kind].append(remote_once(head.dashboard, kind))
        for kind, rs in runs.items():
            out[f"remote_{kind}"] = {"to_first_step_s_median": statistics.median(r["to_first_step_s"] for r in rs), "runs": rs}
        out["sweep_vs_submit"] = out["remote_sweep"]["to_first_step_s_median"] / out["remote_submit"]["to_first_step_s_median"]
    finally:
        head.kill()
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--remote", action="store_true", help="Jobs API: remote sweep vs remote submit, to first step")
    a = ap.parse_args()
    if a.remote:
        remote_main(a.repeats)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-nodes-"))
    head = start_head(tmp, num_cpus=2, resources={})
    out: dict[str, object] = {"load_avg_start": os.getloadavg()}
    try:
        alone = [alone_once(head.gcs) for _ in range(a.repeats)]
        out["alone"] = {
            "overhead_s_median": statistics.median(x["overhead_s"] for x in alone),
            "from_command_s_median": statistics.median(x["from_command_s"] for x in alone),
            "wall_s_median": statistics.median(x["wall_s"] for x in alone),
            "runs": alone,
        }
        for c in a.concurrency:
            runs = [sweep_once(head.gcs, a.trials, c) for _ in range(a.repeats)]
            overheads = [o for r in runs for o in r["overhead_s"]]
            out[f"sweep_concurrent_{c}"] = {
                "trials_per_hour_median": statistics.median(r["trials_per_hour"] for r in runs),
                "overhead_s_median": statistics.median(overheads),
                "overhead_vs_alone": statistics.median(overheads) / out["alone"]["overhead_s_median"],
                "runs": runs,
            }
    finally:
        head.kill()
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
