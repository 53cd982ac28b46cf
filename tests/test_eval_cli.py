"""``resnet-cluster eval`` as a user runs it (console script in a subprocess) on a run trained
in-process on a small CIFAR-10 archive in the official format: the stored model is rebuilt
and re-tested with the run's own numbers, the result is recorded next to the run without
touching its files, checkpoints evaluate too, and bad targets and protocols exit with code 2."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_cluster.callbacks import RunRecorder
from resnet_cluster.engine import Callback, WorkerContext, evaluate, fit
from resnet_cluster.engine.checkpoint import save_train_state
from resnet_cluster.models import jobs
from test_data import N_TEST, _write_legacy_layout, write_archive

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "resnet-cluster")
RUN_ID = "evaltest-run"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


class KeepState(Callback):
    def __init__(self, folder: Path):
        self.folder = folder

    def on_epoch_end(self, record, state):
        save_train_state(self.folder / f"epoch_{record['epoch'] + 1:05d}", state())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("evalcli")
    write_archive(tmp / "cifar.tar.gz", bytes_keys=True)
    proc = cli("data", "prepare", "cifar10", "--source", str(tmp / "cifar.tar.gz"), "--dest", str(tmp / "data"), "--json")
    assert proc.returncode == 0, proc.stderr
    store = tmp / "store"
    cfg = jobs.from_dict({
        "name": "evaltest", "model": {"arch": "cifar_resnet20"},
        "data": {"dataset": "cifar10", "root": str(tmp / "data")},
        "train": {"batch_size": 4, "iterations": 10, "log_every_iterations": 5},
        "scaling": {"workers": 1}, "artifacts": {"store": str(store)},
    })
    summary = fit(cfg, WorkerContext(), callbacks=[RunRecorder(cfg, str(store), RUN_ID), KeepState(tmp / "ckpt")])
    return tmp, store, cfg, summary


def digests(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}


def test_eval_a_run_reproduces_its_last_test_error_and_records_it(trained):
    tmp, store, cfg, summary = trained
    run_dir = store / "runs" / RUN_ID
    before = digests(run_dir)
    proc = cli("eval", RUN_ID, "--store", str(store), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["test_images"] == N_TEST and doc["protocol"] == "1crop" and doc["weights"] == "model.pt"
    assert doc["top1_err"] == summary["final_top1_err"]  # the same weights on the same 6 images
    assert doc["arch"] == "cifar_resnet20" and doc["dataset"] == "cifar10"
    recorded = json.loads((run_dir / "eval-1crop.json").read_text())
    assert recorded["top1_err"] == doc["top1_err"] and doc["recorded_to"].endswith("eval-1crop.json")
    after = digests(run_dir)
    assert {k: v for k, v in after.items() if k != "eval-1crop.json"} == before  # nothing else changed

    table = cli("eval", RUN_ID, "--store", str(store), "--no-record", "--device", "cpu")
    assert table.returncode == 0 and "top-1 error" in table.stdout and "cifar10" in table.stdout


def test_eval_a_checkpoint_folder(trained):
    tmp, store, cfg, _ = trained
    folder = sorted((tmp / "ckpt").iterdir())[0]
    proc = cli("eval", str(folder), "--json", "--device", "cpu", "--batch-size", "3")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["weights"] == folder.name and doc["run_id"] is None and "recorded_to" not in doc
    # the reference: that checkpoint's weights through the in-process evaluator
    from resnet_cluster.data.loaders import build_loaders_for
    from resnet_cluster.engine.loop import build_model

    state = torch.load(folder / "train_state.pt", weights_only=False)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    _, test, _ = build_loaders_for(cfg, rank=0, world_size=1)
    want = evaluate(model, test, WorkerContext())
    assert doc["top1_err"] == want["top1_err"] and doc["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)


def test_eval_a_running_run_takes_its_latest_registered_checkpoint(trained):
    """A run without model.pt yet is evaluated from the checkpoint Ray Train registered last
    (here a mid-epoch one), never from a later folder that is not in Ray's index: an upload
    that failed or was cut off (here a torn train_state.pt)."""
    import shutil

    tmp, store, cfg, _ = trained
    run = store / "runs" / "evaltest-running"
    shutil.copytree(store / "runs" / RUN_ID, run)
    (run / "model.pt").unlink()
    proc = cli("eval", "evaltest-running", "--store", str(store), "--json", "--device", "cpu")
    assert proc.returncode == 2 and "neither model.pt nor a checkpoint" in proc.stderr

    good = sorted((tmp / "ckpt").iterdir())[0] / "train_state.pt"
    (run / "checkpoints" / "iter_000000005").mkdir(parents=True)
    shutil.copy(good, run / "checkpoints" / "iter_000000005" / "train_state.pt")
    (run / "checkpoints" / "epoch_00009").mkdir()
    (run / "checkpoints" / "epoch_00009" / "train_state.pt").write_bytes(good.read_bytes()[:1000])
    index = {"checkpoint_results": [], "latest_checkpoint_result": {
        "checkpoint_dir_name": "iter_000000005", "metrics": {"epoch": 0, "iteration": 5}}}
    (run / "checkpoints" / "checkpoint_manager_snapshot.json").write_text(json.dumps(index))
    proc = cli("eval", "evaltest-running", "--store", str(store), "--json", "--device", "cpu", "--no-record")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["weights"] == "checkpoints/iter_000000005"
    want = json.loads(cli("eval", str(good), "--json", "--device", "cpu").stdout)
    assert doc["top1_err"] == want["top1_err"] and doc["test_loss"] == want["test_loss"]


def test_bad_targets_and_protocols_exit_2(trained):
    tmp, store, _, _ = trained
    run_dir = store / "runs" / RUN_ID
    proc = cli("eval", RUN_ID, "--store", str(store), "--protocol", "10crop")
    assert proc.returncode == 2 and "eval.protocol" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run_dir / "eval-10crop.json").exists()
    proc = cli("eval", "no-such-run", "--store", str(store))
    assert proc.returncode == 2 and "no run 'no-such-run'" in proc.stderr
    proc = cli("eval", RUN_ID, "--store", str(store), "--data", str(tmp / "missing"))
    assert proc.returncode == 2 and "data.root" in proc.stderr
    proc = cli("eval", str(tmp / "nothing-here" / "model.pt"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_data_prepared_in_the_old_cifar_layout_exits_2_naming_the_fix(trained, tmp_path):
    """A CIFAR-10 folder prepared before the shard format: one paragraph naming the folder and
    the command that rewrites it, exit code 2, no traceback."""
    from test_data import _make_batches

    tmp, store, _, _ = trained
    old = tmp_path / "old-cifar"
    _write_legacy_layout(old, *_make_batches())
    proc = cli("eval", RUN_ID, "--store", str(store), "--data", str(old), "--no-record")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())  # rich folds the paragraph
    assert "old single-file layout" in err and f"data prepare cifar10 --dest {old}" in err
