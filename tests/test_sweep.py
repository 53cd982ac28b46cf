"""Sweep files, their validation, and the report's arithmetic (no Ray: see test_sweep_ray.py).

The shipped sweeps must hold exactly the rows and figures of the published tables
(docs/references.md §4); a bad sweep file fails before anything is written; the report's mean, std,
best and diff are checked against hand-computed numbers on runs written through the store.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.manifest import write_manifest
from resnet_cluster.artifacts.run import RunWriter
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.errors import ConfigError
from resnet_cluster.sweep import report, runner
from resnet_cluster.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "resnet-cluster")

# docs/references.md §4 (gcr/torch-residual-networks), row by row.
DEPTH = {"ResNet-20": 8.29, "ResNet-32": 7.63, "ResNet-44": 7.14, "ResNet-56": 6.94, "ResNet-110": 6.73}
ARCH = {
    ("standard", 20): 8.29, ("standard", 110): 6.97,
    ("no_relu", 20): 8.62, ("no_relu", 110): 6.32,
    ("bn_after_add", 20): 8.34, ("bn_after_add", 110): 13.56,
    ("bn_after_add_no_relu", 20): 8.23, ("bn_after_add_no_relu", 110): 12.30,
}  # fmt: skip
SOLVERS = {  # (solver, lr or None, depth): error; no RMSprop 1e-1 on ResNet-20
    ("sgd", 0.1, 20): 8.29, ("sgd", 0.1, 110): 6.97,
    ("rmsprop", 1e-4, 20): 16.77, ("rmsprop", 1e-4, 110): 14.82,
    ("rmsprop", 1e-3, 20): 10.55, ("rmsprop", 1e-3, 110): 8.21,
    ("rmsprop", 1e-2, 20): 9.45, ("rmsprop", 1e-2, 110): 7.68,
    ("rmsprop", 1e-1, 110): 10.98,
    ("adadelta", None, 20): 10.93, ("adadelta", None, 110): 8.88,
    ("adagrad", 1e-3, 20): 35.36, ("adagrad", 1e-3, 110): 30.22,
    ("adagrad", 1e-2, 20): 16.03, ("adagrad", 1e-2, 110): 13.21,
    ("adagrad", 1e-1, 20): 12.55, ("adagrad", 1e-1, 110): 11.45,
}  # fmt: skip
BN = {(1.0, "fixed"): 8.63, (0.01, "fixed"): 8.35, (0.1, "fixed"): 8.29, (0.1, "dynamic"): 8.22}


def _depth(job: dict) -> int:
    return int(job["model"]["arch"].removeprefix("cifar_resnet"))


def _by_row(sw) -> dict[int, dict]:
    return {t.row: t.job for t in sw.trials}


def test_depth_sweep_is_gcrs_depth_table():
    sw = load_sweep("depth", seeds=1)
    jobs = _by_row(sw)
    assert [r.label for r in sw.rows] == list(DEPTH)
    assert [r.reference for r in sw.rows] == list(DEPTH.values())
    assert [_depth(jobs[r.index]) for r in sw.rows] == [20, 32, 44, 56, 110]
    # gcr's recipe: 200 epochs, lr 0.1 ÷10 at epochs 80 and 160, Nesterov; 110 layers warm up.
    for job in jobs.values():
        assert job["train"]["epochs"] == 200 and job["train"]["iterations"] is None
        assert job["schedule"]["milestones"] == [80, 160] and job["optim"]["nesterov"] is True
        assert job["train"]["batch_size"] == 128
    assert jobs[4]["schedule"]["warmup"]["lr"] == 0.001 and jobs[4]["schedule"]["warmup"]["iterations"] == 400
    assert jobs[0]["schedule"]["warmup"] is None


def test_architecture_sweep_is_gcrs_block_table():
    sw = load_sweep("architecture", seeds=1)
    jobs = _by_row(sw)
    got = {(jobs[r.index]["model"]["block"], _depth(jobs[r.index])): r.reference for r in sw.rows}
    assert got == ARCH


def test_solvers_sweep_is_gcrs_solver_table():
    sw = load_sweep("solvers", seeds=1)
    jobs = _by_row(sw)
    got = {}
    for r in sw.rows:
        o = jobs[r.index]["optim"]
        lr = None if o["solver"] == "adadelta" else o["lr"]
        got[(o["solver"], lr, _depth(jobs[r.index]))] = r.reference
        assert o["nesterov"] is (o["solver"] == "sgd")
    assert got == SOLVERS
    adadelta = {_depth(jobs[r.index]): jobs[r.index] for r in sw.rows if "Adadelta" in r.label}
    assert adadelta[20]["optim"]["rho"] == 0.3 and adadelta[110]["optim"]["rho"] == 0.9
    assert adadelta[20]["schedule"]["policy"] == "constant"


def test_bn_momentum_sweep_is_gcrs_bn_table():
    sw = load_sweep("bn-momentum", seeds=1)
    jobs = _by_row(sw)
    got = {(jobs[r.index]["bn"]["momentum"], jobs[r.index]["bn"]["policy"]): r.reference for r in sw.rows}
    assert got == BN
    assert {_depth(j) for j in jobs.values()} == {20}


def test_trials_are_rows_times_seeds_with_resources_and_overrides():
    sw = load_sweep("depth", seeds=3, overrides=["train.epochs=2", "data.dataset=synthetic"], sweep_id="depth-x")
    assert len(sw.trials) == 15
    assert [t.seed for t in sw.trials[:6]] == [0, 0, 0, 0, 0, 1]  # seed-major: a full table first
    assert sw.trials[6].run_id == "depth-x-02-s1"
    for t in sw.trials:
        assert t.job["train"]["epochs"] == 2 and t.job["data"]["dataset"] == "synthetic"
        # trial_resources {gpu: 0.25, cpu: 2} are each training worker's resources
        assert t.job["scaling"]["gpus_per_worker"] == 0.25 and t.job["scaling"]["cpus_per_worker"] == 2
        assert t.job["scaling"]["use_gpu"] is True and t.job["scaling"]["workers"] == 1
        assert Path(t.job["artifacts"]["store"]).is_absolute()  # trials run in Tune's folders


@pytest.mark.parametrize("name", ["depth", "architecture", "solvers", "bn-momentum"])
def test_the_readme_laptop_line_counts_iterations_on_every_shipped_sweep(name):
    # README: `--set data.dataset=synthetic --set train.iterations=20 --set scaling.use_gpu=false`
    # on sweeps whose base job counts epochs: the later --set replaces the budget.
    laptop = ["data.dataset=synthetic", "train.iterations=20", "scaling.use_gpu=false"]
    sw = load_sweep(name, seeds=1, overrides=laptop)
    for t in sw.trials:
        assert t.job["train"]["iterations"] == 20 and t.job["train"].get("epochs") is None
        assert t.job["scaling"]["use_gpu"] is False


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


BASE = """
name: t
base: {path}
grid:
  model.arch: [cifar_resnet20, cifar_plain20]
  opt:
    a: {{optim.lr: 0.1}}
    b: {{optim.lr: 0.01}}
