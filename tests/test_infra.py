"""Every file in infra/ parses and holds what a cluster needs (no cloud is contacted)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

from resnet_cluster.metrics import EPOCH_GAUGES, GAUGES

INFRA = Path(__file__).resolve().parents[1] / "infra"


def test_aws_launcher_config_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    nodes = cfg["available_node_types"]
    head = nodes[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # no training on the head
    gpu = [n for name, n in nodes.items() if name != cfg["head_node_type"]]
    assert gpu and all(n["min_workers"] == 0 for n in gpu)  # autoscale from 0
    assert all(n["node_config"]["InstanceType"].startswith(("p4d.", "p5.")) for n in gpu)
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "get-auth-token --generate" in start
    assert any("pip install -e ~/resnet-cluster" in c for c in cfg["setup_commands"])


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_raycluster_has_a_gpu8_worker_group():
    doc = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # never a public LoadBalancer
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= group["replicas"]
    (c,) = _containers(group["template"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert c["image"] == _containers(spec["headGroupSpec"]["template"])[0]["image"]


def test_kuberay_rayjob_runs_a_job_file():
    doc = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("resnet-cluster submit jobs/")
    job = spec["entrypoint"].split()[2]
    assert (INFRA.parent / job).is_file() or job == "jobs/imagenet_r101.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert _containers(group["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_dockerfile_installs_the_project_on_the_pinned_ray():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in text.splitlines()
    assert "pip install --no-cache-dir -e ." in text and "RAY_AUTH_MODE=token" in text


def test_grafana_dashboard_queries_exactly_the_exported_metrics():
    """Our panels read exactly our gauges; the other panels read Ray's own series, which
    tests/test_prometheus.py checks against a real Prometheus."""
    dash = json.loads((INFRA / "grafana" / "resnet-cluster-dashboard.json").read_text())
    queried = {t["expr"].split("{")[0] for p in dash["panels"] for t in p["targets"]}
    ours = {q for q in queried if q.startswith("ray_resnet_cluster_")}
    assert ours == {f"ray_{name}" for name in {**GAUGES, **EPOCH_GAUGES}}
    assert len(queried - ours) >= 10  # Ray's node, object store and Train series next to ours


def test_every_metric_gauge_reads_a_key_the_loop_really_produces():
    """Run the loop for a few steps and check each gauge's source key is in its records."""
    import torch

    from resnet_cluster import config
    from resnet_cluster.engine import Callback, fit

    logs, epochs = [], []

    class Collect(Callback):
        def on_log(self, record):
            logs.append(record)

        def on_epoch_end(self, record, state):
            epochs.append({**record, "epoch_done": record["epoch"] + 1})

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = config.load(INFRA.parent / "jobs" / "smoke.yaml", [
            "scaling.workers=1", "train.batch_size=16", "train.iterations=4", "train.log_every_iterations=2",
            "data.synthetic_train=64", "data.synthetic_test=32"])  # fmt: skip
        fit(cfg, callbacks=[Collect()])
    finally:
        torch.set_num_threads(threads)
    for name, (_, key) in GAUGES.items():
        assert all(isinstance(r.get(key), float) for r in logs), (name, key)
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 for r in logs)
    for name, (_, key) in EPOCH_GAUGES.items():
        assert key in epochs[-1], (name, key)
