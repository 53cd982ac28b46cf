"""Elastic training without Ray: the job keys, the step plan, the data's micro-batch slots, and
the recipe's exactness with real ``torch.distributed`` gloo process groups (spawned processes).

The property (issue #13): a run resized N -> W -> N makes the same sequence of updates as a run
that never resized, up to floating-point reduction order. Here N = 2: a 2-rank DDP reference,
a 1-process run accumulating 2 micro-batches per step, and a run that checkpoints mid-epoch
and resumes 2 -> 1 -> 2 ranks end with the same weights within 1e-5. Mid-epoch resume serves
each image exactly once per epoch, checked by id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from resnet_cluster import config
from resnet_cluster.config import apply_overrides
from resnet_cluster.data.loaders import ImageBatches
from resnet_cluster.engine import Callback, WorkerContext, fit
from resnet_cluster.engine import checkpoint as ckpt
from resnet_cluster.engine.accumulation import StepPlan, usable_world_size
from resnet_cluster.errors import ConfigError
from resnet_cluster.launch.trainer import scaling_plan
from resnet_cluster.models import jobs
from resnet_cluster.models.jobs import from_dict

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "smoke.yaml"
# 128 synthetic training images, global batch 32 = 2 x 16: 4 steps per epoch, 3 epochs.
TINY = ["train.batch_size=32", "data.synthetic_train=128", "data.synthetic_test=64", "train.iterations=null",
        "train.epochs=3", "train.log_every_iterations=2", "schedule.milestones=[2]", "checkpoint.every_iterations=3"]


def tiny(workers="2", *extra: str) -> config.JobConfig:
    return jobs.load(SMOKE, [*TINY, f"scaling.workers={workers}", *extra])


# ---------------------------------------------------------------------------- the job file
def test_workers_range_and_every_iterations_keys():
    cfg = tiny("{min: 1, max: 2}")
    assert cfg.scaling.elastic and (cfg.scaling.min_workers, cfg.scaling.max_workers) == (1, 2)
    assert cfg.per_worker_batch == 16 and cfg.checkpoint.every_iterations == 3
    assert cfg.scaling.describe_workers() == "1-2 (elastic)"
    assert from_dict(cfg.to_dict()) == cfg  # round-trips through the plain dict the workers get
    fixed = tiny("2")
    assert not fixed.scaling.elastic and fixed.scaling.max_workers == 2 and fixed.checkpoint.every_iterations == 3


@pytest.mark.parametrize(
    "workers, extra, words",
    [
        ("{min: 3, max: 2}", [], ["scaling.workers", "min 3 is above max 2"]),
        ("{min: 1}", [], ["scaling.workers", "min and max"]),
        ("{min: 1, max: 3}", [], ["train.batch_size 32", "scaling.workers max 3"]),
        ("{min: 2, max: 4}", ["scaling.workers_per_node=4"], ["min 2", "workers_per_node 4", "whole node"]),
        ("{min: 1, max: 2}", ["bn.sync=true", "scaling.use_gpu=true"], ["bn.sync", "range"]),
        ("2", ["checkpoint.every_iterations=0"], ["checkpoint.every_iterations"]),
    ],
)
def test_bad_ranges_are_refused_with_the_field(workers, extra, words):
    with pytest.raises(ConfigError) as ei:
        tiny(workers, *extra)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))


def test_workers_per_node_range_in_whole_nodes_and_plan():
    cfg = tiny("{min: 4, max: 8}", "scaling.workers_per_node=4", "train.batch_size=64")
    plan = scaling_plan(cfg)
    assert plan["workers"] == {"min": 4, "max": 8} and plan["per_worker_batch"] == 8
    sizes = {s["workers"]: (s["training_workers"], s["micro_batches_per_worker"]) for s in plan["elastic"]["sizes"]}
    # 5, 6 and 7 workers cannot keep the batch exact: 4 of them train, 2 micro-batches each
    assert sizes == {4: (4, 2), 5: (4, 2), 6: (4, 2), 7: (4, 2), 8: (8, 1)}
    assert plan["total_resources"]["CPU"] == 8 and plan["elastic"]["min_total_resources"]["CPU"] == 4


def test_cli_workers_range_and_dry_run():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "resnet_cluster", "submit", str(SMOKE), "--dry-run"]
    p = subprocess.run([*cmd, "--json", "--workers", "1-2"], capture_output=True, text=True, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["job"]["scaling"]["workers"] == {"min": 1, "max": 2}
    assert doc["scaling_plan"]["workers"] == {"min": 1, "max": 2}
    p = subprocess.run([*cmd, "--workers", "1-2"], capture_output=True, text=True, env=env, cwd=REPO)
    assert p.returncode == 0 and "1-2 (elastic)" in p.stdout and "at 1 workers" in p.stdout
    p = subprocess.run([*cmd, "--workers", "two"], capture_output=True, text=True, env=env, cwd=REPO)
    assert p.returncode == 2 and "--workers 'two'" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------------------- the step plan
def test_step_plan_keeps_the_global_step():
    assert [usable_world_size(8, w) for w in range(1, 9)] == [1, 2, 2, 4, 4, 4, 4, 8]
    for n in (1, 2, 4, 6, 8):
        for w in range(1, n + 1):
            plans = [StepPlan.for_world(n, w, r) for r in range(w)]
            # every micro-batch slot is trained exactly once per step, by one rank
            slots = [p.slot_group * p.accumulate + j for p in plans if not p.spare for j in range(p.accumulate)]
            assert sorted(slots) == list(range(n))
            # DDP's mean over w ranks of sum_j weight * g_j is the mean over the n micro-batches
            assert sum(p.loss_weight * p.accumulate for p in plans) / w == pytest.approx(1.0)
            assert all(p.accumulate == plans[0].accumulate for p in plans)  # same passes on every rank
    spare = StepPlan.for_world(4, 3, 2)
    assert spare.spare and spare.loss_weight == 0 and spare.slot_group == 0 and spare.accumulate == 2
    with pytest.raises(ValueError, match="more workers"):
        StepPlan.for_world(2, 3, 0)


# ---------------------------------------------------------------------------- the data's slots
def _images(n=103):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, torch.arange(n), images.float().mean(0)


def test_image_batches_serve_the_same_slots_at_any_world_size():
    images, labels, mean = _images()
    common = dict(batch_size=4, seed=3, train=True, augment=True, mean=mean)
    # the N = 4 layout: one rank per slot
    per_slot = [ImageBatches(images, labels, rank=k, world_size=4, **common) for k in range(4)]
    for w, m in ((2, 2), (1, 4)):
        grouped = [ImageBatches(images, labels, rank=r, world_size=w, accumulate=m, **common) for r in range(w)]
        for epoch in (0, 1):
            for ld in per_slot + grouped:
                ld.set_epoch(epoch)
            want = [list(ld) for ld in per_slot]
            for r, ld in enumerate(grouped):
                assert len(ld) == len(per_slot[0]) == (103 // 4) // 4
                for i, (x, y) in enumerate(ld):
                    assert x.shape[0] == 4 * m
                    for j in range(m):
                        wx, wy = want[r * m + j][i]
                        assert torch.equal(y[j * 4 : (j + 1) * 4], wy)  # same images (labels = ids)
                        assert torch.equal(x[j * 4 : (j + 1) * 4], wx)  # same crops and flips


def test_image_batches_resume_mid_epoch_exactly():
    images, labels, mean = _images()
    ld = ImageBatches(images, labels, batch_size=4, rank=1, world_size=2, accumulate=2, seed=3, train=True,
                      augment=True, mean=mean)
    ld.set_epoch(2)
    full = list(ld)
    ld.set_epoch(2, start=5)
    tail = list(ld)
    assert len(tail) == len(full) - 5
    for (x, y), (fx, fy) in zip(tail, full[5:]):
        assert torch.equal(y, fy) and torch.equal(x, fx)


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory):
    from test_data import write_archive

    from resnet_cluster.data.cifar import prepare_cifar10

    tmp = tmp_path_factory.mktemp("cifar-elastic")
    archive = tmp / "cifar-10-python.tar.gz"
    write_archive(archive, bytes_keys=True, per_batch=20)  # 100 training images
    prepare_cifar10(str(archive), str(tmp / "dest"), shard_images=8)
    return str(tmp / "dest")


def _shard_loader(root, *, rank, world, accumulate=1, loader_workers=0):
    from resnet_cluster.data.streaming import build_shard_loaders

    cfg = from_dict({"seed": 1, "data": {"dataset": "cifar10", "root": root, "augment": "paper",
                                         "loader_workers": loader_workers},
                     "train": {"batch_size": 12, "iterations": 2}, "scaling": {"workers": 4}})
    train, _, _ = build_shard_loaders(cfg, rank=rank, world_size=world,
                                      train_share=None if accumulate == 1 else (rank, world, accumulate))
    train.yield_ids = True
    return train


def _pass(loader, epoch, start=0):
    loader.set_epoch(epoch, start=start)
    return [(x, ids) for x, _, ids in loader]


@pytest.mark.parametrize("loader_workers", [0, 3])
def test_shard_batches_slots_and_mid_epoch_resume(cifar_shards, loader_workers):
    """Slots read through shards (DataLoader workers serving blocks round-robin) are the same
    images with the same augmentation at world size 4 and 2; a pass resumed at step j serves
    exactly the full pass's steps j.. (so each image once per epoch)."""
    per_slot = [_shard_loader(cifar_shards, rank=k, world=4, loader_workers=loader_workers) for k in range(4)]
    want = [_pass(ld, 1) for ld in per_slot]
    assert len(per_slot[0]) == len(want[0]) == (100 // 4) // 3 == 8
    for r in range(2):
        ld = _shard_loader(cifar_shards, rank=r, world=2, accumulate=2, loader_workers=loader_workers)
        got = _pass(ld, 1)
        assert len(got) == 8
        for i, (x, ids) in enumerate(got):
            for j in range(2):
                wx, wids = want[2 * r + j][i]
                assert torch.equal(ids[j * 3 : (j + 1) * 3], wids)
                torch.testing.assert_close(x[j * 3 : (j + 1) * 3], wx, rtol=0, atol=0)
        for start in (1, 3, 5, 7):
            tail = _pass(ld, 1, start)
            assert [t.tolist() for _, t in tail] == [t.tolist() for _, t in got[start:]], start
            seen = [i for _, t in got[:start] for i in t.tolist()] + [i for _, t in tail for i in t.tolist()]
            assert sorted(seen) == sorted(i for _, t in got for i in t.tolist()) and len(set(seen)) == len(seen)
        ld.close()
    for ld in per_slot:
        ld.close()


# ---------------------------------------------------------------------------- exactness
class _Stop(Exception):
    pass


class Recorder(Callback):
    """Keeps the loop's records; saves the state at the ``stop_at``-th mid-epoch checkpoint
    (1-based) into ``folder`` and stops there."""

    def __init__(self, folder: str | None = None, stop_at: int | None = None, rank: int = 0):
        self.folder, self.stop_at, self.rank = folder, stop_at, rank
        self.logs, self.epochs, self.checkpoints, self.info = [], [], [], None

    def on_start(self, info):
        self.info = dict(info)

    def on_log(self, record):
        self.logs.append(dict(record))

    def on_epoch_end(self, record, state):
        self.epochs.append({k: v for k, v in record.items() if not k.endswith(("time_s", "per_sec", "wait_s"))})

    def on_checkpoint(self, record, state):
        self.checkpoints.append(dict(record))
        if self.stop_at is not None and len(self.checkpoints) == self.stop_at:
            st = state()
            if self.rank == 0:
                ckpt.save_train_state(self.folder, st)
            raise _Stop

    def on_finish(self, summary, model):
        self.summary = summary
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _segment(rank: int, world: int, tmp: str, workers: str, resume_from: str | None, stop_at: int | None,
             out: str, extra: tuple[str, ...] = ()) -> dict:
    """Train on this rank of ``world`` from ``resume_from`` until the ``stop_at``-th mid-epoch
    checkpoint (saved into ``out``) or the end (results into ``out``)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ctx = WorkerContext(rank=rank, world_size=world)
    rec = Recorder(out, stop_at, rank)
    resume = ckpt.load_train_state(resume_from) if resume_from else None
    wrap = (lambda m: DDP(m)) if world > 1 else None
    try:
        fit(tiny(workers, *extra), ctx, callbacks=[rec], resume=resume, wrap_model=wrap)
    except _Stop:
        return {}
    result = {"logs": rec.logs, "epochs": rec.epochs, "weights": rec.weights, "info": rec.info,
              "summary": rec.summary}
    if rank == 0:
        torch.save(result, os.path.join(out, "result.pt"))
    return result


def _worker(rank, world, tmp, *args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous-{args[3].replace('/', '_')}",
                            rank=rank, world_size=world)
    try:
        _segment(rank, world, tmp, *args)
        dist.barrier()  # every rank is past its last collective before any tears gloo down
        Path(args[3], f"done.rank{rank}").touch()  # args[3]: the out folder
    finally:
        dist.destroy_process_group()


def _run(world: int, tmp: Path, workers: str, resume_from, stop_at, out: Path, extra=()) -> dict | None:
    out.mkdir(parents=True, exist_ok=True)
    if world == 1:
        torch.set_num_threads(1)
        _segment(0, 1, str(tmp), workers, resume_from and str(resume_from), stop_at, str(out), tuple(extra))
    else:
        try:
            mp.start_processes(_worker, args=(world, str(tmp), workers, resume_from and str(resume_from), stop_at,
                                              str(out), tuple(extra)), nprocs=world, join=True, start_method="spawn")
        except mp.ProcessExitedException:
            # gloo can abort a process while it is torn down ("terminate called without an active
            # exception", SIGABRT; seen once in CI under load). A rank that died after every rank
            # had passed the final barrier lost nothing this test reads; any earlier death fails it.
            if not all((out / f"done.rank{r}").exists() for r in range(world)):
                raise
    path = out / "result.pt"
    return torch.load(path, weights_only=False) if path.exists() else None


def _close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-worker run: 2 gloo ranks, DDP, 16 images per rank per step."""
    tmp = tmp_path_factory.mktemp("ref")
    return _run(2, tmp, "2", None, None, tmp / "ref")


def test_accumulation_on_one_worker_matches_two_workers(reference, tmp_path):
    one = _run(1, tmp_path, "{min: 1, max: 2}", None, None, tmp_path / "one")
    assert one["info"]["micro_batches_per_step"] == 2 and reference["info"]["micro_batches_per_step"] == 1
    assert one["summary"]["iterations"] == reference["summary"]["iterations"] == 12
    _close(one["weights"], reference["weights"])
    # the weights moved: the comparison is not between two initialisations
    init = tiny("2")
    torch.manual_seed(init.seed)
    from resnet_cluster.engine.loop import build_model

    fresh = build_model(init).state_dict()
    assert max((fresh[k].double() - one["weights"][k].double()).abs().max() for k in fresh if k.endswith("weight")) > 1e-2
    # and the records read the same: losses per log window and test errors per epoch
    assert [r["iteration"] for r in one["logs"]] == [r["iteration"] for r in reference["logs"]]
    assert [r["loss"] for r in one["logs"]] == pytest.approx([r["loss"] for r in reference["logs"]], abs=1e-5)
    assert [e["test_loss"] for e in one["epochs"]] == pytest.approx([e["test_loss"] for e in reference["epochs"]],
                                                                    abs=1e-5)
    assert [e["train_images"] for e in one["epochs"]] == [128, 128, 128]


def test_dynamic_bn_counts_one_batch_per_step_at_any_world_size(tmp_path):
    # bn.policy dynamic averages 1/(1+n) over the batches rank 0 sees: one micro-batch per step
    # on 2 workers; on 1 worker accumulating 2, only the first micro-batch may count.
    dyn = ("bn.policy=dynamic",)
    two = _run(2, tmp_path, "2", None, None, tmp_path / "two", extra=dyn)
    one = _run(1, tmp_path, "{min: 1, max: 2}", None, None, tmp_path / "one", extra=dyn)
    assert any(k.endswith("running_var") for k in one["weights"])  # the statistics are compared
    _close(one["weights"], two["weights"])


def test_resized_two_one_two_matches_the_uninterrupted_run(reference, tmp_path):
    """Checkpoint mid-epoch at iteration 3 on 2 ranks, resume on 1 rank (2 micro-batches per
    step) until the checkpoint at iteration 6, resume on 2 ranks to the end."""
    a = tmp_path / "a"
    assert _run(2, tmp_path, "{min: 1, max: 2}", None, 1, a) is None
    first = ckpt.load_train_state(a)
    assert (first["epoch"], first["epoch_step"], first["iteration"]) == (0, 3, 3)
    b = tmp_path / "b"
    assert _run(1, tmp_path, "{min: 1, max: 2}", a, 1, b) is None
    second = ckpt.load_train_state(b)
    assert (second["epoch"], second["epoch_step"], second["iteration"]) == (1, 2, 6)
    end = _run(2, tmp_path, "{min: 1, max: 2}", b, None, tmp_path / "c")
    assert end["info"]["start_iteration"] == 6 and end["info"]["start_epoch_step"] == 2
    assert end["summary"] == reference["summary"]
    _close(end["weights"], reference["weights"])
    # the last epochs' records continue the uninterrupted ones
    tail = [r for r in reference["logs"] if r["iteration"] > 6]
    assert [r["iteration"] for r in end["logs"]] == [r["iteration"] for r in tail] == [8, 10, 12]
    assert [r["loss"] for r in end["logs"]] == pytest.approx([r["loss"] for r in tail], abs=1e-5)
    for got, want in zip(end["epochs"], reference["epochs"][1:]):
        for k in ("epoch", "iteration", "train_images", "top1_err"):
            assert got[k] == want[k], k
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5)  # whole epoch 1, both parts


