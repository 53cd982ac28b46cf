"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`, token
auth on), driven through the Jobs API exactly as a user drives a remote cluster:
STRICT_SPREAD placement, stop + resume, and a hard-killed worker that the run survives.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raynodes import RayNode, base_env, start_head, wait_for_nodes

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "resnet-cluster")
SMALL = ["--set", "data.synthetic_train=640", "--set", "train.log_every_iterations=5"]  # 10 its/epoch

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    head = start_head(tmp, num_cpus=2, resources={"worker_node": 1, "node_a": 1})
    second = RayNode(head_gcs=head.gcs, num_cpus=2, resources={"worker_node": 1, "node_b": 1}, log=tmp / "b.log")
    try:
        nodes = wait_for_nodes(head, 2)
        yield {"head": head, "nodes": nodes, "store": tmp / "store"}
    finally:
        second.kill()
        head.kill()


def cli(c, *args, timeout=600, env_extra=None) -> subprocess.CompletedProcess:
    env = base_env()
    env["RESNET_CLUSTER_STORE"] = str(c["store"])
    env.update(env_extra or {})
    return subprocess.run([CLI, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_dir(c, run_id: str) -> Path:
    return c["store"] / "runs" / run_id


def events(c, run_id: str) -> list[dict]:
    path = run_dir(c, run_id) / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_for_checkpoint(c, run_id: str, epoch: int, timeout: float = 300) -> None:
    snap = run_dir(c, run_id) / "checkpoints" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if snap.exists() and f"epoch_{epoch:05d}" in snap.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint for epoch {epoch} of {run_id} within {timeout} s")


def job_status(c, run_id: str) -> dict:
    out = cli(c, "status", run_id, "--address", c["head"].dashboard, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_job_end(c, run_id: str, timeout: float = 400) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        doc = job_status(c, run_id)
        if doc["job"]["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return doc
        time.sleep(3)
    raise AssertionError(f"job of {run_id} did not end within {timeout} s")


def iterations(c, run_id: str) -> list[int]:
    text = (run_dir(c, run_id) / "training_loss.csv").read_text()
    return [int(r["iteration"]) for r in csv.DictReader(io.StringIO(text))]


def test_remote_submit_strict_spread_lands_one_worker_per_node(cluster):
    c = cluster
    out = cli(c, "submit", "jobs/smoke.yaml", "--address", c["head"].dashboard, "--follow", "--json",
              "--name", "spread", "--set", "scaling.placement=STRICT_SPREAD", "--set", "train.iterations=30",
              *SMALL)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    doc = json.loads(out.stdout)
    assert doc["status"] == "SUCCEEDED" and doc["run_id"] == "spread"
    assert doc["job_id"] and "--local" in doc["entrypoint"]
    env = json.loads((run_dir(c, "spread") / "environment.json").read_text())
    node_ids = {w["node_id"] for w in env["workers"]}
    assert node_ids == {n["id"] for n in c["nodes"]}  # one worker on each of the two nodes
    assert (run_dir(c, "spread") / "manifest.json").exists()
    st = job_status(c, "spread")
    assert st["run"]["status"] == "finished" and st["job"]["status"] == "SUCCEEDED"


def test_stop_records_stopped_and_resubmit_resumes(cluster):
    c = cluster
    args = ["submit", "jobs/smoke.yaml", "--address", c["head"].dashboard, "--json", "--name", "stopme",
            "--set", "train.iterations=200", *SMALL]  # fmt: skip
    out = cli(c, *args)
    assert out.returncode == 0, out.stderr[-4000:]
    # The submitting process has exited; the job keeps running on the cluster.
    wait_for_checkpoint(c, "stopme", 2)
    stopped = cli(c, "stop", "stopme", "--address", c["head"].dashboard, "--json", timeout=300)
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    doc = json.loads(stopped.stdout)
    assert doc["job"]["status"] == "STOPPED", doc
    assert doc["run"]["status"] == "stopped", doc
    assert events(c, "stopme")[-1]["event"] == "stopped"
    assert not (run_dir(c, "stopme") / "manifest.json").exists()

    again = cli(c, *args, "--follow")
    assert again.returncode == 0, again.stderr[-4000:]
    kinds = [e["event"] for e in events(c, "stopme")]
    assert kinds.count("resumed") == 1 and kinds[-1] == "finished"
    resumed = next(e for e in events(c, "stopme") if e["event"] == "resumed")
    assert resumed["epoch"] >= 2
    assert iterations(c, "stopme") == list(range(5, 201, 5))


def test_killed_worker_restarts_from_checkpoint(cluster):
    c = cluster
    out = cli(c, "submit", "jobs/smoke.yaml", "--address", c["head"].dashboard, "--json", "--name", "crash",
              "--set", "train.iterations=150", "--set", "failure.max_failures=3", *SMALL)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    wait_for_checkpoint(c, "crash", 2)
    time.sleep(6)  # let the checkpoint's report finish (RAY-NOTES: a kill within ~1 s can lose it)
    env = json.loads((run_dir(c, "crash") / "environment.json").read_text())
    victim = next(w for w in env["workers"] if w["rank"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)  # hard kill from outside, no cleanup
    doc = wait_job_end(c, "crash")
    assert doc["job"]["status"] == "SUCCEEDED", doc
    kinds = [e["event"] for e in events(c, "crash")]
    # max_failures 3, not 1: on this 2-core machine Ray Train 2.60 has been seen to count a
    # second failure right after the restart ("Destroying worker since its placement group was
    # removed"), which a real cluster does not need the headroom for.
    assert 1 <= kinds.count("restarted") <= 3 and kinds[-1] == "finished"
    restarted = next(e for e in events(c, "crash") if e["event"] == "restarted")
    assert restarted["epoch"] >= 2  # resumed from a checkpoint, not from scratch
    assert iterations(c, "crash") == list(range(5, 151, 5))  # no duplicated or missing rows
    assert (run_dir(c, "crash") / "manifest.json").exists()


def test_unreachable_cluster_and_bad_token_are_user_errors(cluster, tmp_path):
    c = cluster
    out = cli(c, "submit", "jobs/smoke.yaml", "--address", "http://127.0.0.1:9", timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "http://127.0.0.1:9" in out.stderr and "could not be reached" in out.stderr
    bad = cli(c, "submit", "jobs/smoke.yaml", "--address", c["head"].dashboard, timeout=120,
              env_extra={"RAY_AUTH_TOKEN": "0" * 64})  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "token" in bad.stderr
