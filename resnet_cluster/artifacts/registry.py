"""List and inspect the runs in an artifact store.

Status rules (a run is never "finished" without a manifest):

- manifest.json present: the ``status`` in summary.json (finished | failed | stopped), or
  "incomplete" if the summary is missing or says something else;
- no manifest: "failed" if the last lifecycle event is ``failed``, "running" if it is
  submitted/started/resumed/restarted, else "incomplete". Non-lifecycle events (e.g.
  "checkpoint") are ignored for this. A "running" run whose newest heartbeat is stale is
  "lost" (see ``artifacts.heartbeat``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any

from resnet_cluster.artifacts import heartbeat, layout
from resnet_cluster.artifacts.manifest import verify_manifest
from resnet_cluster.artifacts.plots import pyplot
from resnet_cluster.artifacts.run import FINAL_STATUSES, LIFECYCLE_EVENTS
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.errors import StoreError

_RUNNING_EVENTS = ("submitted", "started", "resumed", "restarted")


@dataclasses.dataclass(frozen=True)
class RunRecord:
    run_id: str
    job: str | None
    model: str | None
    status: str  # finished | failed | stopped | running | lost | incomplete
    epochs: int | None
    iterations: int | None
    best_top1_err: float | None
    final_top1_err: float | None
    started: str | None  # ISO-8601 UTC
    finished: str | None  # ISO-8601 UTC
    uri: str
    sweep_id: str | None = None  # the sweep that launched it, if any (see _sweep_of)


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
    if last in ("failed", "stopped"):  # both resumable with --name: no manifest was written
        return last
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


_LISTED_FILES = (layout.SUMMARY, layout.EVENTS, layout.CONFIG, *heartbeat.FILES)


def _parse(names: set[str], blobs: dict[str, bytes]) -> tuple[bool, dict | None, list[dict], dict | None, bool]:
    """(has_manifest, summary, events, config, heartbeat stale) from a run's top-level names
    and file bytes."""
    import yaml

    summary = config = None
    if layout.SUMMARY in blobs:
        try:
            summary = json.loads(blobs[layout.SUMMARY].decode("utf-8", "replace"))
        except json.JSONDecodeError:
            summary = None
        if not isinstance(summary, dict):
            summary = None
    events = parse_events(blobs[layout.EVENTS].decode("utf-8", "replace")) if layout.EVENTS in blobs else []
    if layout.CONFIG in blobs:
        try:
            config = yaml.safe_load(blobs[layout.CONFIG].decode("utf-8", "replace"))
        except yaml.YAMLError:
            config = None
        if not isinstance(config, dict):
            config = None
    return layout.MANIFEST in names, summary, events, config, heartbeat.is_lost(blobs)


def _load(store: ArtifactStore, run_id: str) -> tuple[bool, dict | None, list[dict], dict | None, bool]:
    """(has_manifest, summary, events, config, heartbeat stale) reading only those few files."""
    names = set(store.list_top(run_id))
    got = store.read_many([(run_id, n) for n in _LISTED_FILES if n in names])
    return _parse(names, {rel: data for (_, rel), data in got.items()})


def _sweep_of(summary: dict | None, events: list[dict[str, Any]]) -> str | None:
    """The sweep id a run is tagged with: ``sweep_id`` in summary.json, or in any event (the
    sweep launcher puts it on the ``submitted`` event)."""
    if summary and summary.get("sweep_id"):
        return str(summary["sweep_id"])
    for e in events:
        if e.get("sweep_id"):
            return str(e["sweep_id"])
    return None


def _record(store: ArtifactStore, run_id: str, loaded) -> RunRecord:
    has_manifest, summary, events, config, stale = loaded
    summary_d = summary or {}
    config_d = config or {}
    train = config_d.get("train") if isinstance(config_d.get("train"), dict) else {}
    model = config_d.get("model") if isinstance(config_d.get("model"), dict) else {}
    status = run_status(has_manifest, summary, events)
    if status == "running" and stale:
        status = "lost"  # nobody drives it: resume with submit --name
    started = next((e.get("time") for e in events if e.get("event") in ("submitted", "started")), None)
    if started is None and events:
        started = events[0].get("time")
    finished = None
    if status in FINAL_STATUSES:
        finished = next((e.get("time") for e in reversed(events) if e.get("event") in FINAL_STATUSES), None)
        finished = finished or summary_d.get("written")
    return RunRecord(
        run_id=run_id,
        job=config_d.get("name") or summary_d.get("job"),
        model=model.get("arch") or summary_d.get("model"),
        status=status,
        epochs=_as_int(summary_d.get("epochs", train.get("epochs"))),
        iterations=_as_int(summary_d.get("iterations", train.get("iterations"))),
        best_top1_err=_metric(summary_d, "best", "top1_err"),
        final_top1_err=_metric(summary_d, "final", "top1_err"),
        started=started,
        finished=finished,
        uri=store.run_uri(run_id),
        sweep_id=_sweep_of(summary, events),
    )


STATUSES = ("finished", "failed", "stopped", "running", "lost", "incomplete")


def get_run(store: ArtifactStore, run_id: str) -> RunRecord | None:
    """One run's record (None if the store has no such run), reading only that run's files."""
    if not store.exists(run_id):
        return None
    return _record(store, run_id, _load(store, run_id))


def list_runs(
    store: ArtifactStore, *, sweep: str | None = None, status: str | list[str] | None = None
) -> list[RunRecord]:
    """Every run in the store, newest first (by start time, then run id).

    Reads only each run's summary.json, events.jsonl and config.yaml (plus one listing): on
    S3 one paginated listing of the runs prefix and concurrent GETs, so thousands of runs list
    in seconds. ``sweep`` keeps the runs tagged with that sweep id; ``status`` one or more of
    :data:`STATUSES`.
    """
    wanted = [status] if isinstance(status, str) else list(status or [])
    bad = [w for w in wanted if w not in STATUSES]
    if bad:
        raise StoreError(f"Unknown run status {', '.join(bad)}; use one of {', '.join(STATUSES)}.")
    tops = store.list_tops()
    first = (layout.SUMMARY, layout.EVENTS, *heartbeat.FILES)
    got = store.read_many([(rid, n) for rid, names in tops.items() for n in first if n in names])
    blobs: dict[str, dict[str, bytes]] = {}
    for (rid, rel), data in got.items():
        blobs.setdefault(rid, {})[rel] = data
    # config.yaml only where summary.json does not already name the job and model (runs that
    # have not finished): a finished run costs two reads, not three.
    need = []
    for rid, names in tops.items():
        summary = _parse(set(), {layout.SUMMARY: blobs.get(rid, {}).get(layout.SUMMARY, b"")})[1]
        if layout.CONFIG in names and not (summary and summary.get("job") and summary.get("model")):
            need.append((rid, layout.CONFIG))
    for (rid, rel), data in store.read_many(need).items():
        blobs.setdefault(rid, {})[rel] = data
    records = [_record(store, rid, _parse(set(names), blobs.get(rid, {}))) for rid, names in tops.items()]
    if sweep is not None:
        records = [r for r in records if r.sweep_id == sweep]
    if wanted:
        records = [r for r in records if r.status in wanted]
    records.sort(key=lambda r: (r.started or "", r.run_id), reverse=True)
    return records


def _no_run(store: ArtifactStore, run_id: str) -> StoreError:
    known = store.list_run_ids()
    close = difflib.get_close_matches(run_id, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return StoreError(
        f"No run {run_id!r} in artifact store {store.root}.{hint} See the runs with "
        f"`resnet-cluster runs list --store {store.root}`, or pass the store the run was "
        f"written to."
    )


def require_run(store: ArtifactStore, run_id: str) -> None:
    """StoreError (with close matches) unless ``run_id`` is a valid id of a run in the store."""
    layout.validate_run_id(run_id)
    if not store.exists(run_id):
        raise _no_run(store, run_id)


def read_csv(store: ArtifactStore, run_id: str, name: str) -> list[dict[str, Any]]:
    """Rows of a run's CSV log with numbers parsed (``[]`` if the run has no such file)."""
    import csv
    import io

    if not store.exists(run_id, name):
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(store.read_text(run_id, name))):
        if None in row:  # a damaged line: more cells than header columns
            continue
        rows.append({k: parse_number(v) for k, v in row.items()})
    return rows