def test_world_size_that_does_not_divide_n_trains_exactly_with_a_spare(tmp_path):
    """N = 4 micro-batches of 8: on 3 ranks, 2 train (2 micro-batches each) and rank 2 is a
    spare (same passes, loss weight 0); the updates equal 1 rank accumulating all 4.

    At lr 0.02: with batch-8 micro-batches and lr 0.1 this tiny net trains chaotically, and
    rounding-level differences (any two world sizes, spare or not) grow past 1e-3 in 8 steps.
    Measured at lr 0.02: 1 vs 3 ranks differ by at most 1.6e-4 in a weight, 1 vs 2 ranks (no
    spare) by 3.4e-4, and every logged loss agrees within 5e-6."""
    lr = ["optim.lr=0.02"]
    one = _run(1, tmp_path, "4", None, None, tmp_path / "one", lr)
    three = _run(3, tmp_path, "{min: 1, max: 4}", None, None, tmp_path / "three", lr)
    assert three["info"]["training_workers"] == 2 and three["info"]["micro_batches_per_step"] == 2
    assert one["info"]["micro_batches_per_step"] == 4
    _close(three["weights"], one["weights"], atol=1e-3)
    assert [r["loss"] for r in three["logs"]] == pytest.approx([r["loss"] for r in one["logs"]], abs=2e-5)
    assert [e["train_images"] for e in three["epochs"]] == [128, 128, 128]  # the spare's passes not counted