"""


def _base(tmp_path: Path, extra: str = "", **fmt) -> Path:
    return _write(tmp_path, BASE.format(path=REPO / "jobs" / "smoke.yaml") + extra)


def test_key_axes_and_named_axes_make_a_product_in_order(tmp_path):
    p = _base(tmp_path, 'reference: {"model.arch=cifar_plain20 / b": 9.5}\nrow_set: {"model.arch=cifar_resnet20 / a": {bn.momentum: 0.5}}\n')
    sw = load_sweep(str(p), seeds=2)
    assert [r.label for r in sw.rows] == [
        "model.arch=cifar_resnet20 / a", "model.arch=cifar_resnet20 / b",
        "model.arch=cifar_plain20 / a", "model.arch=cifar_plain20 / b",
    ]  # fmt: skip
    assert [r.reference for r in sw.rows] == [None, None, None, 9.5]
    jobs = _by_row(sw)
    assert jobs[0]["bn"]["momentum"] == 0.5 and jobs[1]["bn"]["momentum"] == 0.1
    assert (jobs[3]["model"]["arch"], jobs[3]["optim"]["lr"]) == ("cifar_plain20", 0.01)


@pytest.mark.parametrize(
    "extra, words",
    [
        ("seeds_count: 3\n", ["unknown key `seeds_count`", "allowed"]),
        ("trial_resources: {gpus: 1}\n", ["trial_resources.gpus"]),
        ("seeds: two\n", ["`seeds`", "'two'"]),
        ('exclude: ["model.arch=cifar_resnet20 / c"]\n', ["`exclude`", "cifar_resnet20 / c", "The rows are"]),
        ('reference: {"resnet20 / a": 8.0}\n', ["`reference`", "'resnet20 / a'"]),
    ],
)
def test_a_bad_sweep_file_names_the_key(tmp_path, extra, words):
    with pytest.raises(ConfigError) as e:
        load_sweep(str(_base(tmp_path, extra)))
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "grid, words",
    [
        ("  bn.momentum: [high]\n", ["row 'bn.momentum=high'", "`bn.momentum`", "'high'"]),
        ("  optim.lrr: [0.1]\n", ["unknown key `optim.lrr`"]),
        ("  model.arch: [resnet9000]\n", ["`model.arch`", "resnet9000", "unknown model"]),
        ("  x:\n    a: 0.1\n", ["grid axis `x`", "expected a mapping of dotted job keys"]),
    ],
)
def test_a_bad_grid_value_names_the_row_and_field(tmp_path, grid, words):
    p = _write(tmp_path, f"name: t\nbase: {REPO / 'jobs' / 'smoke.yaml'}\ngrid:\n{grid}")
    with pytest.raises(ConfigError) as e:
        load_sweep(str(p))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_fractional_gpus_need_single_worker_trials(tmp_path):
    p = _base(tmp_path, "trial_resources: {gpu: 0.5, cpu: 1}\n")
    with pytest.raises(ConfigError, match="DDP ranks need whole GPUs"):
        load_sweep(str(p))  # smoke.yaml has 2 workers per run
    assert load_sweep(str(p), overrides=["scaling.workers=1"]).trials[0].job["scaling"]["gpus_per_worker"] == 0.5


def test_cli_refuses_a_bad_sweep_before_anything_runs(tmp_path):
    store = tmp_path / "store"
    p = _write(tmp_path, f"name: t\nbase: {REPO / 'jobs' / 'smoke.yaml'}\ngrid:\n  bn.momentum: [0.1, fast]\n")
    proc = subprocess.run(
        [CLI, "sweep", str(p), "--set", f"artifacts.store={store}"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "bn.momentum=fast" in proc.stderr
    assert not store.exists()  # nothing was written, nothing ran
    proc = subprocess.run([CLI, "sweep", "nosuchsweep"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "depth" in proc.stderr and "solvers" in proc.stderr


def test_dry_run_lists_trials_and_runs_nothing(tmp_path):
    store = tmp_path / "store"
    proc = subprocess.run(
        [CLI, "sweep", "bn-momentum", "--seeds", "2", "--dry-run", "--json", "--set", f"artifacts.store={store}"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["dry_run"] and len(doc["trials"]) == 8 and len(doc["rows"]) == 4
    assert {t["seed"] for t in doc["trials"]} == {0, 1}
    assert doc["rows"][3]["overrides"] == {"bn.policy": "dynamic"}
    assert not store.exists()
    table = subprocess.run([CLI, "sweep", "run", "bn-momentum", "--dry-run"], capture_output=True, text=True, cwd=REPO)
    assert table.returncode == 0 and "Nothing" in table.stdout and "dynamic" in table.stdout, table.stdout


# ---------------------------------------------------------------------------------------------
# The report, on runs written through the store the way submit writes them.


def _finished_run(store: ArtifactStore, run_id: str, sweep_id: str, err: float, best: float, curve: list[float]) -> None:
    w = RunWriter(store, run_id)
    store.write_text(run_id, layout.CONFIG, "name: t\n")
    w.event("submitted", sweep_id=sweep_id)
    rows = [{"iteration": 10 * (i + 1), "epoch": i, "loss": 2.0 - 0.1 * i} for i in range(len(curve))]
    store.write_text(run_id, layout.TRAIN_CSV, _csv(rows))
    store.write_text(run_id, layout.TEST_CSV, _csv([{"iteration": 10 * (i + 1), "epoch": i, "top1_err": e} for i, e in enumerate(curve)]))
    w.write_summary("finished", final={"top1_err": err}, best={"top1_err": best}, job="t", model="m")
    w.event("finished")
    write_manifest(store, run_id)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=list(rows[0]))
    wr.writeheader()
    wr.writerows(rows)
    return buf.getvalue()


@pytest.fixture
def reported(tmp_path):
    p = _base(tmp_path, 'reference: {"model.arch=cifar_resnet20 / a": 8.0}\n')
    store = ArtifactStore(tmp_path / "store")
    sw = load_sweep(str(p), seeds=3, sweep_id="t-1", overrides=[f"artifacts.store={tmp_path / 'store'}"])
    meta = runner.save(store, sw, ("abc123\n", ""))
    errs = {0: [9.0, 10.0, 11.5], 1: [20.0, 20.0, None], 2: [None, None, None], 3: [5.0, None, None]}
    for t in meta["trials"]:
        e = errs[t["row"]][t["seed"]]
        if e is not None:
            _finished_run(store, t["run_id"], "t-1", e, e - 1, [50.0, e])
    # row 2: one run started and stopped (not finished), the others never started
    stopped = next(t for t in meta["trials"] if t["row"] == 2)["run_id"]
    RunWriter(store, stopped).event("submitted", sweep_id="t-1")
    RunWriter(store, stopped).event("stopped", reason="test")
    # a run of another sweep with the same numbers does not count
    _finished_run(store, "other-run", "t-2", 99.0, 99.0, [99.0, 99.0])
    return store, report.build(store, "t-1")


def test_report_mean_std_best_reference_diff(reported):
    _, rep = reported
    rows = rep["rows"]
    assert len(rows) == 4 and rep["total_trials"] == 12 and rep["finished_trials"] == 6 and not rep["complete"]
    r0 = rows[0]
    assert r0["mean"] == pytest.approx(10.1666667) and r0["std"] == pytest.approx(1.2583057)  # sample std
    assert r0["best"] == 9.0 and r0["reference"] == 8.0 and r0["diff"] == pytest.approx(2.1666667)
    assert (rows[1]["mean"], rows[1]["std"], rows[1]["n"]) == (20.0, 0.0, 2)
    assert rows[2]["mean"] is None and [r["status"] for r in rows[2]["runs"]] == ["stopped", "not started", "not started"]
    assert (rows[3]["mean"], rows[3]["std"], rows[3]["n"]) == (5.0, None, 1)


def test_report_formats(reported, tmp_path):
    store, rep = reported
    md = report.markdown(rep)
    assert "| model.arch=cifar_resnet20 / a | 10.17 ± 1.26 | 9.00 | 8.00 | +2.17 | 3/3 |" in md
    assert "| model.arch=cifar_plain20 / b | 5.00 | 5.00 |  |  | 1/3 |" in md
    rows = list(csv.DictReader(io.StringIO(report.to_csv(rep))))
    assert rows[0]["mean"].startswith("10.1666") and rows[2]["mean"] == "" and rows[3]["std"] == ""
    assert json.loads(report.to_json(rep))["rows"][1]["n"] == 2
    png = report.plot(store, rep)
    assert png and Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = subprocess.run(
        [CLI, "sweep", "report", "t-1", "--store", str(tmp_path / "store"), "--format", "markdown", "--no-plot"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == md
    listed = subprocess.run([CLI, "sweep", "list", "--store", str(tmp_path / "store"), "--json"], capture_output=True, text=True)
    first = json.loads(listed.stdout)["sweeps"][0]
    assert (first["sweep_id"], first["finished_trials"], first["total_trials"]) == ("t-1", 6, 12)
    missing = subprocess.run([CLI, "sweep", "report", "t-9", "--store", str(tmp_path / "store")], capture_output=True, text=True)
    assert missing.returncode == 2 and "t-1" in missing.stderr and "Traceback" not in missing.stderr


def test_a_sweep_run_with_a_changed_experiment_shows_its_budget_and_no_diff(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    laptop = [f"artifacts.store={tmp_path / 'store'}", "data.dataset=synthetic", "train.epochs=2"]
    sw = load_sweep("depth", seeds=1, sweep_id="d-9", overrides=laptop)
    meta = runner.save(store, sw, ("abc123\n", ""))
    first = meta["trials"][0]
    _finished_run(store, first["run_id"], "d-9", 50.0, 49.0, [60.0, 50.0])
    rep = report.build(store, "d-9")
    assert rep["comparable"] is False and rep["budget"] == "2 epochs"
    assert rep["changed_by"] == ["data.dataset=synthetic", "train.epochs=2"]  # not the store
    assert rep["title"] == "CIFAR-10: effect of depth (2 epochs)" and "(200 epochs)" in rep["file_title"]
    row = rep["rows"][0]
    assert row["mean"] == 50.0 and row["reference"] == 8.29 and row["diff"] is None
    md = report.markdown(rep)
    assert "| 50.00 | 50.00 | 8.29 | n/c | 1/1 |" in md
    assert "Not comparable with the reference: the trials ran with --set data.dataset=synthetic, train.epochs=2 (2 epochs)" in md
    table = subprocess.run(
        [CLI, "sweep", "report", "d-9", "--store", str(tmp_path / "store"), "--no-plot"],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert table.returncode == 0 and "(2 epochs)" in table.stdout and "n/c" in table.stdout
    assert "200 epochs" not in table.stdout and "Not comparable" in table.stdout


def test_a_sweep_run_as_published_is_comparable(reported):
    _, rep = reported  # overridden only artifacts.store
    assert rep["comparable"] is True and rep["changed_by"] == [] and rep["budget"] == "200 iterations"
    assert "Not comparable" not in report.markdown(rep)


def test_runs_list_filters_by_sweep(reported, tmp_path):
    proc = subprocess.run(
        [CLI, "runs", "list", "--store", str(tmp_path / "store"), "--sweep", "t-1", "--json"], capture_output=True, text=True
    )
    ids = {r["run_id"] for r in json.loads(proc.stdout)}
    assert len(ids) == 7 and "other-run" not in ids


def test_sweep_record_is_create_only(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    sw = load_sweep("bn-momentum", seeds=1, sweep_id="b-1", overrides=[f"artifacts.store={tmp_path / 'store'}"])
    runner.save(store, sw, ("c\n", ""))
    before = (tmp_path / "store" / "sweeps" / "b-1" / "sweep.json").read_bytes()
    with pytest.raises(Exception):
        runner.save(store, sw, ("c\n", ""))
    assert (tmp_path / "store" / "sweeps" / "b-1" / "sweep.json").read_bytes() == before
    assert yaml.safe_load((tmp_path / "store" / "sweeps" / "b-1" / "sweep.yaml").read_text())["name"] == "bn_momentum"


def test_concurrency_is_capped_by_what_fits_unless_remote_trials_wait_forever(tmp_path):
    sw = load_sweep("depth", seeds=2, sweep_id="d-1", overrides=[f"artifacts.store={tmp_path}"])
    meta = sw.as_dict()  # 10 trials, max_concurrent 16, each 0.25 GPU + 2 CPUs
    cluster = {"CPU": 16.0, "GPU": 2.0}
    assert runner.concurrency(meta, 10, {"local": True, "resources": cluster}) == 8  # 2 GPUs / 0.25
    assert runner.concurrency(meta, 10, {"local": True, "resources": {"CPU": 6.0, "GPU": 2.0}}) == 3
    assert runner.concurrency(meta, 10, {"local": False, "resources": {"CPU": 2.0}}) == 1  # 0 GPUs now
    waits = load_sweep("depth", seeds=2, sweep_id="d-2", overrides=[f"artifacts.store={tmp_path}", "failure.start_timeout_s=-1"])
    assert runner.concurrency(waits.as_dict(), 10, {"local": False, "resources": {"CPU": 2.0}}) == 10
    assert runner.concurrency(waits.as_dict(), 10, {"local": True, "resources": {"CPU": 2.0}}) == 1


def test_an_unreachable_jobs_api_address_is_one_message_and_records_nothing(tmp_path):
    # A Jobs API URL submits the sweep's driver as a Ray job (tests/test_cluster_ray.py runs one);
    # a cluster that cannot be reached is a user error, and the sweep is recorded by the driver
    # on the cluster only, so nothing is written here.
    store = tmp_path / "store"
    proc = subprocess.run(
        [CLI, "sweep", "bn-momentum", "--address", "http://127.0.0.1:9", "--set", f"artifacts.store={store}"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert "http://127.0.0.1:9" in err and "could not be reached" in err
    assert not store.exists()
