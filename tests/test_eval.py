"""The evaluator's three batch forms (data contract): one view, V views averaged in softmax
(10-crop), and a list of scales averaged in scores (fully-convolutional multi-scale)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_cluster.engine import WorkerContext, evaluate
from resnet_cluster.engine.loop import view_scores


def fcn(classes: int = 7) -> nn.Module:
    """Fully convolutional: global average pool, so any input size works (as the ResNets)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, classes),
    ).double().eval()


def test_ten_crop_is_the_mean_softmax_of_the_views():
    net = fcn()
    x = torch.randn(4, 10, 3, 9, 9, dtype=torch.float64)
    scores, is_prob = view_scores(net, x)
    want = torch.stack([net(x[:, v]).softmax(1) for v in range(10)]).mean(0)
    assert is_prob and scores.shape == (4, 7)
    torch.testing.assert_close(scores, want)
    torch.testing.assert_close(scores.sum(1), torch.ones(4, dtype=torch.float64))


def test_multiscale_is_the_mean_score_over_scales():
    net = fcn()
    xs = [torch.randn(3, 3, s, s, dtype=torch.float64) for s in (8, 11, 16)]
    scores, is_prob = view_scores(net, xs)
    assert not is_prob
    torch.testing.assert_close(scores, (net(xs[0]) + net(xs[1]) + net(xs[2])) / 3)


def test_evaluate_metrics_follow_the_averaged_scores():
    net = fcn(classes=6)
    torch.manual_seed(1)
    views = [(torch.randn(5, 4, 3, 7, 7, dtype=torch.float64), torch.randint(0, 6, (5,))) for _ in range(3)]
    got = evaluate(net, views, WorkerContext())
    probs = torch.cat([torch.stack([net(x[:, v]).softmax(1) for v in range(4)]).mean(0) for x, _ in views])
    y = torch.cat([y for _, y in views])
    top5 = probs.topk(5, 1).indices
    assert got["test_images"] == 15
    assert got["top1_err"] == pytest.approx(100 * (probs.argmax(1) != y).double().mean().item())
    assert got["top5_err"] == pytest.approx(100 * (~(top5 == y[:, None]).any(1)).double().mean().item())
    assert got["test_loss"] == pytest.approx(F.nll_loss(probs.log(), y).item())

    scales = [([torch.randn(5, 3, s, s, dtype=torch.float64) for s in (6, 9)], torch.randint(0, 6, (5,))) for _ in range(2)]
    got = evaluate(net, scales, WorkerContext())
    logits = torch.cat([(net(a) + net(b)) / 2 for (a, b), _ in scales])
    y = torch.cat([y for _, y in scales])
    assert got["top1_err"] == pytest.approx(100 * (logits.argmax(1) != y).double().mean().item())
    assert got["test_loss"] == pytest.approx(F.cross_entropy(logits, y).item())


def test_one_view_of_a_ten_crop_batch_equals_single_view():
    net = fcn()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 7, (6,))
    single = evaluate(net, [(x, y)], WorkerContext())
    one_view = evaluate(net, [(x[:, None], y)], WorkerContext())
    assert single["top1_err"] == one_view["top1_err"] and single["top5_err"] == one_view["top5_err"]
    assert single["test_loss"] == pytest.approx(one_view["test_loss"])


def test_empty_scale_list_is_an_error():
    with pytest.raises(ValueError, match="at least one scale"):
        view_scores(fcn(), [])
