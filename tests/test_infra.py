"""Every file in infra/ parses and holds what a cluster needs (no cloud is contacted)."""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from resnet_cluster.callbacks import EPOCH_GAUGES, GAUGES

INFRA = Path(__file__).resolve().parents[1] / "infra"


def _aws() -> dict:
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


def test_aws_launcher_config_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = _aws()
    jsonschema.validate(cfg, schema)
    nodes = cfg["available_node_types"]
    head = nodes[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # no training on the head
    gpu = [n for name, n in nodes.items() if name != cfg["head_node_type"]]
    assert gpu and all(n["min_workers"] == 0 for n in gpu)  # autoscale from 0
    assert all(n["node_config"]["InstanceType"].startswith(("p4d.", "p5.")) for n in gpu)
    assert sum(n["max_workers"] > 0 for n in gpu) == 1  # one instance type per job, not a mix
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "get-auth-token --generate" in start


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """The argument lists of every `pip install` in shell command lines."""
    out = []
    for line in commands:
        for part in re.split(r"&&|;", line):
            words = shlex.split(part)
            if "pip" in words and "install" in words:
                out.append(words[words.index("install") + 1 :])
    return out


def _constraint(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a in ("-c", "--constraint"):
            return args[i + 1]
        if a.startswith("--constraint="):
            return a.split("=", 1)[1]
    return None


def _pinned_ray() -> str:
    (pin,) = [x for x in (INFRA.parent / "constraints.txt").read_text().splitlines() if x.startswith("ray==")]
    return pin.split("==")[1]


def test_cluster_nodes_install_the_ray_the_client_pins():
    """The launcher's nodes and the image install the project with constraints.txt, whose Ray is
    the image's base and the KubeRay manifests' rayVersion."""
    cfg = _aws()
    (project,) = [a for a in _pip_installs(cfg["setup_commands"]) if "-e" in a]
    assert project[project.index("-e") + 1] == "~/resnet-cluster" and cfg["file_mounts"]["~/resnet-cluster"] == "."
    assert _constraint(project) == "~/resnet-cluster/constraints.txt"

    docker = (INFRA / "docker" / "Dockerfile").read_text()
    runs = [line[len("RUN "):] for line in docker.replace("\\\n", " ").splitlines() if line.startswith("RUN ")]
    (image,) = [a for a in _pip_installs(runs) if "-e" in a]
    assert _constraint(image) == "constraints.txt"
    copies = [line.split()[1:-1] for line in docker.splitlines() if line.startswith("COPY ")]
    assert any("constraints.txt" in c for c in copies)  # the file is in the build before pip runs

    version = _pinned_ray()
    assert f"FROM rayproject/ray:{version}-py311-gpu" in docker.splitlines()
    for doc in _kuberay_docs().values():
        assert _cluster_spec(doc)["rayVersion"] == version


# Elastic Fabric Adapter interfaces per instance type (one per network card):
# https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/efa-acc-inst-types.html
EFA_INTERFACES = {"p4d.24xlarge": 4, "p5.48xlarge": 32}
# What AWS documents for NCCL over EFA (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/efa-start-nccl.html)
NCCL_EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"}


def test_aws_gpu_nodes_get_every_efa_interface_and_nccl_settings():
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces

    cfg = _aws()
    gpu = {k: n for k, n in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert {n["node_config"]["InstanceType"] for n in gpu.values()} == set(EFA_INTERFACES)
    for n in gpu.values():
        nc = n["node_config"]
        nics = nc["NetworkInterfaces"]
        assert len(nics) == EFA_INTERFACES[nc["InstanceType"]]
        assert all(x["InterfaceType"] == "efa" for x in nics)
        assert [x["NetworkCardIndex"] for x in nics] == list(range(len(nics)))
        assert [x["DeviceIndex"] for x in nics] == [0] + [1] * (len(nics) - 1)  # primary: card 0, device 0
        _configure_subnets_and_groups_from_network_interfaces(nc)  # the launcher accepts them
    # The head shares the workers' security group, so Ray's ports are open between them.
    head = cfg["available_node_types"][cfg["head_node_type"]]["node_config"]
    groups = {g for n in gpu.values() for x in n["node_config"]["NetworkInterfaces"] for g in x["Groups"]}
    assert set(head["SecurityGroupIds"]) == groups
    # Ray's workers inherit the environment of `ray start` on the GPU nodes.
    (start,) = [c for c in cfg["worker_start_ray_commands"] if "ray start" in c]
    exported = dict(w.split("=", 1) for w in shlex.split(start.split("export", 1)[1].split(";")[0]))
    assert NCCL_EFA_ENV.items() <= exported.items()


def test_aws_workers_reach_s3_through_an_instance_profile_not_keys():
    cfg = _aws()
    for name, n in cfg["available_node_types"].items():
        if name != cfg["head_node_type"]:
            assert set(n["node_config"]["IamInstanceProfile"]) == {"Arn"}
    text = (INFRA / "aws" / "cluster.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _kuberay_docs() -> dict[str, dict]:
    return {name: yaml.safe_load((INFRA / "kuberay" / f"{name}.yaml").read_text()) for name in ("raycluster", "rayjob")}


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def _k8s_strict(schema):
    """Kubernetes' reading of a structural schema: a field the schema does not declare is an
    error (server-side field validation, kubectl's default), unless the object preserves unknown
    fields. JSON Schema allows unknown properties unless told otherwise."""
    if isinstance(schema, list):
        return [_k8s_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _k8s_strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """KubeRay's own v1 schema (infra/kuberay/crds/README.md says which release)."""
    schema = json.loads((INFRA / "kuberay" / "crds" / f"{kind.lower()}-v1.schema.json").read_text())
    return jsonschema.Draft7Validator(_k8s_strict(schema))


def _schema_errors(doc: dict) -> list[str]:
    errors = _crd_validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_kuberay_manifest_validates_against_kuberays_v1_crd_schema(name):
    doc = _kuberay_docs()[name]
    assert doc["apiVersion"] == "ray.io/v1"
    assert _schema_errors(doc) == []


def test_the_crd_check_rejects_what_the_api_server_rejects():
    doc = _kuberay_docs()["raycluster"]
    cases = {
        "spec: Additional properties are not allowed ('authOption' was unexpected)":
            lambda s: s.__setitem__("authOption", s.pop("authOptions")),
        "spec.authOptions.mode: 'Token' is not one of ['disabled', 'token']":
            lambda s: s["authOptions"].__setitem__("mode", "Token"),
        "spec.workerGroupSpecs.0.replicas: '1' is not of type 'integer'":
            lambda s: s["workerGroupSpecs"][0].__setitem__("replicas", "1"),
        "spec.workerGroupSpecs.0.template.spec.containers.0.env.1.value: 1 is not of type 'string'":
            lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"][1].__setitem__("value", 1),
        "spec.headGroupSpec.template.spec: Additional properties are not allowed ('serviceAccount_name' was unexpected)":
            lambda s: s["headGroupSpec"]["template"]["spec"].__setitem__(
                "serviceAccount_name", s["headGroupSpec"]["template"]["spec"].pop("serviceAccountName")),
    }  # fmt: skip
    for expected, damage in cases.items():
        bad = copy.deepcopy(doc)
        damage(bad["spec"])
        assert expected in _schema_errors(bad), (expected, _schema_errors(bad))


def _image_env() -> dict[str, str]:
    """ENV set by infra/docker/Dockerfile (the pods' image)."""
    env = {}
    for line in (INFRA / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("ENV "):
            for word in shlex.split(line[4:]):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def auth_problems(spec: dict, image_env: dict[str, str]) -> list[str]:
    """Why a Ray container of this RayCluster spec would start without token auth, or would not
    start at all: token mode with no token (`ray start` exits "Token authentication is enabled but
    no authentication token was found"). Models what KubeRay >= 1.5.1 adds to each Ray container
    for spec.authOptions (ray-operator/controllers/ray/common/pod.go, SetContainerTokenAuthEnvVars:
    RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the Secret's auth_token key, unless set already)."""
    problems = []
    auth = spec.get("authOptions") or {}
    operator_token = auth.get("mode", "token" if auth else None) == "token" and not auth.get("enableK8sTokenAuth")
    if operator_token:  # KubeRay's validation.go: token mode needs Ray 2.52.0 or newer
        if tuple(map(int, spec["rayVersion"].split(".")[:2])) < (2, 52):
            problems.append(f"authOptions.mode token needs rayVersion >= 2.52.0, not {spec['rayVersion']}")
    for template in _pod_templates(spec):
        for c in _containers(template):
            env = {e["name"]: e for e in c.get("env", [])}
            mode = env["RAY_AUTH_MODE"].get("value") if "RAY_AUTH_MODE" in env else (
                "token" if operator_token else image_env.get("RAY_AUTH_MODE"))  # fmt: skip
            if "RAY_AUTH_TOKEN" in env:
                ref = env["RAY_AUTH_TOKEN"].get("valueFrom", {}).get("secretKeyRef", {})
                has_token = bool(ref.get("name") and ref.get("key"))
                if "value" in env["RAY_AUTH_TOKEN"]:
                    problems.append(f"{c['name']}: a literal RAY_AUTH_TOKEN in the manifest; use a Secret")
            else:
                has_token = operator_token or "RAY_AUTH_TOKEN" in image_env or "RAY_AUTH_TOKEN_PATH" in env
            if mode != "token":
                problems.append(f"{c['name']}: token authentication is off (RAY_AUTH_MODE={mode})")
            elif not has_token:
                problems.append(f"{c['name']}: RAY_AUTH_MODE=token but no authentication token")
    return problems


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_every_ray_container_starts_with_token_auth_and_its_token(name):
    assert auth_problems(_cluster_spec(_kuberay_docs()[name]), _image_env()) == []


def test_token_check_catches_token_mode_without_a_token():
    """The manifests before spec.authOptions: RAY_AUTH_MODE=token in every container, no token."""
    spec = copy.deepcopy(_cluster_spec(_kuberay_docs()["raycluster"]))
    del spec["authOptions"]
    for template in _pod_templates(spec):
        _containers(template)[0].setdefault("env", []).append({"name": "RAY_AUTH_MODE", "value": "token"})
    assert auth_problems(spec, {}) == [
        "ray-head: RAY_AUTH_MODE=token but no authentication token",
        "ray-worker: RAY_AUTH_MODE=token but no authentication token",
    ]
    # ... and an image that sets token mode by itself breaks every pod the same way.
    spec = copy.deepcopy(_cluster_spec(_kuberay_docs()["raycluster"]))
    del spec["authOptions"]
    assert len(auth_problems(spec, {"RAY_AUTH_MODE": "token"})) == 2
    # A Secret-fed RAY_AUTH_TOKEN in every container works without authOptions.
    for template in _pod_templates(spec):
        _containers(template)[0].setdefault("env", []).extend([
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "ray-token", "key": "auth_token"}}}])
    assert auth_problems(spec, {}) == []


def test_kuberay_has_a_gpu8_worker_group_with_efa():
    docs = _kuberay_docs()
    spec = docs["raycluster"]["spec"]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # never a public LoadBalancer
    (group,) = spec["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= group["replicas"]
    for doc in docs.values():
        cs = _cluster_spec(doc)
        head_image = _containers(cs["headGroupSpec"]["template"])[0]["image"]
        for g in cs["workerGroupSpecs"]:
            (c,) = _containers(g["template"])
            assert c["image"] == head_image
            instance = g["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
            for kind in ("limits", "requests"):
                assert c["resources"][kind]["nvidia.com/gpu"] == "8"
                assert c["resources"][kind]["vpc.amazonaws.com/efa"] == str(EFA_INTERFACES[instance])
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert NCCL_EFA_ENV.items() <= env.items()


def test_kuberay_pods_reach_s3_through_irsa_not_keys():
    sa = yaml.safe_load((INFRA / "kuberay" / "serviceaccount.yaml").read_text())
    assert sa["kind"] == "ServiceAccount"
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for doc in _kuberay_docs().values():
        for template in _pod_templates(_cluster_spec(doc)):
            assert template["spec"]["serviceAccountName"] == sa["metadata"]["name"]
            for c in _containers(template):
                assert "envFrom" not in c  # no Secret of AWS keys
                assert not {e["name"] for e in c.get("env", [])} & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_kuberay_rayjob_runs_a_job_file():
    doc = _kuberay_docs()["rayjob"]
    assert doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("resnet-cluster submit jobs/")
    job = spec["entrypoint"].split()[2]
    assert (INFRA.parent / job).is_file() or job == "jobs/imagenet_r101.yaml"
    assert spec["shutdownAfterJobFinishes"] is True


def test_dockerfile_installs_the_project_and_efa_without_token_mode():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -e . -c constraints.txt" in text
    assert "efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify" in text
    assert "RAY_AUTH_MODE" not in _image_env()  # set by KubeRay's authOptions, with the token


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

    from resnet_cluster.models import jobs
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
        cfg = jobs.load(INFRA.parent / "jobs" / "smoke.yaml", [
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
