"""ImageNet test protocols end to end: real JPEG files in the ILSVRC layout are prepared into
shards, ``jobs/imagenet_r18.yaml`` trains one epoch (6 iterations of 2 images) on the CPU
under each of ``eval.protocol`` 1crop / 10crop / multiscale, and what ``engine.fit`` reports
is recomputed by hand from the shard bytes with :mod:`resnet_cluster.data.transforms` and the
same model: the 1-crop logits, the 10-crop softmax averaged over the views (paper section 3.4, "standard
10-crop testing"), the multi-scale scores averaged over the five shorter sides. Then
``resnet-cluster eval --protocol 10crop`` on the saved model.pt must give the same numbers.

The two sides were tested apart before (tests/test_imagenet.py: the views' geometry;
tests/test_eval*.py: the averaging on synthetic tensors); here they meet on real data. Images
are small (80-120 px) and the set tiny (12 train, 4 val) so the module stays fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from resnet_cluster import config
from resnet_cluster.data import transforms as T
from resnet_cluster.data.imagenet import prepare_imagenet
from resnet_cluster.data.loaders import build_loaders_for
from resnet_cluster.data.shards import read_manifest
from resnet_cluster.engine import Callback, WorkerContext, fit
from resnet_cluster.engine.loop import evaluate
from resnet_cluster.models import jobs
from resnet_cluster.models.files import save_model_file

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "resnet-cluster")
WNIDS = ["n01440764", "n01443537", "n01484850"]
TRAIN_PER_CLASS = 4
# (width, height) of the val images: portrait, landscape and square, so the 10 crops and the
# multi-scale views have different shapes; all labels are present, one class twice.
VAL = [((100, 80), 0), ((80, 104), 1), ((96, 96), 2), ((120, 88), 0)]
N_VAL = len(VAL)
PROTOCOLS = ("1crop", "10crop", "multiscale")


def textured(w: int, h: int, label: int, rng: np.random.Generator) -> np.ndarray:
    """A class tint plus random 8-px blocks and a gradient: crops of one image differ."""
    blocks = rng.integers(0, 120, (h // 8 + 1, w // 8 + 1, 3))
    a = np.kron(blocks, np.ones((8, 8, 1)))[:h, :w].astype(float)
    a += np.linspace(0, 80, w)[None, :, None]
    a[..., label] += 60
    return np.clip(a, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("inet_eval")
    rng = np.random.default_rng(3)
    for c, w in enumerate(WNIDS):
        d = root / "src" / "train" / w
        d.mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS):
            size = rng.integers(72, 128, 2)
            Image.fromarray(textured(*size, c, rng)).save(d / f"{w}_{i}.JPEG", quality=92)
    for k, ((w, h), lab) in enumerate(VAL, start=1):  # the sorted layout: val/<wnid>/*.JPEG
        d = root / "src" / "val" / WNIDS[lab]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(textured(w, h, lab, rng)).save(d / f"ILSVRC2012_val_{k:08d}.JPEG")
    dest = str(root / "prepared")
    # 3 images a shard: the val split spans two shards, so a test batch of 2 crosses one edge
    summary = prepare_imagenet(str(root / "src" / "train"), str(root / "src" / "val"), dest,
                               shard_images=3)
    assert summary["val_images"] == N_VAL and summary["train_images"] == 3 * TRAIN_PER_CLASS
    return root, dest


def job(dest: str, protocol: str) -> config.JobConfig:
    """The ResNet-18 job as written (option A, channels_last, precise BN, plateau schedule),
    cut down to one CPU process and one epoch of batches of 2."""
    return jobs.load(REPO / "jobs" / "imagenet_r18.yaml", [
        f"data.root={dest}", "data.loader_workers=0", "scaling.use_gpu=false",
        "scaling.workers=1", "scaling.cpus_per_worker=1", "train.batch_size=2",
        "train.iterations=6", "train.log_every_iterations=3",  # one epoch of 12 images
        # lr 0.1 saturates this tiny net's softmax (one-hot scores, every view agreeing, so
        # neither averaging could be told apart); 0.003 keeps the scores spread and the
        # predictions differing between images.
        "optim.lr=0.003",
        "model.num_classes=3",  # the tiny set has 3 classes (null would be ImageNet's 1000)
        "bn.precise_batches=1",  # exact BN statistics of one training batch before the test
        f"eval.protocol={protocol}"])


class Collect(Callback):
    def __init__(self):
        self.records: list[dict] = []

    def on_start(self, info):
        self.info = info

    def on_epoch_end(self, record, state):
        self.records.append(record)

    def on_finish(self, summary, model):
        self.summary, self.model = summary, model


@pytest.fixture(scope="module")
def runs(dataset):
    """One fit per protocol: {protocol: (cfg, Collect)}."""
    _, dest = dataset
    out = {}
    for protocol in PROTOCOLS:
        cfg = job(dest, protocol)
        c = Collect()
        fit(cfg, WorkerContext(), callbacks=[c])
        out[protocol] = (cfg, c)
    return out


def val_rows(dest: str) -> list[dict]:
    """The val split's rows in global-id order (the manifest's shard order)."""
    m = read_manifest(dest)
    rows = []
    for s in m["splits"]["val"]["shards"]:
        rows += pq.read_table(Path(dest) / s["path"], columns=["image", "label"]).to_pylist()
    return rows


def normalise(views: np.ndarray, mean) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W], (x - mean) / 255 as the loaders do."""
    x = torch.from_numpy(np.array(views)).movedim(-1, -3).float()
    return (x - torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)) / 255.0


