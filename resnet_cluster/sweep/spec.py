"""Sweep files: a base job, a grid over dotted job keys, seeds, resources and reference figures.

A sweep file (``jobs/sweeps/*.yaml``) reproduces one published table::

    name: solvers
    title: "CIFAR-10: alternative solvers"
    source: gcr/torch-residual-networks README (REFERENCE.md §4)
    base: ../cifar_gcr.yaml          # a job file, relative to this file, or an inline job
    set: {train.epochs: 200}         # dotted overrides applied to the base for every trial
    grid:                            # axes; the table's rows are their product, in order
      solver:                        # a named axis: label -> dotted overrides
        "SGD + Nesterov, lr 0.1": {optim.solver: sgd, optim.nesterov: true}
        "RMSprop 1e-3": {optim.solver: rmsprop, optim.lr: 1.0e-3}
      model.arch: [cifar_resnet20, cifar_resnet110]   # a key axis: plain values
    exclude: ["RMSprop 1e-3 / model.arch=cifar_resnet110"]   # rows the table does not have
    row_set: {"RMSprop 1e-3 / model.arch=cifar_resnet20": {optim.alpha: 0.9}}
    reference: {"SGD + Nesterov, lr 0.1 / model.arch=cifar_resnet20": 8.29}
    seeds: 3                         # repeats of every row (seed = base seed + 0, 1, ...)
    trial_resources: {gpu: 0.25, cpu: 2}   # per training worker of a trial
    max_concurrent: 8

A row's label is its axes' labels joined by `` / ``; a key axis labels a value ``key=value``.
Overrides apply in this order: base job < ``set`` < trial_resources < the row's axes (in
order) < ``row_set`` < the command's ``--set`` < the trial's seed.

Everything is validated before anything runs: unknown keys in the sweep file, and every trial's
job (an unknown job key or a grid value of the wrong type names the row and the field).
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from resnet_cluster.config import from_dict, parse_override, read_job_file, set_dotted
from resnet_cluster.errors import ConfigError

SWEEP_DIR = Path("jobs") / "sweeps"
ROW_SEP = " / "


class TrialResources(BaseModel):
    """What each training worker of a trial asks for (a trial has ``scaling.workers`` of them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)


# A key axis is a list of values of one dotted job key; a named axis maps labels to overrides.
AxisValues = Any


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    title: str = ""
    source: str = ""  # where the reference figures come from
    base: str | dict[str, Any]
    set: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, AxisValues]
    exclude: list[str] = Field(default_factory=list)
    row_set: dict[str, dict[str, Any]] = Field(default_factory=dict)
    reference: dict[str, float | None] = Field(default_factory=dict)
    seeds: int = Field(1, ge=1)
    trial_resources: TrialResources = TrialResources()
    max_concurrent: int | None = Field(None, ge=1)
    # Which test error a row is judged by: the last evaluation (the papers' tables) or the best.
    metric: Literal["final", "best"] = "final"

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,59}", v):
            raise ValueError("name may hold letters, digits, '_' and '-' (at most 60)")
        return v

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, AxisValues]) -> dict[str, AxisValues]:
        if not v:
            raise ValueError("the grid needs at least one axis")
        for axis, values in v.items():
            if not isinstance(values, (list, dict)) or not values:
                raise ValueError(
                    f"grid axis `{axis}` must be a non-empty list of values of a job key (such as "
                    "`bn.momentum: [0.1, 0.01]`) or a mapping of row labels to dotted overrides"
                )
        return v


@dataclass(frozen=True)
class Row:
    index: int  # 0-based, in table order
    label: str
    overrides: dict[str, Any]  # dotted key -> value, the row's own settings
    reference: float | None


@dataclass(frozen=True)
class Trial:
    run_id: str
    row: int
    label: str
    seed: int
    job: dict[str, Any] = field(repr=False)  # the complete, validated job of this run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Sweep:
    """A resolved sweep: the rows of the table and every trial's complete job."""

    sweep_id: str
    name: str
    title: str
    source: str
    file: str
    rows: list[Row]
    trials: list[Trial]
    seeds: int
    metric: str
    trial_resources: dict[str, float]
    max_concurrent: int | None
    overrides: list[str]  # the command's --set
    store: str  # every trial writes to this artifact store

    def as_dict(self) -> dict[str, Any]:
        return {
            "sweep_id": self.sweep_id,
            "name": self.name,
            "title": self.title,
            "source": self.source,
            "file": self.file,
            "seeds": self.seeds,
            "metric": self.metric,
            "trial_resources": self.trial_resources,
            "max_concurrent": self.max_concurrent,
            "overrides": self.overrides,
            "store": self.store,
            "rows": [asdict(r) for r in self.rows],
            "trials": [t.as_dict() for t in self.trials],
        }