# ---------------------------------------------------------------------------- mid-epoch resume
def test_mid_epoch_resume_in_one_process_is_exact(tmp_path):
    straight = Recorder()
    fit(tiny("1"), callbacks=[straight])
    assert [c["iteration"] for c in straight.checkpoints] == [3, 6, 9]  # 4, 8, 12 are epoch ends
    stopped = Recorder(str(tmp_path), stop_at=3)
    with pytest.raises(_Stop):
        fit(tiny("1"), callbacks=[stopped])
    state = ckpt.load_train_state(tmp_path)
    assert (state["epoch"], state["epoch_step"], state["iteration"]) == (2, 1, 9)
    resumed = Recorder()
    summary = fit(tiny("1"), callbacks=[resumed], resume=state)
    assert resumed.info["start_epoch_step"] == 1
    _close(resumed.weights, straight.weights, atol=0)
    assert resumed.epochs[-1] == straight.epochs[-1]
    assert summary == straight.summary


# ---------------------------------------------------------------------------- checkpoint files
def test_train_state_is_cpu_only_and_keeps_the_grad_scaler(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)

    class Sched:
        def state_dict(self):
            return {"drops": torch.tensor([1.0])}

    state = ckpt.train_state(model=model, optimizer=opt, schedule=Sched(), scaler=scaler, epoch=1, epoch_step=5,
                             iteration=9, history=[], config={})
    ckpt.save_train_state(tmp_path, state)
    back = ckpt.load_train_state(tmp_path)
    tensors = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            tensors.append(o)
        elif isinstance(o, dict):
            [walk(v) for v in o.values()]
        elif isinstance(o, (list, tuple)):
            [walk(v) for v in o]

    walk(back)
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert back["scaler"]["scale"] == 1024.0 and back["scaler"]["growth_interval"] == 7
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(back["scaler"])
    assert restored.get_scale() == 1024.0
    # the saved state is a copy: training on does not change it
    before = state["model"]["0.weight"].clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(state["model"]["0.weight"], before)
    assert back["epoch_step"] == 5 and "cuda_device" not in back["rng"]