def hand_views(data: bytes, protocol: str, mean) -> torch.Tensor | list[torch.Tensor]:
    if protocol == "1crop":
        return normalise(T.center_crop(data), mean)[None]  # [1, 3, 224, 224]
    if protocol == "10crop":
        return normalise(T.ten_crop(data), mean)  # [10, 3, 224, 224]
    return [normalise(v, mean)[None] for v in T.multiscale(data)]  # 5 x [1, 3, S, S']


@torch.no_grad()
def hand_scores(model, views, protocol: str) -> dict[str, torch.Tensor]:
    """One image's class scores, both ways of averaging, without the engine's code.
    ``prob``: softmax averaged over views; ``logit``: logits averaged."""
    model.eval()
    logits = torch.cat([model(v) for v in views]) if protocol == "multiscale" else model(views)
    return {"prob": logits.softmax(1).mean(0), "logit": logits.mean(0), "views": logits}


def hand_metrics(scores: list[torch.Tensor], labels: list[int], is_prob: bool) -> dict:
    s, y = torch.stack(scores).double(), torch.tensor(labels)
    loss = F.nll_loss(s.log(), y) if is_prob else F.cross_entropy(s, y)
    return {"top1_err": 100.0 * (s.argmax(1) != y).sum().item() / len(y),
            "test_loss": loss.item(), "argmax": s.argmax(1).tolist()}


# --------------------------------------------------------------------------------------------


def test_every_protocol_tests_every_val_image_once(runs):
    for protocol, (cfg, c) in runs.items():
        assert cfg.eval.protocol == protocol and cfg.model.arch == "resnet18"
        assert c.info["num_test"] == N_VAL and c.info["classes"] == WNIDS
        assert c.summary["iterations"] == 6 and len(c.records) == 1
        rec = c.records[-1]
        assert rec["test_images"] == N_VAL, protocol
        assert 0 <= rec["top1_err"] <= 100 and rec["top1_err"] * N_VAL / 100 == pytest.approx(
            round(rec["top1_err"] * N_VAL / 100))  # a whole number of wrong images
        assert rec["top5_err"] == 0.0  # 3 classes: the top 5 (all 3) always hold the label
        assert np.isfinite(rec["test_loss"]) and rec["test_loss"] > 0
        assert c.summary["final_top1_err"] == rec["top1_err"]
    # The protocol changes only the test: the three runs trained the same weights and BN
    # statistics (same seed, same per-image augmentation), so their numbers are comparable.
    ref = runs["1crop"][1].model.state_dict()
    for protocol in ("10crop", "multiscale"):
        other = runs[protocol][1].model.state_dict()
        assert all(torch.equal(ref[k], other[k]) for k in ref), protocol


