"""The job file: one frozen, typed :class:`JobConfig`, validated at the edge.

Precedence, lowest first: the defaults below < the YAML file < ``--set a.b=value`` overrides
(values parsed as YAML) < a sweep's sample. Unknown keys are refused everywhere, so a typo such
as ``optim.lrr`` is an error, not a silently ignored setting.

Units: ``train.batch_size`` is the *global* batch (the paper's 128 on CIFAR, 256 on ImageNet),
split evenly over ``scaling.workers``. ``schedule.milestones`` count in the unit the training
length is given in (``train.iterations`` or ``train.epochs``). Test errors are percentages.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from resnet_cluster.errors import ConfigError

DEFAULT_STORE = "./runs-store"
STORE_ENV = "RESNET_CLUSTER_STORE"


def default_store() -> str:
    """``RESNET_CLUSTER_STORE`` if set, else ``./runs-store``; a job file's value wins over both."""
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    arch: str = "cifar_resnet20"
    # Section 3.3: A = zero-padding identity (the paper's CIFAR choice), B = projection only
    # where the shape changes, C = projections everywhere.
    shortcut: Literal["A", "B", "C"] = "A"
    block: str = "standard"
    zero_init_residual: bool = False


class DataConfig(_Section):
    dataset: Literal["cifar10", "synthetic"] = "cifar10"
    root: str = "./data/cifar10"
    # paper: pad 4, random 32x32 crop, random horizontal flip (Section 4.2).
    augment: Literal["paper", "none"] = "paper"
    # Sizes of the generated set when dataset is synthetic (CIFAR-shaped, learnable).
    synthetic_train: int = Field(2560, ge=1)
    synthetic_test: int = Field(512, ge=1)


class TrainConfig(_Section):
    batch_size: int = Field(128, ge=1)  # global batch, over all workers
    iterations: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    eval_every_epochs: int = Field(1, ge=1)
    log_every_iterations: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _one_length(self) -> TrainConfig:
        if (self.iterations is None) == (self.epochs is None):
            raise ValueError("give exactly one of train.iterations and train.epochs")
        return self

    @property
    def unit(self) -> Literal["iterations", "epochs"]:
        return "iterations" if self.iterations is not None else "epochs"


class OptimConfig(_Section):
    solver: Literal["sgd"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)


class WarmupConfig(_Section):
    """A constant low lr at the start: the paper's ResNet-110 uses 0.01 until the training error
    is below 80% (about 400 iterations); gcr used 0.001 for 400 iterations."""

    lr: float = Field(gt=0)
    until_train_error: float | None = Field(None, gt=0, le=100)  # percent
    iterations: int | None = Field(None, ge=1)  # a cap, or the whole warm-up if alone

    @model_validator(mode="after")
    def _has_end(self) -> WarmupConfig:
        if self.until_train_error is None and self.iterations is None:
            raise ValueError("schedule.warmup needs until_train_error, iterations, or both")
        return self


class ScheduleConfig(_Section):
    policy: Literal["multistep", "constant"] = "multistep"
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)
    warmup: WarmupConfig | None = None

    @field_validator("milestones")
    @classmethod
    def _ascending(cls, v: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(v, v[1:])) or any(m <= 0 for m in v):
            raise ValueError(f"milestones must be positive and strictly ascending, got {v}")
        return v


class BNConfig(_Section):
    # PyTorch's (and Torch7's) convention: the weight of the new batch in the running average.
    momentum: float = Field(0.1, gt=0, le=1)


class ScalingSection(_Section):
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    gpus_per_worker: float = Field(1, gt=0)
    cpus_per_worker: float = Field(1, gt=0)


class CheckpointConfig(_Section):
    every_epochs: int = Field(1, ge=1)
    keep: int = Field(2, ge=1)


class FailureSection(_Section):
    max_failures: int = Field(0, ge=-1)  # -1: retry forever, as in Ray's FailureConfig


class PrecisionConfig(_Section):
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    compile: bool = False


class EvalConfig(_Section):
    # ImageNet views: 1crop (shorter side 256, centre 224), 10crop (4 corners + centre and their
    # flips, softmax averaged), multiscale (fully convolutional, scores averaged over scales).
    # CIFAR is always the single original 32x32 view, which is what 1crop means there.
    protocol: Literal["1crop", "10crop", "multiscale"] = "1crop"


class ArtifactsConfig(_Section):
    store: str = Field(default_factory=default_store)


class JobConfig(_Section):
    name: str = "job"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig(iterations=64000)
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    bn: BNConfig = BNConfig()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointConfig = CheckpointConfig()
    failure: FailureSection = FailureSection()
    precision: PrecisionConfig = PrecisionConfig()
    eval: EvalConfig = EvalConfig()
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("name may hold letters, digits, '.', '_' and '-' (at most 100)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        w, b = self.scaling.workers, self.train.batch_size
        if b % w:
            raise ValueError(
                f"train.batch_size {b} does not split evenly over scaling.workers {w}; "
                f"choose a batch that is a multiple of {w} (the batch is global, "
                f"{b}/{w} = {b / w:g} images per worker)"
            )
        if self.precision.amp == "fp16" and not self.scaling.use_gpu:
            raise ValueError("precision.amp fp16 needs scaling.use_gpu: true; use bf16 on CPUs")
        return self

    @property
    def per_worker_batch(self) -> int:
        return self.train.batch_size // self.scaling.workers

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Loading


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-"))


def _format_errors(err: ValidationError, source: str, data: dict) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after",))
        field = _loc(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _section_for(loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            lines.append(f"unknown key `{field}` (allowed here: {allowed})")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"].startswith("value_error") and not loc:
            lines.append(msg)
            continue
        lines.append(f"field `{field}`: got {e.get('input')!r}: {msg}")
    return f"{source}: invalid job: " + "; ".join(lines) + "."


def _section_for(loc: tuple) -> type[BaseModel] | None:
    cls: type[BaseModel] = JobConfig
    for part in loc:
        f = cls.model_fields.get(str(part))
        if f is None:
            return None
        ann = f.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        cls = nxt
    return cls


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"--set {text!r}: expected KEY.PATH=VALUE, for example --set optim.lr=0.01 "
            "or --set schedule.milestones=[400,500]."
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({e}).") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: `{part}` is a value, not a section.")
            node = child
        node[path[-1]] = value
    return data


def from_dict(data: dict, *, source: str = "job") -> JobConfig:
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, data)) from None
    _check_model(cfg, source)
    return cfg


def _check_model(cfg: JobConfig, source: str) -> None:
    """Refuse a model the registry would refuse, at load time rather than on the workers."""
    import torch

    from resnet_cluster import models

    names = [m.name for m in models.available()]
    if cfg.model.arch not in names:
        raise ConfigError(
            f"{source}: invalid job: field `model.arch`: got {cfg.model.arch!r}: unknown model; "
            f"choose one of {', '.join(names)} (see `resnet-cluster models list`)."
        )
    try:
        with torch.device("meta"):  # checks every option without allocating weights
            models.build(cfg.model.arch, **cfg.model.model_dump(exclude={"arch"}))
    except ConfigError as e:
        raise ConfigError(f"{source}: invalid job: {e}") from None


def load(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a job file, apply ``--set`` overrides, and validate. Raises ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"job file {str(p)!r} does not exist. Pass the path of a job YAML, "
            "for example jobs/smoke.yaml."
        )
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a job file must be a mapping of sections, got {type(data).__name__}.")
    data = apply_overrides(data, overrides)
    source = str(p) + (" (with --set overrides)" if overrides else "")
    return from_dict(data, source=source)
