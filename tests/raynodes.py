"""Real Ray nodes on this machine for tests: `ray start --block` processes with their own ports.

Each node is one foreground `ray start --block` process; killing it (by PID, never `ray stop`)
stops exactly that node's processes. Token authentication is on (RAY_AUTH_MODE=token), as it is
by default on clusters of the pinned Ray.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    # A raylet on a loaded 2-core machine can take longer than Ray's 30 s to register
    # ("timed out during startup"; Ray's message names this setting).
    env.setdefault("RAY_raylet_start_wait_time_s", "120")
    env.pop("RAY_ADDRESS", None)
    return env


def _ports(n: int) -> list[int]:
    base = random.randrange(20000, 50000, 200)
    return [base + i for i in range(n)]


class RayNode:
    def __init__(self, *, head_gcs: str | None, num_cpus: int, resources: dict[str, float], log: Path,
                 env_extra: dict[str, str] | None = None, temp_dir: str | None = None):
        p = _ports(12)
        args = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                f"--resources={json.dumps(resources)}", f"--node-manager-port={p[0]}",
                f"--object-manager-port={p[1]}", f"--min-worker-port={p[2] + 100}",
                f"--max-worker-port={p[2] + 199}", f"--dashboard-agent-listen-port={p[3]}",
                f"--dashboard-agent-grpc-port={p[4]}", f"--runtime-env-agent-port={p[5]}",
                f"--metrics-export-port={p[6]}"]  # fmt: skip
        if head_gcs is None:
            self.gcs = f"127.0.0.1:{p[7]}"
            self.dashboard = f"http://127.0.0.1:{p[8]}"
            args += ["--head", f"--port={p[7]}", f"--dashboard-port={p[8]}", "--dashboard-host=127.0.0.1",
                     f"--ray-client-server-port={p[9]}"]  # fmt: skip
            if temp_dir:  # this cluster's own session files (Prometheus service discovery) only
                args.append(f"--temp-dir={temp_dir}")
        else:
            self.gcs, self.dashboard = head_gcs, None
            args += [f"--address={head_gcs}"]
        self.metrics_port = p[6]  # this node's Prometheus endpoint (Ray's metrics agent)
        self.log = open(log, "w")
        self.killed = False
        self.proc = subprocess.Popen(args, env={**base_env(), **(env_extra or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def kill(self) -> None:
        """Stop this node: SIGTERM to `ray start` and every process it started, SIGKILL after 20 s.
        Only the first call acts (a second would signal PIDs that may have been reused)."""
        if self.killed:
            return
        self.killed = True
        procs = [self.proc.pid, *descendants(self.proc.pid)]
        _signal_all(procs, signal.SIGTERM)
        deadline = time.time() + 20
        while time.time() < deadline and any(_alive(p) for p in procs):
            time.sleep(0.5)
        _signal_all(procs, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        if self.dashboard is not None:  # a head: forget it as the current cluster, as `ray stop` does
            current = Path("/tmp/ray/ray_current_cluster")
            try:  # Ray writes the node's IP, which may not be the 127.0.0.1 we asked for
                if current.read_text().strip().rsplit(":", 1)[-1] == self.gcs.rsplit(":", 1)[-1]:
                    current.unlink()
            except OSError:
                pass


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (Linux /proc), found before any of them is signalled."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def _signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def start_head(tmp: Path, *, num_cpus: int = 2, resources: dict | None = None, env_extra: dict | None = None,
               temp_dir: str | None = None) -> RayNode:
    # `ray start --head` enables token auth only when a token exists (docs/ray-notes.md).
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=base_env(), capture_output=True)
    head = RayNode(head_gcs=None, num_cpus=num_cpus, resources=resources or {}, log=tmp / "head.log",
                   env_extra=env_extra, temp_dir=temp_dir)
    wait_for_nodes(head, 1)
    return head


class NodeStartFailed(RuntimeError):
    """A node's `ray start` exited before the node joined the cluster."""


def wait_for_nodes(head: RayNode, n: int, timeout: float = 300, *, joining: RayNode | None = None) -> list[dict]:
    """Poll `ray status`-like node list through a short-lived driver until n nodes are alive.

    ``joining``: a node being added; NodeStartFailed if its `ray start` exits first (a raylet
    that did not register in time on a loaded machine: "timed out during startup")."""
    code = (
        "import json, ray; ray.init(address='%s', logging_level='ERROR'); "
        "print(json.dumps([{'id': x['NodeID'], 'alive': x['Alive'], 'resources': x['Resources']} "
        "for x in ray.nodes()]))" % head.gcs
    )
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        if head.proc.poll() is not None:  # e.g. "timed out during startup" on a loaded machine
            raise RuntimeError(f"the head's `ray start` exited ({head.proc.returncode}); see {head.log.name}")
        if joining is not None and joining.proc.poll() is not None:
            raise NodeStartFailed(f"`ray start` of a joining node exited ({joining.proc.returncode}); "
                                  f"see {joining.log.name}")
        try:  # a driver can wait far longer than `timeout` for a GCS that is gone
            out = subprocess.run([sys.executable, "-c", code], env=base_env(), capture_output=True, text=True,
                                 timeout=120)  # fmt: skip
        except subprocess.TimeoutExpired:
            continue
        if out.returncode == 0:
            nodes = [x for x in json.loads(out.stdout.strip().splitlines()[-1]) if x["alive"]]
            if len(nodes) >= n:
                return nodes
        last = out.stderr[-2000:]
        time.sleep(2)
    raise RuntimeError(f"{n} Ray nodes did not come up in {timeout} s:\n{last}")
