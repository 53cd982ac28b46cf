"""Writers for the growing files of a run: the event log and the CSV metric logs."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.store import ArtifactStore

# Lifecycle events; other kinds (e.g. "checkpoint", "epoch") may be logged too.
LIFECYCLE_EVENTS = ("submitted", "started", "resumed", "restarted", "finished", "failed", "stopped")
FINAL_STATUSES = ("finished", "failed", "stopped")


def utc_now() -> str:
    """ISO-8601 UTC time with milliseconds, e.g. ``2024-01-01T12:00:00.123+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def utc_from_ms(ms: int | None) -> str | None:
    """UNIX time in milliseconds (as Ray reports a deadline) in :func:`utc_now`'s form; a
    missing or zero time (Ray's "no deadline") is None."""
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")


class RunWriter:
    """Appends events to ``events.jsonl`` and writes ``summary.json`` for one run."""

    def __init__(self, store: ArtifactStore, run_id: str) -> None:
        layout.validate_run_id(run_id)
        self.store = store
        self.run_id = run_id

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append ``{"time": <UTC ISO-8601>, "event": kind, **fields}`` as one line; return it."""
        if not kind or not isinstance(kind, str):
            raise ValueError(f"event kind must be a non-empty string, got {kind!r}")
        clash = {"time", "event"} & fields.keys()
        if clash:
            raise ValueError(f"event fields may not be named {sorted(clash)}")
        record = {"time": utc_now(), "event": kind, **fields}
        line = json.dumps(record, default=str, allow_nan=True)
        self.store.append_lines(self.run_id, layout.EVENTS, [line])
        return record

    def write_summary(
        self,
        status: str,
        *,
        epochs: int | None = None,
        iterations: int | None = None,
        final: dict[str, Any] | None = None,
        best: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Write ``summary.json``: ``{"run_id", "status", "written", "epochs", "iterations",
        "final": {"top1_err", ...}, "best": {"top1_err", "epoch", ...}, **extra}``.

        Call just before :func:`~resnet_cluster.artifacts.manifest.write_manifest`.
        ``status`` is one of ``finished | failed | stopped``.
        """
        if status not in FINAL_STATUSES:
            raise ValueError(f"summary status must be one of {FINAL_STATUSES}, got {status!r}")
        summary = {
            "run_id": self.run_id,
            "status": status,
            "written": utc_now(),
            "epochs": epochs,
            "iterations": iterations,
            "final": dict(final or {}),
            "best": dict(best or {}),
            **extra,
        }
        self.store.write_json(self.run_id, layout.SUMMARY, summary)
        return summary


def _cell(value: Any) -> str:
    """One CSV cell: floats at repr precision (round-trip exact), None as empty."""
    if value is None:
        return ""
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


class CsvLog:
    """A CSV metric log (header row + one row per ``append``) kept locally and uploaded whole.

    Each upload is an atomic put of the whole file, at most once per ``min_interval_s`` seconds
    (the first row is uploaded at once); call :meth:`flush` or :meth:`close` at epoch ends and
    at exit. Not for concurrent writers: one process (rank 0) owns a log.
    """

    def __init__(
        self,
        store: ArtifactStore,
        run_id: str,
        name: str,
        fieldnames: Sequence[str],
        *,
        min_interval_s: float = 5.0,
    ) -> None:
        layout.validate_run_id(run_id)
        layout.validate_relpath(name)
        if not fieldnames or len(set(fieldnames)) != len(fieldnames):
            raise ValueError(f"CsvLog needs distinct field names, got {list(fieldnames)!r}")
        self.store = store
        self.run_id = run_id
        self.name = name
        self.fieldnames = list(fieldnames)
        self.min_interval_s = float(min_interval_s)
        self._dir = tempfile.mkdtemp(prefix="resnet-cluster-csv-")
        self.local_path = os.path.join(self._dir, os.path.basename(name))
        self._last_upload: float | None = None
        self._dirty = False
        self.rows = 0
        self._write_local([])

    def _write_local(self, rows: list[dict[str, Any]]) -> None:
        with open(self.local_path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(self.fieldnames)
            for row in rows:
                w.writerow([_cell(row.get(k)) for k in self.fieldnames])
        self.rows = len(rows)
        self._dirty = True

    def append(self, row: dict[str, Any]) -> None:
        unknown = set(row) - set(self.fieldnames)
        if unknown:
            raise ValueError(f"{self.name}: unknown columns {sorted(unknown)}; columns are {self.fieldnames}")
        with open(self.local_path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerow([_cell(row.get(k)) for k in self.fieldnames])
        self.rows += 1
        self._dirty = True
        now = time.monotonic()
        if self._last_upload is None or now - self._last_upload >= self.min_interval_s:
            self.flush()

    def flush(self) -> None:
        """Upload the whole file now (if anything changed since the last upload)."""
        if self._dirty:
            self.store.put_file(self.run_id, self.local_path, self.name)
            self._dirty = False
        self._last_upload = time.monotonic()

    def resume(self, keep: Callable[[dict[str, str]], bool]) -> int:
        """Continue the log already in the store, keeping only rows where ``keep(row)`` is true.

        ``row`` maps column name to the cell *string* (e.g. ``lambda r: int(r["iteration"]) <=
        ckpt_iteration`` drops rows logged after the checkpoint being resumed). The truncated
        file is uploaded at once. Returns the number of rows kept; 0 if the store has no log.
        """
        kept: list[dict[str, Any]] = []
        if self.store.exists(self.run_id, self.name):
            text = self.store.read_text(self.run_id, self.name)
            reader = csv.DictReader(io.StringIO(text))
            for row in reader:
                if None in row:  # more cells than header columns: a damaged line
                    continue
                if keep(row):
                    kept.append({k: row.get(k) for k in self.fieldnames})
        self._write_local(kept)
        self.flush()
        return len(kept)

    def close(self) -> None:
        """Upload what is pending and delete the local copy."""
        try:
            self.flush()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "CsvLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
