"""Launch logic without a cluster: scaling plans, resource checks, the remote entrypoint."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from resnet_cluster import config
from resnet_cluster.artifacts import checkpoints
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.errors import ClusterError, ConfigError
from resnet_cluster.launch import failures, remote
from resnet_cluster.launch.submit import _check_resources
from resnet_cluster.launch.trainer import START_TIMEOUT_ENV, failure_config, scaling_plan, start_timeout_env
from resnet_cluster.models import jobs

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"


def test_scaling_plan_splits_the_global_batch_and_maps_placement():
    cfg = jobs.load(SMOKE, ["scaling.workers=4", "train.batch_size=256", "scaling.placement=SPREAD"])
    plan = scaling_plan(cfg)
    assert plan["per_worker_batch"] == 64 and plan["backend"] == "gloo"
    assert plan["placement_strategy"] == "SPREAD"
    assert plan["resources_per_worker"] == {"CPU": 1.0}
    gpu = scaling_plan(jobs.load(SMOKE, ["scaling.use_gpu=true", "scaling.gpus_per_worker=1"]))
    assert gpu["backend"] == "nccl" and gpu["resources_per_worker"]["GPU"] == 1


@pytest.mark.parametrize("per_node,share", [(8, 0.125), (4, 0.25), (3, 0.3333), (1, 1.0)])
def test_workers_per_node_takes_a_share_of_the_node_resource(per_node, share):
    cfg = jobs.load(SMOKE, [f"scaling.workers={per_node * 2}", f"train.batch_size={per_node * 2 * 8}",
                              f"scaling.workers_per_node={per_node}"])  # fmt: skip
    res = scaling_plan(cfg)["resources_per_worker"]
    assert res["worker_node"] == share
    assert per_node * res["worker_node"] <= 1.0 < (per_node + 1) * res["worker_node"]  # exactly N fit


def test_workers_per_node_must_divide_workers_and_exclude_strict_spread():
    with pytest.raises(ConfigError, match="workers_per_node"):
        jobs.load(SMOKE, ["scaling.workers_per_node=3"])
    with pytest.raises(ConfigError, match="STRICT_SPREAD"):
        jobs.load(SMOKE, ["scaling.workers_per_node=2", "scaling.placement=STRICT_SPREAD"])


def test_local_cluster_too_small_is_a_clear_error():
    cfg = jobs.load(SMOKE, ["scaling.workers_per_node=2"])
    info = {"local": True, "address": "local", "resources": {"CPU": 2.0}}
    with pytest.raises(ClusterError, match="worker_node"):
        _check_resources(cfg, info)
    with pytest.raises(ClusterError, match="use_gpu: false"):
        _check_resources(jobs.load(SMOKE, ["scaling.use_gpu=true"]), info)
    _check_resources(cfg, {**info, "local": False})  # a remote cluster may autoscale: no check


def test_remote_entrypoint_quotes_overrides():
    ep = remote.entrypoint("jobs/smoke.yaml", run_id="r1", overrides=["schedule.milestones=[1, 2]"], workers=4)
    args = shlex.split(ep)
    assert args[:6] == ["python", "-m", "resnet_cluster", "submit", "jobs/smoke.yaml", "--local"]
    assert args[args.index("--set") + 1] == "schedule.milestones=[1, 2]"
    assert args[args.index("--name") + 1] == "r1" and args[args.index("--workers") + 1] == "4"


def test_jobs_address_detection_and_job_file_outside_project(tmp_path):
    assert remote.is_jobs_address("http://127.0.0.1:8265") and not remote.is_jobs_address("127.0.0.1:6379")
    outside = tmp_path / "job.yaml"
    outside.write_text(SMOKE.read_text())
    with pytest.raises(ConfigError, match="outside the project"):
        remote.submit_remote("http://127.0.0.1:9", str(outside), run_id="x", overrides=[], cwd=SMOKE.parent)


def test_worker_group_starts_wait_start_timeout_s_once_then_fail(monkeypatch):
    from ray.train.v2._internal import constants

    # The variable Ray Train's controller reads, and one it takes over from the driver.
    assert START_TIMEOUT_ENV == constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
    assert START_TIMEOUT_ENV in constants.ENV_VARS_TO_PROPAGATE
    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    cfg = jobs.load(SMOKE, ["failure.max_failures=2", "failure.start_timeout_s=45"])
    fc = failure_config(cfg)
    assert fc.max_failures == 2 and fc.controller_failure_limit == 0  # a timed-out start is not retried
    with start_timeout_env(cfg):
        assert os.environ[START_TIMEOUT_ENV] == "45"
        assert constants.get_env_vars_to_propagate()[START_TIMEOUT_ENV] == "45"
    assert START_TIMEOUT_ENV not in os.environ  # restored
    forever = jobs.load(SMOKE, ["failure.start_timeout_s=-1"])
    assert failure_config(forever).controller_failure_limit == -1  # Ray's default: retry forever
    with start_timeout_env(forever):
        assert START_TIMEOUT_ENV not in os.environ
    with pytest.raises(ConfigError, match="start_timeout_s"):
        jobs.load(SMOKE, ["failure.start_timeout_s=0"])


def _failed_run(tmp_path, *, checkpoint: bool) -> ArtifactStore:
    """A run folder as a failed 2-worker run leaves it: workers on nodes aaaa… and bbbb…."""
    store = ArtifactStore(str(tmp_path))
    store.write_json("r1", "environment.json", {"workers": [{"rank": 0, "node_id": "a" * 56},
                                                            {"rank": 1, "node_id": "b" * 56}]})  # fmt: skip
    if checkpoint:  # Ray Train's checkpoint index, as 2.60 writes it
        latest = {"checkpoint_dir_name": "epoch_00004", "metrics": {"epoch": 3, "iteration": 40}}
        store.write_json("r1", checkpoints.INDEX, {"latest_checkpoint_result": latest})
    return store


def test_a_lost_node_is_named_with_the_checkpoint_to_resume_from(tmp_path):
    from ray.train.v2.api.exceptions import WorkerGroupError

    store = _failed_run(tmp_path, checkpoint=True)
    err = WorkerGroupError("Training failed due to worker errors", {1: RuntimeError("gloo: connection reset")})
    before = {"a" * 56: "10.0.0.1", "b" * 56: "10.0.0.2", "c" * 56: "10.0.0.3"}
    now = {"a" * 56: "10.0.0.1"}  # b hosted a worker and is gone; c hosted none and is gone too
    cfg = jobs.load(SMOKE)
    cause, msg = failures.explain(err, cfg, store, "r1", nodes_before=before, nodes_now=now)
    assert cause == "node_lost"
    assert "Ray node bbbbbbbb (10.0.0.2)" in msg and "cccccccc" not in msg
    assert "failure.max_failures (0) allowed no restart" in msg
    assert "epoch_00004: 4 epochs, iteration 40" in msg and store.run_uri("r1") in msg
    assert "--name r1 to resume" in msg and "\n" not in msg
    # the same failure with every node still there is not a node loss: Ray's own text stays
    assert failures.explain(err, cfg, store, "r1", nodes_before=before, nodes_now=before) is None
    assert failures.explain(err, cfg, store, "r1", nodes_before=before, nodes_now=None) is None


def test_a_start_without_resources_is_explained_even_before_any_checkpoint(tmp_path):
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    store = _failed_run(tmp_path, checkpoint=False)
    err = ControllerError(WorkerGroupStartupTimeoutError(num_workers=4))
    cfg = jobs.load(SMOKE, ["scaling.workers=4", "scaling.placement=STRICT_SPREAD", "failure.start_timeout_s=300"])
    nodes = {"a" * 56: "10.0.0.1"}
    cause, msg = failures.explain(err, cfg, store, "r1", nodes_before=nodes, nodes_now=nodes)
    assert cause == "no_resources"
    assert msg.startswith("The cluster could not place the 4 workers (CPU 1 each, placement STRICT_SPREAD)")
    assert "start_timeout_s (300 s)." in msg and "left the cluster" not in msg
    assert "No checkpoint had been reported yet" in msg and "--name r1" in msg


def test_resume_accepts_a_run_recorded_before_a_key_existed_and_refuses_another_job(tmp_path):
    import yaml

    from resnet_cluster.artifacts import layout
    from resnet_cluster.errors import StoreError
    from resnet_cluster.launch.submit import prepare_run

    store = ArtifactStore(tmp_path / "store")
    cfg = jobs.load(SMOKE, [f"artifacts.store={tmp_path / 'store'}"])
    assert prepare_run(cfg, store, "r1", provenance=("c\n", "")) is False
    # The run was recorded by a version without failure.start_timeout_s: the default applies.
    old = yaml.safe_load(store.read_text("r1", layout.CONFIG))
    del old["failure"]["start_timeout_s"]
    store.write_text("r1", layout.CONFIG, yaml.safe_dump(old))
    assert prepare_run(cfg, store, "r1") is True
    other = jobs.load(SMOKE, [f"artifacts.store={tmp_path / 'store'}", "optim.lr=0.05"])
    with pytest.raises(StoreError, match="differs in: optim.lr"):
        prepare_run(other, store, "r1")
