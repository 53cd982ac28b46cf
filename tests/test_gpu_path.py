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
from resnet_cluster.models import jobs
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
        jobs.load(SMOKE, ["scaling.use_gpu=true", *sets])
    for w in words:
        assert w in str(e.value), str(e.value)


def test_a_fraction_of_a_gpu_works_for_one_worker_and_cpu_jobs_ignore_the_share():
    one = jobs.load(SMOKE, ["scaling.use_gpu=true", "scaling.workers=1", "scaling.gpus_per_worker=0.25"])
    assert scaling_plan(one)["resources_per_worker"]["GPU"] == 0.25
    cpu = jobs.load(SMOKE, ["scaling.gpus_per_worker=0.5"])  # use_gpu false: not asked of Ray
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

    cfg = jobs.load(SMOKE, ["precision.deterministic=true", "scaling.workers=1", "train.iterations=3",
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


# ---- 5. the Caffe/Torch7 solvers as multi-tensor ops -------------------------------------------

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from resnet_cluster.optim.solvers import MomentumSGD  # noqa: E402


class Ops(TorchDispatchMode):
    """Every ATen operator dispatched inside, by name (record_function markers left out)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not str(func).startswith("profiler."):
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _step_ops(opt) -> list[str]:
    opt.step()  # the first step makes the momentum buffers
    with Ops() as ops:
        opt.step()
    return ops.names


def test_caffe_and_torch7_steps_dispatch_as_few_operators_as_foreach_sgd():
    from resnet_cluster import models

    with torch.device("meta"):  # shapes only: the count depends on the tensors, not their values
        net = models.build("resnet152", shortcut="B")
    params = list(net.parameters())
    assert len(params) == 467
    for p in params:
        p.grad = torch.ones_like(p)
    sgd = len(_step_ops(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)))
    for style in ("caffe", "torch7", "pytorch"):
        for nesterov in (False, True) if style != "torch7" else (False,):
            opt = MomentumSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, style=style, nesterov=nesterov,
                              foreach=True)  # what parameters on a GPU get (foreach: None)
            n = len(_step_ops(opt))
            assert n <= 4 * sgd, (style, nesterov, n, sgd)
            assert n <= 6
    # the per-tensor loop (the CPU's default) dispatches 4 per parameter tensor: what a GPU is spared
    each = MomentumSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4, style="caffe")
    assert len(_step_ops(each)) >= 4 * 467


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("style", ["pytorch", "caffe", "torch7"])
def test_multi_tensor_update_equals_the_per_parameter_formula(style, foreach):
    """Parameters of several shapes, one without a gradient at first (its buffer starts a step
    later), and an lr drop: each tensor follows its convention's formula by hand."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (5,), (2, 2, 3)]
    params = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    ref = [p.detach().clone() for p in params]
    buf = [None] * len(params)
    m, wd = 0.9, 0.01
    opt = MomentumSGD(params, lr=0.1, momentum=m, weight_decay=wd, style=style, foreach=foreach)
    for step, lr in enumerate([0.1, 0.1, 0.01, 0.01]):
        for group in opt.param_groups:
            group["lr"] = lr
        for i, p in enumerate(params):
            p.grad = None if (i == 1 and step == 0) else torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            d = p.grad + wd * ref[i]
            if style == "caffe":
                buf[i] = (buf[i] if buf[i] is not None else torch.zeros_like(d)) * m + lr * d
                ref[i] = ref[i] - buf[i]
            else:
                damp = (1 - m) if style == "torch7" else 1.0
                buf[i] = d.clone() if buf[i] is None else buf[i] * m + damp * d
                ref[i] = ref[i] - lr * buf[i]
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)


# ---- 6. no host syncs: dynamic BN, synthetic augmentation ------------------------------------


def _train_ops(model, x) -> list[str]:
    with Ops() as ops:
        model(x).sum().backward()
    return ops.names


def test_dynamic_bn_reads_nothing_back_from_the_device():
    from resnet_cluster import models
    from resnet_cluster.engine.bn import DynamicMomentum, set_bn_momentum

    x = torch.randn(4, 3, 32, 32)
    old = models.build("cifar_resnet20")
    set_bn_momentum(old, None)  # PyTorch's cumulative average: float(num_batches_tracked) per layer
    assert "aten._local_scalar_dense.default" in _train_ops(old, x)  # the check can fail
    new = models.build("cifar_resnet20")
    DynamicMomentum(new)
    for _ in range(3):
        assert "aten._local_scalar_dense.default" not in _train_ops(new, x)


def test_dynamic_bn_compiles_to_one_graph():
    import torch._dynamo
    import torch._dynamo.testing

    from resnet_cluster import models
    from resnet_cluster.engine.bn import DynamicMomentum

    torch._dynamo.reset()
    model = models.build("cifar_resnet20")
    dyn = DynamicMomentum(model)
    counter = torch._dynamo.testing.CompileCounter()
    model.compile(backend=counter)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(3):  # n changes every step: no recompilation either
        model(x).sum().backward()
    dyn.reset()
    model(x).sum().backward()
    assert counter.frame_count == 1
    assert dyn.n == 1
    torch._dynamo.reset()


def test_synthetic_batches_with_augmentation_read_nothing_back():
    from resnet_cluster.data.loaders import build_synthetic_loaders

    train, _, _ = build_synthetic_loaders(augment="paper", batch_size=8, rank=0, world_size=1, seed=0,
                                          synthetic_train=32, synthetic_test=8)
    with Ops() as ops:
        batches = list(train)
    assert len(batches) == 4 and "aten._local_scalar_dense.default" not in ops.names


# ---- 7. batches in the model's memory format, in one pass -------------------------------------


def _same_batches(a, b, channels_last_b: bool = True):
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        views = list(zip(xa, xb)) if isinstance(xa, list) else [(xa, xb)]
        for va, vb in views:
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-6)
            flat = vb.reshape(-1, *vb.shape[-3:])  # 10-crop: [B*10, 3, H, W], as the model sees it
            if channels_last_b:
                assert flat.is_contiguous(memory_format=torch.channels_last)
                assert flat.contiguous(memory_format=torch.channels_last) is flat  # the loop copies nothing
        assert torch.equal(ya, yb)


