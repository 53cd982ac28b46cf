"""Remote submission through the Ray Jobs API (``--address http://HEAD:8265``).

The project's code and the job file travel in the job's ``runtime_env`` ``working_dir`` (Ray
skips what ``.gitignore`` ignores; ``EXCLUDES`` drops the rest of the bulk), and the entrypoint
runs ``python -m resnet_cluster submit JOB --local --name RUN_ID ...`` on the cluster, so the
driver lives on the head node and keeps running when the submitting terminal goes away.

Stopping: the job's environment sets ``RAY_JOB_STOP_SIGNAL=SIGINT``, so ``stop`` delivers a
Ctrl-C to the driver, which aborts Ray Train gracefully and records the run as ``stopped``.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resnet_cluster.errors import ClusterError, ConfigError

# gitwildmatch patterns (Ray's runtime_env packaging): "/data" is the project's data folder only;
# a bare "data" would also drop resnet_cluster/data, and the cluster would run its own copy.
EXCLUDES = [".git", ".venv", "**/__pycache__", "/runs-store", "/data", "*.pt", "*.tar.gz", "*.parquet"]
STOP_WAIT_S = 120  # time the driver gets to abort Ray Train and write the `stopped` event
AGENT_RETRY_S = 60  # a fresh cluster answers 500 "No available agent" for a few seconds


def is_jobs_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def project_root(start: str | os.PathLike = ".") -> Path:
    """The git top level of ``start``, or ``start`` itself outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=start, capture_output=True, text=True, check=True
        )
        return Path(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return Path(start).resolve()


def client(address: str):
    """A JobSubmissionClient; unreachable or refusing clusters become one ClusterError."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, RuntimeError (auth), ValueError
        raise ClusterError(_describe(address, e)) from None


def _describe(address: str, e: BaseException) -> str:
    text = " ".join(str(e).split()).rstrip(".")
    if "401" in text or "403" in text or "uthentication" in text or "token" in text.lower():
        why = (
            "the cluster refused the request: token authentication failed. Set RAY_AUTH_MODE=token "
            "and put the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token "
            "(`ray get-auth-token` on the head prints it)"
        )
    elif "status code" in text:
        why = f"the cluster answered with an error: {text[:500]}"
    else:
        why = (
            f"it could not be reached ({text[:300]}). Check the address (the dashboard port, "
            "8265 by default), that the cluster is up, and that a tunnel is open "
            "(`ray dashboard CLUSTER.yaml` or `kubectl port-forward ... 8265:8265`)"
        )
    return f"Ray cluster at {address}: {why}."


def command_line(args: list[str]) -> str:
    """``python -m resnet_cluster ARGS…`` quoted for the Jobs API's shell entrypoint."""
    return " ".join(shlex.quote(a) for a in ["python", "-m", "resnet_cluster", *args])


def submit_args(job_relpath: str, *, run_id: str, overrides: list[str], workers: int | None) -> list[str]:
    """The ``submit`` command the driver runs on the cluster (``--json``: progress lines go to
    stderr, the job log; stdout keeps the result document)."""
    args = ["submit", job_relpath, "--local", "--name", run_id, "--json"]
    for o in overrides:
        args += ["--set", o]
    if workers is not None:
        args += ["--workers", str(workers)]
    return args


def entrypoint(job_relpath: str, *, run_id: str, overrides: list[str], workers: int | None) -> str:
    return command_line(submit_args(job_relpath, run_id=run_id, overrides=overrides, workers=workers))


def project_relative(path: str | os.PathLike, root: Path, what: str) -> str:
    """``path`` relative to the project folder that ships as the job's working_dir."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(root))
    except ValueError:
        raise ConfigError(
            f"{what} {path} is outside the project folder {root}, which is what ships to the "
            f"cluster as the job's working_dir. Move or copy the {what} into the project."
        ) from None


def submit_command(
    address: str,
    args: list[str],
    *,
    submission_id: str,
    metadata: dict[str, str],
    cwd: str | os.PathLike = ".",
) -> dict[str, Any]:
    """Run ``python -m resnet_cluster ARGS…`` as a Ray job on the cluster at ``address``.

    The project folder ships as the job's working_dir; store and S3 endpoint settings (never
    credentials: the nodes have their own) travel as environment variables; a fresh cluster's
    "No available agent" answer is retried for ``AGENT_RETRY_S``. ``metadata`` (string values)
    is what ``ray job list`` and the dashboard's Jobs page show for the job. Returns
    ``{job_id, dashboard, entrypoint}``.
    """
    root = project_root(cwd)
    c = client(address)
    env_vars = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}
    for name in ("RESNET_CLUSTER_STORE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        if os.environ.get(name):  # settings, never credentials: those come from the nodes
            env_vars[name] = os.environ[name]
    runtime_env = {"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env_vars}
    ep = command_line(args)
    deadline = time.time() + AGENT_RETRY_S
    while True:
        try:
            job_id = c.submit_job(
                entrypoint=ep,
                runtime_env=runtime_env,
                # unique per submission: re-submitting a run (to resume it) is a new Ray job
                submission_id=f"{submission_id}-{secrets.token_hex(3)}",
                metadata={k: str(v) for k, v in metadata.items() if v is not None},
            )
            break
        except Exception as e:
            if "No available agent" in str(e) and time.time() < deadline:
                time.sleep(2)
                continue
            raise ClusterError(_describe(address, e)) from None
    return {"job_id": job_id, "dashboard": address.rstrip("/"), "entrypoint": ep}


def submit_remote(
    address: str,
    job_path: str,
    *,
    run_id: str,
    overrides: list[str],
    workers: int | None = None,
    cwd: str | os.PathLike = ".",
    job_name: str | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    """Submit a run to the Jobs API; returns ``{job_id, run_id, dashboard, entrypoint}``."""
    rel = project_relative(job_path, project_root(cwd), "job file")
    info = submit_command(
        address,
        submit_args(rel, run_id=run_id, overrides=overrides, workers=workers),
        submission_id=f"resnet-cluster-{run_id}",
        metadata={"kind": "run", "run_id": run_id, "job_name": job_name, "job_file": rel, "store": store},
        cwd=cwd,
    )
    return {**info, "run_id": run_id}


def job_status(address: str, job_id: str) -> dict[str, Any]:
    c = client(address)
    try:
        info = c.get_job_info(job_id)
    except Exception as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise ClusterError(
                f"no Ray job {job_id!r} on {address}; `ray job list --address {address}` lists them."
            ) from None
        raise ClusterError(_describe(address, e)) from None
    return {
        "job_id": job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "run_id": (info.metadata or {}).get("run_id"),
        "sweep_id": (info.metadata or {}).get("sweep_id"),
        "metadata": dict(info.metadata or {}),
        "message": info.message,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "entrypoint": info.entrypoint,
    }


def find_job(address: str, *, run_id: str | None = None, sweep_id: str | None = None) -> str:
    """The newest Ray job whose metadata names this run (or sweep): its submission id."""
    key, value = ("run_id", run_id) if run_id is not None else ("sweep_id", sweep_id)
    c = client(address)
    try:
        jobs = c.list_jobs()
    except Exception as e:
        raise ClusterError(_describe(address, e)) from None
    matches = [j for j in jobs if (j.metadata or {}).get(key) == value]
    if not matches:
        what = "run" if key == "run_id" else "sweep"
        raise ClusterError(f"no Ray job on {address} runs {what} {value!r}; pass the Ray job id instead.")
    return max(matches, key=lambda j: j.start_time or 0).submission_id


def stop(address: str, job_id: str) -> bool:
    c = client(address)
    try:
        return bool(c.stop_job(job_id))
    except Exception as e:
        raise ClusterError(_describe(address, e)) from None


def follow(address: str, job_id: str, on_line: Callable[[str], None]) -> str:
    """Stream the job's logs until it ends; returns the final status. Ctrl-C stops following
    (KeyboardInterrupt propagates) and leaves the job running."""
    import asyncio

    c = client(address)

    async def _tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            for line in chunk.splitlines():
                on_line(line)

    asyncio.run(_tail())
    return str(job_status(address, job_id)["status"])