def find_sweep_file(name_or_file: str) -> Path:
    """A path, or a name of the sweeps shipped in ``jobs/sweeps`` (``bn-momentum`` works too)."""
    p = Path(name_or_file)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_file or "/" in name_or_file:
        if p.is_file():
            return p
        raise ConfigError(
            f"sweep file {name_or_file!r} does not exist. Pass a sweep YAML, or the name of one "
            f"of the shipped sweeps: {', '.join(shipped_sweeps()) or '(none found)'}."
        )
    stem = name_or_file.replace("-", "_")
    for d in _sweep_dirs():
        cand = d / f"{stem}.yaml"
        if cand.is_file():
            return cand
    raise ConfigError(
        f"no sweep named {name_or_file!r}. The shipped sweeps are "
        f"{', '.join(shipped_sweeps()) or '(none found)'} (files in jobs/sweeps/); or pass the "
        "path of your own sweep YAML."
    )


def _sweep_dirs() -> list[Path]:
    here = Path(__file__).resolve().parents[2] / SWEEP_DIR  # a source checkout
    dirs = [SWEEP_DIR, here]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d.resolve() not in [x.resolve() for x in dirs[:i]]]


def shipped_sweeps() -> list[str]:
    names: set[str] = set()
    for d in _sweep_dirs():
        names.update(p.stem.replace("_", "-") for p in d.glob("*.yaml"))
    return sorted(names)


def _format(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key `{loc}` (allowed: {', '.join(SweepFile.model_fields)})")
        elif e["type"] == "missing":
            parts.append(f"`{loc}` is required")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"`{loc or '(top level)'}`: got {e.get('input')!r}: {msg}")
    return f"{source}: invalid sweep: " + "; ".join(parts) + "."


def read_sweep_file(path: Path) -> SweepFile:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file must be a mapping (name, base, grid, ...).")
    try:
        return SweepFile.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, str(path))) from None


def _rows(spec: SweepFile, source: str) -> list[Row]:
    axes: list[list[tuple[str, dict[str, Any]]]] = []
    for axis, values in spec.grid.items():
        if isinstance(values, dict):
            for label, overrides in values.items():
                if not isinstance(overrides, dict):
                    raise ConfigError(
                        f"{source}: grid axis `{axis}`, value {label!r}: expected a mapping of "
                        f"dotted job keys to values (for example {{optim.lr: 0.01}}), got "
                        f"{overrides!r}. For plain values write the axis as a list under a job "
                        "key, such as `bn.momentum: [0.1, 0.01]`."
                    )
            axes.append([(str(label), dict(o)) for label, o in values.items()])
        else:
            axes.append([(f"{axis}={v}", {axis: v}) for v in values])
    rows: list[Row] = []
    labels = []
    for combo in itertools.product(*axes):
        label = ROW_SEP.join(lbl for lbl, _ in combo)
        labels.append(label)
        if label in spec.exclude:
            continue
        merged: dict[str, Any] = {}
        for _, o in combo:
            merged.update(o)
        merged.update(spec.row_set.get(label, {}))
        rows.append(Row(len(rows), label, merged, spec.reference.get(label)))
    for what, keys in (("exclude", spec.exclude), ("row_set", spec.row_set), ("reference", spec.reference)):
        unknown = [k for k in keys if k not in labels]
        if unknown:
            raise ConfigError(
                f"{source}: `{what}` names rows the grid does not have: {', '.join(map(repr, unknown))}. "
                f"The rows are: {', '.join(map(repr, labels))}."
            )
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{source}: two grid values have the same label; labels must be unique.")
    return rows


