"""A whole training run stored on S3: the smoke job through the real CLI, a real local Ray
cluster (2 Ray Train workers, gloo DDP) and a real S3 HTTP endpoint (moto on 127.0.0.1).

One submission (about a minute here); everything else reads what it left: Ray Train's
checkpoints inside the run prefix, `runs list/show/download` against the bucket, every file
verified against the manifest, the model loads, and no secret reached any artifact.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "resnet-cluster")
SMOKE = str(REPO / "jobs" / "smoke.yaml")
# Made at run time: a literal would be in this file, and so in the run's source.git-patch.
SECRET = "s3-secret-" + secrets.token_hex(12)
BUCKET = "ray-runs"
STORE = f"s3://{BUCKET}/team/resnet"
ITERATIONS = 40  # 640 images / batch 64 = 10 iterations per epoch: 4 epochs, 4 checkpoints

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3fs.S3FileSystem(endpoint_url=url, key="testing", secret=SECRET, skip_instance_cache=True).mkdir(BUCKET)
    yield url
    server.stop()


def _env(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RESNET_CLUSTER_"))}
    # A fresh local cluster started by this driver (never one that happens to run on the
    # machine): its workers inherit the AWS variables below from the driver's environment.
    env["RAY_ADDRESS"] = "local"
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=SECRET,
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, COLUMNS="200")  # fmt: skip
    return env


def _cli(endpoint: str, *args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=cwd, env=_env(endpoint), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def s3_run(endpoint):
    proc = _cli(endpoint, "submit", SMOKE, "--json", "--name", "s3-smoke", "--set", f"artifacts.store={STORE}",
                "--set", f"train.iterations={ITERATIONS}", "--set", "data.synthetic_train=640",
                "--set", "schedule.milestones=[30]", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_run_is_stored_in_the_bucket_with_checkpoints_in_its_prefix(endpoint, s3_run):
    assert s3_run["status"] == "finished" and s3_run["uri"] == f"{STORE}/runs/s3-smoke"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret=SECRET, skip_instance_cache=True)
    prefix = f"{BUCKET}/team/resnet/runs/s3-smoke"
    names = {p.rsplit("/", 1)[1] for p in fs.ls(prefix)}
    assert {"config.yaml", "model.pt", "training_loss.csv", "testing_error.csv", "source.git-commit",
            "source.git-patch", "environment.json", "events.jsonl", "summary.json", "manifest.json",
            "checkpoints"} <= names  # fmt: skip
    # Ray Train wrote its checkpoints and its snapshot into the run prefix, keeping the last 2.
    ckpts = sorted(p for p in fs.find(f"{prefix}/checkpoints") if p.endswith("train_state.pt"))
    assert [p.split("/")[-2] for p in ckpts] == ["epoch_00003", "epoch_00004"]
    assert fs.exists(f"{prefix}/checkpoints/checkpoint_manager_snapshot.json")
    assert fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", []) == []
    # no secret in any stored object (environment snapshot, events, config, patch, ...)
    for path in fs.find(prefix):
        if not path.endswith((".pt",)):
            assert SECRET.encode() not in fs.cat_file(path), path
    env = json.loads(fs.cat_file(f"{prefix}/environment.json"))
    assert env["env"]["AWS_SECRET_ACCESS_KEY"] == "<redacted>"
    assert env["env"]["AWS_ENDPOINT_URL"] == endpoint


def test_list_show_download_and_verify(endpoint, s3_run, tmp_path):
    out = _cli(endpoint, "runs", "list", "--store", STORE, "--json", "--status", "finished")
    assert out.returncode == 0, out.stderr
    (rec,) = json.loads(out.stdout)
    assert rec["run_id"] == "s3-smoke" and rec["status"] == "finished" and rec["model"] == "cifar_resnet20"
    assert rec["final_top1_err"] == s3_run["final"]["top1_err"]

    out = _cli(endpoint, "runs", "show", "s3-smoke", "--store", STORE)
    assert out.returncode == 0, out.stderr
    assert "finished" in out.stdout and "test top-1 error (%), 4 evaluations" in out.stdout
    assert "manifest problems" not in out.stdout

    dest = tmp_path / "dl"
    out = _cli(endpoint, "runs", "download", "s3-smoke", str(dest), "--store", STORE, "--json")
    assert out.returncode == 0, out.stderr
    files = json.loads(out.stdout)["files"]
    manifest = json.loads((dest / "manifest.json").read_text())
    assert {f["path"] for f in files} == {e["path"] for e in manifest["files"]}
    for e in manifest["files"]:
        data = (dest / e["path"]).read_bytes()
        assert len(data) == e["size"] and hashlib.sha256(data).hexdigest() == e["sha256"], e["path"]
    test_rows = list(csv.DictReader(io.StringIO((dest / "testing_error.csv").read_text())))
    assert [int(r["epoch"]) for r in test_rows] == [0, 1, 2, 3]
    assert float(test_rows[-1]["top1_err"]) == s3_run["final"]["top1_err"]

    from resnet_cluster import models

    saved = torch.load(dest / "model.pt", map_location="cpu", weights_only=False)
    net = models.build(saved["arch"], **saved["model_options"])
    net.load_state_dict(saved["state_dict"])
    assert saved["config"]["artifacts"]["store"] == STORE
    state = torch.load(dest / "checkpoints" / "epoch_00004" / "train_state.pt", map_location="cpu",
                       weights_only=False)  # fmt: skip
    assert state["iteration"] == ITERATIONS

    # a finished run on S3 is never resumed or overwritten
    again = _cli(endpoint, "submit", SMOKE, "--json", "--name", "s3-smoke", "--set", f"artifacts.store={STORE}",
                 "--set", f"train.iterations={ITERATIONS}", "--set", "data.synthetic_train=640",
                 "--set", "schedule.milestones=[30]")  # fmt: skip
    assert again.returncode == 2 and "already finished" in again.stderr and "Traceback" not in again.stderr
