"""RunRecorder: the run files written while ``fit`` runs in-process (local store, no Ray), and
how a resumed run continues them."""

from __future__ import annotations

import copy
import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from resnet_cluster import config, models
from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.callbacks import TEST_FIELDS, TRAIN_FIELDS, RunRecorder
from resnet_cluster.engine import Callback, fit
from resnet_cluster.models import jobs

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"
RUN = "run-1"
SECRET = "shh-not-for-the-store"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread (OpenMP spin-waiting makes two threads much slower on a busy
    2-CPU machine); restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg() -> config.JobConfig:
    # 128 images / batch 32 = 4 iterations per epoch, 3 epochs, a log row every 2 iterations
    return jobs.load(
        SMOKE,
        [
            "scaling.workers=1",
            "train.batch_size=32",
            "data.synthetic_train=128",
            "data.synthetic_test=64",
            "train.iterations=null",
            "train.epochs=3",
            "train.log_every_iterations=2",
            "schedule.milestones=[2]",
        ],
    )


class Keep(Callback):
    """Keeps the TrainState after epoch index 0 (deep-copied) and the final model."""

    def __init__(self) -> None:
        self.state: dict | None = None
        self.model: nn.Module | None = None
        self.summary: dict | None = None

    def on_epoch_end(self, record, state):
        if record["epoch"] == 0:
            self.state = copy.deepcopy(state())

    def on_finish(self, summary, model):
        self.summary, self.model = summary, model


def read_csv(store: ArtifactStore, name: str) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(store.read_text(RUN, name)))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def events(store: ArtifactStore) -> list[dict]:
    return [json.loads(line) for line in store.read_text(RUN, layout.EVENTS).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
    """One finished run in a fresh local store, recorded with a secret in the environment."""
    root = tmp_path_factory.mktemp("rec") / "store"
    cfg = tiny_cfg()
    keep = Keep()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("MY_API_TOKEN", SECRET)
        rec = RunRecorder(cfg, ArtifactStore(str(root)), RUN, csv_interval_s=0)
        summary = fit(cfg, callbacks=[rec, keep])
    return {"root": root, "store": ArtifactStore(str(root)), "cfg": cfg, "keep": keep, "summary": summary}


# ---------------------------------------------------------------------------- one run
def test_csvs_exist_with_header_and_sane_rows(run1):
    store = run1["store"]
    files = {name for name, _ in store.list_files(RUN)}
    assert {layout.TRAIN_CSV, layout.TEST_CSV, layout.MODEL, layout.SUMMARY, layout.EVENTS, layout.ENVIRONMENT} <= files

    header, train = read_csv(store, layout.TRAIN_CSV)
    assert header == TRAIN_FIELDS
    its = [int(r["iteration"]) for r in train]
    assert its == [2, 4, 6, 8, 10, 12]
    assert all(b > a for a, b in zip(its, its[1:]))
    assert [int(r["epoch"]) for r in train] == [0, 0, 1, 1, 2, 2]
    for r in train:
        assert 0 <= float(r["train_err"]) <= 100
        assert float(r["loss"]) > 0 and float(r["images_per_sec"]) > 0 and r["time"]
    # milestone 2 (epochs): lr 0.1 then 0.01 in the last epoch
    assert [float(r["lr"]) for r in train] == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01, 0.01])

    header, test = read_csv(store, layout.TEST_CSV)
    assert header == TEST_FIELDS
    assert [int(r["epoch"]) for r in test] == [0, 1, 2]
    assert [int(r["iteration"]) for r in test] == [4, 8, 12]
    for r in test:
        assert 0 <= float(r["top1_err"]) <= 100 and 0 <= float(r["top5_err"]) <= 100
        assert float(r["top5_err"]) <= float(r["top1_err"])
        assert float(r["test_loss"]) > 0


def test_summary_matches_csv(run1):
    store = run1["store"]
    s = store.read_json(RUN, layout.SUMMARY)
    _, test = read_csv(store, layout.TEST_CSV)
    errs = [float(r["top1_err"]) for r in test]
    assert s["status"] == "finished" and s["run_id"] == RUN
    assert s["epochs"] == 3 and s["iterations"] == 12
    assert s["job"] == "smoke" and s["model"] == "cifar_resnet20"
    assert s["final"]["top1_err"] == errs[-1]
    assert s["final"]["epoch"] == 2 and s["final"]["iteration"] == 12
    assert s["best"]["top1_err"] == min(errs)
    assert s["best"]["epoch"] == errs.index(min(errs))
    assert s["final"]["top1_err"] == run1["summary"]["final_top1_err"]
    assert s["best"]["top1_err"] == run1["summary"]["best_top1_err"]


def test_model_file_rebuilds_the_trained_model(run1):
    store, trained = run1["store"], run1["keep"].model
    path = Path(store.run_uri(RUN)) / layout.MODEL
    doc = torch.load(path, map_location="cpu", weights_only=False)
    assert doc["arch"] == "cifar_resnet20"
    assert doc["model_options"]["shortcut"] == "A"
    assert doc["config"] == run1["cfg"].to_dict()
    assert doc["summary"]["iterations"] == 12
    rebuilt = models.build(doc["arch"])
    rebuilt.load_state_dict(doc["state_dict"])
    trained.eval()
    rebuilt.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained(x))