def test_rng_of_an_older_checkpoint_with_every_gpu_restores_on_any_machine():
    """Issue #14: a checkpoint listing every visible GPU's generator (the old format) must not
    fail on a rank that sees fewer GPUs; only this rank's own device is restored now."""
    old = {"torch": torch.get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}
    ckpt.restore_rng(old, torch.device("cpu"))
    a = torch.rand(3)
    ckpt.restore_rng(old, torch.device("cuda", 3))  # no such GPU here: ignored, not IndexError
    assert torch.equal(a, torch.rand(3))
    assert set(ckpt.capture_rng(torch.device("cpu"))) == {"torch"}
    arr = np.asarray(ckpt.capture_rng()["torch"])
    assert arr.dtype == np.uint8


# ---------------------------------------------------------------------------- records
def _store(tmp_path):
    from resnet_cluster.artifacts.store import ArtifactStore

    return ArtifactStore(str(tmp_path / "store"))


def test_run_without_fresh_heartbeat_is_lost_and_listed_so(tmp_path):
    import time

    from resnet_cluster.artifacts import heartbeat
    from resnet_cluster.artifacts.registry import get_run, list_runs, show_run
    from resnet_cluster.artifacts.run import RunWriter

    store = _store(tmp_path)
    for rid in ("old-style", "alive", "gone", "done"):
        store.write_text(rid, "config.yaml", tiny("2").to_yaml())
        RunWriter(store, rid).event("started", world_size=2)
    RunWriter(store, "done").event("stopped")
    now = time.time()
    beat = heartbeat.Heartbeat(store, "alive", "driver")
    beat.beat()
    stale = {"who": "driver", "unix": now - 5 * heartbeat.INTERVAL_S, "interval_s": heartbeat.INTERVAL_S,
             "time": "then"}
    store.write_json("gone", "heartbeat.driver.json", stale)
    store.write_json("gone", "heartbeat.rank0.json", {**stale, "who": "rank0", "iteration": 40, "unix": stale["unix"] + 1})
    store.write_json("done", "heartbeat.driver.json", stale)  # stopped stays stopped
    status = {r.run_id: r.status for r in list_runs(store)}
    assert status == {"old-style": "running", "alive": "running", "gone": "lost", "done": "stopped"}
    assert [r.run_id for r in list_runs(store, status="lost")] == ["gone"]
    assert get_run(store, "gone").status == "lost"
    shown = show_run(store, "gone")
    assert shown["record"]["status"] == "lost" and shown["heartbeat"]["iteration"] == 40
    # a beat brings it back to running; the rank-0 heartbeat alone counts too
    heartbeat.Heartbeat(store, "gone", "rank0").beat()
    assert get_run(store, "gone").status == "running"


