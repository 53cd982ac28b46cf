"""The dataset registry: everything the rest of the package asks about a dataset, in one place.

``config`` takes its ``data.dataset`` choices from here, ``data`` its splits, reader and
preparation hint, ``launch`` and ``sweep`` the training-set size and whether there is a prepared
folder to check, ``models`` the input size and class count. Adding a dataset means one entry
here and one module in ``data/`` that prepares it in the shard format (``data/shards.py``).

This module imports nothing from the package beyond ``errors``: it sits in the lowest layer
(tests/test_layers.py), beside ``config``.
"""

from __future__ import annotations

from dataclasses import dataclass

from resnet_cluster.errors import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    reader: str  # "shards": prepared shards + manifest.json at data.root; "synthetic": generated
    num_classes: int
    input_size: int  # side of the square input the nets are built for
    train_split: str = "train"
    eval_split: str = "test"  # the split a run evaluates on
    num_train: int | None = None  # images in the full training split (None: set by the job)
    augments: tuple[str, ...] = ("paper", "none")  # data.augment values the reader takes
    eval_protocols: tuple[str, ...] = ("1crop",)  # eval.protocol values the reader takes
    prepare: str | None = None  # how to write it to ``{root}`` (the `data prepare` command)

    @property
    def prepared(self) -> bool:
        """Whether jobs read it from a prepared data.root (and the driver can check it first)."""
        return self.reader == "shards"

    def prepare_hint(self, root: str) -> str:
        """What a user runs to get the dataset to ``root``."""
        return (self.prepare or "data.dataset {name} needs no preparation.").format(root=root, name=self.name)


# Order matters: it is the order job validation lists the choices in.
DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        # Krizhevsky 2009; the paper's Section 4.2: 50k train / 10k test 32x32 images, 10 classes.
        DatasetInfo("cifar10", reader="shards", num_classes=10, input_size=32, num_train=50_000,
                    prepare="Run `resnet-cluster data prepare cifar10 --dest {root}` (add `--source PATH` to "
                    "use a cifar-10-python.tar.gz you have), or point data.root at the folder or URI "
                    "where you prepared it."),
        # CIFAR-shaped generated data for smoke jobs and benchmarks (data.synthetic_train images).
        DatasetInfo("synthetic", reader="synthetic", num_classes=10, input_size=32),
        # ILSVRC2012, the paper's Section 3.4 and 4.1: 1.28M train / 50k val, 1000 classes, 224 crops.
        DatasetInfo("imagenet", reader="shards", num_classes=1000, input_size=224, eval_split="val",
                    num_train=1_281_167, augments=("paper", "inception", "none"),
                    eval_protocols=("1crop", "10crop", "multiscale"),
                    prepare="Run `resnet-cluster data prepare imagenet --train DIR --val DIR --dest {root}` "
                    "(or point data.root at the folder or URI where you prepared it)."),
    )  # fmt: skip
}


def names() -> tuple[str, ...]:
    return tuple(DATASETS)


def get(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; ConfigError naming the choices if there is none."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"data.dataset is {name!r}; choose one of {list(DATASETS)}.") from None
