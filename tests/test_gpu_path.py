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


# ---- 3. CUDA check; 10. determinism; 8. cudnn.benchmark for multi-scale ----------------------

from resnet_cluster.engine import device as dev  # noqa: E402
from resnet_cluster.errors import DeviceError  # noqa: E402


@pytest.fixture
def restore_torch_flags(monkeypatch):
    monkeypatch.delenv(dev.CUBLAS_ENV, raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1], saved[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path of this machine")
def test_a_gpu_worker_without_usable_cuda_gets_a_message_naming_torch_and_the_driver(tmp_path):
    with pytest.raises(DeviceError) as e:
        dev.setup_device(torch.device("cuda:0"))
    msg = str(e.value)
    assert torch.__version__ in msg and "scaling.use_gpu" in msg
    if torch.version.cuda is None:  # this machine's CPU wheel
        assert "CPU-only build" in msg and "driver" in msg
    dev.setup_device(torch.device("cpu"))  # the CPU needs no check


def test_the_driver_mismatch_message_names_cuda_build_and_driver(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA works here")
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # as a CUDA wheel reports it
    msg = dev.cuda_problem(driver="470.57.02")
    assert "built for CUDA 12.8" in msg and "NVIDIA driver 470.57.02" in msg
    assert "torch.cuda.is_available() is false" in msg and "nvidia-smi" in msg


@pytest.mark.parametrize(
    "text,version",
    [
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
         "GCC version:  gcc version 12.2.0\n", "535.104.05"),
        ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  "
         "(dvs-builder@U16-T02-35-3)  Tue Mar  5 22:23:56 UTC 2024\n", "550.54.15"),
    ],
)
def test_driver_version_from_the_kernel_module_file(tmp_path, text, version):
    f = tmp_path / "version"
    f.write_text(text)
    assert dev.driver_version(str(f)) == version


def test_determinism_switches(restore_torch_flags):
    import os

    dev.setup_device(torch.device("cpu"), deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert os.environ[dev.CUBLAS_ENV] == ":4096:8"
    os.environ[dev.CUBLAS_ENV] = ":16:8"  # the other deterministic setting is kept
    dev.set_determinism(True)
    assert os.environ[dev.CUBLAS_ENV] == ":16:8"
    dev.set_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled()


def test_global_pool_is_adaptive_avg_pool_and_a_deterministic_net_trains(restore_torch_flags):
    from resnet_cluster.models.stages import GlobalAvgPool

    x = torch.randn(2, 4, 7, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    GlobalAvgPool()(x).pow(2).sum().backward()
    torch.nn.AdaptiveAvgPool2d(1)(x2).pow(2).sum().backward()
    torch.testing.assert_close(GlobalAvgPool()(x.detach()), torch.nn.AdaptiveAvgPool2d(1)(x.detach()))
    torch.testing.assert_close(x.grad, x2.grad)
    # a whole job under torch.use_deterministic_algorithms: no op of the CPU path raises, and
    # two runs agree bit for bit
    from resnet_cluster.engine import fit

    cfg = config.load(SMOKE, ["precision.deterministic=true", "scaling.workers=1", "train.iterations=3",
                              "data.synthetic_train=64", "data.synthetic_test=32", "train.batch_size=16",
                              "bn.policy=dynamic"])
    a, b = fit(cfg), fit(cfg)
    assert torch.are_deterministic_algorithms_enabled()
    assert a == b and a["final_top1_err"] is not None


def test_multiscale_scores_run_with_cudnn_benchmark_off_and_restore_it(restore_torch_flags):
    from resnet_cluster.engine.loop import view_scores

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cudnn.benchmark)
            return x.mean((2, 3))

    torch.backends.cudnn.benchmark = True
    view_scores(Probe(), [torch.randn(1, 3, 8, 10), torch.randn(1, 3, 12, 15)])
    assert seen == [False, False] and torch.backends.cudnn.benchmark is True
    view_scores(Probe(), torch.randn(2, 3, 8, 8))  # one-shape batches keep the autotuner
    assert seen[-1] is True
