"""``data prepare imagenet --address``: the shard writers as Ray tasks across the cluster's nodes.

The driver (this process) does what needs one view of the dataset: index the archives (header
reads only; ranged GETs on S3), plan the shards, check ``--dest``, and write ``manifest.json``
last, exactly as :func:`resnet_cluster.data.imagenet.prepare_imagenet` does on one machine (it
is the same function, given :func:`ray_runner`). Each Ray task gets one shard job: the byte
ranges of its images, which it fetches itself (concurrent ranged GETs on S3), encodes, and
writes as a whole shard to ``--dest`` (one PUT). A task first looks for the finished shard with
the same plan hash and reuses it, so resume works as it does locally. Tasks report per-image
progress to a small actor that the driver polls for its bar.

A Jobs API address (``http://HEAD:8265``) submits the prepare command itself as a Ray job (code
shipped as the job's ``working_dir``, as ``submit`` does in :mod:`.remote`), whose driver runs on
the head node with ``--address auto``; its inputs and ``--dest`` must then be URIs (or paths)
that the cluster's nodes can reach.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resnet_cluster.data.imagenet import Runner, ShardJob, prepare_imagenet, run_shard_job
from resnet_cluster.errors import ClusterError, UserError
from resnet_cluster.launch import remote
from resnet_cluster.launch.cluster import connect

PROGRESS_EVERY = 16  # images between a task's progress messages (one actor call each)
POLL_S = 0.5  # how often the driver reads the progress actor while it waits for shards
# Settings (never credentials: those come from the nodes) that tasks need to reach the storage.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


class _Progress:
    """Images encoded so far per shard, as the tasks report them (a retried task restarts its
    count; the highest is kept, so the bar never goes back)."""

    def __init__(self) -> None:
        self.done: dict[str, int] = {}

    def update(self, rel: str, n: int) -> None:
        self.done[rel] = max(n, self.done.get(rel, 0))

    def counts(self) -> dict[str, int]:
        return self.done


def _shard_task(job: ShardJob, progress) -> dict:
    """One shard, on whichever node Ray chose: reuse it if finished, else fetch, encode, write."""
    import ray

    n = 0

    def tick() -> None:
        nonlocal n
        n += 1
        if n % PROGRESS_EVERY == 0:
            progress.update.remote(job.rel, n)

    rec = run_shard_job(job, on_image=tick)
    return {**rec, "node": ray.get_runtime_context().get_node_id()}


class RayRunner:
    """A :data:`~resnet_cluster.data.imagenet.Runner` that runs each shard job as a Ray task
    (1 CPU, SPREAD over the nodes) on the cluster at ``address``, at most ``2 x cluster CPUs`` in flight so the job lists
    do not all sit in the object store at once. ``nodes`` lists the nodes that wrote shards."""

    def __init__(self, address: str, max_in_flight: int | None = None):
        self.address = address
        self.max_in_flight = max_in_flight
        self.nodes: set[str] = set()

    def __call__(self, jobs, images, done) -> None:
        import ray

        # Connecting here, not before: a refused --dest or a finished dataset never starts Ray.
        connect(self.address)
        window = self.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        options: dict[str, Any] = {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
        if env:
            options["runtime_env"] = {"env_vars": env}
        task = ray.remote(_shard_task).options(**options)
        progress = ray.remote(_Progress).options(num_cpus=0).remote()
        pending: dict[Any, ShardJob] = {}
        counted: dict[str, int] = {}
        todo = iter(jobs)
        try:
            while True:
                while len(pending) < window:
                    job = next(todo, None)
                    if job is None:
                        break
                    pending[task.remote(job, progress)] = job
                if not pending:
                    return
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
                running = {j.rel for j in pending.values()}
                more = 0
                for rel, n in ray.get(progress.counts.remote()).items():
                    if rel in running and n > counted.get(rel, 0):
                        more += n - counted.get(rel, 0)
                        counted[rel] = n
                if more:
                    images(more)
                for ref in ready:
                    job = pending.pop(ref)
                    rec = _result(ref)
                    self.nodes.add(rec.pop("node"))
                    done(job, rec, counted.pop(job.rel, 0))
        finally:
            for ref in pending:  # an error above: stop what is still running
                ray.cancel(ref)
            ray.kill(progress)


def _result(ref) -> dict:
    """The task's record; a user error inside the task (unwritable --dest) as itself."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, UserError):
            raise err.cause from None
        raise


def prepare_on_cluster(address: str, train: str, val: str, dest: str, *,
                       progress: Callable[[dict], None] | None = None, **options) -> dict:
    """``prepare_imagenet`` with the shard writers spread over the Ray cluster at ``address``
    (a GCS address HOST:PORT, or ``auto``). The summary adds ``nodes``: how many wrote shards."""
    if remote.is_jobs_address(address):
        raise ClusterError(f"{address} is a Jobs API URL; use submit_prepare for it.")
    runner = RayRunner(address)
    summary = prepare_imagenet(train, val, dest, progress=progress, runner=runner,
                               **{k: v for k, v in options.items() if k != "workers"})
    return {**summary, "cluster": address, "nodes": len(runner.nodes)}


def submit_prepare(address: str, args: list[str], on_line: Callable[[str], None]) -> dict:
    """Run ``python -m resnet_cluster data prepare imagenet ARGS --address auto --json`` as a Ray
    job at the Jobs API ``address``; stream its log lines to ``on_line`` and return the
    summary it printed. A failed job raises ClusterError with the end of its log.

    The code that ships is this package's source checkout (not the current folder, which may
    hold the dataset itself)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "resnet_cluster").is_dir():
        raise ClusterError(f"a Jobs API address ships this package's source checkout to the "
                           f"cluster, and {root} is not one. Install resnet-cluster on the "
                           "cluster's nodes and pass the GCS address (HOST:6379) instead.")
    ep = " ".join(shlex.quote(a) for a in ["python", "-m", "resnet_cluster", "data", "prepare",
                                           "imagenet", *args, "--address", "auto", "--json"])
    sid = f"resnet-cluster-prepare-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    job_id = remote.submit_entrypoint(address, ep, submission_id=sid,
                                      metadata={"command": "data prepare imagenet"}, cwd=root)
    lines: list[str] = []

    def keep(line: str) -> None:
        lines.append(line)
        on_line(line)

    status = remote.follow(address, job_id, keep)
    text = "\n".join(lines)
    start = text.find("\n{") + 1 if not text.startswith("{") else 0
    if status == "SUCCEEDED" and (start > 0 or text.startswith("{")):
        try:
            summary, _ = json.JSONDecoder().raw_decode(text[start:])
            return {**summary, "ray_job": job_id}
        except ValueError:
            pass
    tail = "\n".join(lines[-15:])
    raise ClusterError(f"the prepare job {job_id} on {address} ended {status}. The end of its "
                       f"log:\n{tail}")
