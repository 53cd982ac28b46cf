"""One real elastic run on a real two-node Ray cluster on this machine (`ray start` head and
second node, token auth on), submitted through the Jobs API as a user would:

a {min: 1, max: 2} job (one worker per node) loses its second node after a mid-epoch
checkpoint and goes on with one worker accumulating 2 micro-batches per step; a new second
node joins and, within the resize check interval, the run is back at 2 workers. It finishes,
its records read as one run (each iteration logged once, the resizes as events), and its final
weights match an uninterrupted run of the same recipe computed in-process without Ray.

Two more runs on the same cluster end the same way: one whose asynchronous checkpoint upload
fails (the run restarts from the checkpoint before it), and one whose second node gets a
preemption notice (the workers checkpoint mid-epoch before the deadline and the run resumes
there on one node).
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raynodes import base_env, wait_for_nodes
from test_cluster_ray import add_second_node, cli, cluster, events, run_dir, two_nodes  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
RUN = "elastic-1-2"
JOB = [
    "--set", "scaling.workers={min: 1, max: 2}", "--set", "scaling.workers_per_node=1",
    "--set", "scaling.resize_check_s=5", "--set", "failure.start_timeout_s=20",
    "--set", "failure.max_failures=4",
    "--set", "data.synthetic_train=640", "--set", "data.synthetic_test=128",
    "--set", "train.iterations=240", "--set", "train.log_every_iterations=4",
    "--set", "checkpoint.every_iterations=4", "--set", "checkpoint.keep=3",
    "--set", "schedule.milestones=[160]",
]  # fmt: skip  -- 10 iterations per epoch of 64 images (2 x 32); long enough to grow back

pytestmark = pytest.mark.ray


def _wait(what: str, cond, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _checkpoints(c, run: str = RUN) -> list[str]:
    """The checkpoints Ray Train registered (its index), by folder name."""
    snap = run_dir(c, run) / "checkpoints" / "checkpoint_manager_snapshot.json"
    try:
        text = snap.read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"(iter_\d{9}|epoch_\d{5})", text)))


def _resizes(c, run: str = RUN) -> list[tuple[int, int]]:
    return [(e["from_world_size"], e["to_world_size"]) for e in events(c, run) if e["event"] == "resized"]


def _rows(c, run: str = RUN) -> list[dict]:
    path = run_dir(c, run) / "training_loss.csv"
    return list(csv.DictReader(io.StringIO(path.read_text()))) if path.exists() else []


def test_elastic_run_shrinks_grows_and_matches_the_uninterrupted_recipe(two_nodes):
    c = two_nodes  # head and second node, 2 CPUs and worker_node: 1 each
    wait_for_nodes(c["head"], 2)
    sub = cli(c, "submit", "jobs/smoke.yaml", "--address", c["head"].dashboard, "--name", RUN, "--json", *JOB)
    assert sub.returncode == 0, sub.stderr[-3000:]

    _wait("a mid-epoch checkpoint at 2 workers", lambda: any(n.startswith("iter_") for n in _checkpoints(c)), 400)
    time.sleep(6)  # let the checkpoint's report finish (docs/ray-notes.md: a kill within ~1 s can lose it)
    c["second"].kill()  # the whole second node
    _wait("the resize to 1 worker", lambda: (2, 1) in _resizes(c), 400)
    add_second_node(c)  # capacity comes back (a node takes about a minute to start here)
    _wait("the resize back to 2 workers", lambda: (1, 2) in _resizes(c), 300)
    _wait("the run to finish", lambda: (run_dir(c, RUN) / "manifest.json").exists(), 400)

    evs = events(c, RUN)
    # training went on at one worker, 2 micro-batches per step: the group that grew back
    # resumed from a checkpoint that the 1-worker group took, further on
    one = next(e for e in evs if e["event"] in ("restarted", "resumed") and e["world_size"] == 1)
    assert one["micro_batches_per_step"] == 2 and one["training_workers"] == 1
    grown = next(e for e in evs if e["event"] == "resized" and e["to_world_size"] == 2)
    assert grown["iteration"] > one["iteration"] and grown["micro_batches_per_step"] == 1
    assert [e["event"] for e in evs if e["event"] in ("finished", "failed")] == ["finished"]
    sizes = [e["world_size"] for e in evs if e["event"] in ("started", "resumed", "restarted")]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2
    shown = cli(c, "runs", "show", RUN, "--json")
    assert shown.returncode == 0 and [(r["from_world_size"], r["to_world_size"])
                                      for r in json.loads(shown.stdout)["resizes"]][:2] == [(2, 1), (1, 2)]

    assert_same_updates_as_uninterrupted(c, RUN)


def assert_same_updates_as_uninterrupted(c, run: str) -> None:
    """The run's final weights and training-loss rows against the same recipe run here, in
    this process without Ray and never interrupted (world size 1 accumulating 2 micro-batches:
    the same updates as 2 DDP workers, tests/test_elastic.py)."""
    from resnet_cluster.engine import Callback, fit
    from resnet_cluster.models.jobs import from_dict

    import yaml

    cfg = from_dict(yaml.safe_load((run_dir(c, run) / "config.yaml").read_text()))

    class Keep(Callback):
        def __init__(self):
            self.logs = []

        def on_log(self, record):
            self.logs.append(record)

        def on_finish(self, summary, model):
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    keep = Keep()
    torch.set_num_threads(1)
    fit(cfg, callbacks=[keep])
    got = torch.load(run_dir(c, run) / "model.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert got.keys() == keep.weights.keys()
    # Halving a gradient is exact in floating point, so 2 DDP workers ((g0 + g1) / 2) and one
    # worker accumulating (g0 / 2 + g1 / 2) agree to the bit here; the bound leaves room for
    # reduction order on other hardware.
    worst = max((got[k].double() - keep.weights[k].double()).abs().max().item() for k in got)
    assert worst < 1e-5, worst
    # the CSV reads as one run: the uninterrupted run's log points, each once, in order, with
    # its losses (rows past the checkpoint a restart resumed from were dropped and redone)
    rows = _rows(c, run)
    assert [int(r["iteration"]) for r in rows] == [r["iteration"] for r in keep.logs]
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in keep.logs], abs=1e-5)


# ---------------------------------------------------------------------------- a failed upload
UPLOAD_RUN = "upload-fails"
UPLOAD_JOB = [
    "--set", "scaling.workers=2", "--set", "failure.max_failures=2",
    "--set", "data.synthetic_train=704", "--set", "data.synthetic_test=128",
    "--set", "train.iterations=40", "--set", "train.log_every_iterations=4",
    "--set", "checkpoint.every_iterations=8", "--set", "checkpoint.every_epochs=100",
    "--set", "checkpoint.keep=5", "--set", "checkpoint.upload=async",
]  # fmt: skip  -- 11 iterations per epoch: the checkpoints at 8, 16, 24, 32 are all mid-epoch


def test_a_failed_async_upload_leaves_the_previous_checkpoint_and_the_run_resumes_exactly(cluster):
    """The store refuses one checkpoint's file (iteration 24's train_state.pt is taken by a
    folder, as a torn or refused upload leaves it): the upload fails in rank 0's upload thread,
    Ray Train fails the worker group, and the run restarts from the checkpoint before it
    (iteration 16, mid-epoch), which opens on its own; the run's events say why it restarted,
    and it ends with the updates of a run that never failed."""
    c = cluster
    wait_for_nodes(c["head"], 2)
    blocker = run_dir(c, UPLOAD_RUN) / "checkpoints" / "iter_000000024" / "train_state.pt"
    blocker.mkdir(parents=True)
    sub = cli(c, "submit", "jobs/smoke.yaml", "--address", c["head"].dashboard, "--name", UPLOAD_RUN, "--json",
              *UPLOAD_JOB)  # fmt: skip
    assert sub.returncode == 0, sub.stderr[-3000:]

    def failed():
        return [e for e in events(c, UPLOAD_RUN) if e["event"] == "worker_failed"]

    _wait("the worker group to fail on the upload", failed, 400)
    # the failed upload is not registered: what a restart resumes from is the one before it
    registered = _checkpoints(c, UPLOAD_RUN)
    assert "iter_000000016" in registered and "iter_000000024" not in registered, registered
    from resnet_cluster.artifacts import checkpoints
    from resnet_cluster.artifacts.store import ArtifactStore

    assert checkpoints.latest(ArtifactStore(str(c["store"])), UPLOAD_RUN)["dir"] == "iter_000000016"
    blocker.rmdir()  # the store takes writes again (a passing outage)
    # and it opens on its own, on the CPU, with a plain torch.load
    state = torch.load(run_dir(c, UPLOAD_RUN) / "checkpoints" / "iter_000000016" / "train_state.pt",
                       weights_only=False)  # fmt: skip
    assert (state["iteration"], state["epoch"], state["epoch_step"]) == (16, 1, 5)

    err = failed()[0]
    assert err["ranks"] == [0] and "directory" in err["errors"]["0"].lower(), err
    _wait("the run to finish", lambda: (run_dir(c, UPLOAD_RUN) / "manifest.json").exists(), 400)
    evs = events(c, UPLOAD_RUN)
    starts = [(e["event"], e["iteration"]) for e in evs if e["event"] in ("started", "resumed", "restarted")]
    assert starts == [("started", 0), ("restarted", 16)], starts
    assert [e["event"] for e in evs if e["event"] in ("finished", "failed")] == ["finished"]
    assert "iter_000000024" in _checkpoints(c, UPLOAD_RUN) or "iter_000000032" in _checkpoints(c, UPLOAD_RUN)
    assert_same_updates_as_uninterrupted(c, UPLOAD_RUN)


# ---------------------------------------------------------------------------- a preemption notice
PRE_RUN = "preempted"
PRE_JOB = [
    "--set", "scaling.workers={min: 1, max: 2}", "--set", "scaling.workers_per_node=1",
    "--set", "scaling.resize_check_s=5", "--set", "failure.start_timeout_s=20",
    "--set", "failure.max_failures=4",
    "--set", "data.synthetic_train=704", "--set", "data.synthetic_test=128",
    "--set", "train.iterations=160", "--set", "train.log_every_iterations=2",
    "--set", "checkpoint.every_epochs=100", "--set", "checkpoint.keep=3",
]  # fmt: skip  -- no checkpoint but the one the notice asks for; 11 iterations per epoch, and
#                  the notice is looked for every 5 log windows (10 iterations): mid-epoch
DEADLINE_S = 20


def test_a_preemption_notice_takes_a_checkpoint_the_run_resumes_from_mid_epoch(cluster):
    """Ray is told that the second node will be preempted in 20 s (`ray drain-node --reason
    DRAIN_NODE_REASON_PREEMPTION`, what the autoscaler does on a spot notice). The workers take
    a checkpoint at their next look (mid-epoch); then the node goes; the run resumes
    on the head alone, 1 worker x 2 micro-batches, from exactly that position, and ends with
    the updates of a run never preempted (so each image was used once per epoch: a repeated or
    skipped batch would change the weights)."""
    c = cluster
    wait_for_nodes(c["head"], 2)
    sub = cli(c, "submit", "jobs/smoke.yaml", "--address", c["head"].dashboard, "--name", PRE_RUN, "--json", *PRE_JOB)
    assert sub.returncode == 0, sub.stderr[-3000:]
    _wait("training at 2 workers", lambda: any(int(r["iteration"]) >= 4 for r in _rows(c, PRE_RUN)), 400)
    assert [e["world_size"] for e in events(c, PRE_RUN) if e["event"] == "started"] == [2]

    drained_at = time.time()
    drain = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "drain-node", "--address", c["head"].gcs,
         "--node-id", c["second_id"], "--reason", "DRAIN_NODE_REASON_PREEMPTION",
         "--reason-message", "spot instance reclaimed (test)", "--deadline-remaining-seconds", str(DEADLINE_S)],
        env=base_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert drain.returncode == 0, drain.stderr[-2000:]

    def notices():
        return [e for e in events(c, PRE_RUN) if e["event"] == "preemption_notice"]

    _wait("the preemption notice's checkpoint", notices, DEADLINE_S)
    notice = notices()[0]
    workers = json.loads((run_dir(c, PRE_RUN) / "environment.json").read_text())["workers"]
    on_second = [w["rank"] for w in workers if w["node_id"] == c["second_id"]]  # rank 0 or 1: Ray places them
    assert notice["nodes"] == [c["second_id"]] and notice["ranks"] == on_second and len(on_second) == 1, notice
    assert notice["deadline"] is not None and notice["epoch_step"] % 11 != 0
    at = notice["iteration"]
    assert at % 10 == 0 and notice["epoch"] == at // 11 and notice["epoch_step"] == at % 11
    _wait("the checkpoint to be registered", lambda: f"iter_{at:09d}" in _checkpoints(c, PRE_RUN), 60)

    # The node goes now: a cloud takes it at the deadline at the latest. (Waiting for the deadline
    # here would race the run's own end: this run trains 160 iterations in about 16 s.) The
    # surviving worker waits in an all-reduce until Ray restarts the group at the deadline.
    assert time.time() < drained_at + DEADLINE_S
    c["second"].kill()

    def resumed_on_one():
        return [e for e in events(c, PRE_RUN) if e["event"] in ("restarted", "resumed") and e["world_size"] == 1]

    _wait("the run to go on at 1 worker", resumed_on_one, 400)
    again = resumed_on_one()[0]
    assert again["iteration"] == at and again["micro_batches_per_step"] == 2, again  # the notice's position
    _wait("the run to finish", lambda: (run_dir(c, PRE_RUN) / "manifest.json").exists(), 400)
    assert [e["event"] for e in events(c, PRE_RUN) if e["event"] in ("finished", "failed")] == ["finished"]
    assert (2, 1) in _resizes(c, PRE_RUN)
    shown = cli(c, "runs", "show", PRE_RUN, "--json")
    assert shown.returncode == 0 and [p["iteration"] for p in json.loads(shown.stdout)["preemptions"]] == [at]
    assert_same_updates_as_uninterrupted(c, PRE_RUN)
