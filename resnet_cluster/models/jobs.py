"""Loading a job: the schema (``config``) plus the model registry's own check.

The check lives here rather than in ``config``, which sits below ``models`` in the import layers
(tests/test_layers.py): a model the registry would refuse is refused at load time, not on the
workers.
"""

from __future__ import annotations

import os

import torch

from resnet_cluster.config import JobConfig, apply_overrides, read_job_file, validate
from resnet_cluster.errors import ConfigError
from resnet_cluster.models.registry import available, build


def from_dict(data: dict, *, source: str = "job") -> JobConfig:
    """Validate a job mapping. Raises ConfigError naming ``source`` and the field."""
    cfg = validate(data, source=source)
    check_model(cfg, source)
    return cfg


def load(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a job file, apply ``--set`` overrides, and validate. Raises ConfigError."""
    data = apply_overrides(read_job_file(path), overrides)
    source = str(path) + (" (with --set overrides)" if overrides else "")
    return from_dict(data, source=source)


def check_model(cfg: JobConfig, source: str) -> None:
    """Refuse a model the registry would refuse, at load time rather than on the workers."""
    names = [m.name for m in available()]
    if cfg.model.arch not in names:
        raise ConfigError(
            f"{source}: invalid job: field `model.arch`: got {cfg.model.arch!r}: unknown model; "
            f"choose one of {', '.join(names)} (see `resnet-cluster models list`)."
        )
    try:
        with torch.device("meta"):  # checks every option without allocating weights
            build(cfg.model.arch, **cfg.model.model_dump(exclude={"arch"}))
    except ConfigError as e:
        raise ConfigError(f"{source}: invalid job: {e}") from None
