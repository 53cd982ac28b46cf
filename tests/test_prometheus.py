"""The Grafana board's queries against a real Prometheus scraping a real Ray cluster.

One `ray start --head` node with its own --temp-dir (so we read this cluster's
prom_metrics_service_discovery.json, not another Ray cluster's on the same machine), a real
Prometheus (Debian's `prometheus` package; `.ci/run` installs it) that finds the node through that
file with `file_sd_configs`, and a short smoke job submitted through the Jobs API. While it trains,
every query in infra/grafana/*.json must return series scraped from this cluster's node.

GPU series cannot exist on a machine without GPUs: for those queries the test checks instead that
each metric name is one the installed Ray's node reporter defines with GPU tags
(ray/dashboard/modules/reporter/reporter_agent.py, METRICS_GAUGES).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from raynodes import base_env, start_head

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "infra" / "grafana"
CLI = str(Path(sys.executable).parent / "resnet-cluster")
SD_FILE = "prom_metrics_service_discovery.json"  # ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE

pytestmark = pytest.mark.ray


def dashboard_queries(run_id: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in infra/grafana/*.json, with the board's $run_id
    variable set to this run (its id has only letters, digits and '-': nothing to escape)."""
    out = []
    for path in sorted(GRAFANA.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                out.append((panel["title"], target["expr"].replace("$run_id", run_id)))
    return out


def metric_names(expr: str) -> set[str]:
    """The Ray metric names a query reads (every exported name starts with ``ray_``), leaving out
    label matchers and grouping labels."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    return set(re.findall(r"\bray_\w+", expr))


def gpu_metric_names() -> set[str]:
    """Names (with the exported ``ray_`` prefix) of the node reporter's per-GPU gauges."""
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    return {f"ray_{name}" for name, g in METRICS_GAUGES.items() if "GpuIndex" in g.view.columns}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def query(prom: str, expr: str) -> list[dict]:
    try:
        doc = get_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    except urllib.error.HTTPError as e:  # 400: the query does not parse; Prometheus says why
        raise AssertionError(f"{expr}: {e.read().decode()}") from None
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@pytest.fixture(scope="module")
def prometheus():
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("no `prometheus` binary: `apt-get install -y prometheus` (Debian), as .ci/run does")
    return binary


def test_every_grafana_query_returns_series_from_a_real_prometheus(prometheus, tmp_path):
    # A short path: Ray's Unix sockets live under the temp dir (107-byte limit).
    ray_tmp = tempfile.mkdtemp(prefix="rcp", dir="/tmp")
    head = start_head(tmp_path, num_cpus=2, temp_dir=ray_tmp)
    prom_proc = prom_log = None
    try:
        sd = Path(ray_tmp) / SD_FILE
        deadline = time.time() + 120
        while not (sd.exists() and f":{head.metrics_port}" in sd.read_text()) and time.time() < deadline:
            time.sleep(1)
        assert sd.exists() and f":{head.metrics_port}" in sd.read_text(), f"Ray wrote no {SD_FILE} listing the node"
        (target,) = [t for group in json.loads(sd.read_text()) for t in group["targets"]
                     if t.endswith(f":{head.metrics_port}")]  # fmt: skip

        port = free_port()
        prom = f"http://127.0.0.1:{port}"
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
            "scrape_configs": [{"job_name": "ray", "file_sd_configs": [{"files": [str(sd)], "refresh_interval": "2s"}]}],
        }))  # fmt: skip
        prom_log = open(tmp_path / "prometheus.log", "w")
        prom_proc = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
            stdout=prom_log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{prom}/-/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("Prometheus did not become ready:\n" + (tmp_path / "prometheus.log").read_text()[-2000:])

        run_id = f"prom-{secrets.token_hex(3)}"
        env = base_env()
        env["RESNET_CLUSTER_STORE"] = str(tmp_path / "store")
        # 10 iterations an epoch, so the test-error and epoch gauges are set every few seconds too.
        submitted = subprocess.run(
            [CLI, "submit", "jobs/smoke.yaml", "--address", head.dashboard, "--json", "--name", run_id,
             "--set", "train.iterations=400", "--set", "data.synthetic_train=640",
             "--set", "train.log_every_iterations=5"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr

        queries = dashboard_queries(run_id)
        gpu_names = gpu_metric_names()
        gpu_queries = {expr for _, expr in queries if metric_names(expr) & gpu_names}
        expect = [(title, expr) for title, expr in queries if expr not in gpu_queries or torch.cuda.is_available()]
        seen: dict[str, list[dict]] = {}
        deadline = time.time() + 300
        while time.time() < deadline and len(seen) < len(expect):
            for _, expr in expect:
                if expr not in seen:
                    ours = [s for s in query(prom, expr) if s["metric"].get("instance") == target]
                    if ours:
                        seen[expr] = ours
            time.sleep(2)
        missing = [f"{title}: {expr}" for title, expr in expect if expr not in seen]
        assert not missing, "queries that returned no series from this cluster:\n" + "\n".join(missing)
        for expr, series in seen.items():  # shown with -s: what the board would draw
            print(f"{len(series):3d} series  {expr}")

        # The numbers are this run's: its run id, its ranks, a Train run that is running.
        ours = seen[next(e for _, e in expect if e.startswith("ray_resnet_cluster_images_per_second"))]
        assert {s["metric"]["run_id"] for s in ours} == {run_id}
        assert {s["metric"]["rank"] for s in ours} <= {"0", "1"} and all(float(s["value"][1]) > 0 for s in ours)
        states = seen["ray_train_controller_state == 1"]
        assert {s["metric"]["ray_train_controller_state"] for s in states} & {"RUNNING", "SCHEDULING"}
        cpu = seen["ray_node_cpu_utilization"]
        assert all(0 <= float(s["value"][1]) <= 100 for s in cpu)
        # The board's run picker (label_values over the images/s series) offers this run.
        values = get_json(f"{prom}/api/v1/label/run_id/values?match[]=ray_resnet_cluster_images_per_second")
        assert run_id in values["data"]

        # GPU series: no GPU here, so the names are checked against Ray's own definitions.
        assert gpu_queries, "the board has no GPU panels"
        for expr in gpu_queries:
            assert metric_names(expr) <= gpu_names, expr
    finally:
        if prom_proc is not None:
            prom_proc.terminate()
            try:
                prom_proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                prom_proc.kill()
        if prom_log is not None:
            prom_log.close()
        head.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