def test_events_started(run1):
    evs = events(run1["store"])
    starts = [e for e in evs if e["event"] in ("started", "resumed", "restarted")]
    assert len(starts) == 1
    assert starts[0]["event"] == "started"
    assert starts[0]["epoch"] == 0 and starts[0]["iteration"] == 0
    assert starts[0]["world_size"] == 1
    assert all("time" in e for e in evs)


def test_environment_has_no_secrets(run1):
    path = Path(run1["store"].run_uri(RUN)) / layout.ENVIRONMENT
    text = path.read_text()
    env = json.loads(text)
    assert SECRET not in text
    assert "shh" not in text
    assert env["run"]["iters_per_epoch"] == 4 and env["run"]["total_iterations"] == 12
    assert env["scaling"]["workers"] == 1
    assert "python" in env and "packages" in env


# ---------------------------------------------------------------------------- resume
def test_resume_truncates_then_appends(run1, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(run1["root"], root)
    store = ArtifactStore(str(root))
    cfg = run1["cfg"]
    _, train_before = read_csv(store, layout.TRAIN_CSV)
    _, test_before = read_csv(store, layout.TEST_CSV)

    state = run1["keep"].state
    assert state["epoch"] == 1 and state["iteration"] == 4
    keep = Keep()
    summary = fit(cfg, callbacks=[RunRecorder(cfg, store, RUN, csv_interval_s=0), keep], resume=state)
    assert summary["iterations"] == 12

    _, train = read_csv(store, layout.TRAIN_CSV)
    its = [int(r["iteration"]) for r in train]
    assert its == [2, 4, 6, 8, 10, 12]  # no duplicates: rows after iteration 4 were replaced
    assert len(set(its)) == len(its)
    # the rows up to the checkpoint are the original ones, byte for byte (times included)
    assert train[:2] == train_before[:2]
    # the re-run rows reproduce the original run (deterministic resume)
    assert [float(r["loss"]) for r in train[2:]] == pytest.approx(
        [float(r["loss"]) for r in train_before[2:]], abs=1e-6
    )

    _, test = read_csv(store, layout.TEST_CSV)
    assert [int(r["epoch"]) for r in test] == [0, 1, 2]
    assert test[0] == test_before[0]
    assert [float(r["top1_err"]) for r in test] == pytest.approx([float(r["top1_err"]) for r in test_before])

    evs = [e for e in events(store) if e["event"] in ("started", "resumed", "restarted")]
    assert [e["event"] for e in evs] == ["started", "resumed"]
    assert evs[-1]["epoch"] == 1 and evs[-1]["iteration"] == 4

    s = store.read_json(RUN, layout.SUMMARY)
    assert s["status"] == "finished" and s["iterations"] == 12
    assert s["final"]["top1_err"] == float(test[-1]["top1_err"])


def test_resume_from_scratch_store_has_no_rows_to_keep(run1, tmp_path):
    """Resuming into a store that has no CSVs yet (e.g. a new store) starts them empty."""
    store = ArtifactStore(str(tmp_path / "empty"))
    cfg = run1["cfg"]
    state = copy.deepcopy(run1["keep"].state)
    fit(cfg, callbacks=[RunRecorder(cfg, store, RUN, csv_interval_s=0)], resume=state)
    _, train = read_csv(store, layout.TRAIN_CSV)
    assert [int(r["iteration"]) for r in train] == [6, 8, 10, 12]
    _, test = read_csv(store, layout.TEST_CSV)
    assert [int(r["epoch"]) for r in test] == [1, 2]
    assert [e["event"] for e in events(store)] == ["resumed"]


def test_summary_best_after_resume_covers_epochs_before_checkpoint(tmp_path):
    """Drive the recorder by hand: epoch 0 is the best (10%), the run is resumed at epoch 1
    and epoch 1 gets 30%. summary.json's best must be epoch 0, the minimum of the CSV."""
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = tiny_cfg()
    info = {"iters_per_epoch": 4, "total_iterations": 8, "total_epochs": 2, "parameters": 1}
    record0 = {"epoch": 0, "iteration": 4, "top1_err": 10.0, "top5_err": 1.0, "test_loss": 0.5}
    record1 = {"epoch": 1, "iteration": 8, "top1_err": 30.0, "top5_err": 2.0, "test_loss": 0.9}

    first = RunRecorder(cfg, store, RUN, csv_interval_s=0)
    first.on_start({**info, "start_epoch": 0, "start_iteration": 0, "resumed": False})
    first.on_epoch_end(record0, state=lambda: {})
    # ... the process dies here; a new one resumes from the epoch-0 checkpoint
    second = RunRecorder(cfg, store, RUN, csv_interval_s=0)
    second.on_start({**info, "start_epoch": 1, "start_iteration": 4, "resumed": True})
    second.on_epoch_end(record1, state=lambda: {})
    fit_summary = {"epochs": 2, "iterations": 8, "final_top1_err": 30.0, "best_top1_err": 10.0, "best_epoch": 0}
    second.on_finish(fit_summary, nn.Linear(1, 1))

    _, test = read_csv(store, layout.TEST_CSV)
    assert [float(r["top1_err"]) for r in test] == [10.0, 30.0]
    s = store.read_json(RUN, layout.SUMMARY)
    assert s["final"]["top1_err"] == 30.0
    assert s["best"]["top1_err"] == 10.0 and s["best"]["epoch"] == 0