def test_synthetic_batches_come_channels_last_with_the_same_values():
    from resnet_cluster.data.loaders import build_synthetic_loaders

    common = dict(augment="paper", batch_size=8, rank=0, world_size=1, seed=3, synthetic_train=32,
                  synthetic_test=8)
    a, _, _ = build_synthetic_loaders(**common)
    b, _, _ = build_synthetic_loaders(**common, channels_last=True)
    _same_batches(a, b)


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    from test_imagenet import make_layout, prepare

    root = tmp_path_factory.mktemp("inet-gpu")
    dest = str(root / "dest")
    prepare(make_layout(root / "src", "csv", corrupt=False), dest, max_side=100)
    return dest


@pytest.mark.parametrize("view,augment", [("train", "paper"), ("1crop", "none"), ("10crop", "none"),
                                          ("multiscale", "none")])
def test_jpeg_batches_come_channels_last_with_the_same_values(inet, view, augment):
    from test_imagenet import _loader

    batch = 1 if view == "multiscale" else 3
    a = _loader(inet, train=view == "train", view=view, augment=augment, batch=batch)
    b = _loader(inet, train=view == "train", view=view, augment=augment, batch=batch, channels_last=True)
    _same_batches(a, b)


def test_cifar_shard_batches_with_crops_come_channels_last(tmp_path):
    from test_data import write_archive

    from resnet_cluster.data.cifar import prepare_cifar10
    from resnet_cluster.data.loaders import build_loaders_for

    archive = tmp_path / "c.tar.gz"
    write_archive(archive, bytes_keys=True)
    prepare_cifar10(str(archive), str(tmp_path / "dest"), shard_images=16)

    def cfg(cl: bool):
        return jobs.from_dict({"data": {"dataset": "cifar10", "root": str(tmp_path / "dest")},
                                 "train": {"batch_size": 8, "iterations": 2}, "scaling": {"workers": 1},
                                 "precision": {"channels_last": cl}})

    a, _, _ = build_loaders_for(cfg(False), rank=0, world_size=1)
    b, _, _ = build_loaders_for(cfg(True), rank=0, world_size=1)
    _same_batches(a, b)