def parse_number(text: str | None) -> Any:
    """A CSV cell as int, float, None (empty) or the text itself."""
    if text in (None, ""):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _heartbeat(store: ArtifactStore, run_id: str) -> dict[str, Any] | None:
    names = set(store.list_top(run_id))
    got = store.read_many([(run_id, n) for n in heartbeat.FILES if n in names])
    return heartbeat.newest({rel: data for (_, rel), data in got.items()})


def show_run(store: ArtifactStore, run_id: str, *, last_events: int = 20) -> dict[str, Any]:
    """Everything about one run: record, config, summary, last events, files, manifest problems."""
    require_run(store, run_id)
    loaded = _load(store, run_id)
    _, summary, events, config, _ = loaded
    curve = [
        {k: r.get(k) for k in ("epoch", "iteration", "top1_err", "top5_err")}
        for r in read_csv(store, run_id, layout.TEST_CSV)
        if isinstance(r.get("top1_err"), (int, float))
    ]
    return {
        "record": dataclasses.asdict(_record(store, run_id, loaded)),
        "config": config,
        "summary": summary,
        "test_error": curve,
        "events": events[-last_events:] if last_events > 0 else [],
        # every world-size change of an elastic run: {time, from_world_size, to_world_size, iteration, ...}
        "resizes": [e for e in events if e.get("event") == "resized"],
        # each announced preemption of a node of the run, and the checkpoint taken for it
        "preemptions": [e for e in events if e.get("event") == "preemption_notice"],
        # each failure of the worker group Ray Train saw (ranks, one line per error)
        "worker_failures": [e for e in events if e.get("event") == "worker_failed"],
        "heartbeat": _heartbeat(store, run_id),
        "files": store.list_files(run_id),
        "manifest_problems": verify_manifest(store, run_id, hashes=False),
    }


