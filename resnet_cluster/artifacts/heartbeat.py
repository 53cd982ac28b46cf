"""Heartbeats: how ``runs list`` and ``status`` tell a running run from one nobody drives.

The driver (``launch.submit``) and rank 0 of the training workers (the run recorder) each
rewrite a small JSON file in the run folder every :data:`INTERVAL_S` seconds from a daemon
thread: ``heartbeat.driver.json`` and ``heartbeat.rank0.json``. A run whose last lifecycle
event says it is running but whose newest heartbeat is older than :data:`LOST_AFTER` intervals
is ``lost``: its driver was killed (or its machine went away) without recording an end. A lost
run resumes from its last checkpoint with ``submit --name <run_id>``, like a stopped one.

The driver's heartbeat goes on while Ray Train restarts or resizes the worker group (no rank 0
then); rank 0's adds the iteration reached. Both stop before the run's last files are written,
so the manifest covers their final state.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

INTERVAL_S = 30.0
LOST_AFTER = 4  # intervals without a heartbeat (2 minutes): a busy store may miss one or two
FILES = ("heartbeat.driver.json", "heartbeat.rank0.json")

log = logging.getLogger(__name__)


def file_name(who: str) -> str:
    name = f"heartbeat.{who}.json"
    if name not in FILES:
        raise ValueError(f"unknown heartbeat writer {who!r}")
    return name


class Heartbeat:
    """Rewrites ``heartbeat.<who>.json`` every ``interval_s`` until :meth:`stop`."""

    def __init__(self, store, run_id: str, who: str, *, interval_s: float = INTERVAL_S,
                 fields: Callable[[], dict[str, Any]] | None = None) -> None:
        self.store, self.run_id, self.name = store, run_id, file_name(who)
        self.who, self.interval_s, self.fields = who, interval_s, fields
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        now = time.time()
        record = {
            "who": self.who,
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "unix": now,
            "interval_s": self.interval_s,
            **(self.fields() if self.fields else {}),
        }
        try:
            self.store.write_json(self.run_id, self.name, record)
        except Exception:  # an unreachable store must not stop training; the next beat retries
            log.debug("heartbeat %s of run %s not written", self.name, self.run_id, exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def start(self) -> Heartbeat:
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.who}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)


def newest(blobs: dict[str, bytes]) -> dict[str, Any] | None:
    """The most recent of the heartbeat records among a run's file blobs (None if none)."""
    import json

    found = []
    for name in FILES:
        try:
            rec = json.loads(blobs[name])
            found.append((float(rec["unix"]), rec))
        except (KeyError, ValueError, TypeError):
            continue
    return max(found, key=lambda x: x[0])[1] if found else None


def is_lost(blobs: dict[str, bytes], now: float | None = None) -> bool:
    """True when the run has heartbeats and the newest is older than LOST_AFTER intervals.

    A run without heartbeat files (written before they existed) is never called lost."""
    rec = newest(blobs)
    if rec is None:
        return False
    interval = float(rec.get("interval_s") or INTERVAL_S)
    return (now if now is not None else time.time()) - float(rec["unix"]) > LOST_AFTER * interval
