"""Every shipped job file validates, and the CIFAR jobs carry the paper's recipe (Section 4.2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from resnet_cluster import models
from resnet_cluster.models import jobs

JOBS = Path(__file__).resolve().parents[1] / "jobs"
TABLE6 = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.yaml")), ids=lambda p: p.name)
def test_job_file_validates(path):
    cfg = jobs.load(path)
    assert cfg.model.arch in {m.name for m in models.available()}
    assert cfg.train.batch_size % cfg.scaling.workers == 0


@pytest.mark.parametrize("depth", sorted(TABLE6))
def test_cifar_job_follows_the_paper(depth):
    path = JOBS / f"cifar_r{depth}.yaml"
    cfg = jobs.load(path)
    assert cfg.model.arch == f"cifar_resnet{depth}" and cfg.model.shortcut == "A"
    assert cfg.data.dataset == "cifar10" and cfg.data.augment == "paper"
    assert cfg.train.batch_size == 128 and cfg.train.iterations == 64_000
    assert (cfg.optim.solver, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert cfg.schedule.milestones == [32_000, 48_000] and cfg.schedule.gamma == 0.1
    if depth == 110:
        assert cfg.schedule.warmup.lr == 0.01 and cfg.schedule.warmup.until_train_error == 80
    else:
        assert cfg.schedule.warmup is None
    # the comment names the table row and its published figure
    head = path.read_text().split("\nname:")[0]
    assert "Table 6" in head and re.search(rf"\b{TABLE6[depth]}%", head)


def test_smoke_job_is_small():
    cfg = jobs.load(JOBS / "smoke.yaml")
    assert cfg.data.dataset == "synthetic" and cfg.scaling.workers == 2 and not cfg.scaling.use_gpu
    assert cfg.model.arch == "cifar_resnet20" and 100 <= cfg.train.iterations <= 1000