# ---------------------------------------------------------------------------- compare
def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_MISSING = "<unset>"


def compare_runs(store: ArtifactStore, run_ids: list[str]) -> dict[str, Any]:
    """Config differences, final and best metrics side by side, and each run's test-error curve.

    ``{"runs": [ids], "config_diff": {dotted key: [value per run]}, "metrics": {id: {"status",
    "final": {...}, "best": {...}}}, "curves": {id: [{"epoch", "iteration", "top1_err"}]}}``.
    Keys equal in every run are left out of ``config_diff``; ``artifacts.*`` is left out too
    (where a run is stored is not how it was trained).
    """
    if len(run_ids) < 2:
        raise StoreError("runs compare needs at least two run ids (see `resnet-cluster runs list`).")
    if len(set(run_ids)) != len(run_ids):
        raise StoreError(f"runs compare got the same run twice: {' '.join(run_ids)}.")
    loaded = {}
    for rid in run_ids:
        require_run(store, rid)
        loaded[rid] = _load(store, rid)
    flat = {rid: flatten(loaded[rid][3] or {}) for rid in run_ids}
    keys = sorted(set().union(*flat.values()))
    diff = {}
    for k in keys:
        if k.startswith("artifacts."):
            continue
        values = [flat[rid].get(k, _MISSING) for rid in run_ids]
        if any(v != values[0] for v in values[1:]):
            diff[k] = values
    metrics = {}
    curves = {}
    for rid in run_ids:
        has_manifest, summary, events, _, stale = loaded[rid]
        rows = read_csv(store, rid, layout.TEST_CSV)
        curves[rid] = [
            {k: r.get(k) for k in ("epoch", "iteration", "top1_err")}
            for r in rows
            if isinstance(r.get("top1_err"), (int, float))
        ]
        final = dict((summary or {}).get("final") or {})
        best = dict((summary or {}).get("best") or {})
        if not final and curves[rid]:  # still running: the latest and best evaluation so far
            final = dict(curves[rid][-1])
            best = dict(min(curves[rid], key=lambda r: r["top1_err"]))
        status = run_status(has_manifest, summary, events)
        metrics[rid] = {"status": "lost" if status == "running" and stale else status, "final": final, "best": best}
    return {"runs": list(run_ids), "config_diff": diff, "metrics": metrics, "curves": curves}


def plot_curves(curves: dict[str, list[dict[str, Any]]], path: str, *, title: str = "") -> str:
    """Write test top-1 error (%) against iterations for several runs to one PNG; return path."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for rid, rows in curves.items():
        xs = [r.get("iteration") if r.get("iteration") is not None else r.get("epoch") for r in rows]
        ax.plot(xs, [r["top1_err"] for r in rows], marker="." if len(rows) < 40 else None, label=rid)
    # Fig. 6 of the paper: test error (%) against iterations.
    ax.set_xlabel("iterations")
    ax.set_ylabel("test top-1 error (%)")
    ax.set_title(title or "test error")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def text_plot(values: list[float], *, width: int = 60, height: int = 8) -> list[str]:
    """A small text plot of a curve (one column per point, resampled to ``width``), top = max.

    Returns ``height`` lines plus an axis line; [] for fewer than 2 values.
    """
    vals = [float(v) for v in values if v is not None]
    if len(vals) < 2:
        return []
    if len(vals) > width:  # resample: the value at evenly spaced positions
        vals = [vals[round(i * (len(vals) - 1) / (width - 1))] for i in range(width)]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    rows = [[" "] * len(vals) for _ in range(height)]
    for x, v in enumerate(vals):
        level = round((v - lo) / span * (height - 1))
        rows[height - 1 - level][x] = "•"
    labels = [f"{hi:7.2f} ┤", *[" " * 7 + " │"] * (height - 2), f"{lo:7.2f} ┤"]
    return [lab + "".join(r) for lab, r in zip(labels, rows)] + [" " * 8 + "└" + "─" * len(vals)]
