"""End to end through the real CLI and a real local Ray cluster (2 Ray Train workers, gloo DDP).

These are the slow tests (about a minute per submission here), so there are few of them and
each checks a lot: every artifact exists, parses and matches its manifest checksum; a run
stopped with Ctrl-C resumes from its checkpoint when re-submitted with the same --name and ends
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "resnet-cluster")
SMOKE = str(REPO / "jobs" / "smoke.yaml")
EXPECTED_FILES = {
    "config.yaml", "model.pt", "training_loss.csv", "testing_error.csv", "source.git-commit",
    "source.git-patch", "environment.json", "events.jsonl", "summary.json", "manifest.json",
}  # fmt: skip

pytestmark = pytest.mark.ray


def _env(store: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["RESNET_CLUSTER_STORE"] = str(store)
    env.pop("RAY_ADDRESS", None)
    env["AWS_SECRET_ACCESS_KEY"] = "integration-test-secret-value"
    return env


def _submit(store: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, "submit", SMOKE, "--json", *args],
        cwd=REPO, env=_env(store), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    proc = _submit(store, "--name", "smoke-full")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return store, json.loads(proc.stdout)


def test_smoke_submit_writes_every_artifact(smoke_run):
    store, result = smoke_run
    assert result["status"] == "finished"
    run = store / "runs" / "smoke-full"
    assert Path(result["uri"]) == run
    names = {p.name for p in run.iterdir()}
    assert EXPECTED_FILES <= names, EXPECTED_FILES - names

    # manifest.json: every file, with size and sha256 that match what is on disk
    manifest = json.loads((run / "manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {
        str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.name != "manifest.json"
    }
    assert set(listed) == on_disk
    for rel, entry in listed.items():
        data = (run / rel).read_bytes()
        assert entry["size"] == len(data), rel
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), rel
    assert any(p.startswith("checkpoints/") and p.endswith("train_state.pt") for p in listed)

    # config.yaml is the resolved job as run
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["arch"] == "cifar_resnet20" and cfg["scaling"]["workers"] == 2
    job = yaml.safe_load(Path(SMOKE).read_text())
    assert cfg["train"]["iterations"] == job["train"]["iterations"]

    # training_loss.csv: one row per log window, every iteration up to the end, loss falls
    train = _rows(run / "training_loss.csv")
    its = [int(r["iteration"]) for r in train]
    step = job["train"]["log_every_iterations"]
    assert its == list(range(step, job["train"]["iterations"] + 1, step))
    losses = [float(r["loss"]) for r in train]
    assert losses[-1] < 0.5 * losses[0]
    assert all(float(r["images_per_sec"]) > 0 for r in train)

    # testing_error.csv: one row per epoch over all 512 synthetic test images
    test = _rows(run / "testing_error.csv")
    summary = json.loads((run / "summary.json").read_text())
    assert [int(r["epoch"]) for r in test] == list(range(summary["epochs"]))
    assert all(0.0 <= float(r["top1_err"]) <= 100.0 for r in test)
    assert summary["status"] == "finished"
    assert summary["final"]["top1_err"] == pytest.approx(float(test[-1]["top1_err"]))
    assert result["final"]["top1_err"] == summary["final"]["top1_err"]
    assert float(test[-1]["top1_err"]) < 50.0  # 10 classes: chance is 90% error

    # model.pt rebuilds the network with the trained weights
    from resnet_cluster import models

    saved = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    net = models.build(saved["arch"], **saved["model_options"])
    net.load_state_dict(saved["state_dict"])
    assert sum(p.numel() for p in net.parameters()) == 269_722  # ResNet-20, Table 6: 0.27M

    # provenance: this checkout's commit, and a patch (possibly empty) that git produced
    commit = (run / "source.git-commit").read_text().split()[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert commit == head.stdout.strip()

    # environment.json: both workers, their devices, and no secrets
    env_text = (run / "environment.json").read_text()
    env = json.loads(env_text)
    assert sorted(w["rank"] for w in env["workers"]) == [0, 1]
    assert "integration-test-secret-value" not in env_text
    assert "integration-test-secret-value" not in (run / "events.jsonl").read_text()

    kinds = [e["event"] for e in _events(run)]
    assert kinds == ["submitted", "started", "finished"]


def test_runs_list_and_show(smoke_run):
    store, _ = smoke_run
    env = _env(store)
    out = subprocess.run([CLI, "runs", "list", "--json"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    runs = {r["run_id"]: r for r in json.loads(out.stdout)}
    assert runs["smoke-full"]["status"] == "finished"
    assert runs["smoke-full"]["model"] == "cifar_resnet20"
    out = subprocess.run([CLI, "runs", "show", "smoke-full"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "finished" in out.stdout and "model.pt" in out.stdout
    missing = subprocess.run([CLI, "runs", "show", "no-such-run"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "runs list" in missing.stderr


def test_ctrl_c_then_resubmit_resumes_bit_identical(smoke_run, tmp_path):
    full_store, full = smoke_run
    store = tmp_path / "store"
    run = store / "runs" / "smoke-resume"
    proc = subprocess.Popen(
        [CLI, "submit", SMOKE, "--json", "--name", "smoke-resume"],
        cwd=REPO, env=_env(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    snapshot = run / "checkpoints" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if snapshot.exists() and "epoch_00002" in snapshot.read_text():
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before its second checkpoint"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-4000:]
    assert json.loads(out)["status"] == "stopped"
    assert not (run / "manifest.json").exists()
    assert _events(run)[-1]["event"] == "stopped"

    again = _submit(store, "--name", "smoke-resume")
    assert again.returncode == 0, again.stderr[-4000:]
    result = json.loads(again.stdout)
    assert result["resumed"] is True
    events = _events(run)
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["epoch"] >= 2
    assert events[-1]["event"] == "finished"

    # the CSVs read as one run: no repeated or missing rows around the resume point
    full_run = full_store / "runs" / "smoke-full"
    its = [int(r["iteration"]) for r in _rows(run / "training_loss.csv")]
    assert its == [int(r["iteration"]) for r in _rows(full_run / "training_loss.csv")]
    epochs = [int(r["epoch"]) for r in _rows(run / "testing_error.csv")]
    assert epochs == list(range(len(epochs)))

    # deterministic data order + restored RNG and optimizer state: the same final numbers
    assert result["final"]["test_loss"] == full["final"]["test_loss"]
    assert result["final"]["top1_err"] == full["final"]["top1_err"]

    # a finished run is never resumed or overwritten
    third = _submit(store, "--name", "smoke-resume")
    assert third.returncode == 2 and "already finished" in third.stderr
    assert "Traceback" not in third.stderr
