"""Distributed evaluation with real ``torch.distributed`` gloo process groups (2 and 3 ranks,
spawned processes, no Ray): exact totals on an odd-sized test set for single-view, 10-crop and
multi-scale batches; precise BN over all ranks equals the single-process statistics of the
union; the plateau schedule decides identically on every rank."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from resnet_cluster.data.loaders import ImageBatches
from resnet_cluster.engine import WorkerContext, evaluate
from resnet_cluster.engine.bn import precise_bn

N_TEST = 103  # prime: not divisible by 2 or 3, and not by the per-rank batch of 8
BATCH = 8


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    ).double()


def data():
    g = torch.Generator().manual_seed(42)
    images = torch.randint(0, 256, (N_TEST, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (N_TEST,), generator=g)
    views = torch.randn(N_TEST, 4, 3, 6, 6, generator=g, dtype=torch.float64)  # 4 "crops" each
    train = torch.randn(48, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 1  # 6 batches of 8
    return images, labels, views, train


def shard_batches(x, y, rank, world):
    """Rank r takes r::world and keeps the last partial batch, as the data side's eval mode."""
    idx = torch.arange(rank, x.shape[0], world)
    return [(x[idx[i : i + BATCH]], y[idx[i : i + BATCH]]) for i in range(0, len(idx), BATCH)]


def run_all(ctx: WorkerContext) -> dict:
    from resnet_cluster.models.jobs import from_dict
    from resnet_cluster.optim import LRSchedule

    images, labels, views, train = data()
    model = net().eval()
    mean = images.float().mean(0)
    single = ImageBatches(images, labels, batch_size=BATCH, rank=ctx.rank, world_size=ctx.world_size, seed=0,
                          train=False, augment=False, mean=mean)
    out = {"num_samples": single.num_samples}
    out["single"] = evaluate(model, ((x.double(), y) for x, y in single), ctx)
    out["tencrop"] = evaluate(model, shard_batches(views, labels, ctx.rank, ctx.world_size), ctx)
    scales = [((v[:, 0], v[:, 1, :, :4, :4], v[:, 2, :, :5, :5]), y)
              for v, y in shard_batches(views, labels, ctx.rank, ctx.world_size)]
    out["multiscale"] = evaluate(model, scales, ctx)
    # precise BN: 6 batches of 8 split over the ranks (world 1: all 6; world 2: 3 each; 3: 2)
    per_rank = 6 // ctx.world_size
    mine = [(train[(r * ctx.world_size + ctx.rank) * 8 : (r * ctx.world_size + ctx.rank + 1) * 8], None)
            for r in range(per_rank)]
    pb = net()
    precise_bn(pb, mine, ctx, per_rank)
    out["bn"] = (pb[1].running_mean.clone(), pb[1].running_var.clone())
    # plateau: every rank feeds the all-reduced error it got and must reach the same lr
    sched = LRSchedule.from_config(from_dict({"train": {"iterations": 10},
                                              "schedule": {"policy": "plateau", "patience": 0}}))
    for err in (out["single"]["top1_err"], out["single"]["top1_err"], out["tencrop"]["top1_err"]):
        sched.observe_test_error(err)
    out["lr"] = sched.lr(0, 0)
    return out


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        torch.save(run_all(WorkerContext(rank=rank, world_size=world)), os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    return run_all(WorkerContext())


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_totals_are_exact(world, tmp_path, reference):
    mp.start_processes(_worker, args=(world, str(tmp_path)), nprocs=world, join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    assert sum(r["num_samples"] for r in results) == N_TEST  # the shards cover the set once
    assert reference["single"]["test_images"] == N_TEST
    for res in results:
        for key in ("single", "tencrop", "multiscale"):
            got, want = res[key], reference[key]
            assert got["test_images"] == N_TEST, key
            # counts are integers: the error rates must match exactly, the loss to rounding
            assert got["top1_err"] == want["top1_err"] and got["top5_err"] == want["top5_err"], key
            assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-12), key
        torch.testing.assert_close(res["bn"][0], reference["bn"][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["bn"][1], reference["bn"][1], rtol=1e-12, atol=1e-12)
        assert res["lr"] == results[0]["lr"] == reference["lr"]
    # the reference is not degenerate: errors strictly between 0 and 100, views disagree
    assert 0 < reference["single"]["top1_err"] < 100
    assert reference["tencrop"]["top1_err"] != reference["multiscale"]["top1_err"] or (
        reference["tencrop"]["test_loss"] != reference["multiscale"]["test_loss"]
    )
