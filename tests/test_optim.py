"""SGD (PyTorch momentum convention) and the per-iteration lr schedule with warm-up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resnet_cluster.config import OptimConfig
from resnet_cluster.models.jobs import from_dict
from resnet_cluster.optim import LRSchedule, build_optimizer


class OneParam(nn.Module):
    def __init__(self, w0: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w0], dtype=torch.float64))


def sgd_step(model: OneParam, opt: torch.optim.Optimizer, grad_coef: float, lr: float | None = None) -> float:
    """One step on loss = grad_coef * w (so the loss gradient is grad_coef)."""
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    (grad_coef * model.w).sum().backward()
    opt.step()
    return model.w.item()


# ---------------------------------------------------------------------------- SGD
def test_sgd_three_steps_hand_computed():
    # lr 0.1, momentum 0.9, weight decay 0.01, loss = 3*w, w0 = 1.
    # PyTorch: d = g + wd*w ; v = m*v + d (v = d at the first step) ; w -= lr*v
    model = OneParam(1.0)
    opt = build_optimizer(OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.01), model)
    # step 1: d = 3 + 0.01*1 = 3.01 ; v = 3.01 ; w = 1 - 0.301 = 0.699
    assert sgd_step(model, opt, 3.0) == pytest.approx(0.699, abs=1e-12)
    # step 2: d = 3 + 0.00699 = 3.00699 ; v = 0.9*3.01 + 3.00699 = 5.71599 ; w = 0.699 - 0.571599
    assert sgd_step(model, opt, 3.0) == pytest.approx(0.127401, abs=1e-12)
    # step 3: d = 3.00127401 ; v = 0.9*5.71599 + 3.00127401 = 8.14566501 ; w = 0.127401 - 0.814566501
    assert sgd_step(model, opt, 3.0) == pytest.approx(-0.687165501, abs=1e-12)
    buf = opt.state[model.w]["momentum_buffer"].item()
    assert buf == pytest.approx(8.14566501, abs=1e-12)


def test_sgd_lr_change_uses_pytorch_not_caffe_convention():
    # After an lr drop PyTorch keeps v (unscaled by lr) and applies the new lr to all of it;
    # Caffe would have kept lr_old*v in its buffer.
    model = OneParam(0.0)
    opt = build_optimizer(OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.0), model)
    w1 = sgd_step(model, opt, 1.0, lr=0.1)  # v = 1 ; w = -0.1
    assert w1 == pytest.approx(-0.1, abs=1e-12)
    w2 = sgd_step(model, opt, 1.0, lr=0.01)  # v = 1.9 ; w = -0.1 - 0.019
    assert w2 == pytest.approx(-0.119, abs=1e-12)
    caffe_w2 = -0.1 - (0.9 * 0.1 * 1 + 0.01 * 1)  # v_caffe = m*lr_old*g + lr_new*g = 0.1
    assert w2 != pytest.approx(caffe_w2, abs=1e-6)


def test_build_optimizer_decays_every_parameter():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    opt = build_optimizer(OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True), model)
    assert isinstance(opt, torch.optim.SGD)
    assert len(opt.param_groups) == 1
    g = opt.param_groups[0]
    assert g["lr"] == 0.05 and g["momentum"] == 0.9 and g["weight_decay"] == 1e-4 and g["nesterov"] is True
    assert g["dampening"] == 0
    assert {id(p) for p in g["params"]} == {id(p) for p in model.parameters()}


# ---------------------------------------------------------------------------- schedules
def schedule(**sections) -> LRSchedule:
    data = {"model": {"arch": "cifar_resnet20"}}
    data.update(sections)
    return LRSchedule.from_config(from_dict(data))


def test_multistep_in_iterations_paper_cifar():
    s = schedule(
        train={"iterations": 64000},
        optim={"lr": 0.1},
        schedule={"policy": "multistep", "milestones": [32000, 48000], "gamma": 0.1},
    )
    assert s.unit == "iterations" and s.warmup_done
    cases = {0: 0.1, 1: 0.1, 31999: 0.1, 32000: 0.01, 32001: 0.01, 47999: 0.01, 48000: 0.001, 63999: 0.001}
    for it, lr in cases.items():
        assert s.lr(it, epoch=999) == pytest.approx(lr, rel=1e-12), it  # the epoch is ignored


def test_multistep_in_epochs():
    s = schedule(
        train={"epochs": 90},
        optim={"lr": 0.1},
        schedule={"policy": "multistep", "milestones": [30, 60], "gamma": 0.1},
    )
    assert s.unit == "epochs"
    for ep, lr in {0: 0.1, 29: 0.1, 30: 0.01, 59: 0.01, 60: 0.001, 89: 0.001}.items():
        assert s.lr(iteration=10**6, epoch=ep) == pytest.approx(lr, rel=1e-12), ep  # iteration ignored


def test_gamma_other_than_ten():
    s = schedule(train={"iterations": 100}, optim={"lr": 0.2}, schedule={"milestones": [10], "gamma": 0.5})
    assert s.lr(9, 0) == pytest.approx(0.2) and s.lr(10, 0) == pytest.approx(0.1)


def test_constant_ignores_milestones():
    s = schedule(train={"iterations": 100}, optim={"lr": 0.05}, schedule={"policy": "constant", "milestones": [10]})
    assert all(s.lr(it, ep) == 0.05 for it, ep in [(0, 0), (10, 0), (99, 5), (10**6, 10**3)])


def test_no_milestones_is_constant():
    s = schedule(train={"iterations": 100}, optim={"lr": 0.1})
    assert s.lr(0, 0) == 0.1 and s.lr(99, 0) == 0.1


def test_warmup_by_iterations_gcr():
    # gcr/torch-residual-networks: 0.001 for the first 400 iterations, then 0.1
    s = schedule(
        train={"iterations": 64000},
        optim={"lr": 0.1},
        schedule={"milestones": [32000, 48000], "warmup": {"lr": 0.001, "iterations": 400}},
    )
    assert not s.warmup_done
    assert s.lr(0, 0) == 0.001
    assert s.lr(399, 0) == 0.001
    s.observe_train_error(1.0)  # no error threshold: the error does not end this warm-up
    assert s.lr(399, 0) == 0.001 and not s.warmup_done
    assert s.lr(400, 1) == pytest.approx(0.1)
    assert s.warmup_done
    assert s.lr(32000, 80) == pytest.approx(0.01)


def test_warmup_by_training_error_paper_resnet110():
    # paper: ResNet-110 uses 0.01 until the training error is below 80%, then 0.1
    s = schedule(
        model={"arch": "cifar_resnet110"},
        train={"iterations": 64000},
        optim={"lr": 0.1},
        schedule={"milestones": [32000, 48000], "warmup": {"lr": 0.01, "until_train_error": 80}},
    )
    assert s.lr(0, 0) == 0.01
    s.observe_train_error(85.0)
    assert s.lr(200, 0) == 0.01
    s.observe_train_error(80.0)  # "below 80%": 80 itself is not below
    assert s.lr(300, 0) == 0.01
    assert s.lr(10_000, 25) == 0.01  # no iteration cap: still warming up while the error is high
    s.observe_train_error(79.0)
    assert s.warmup_done
    assert s.lr(10_001, 25) == pytest.approx(0.1)
    s.observe_train_error(95.0)  # once over, the warm-up never comes back
    assert s.lr(10_002, 25) == pytest.approx(0.1)
    assert s.lr(32000, 80) == pytest.approx(0.01)


def test_warmup_error_with_iteration_cap():
    s = schedule(
        train={"iterations": 1000},
        optim={"lr": 0.1},
        schedule={"warmup": {"lr": 0.01, "until_train_error": 80, "iterations": 400}},
    )
    s.observe_train_error(90.0)
    assert s.lr(399, 0) == 0.01
    assert s.lr(400, 0) == pytest.approx(0.1)  # the cap ends it even though the error is high


def test_state_dict_round_trip():
    sections = dict(
        train={"iterations": 1000},
        optim={"lr": 0.1},
        schedule={"milestones": [500], "warmup": {"lr": 0.01, "until_train_error": 80}},
    )
    s = schedule(**sections)
    fresh = schedule(**sections)
    fresh.load_state_dict(s.state_dict())
    assert fresh.lr(100, 0) == 0.01  # not yet done: still warming up after the round trip

    s.observe_train_error(50.0)
    state = s.state_dict()
    assert state == {"warmup_done": True}
    restored = schedule(**sections)
    assert restored.lr(100, 0) == 0.01
    restored.load_state_dict(state)
    assert restored.warmup_done
    assert restored.lr(100, 0) == pytest.approx(0.1)
    assert restored.lr(500, 5) == pytest.approx(0.01)
