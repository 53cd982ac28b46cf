"""A real sweep through the CLI on a real local Ray cluster (Ray Tune trials, each a Ray Train run).

One sweep, a 2×2 grid with 2 seeds on synthetic data at a few iterations (8 trials), is
interrupted with Ctrl-C after the first trials finished and then resumed: the resume runs only
the missing trials, every one of the 8 trials ends as a complete run in the store tagged with the
sweep id, and the report has 4 rows whose mean and std are those of the runs' own results.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resnet_cluster.artifacts.manifest import verify_manifest
from resnet_cluster.artifacts.store import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "resnet-cluster")

pytestmark = pytest.mark.ray

SWEEP = """
name: tiny
title: tiny sweep
base: {smoke}
set:
  train.iterations: 6
  train.batch_size: 32
  train.log_every_iterations: 2
  data.synthetic_train: 128
  data.synthetic_test: 64
  schedule.milestones: [4]
  scaling.workers: 1
grid:
  model.arch: [cifar_resnet20, cifar_plain20]
  solver:
    sgd: {{optim.solver: sgd, optim.lr: 0.1}}
    adagrad: {{optim.solver: adagrad, optim.lr: 0.01}}
reference: {{"model.arch=cifar_resnet20 / sgd": 8.29}}
seeds: 2
trial_resources: {{cpu: 1}}
max_concurrent: 2
"""


def _env(store: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["RESNET_CLUSTER_STORE"] = str(store)
    env.pop("RAY_ADDRESS", None)
    return env


def _finished(store: Path) -> set[str]:
    return {p.parent.name for p in (store / "runs").glob("*/manifest.json")} if (store / "runs").exists() else set()


def test_sweep_interrupted_then_resumed_runs_each_trial_once(tmp_path):
    store = tmp_path / "store"
    sweep_file = tmp_path / "tiny.yaml"
    sweep_file.write_text(SWEEP.format(smoke=REPO / "jobs" / "smoke.yaml"))

    # 1. Start the sweep and press Ctrl-C once the first trials have finished.
    proc = subprocess.Popen(
        [CLI, "sweep", str(sweep_file), "--json"], cwd=REPO, env=_env(store),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 420
    while len(_finished(store)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(1)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    first = json.loads(out)
    sweep_id = first["sweep_id"]
    assert first["outcome"]["interrupted"] and len(first["trials"]) == 8
    done_before = _finished(store)
    assert 2 <= len(done_before) < 8
    events_before = {r: (store / "runs" / r / "events.jsonl").read_bytes() for r in done_before}

    # 2. Resume: only the missing trials run.
    res = subprocess.run(
        [CLI, "sweep", "resume", sweep_id, "--json"], cwd=REPO, env=_env(store),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    doc = json.loads(res.stdout)
    assert doc["outcome"]["skipped"] == len(done_before)
    assert doc["outcome"]["ran"] == 8 - len(done_before)
    assert doc["complete"] and doc["finished_trials"] == 8
    for r in done_before:  # a finished trial was not touched again
        assert (store / "runs" / r / "events.jsonl").read_bytes() == events_before[r]

    # 3. Every trial is one complete run in the store, tagged with the sweep.
    st = ArtifactStore(store)
    run_ids = [t["run_id"] for t in doc["trials"]]
    assert _finished(store) == set(run_ids)
    finals = {}
    for rid in run_ids:
        assert verify_manifest(st, rid) == [], rid
        events = [json.loads(line) for line in (store / "runs" / rid / "events.jsonl").read_text().splitlines()]
        assert {e.get("sweep_id") for e in events if e["event"] == "submitted"} == {sweep_id}
        assert sum(e["event"] == "finished" for e in events) == 1
        finals[rid] = json.loads((store / "runs" / rid / "summary.json").read_text())["final"]["top1_err"]
    listed = subprocess.run(
        [CLI, "runs", "list", "--sweep", sweep_id, "--json"], env=_env(store), capture_output=True, text=True
    )
    assert {r["run_id"] for r in json.loads(listed.stdout)} == set(run_ids)

    # 4. The report: 4 rows, mean ± sample std of each row's two runs.
    rep = subprocess.run(
        [CLI, "sweep", "report", sweep_id, "--format", "json"], env=_env(store), capture_output=True, text=True
    )
    assert rep.returncode == 0, rep.stderr
    table = json.loads(rep.stdout)
    assert [r["row"] for r in table["rows"]] == [
        "model.arch=cifar_resnet20 / sgd", "model.arch=cifar_resnet20 / adagrad",
        "model.arch=cifar_plain20 / sgd", "model.arch=cifar_plain20 / adagrad",
    ]  # fmt: skip
    for i, row in enumerate(table["rows"]):
        errs = [finals[t["run_id"]] for t in doc["trials"] if t["row"] == i]
        assert len(errs) == 2 and row["n"] == 2
        assert row["mean"] == pytest.approx(statistics.fmean(errs))
        assert row["std"] == pytest.approx(statistics.stdev(errs))
        assert row["best"] == min(errs)
    assert table["rows"][0]["diff"] == pytest.approx(table["rows"][0]["mean"] - 8.29)
    assert Path(table["curves"]).read_bytes()[:4] == b"\x89PNG"
