"""Launch logic without a cluster: scaling plans, resource checks, the remote entrypoint."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from resnet_cluster import config
from resnet_cluster.errors import ClusterError, ConfigError
from resnet_cluster.launch import remote
from resnet_cluster.launch.submit import _check_resources
from resnet_cluster.launch.trainer import scaling_plan

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"


def test_scaling_plan_splits_the_global_batch_and_maps_placement():
    cfg = config.load(SMOKE, ["scaling.workers=4", "train.batch_size=256", "scaling.placement=SPREAD"])
    plan = scaling_plan(cfg)
    assert plan["per_worker_batch"] == 64 and plan["backend"] == "gloo"
    assert plan["placement_strategy"] == "SPREAD"
    assert plan["resources_per_worker"] == {"CPU": 1.0}
    gpu = scaling_plan(config.load(SMOKE, ["scaling.use_gpu=true", "scaling.gpus_per_worker=1"]))
    assert gpu["backend"] == "nccl" and gpu["resources_per_worker"]["GPU"] == 1


@pytest.mark.parametrize("per_node,share", [(8, 0.125), (4, 0.25), (3, 0.3333), (1, 1.0)])
def test_workers_per_node_takes_a_share_of_the_node_resource(per_node, share):
    cfg = config.load(SMOKE, [f"scaling.workers={per_node * 2}", f"train.batch_size={per_node * 2 * 8}",
                              f"scaling.workers_per_node={per_node}"])  # fmt: skip
    res = scaling_plan(cfg)["resources_per_worker"]
    assert res["worker_node"] == share
    assert per_node * res["worker_node"] <= 1.0 < (per_node + 1) * res["worker_node"]  # exactly N fit


def test_workers_per_node_must_divide_workers_and_exclude_strict_spread():
    with pytest.raises(ConfigError, match="workers_per_node"):
        config.load(SMOKE, ["scaling.workers_per_node=3"])
    with pytest.raises(ConfigError, match="STRICT_SPREAD"):
        config.load(SMOKE, ["scaling.workers_per_node=2", "scaling.placement=STRICT_SPREAD"])


def test_local_cluster_too_small_is_a_clear_error():
    cfg = config.load(SMOKE, ["scaling.workers_per_node=2"])
    info = {"local": True, "address": "local", "resources": {"CPU": 2.0}}
    with pytest.raises(ClusterError, match="worker_node"):
        _check_resources(cfg, info)
    with pytest.raises(ClusterError, match="use_gpu: false"):
        _check_resources(config.load(SMOKE, ["scaling.use_gpu=true"]), info)
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
