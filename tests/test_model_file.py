"""The model.pt format lives in models/files.py: written by save_model_file, read back by
models.load, and a format this version does not know is refused with a clear message."""

from __future__ import annotations

import pytest
import torch

from resnet_cluster import models
from resnet_cluster.errors import StoreError
from resnet_cluster.models.files import MODEL_FORMAT, read_model_file, save_model_file
from resnet_cluster.models.jobs import from_dict


def test_round_trip_and_format_check(tmp_path):
    cfg = from_dict({"model": {"arch": "cifar_resnet20", "shortcut": "B"}})
    net = models.build("cifar_resnet20", shortcut="B")
    path = tmp_path / "model.pt"
    save_model_file(str(path), net, cfg, {"epochs": 1})
    doc = read_model_file(str(path))
    assert doc["format"] == MODEL_FORMAT == 1
    assert doc["arch"] == "cifar_resnet20" and doc["model_options"]["shortcut"] == "B"
    loaded = models.load(str(tmp_path))  # a run folder
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), net.eval()(x))

    raw = torch.load(path, weights_only=False)
    raw["format"] = 2
    newer = tmp_path / "newer.pt"
    torch.save(raw, newer)
    with pytest.raises(StoreError, match=r"newer\.pt is a model\.pt of format 2; this version of resnet-cluster reads format 1"):
        models.load(str(newer))


def test_eval_refuses_a_newer_format(tmp_path):
    from resnet_cluster.engine.evaluation import _rebuild

    cfg = from_dict({})
    path = tmp_path / "model.pt"
    save_model_file(str(path), models.build(cfg.model.arch), cfg, {})
    doc = torch.load(path, weights_only=False)
    model, _ = _rebuild(doc, "x/model.pt", [])
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in models.build(cfg.model.arch).parameters())
    with pytest.raises(StoreError, match="format 3"):
        _rebuild({**doc, "format": 3}, "x/model.pt", [])
