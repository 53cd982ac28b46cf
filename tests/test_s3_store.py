"""The artifact store against a real S3 HTTP endpoint (moto's server on 127.0.0.1), no Ray.

Multipart uploads and their abort, a killed upload, checksum errors on download, path
traversal, credentials and endpoint errors (in-process and through the CLI), the Ray Train
storage filesystem, listing many runs, sweep/status filters and delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.manifest import verify_manifest, write_manifest
from resnet_cluster.artifacts.registry import list_runs
from resnet_cluster.artifacts.run import RunWriter
from resnet_cluster.artifacts.store import MULTIPART_CHUNK, ArtifactStore, pyarrow_filesystem
from resnet_cluster.artifacts.transfer import download_run
from resnet_cluster.errors import StoreError

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "resnet-cluster")
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RESNET_CLUSTER_STORE_ENDPOINT")  # fmt: skip


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3env(endpoint, monkeypatch):
    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    s3fs.S3FileSystem.clear_instance_cache()
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()


_buckets = iter(range(10**6))


@pytest.fixture
def bucket(s3env):
    name = f"bkt-{next(_buckets)}"
    s3fs.S3FileSystem(endpoint_url=s3env).mkdir(name)
    return name


def _uploads(store: ArtifactStore, bucket: str) -> list[dict]:
    return store.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])


def _finished_run(store: ArtifactStore, run_id: str, tmp_path: Path, *, model_bytes: bytes = b"") -> None:
    w = RunWriter(store, run_id)
    w.event("submitted")
    store.write_text(run_id, layout.CONFIG, "name: s3\nmodel: {arch: cifar_resnet20}\n")
    store.write_text(run_id, layout.TEST_CSV, "epoch,iteration,top1_err\n0,10,50.0\n1,20,25.0\n")
    if model_bytes:
        local = tmp_path / f"{run_id}-model.pt"
        local.write_bytes(model_bytes)
        store.put_file(run_id, local, layout.MODEL)
    w.event("finished")
    w.write_summary("finished", epochs=2, final={"top1_err": 25.0}, best={"top1_err": 25.0})
    write_manifest(store, run_id)


# ---------------------------------------------------------------------------- multipart
def test_large_file_goes_up_multipart_and_round_trips(bucket, tmp_path):
    store = ArtifactStore(f"s3://{bucket}/p")
    data = os.urandom(2 * MULTIPART_CHUNK + 12345)  # 3 parts
    src = tmp_path / "ckpt.pt"
    src.write_bytes(data)
    store.put_file("r1", src, "checkpoints/epoch_00001/train_state.pt")
    key = f"p/runs/r1/checkpoints/epoch_00001/train_state.pt"
    head = store.fs.call_s3("head_object", Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: md5-of-md5s "-<parts>"
    back = tmp_path / "back.pt"
    store.download("r1", "checkpoints/epoch_00001/train_state.pt", back)
    assert back.read_bytes() == data
    assert _uploads(store, bucket) == []


def test_failed_multipart_upload_is_aborted_and_old_object_kept(bucket, tmp_path):
    from fsspec.callbacks import Callback

    store = ArtifactStore(f"s3://{bucket}/p")
    store.write_text("r1", layout.MODEL, "old model")

    class Cancel(Callback):  # what a progress bar sees when the user cancels mid-upload
        def relative_update(self, inc=1):
            super().relative_update(inc)
            raise RuntimeError("upload cancelled after the first part")

    src = tmp_path / "big.pt"
    src.write_bytes(os.urandom(3 * MULTIPART_CHUNK))
    with pytest.raises(Exception, match="cancelled"):
        store.put_file("r1", src, layout.MODEL, callback=Cancel())
    assert _uploads(store, bucket) == []  # aborted: no invisible, billed parts left
    assert store.read_text("r1", layout.MODEL) == "old model"  # the earlier object is intact


_KILLED_UPLOADER = r"""
import os, sys
from resnet_cluster.artifacts.store import ArtifactStore
store = ArtifactStore(sys.argv[1])
print("uploading", flush=True)
store.put_file("r1", sys.argv[2], "model.pt")
print("done", flush=True)
"""


def test_upload_killed_part_way_leaves_run_unfinished_and_earlier_files_intact(bucket, tmp_path, s3env):
    root = f"s3://{bucket}/p"
    store = ArtifactStore(root)
    w = RunWriter(store, "r1")
    w.event("submitted")
    w.event("started")
    store.write_text("r1", layout.CONFIG, "name: killed\n")
    store.write_text("r1", layout.TRAIN_CSV, "iteration,loss\n20,2.0\n40,1.5\n")
    before = {rel: store.read_bytes("r1", rel) for rel, _ in store.list_files("r1")}

    big = tmp_path / "model.pt"
    big.write_bytes(os.urandom(24 * MULTIPART_CHUNK))  # 384 MiB: seconds of upload here
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_UPLOADER, root, str(big)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _uploads(store, bucket):
            assert proc.poll() is None, "the upload finished before it could be killed"
            time.sleep(0.05)
        assert _uploads(store, bucket), "no multipart upload started"
        time.sleep(0.3)  # some parts in flight
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "done" not in proc.stdout.read()

    s3fs.S3FileSystem.clear_instance_cache()
    store = ArtifactStore(root)
    assert not store.exists("r1", layout.MODEL)  # no partial object was published
    assert {rel: store.read_bytes("r1", rel) for rel, _ in store.list_files("r1")} == before
    (rec,) = list_runs(store)
    assert rec.status in ("running", "incomplete") and rec.status != "finished"
    assert "incomplete" in verify_manifest(store, "r1")[0]
    with pytest.raises(StoreError, match="no manifest.json"):
        download_run(store, "r1", tmp_path / "dl")
    # SIGKILL leaves its upload open; deleting the run aborts it with the run's objects.
    assert _uploads(store, bucket)
    store.delete_run("r1")
    assert _uploads(store, bucket) == [] and store.list_run_ids() == []


# ---------------------------------------------------------------------------- downloads
def test_download_verifies_and_a_corrupted_object_names_the_file(bucket, tmp_path):
    store = ArtifactStore(f"s3://{bucket}/p")
    model = os.urandom(3 * MULTIPART_CHUNK)
    _finished_run(store, "r1", tmp_path, model_bytes=model)
    done = download_run(store, "r1", tmp_path / "ok")
    assert (tmp_path / "ok" / layout.MODEL).read_bytes() == model
    assert {f["path"] for f in done} >= {layout.MODEL, layout.CONFIG, layout.TEST_CSV, layout.SUMMARY}
    assert json.loads((tmp_path / "ok" / layout.MANIFEST).read_text())["run_id"] == "r1"
    only = download_run(store, "r1", tmp_path / "only", only=["csv"])
    assert [f["path"] for f in only] == [layout.TEST_CSV]
    assert sorted(os.listdir(tmp_path / "only")) == [layout.MANIFEST, layout.TEST_CSV]

    # Same size, different bytes: only the checksum can tell.
    damaged = bytearray(model)
    damaged[len(damaged) // 2] ^= 0xFF
    store.fs.pipe_file(f"{bucket}/p/runs/r1/{layout.MODEL}", bytes(damaged))
    with pytest.raises(StoreError, match=r"Checksum error: model\.pt of run r1"):
        download_run(store, "r1", tmp_path / "bad")
    assert not (tmp_path / "bad" / layout.MODEL).exists()
    assert not [p for p in (tmp_path / "bad").rglob("*") if p.name.startswith(layout.TEMP_PREFIX)]

    proc = subprocess.run([CLI, "runs", "download", "r1", str(tmp_path / "cli"), "--store", f"s3://{bucket}/p"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "model.pt" in proc.stderr and "Traceback" not in proc.stderr


def test_path_traversal_refused(bucket, tmp_path):
    store = ArtifactStore(f"s3://{bucket}/p")
    for bad in ("../r1", "/etc", "..", "a/../../b"):
        with pytest.raises(StoreError, match="is a path"):
            download_run(store, bad, tmp_path / "dl")
    # A manifest that names a file outside the run folder is refused before anything is written.
    _finished_run(store, "r2", tmp_path)
    manifest = store.read_json("r2", layout.MANIFEST)
    manifest["files"].append({"path": "../../../escaped.txt", "size": 1, "sha256": "0" * 64})
    store.fs.pipe_file(f"{bucket}/p/runs/r2/{layout.MANIFEST}", json.dumps(manifest).encode())
    with pytest.raises(StoreError, match="escaped.txt"):
        download_run(store, "r2", tmp_path / "dl2")
    assert not (tmp_path / "dl2").exists() and not list(tmp_path.rglob("escaped.txt"))
    for bad in ("../r2", str(tmp_path)):
        proc = subprocess.run([CLI, "runs", "download", bad, "--store", f"s3://{bucket}/p"], cwd=tmp_path,
                              capture_output=True, text=True, env=dict(os.environ), timeout=120)  # fmt: skip
        assert proc.returncode == 2 and "is a path" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- errors
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def auth_endpoint():
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): any key
    it did not issue is rejected with InvalidAccessKeyId, as AWS does."""
    port = _free_port()
    moto_bin = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(moto_bin), "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _cli_env(**over: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARS and k != "RAY_ADDRESS"}
    env.update(AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    env.update({k: v for k, v in over.items() if v is not None})
    return env


def _assert_one_clear_error(proc: subprocess.CompletedProcess, uri: str, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err and "botocore" not in err.lower().replace("botocoreerror", "")
    assert err.startswith("error:") and err.count("error:") == 1
    assert uri in " ".join(err.split())  # rich may wrap the line
    for w in words:
        assert w.lower() in err.lower(), err


def test_wrong_credentials_missing_credentials_and_unreachable_endpoint(auth_endpoint, endpoint, tmp_path):
    uri = "s3://some-bucket/prefix"
    wrong = _cli_env(AWS_ENDPOINT_URL=auth_endpoint, AWS_ACCESS_KEY_ID="AKIAWRONG", AWS_SECRET_ACCESS_KEY="nope")
    missing = _cli_env(AWS_ENDPOINT_URL=endpoint)
    port = _free_port()  # nothing listens there
    unreachable = _cli_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="a",
                           AWS_SECRET_ACCESS_KEY="b")  # fmt: skip
    cases = [(wrong, ("Permission denied", "credentials")), (missing, ("No usable credentials",)),
             (unreachable, ("reachable", f"127.0.0.1:{port}"))]  # fmt: skip
    for env, words in cases:
        proc = subprocess.run([CLI, "runs", "list", "--store", uri], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        _assert_one_clear_error(proc, uri, *words)
        if env is not unreachable:
            continue  # one submit is enough (each costs a few seconds of imports)
        # submit checks the store before Ray starts: no cluster, no dashboard, no run folder
        proc = subprocess.run([CLI, "submit", str(REPO / "jobs" / "smoke.yaml"), "--json", "--set",
                               f"artifacts.store={uri}"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        _assert_one_clear_error(proc, uri, *words)
        assert "dashboard" not in proc.stdout + proc.stderr and "ray" not in proc.stdout.lower()

    # In-process, the same errors are StoreErrors (a UserError) naming the store.
    os.environ.update(AWS_ACCESS_KEY_ID="AKIAWRONG", AWS_SECRET_ACCESS_KEY="nope")
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(StoreError, match="s3://some-bucket/prefix"):
            ArtifactStore(uri, endpoint_url=auth_endpoint).check()
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        del os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]


def test_missing_bucket_and_bad_endpoint_setting(s3env):
    with pytest.raises(StoreError, match=r"bucket of artifact store s3://no-such-bucket/x does not exist"):
        ArtifactStore("s3://no-such-bucket/x").check()
    with pytest.raises(StoreError, match="not an http"):
        ArtifactStore("s3://b/x", endpoint_url="minio.local:9000")
    with pytest.raises(StoreError, match="only applies to s3"):
        ArtifactStore("/tmp/x", endpoint_url="http://minio.local:9000")


# ---------------------------------------------------------------------------- Ray Train's filesystem
def test_ray_storage_filesystem_pickles_and_uploads_whole_files(bucket, tmp_path):
    import pickle

    import pyarrow.fs

    from resnet_cluster.launch.trainer import ray_storage

    store = ArtifactStore(f"s3://{bucket}/p")
    path, pafs = ray_storage(store, "r1")
    assert path == f"{bucket}/p/runs/r1"
    ckpt = tmp_path / "epoch_00001"
    ckpt.mkdir()
    state = os.urandom(2 * MULTIPART_CHUNK + 1)
    (ckpt / "train_state.pt").write_bytes(state)
    remote = pickle.loads(pickle.dumps(pafs))  # as Ray ships it to its controller and workers
    pyarrow.fs.copy_files(str(ckpt), f"{path}/checkpoints/epoch_00001", destination_filesystem=remote)
    assert store.read_bytes("r1", "checkpoints/epoch_00001/train_state.pt") == state
    info = remote.get_file_info(f"{path}/checkpoints/epoch_00001/train_state.pt")
    assert info.size == len(state)
    # Ray's storage validation writes a marker file through a `with` block
    with remote.open_output_stream(f"{path}/.validate_storage_marker") as f:
        f.write(b"ok")
    assert store.read_bytes("r1", ".validate_storage_marker") == b"ok"
    assert _uploads(store, bucket) == []


# ---------------------------------------------------------------------------- registry on S3
def test_list_many_runs_filters_and_delete(bucket, tmp_path):
    store = ArtifactStore(f"s3://{bucket}/p")
    n = 30
    for i in range(n):
        rid = f"run-{i:03d}"
        w = RunWriter(store, rid)
        w.event("submitted", sweep_id="sw-a" if i % 3 == 0 else None)
        store.write_text(rid, layout.CONFIG, f"name: j{i}\nmodel: {{arch: cifar_resnet20}}\n")
        if i % 2 == 0:
            w.event("finished")
            named = {"job": f"j{i}", "model": "cifar_resnet20"} if i % 4 == 0 else {}  # as the recorder writes
            w.write_summary("finished", epochs=1, final={"top1_err": float(i)}, best={"top1_err": float(i)}, **named)
            write_manifest(store, rid)
        else:
            w.event("started")
    runs = list_runs(store)
    assert len(runs) == n
    by_id = {r.run_id: r for r in runs}
    assert by_id["run-004"].status == "finished" and by_id["run-004"].best_top1_err == 4.0
    assert (by_id["run-004"].job, by_id["run-004"].model) == ("j4", "cifar_resnet20")
    assert (by_id["run-002"].job, by_id["run-002"].model) == ("j2", "cifar_resnet20")  # from config.yaml
    assert by_id["run-005"].status == "running" and by_id["run-005"].job == "j5"
    assert {r.run_id for r in list_runs(store, sweep="sw-a")} == {f"run-{i:03d}" for i in range(0, n, 3)}
    assert {r.run_id for r in list_runs(store, status="running")} == {f"run-{i:03d}" for i in range(1, n, 2)}
    both = list_runs(store, sweep="sw-a", status=["finished"])
    assert {r.run_id for r in both} == {f"run-{i:03d}" for i in range(0, n, 6)}
    with pytest.raises(StoreError, match="Unknown run status"):
        list_runs(store, status="done")

    # delete removes one run and nothing else, even a run whose id extends it
    store.write_text("run-0040", layout.CONFIG, "name: neighbour\n")
    assert store.delete_run("run-004") >= 4
    ids = store.list_run_ids()
    assert "run-004" not in ids and "run-0040" in ids and len(ids) == n
    with pytest.raises(StoreError, match="No run"):
        store.delete_run("run-004")