def test_heartbeat_thread_beats_until_stopped(tmp_path):
    import time

    from resnet_cluster.artifacts import heartbeat

    store = _store(tmp_path)
    n = {"i": 0}

    def fields():
        n["i"] += 1
        return {"iteration": n["i"]}

    hb = heartbeat.Heartbeat(store, "r", "rank0", interval_s=0.05, fields=fields).start()
    deadline = time.time() + 10
    while n["i"] < 3 and time.time() < deadline:
        time.sleep(0.02)
    hb.stop()
    count = n["i"]
    assert count >= 3 and store.read_json("r", "heartbeat.rank0.json")["iteration"] == count
    time.sleep(0.2)
    assert n["i"] == count  # stopped: no more writes
    with pytest.raises(ValueError):
        heartbeat.Heartbeat(store, "r", "rank7")


def test_recorder_records_a_resize_as_an_event(tmp_path):
    from resnet_cluster.callbacks import RunRecorder
    from resnet_cluster.artifacts.registry import parse_events, show_run

    store = _store(tmp_path)
    cfg = tiny("{min: 1, max: 2}")
    store.write_text("el", "config.yaml", cfg.to_yaml())
    base = {"iters_per_epoch": 4, "total_iterations": 12, "total_epochs": 3, "parameters": 1}
    first = RunRecorder(cfg, store, "el", submission="s1", csv_interval_s=0)
    first.on_start({**base, "start_epoch": 0, "start_iteration": 0, "resumed": False, "world_size": 2,
                    "training_workers": 2, "micro_batches_per_step": 1})
    first.heartbeat.stop()
    second = RunRecorder(cfg, store, "el", submission="s1", csv_interval_s=0)
    second.on_start({**base, "start_epoch": 0, "start_iteration": 3, "start_epoch_step": 3, "resumed": True,
                     "world_size": 1, "training_workers": 1, "micro_batches_per_step": 2})
    second.heartbeat.stop()
    events = parse_events(store.read_text("el", "events.jsonl"))
    assert [e["event"] for e in events] == ["started", "resized", "restarted"]
    resized = events[1]
    assert (resized["from_world_size"], resized["to_world_size"], resized["iteration"]) == (2, 1, 3)
    assert resized["micro_batches_per_step"] == 2
    assert [e["iteration"] for e in show_run(store, "el")["resizes"]] == [3]


