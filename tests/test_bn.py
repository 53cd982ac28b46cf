"""BN policies: dynamic momentum 1/(1+n) reset every epoch, precise BN equal to the exact
statistics of the data, SyncBatchNorm conversion (cross-rank precise BN is in
test_eval_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from resnet_cluster.engine import WorkerContext, fit
from resnet_cluster.engine.bn import DynamicMomentum, convert_sync_bn, dynamic_momentum, precise_bn
from resnet_cluster.engine.loop import build_model
from resnet_cluster.errors import ConfigError
from resnet_cluster.models import jobs

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"
TINY = ["scaling.workers=1", "train.batch_size=32", "data.synthetic_train=128", "data.synthetic_test=64",
        "train.iterations=8", "schedule.milestones=[]"]


pytestmark = pytest.mark.usefixtures("one_thread")


def batches(n: int, b: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # a non-zero mean and unequal channel scales, so wrong statistics cannot pass by accident
    scale = torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1)
    return [(torch.randn(b, 3, 6, 6, generator=g) * scale + 2.0, torch.zeros(b, dtype=torch.long)) for _ in range(n)]


def test_dynamic_momentum_values():
    assert [dynamic_momentum(n) for n in range(4)] == [1.0, 0.5, pytest.approx(1 / 3), 0.25]


def test_dynamic_policy_is_the_average_of_this_epochs_batches():
    cfg = jobs.load(SMOKE, [*TINY, "bn.policy=dynamic"])
    model = build_model(cfg)
    DynamicMomentum(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 1.0 for m in bns)  # each forward's stats, averaged by hooks
    fixed = build_model(jobs.load(SMOKE, [*TINY, "bn.momentum=0.3"]))
    assert all(m.momentum == 0.3 for m in fixed.modules() if isinstance(m, nn.BatchNorm2d))

    bn = nn.BatchNorm2d(3)
    dyn = DynamicMomentum(bn)
    data = batches(6)
    for x, _ in data[:3]:  # epoch 0
        bn(x)
    dyn.reset()
    for x, _ in data[3:]:  # epoch 1: only these three batches count
        bn(x)
    bn.eval()(data[0][0])  # a test forward is not a batch of the average
    bn.train()
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x, _ in data[3:]])
    varis = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x, _ in data[3:]])
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, varis.mean(0), rtol=1e-5, atol=1e-6)


def _fit_model(cfg):
    class Keep:
        model = None

        def on_start(self, info): ...

        def on_log(self, record): ...

        def on_epoch_end(self, record, state): ...

        def on_finish(self, summary, model):
            Keep.model = model

    fit(cfg, WorkerContext(), callbacks=[Keep()])
    return Keep.model


def test_fit_resets_the_dynamic_count_every_epoch():
    # 128 images / 32 = 4 iterations per epoch, 8 iterations = 2 epochs: without the reset at
    # each epoch start num_batches_tracked would end at 8.
    model = _fit_model(jobs.load(SMOKE, [*TINY, "bn.policy=dynamic"]))
    counts = {m.num_batches_tracked.item() for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert counts == {4}


def test_precise_bn_equals_exact_dataset_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5)
    ).double()
    data = [(x.double(), y) for x, y in batches(6)]
    before = net[1].num_batches_tracked.item()
    used = precise_bn(net, data, WorkerContext(), num_batches=6)
    assert used == 6
    # the exact statistics of each BN layer's input over all 96 images: layer 1 sees conv1(x);
    # layer 2 sees conv2(relu(bn1(conv1 x))) with bn1 normalising by the batch's own statistics
    # (train mode, as during training), computed here batch by batch with F.batch_norm.
    f = torch.nn.functional
    with torch.no_grad():
        a1 = torch.cat([net[0](x) for x, _ in data])
        a2 = torch.cat(
            [net[3](f.relu(f.batch_norm(net[0](x), None, None, net[1].weight, net[1].bias, training=True))) for x, _ in data]
        )
    for bn, a in ((net[1], a1), (net[4], a2)):
        flat = a.transpose(0, 1).reshape(a.shape[1], -1)
        torch.testing.assert_close(bn.running_mean, flat.mean(1), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(bn.running_var, flat.var(1, unbiased=True), rtol=1e-10, atol=1e-10)
    assert net[1].num_batches_tracked.item() == before  # bookkeeping untouched
    assert net[1].momentum == 0.1 and net.training


def test_precise_bn_uses_only_n_batches():
    net = nn.BatchNorm2d(3).double()
    data = [(x.double(), y) for x, y in batches(6)]
    assert precise_bn(net, data, WorkerContext(), num_batches=2) == 2
    first = torch.cat([x for x, _ in data[:2]]).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(net.running_mean, first.mean(1))
    # the channel scales 1, 3, 0.5 of the generator come back as variances 1, 9, 0.25
    assert net.running_var.tolist() == pytest.approx([1, 9, 0.25], rel=0.15)


def test_fit_with_precise_bn_sets_the_final_running_stats():
    cfg = jobs.load(SMOKE, [*TINY, "bn.precise_batches=2", "data.augment=none"])
    model = _fit_model(cfg)
    # recompute: the same two first batches of the last epoch, on the final weights
    from resnet_cluster.data.loaders import build_loaders_for

    train, _, _ = build_loaders_for(cfg, rank=0, world_size=1)
    train.set_epoch(1)
    ref = build_model(cfg)
    ref.load_state_dict(model.state_dict())
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(123.0)
    precise_bn(ref, train, WorkerContext(), num_batches=2)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        if "running" in name:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_sync_bn_conversion_keeps_state_dict_and_needs_gpu():
    cfg = jobs.load(SMOKE, TINY)
    model = build_model(cfg)
    synced = convert_sync_bn(build_model(cfg))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    assert list(synced.state_dict()) == list(model.state_dict())
    synced.load_state_dict(model.state_dict())
    synced.eval()
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(synced(x), model(x))  # eval mode runs on the CPU too
    with pytest.raises(ConfigError, match="bn.sync"):
        jobs.load(SMOKE, [*TINY, "bn.sync=true"])
