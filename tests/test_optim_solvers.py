"""Every solver and SGD momentum convention against updates computed by hand, over several
steps and across an lr change (where the conventions differ); weight-decay groups; the linear
scaling rule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from resnet_cluster.config import OptimConfig
from resnet_cluster.models.jobs import from_dict
from resnet_cluster.optim import MomentumSGD, build_optimizer, param_groups, scaled_lr


class OneParam(nn.Module):
    def __init__(self, w0: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w0], dtype=torch.float64))


def run(opt_cfg: OptimConfig, w0: float, grads: list[float], lrs: list[float]) -> list[float]:
    """Steps on loss = g_t * w (gradient g_t), setting lr_t before each step as the schedule
    does; returns w after each step."""
    model = OneParam(w0)
    opt = build_optimizer(opt_cfg, model)
    out = []
    for g, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        (g * model.w).sum().backward()
        opt.step()
        out.append(model.w.item())
    return out


LRS = [0.1, 0.1, 0.01, 0.01]  # a /10 drop after two steps
G = 2.0


def sgd(style: str, **kw) -> OptimConfig:
    return OptimConfig(solver="sgd", momentum=0.9, weight_decay=0.01, momentum_style=style, **kw)


def test_pytorch_style_by_hand():
    # d = g + wd*w ; v = m*v + d (v = d first) ; w -= lr*v
    w, v, want = 1.0, None, []
    for lr in LRS:
        d = G + 0.01 * w
        v = d if v is None else 0.9 * v + d
        w -= lr * v
        want.append(w)
    assert want[0] == pytest.approx(1 - 0.1 * 2.01, abs=1e-15)  # 0.799
    got = run(sgd("pytorch"), 1.0, [G] * 4, LRS)
    assert got == pytest.approx(want, abs=1e-12)


def test_caffe_style_by_hand_across_lr_drop():
    # Caffe: v = m*v + lr*d ; w -= v. Literal numbers worked out on paper:
    # s1 lr .1 : d = 2.01                 v = 0.201                     w = 0.799
    # s2 lr .1 : d = 2.00799              v = 0.1809 + 0.200799         w = 0.417301
    # s3 lr .01: d = 2.00417301           v = 0.3435291 + 0.0200417301  w = 0.0537301699
    got = run(sgd("caffe"), 1.0, [G] * 3, LRS[:3])
    assert got == pytest.approx([0.799, 0.417301, 0.0537301699], abs=1e-12)
    # PyTorch after the same drop: v = 0.9*3.81699 + 2.00417301 = 5.43946401, w = 0.417301 - 0.0543946401
    py = run(sgd("pytorch"), 1.0, [G] * 3, LRS[:3])
    assert py[:2] == pytest.approx(got[:2], abs=1e-12)  # identical while lr is constant
    assert py[2] == pytest.approx(0.3629063599, abs=1e-12)
    assert abs(py[2] - got[2]) > 0.3  # caffe's buffer still carries the old lr


def test_torch7_dampening_by_hand():
    # Torch7 optim.sgd, dampening = momentum: v = d first, then v = m*v + (1-m)*d ; w -= lr*v
    # wd 0, g = 1, w0 = 0: v = 1, 1, 1 ... ; w = -0.1, -0.2, -0.21, -0.22
    cfg = OptimConfig(solver="sgd", momentum=0.9, weight_decay=0.0, momentum_style="torch7")
    assert run(cfg, 0.0, [1.0] * 4, LRS) == pytest.approx([-0.1, -0.2, -0.21, -0.22], abs=1e-12)
    # a changing gradient: g = 1 then 3: v = 1, then 0.9*1 + 0.1*3 = 1.2 ; w = -0.1, -0.22
    assert run(cfg, 0.0, [1.0, 3.0], [0.1, 0.1]) == pytest.approx([-0.1, -0.22], abs=1e-12)


def test_nesterov_pytorch_equals_torch_sgd():
    torch_model = OneParam(1.0)
    ref = torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    want = []
    for g, lr in zip([G, -1.0, 3.0, 0.5], LRS):
        ref.param_groups[0]["lr"] = lr
        ref.zero_grad()
        (g * torch_model.w).sum().backward()
        ref.step()
        want.append(torch_model.w.item())
    # and by hand for the first step: v = d = 2.01 ; w -= lr*(d + m*v) = 0.1*(2.01*1.9)
    assert want[0] == pytest.approx(1 - 0.1 * 2.01 * 1.9, abs=1e-12)
    assert run(sgd("pytorch", nesterov=True), 1.0, [G, -1.0, 3.0, 0.5], LRS) == pytest.approx(want, abs=1e-12)


def test_nesterov_caffe_by_hand():
    # Caffe NesterovSolver: v_new = m*v + lr*d ; w -= (1+m)*v_new - m*v_old
    w, v, want = 1.0, 0.0, []
    for lr in LRS:
        d = G + 0.01 * w
        v_new = 0.9 * v + lr * d
        w -= 1.9 * v_new - 0.9 * v
        v = v_new
        want.append(w)
    assert run(sgd("caffe", nesterov=True), 1.0, [G] * 4, LRS) == pytest.approx(want, abs=1e-12)


def test_no_momentum_is_plain_sgd_in_every_style():
    for style in ("pytorch", "caffe", "torch7"):
        cfg = OptimConfig(solver="sgd", momentum=0.0, weight_decay=0.0, momentum_style=style)
        assert run(cfg, 0.0, [1.0, 1.0], [0.1, 0.01]) == pytest.approx([-0.1, -0.11], abs=1e-12), style


def test_rmsprop_by_hand():
    # Torch7/PyTorch: ms = a*ms + (1-a)*g^2 ; w -= lr*g/(sqrt(ms)+eps), a = 0.99, eps = 1e-8
    cfg = OptimConfig(solver="rmsprop", lr=0.01, weight_decay=0.0)
    ms1 = 0.01 * 4
    ms2 = 0.99 * ms1 + 0.01 * 1
    w1 = 1 - 0.01 * 2 / (math.sqrt(ms1) + 1e-8)  # 0.9
    w2 = w1 - 0.001 * -1 / (math.sqrt(ms2) + 1e-8)  # lr dropped to 0.001, g = -1
    assert w1 == pytest.approx(0.9, abs=1e-7)  # eps 1e-8 shifts the 8th digit
    assert run(cfg, 1.0, [2.0, -1.0], [0.01, 0.001]) == pytest.approx([w1, w2], abs=1e-12)


def test_adagrad_by_hand():
    # s += g^2 ; w -= lr*g/(sqrt(s)+1e-10)
    cfg = OptimConfig(solver="adagrad", lr=0.1, weight_decay=0.0)
    w1 = 1 - 0.1 * 2 / (2 + 1e-10)
    w2 = w1 - 0.1 * 2 / (math.sqrt(8) + 1e-10)
    w3 = w2 - 0.1 * 1 / (math.sqrt(9) + 1e-10)
    assert run(cfg, 1.0, [2.0, 2.0, 1.0], [0.1] * 3) == pytest.approx([w1, w2, w3], abs=1e-12)


def test_adadelta_by_hand_gcr_rho():
    # Zeiler: sq = rho*sq + (1-rho)*g^2 ; dx = sqrt(acc+eps)/sqrt(sq+eps)*g ;
    # acc = rho*acc + (1-rho)*dx^2 ; w -= lr*dx   (rho 0.3 as gcr's ResNet-20, eps 1e-6, lr 1)
    cfg = OptimConfig(solver="adadelta", lr=1.0, rho=0.3, weight_decay=0.0)
    w, sq, acc, want = 1.0, 0.0, 0.0, []
    for g in (2.0, -1.0, 0.5):
        sq = 0.3 * sq + 0.7 * g * g
        dx = math.sqrt(acc + 1e-6) / math.sqrt(sq + 1e-6) * g
        acc = 0.3 * acc + 0.7 * dx * dx
        w -= dx
        want.append(w)
    assert run(cfg, 1.0, [2.0, -1.0, 0.5], [1.0] * 3) == pytest.approx(want, abs=1e-12)


def test_solver_weight_decay_enters_the_gradient():
    # rmsprop with wd 0.5 at w = 1, g = 1: the effective gradient is 1.5
    cfg = OptimConfig(solver="rmsprop", lr=0.01, weight_decay=0.5)
    want = 1 - 0.01 * 1.5 / (math.sqrt(0.01 * 1.5**2) + 1e-8)
    assert run(cfg, 1.0, [1.0], [0.01]) == pytest.approx([want], abs=1e-12)


def test_optimizer_types_and_hyperparameters():
    m = OneParam(0.0)
    assert isinstance(build_optimizer(OptimConfig(), m), torch.optim.SGD)
    assert isinstance(build_optimizer(OptimConfig(momentum_style="caffe"), m), MomentumSGD)
    r = build_optimizer(OptimConfig(solver="rmsprop", alpha=0.9, eps=1e-6), m)
    assert isinstance(r, torch.optim.RMSprop) and r.param_groups[0]["alpha"] == 0.9 and r.param_groups[0]["eps"] == 1e-6
    assert build_optimizer(OptimConfig(solver="adagrad"), m).param_groups[0]["eps"] == 1e-10
    d = build_optimizer(OptimConfig(solver="adadelta", rho=0.3), m)
    assert d.param_groups[0]["rho"] == 0.3 and d.param_groups[0]["eps"] == 1e-6


def test_momentum_sgd_state_dict_round_trip():
    a, b = OneParam(1.0), OneParam(1.0)
    oa = MomentumSGD(a.parameters(), lr=0.1, style="caffe")
    for _ in range(2):
        oa.zero_grad()
        (2 * a.w).sum().backward()
        oa.step()
    ob = MomentumSGD(b.parameters(), lr=0.1, style="caffe")
    b.w.data.copy_(a.w.data)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as a checkpoint file would
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad()
        (2 * m.w).sum().backward()
        o.step()
    assert a.w.item() == b.w.item()


# ---------------------------------------------------------------------------- decay groups
def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_decay_bn_and_bias_false_splits_groups():
    net = small_net()
    groups = param_groups(net, 1e-4, decay_bn_and_bias=False)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert decay == {id(net[0].weight), id(net[3].weight)}
    assert no_decay == {id(net[1].weight), id(net[1].bias), id(net[3].bias)}
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert len(param_groups(net, 1e-4, decay_bn_and_bias=True)) == 1


@pytest.mark.parametrize("style", ["pytorch", "caffe"])
def test_no_decay_params_do_not_move_with_zero_gradient(style):
    net = small_net()
    opt = build_optimizer(OptimConfig(lr=0.1, weight_decay=0.1, decay_bn_and_bias=False, momentum_style=style), net)
    gamma0, w0 = net[1].weight.detach().clone(), net[0].weight.detach().clone()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(net[1].weight, gamma0)  # BN gamma: no decay
    assert torch.allclose(net[0].weight, w0 * (1 - 0.1 * 0.1))  # conv weight decays: w -= lr*wd*w


# ---------------------------------------------------------------------------- linear scaling
def test_linear_scaling_rule():
    base = {"model": {"arch": "cifar_resnet20"}, "train": {"iterations": 10}}
    cfg = from_dict({**base, "train": {"iterations": 10, "batch_size": 1024}, "scaling": {"workers": 8},
                     "optim": {"lr": 0.1, "scale_lr_with_batch": True}})
    assert scaled_lr(cfg) == pytest.approx(0.4)  # Goyal et al.: 0.1 * 1024/256
    cfg = from_dict({**base, "train": {"iterations": 10, "batch_size": 1024}, "scaling": {"workers": 8},
                     "optim": {"lr": 0.1}})
    assert scaled_lr(cfg) == 0.1  # off by default


def test_nesterov_with_torch7_or_other_solver_is_refused():
    from resnet_cluster.errors import ConfigError

    for optim in ({"nesterov": True, "momentum_style": "torch7"}, {"nesterov": True, "solver": "rmsprop"}):
        with pytest.raises(ConfigError, match="nesterov"):
            from_dict({"train": {"iterations": 10}, "optim": optim})
