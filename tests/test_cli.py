"""The CLI as a user runs it: the installed console script, in a subprocess, without Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_cluster.engine import Callback, fit
from resnet_cluster.models import jobs
from test_data import PER_BATCH, N_TEST, write_archive

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "resnet-cluster")


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cifar")
    archive = tmp / "cifar-10-python.tar.gz"
    write_archive(archive, bytes_keys=True)  # keys as bytes, as Python 2 pickles load
    dest = tmp / "prepared"
    proc = run_cli("data", "prepare", "cifar10", "--source", str(archive), "--dest", str(dest), "--json")
    assert proc.returncode == 0, proc.stderr
    return dest, json.loads(proc.stdout)


def test_data_prepare_cifar10_from_a_genuine_archive(prepared):
    dest, summary = prepared
    assert summary["num_train"] == 5 * PER_BATCH and summary["num_test"] == N_TEST
    assert summary["classes"][0] == "airplane" and len(summary["classes"]) == 10
    # the shard format ImageNet uses: shard folders, then manifest.json and meta.json last
    assert {p.name for p in dest.iterdir()} == {"train", "test", "manifest.json", "meta.json"}
    assert summary["shards"] == 2 and summary["reused_shards"] == 0


def test_training_reads_the_prepared_dataset(prepared):
    """The real CIFAR path of the loop (not synthetic): every test image is evaluated."""
    dest, summary = prepared
    cfg = jobs.load(
        REPO / "jobs" / "cifar_r20.yaml",
        [f"data.root={dest}", "scaling.use_gpu=false", "scaling.workers=1", "train.batch_size=10",
         "train.iterations=4", "schedule.milestones=[]"],
    )  # fmt: skip
    seen = []

    class Collect(Callback):
        def on_epoch_end(self, record, state):
            seen.append(record)

    out = fit(cfg, callbacks=[Collect()])
    assert out["iterations"] == 4
    assert seen[-1]["test_images"] == summary["num_test"]


def test_submit_with_missing_dataset_is_a_clear_user_error(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_cli("submit", "jobs/cifar_r20.yaml", "--set", f"data.root={missing}", "--set",
                   "scaling.use_gpu=false", "--set", f"artifacts.store={tmp_path / 'store'}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert str(missing) in proc.stderr and "data prepare cifar10" in proc.stderr
    assert not (tmp_path / "store").exists()  # nothing was started or written


def test_data_prepare_with_missing_source_is_a_clear_user_error(tmp_path):
    proc = run_cli("data", "prepare", "cifar10", "--source", str(tmp_path / "nope.tar.gz"), "--dest", str(tmp_path / "d"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nope.tar.gz" in proc.stderr


def test_models_list_json_has_table6_counts():
    proc = run_cli("models", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    counts = {m["name"]: m["parameters"] for m in json.loads(proc.stdout)}
    assert round(counts["cifar_resnet20"] / 1e6, 2) == 0.27
    assert round(counts["cifar_resnet110"] / 1e6, 1) == 1.7
    assert counts["cifar_plain56"] == counts["cifar_resnet56"]


def test_help_lists_the_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("submit", "runs", "data", "models"):
        assert cmd in proc.stdout


def test_submit_refuses_an_old_cifar_folder_before_starting_ray(tmp_path):
    from test_data import _make_batches, _write_legacy_layout

    old = tmp_path / "old-cifar"
    _write_legacy_layout(old, *_make_batches())
    proc = run_cli("submit", "jobs/cifar_r20.yaml", "--set", f"data.root={old}", "--set",
                   "scaling.use_gpu=false", "--set", f"artifacts.store={tmp_path / 'store'}")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert "old single-file layout" in err and f"data prepare cifar10 --dest {old}" in err
    assert not (tmp_path / "store").exists()  # refused before anything was written or started