def test_loader_serves_the_hand_built_views_of_each_image(runs, dataset):
    """Data side of the contract, image by image: the test batches hold exactly the views
    transforms.py makes of that image's shard bytes, with its label, each image once."""
    _, dest = dataset
    rows, mean = val_rows(dest), read_manifest(dest)["mean"]
    for protocol, (cfg, _) in runs.items():
        _, test, _ = build_loaders_for(cfg, rank=0, world_size=1)
        test.yield_ids = True
        seen = []
        for x, y, ids in test:
            for j, gid in enumerate(ids.tolist()):
                want = hand_views(rows[gid]["image"], protocol, mean)
                assert y[j].item() == rows[gid]["label"]
                if protocol == "multiscale":
                    assert len(x) == len(T.MULTISCALE) and x[0].shape[0] == 1
                    assert [min(v.shape[-2:]) for v in x] == list(T.MULTISCALE)
                    for got, w in zip(x, want):
                        assert torch.equal(got[j], w[0])
                elif protocol == "10crop":
                    assert x.shape[1:] == (10, 3, 224, 224) and torch.equal(x[j], want)
                else:
                    assert x.shape[1:] == (3, 224, 224) and torch.equal(x[j], want[0])
                seen.append(gid)
        assert sorted(seen) == list(range(N_VAL)), protocol


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reported_errors_equal_a_hand_computation(runs, dataset, protocol):
    """Engine side: top-1 error and loss that fit reported under ``protocol`` are those of
    the hand-averaged scores (softmax mean for 10-crop, logit mean for 1-crop/multiscale)."""
    _, dest = dataset
    cfg, c = runs[protocol]
    rec, model = c.records[-1], c.model
    rows, mean = val_rows(dest), read_manifest(dest)["mean"]
    per_image = [hand_scores(model, hand_views(r["image"], protocol, mean), protocol)
                 for r in rows]
    labels = [r["label"] for r in rows]
    key = "prob" if protocol == "10crop" else "logit"
    mine = hand_metrics([s[key] for s in per_image], labels, is_prob=key == "prob")
    # no image's prediction sits on a near-tie, so argmax cannot flip on rounding
    for s in per_image:
        top2 = s[key].topk(2).values
        assert top2[0] - top2[1] > 1e-4 * max(1.0, top2[0].abs().item())
    assert rec["top1_err"] == mine["top1_err"]
    assert rec["test_loss"] == pytest.approx(mine["test_loss"], rel=1e-5, abs=1e-6)

    # The check can fail: the views disagree, and the other averaging gives another loss.
    if protocol != "1crop":
        spread = max((s["views"].softmax(1) - s["prob"]).abs().max().item() for s in per_image)
        assert spread > 1e-3, "the views of an image all give the same scores"
        other = hand_metrics([s["prob" if key == "logit" else "logit"] for s in per_image],
                             labels, is_prob=key == "logit")
        assert abs(other["test_loss"] - rec["test_loss"]) > 1e-3 * rec["test_loss"]
        assert len(set(mine["argmax"])) > 1  # not one class for every image
    if protocol == "10crop":
        # one image end to end: its 10 views from the loader through evaluate() alone
        _, test, _ = build_loaders_for(cfg, rank=0, world_size=1)
        test.yield_ids = True
        x, y, ids = next(iter(test))
        g = int(ids[0])
        one = evaluate(model, [(x[:1], y[:1])], WorkerContext())
        p = per_image[g]["prob"][rows[g]["label"]].item()
        assert one["test_images"] == 1
        assert one["test_loss"] == pytest.approx(-np.log(p), rel=1e-4, abs=1e-6)
        assert one["top1_err"] == (0.0 if mine["argmax"][g] == rows[g]["label"] else 100.0)


def test_cli_eval_10crop_on_model_file_agrees_with_fit(runs, dataset, tmp_path):
    """``resnet-cluster eval model.pt --protocol 10crop --data DEST --json``: a model.pt saved
    from the 1-crop run (its job says 1crop) re-tested under 10-crop in a subprocess gives the
    10-crop run's numbers (the weights are the same, see the first test)."""
    _, dest = dataset
    cfg, c = runs["1crop"]
    path = tmp_path / "model.pt"
    save_model_file(str(path), c.model, cfg, c.summary)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([CLI, "eval", str(path), "--protocol", "10crop", "--data", dest,
                           "--device", "cpu", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    want = runs["10crop"][1].records[-1]
    assert doc["protocol"] == "10crop" and doc["dataset"] == "imagenet" and doc["data"] == dest
    assert doc["test_images"] == doc["num_test"] == N_VAL
    assert doc["run_id"] is None and "recorded_to" not in doc and doc["weights"] == "model.pt"
    assert doc["top1_err"] == want["top1_err"] and doc["top5_err"] == want["top5_err"]
    assert doc["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)
