"""The dataset registry (resnet_cluster/datasets.py) is what config, data, models, launch and
sweep ask: their answers are the registry's."""

from __future__ import annotations

import pytest

from resnet_cluster import datasets, models
from resnet_cluster.data.loaders import DATASETS as LOADER_DATASETS
from resnet_cluster.data.shards import prepare_hint
from resnet_cluster.errors import ConfigError
from resnet_cluster.models.jobs import from_dict
from resnet_cluster.sweep.runner import _epochs


def test_config_choices_are_the_registry():
    assert datasets.names() == LOADER_DATASETS == ("cifar10", "synthetic", "imagenet")
    for name in datasets.names():
        assert from_dict({"data": {"dataset": name}}).data.dataset == name
    with pytest.raises(ConfigError, match="'cifar10', 'synthetic' or 'imagenet'"):
        from_dict({"data": {"dataset": "mnist"}})
    with pytest.raises(ConfigError, match=r"choose one of \['cifar10', 'synthetic', 'imagenet'\]"):
        datasets.get("mnist")


def test_models_take_input_size_and_classes_from_the_registry():
    assert {m.dataset for m in models.available()} <= set(datasets.names())
    for m in models.available():
        assert m.input_size == datasets.get(m.dataset).input_size
    assert models.info("resnet18").input_size == 224 and models.info("cifar_resnet20").input_size == 32
    assert models.build("cifar_resnet20").fc.out_features == 10


def test_prepare_hints():
    assert prepare_hint("s3://b/c10", "cifar10").startswith("Run `resnet-cluster data prepare cifar10 --dest s3://b/c10`")
    assert "--train DIR --val DIR --dest /d" in prepare_hint("/d", "imagenet")
    assert prepare_hint("/d", "unknown") == prepare_hint("/d", "imagenet")
    assert not datasets.get("synthetic").prepared and datasets.get("imagenet").prepared


def test_sweep_epochs_from_training_set_size():
    # 50,000 CIFAR-10 images at batch 128: 390 iterations per epoch; 64k iterations -> 165 epochs
    cfg = from_dict({"train": {"iterations": 64000, "batch_size": 128}})
    assert _epochs(cfg) == 165
    syn = from_dict({"data": {"dataset": "synthetic", "synthetic_train": 256}, "train": {"iterations": 10, "batch_size": 64}})
    assert _epochs(syn) == 3
