"""Artifact store, run files, provenance, manifest and registry (local folders, temp git repos,
and one round trip through a real S3 HTTP endpoint served by moto on loopback)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess

import pytest

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.manifest import verify_manifest, write_manifest
from resnet_cluster.artifacts.provenance import environment_snapshot, git_provenance, redact
from resnet_cluster.artifacts.registry import list_runs, run_status, show_run
from resnet_cluster.artifacts.run import CsvLog, RunWriter
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.errors import StoreError, UserError


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(str(tmp_path / "store"))


# ---------------------------------------------------------------------------- store
def test_local_root_is_absolute_and_run_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = ArtifactStore("rel-store")
    assert s.is_local
    assert s.root == str(tmp_path / "rel-store")
    assert s.run_uri("r1") == str(tmp_path / "rel-store" / "runs" / "r1")


@pytest.mark.parametrize("bad", ["", "../x", "/abs", "a/b", "a\\b", "..", ".hidden", "a b", "x:y"])
def test_run_id_validation_rejects(bad, store):
    with pytest.raises(StoreError):
        layout.validate_run_id(bad)
    with pytest.raises(StoreError):
        store.write_text(bad, "f.txt", "x")


def test_run_id_validation_accepts():
    for ok in ["r1", "cifar_r20-2024.01.01", "A-b_c.9"]:
        assert layout.validate_run_id(ok) == ok
    assert issubclass(StoreError, UserError)


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a/../b", "a//b", "a\\b"])
def test_relpath_cannot_escape_run(bad, store):
    with pytest.raises(StoreError):
        store.write_text("r1", bad, "x")


def test_write_read_atomic_and_no_temp_left(store, tmp_path):
    store.write_text("r1", "a.txt", "hello")
    store.write_json("r1", "d/x.json", {"a": 1})
    store.write_bytes("r1", "b.bin", b"\x00\x01")
    assert store.read_text("r1", "a.txt") == "hello"
    assert store.read_json("r1", "d/x.json") == {"a": 1}
    assert store.read_bytes("r1", "b.bin") == b"\x00\x01"
    store.write_text("r1", "a.txt", "replaced")
    assert store.read_text("r1", "a.txt") == "replaced"
    run_dir = tmp_path / "store" / "runs" / "r1"
    assert sorted(p.name for p in run_dir.iterdir()) == ["a.txt", "b.bin", "d"]
    assert store.list_files("r1") == [("a.txt", 8), ("b.bin", 2), ("d/x.json", 13)]

    src = tmp_path / "local.bin"
    src.write_bytes(b"x" * 1000)
    store.put_file("r1", src, "checkpoints/c.pt")
    assert store.exists("r1", "checkpoints/c.pt") and store.exists("r1") and not store.exists("r2")
    out = tmp_path / "dl" / "c.pt"
    store.download("r1", "checkpoints/c.pt", out)
    assert out.read_bytes() == b"x" * 1000
    store.remove("r1", "checkpoints")
    assert not store.exists("r1", "checkpoints/c.pt")
    store.remove("r1", "checkpoints")  # missing is fine
    assert store.list_run_ids() == ["r1"]


def test_failed_write_keeps_old_file(store, monkeypatch):
    store.write_text("r1", "a.txt", "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StoreError, match="disk full"):
        store.write_text("r1", "a.txt", "new")
    monkeypatch.undo()
    assert store.read_text("r1", "a.txt") == "old"
    assert [name for name, _ in store.list_files("r1")] == ["a.txt"]
    assert os.listdir(store.run_uri("r1")) == ["a.txt"]  # temp file cleaned up


def test_missing_file_and_run_errors_name_uri(store):
    with pytest.raises(StoreError, match="nothing.txt"):
        store.read_text("r1", "nothing.txt")
    with pytest.raises(StoreError, match="runs list"):
        store.list_files("nope")
    assert store.list_run_ids() == []


def test_append_lines(store):
    store.append_lines("r1", "events.jsonl", ["a", "b\n"])
    store.append_lines("r1", "events.jsonl", ["c"])
    store.append_lines("r1", "events.jsonl", [])
    assert store.read_text("r1", "events.jsonl") == "a\nb\nc\n"


# ---------------------------------------------------------------------------- run files
def test_run_writer_events(store):
    w = RunWriter(store, "r1")
    w.event("started", attempt=1)
    w.event("finished", epochs=3)
    lines = store.read_text("r1", layout.EVENTS).splitlines()
    events = [json.loads(l) for l in lines]
    assert [e["event"] for e in events] == ["started", "finished"]
    assert events[0]["attempt"] == 1 and events[0]["time"].endswith("+00:00")


def _rows(store, name):
    return list(csv.DictReader(io.StringIO(store.read_text("r1", name))))


def test_csv_log_growth_interval_and_resume(store):
    log = CsvLog(store, "r1", layout.TRAIN_CSV, ["iteration", "loss", "lr"], min_interval_s=3600)
    log.append({"iteration": 1, "loss": 0.1, "lr": 0.1})  # first row goes up at once
    log.append({"iteration": 2, "loss": 1 / 3, "lr": 0.1})  # within the interval: local only
    assert len(_rows(store, layout.TRAIN_CSV)) == 1
    log.flush()
    rows = _rows(store, layout.TRAIN_CSV)
    assert [r["iteration"] for r in rows] == ["1", "2"]
    assert float(rows[1]["loss"]) == 1 / 3  # repr precision round-trips
    with pytest.raises(ValueError):
        log.append({"iteration": 3, "bogus": 1})
    for i in range(3, 7):
        log.append({"iteration": i, "loss": 0.5, "lr": 0.01})
    log.close()
    assert len(_rows(store, layout.TRAIN_CSV)) == 6

    # A restart resumes from a checkpoint at iteration 4: later rows are dropped.
    log2 = CsvLog(store, "r1", layout.TRAIN_CSV, ["iteration", "loss", "lr"], min_interval_s=0)
    kept = log2.resume(lambda r: int(r["iteration"]) <= 4)
    assert kept == 4
    assert [r["iteration"] for r in _rows(store, layout.TRAIN_CSV)] == ["1", "2", "3", "4"]
    log2.append({"iteration": 5, "loss": 0.25, "lr": 0.01})
    rows = _rows(store, layout.TRAIN_CSV)
    assert [r["iteration"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert rows[1]["loss"] == repr(1 / 3)
    log2.close()

    fresh = CsvLog(store, "r2", layout.TEST_CSV, ["epoch", "top1_err"])
    assert fresh.resume(lambda r: True) == 0
    assert store.read_text("r2", layout.TEST_CSV) == "epoch,top1_err\n"
    fresh.close()


# ---------------------------------------------------------------------------- manifest
def test_manifest_write_verify_and_tamper(store):
    store.write_text("r1", layout.CONFIG, "name: x\n")
    store.write_bytes("r1", "checkpoints/epoch-1.pt", os.urandom(3 * 1024 * 1024 + 7))
    assert verify_manifest(store, "r1") and "incomplete" in verify_manifest(store, "r1")[0]
    m = write_manifest(store, "r1")
    assert [f["path"] for f in m["files"]] == ["checkpoints/epoch-1.pt", layout.CONFIG]
    assert store.read_json("r1", layout.MANIFEST)["files"] == m["files"]
    assert verify_manifest(store, "r1") == []

    store.write_text("r1", layout.CONFIG, "name: y\n")  # same size, different bytes
    problems = verify_manifest(store, "r1")
    assert len(problems) == 1 and "sha256" in problems[0] and layout.CONFIG in problems[0]
    store.write_text("r1", layout.CONFIG, "name: longer\n")
    assert "size" in verify_manifest(store, "r1")[0]
    store.remove("r1", "checkpoints/epoch-1.pt")
    store.write_text("r1", "extra.txt", "x")
    problems = "\n".join(verify_manifest(store, "r1"))
    assert "missing file: checkpoints/epoch-1.pt" in problems and "extra.txt" in problems


# ---------------------------------------------------------------------------- provenance
def _git(repo, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


@needs_git
def test_git_provenance_commit_and_patch(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / ".gitignore").write_text("ignored.txt\nbig/\n")
    (repo / "tracked.py").write_text("x = 1\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    _git(repo, "remote", "add", "origin", "https://user:s3cret@example.com/r.git")
    (repo / "tracked.py").write_text("x = 2\n")
    (repo / "new_module.py").write_text("y = 3\n")
    (repo / "blob.bin").write_bytes(bytes(range(256)))
    (repo / "ignored.txt").write_text("SECRET\n")
    (repo / "big").mkdir()
    (repo / "big" / "data.bin").write_text("data\n")
    (repo / "sub").mkdir()

    commit, patch = git_provenance(repo / "sub")  # any folder inside the checkout
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert commit.splitlines()[0] == head
    assert "s3cret" not in commit and "example.com" in commit
    assert "diff --git a/tracked.py b/tracked.py" in patch and "+x = 2" in patch
    assert "new file mode" in patch and "+y = 3" in patch and "b/new_module.py" in patch
    assert "GIT binary patch" in patch
    assert "ignored.txt" not in patch and "SECRET" not in patch and "big/data.bin" not in patch

    # The patch rebuilds the working tree from the commit.
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(repo), str(clone))
    (clone / "p.patch").write_text(patch, encoding="utf-8", errors="surrogateescape")
    _git(clone, "apply", "p.patch")
    assert (clone / "tracked.py").read_text() == "x = 2\n"
    assert (clone / "blob.bin").read_bytes() == bytes(range(256))

    # Clean tree: empty patch.
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "more")
    commit, patch = git_provenance(repo)
    assert patch == "" and "dirty: no" in commit


@needs_git
def test_git_provenance_no_commits_and_not_a_checkout(tmp_path):
    repo = tmp_path / "fresh"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("*.log\n")
    (repo / "a.py").write_text("a = 1\n")
    (repo / "run.log").write_text("noise\n")
    commit, patch = git_provenance(repo)
    assert "no commits" in commit
    assert "+a = 1" in patch and ".gitignore" in patch and "run.log" not in patch

    plain = tmp_path / "plain"
    plain.mkdir()
    commit, patch = git_provenance(plain)
    assert commit == patch == f"# not a git checkout: {plain}\n"


def test_redaction_and_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "sess")
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.1:10001")
    monkeypatch.setenv("HOME_UNRELATED_PASSWORD", "not picked")
    env = environment_snapshot()
    assert env["env"]["AWS_SECRET_ACCESS_KEY"] == "<redacted>"
    assert env["env"]["RAY_AUTH_TOKEN"] == "<redacted>"
    assert env["env"]["AWS_SESSION_TOKEN"] == "<redacted>"
    assert env["env"]["RAY_ADDRESS"] == "ray://10.0.0.1:10001"
    assert "HOME_UNRELATED_PASSWORD" not in env["env"]
    dumped = json.dumps(env)
    assert "very-secret" not in dumped and "tok\"" not in dumped
    assert env["packages"]["torch"] != "not installed" and "version" in env["python"]
    assert redact({"db": {"password": "p", "host": "h"}, "url": "s3://k:s@host/b"}) == {
        "db": {"password": "<redacted>", "host": "h"},
        "url": "s3://<redacted>@host/b",
    }


# ---------------------------------------------------------------------------- registry
def test_status_rules():
    ev = lambda *kinds: [{"event": k, "time": "t"} for k in kinds]
    assert run_status(False, {"status": "finished"}, ev("started", "finished")) == "incomplete"
    assert run_status(False, None, ev("submitted", "started", "checkpoint")) == "running"
    assert run_status(False, None, ev("started", "failed")) == "failed"
    assert run_status(False, None, ev("started", "failed", "restarted")) == "running"
    assert run_status(False, None, []) == "incomplete"
    assert run_status(True, {"status": "finished"}, ev("finished")) == "finished"
    assert run_status(True, {"status": "stopped"}, []) == "stopped"
    assert run_status(True, None, ev("finished")) == "incomplete"


def test_list_and_show_runs(store):
    done = RunWriter(store, "done")
    done.event("started")
    store.write_text("done", layout.CONFIG, "name: cifar_r20\nmodel: {arch: cifar_resnet20}\ntrain: {epochs: 3}\n")
    done.event("finished")
    done.write_summary("finished", epochs=3, iterations=300, final={"top1_err": 0.09}, best={"top1_err": 0.085})
    write_manifest(store, "done")

    # Summary says finished, but no manifest: never "finished".
    half = RunWriter(store, "half")
    half.event("started")
    half.event("finished")
    half.write_summary("finished", epochs=1)

    live = RunWriter(store, "live")
    live.event("submitted")
    live.event("checkpoint", epoch=1)

    runs = {r.run_id: r for r in list_runs(store)}
    assert runs["done"].status == "finished"
    assert runs["done"].job == "cifar_r20" and runs["done"].model == "cifar_resnet20"
    assert runs["done"].best_top1_err == 0.085 and runs["done"].final_top1_err == 0.09
    assert runs["done"].epochs == 3 and runs["done"].iterations == 300 and runs["done"].finished
    assert runs["half"].status == "incomplete"
    assert runs["live"].status == "running"
    assert [r.run_id for r in list_runs(store)][0] == "live"  # newest first

    shown = show_run(store, "done")
    assert shown["config"]["name"] == "cifar_r20" and shown["summary"]["status"] == "finished"
    assert shown["manifest_problems"] == [] and shown["events"][-1]["event"] == "finished"
    assert layout.MANIFEST in dict(shown["files"]) and shown["record"]["status"] == "finished"
    assert show_run(store, "half")["manifest_problems"]
    with pytest.raises(StoreError, match="runs list"):
        show_run(store, "donee")


# ---------------------------------------------------------------------------- real S3 endpoint


def test_s3_round_trip(s3_endpoint, tmp_path):
    import s3fs

    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir("artifacts-test")
    store = ArtifactStore("s3://artifacts-test/prefix")
    assert not store.is_local
    assert store.root == "s3://artifacts-test/prefix"
    assert store.run_uri("r1") == "s3://artifacts-test/prefix/runs/r1"
    assert store.list_run_ids() == []

    store.write_text("r1", layout.CONFIG, "name: s3\n")
    local = tmp_path / "w.pt"
    local.write_bytes(b"w" * 5000)
    store.put_file("r1", local, "checkpoints/w.pt")
    w = RunWriter(store, "r1")
    w.event("started")
    w.event("finished")
    assert [json.loads(l)["event"] for l in store.read_text("r1", layout.EVENTS).splitlines()] == [
        "started",
        "finished",
    ]
    log = CsvLog(store, "r1", layout.TEST_CSV, ["epoch", "top1_err"], min_interval_s=0)
    log.append({"epoch": 1, "top1_err": 0.5})
    log.append({"epoch": 2, "top1_err": 0.25})
    log.close()
    assert store.read_text("r1", layout.TEST_CSV) == "epoch,top1_err\n1,0.5\n2,0.25\n"
    w.write_summary("finished", epochs=2, final={"top1_err": 0.25}, best={"top1_err": 0.25})
    write_manifest(store, "r1")

    assert store.list_run_ids() == ["r1"]
    assert dict(store.list_files("r1"))["checkpoints/w.pt"] == 5000
    assert verify_manifest(store, "r1") == []
    assert [(r.run_id, r.status) for r in list_runs(store)] == [("r1", "finished")]
    store.write_text("r1", layout.CONFIG, "name: S3\n")
    assert "sha256" in verify_manifest(store, "r1")[0]
    store.download("r1", "checkpoints/w.pt", tmp_path / "back.pt")
    assert (tmp_path / "back.pt").read_bytes() == b"w" * 5000
    with pytest.raises(StoreError, match="s3://artifacts-test/prefix/runs/r1/missing.txt"):
        store.read_text("r1", "missing.txt")
    with pytest.raises(StoreError, match="does not exist"):
        ArtifactStore("s3://no-such-bucket/x").list_run_ids()
