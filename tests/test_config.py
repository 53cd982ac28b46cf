"""Job config: defaults, YAML loading, --set precedence, validation messages, the store default,
and the CLI's handling of user errors (exit 2, one message, no traceback). No Ray is started:
the CLI is only run with ``submit --dry-run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from resnet_cluster import config
from resnet_cluster.config import JobConfig, apply_overrides, parse_override
from resnet_cluster.errors import ConfigError, UserError
from resnet_cluster.models.jobs import from_dict, load

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "smoke.yaml"
CLI = Path(sys.executable).parent / "resnet-cluster"

TOP_KEYS = list(JobConfig.model_fields)
OPTIM_KEYS = ["solver", "lr", "momentum", "nesterov", "weight_decay"]


def write_job(tmp_path: Path, doc: dict | str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


def smoke_dict() -> dict:
    return yaml.safe_load(SMOKE.read_text())


def config_error(data: dict, overrides=()) -> str:
    with pytest.raises(ConfigError) as ei:
        from_dict(apply_overrides(data, list(overrides)), source="jobs/x.yaml")
    assert isinstance(ei.value, UserError) and ei.value.exit_code == 2
    return str(ei.value)


# ---------------------------------------------------------------------------- defaults
def test_defaults_are_the_paper_cifar_recipe(monkeypatch):
    monkeypatch.delenv(config.STORE_ENV, raising=False)
    cfg = JobConfig()
    assert cfg.name == "job" and cfg.seed == 0
    assert cfg.model.arch == "cifar_resnet20" and cfg.model.shortcut == "A"
    assert cfg.data.dataset == "cifar10" and cfg.data.augment == "paper"
    assert cfg.train.batch_size == 128 and cfg.train.iterations == 64000 and cfg.train.epochs is None
    assert cfg.train.unit == "iterations"
    assert (cfg.optim.solver, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert cfg.optim.nesterov is False
    assert cfg.schedule.policy == "multistep" and cfg.schedule.milestones == [] and cfg.schedule.gamma == 0.1
    assert cfg.schedule.warmup is None
    assert cfg.scaling.workers == 2 and cfg.per_worker_batch == 64
    assert cfg.artifacts.store == config.DEFAULT_STORE == "./runs-store"
    # an empty dict validates to the same defaults, and the model name is checked
    assert from_dict({}) == cfg


def test_config_is_frozen():
    cfg = JobConfig()
    with pytest.raises(Exception):
        cfg.optim.lr = 0.5  # type: ignore[misc]


def test_to_dict_round_trips():
    cfg = load(SMOKE)
    assert from_dict(cfg.to_dict()) == cfg
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


# ---------------------------------------------------------------------------- YAML and precedence
def test_load_smoke_yaml():
    cfg = load(SMOKE)
    assert cfg.name == "smoke"
    assert cfg.data.dataset == "synthetic" and cfg.data.synthetic_train == 2560 and cfg.data.synthetic_test == 512
    assert cfg.train.batch_size == 64 and cfg.train.iterations == 200 and cfg.train.log_every_iterations == 10
    assert cfg.schedule.milestones == [150]
    assert cfg.scaling.workers == 2 and cfg.per_worker_batch == 32
    assert cfg.optim.weight_decay == pytest.approx(1e-4)


def test_precedence_defaults_then_yaml_then_set(tmp_path):
    job = write_job(
        tmp_path,
        {
            "name": "prec",
            "optim": {"lr": 0.05, "momentum": 0.8},
            "schedule": {"milestones": [100, 200]},
            "train": {"iterations": 1000, "batch_size": 64},
        },
    )
    cfg = load(job)
    # YAML beats defaults; untouched fields keep defaults (also inside a touched section)
    assert cfg.optim.lr == 0.05 and cfg.optim.momentum == 0.8 and cfg.optim.weight_decay == 1e-4
    assert cfg.schedule.milestones == [100, 200] and cfg.schedule.gamma == 0.1
    assert cfg.model.arch == "cifar_resnet20"

    cfg = load(job, ["schedule.milestones=[400,500]", "optim.lr=0.01", "seed=7", "optim.nesterov=true"])
    # --set beats YAML, values are parsed as YAML (list, float, int, bool)
    assert cfg.schedule.milestones == [400, 500]
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)
    assert cfg.seed == 7 and cfg.optim.nesterov is True
    assert cfg.optim.momentum == 0.8  # from the YAML, not overridden


def test_set_can_create_a_section_and_later_set_wins(tmp_path):
    job = write_job(tmp_path, {"train": {"iterations": 10}})
    cfg = load(job, ["schedule.warmup.lr=0.01", "schedule.warmup.iterations=400", "optim.lr=0.2", "optim.lr=0.3"])
    assert cfg.schedule.warmup is not None
    assert cfg.schedule.warmup.lr == 0.01 and cfg.schedule.warmup.iterations == 400
    assert cfg.optim.lr == 0.3


def test_apply_overrides_does_not_mutate_input():
    data = {"optim": {"lr": 0.1}}
    out = apply_overrides(data, ["optim.lr=0.5", "model.arch=cifar_resnet32"])
    assert data == {"optim": {"lr": 0.1}}
    assert out == {"optim": {"lr": 0.5}, "model": {"arch": "cifar_resnet32"}}


def test_parse_override_values_are_yaml():
    assert parse_override("schedule.milestones=[400,500]") == (["schedule", "milestones"], [400, 500])
    assert parse_override("optim.lr=0.01") == (["optim", "lr"], 0.01)
    assert parse_override("a=b=c") == (["a"], "b=c")
    assert parse_override("train.epochs=null") == (["train", "epochs"], None)


def test_empty_job_file_is_all_defaults(tmp_path):
    assert load(write_job(tmp_path, "")) == from_dict({})


# ---------------------------------------------------------------------------- unknown keys
def test_unknown_top_level_key_names_it_and_lists_allowed(tmp_path):
    job = write_job(tmp_path, {"name": "x", "optimizer": {"lr": 0.1}})
    with pytest.raises(ConfigError) as ei:
        load(job)
    msg = str(ei.value)
    assert str(job) in msg
    assert "`optimizer`" in msg
    for k in TOP_KEYS:
        assert k in msg


def test_unknown_nested_key_in_yaml_names_dotted_key(tmp_path):
    job = write_job(tmp_path, {"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError) as ei:
        load(job)
    msg = str(ei.value)
    assert "optim.lrr" in msg and str(job) in msg
    assert "allowed here" in msg
    for k in OPTIM_KEYS:
        assert k in msg


def test_unknown_key_via_set():
    msg = config_error(smoke_dict(), ["optim.lrr=0.1"])
    assert "optim.lrr" in msg and all(k in msg for k in OPTIM_KEYS)


def test_unknown_key_inside_optional_section():
    msg = config_error({}, ["schedule.warmup.lr=0.01", "schedule.warmup.until=80"])
    assert "schedule.warmup.until" in msg
    for k in ("lr", "until_train_error", "iterations"):
        assert k in msg


# ---------------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("override", "field", "value"),
    [
        ("model.shortcut=Z", "model.shortcut", "'Z'"),
        ("optim.lr=-1", "optim.lr", "-1"),
        ("optim.lr=abc", "optim.lr", "'abc'"),
        ("optim.momentum=1.5", "optim.momentum", "1.5"),
        ("train.batch_size=0", "train.batch_size", "0"),
        ("data.dataset=imagenet21k", "data.dataset", "'imagenet21k'"),
        ("schedule.milestones=[500,400]", "schedule.milestones", "[500, 400]"),
    ],
)
def test_bad_value_names_field_and_value(override, field, value):
    msg = config_error(smoke_dict(), [override])
    assert f"`{field}`" in msg
    assert value in msg
    assert "jobs/x.yaml" in msg


def test_batch_not_divisible_by_workers_names_both_fields():
    msg = config_error(smoke_dict(), ["scaling.workers=3"])
    assert "train.batch_size" in msg and "scaling.workers" in msg
    assert "64" in msg and "3" in msg


def test_batch_divisible_gives_per_worker_batch():
    cfg = from_dict(apply_overrides(smoke_dict(), ["scaling.workers=4", "train.batch_size=128"]))
    assert cfg.per_worker_batch == 32


@pytest.mark.parametrize(
    "data, overrides",
    [
        ({"train": {"batch_size": 64, "iterations": 200, "epochs": 3}}, []),  # both in one file
        (None, ["train.iterations=null"]),  # neither
    ],
)
def test_exactly_one_of_iterations_and_epochs(data, overrides):
    msg = config_error(data if data is not None else smoke_dict(), overrides)
    assert "train.iterations" in msg and "train.epochs" in msg


@pytest.mark.parametrize(
    "overrides, unit, length",
    [
        (["train.epochs=3"], "epochs", 3),  # smoke.yaml counts iterations
        (["train.epochs=3", "train.iterations=7"], "iterations", 7),  # the later --set wins
    ],
)
def test_a_later_budget_replaces_the_other_unit(overrides, unit, length):
    cfg = from_dict(apply_overrides(smoke_dict(), overrides))
    assert cfg.train.unit == unit
    assert getattr(cfg.train, unit) == length
    other = "iterations" if unit == "epochs" else "epochs"
    assert getattr(cfg.train, other) is None


def test_epochs_alone_is_fine():
    cfg = from_dict(apply_overrides(smoke_dict(), ["train.iterations=null", "train.epochs=3"]))
    assert cfg.train.unit == "epochs" and cfg.train.epochs == 3


def test_unknown_arch_names_field_and_suggests_models_list():
    msg = config_error(smoke_dict(), ["model.arch=resnet9000"])
    assert "model.arch" in msg and "resnet9000" in msg
    assert "models list" in msg
    assert "cifar_resnet20" in msg  # and lists the choices


def test_unknown_model_block_is_refused_at_load():
    msg = config_error(smoke_dict(), ["model.block=bottleneck"])
    assert "model.block" in msg and "bottleneck" in msg


def test_missing_job_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        load(missing)
    assert str(missing) in str(ei.value) and "does not exist" in str(ei.value)


def test_job_file_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load(write_job(tmp_path, "- a\n- b\n"))


def test_job_file_invalid_yaml(tmp_path):
    job = write_job(tmp_path, "optim: {lr: 0.1\n")
    with pytest.raises(ConfigError) as ei:
        load(job)
    assert str(job) in str(ei.value) and "YAML" in str(ei.value)


@pytest.mark.parametrize("bad", ["optim.lr", "=0.1", "  =1"])
def test_malformed_set(bad):
    with pytest.raises(ConfigError) as ei:
        load(SMOKE, [bad])
    msg = str(ei.value)
    assert repr(bad) in msg and "KEY.PATH=VALUE" in msg


def test_set_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="`lr` is a value, not a section"):
        load(SMOKE, ["optim.lr.x=1"])


def test_overrides_mentioned_in_source():
    with pytest.raises(ConfigError) as ei:
        load(SMOKE, ["optim.lr=-1"])
    assert "smoke.yaml (with --set overrides)" in str(ei.value)


# ---------------------------------------------------------------------------- store default
def test_store_env_sets_default_and_explicit_store_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(config.STORE_ENV, "s3://bucket/from-env")
    assert config.default_store() == "s3://bucket/from-env"
    assert JobConfig().artifacts.store == "s3://bucket/from-env"
    assert load(SMOKE).artifacts.store == "s3://bucket/from-env"  # smoke.yaml sets no store

    job = write_job(tmp_path, {"train": {"iterations": 5}, "artifacts": {"store": "/explicit/store"}})
    assert load(job).artifacts.store == "/explicit/store"
    assert load(SMOKE, ["artifacts.store=/from/set"]).artifacts.store == "/from/set"

    monkeypatch.delenv(config.STORE_ENV)
    assert JobConfig().artifacts.store == "./runs-store"
    monkeypatch.setenv(config.STORE_ENV, "")  # empty counts as unset
    assert config.default_store() == "./runs-store"


# ---------------------------------------------------------------------------- CLI end to end
def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    assert CLI.exists(), f"console script not found at {CLI}"
    env = {**os.environ, "COLUMNS": "200", **(env_extra or {})}
    return subprocess.run(
        [str(CLI), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_unknown_key_exit_2_one_paragraph_no_traceback(tmp_path):
    job = write_job(tmp_path, {"name": "x", "train": {"iterations": 5}, "optim": {"lrr": 0.1}})
    p = run_cli("submit", str(job), "--dry-run")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    err = p.stderr.strip()
    assert str(job) in err and "optim.lrr" in err
    assert "\n\n" not in err  # one paragraph
    assert p.stdout.strip() == ""


def test_cli_dry_run_json_scaling_plan():
    p = run_cli("submit", "jobs/smoke.yaml", "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    plan = doc["scaling_plan"]
    assert plan["workers"] == 2 and plan["per_worker_batch"] == 32 and plan["global_batch"] == 64
    assert doc["job"]["name"] == "smoke"
    assert doc["run_id"] is None

    p = run_cli("submit", "jobs/smoke.yaml", "--dry-run", "--json", "--workers", "4", "--set", "train.batch_size=128")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    plan = doc["scaling_plan"]
    assert plan["workers"] == 4 and plan["per_worker_batch"] == 32 and plan["global_batch"] == 128
    assert doc["job"]["train"]["batch_size"] == 128 and doc["job"]["scaling"]["workers"] == 4


def test_cli_batch_that_does_not_split_exits_2():
    p = run_cli("submit", "jobs/smoke.yaml", "--dry-run", "--json", "--workers", "3")
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert "train.batch_size" in p.stderr and "scaling.workers" in p.stderr
    assert p.stdout.strip() == ""


def test_cli_error_message_is_printed_verbatim():
    p = run_cli("submit", "jobs/smoke.yaml", "--dry-run", "--set", "name='[bold]x'")
    assert p.returncode == 2
    assert "[bold]x" in p.stderr
