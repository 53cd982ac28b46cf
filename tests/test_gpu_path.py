"""The GPU path's logic, checked on the CPU (issue #14): GPU shares, the CUDA check,
determinism, cudnn.benchmark around multi-scale tests, the foreach solvers' operator count,
host syncs in the dynamic BN policy and the synthetic augmentation, memory formats of batches,
the JPEG decoder default, and ImageNet-shaped synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_cluster import config
from resnet_cluster.errors import ConfigError
from resnet_cluster.launch.trainer import scaling_plan

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "smoke.yaml"
CLI = str(Path(sys.executable).parent / "resnet-cluster")


# ---- 1. scaling.gpus_per_worker -------------------------------------------------------------


@pytest.mark.parametrize(
    "sets,words",
    [
        (["scaling.gpus_per_worker=0.5"], ["0.5 with 2 workers", "DDP ranks need whole GPUs", "Duplicate GPU"]),
        (["scaling.gpus_per_worker=2"], ["gpus_per_worker 2", "one GPU", "idle"]),
        (["scaling.gpus_per_worker=1e308"], ["gpus_per_worker 1e+308", "idle"]),
        (["scaling.gpus_per_worker=.inf"], ["scaling.gpus_per_worker", "finite"]),
        (["scaling.gpus_per_worker=.nan"], ["scaling.gpus_per_worker", "finite"]),
        (["scaling.cpus_per_worker=1e308"], ["scaling.cpus_per_worker", "1024"]),
    ],
)
def test_gpu_shares_that_cannot_work_are_refused(sets, words):
    with pytest.raises(ConfigError) as e:
        config.load(SMOKE, ["scaling.use_gpu=true", *sets])
    for w in words:
        assert w in str(e.value), str(e.value)


def test_a_fraction_of_a_gpu_works_for_one_worker_and_cpu_jobs_ignore_the_share():
    one = config.load(SMOKE, ["scaling.use_gpu=true", "scaling.workers=1", "scaling.gpus_per_worker=0.25"])
    assert scaling_plan(one)["resources_per_worker"]["GPU"] == 0.25
    cpu = config.load(SMOKE, ["scaling.gpus_per_worker=0.5"])  # use_gpu false: not asked of Ray
    assert "GPU" not in scaling_plan(cpu)["resources_per_worker"]
    assert config.gpu_share_problem(2, True, 1.0) is None
    assert config.gpu_share_problem(1, True, 0.5) is None
    assert "whole GPUs" in config.gpu_share_problem(2, True, 0.5)


def test_submit_dry_run_json_refuses_an_absurd_share_without_a_traceback():
    proc = subprocess.run(
        [CLI, "submit", str(SMOKE), "--set", "scaling.use_gpu=true", "--set", "scaling.gpus_per_worker=1e308",
         "--dry-run", "--json"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "gpus_per_worker" in proc.stderr
    ok = subprocess.run(
        [CLI, "submit", str(SMOKE), "--set", "scaling.use_gpu=true", "--dry-run", "--json"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["scaling_plan"]["total_resources"]["GPU"] == 2
