"""``data prepare imagenet --address``: the shard writers as Ray tasks across the cluster's nodes.

The driver (this process) does what needs one view of the dataset: index the archives (header
reads only; ranged GETs on S3: the outer tar here, the class tars' headers as Ray tasks, one
batch of class tars per cluster CPU), plan the shards, check ``--dest``, and write ``manifest.json``
last, exactly as :func:`resnet_cluster.data.imagenet.prepare_imagenet` does on one machine (it
is the same function, given :func:`ray_runner`). Each Ray task gets one shard job: the byte
ranges of its images, which it fetches itself (concurrent ranged GETs on S3), encodes, and
writes as a whole shard to ``--dest`` (one PUT). A task first looks for the finished shard with
the same plan hash and reuses it, so resume works as it does locally. Tasks are streaming
generators that yield their image count as they go, which drives the driver's progress bar.

A Jobs API address (``http://HEAD:8265``) submits the prepare command itself as a Ray job (code
shipped as the job's ``working_dir``, as ``submit`` does in :mod:`.remote`), whose driver runs on
the head node with ``--address auto``; its inputs and ``--dest`` must then be URIs (or paths)
that the cluster's nodes can reach.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resnet_cluster.data.imagenet import Runner, ShardJob, prepare_imagenet, run_shard_job
from resnet_cluster.errors import ClusterError, UserError
from resnet_cluster.launch import remote
from resnet_cluster.launch.cluster import connect

PROGRESS_S = 0.5  # a task reports its images at most this often (one small object each)
POLL_S = 1.0  # the longest the driver waits on the tasks before it looks again
ENV_RETRIES = 1  # Jobs API form: resubmissions after a working_dir download failure (see below)
# Settings (never credentials: those come from the nodes) that tasks need to reach the storage.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def _shard_task(job: ShardJob):
    """One shard, on whichever node Ray chose: reuse it if finished, else fetch, encode, write.

    A streaming generator (``num_returns="streaming"``): it yields the count of images encoded
    so far (at most every PROGRESS_S) and last the shard's record. The shard is written on a
    thread so that the generator can yield while it works; a progress actor instead would cost
    a process start (about 1.3 CPU-seconds here) per prepare.
    """
    import queue
    import threading

    import ray

    ticks: queue.Queue = queue.Queue()
    out: dict = {}

    def work() -> None:
        try:
            out["record"] = run_shard_job(job, on_image=lambda: ticks.put(1))
        except BaseException as err:  # re-raised in the task below
            out["error"] = err
        finally:
            ticks.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    n, last = 0, time.monotonic()
    while ticks.get() is not None:
        n += 1
        if time.monotonic() - last >= PROGRESS_S:
            last = time.monotonic()
            yield n
    thread.join()
    if "error" in out:
        raise out["error"]
    yield {**out["record"], "node": ray.get_runtime_context().get_node_id()}


class RayRunner:
    """A :data:`~resnet_cluster.data.imagenet.Runner` that runs each shard job as a Ray task
    (1 CPU, SPREAD over the nodes) on the cluster at ``address``, at most ``2 x cluster CPUs``
    in flight so the job lists do not all sit in the object store at once. ``nodes`` lists the
    nodes that wrote shards."""

    def __init__(self, address: str | None, max_in_flight: int | None = None):
        self.address = address
        self.max_in_flight = max_in_flight
        self.nodes: set[str] = set()
        self.index_tasks = 0

    def _options(self, **extra) -> dict[str, Any]:
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        options: dict[str, Any] = {"num_cpus": 1, "scheduling_strategy": "SPREAD", **extra}
        if env:
            options["runtime_env"] = {"env_vars": env}
        return options

    def index_map(self, fn, uri: str, classes: list) -> list:
        """The class tars' headers read by Ray tasks, one batch of class tars per cluster CPU:
        on S3 each class tar is a chain of dependent GETs, so spreading the chains over the
        nodes divides the index time by their number (one driver would otherwise wait through
        every GET's latency alone)."""
        import ray

        connect(self.address)
        k = max(1, min(len(classes), int(ray.cluster_resources().get("CPU", 1))))
        task = ray.remote(fn).options(**self._options())
        refs = [task.remote(uri, classes[i::k]) for i in range(k)]
        self.index_tasks = k
        return [pair for part in (_result(r) for r in refs) for pair in part]

    def __call__(self, jobs, images, done) -> None:
        import ray

        # Connecting here (or in index_map), not before: a refused --dest never starts Ray
        # unless the archives had to be indexed on it.
        connect(self.address)
        window = self.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(_shard_task).options(**self._options(num_returns="streaming"))
        pending: dict[Any, ShardJob] = {}  # ObjectRefGenerator -> its job
        counted: dict[str, int] = {}
        todo = iter(jobs)
        try:
            while True:
                while len(pending) < window:
                    job = next(todo, None)
                    if job is None:
                        break
                    pending[task.remote(job)] = job
                if not pending:
                    return
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                for gen in ready:
                    job = pending[gen]
                    value = _result(next(gen))
                    if isinstance(value, int):  # a progress count (a retry restarts from 0)
                        if value > counted.get(job.rel, 0):
                            images(value - counted.get(job.rel, 0))
                            counted[job.rel] = value
                        continue
                    del pending[gen]
                    self.nodes.add(value.pop("node"))
                    done(job, value, counted.pop(job.rel, 0))
        finally:
            for gen in pending:  # an error above: stop what is still running
                ray.cancel(gen)


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
    return {**summary, "cluster": address, "nodes": len(runner.nodes),
            "index_tasks": runner.index_tasks}


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
    for attempt in range(1 + ENV_RETRIES):
        job_id = remote.submit_command(
            address,
            ["data", "prepare", "imagenet", *args, "--address", "auto", "--json"],
            submission_id=f"resnet-cluster-prepare-{time.strftime('%Y%m%d-%H%M%S')}",
            metadata={"kind": "prepare", "command": "data prepare imagenet"},
            cwd=root,
        )["job_id"]
        lines: list[str] = []

        def keep(line: str) -> None:
            lines.append(line)
            on_line(line)

        status = remote.follow(address, job_id, keep)
        text = "\n".join(lines)
        start = 0 if text.startswith("{") else text.find("\n{") + 1
        if status == "SUCCEEDED" and (start > 0 or text.startswith("{")):
            try:
                summary, _ = json.JSONDecoder().raw_decode(text[start:])
                return {**summary, "ray_job": job_id}
            except ValueError:
                pass
        if "Failed to download runtime_env file package" in text and attempt < ENV_RETRIES:
            # Intermittent in Ray (ray-project/ray#36703): a node could not fetch the job's
            # working_dir package. A new job uploads it again and resumes (finished shards kept).
            on_line(f"Ray could not set up the job's working_dir on a node (job {job_id}); "
                    "submitting again, finished shards are kept.")
            continue
        break
    tail = "\n".join(lines[-15:])
    raise ClusterError(f"the prepare job {job_id} on {address} ended {status}. The end of its "
                       f"log:\n{tail}")
