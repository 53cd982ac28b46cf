"""List and inspect the runs in an artifact store.

Status rules (a run is never "finished" without a manifest):

- manifest.json present: the ``status`` in summary.json (finished | failed | stopped), or
  "incomplete" if the summary is missing or says something else;
- no manifest: "failed" if the last lifecycle event is ``failed``, "running" if it is
  submitted/started/resumed/restarted, else "incomplete". Non-lifecycle events (e.g.
  "checkpoint") are ignored for this.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.manifest import verify_manifest
from resnet_cluster.artifacts.run import FINAL_STATUSES, LIFECYCLE_EVENTS
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.errors import StoreError

_RUNNING_EVENTS = ("submitted", "started", "resumed", "restarted")


@dataclasses.dataclass(frozen=True)
class RunRecord:
    run_id: str
    job: str | None
    model: str | None
    status: str  # finished | failed | stopped | running | incomplete
    epochs: int | None
    iterations: int | None
    best_top1_err: float | None
    final_top1_err: float | None
    started: str | None  # ISO-8601 UTC
    finished: str | None  # ISO-8601 UTC
    uri: str


def parse_events(text: str) -> list[dict[str, Any]]:
    """Events from events.jsonl text; damaged lines (e.g. a cut-off last line) are skipped."""
    events = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "event" in obj:
            events.append(obj)
    return events


def run_status(has_manifest: bool, summary: dict[str, Any] | None, events: list[dict[str, Any]]) -> str:
    if has_manifest:
        status = (summary or {}).get("status")
        return status if status in FINAL_STATUSES else "incomplete"
    lifecycle = [e["event"] for e in events if e.get("event") in LIFECYCLE_EVENTS]
    last = lifecycle[-1] if lifecycle else None
    if last == "failed":
        return "failed"
    if last in _RUNNING_EVENTS:
        return "running"
    return "incomplete"


def _metric(summary: dict[str, Any], section: str, name: str) -> float | None:
    value = summary.get(f"{section}_{name}")
    if value is None and isinstance(summary.get(section), dict):
        value = summary[section].get(name)
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _as_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _load(store: ArtifactStore, run_id: str) -> tuple[bool, dict | None, list[dict], dict | None]:
    """(has_manifest, summary, events, config) reading only those few files."""
    import yaml

    names = set(store.list_top(run_id))
    has_manifest = layout.MANIFEST in names
    summary = config = None
    events: list[dict[str, Any]] = []
    if layout.SUMMARY in names:
        try:
            summary = store.read_json(run_id, layout.SUMMARY)
        except StoreError:
            summary = None
        if not isinstance(summary, dict):
            summary = None
    if layout.EVENTS in names:
        events = parse_events(store.read_text(run_id, layout.EVENTS))
    if layout.CONFIG in names:
        try:
            config = yaml.safe_load(store.read_text(run_id, layout.CONFIG))
        except yaml.YAMLError:
            config = None
        if not isinstance(config, dict):
            config = None
    return has_manifest, summary, events, config


def _record(store: ArtifactStore, run_id: str, loaded) -> RunRecord:
    has_manifest, summary, events, config = loaded
    summary_d = summary or {}
    config_d = config or {}
    train = config_d.get("train") if isinstance(config_d.get("train"), dict) else {}
    model = config_d.get("model") if isinstance(config_d.get("model"), dict) else {}
    status = run_status(has_manifest, summary, events)
    started = next((e.get("time") for e in events if e.get("event") in ("submitted", "started")), None)
    if started is None and events:
        started = events[0].get("time")
    finished = None
    if status in FINAL_STATUSES:
        finished = next((e.get("time") for e in reversed(events) if e.get("event") in FINAL_STATUSES), None)
        finished = finished or summary_d.get("written")
    return RunRecord(
        run_id=run_id,
        job=config_d.get("name"),
        model=model.get("arch"),
        status=status,
        epochs=_as_int(summary_d.get("epochs", train.get("epochs"))),
        iterations=_as_int(summary_d.get("iterations", train.get("iterations"))),
        best_top1_err=_metric(summary_d, "best", "top1_err"),
        final_top1_err=_metric(summary_d, "final", "top1_err"),
        started=started,
        finished=finished,
        uri=store.run_uri(run_id),
    )


def list_runs(store: ArtifactStore) -> list[RunRecord]:
    """Every run in the store, newest first (by start time, then run id)."""
    records = [_record(store, rid, _load(store, rid)) for rid in store.list_run_ids()]
    records.sort(key=lambda r: (r.started or "", r.run_id), reverse=True)
    return records


def show_run(store: ArtifactStore, run_id: str, *, last_events: int = 20) -> dict[str, Any]:
    """Everything about one run: record, config, summary, last events, files, manifest problems."""
    layout.validate_run_id(run_id)
    if not store.exists(run_id):
        known = store.list_run_ids()
        close = difflib.get_close_matches(run_id, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise StoreError(
            f"No run {run_id!r} in artifact store {store.root}.{hint} See the runs with "
            f"`resnet-cluster runs list --store {store.root}`, or pass the store the run was "
            f"written to."
        )
    loaded = _load(store, run_id)
    _, summary, events, config = loaded
    return {
        "record": dataclasses.asdict(_record(store, run_id, loaded)),
        "config": config,
        "summary": summary,
        "events": events[-last_events:] if last_events > 0 else [],
        "files": store.list_files(run_id),
        "manifest_problems": verify_manifest(store, run_id),
    }
