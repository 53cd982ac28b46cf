"""Checkpoint upload/download MB/s through ArtifactStore vs `aws s3 cp`, same S3 endpoint, same run.

A moto S3 server is started as its own process on 127.0.0.1 (so neither client shares its GIL),
a file of random bytes (default 200 MB, the size of a large checkpoint) is created once, and the
two clients alternate: aws up, ours up, aws down, ours down, then the reverse order, for
``--reps`` rounds. Each figure is the median over rounds; the ratio is ours / awscli of the
medians. Downloads are checked byte-for-byte (sha256) each time.

    python benchmarks/store.py [--mb 200] [--reps 3]
    python benchmarks/store.py --list-runs 2000   # `runs list` on a bucket with N runs instead

With ``--list-runs N`` it stores N small finished runs (summary, events, config, manifest) in
the bucket and times ``registry.list_runs`` against the one-run-at-a-time way (a listing and
its three files read concurrently, via ``registry._load``), in the same invocation.

Needs the `aws` command (awscli) and moto's server (`pip install -e ".[dev]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from resnet_cluster.fileutil import hash_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="file size in MB (10^6 bytes)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--list-runs", type=int, default=0, help="time `runs list` over this many runs instead")
    args = ap.parse_args()
    if shutil.which("aws") is None:
        sys.exit("the `aws` command (awscli) is needed for the baseline: pip install awscli")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    moto_bin = os.path.join(os.path.dirname(sys.executable), "moto_server")
    server = subprocess.Popen(
        [moto_bin if os.path.exists(moto_bin) else "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    work = tempfile.mkdtemp(prefix="bench-store-")
    env = dict(os.environ)
    env.update(
        AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )  # fmt: skip
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")})  # fmt: skip
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        subprocess.run(["aws", "s3", "mb", "s3://bench", "--endpoint-url", url], env=env, check=True,
                       capture_output=True)  # fmt: skip

        from resnet_cluster.artifacts.store import ArtifactStore

        if args.list_runs:
            bench_list(args.list_runs, args.reps)
            return
        store = ArtifactStore("s3://bench/ours")
        src = os.path.join(work, "train_state.pt")
        size = args.mb * 10**6
        with open(src, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 24)
                f.write(os.urandom(n))
                left -= n
        digest = hash_file(src)
        mb = size / 1e6

        def aws_up() -> float:
            t = time.perf_counter()
            subprocess.run(["aws", "s3", "cp", "--only-show-errors", src, "s3://bench/aws/train_state.pt",
                            "--endpoint-url", url], env=env, check=True)  # fmt: skip
            return mb / (time.perf_counter() - t)

        def aws_down() -> float:
            dst = os.path.join(work, "aws-down.pt")
            t = time.perf_counter()
            subprocess.run(["aws", "s3", "cp", "--only-show-errors", "s3://bench/aws/train_state.pt", dst,
                            "--endpoint-url", url], env=env, check=True)  # fmt: skip
            rate = mb / (time.perf_counter() - t)
            assert hash_file(dst) == digest
            os.unlink(dst)
            return rate

        def ours_up() -> float:
            t = time.perf_counter()
            store.put_file("bench-run", src, "checkpoints/train_state.pt")
            return mb / (time.perf_counter() - t)

        def ours_down() -> float:
            dst = os.path.join(work, "ours-down.pt")
            t = time.perf_counter()
            store.download("bench-run", "checkpoints/train_state.pt", dst)
            rate = mb / (time.perf_counter() - t)
            assert hash_file(dst) == digest
            os.unlink(dst)
            return rate

        rates: dict[str, list[float]] = {"aws_up": [], "ours_up": [], "aws_down": [], "ours_down": []}
        loads = [load()]
        for rep in range(args.reps):
            order = [("aws_up", aws_up), ("ours_up", ours_up), ("aws_down", aws_down), ("ours_down", ours_down)]
            if rep % 2:  # alternate who goes first, so drift does not favour one client
                order = [order[1], order[0], order[3], order[2]]
            for name, fn in order:
                rates[name].append(fn())
            loads.append(load())
            print(f"round {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        result = {
            "mb": mb,
            "reps": args.reps,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "load_avg_1_5_15": loads,
            "median_MBps": {k: round(v, 1) for k, v in med.items()},
            "all_MBps": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "ratio_upload": round(med["ours_up"] / med["aws_up"], 3),
            "ratio_download": round(med["ours_down"] / med["aws_down"], 3),
            # ours / awscli within each round (the two ran back to back, under the same load)
            "paired_ratios_upload": [round(o / a, 3) for o, a in zip(rates["ours_up"], rates["aws_up"])],
            "paired_ratios_download": [round(o / a, 3) for o, a in zip(rates["ours_down"], rates["aws_down"])],
        }
        print(json.dumps(result, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def bench_list(n: int, reps: int) -> None:
    from resnet_cluster.artifacts import layout
    from resnet_cluster.artifacts.registry import _load, _record, list_runs
    from resnet_cluster.artifacts.store import ArtifactStore

    store = ArtifactStore("s3://bench/many")
    blobs = {}
    for i in range(n):
        run = f"{store._runs_path()}/run-{i:05d}"
        blobs[f"{run}/{layout.CONFIG}"] = b"name: j\nmodel: {arch: cifar_resnet20}\n"
        blobs[f"{run}/{layout.EVENTS}"] = b'{"time": "2026-11-23T00:00:00+00:00", "event": "submitted"}\n'
        blobs[f"{run}/{layout.SUMMARY}"] = json.dumps({"status": "finished", "final": {"top1_err": i % 50}}).encode()
        blobs[f"{run}/{layout.MANIFEST}"] = b'{"files": []}'
        blobs[f"{run}/checkpoints/epoch_00001/train_state.pt"] = b"x"
    store.fs.pipe(blobs)  # concurrent PUTs (setup, not timed)

    def one_by_one() -> int:  # per run: a listing, then its files (concurrently)
        return len([_record(store, rid, _load(store, rid)) for rid in store.list_run_ids()])

    times: dict[str, list[float]] = {"list_runs": [], "one_by_one": []}
    loads = [load()]
    for rep in range(reps):
        for name, fn in ((("list_runs", lambda: len(list_runs(store))), ("one_by_one", one_by_one))
                         if rep % 2 == 0 else (("one_by_one", one_by_one), ("list_runs", lambda: len(list_runs(store))))):
            t = time.perf_counter()
            assert fn() == n
            times[name].append(time.perf_counter() - t)
        loads.append(load())
        print(f"round {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"runs": n, "reps": reps, "load_avg_1_5_15": loads,
                      "median_s": {k: round(v, 2) for k, v in med.items()},
                      "speedup": round(med["one_by_one"] / med["list_runs"], 2)}, indent=2))


if __name__ == "__main__":
    main()
