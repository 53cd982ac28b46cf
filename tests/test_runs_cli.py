"""`resnet-cluster runs …` as a user runs it (console script, subprocess) on a local store:
list filters, show's text plot, download with checksums, compare (+ PNG), restore-source of a
dirty working tree, delete. Runs are written with the library's own writers, not by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.manifest import write_manifest
from resnet_cluster.artifacts.provenance import git_provenance
from resnet_cluster.artifacts.registry import text_plot
from resnet_cluster.artifacts.run import CsvLog, RunWriter
from resnet_cluster.artifacts.store import ArtifactStore

CLI = str(Path(sys.executable).parent / "resnet-cluster")


def cli(store: Path, *args: str, cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RESNET_CLUSTER_"))}
    env["RESNET_CLUSTER_STORE"] = str(store)
    env["COLUMNS"] = "200"
    return subprocess.run([CLI, "runs", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          input=input, timeout=120)  # fmt: skip


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}  # fmt: skip
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


def make_run(store: ArtifactStore, run_id: str, *, lr: float, errs: list[float], source: Path | None = None,
             sweep: str | None = None, finish: bool = True) -> None:  # fmt: skip
    w = RunWriter(store, run_id)
    w.event("submitted", sweep_id=sweep)
    store.write_text(run_id, layout.CONFIG,
                     f"name: cifar_r20\nseed: 0\nmodel: {{arch: cifar_resnet20}}\noptim: {{lr: {lr}, momentum: 0.9}}\n"
                     f"train: {{iterations: {10 * len(errs)}}}\nartifacts: {{store: {store.root}}}\n")  # fmt: skip
    commit, patch = git_provenance(source or "/nonexistent-folder")
    store.write_text(run_id, layout.GIT_COMMIT, commit)
    store.write_text(run_id, layout.GIT_PATCH, patch)
    w.event("started")
    log = CsvLog(store, run_id, layout.TEST_CSV, ["epoch", "iteration", "top1_err", "top5_err"], min_interval_s=0)
    for e, err in enumerate(errs):
        log.append({"epoch": e, "iteration": 10 * (e + 1), "top1_err": err, "top5_err": err / 4})
    log.close()
    store.write_bytes(run_id, layout.MODEL, os.urandom(9 * 2**20))  # > 8 MiB: gets a progress bar
    if finish:
        best = min(range(len(errs)), key=errs.__getitem__)
        w.event("finished")
        w.write_summary("finished", epochs=len(errs), iterations=10 * len(errs),
                        final={"top1_err": errs[-1], "epoch": len(errs) - 1},
                        best={"top1_err": errs[best], "epoch": best})  # fmt: skip
        write_manifest(store, run_id)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("store") / "store"
    store = ArtifactStore(str(root))
    make_run(store, "r-a", lr=0.1, errs=[80.0, 40.0, 20.0, 22.0], sweep="sw1")
    make_run(store, "r-b", lr=0.01, errs=[85.0, 60.0, 45.0, 30.0], sweep="sw1")
    make_run(store, "r-live", lr=0.1, errs=[90.0, 70.0], finish=False)
    return root, store


def test_list_filters_and_json(runs):
    root, _ = runs
    out = cli(root, "list", "--json")
    assert out.returncode == 0, out.stderr
    got = {r["run_id"]: r for r in json.loads(out.stdout)}
    assert got["r-a"]["status"] == "finished" and got["r-a"]["sweep_id"] == "sw1"
    assert got["r-live"]["status"] == "running" and got["r-live"]["sweep_id"] is None
    ids = lambda *a: sorted(r["run_id"] for r in json.loads(cli(root, "list", "--json", *a).stdout))
    assert ids("--sweep", "sw1") == ["r-a", "r-b"]
    assert ids("--status", "running") == ["r-live"]
    assert ids("--status", "running,finished") == ["r-a", "r-b", "r-live"]
    assert ids("--sweep", "nope") == []
    table = cli(root, "list", "--sweep", "sw1").stdout
    assert "r-a" in table and "r-live" not in table and "sweep" in table
    bad = cli(root, "list", "--status", "done")
    assert bad.returncode == 2 and "Unknown run status done" in bad.stderr


def test_show_has_config_metrics_text_plot_and_files(runs):
    root, _ = runs
    out = cli(root, "show", "r-a")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "cifar_resnet20" in text and "20.00%" in text and "22.00%" in text  # best, final
    assert "test top-1 error (%), 4 evaluations, iteration 10 … 40" in text
    plot = [line for line in text.splitlines() if "┤" in line or "│" in line and "•" in line]
    assert plot[0].strip().startswith("80.00 ┤•") and plot[-1].strip().startswith("20.00 ┤")
    assert "model.pt" in text and "9,437,184" in text
    doc = json.loads(cli(root, "show", "r-a", "--json").stdout)
    assert [r["top1_err"] for r in doc["test_error"]] == [80.0, 40.0, 20.0, 22.0]


def test_text_plot_shape():
    lines = text_plot([10.0, 5.0, 0.0], width=60, height=3)
    assert lines == ["  10.00 ┤•  ", "        │ • ", "   0.00 ┤  •", "        └───"]
    assert len(text_plot(list(range(500)), width=40)[0]) == 9 + 40  # resampled to the width
    assert text_plot([1.0]) == []


def test_download_only_checks_and_refuses_escapes(runs, tmp_path):
    root, store = runs
    out = cli(root, "download", "r-a", str(tmp_path / "all"), "--json")
    assert out.returncode == 0, out.stderr
    files = {f["path"]: f for f in json.loads(out.stdout)["files"]}
    manifest = store.read_json("r-a", layout.MANIFEST)
    assert set(files) == {e["path"] for e in manifest["files"]}
    for e in manifest["files"]:
        assert files[e["path"]]["sha256"] == e["sha256"]
        assert (tmp_path / "all" / e["path"]).read_bytes() == store.read_bytes("r-a", e["path"])
    out = cli(root, "download", "r-a", "--only", "model,patch", cwd=tmp_path)  # DEST defaults to ./RUN
    assert out.returncode == 0, out.stderr and "sha256 verified" in out.stdout
    assert sorted(os.listdir(tmp_path / "r-a")) == sorted([layout.MANIFEST, layout.MODEL, layout.GIT_COMMIT,
                                                           layout.GIT_PATCH])  # fmt: skip
    bad = cli(root, "download", "r-a", "--only", "weights", cwd=tmp_path)
    assert bad.returncode == 2 and "Unknown --only group weights" in bad.stderr
    live = cli(root, "download", "r-live", str(tmp_path / "live"))
    assert live.returncode == 2 and "no manifest.json" in live.stderr and not (tmp_path / "live").exists()
    for escape in ("../r-a", "/tmp/r-a"):
        bad = cli(root, "download", escape, cwd=tmp_path)
        assert bad.returncode == 2 and "is a path" in bad.stderr and "Traceback" not in bad.stderr


def test_compare_diff_metrics_and_plot(runs, tmp_path):
    root, _ = runs
    png = tmp_path / "cmp.png"
    out = cli(root, "compare", "r-a", "r-b", "r-live", "--json", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["config_diff"] == {"optim.lr": [0.1, 0.01, 0.1], "train.iterations": [40, 40, 20]}
    m = doc["metrics"]
    assert (m["r-a"]["final"]["top1_err"], m["r-a"]["best"]["top1_err"]) == (22.0, 20.0)
    assert (m["r-b"]["final"]["top1_err"], m["r-b"]["best"]["top1_err"]) == (30.0, 30.0)
    assert m["r-live"]["status"] == "running" and m["r-live"]["final"]["top1_err"] == 70.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = cli(root, "compare", "r-a", "r-b").stdout
    assert "optim.lr" in table and "0.01" in table and "22.00%" in table and "30.00%" in table
    one = cli(root, "compare", "r-a")
    assert one.returncode == 2 and "at least two" in one.stderr
    missing = cli(root, "compare", "r-a", "r-bb")
    assert missing.returncode == 2 and "Did you mean r-b" in missing.stderr


@pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0, reason="no git")
def test_restore_source_reproduces_a_dirty_tree(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / ".gitignore").write_text("*.log\ndata/\n")
    (repo / "train.py").write_text("lr = 0.1\nprint(lr)\n")
    (repo / "gone.py").write_text("x = 1\n")
    (repo / "pkg").mkdir()
    (repo / "pkg" / "blob.bin").write_bytes(bytes(range(256)) * 4)
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    head = _git(repo, "rev-parse", "HEAD").strip()
    # the dirty tree of the run: modified, deleted, binary-modified and untracked files
    (repo / "train.py").write_text("lr = 0.05  # tuned\nprint(lr)\n")
    (repo / "gone.py").unlink()
    (repo / "pkg" / "blob.bin").write_bytes(bytes(reversed(range(256))) * 4)
    (repo / "pkg" / "new_module.py").write_text("def f():\n    return 42\n")
    (repo / "notes with space.txt").write_text("untracked\n")
    (repo / "debug.log").write_text("ignored, never recorded\n")

    store = ArtifactStore(str(tmp_path / "store"))
    make_run(store, "r-src", lr=0.05, errs=[50.0, 40.0], source=repo)
    expected = {p.relative_to(repo).as_posix(): p.read_bytes() for p in repo.rglob("*")
                if p.is_file() and ".git" not in p.parts and p.name != "debug.log"}  # fmt: skip

    # the user's checkout moved on after the run; restore must not care
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "later work")
    (repo / "train.py").write_text("lr = 999\n")

    dest = tmp_path / "restored"
    out = cli(tmp_path / "store", "restore-source", "r-src", str(dest), "--repo", str(repo), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["commit"] == head and doc["patched"] is True
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*")
           if p.is_file() and ".git" not in p.parts}  # fmt: skip
    assert got == expected
    assert _git(dest, "rev-parse", "HEAD").strip() == head
    status = _git(dest, "status", "--porcelain").splitlines()
    assert sorted(status) == sorted([" M train.py", " D gone.py", " M pkg/blob.bin", "?? pkg/new_module.py",
                                     '?? "notes with space.txt"'])  # fmt: skip
    # the restored tree records the same provenance as the run
    assert git_provenance(dest)[1] == store.read_text("r-src", layout.GIT_PATCH)

    again = cli(tmp_path / "store", "restore-source", "r-src", str(dest), "--repo", str(repo))
    assert again.returncode == 2 and "not empty" in again.stderr
    nogit = tmp_path / "store2"
    make_run(ArtifactStore(str(nogit)), "r-nogit", lr=0.1, errs=[1.0, 2.0])
    bad = cli(nogit, "restore-source", "r-nogit", str(tmp_path / "x"))
    assert bad.returncode == 2 and "recorded no git commit" in bad.stderr


def test_delete_asks_and_deletes_only_that_run(tmp_path):
    root = tmp_path / "store"
    store = ArtifactStore(str(root))
    make_run(store, "r1", lr=0.1, errs=[1.0, 2.0])
    make_run(store, "r10", lr=0.1, errs=[1.0, 2.0])
    no = cli(root, "delete", "r1", input="n\n")
    assert no.returncode == 1 and "Delete run r1" in no.stdout and store.exists("r1", layout.MANIFEST)
    yes = cli(root, "delete", "r1", input="y\n")
    assert yes.returncode == 0 and not (root / "runs" / "r1").exists()
    assert store.list_run_ids() == ["r10"] and store.list_files("r10")
    missing = cli(root, "delete", "r1", "--yes")
    assert missing.returncode == 2 and "No run 'r1'" in missing.stderr
    assert cli(root, "delete", "r10", "--yes").returncode == 0 and store.list_run_ids() == []
    bad = cli(root, "delete", "../store", "--yes")
    assert bad.returncode == 2 and "is a path" in bad.stderr and root.exists()
