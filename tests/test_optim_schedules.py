"""Plateau, cosine and linear warm-up schedules, the linear scaling rule's lr, and their
checkpointable state (multistep and constant warm-up are in test_optim.py)."""

from __future__ import annotations

import math

import pytest

from resnet_cluster.errors import ConfigError
from resnet_cluster.models.jobs import from_dict
from resnet_cluster.optim import LRSchedule


def sched(iters_per_epoch: int | None = None, **sections) -> LRSchedule:
    data = {"model": {"arch": "cifar_resnet20"}, "train": {"iterations": 1000}}
    data.update(sections)
    return LRSchedule.from_config(from_dict(data), iters_per_epoch=iters_per_epoch)


# ---------------------------------------------------------------------------- plateau
def plateau(**kw) -> LRSchedule:
    return sched(optim={"lr": 0.1}, schedule={"policy": "plateau", "gamma": 0.1, **kw})


def test_plateau_drops_after_patience_evaluations_without_improvement():
    s = plateau(patience=2, threshold=0.5)
    lrs, drops = [], []
    # improvements of >= 0.5 points reset the count; 40.2 and 40.0 are not improvements on
    # 40.3 by 0.5, nor is 39.9; the third non-improvement (> patience 2) drops the lr.
    for err in [60.0, 50.0, 40.3, 40.2, 40.0, 39.9, 39.95, 30.0, 31, 32, 33]:
        drops.append(s.observe_test_error(err))
        lrs.append(s.lr(10**5, 99))
    assert drops == [False, False, False, False, False, True, False, False, False, False, True]
    assert lrs[:5] == [0.1] * 5
    assert lrs[5:10] == pytest.approx([0.01] * 5)
    assert lrs[10] == pytest.approx(0.001)
    assert s.best_err == 30.0


def test_plateau_zero_patience_and_min_lr():
    s = plateau(patience=0, threshold=0.0, min_lr=0.001)
    s.observe_test_error(50.0)
    assert s.observe_test_error(50.0)  # not strictly better: drop at once
    assert s.lr(0, 0) == pytest.approx(0.01)
    assert s.observe_test_error(50.0)
    assert s.lr(0, 0) == pytest.approx(0.001)
    assert not s.observe_test_error(50.0)  # already at min_lr: no further drop
    assert s.lr(0, 0) == pytest.approx(0.001)


def test_plateau_state_round_trip_continues_identically():
    a = plateau(patience=1, threshold=0.0)
    for err in (50.0, 49.0, 49.5):
        a.observe_test_error(err)
    b = plateau(patience=1, threshold=0.0)
    b.load_state_dict(a.state_dict())
    assert a.state_dict() == {"warmup_done": True, "best_err": 49.0, "bad_evals": 1, "drops": 0}
    assert a.observe_test_error(49.2) and b.observe_test_error(49.2)
    assert a.lr(0, 0) == b.lr(0, 0) == pytest.approx(0.01)


def test_plateau_with_milestones_is_refused():
    with pytest.raises(ConfigError, match="milestones"):
        plateau(milestones=[100])


def test_other_policies_ignore_test_error():
    s = sched(optim={"lr": 0.1}, schedule={"milestones": [500]})
    for _ in range(10):
        assert not s.observe_test_error(50.0)
    assert s.lr(0, 0) == 0.1


# ---------------------------------------------------------------------------- cosine
def test_cosine_by_iterations():
    s = sched(optim={"lr": 0.2}, schedule={"policy": "cosine", "min_lr": 0.0})
    assert s.lr(0, 0) == pytest.approx(0.2)
    assert s.lr(500, 0) == pytest.approx(0.1)
    assert s.lr(250, 0) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    assert s.lr(1000, 0) == pytest.approx(0.0, abs=1e-12)


def test_cosine_in_epochs_needs_iters_per_epoch_and_ends_at_min_lr():
    s = sched(iters_per_epoch=10, train={"epochs": 20}, optim={"lr": 0.1},
              schedule={"policy": "cosine", "min_lr": 0.001})
    assert s.total_iterations == 200
    assert s.lr(100, 10) == pytest.approx(0.001 + 0.5 * 0.099)
    assert s.lr(200, 20) == pytest.approx(0.001)


def test_cosine_after_linear_warmup():
    s = sched(optim={"lr": 0.1}, schedule={"policy": "cosine", "warmup": {"policy": "linear", "iterations": 100}})
    assert s.lr(0, 0) == 0.0
    assert s.lr(50, 0) == pytest.approx(0.05)
    assert s.lr(100, 0) == pytest.approx(0.1)  # cosine starts at the end of the warm-up
    assert s.lr(550, 0) == pytest.approx(0.05)


# ---------------------------------------------------------------------------- linear warm-up, scaling
def test_goyal_linear_warmup_with_linear_scaling():
    # batch 1024 over 32 workers: lr 0.1*1024/256 = 0.4, reached linearly over 5 epochs from 0.1
    s = sched(
        iters_per_epoch=100,
        train={"epochs": 90, "batch_size": 1024},
        scaling={"workers": 32},
        optim={"lr": 0.1, "scale_lr_with_batch": True},
        schedule={"milestones": [30, 60, 80], "warmup": {"policy": "linear", "epochs": 5}},
    )
    assert s.base_lr == pytest.approx(0.4) and s.warmup_iterations == 500
    assert s.lr(0, 0) == pytest.approx(0.1)
    assert s.lr(250, 2) == pytest.approx(0.25)
    assert s.lr(499, 4) == pytest.approx(0.1 + 0.3 * 499 / 500)
    assert s.lr(500, 5) == pytest.approx(0.4)
    assert s.warmup_done
    assert s.lr(3000, 30) == pytest.approx(0.04)
    assert s.lr(8000, 80) == pytest.approx(0.0004)


def test_linear_warmup_from_explicit_lr_and_state():
    s = sched(optim={"lr": 0.1}, schedule={"warmup": {"policy": "linear", "lr": 0.02, "iterations": 4}})
    assert [s.lr(i, 0) for i in range(5)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert s.state_dict() == {"warmup_done": True}


@pytest.mark.parametrize(
    "warmup, match",
    [
        ({"policy": "linear", "lr": 0.0}, "iterations, epochs"),
        ({"policy": "linear", "until_train_error": 80, "iterations": 5}, "until_train_error"),
        ({"policy": "constant", "iterations": 5}, "needs lr"),
        ({"policy": "constant", "lr": 0.01, "epochs": 1}, "epochs"),
    ],
)
def test_bad_warmups_are_refused(warmup, match):
    with pytest.raises(ConfigError, match=match):
        sched(schedule={"warmup": warmup})
