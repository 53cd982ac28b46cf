"""The training loop in-process (one CPU worker, synthetic data, no Ray): learning, evaluation
metrics, exact resume, checkpoint files, epoch mode, and batch-size errors."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_cluster import config
from resnet_cluster.engine import Callback, WorkerContext, evaluate, fit
from resnet_cluster.engine import checkpoint as ckpt
from resnet_cluster.errors import ConfigError, DataError, UserError
from resnet_cluster.models import jobs

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"

# 128 training images / batch 32 = 4 iterations per epoch; 64 test images.
TINY = [
    "scaling.workers=1",
    "train.batch_size=32",
    "data.synthetic_train=128",
    "data.synthetic_test=64",
    "train.log_every_iterations=2",
    "schedule.milestones=[6]",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(*extra: str) -> config.JobConfig:
    return jobs.load(SMOKE, [*TINY, *extra])


class Collect(Callback):
    """Records everything the loop reports; optionally keeps deep copies of TrainStates."""

    def __init__(self, keep_state_at: tuple[int, ...] = (), stop_after: int | None = None) -> None:
        self.info: dict | None = None
        self.logs: list[dict] = []
        self.epochs: list[dict] = []
        self.states: dict[int, dict] = {}
        self.summary: dict | None = None
        self.model: nn.Module | None = None
        self.keep_state_at = keep_state_at
        self.stop_after = stop_after

    def on_start(self, info):
        self.info = dict(info)

    def on_log(self, record):
        self.logs.append(dict(record))

    def on_epoch_end(self, record, state):
        self.epochs.append(dict(record))
        if record["epoch"] in self.keep_state_at:
            # state() holds live tensors; copy it as a checkpoint writer would
            self.states[record["epoch"]] = copy.deepcopy(state())
        if self.stop_after is not None and record["epoch"] == self.stop_after:
            raise _Interrupted

    def on_finish(self, summary, model):
        self.summary = dict(summary)
        self.model = model


class _Interrupted(Exception):
    pass


# ---------------------------------------------------------------------------- learning
def test_fit_smoke_job_learns():
    cfg = jobs.load(
        SMOKE,
        [
            "scaling.workers=1",
            "train.batch_size=32",
            "data.synthetic_train=640",
            "data.synthetic_test=256",
            "train.iterations=60",
        ],
    )
    c = Collect()
    summary = fit(cfg, callbacks=[c])
    assert c.info["iters_per_epoch"] == 20 and c.info["total_iterations"] == 60 and c.info["total_epochs"] == 3
    assert c.info["resumed"] is False and c.info["start_epoch"] == 0 and c.info["start_iteration"] == 0
    its = [r["iteration"] for r in c.logs]
    assert its == list(range(10, 61, 10))  # log_every_iterations 10 in smoke.yaml
    losses = [r["loss"] for r in c.logs]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(0 <= r["train_err"] <= 100 for r in c.logs)
    assert all(r["lr"] == pytest.approx(0.1) for r in c.logs)  # milestone 150 never reached
    assert summary["iterations"] == 60 and summary["epochs"] == 3
    assert [e["epoch"] for e in c.epochs] == [0, 1, 2]
    assert all("top1_err" in e for e in c.epochs)  # eval_every_epochs 1
    assert summary["final_top1_err"] == c.epochs[-1]["top1_err"]
    assert summary["best_top1_err"] == min(e["top1_err"] for e in c.epochs)
    assert summary["final_top1_err"] < 90.0  # better than chance on 10 classes
    assert c.epochs[-1]["test_images"] == 256


# ---------------------------------------------------------------------------- evaluate
class Identity(nn.Module):
    def forward(self, x):
        return x


def test_evaluate_exact_top1_top5():
    ranking = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])  # class c has rank c
    logits = ranking.repeat(5, 1)
    labels = torch.tensor([0, 1, 4, 5, 9])  # top1 hit; top5 hits: 0, 1, 4; misses: 5, 9
    batches = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    out = evaluate(Identity(), batches, WorkerContext())
    assert out["test_images"] == 5
    assert out["top1_err"] == pytest.approx(80.0)
    assert out["top5_err"] == pytest.approx(40.0)
    assert out["test_loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_evaluate_fewer_than_five_classes_and_model_in_eval_mode():
    logits = torch.tensor([[0.0, 1.0, 2.0], [5.0, 0.0, 1.0]])
    labels = torch.tensor([2, 1])
    model = nn.Sequential(nn.Dropout(0.9), Identity())  # dropout would change logits in train mode
    model.train()
    out = evaluate(model, [(logits, labels)], WorkerContext())
    assert not model.training
    assert out["top1_err"] == pytest.approx(50.0) and out["top5_err"] == 0.0


# ---------------------------------------------------------------------------- resume
def test_resume_matches_straight_run(tmp_path):
    cfg = tiny_cfg("train.iterations=null", "train.epochs=3")

    straight = Collect()
    s_summary = fit(cfg, callbacks=[straight])
    assert straight.info["iters_per_epoch"] == 4 and s_summary["iterations"] == 12

    # a run of the same job interrupted after epoch index 1, checkpointed through the files
    first = Collect(keep_state_at=(1,), stop_after=1)
    with pytest.raises(_Interrupted):
        fit(cfg, callbacks=[first])
    state = first.states[1]
    assert state["epoch"] == 2 and state["iteration"] == 8
    ckpt.save_train_state(tmp_path / "ck", state)
    loaded = ckpt.load_train_state(tmp_path / "ck")

    resumed = Collect()
    r_summary = fit(cfg, callbacks=[resumed], resume=loaded)
    assert resumed.info["resumed"] is True
    assert resumed.info["start_epoch"] == 2 and resumed.info["start_iteration"] == 8
    assert [e["epoch"] for e in resumed.epochs] == [2]
    assert resumed.logs[0]["epoch"] == 2 and resumed.logs[0]["iteration"] == 10
    assert [r["iteration"] for r in resumed.logs] == [10, 12]

    sd_a, sd_b = straight.model.state_dict(), resumed.model.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.allclose(sd_a[k].double(), sd_b[k].double(), atol=1e-6, rtol=0), k
    # the logged losses after the checkpoint are the same too
    tail = [r for r in straight.logs if r["iteration"] > 8]
    assert [r["loss"] for r in resumed.logs] == pytest.approx([r["loss"] for r in tail], abs=1e-6)
    # and so is the summary, including the history from before the checkpoint
    assert r_summary == s_summary


# ---------------------------------------------------------------------------- checkpoint files
def test_checkpoint_save_load_round_trip(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "schedule": {"warmup_done": False},
        "rng": ckpt.capture_rng(),
        "epoch": 3,
        "iteration": 120,
        "history": [{"epoch": 2, "iteration": 120, "top1_err": 12.5}],
        "config": {"name": "x"},
    }
    path = ckpt.save_train_state(tmp_path / "a" / "b", state)
    assert Path(path).name == ckpt.STATE_FILE and Path(path).is_file()
    assert not Path(path + ".tmp").exists()
    back = ckpt.load_train_state(tmp_path / "a" / "b")
    assert back["version"] == ckpt.FORMAT_VERSION
    for k in ("schedule", "epoch", "iteration", "history", "config"):
        assert back[k] == state[k]
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    buf = back["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(buf, opt.state_dict()["state"][0]["momentum_buffer"])

    # the RNG state restores the random stream
    ckpt.restore_rng(back["rng"])
    a = torch.rand(4)
    ckpt.restore_rng(back["rng"])
    assert torch.equal(a, torch.rand(4))


def test_checkpoint_wrong_version_is_refused(tmp_path):
    torch.save({"version": 999, "epoch": 1}, tmp_path / ckpt.STATE_FILE)
    with pytest.raises(RuntimeError, match="format 999"):
        ckpt.load_train_state(tmp_path)


# ---------------------------------------------------------------------------- lengths and errors
def test_epochs_mode_runs_epochs_times_iters_per_epoch():
    cfg = tiny_cfg("train.iterations=null", "train.epochs=2", "train.eval_every_epochs=2")
    c = Collect()
    summary = fit(cfg, callbacks=[c])
    assert c.info["iters_per_epoch"] == 4
    assert c.info["total_iterations"] == 8 and c.info["total_epochs"] == 2
    assert summary["iterations"] == 8 and summary["epochs"] == 2
    assert [e["iteration"] for e in c.epochs] == [4, 8]
    assert "top1_err" not in c.epochs[0] and "top1_err" in c.epochs[1]  # eval every 2 epochs
    # the milestone [6] counts epochs here, so the lr never drops
    assert all(r["lr"] == pytest.approx(0.1) for r in c.logs)


def test_iteration_mode_stops_mid_epoch_and_drops_lr_at_milestone():
    cfg = tiny_cfg("train.iterations=7", "train.log_every_iterations=1")
    c = Collect()
    summary = fit(cfg, callbacks=[c])
    assert c.info["total_epochs"] == 2 and summary["iterations"] == 7
    assert [r["iteration"] for r in c.logs] == list(range(1, 8))
    # log record at iteration i holds the lr of the step that started at i-1; milestone 6
    lrs = {r["iteration"]: r["lr"] for r in c.logs}
    assert lrs[6] == pytest.approx(0.1) and lrs[7] == pytest.approx(0.01)
    assert "top1_err" in c.epochs[-1]  # the last (partial) epoch is evaluated


def test_batch_larger_than_dataset_is_a_user_error():
    cfg = tiny_cfg("data.synthetic_train=16")  # batch 32 > 16 images
    with pytest.raises((ConfigError, DataError)) as ei:
        fit(cfg)
    assert isinstance(ei.value, UserError)
    assert "batch" in str(ei.value)