# ---- 4. JPEG decoders from cpus_per_worker; test decoders only while evaluating ---------------


def test_decoder_default_follows_the_reserved_cpus():
    from resnet_cluster.data.streaming import default_decoders

    assert [default_decoders(c) for c in (0.5, 1, 2, 8, 11, 22)] == [1, 1, 1, 7, 10, 21]


def test_test_decoders_exist_only_while_evaluating(inet):
    import multiprocessing

    from resnet_cluster.data.loaders import build_loaders_for

    cfg = jobs.from_dict({"data": {"dataset": "imagenet", "root": inet, "augment": "none"},
                            "train": {"batch_size": 2, "iterations": 2},
                            "scaling": {"workers": 1, "cpus_per_worker": 3}})
    train, test, _ = build_loaders_for(cfg, rank=0, world_size=1)
    assert train.loader_workers == test.loader_workers == 2  # 3 CPUs: 2 decoders + training
    before = set(multiprocessing.active_children())
    try:
        train.set_epoch(0)
        next(iter(train))
        decoders = set(multiprocessing.active_children()) - before
        assert len(decoders) == 2  # the training decoders stay for the next epoch
        assert sum(1 for _ in test) == len(test)
        assert set(multiprocessing.active_children()) - before == decoders  # the test ones are gone
    finally:
        train.close()


# ---- data.synthetic_size: ImageNet-shaped synthetic data -------------------------------------


def test_synthetic_data_can_be_imagenet_shaped():
    from resnet_cluster.data.loaders import build_loaders_for
    from resnet_cluster.data.synthetic import make_synthetic

    small = make_synthetic(20, 4, seed=0)
    assert small.train_x.shape == (20, 3, 32, 32)
    big = make_synthetic(20, 4, seed=0, size=224)
    assert big.train_x.shape == (20, 3, 224, 224) and big.train_x.dtype.name == "uint8"
    assert (big.train_y == small.train_y).all()  # the same labels; only the images grow
    cfg = jobs.load(SMOKE, ["data.synthetic_size=224", "data.synthetic_train=16", "data.synthetic_test=4",
                              "train.batch_size=8", "scaling.workers=1", "precision.channels_last=true"])
    train, test, _ = build_loaders_for(cfg, rank=0, world_size=1)
    train.set_epoch(0)
    x, y = next(iter(train))
    assert x.shape == (8, 3, 224, 224) and x.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match="synthetic_size"):
        jobs.load(SMOKE, ["data.synthetic_size=8"])


# ---- benchmarks/gpu_check.py: its jobs and refusals (the whole script: --cpu, see RESULTS.md) ---


@pytest.mark.parametrize("cpu", [False, True])
def test_gpu_check_jobs_validate_and_its_two_rank_job_is_refused(tmp_path, cpu):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    s = gpu_check.settings(cpu)
    job = gpu_check.job(s, tmp_path / "store")
    cfg = jobs.from_dict(job)
    assert cfg.scaling.use_gpu is (not cpu) and cfg.precision.amp == "bf16" and cfg.precision.channels_last
    assert cfg.data.synthetic_size == (64 if cpu else 224) and cfg.model.arch == "resnet50"
    assert cfg.train.batch_size == (8 if cpu else 256)
    two = config.apply_overrides(job, ["scaling.use_gpu=true", "scaling.workers=2", "scaling.gpus_per_worker=0.5",
                                       f"train.batch_size={2 * s['batch']}"])
    with pytest.raises(ConfigError, match="DDP ranks need whole GPUs"):
        jobs.from_dict(two)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path of this machine")
def test_eval_on_a_device_without_cuda_is_one_message(tmp_path):
    from resnet_cluster.engine.evaluation import Loaded, evaluate_loaded
    from resnet_cluster.engine.loop import build_model

    cfg = jobs.load(SMOKE, ["scaling.workers=1"])
    with pytest.raises(DeviceError, match="--device cuda was asked for"):
        evaluate_loaded(Loaded(build_model(cfg), cfg, "x", "model.pt", None), device="cuda")