def _base_job(spec: SweepFile, path: Path) -> dict[str, Any]:
    if isinstance(spec.base, dict):
        return copy.deepcopy(spec.base)
    base = (path.parent / spec.base) if not Path(spec.base).is_absolute() else Path(spec.base)
    hint = f"given as `base: {spec.base}` in {path} (relative to the sweep file), or write the job inline"
    return read_job_file(base, missing_hint=hint)


def _apply(data: dict, overrides: dict[str, Any], what: str) -> None:
    for key, value in overrides.items():
        set_dotted(data, str(key).split("."), value, what=f"{what} `{key}`")


def _absolute_paths(job: dict[str, Any]) -> None:
    """Local relative paths become absolute: Tune runs trials in their own working folders."""
    from resnet_cluster.config import default_store

    arts = job.setdefault("artifacts", {})
    store = arts.get("store") or default_store()
    if "://" not in str(store):
        store = os.path.abspath(os.path.expanduser(str(store)))
    arts["store"] = store
    data = job.get("data") or {}
    root = data.get("root")
    if root and "://" not in str(root):
        data["root"] = os.path.abspath(os.path.expanduser(str(root)))


def load_sweep(
    name_or_file: str,
    *,
    sweep_id: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    seeds: int | None = None,
) -> Sweep:
    """Resolve a sweep file into rows and validated trial jobs. Raises ConfigError.

    ``sweep_id`` defaults to a new one (``<name>-<UTC time>-<4 hex>``); trial run ids are
    ``<sweep_id>-<row number>-s<seed index>``.
    """
    from resnet_cluster.launch.submit import new_run_id

    path = find_sweep_file(name_or_file)
    spec = read_sweep_file(path)
    sweep_id = sweep_id or new_run_id(spec.name)
    source = str(path)
    rows = _rows(spec, source)
    base = _base_job(spec, path)
    _apply(base, spec.set, f"{source}: set")
    res = spec.trial_resources
    _apply(
        base,
        {"scaling.cpus_per_worker": res.cpu, "scaling.use_gpu": res.gpu > 0, **({"scaling.gpus_per_worker": res.gpu} if res.gpu else {})},
        f"{source}: trial_resources",
    )
    parsed = [parse_override(text) for text in overrides]
    n_seeds = seeds if seeds is not None else spec.seeds
    if n_seeds < 1:
        raise ConfigError(f"--seeds {n_seeds}: a sweep needs at least one seed per row.")
    trials: list[Trial] = []
    stores: set[str] = set()
    for k in range(n_seeds):
        for row in rows:
            job = copy.deepcopy(base)
            _apply(job, row.overrides, f"{source}: row {row.label!r}")
            for keypath, value in parsed:
                set_dotted(job, keypath, value, what=f"--set {'.'.join(keypath)}")
            job["seed"] = int(job.get("seed", 0) or 0) + k
            _absolute_paths(job)
            where = f"{source}, row {row.label!r}" + (" (with --set overrides)" if overrides else "")
            cfg = from_dict(job, source=where)
            if cfg.scaling.use_gpu and cfg.scaling.max_workers > 1 and cfg.scaling.gpus_per_worker < 1:
                raise ConfigError(
                    f"{where}: trial_resources gpu {cfg.scaling.gpus_per_worker:g} with "
                    f"{cfg.scaling.describe_workers()} workers per trial: DDP ranks need whole GPUs (NCCL "
                    "refuses two ranks on one GPU). Use scaling.workers: 1 for fractional-GPU "
                    "trials, or gpu: 1."
                )
            stores.add(cfg.artifacts.store)
            run_id = f"{sweep_id}-{row.index + 1:02d}-s{k}"
            trials.append(Trial(run_id, row.index, row.label, cfg.seed, cfg.to_dict()))
    if len(stores) > 1:
        raise ConfigError(
            f"{source}: the rows write to different artifact stores ({', '.join(sorted(stores))}); "
            "a sweep keeps all its runs in one store. Set artifacts.store once, in the base job."
        )
    return Sweep(
        sweep_id=sweep_id,
        name=spec.name,
        title=spec.title,
        source=spec.source,
        file=str(path),
        rows=rows,
        trials=trials,
        seeds=n_seeds,
        metric=spec.metric,
        trial_resources=res.model_dump(),
        max_concurrent=spec.max_concurrent,
        overrides=list(overrides),
        store=stores.pop(),
    )