def test_a_preemption_checkpoint_is_an_event_that_runs_show_lists(tmp_path):
    """What RayReporter.wants_checkpoint adds to the record on a notice reaches the run's events
    (ISO deadline) and `runs show`, text and JSON."""
    from typer.testing import CliRunner

    from resnet_cluster.artifacts.registry import parse_events
    from resnet_cluster.callbacks import RunRecorder
    from resnet_cluster.cli import app

    store = _store(tmp_path)
    cfg = tiny("2")
    store.write_text("pre", "config.yaml", cfg.to_yaml())
    rec = RunRecorder(cfg, store, "pre", submission="s1", csv_interval_s=0)
    rec.on_start({"iters_per_epoch": 4, "total_iterations": 12, "total_epochs": 3, "parameters": 1,
                  "start_epoch": 0, "start_iteration": 0, "resumed": False, "world_size": 2})
    rec.heartbeat.stop()
    node = "ab" * 28
    record = {"epoch": 1, "iteration": 6, "epoch_step": 2, "lr": 0.1, "reason": "preemption",
              "preempted_nodes": [node], "preempted_ranks": [1], "deadline_ms": 1_767_225_600_000}
    rec.on_checkpoint(record, lambda: {})
    rec.on_checkpoint({"epoch": 1, "iteration": 7, "epoch_step": 3, "lr": 0.1}, lambda: {})  # a regular one
    notices = [e for e in parse_events(store.read_text("pre", "events.jsonl")) if e["event"] == "preemption_notice"]
    assert len(notices) == 1
    e = notices[0]
    assert (e["epoch"], e["iteration"], e["epoch_step"], e["nodes"], e["ranks"]) == (1, 6, 2, [node], [1])
    assert e["deadline"] == "2026-01-01T00:00:00.000+00:00"
    runner = CliRunner()
    out = runner.invoke(app, ["runs", "show", "pre", "--store", str(store.root), "--json"])
    assert out.exit_code == 0, out.output
    assert [p["iteration"] for p in json.loads(out.stdout)["preemptions"]] == [6]
    out = runner.invoke(app, ["runs", "show", "pre", "--store", str(store.root)], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "Preemption notices" in out.stdout and node[:12] in out.stdout


def test_failure_recorder_writes_each_worker_group_failure_once(tmp_path):
    """The controller-side callback: Ray's wrapped worker error (its traceback text) becomes one
    line per rank in a `worker_failed` event, once per distinct failure; it survives the pickling
    that takes it to the controller."""
    import pickle

    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    from resnet_cluster.artifacts.registry import parse_events
    from resnet_cluster.launch.controller import FailureRecorder

    store = _store(tmp_path)
    try:
        open(tmp_path, "wb")  # a folder: what a store refusing a checkpoint file raises
    except IsADirectoryError as e:
        wrapped = construct_user_exception_with_traceback(e)
    rec = pickle.loads(pickle.dumps(FailureRecorder(store.root, None, "wf", "s1")))
    rec.after_exception(None, {0: wrapped})
    rec.after_exception(None, {0: wrapped})  # the next poll of the same failed group
    rec.after_exception(None, {1: RuntimeError("gloo: connection reset by peer")})
    events = parse_events(store.read_text("wf", "events.jsonl"))
    assert [(e["event"], e["ranks"]) for e in events] == [("worker_failed", [0]), ("worker_failed", [1])]
    assert events[0]["errors"]["0"].startswith("IsADirectoryError: [Errno 21] Is a directory")
    assert events[1]["errors"] == {"1": "RuntimeError: gloo: connection reset by peer"} and events[1]["submission"] == "s1"
    from typer.testing import CliRunner

    from resnet_cluster.cli import app

    store.write_text("wf", "config.yaml", tiny("2").to_yaml())
    out = CliRunner().invoke(app, ["runs", "show", "wf", "--store", str(store.root)], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert "Worker group failures" in out.stdout and "gloo: connection reset by peer" in out.stdout


def test_a_new_worker_group_removes_only_its_own_runs_left_checkpoint_folders(tmp_path, monkeypatch):
    """A failed async upload leaves its local folder (Ray deletes it only after an upload);
    the run's next worker group removes those of this run, never another run's."""
    import tempfile

    from resnet_cluster.callbacks import RayReporter

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name in ("rc-ckpt-a+x1y2z3", "rc-ckpt-a-b+k9k9k9", "rc-ckpt-other+q1", "unrelated"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_state.pt").write_bytes(b"x")
    rep = RayReporter(tiny("2"), WorkerContext(), run_id="a")
    rep.on_start({"total_epochs": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rc-ckpt-a-b+k9k9k9", "rc-ckpt-other+q1", "unrelated"]
    assert rep.total_epochs == 3
    RayReporter(tiny("2"), WorkerContext(rank=1, world_size=2), run_id="a-b").on_start({"total_epochs": 3})
    assert (tmp_path / "rc-ckpt-a-b+k9k9k9").exists()  # only the main rank cleans
