"""A sweep's table in the published layout, and its curves.

One row per grid row: the test error (%) as mean ± std over the seeds whose runs finished, the
best seed, the reference figure of the published table, and the difference mean − reference.
``std`` is the sample standard deviation (n − 1), blank with a single run. The test error of a
run is its last evaluation (``metric: final``, as the tables report) or its best one
(``metric: best``).

A sweep run with ``--set`` overrides that change the experiment (the dataset, the training
budget, the model, the recipe) is not the published experiment: its report shows the budget the
trials really ran, and gives no diff against the reference (``comparable: false``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import tempfile
from typing import Any

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.plots import pyplot
from resnet_cluster.artifacts.registry import read_csv
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.sweep import runner

CURVES_PNG = "curves.png"
FORMATS = ("table", "markdown", "csv", "json")


# Dotted job keys (or prefixes ending in "." / "_") whose override makes a trial a different
# experiment from the published one. Placement, storage, checkpointing, loader processes and
# precision settings leave it the same experiment.
EXPERIMENT_KEYS = (
    "seed", "model.", "optim.", "schedule.", "bn.", "eval.",
    "train.iterations", "train.epochs", "train.batch_size",
    "data.dataset", "data.augment", "data.synthetic_", "data.val_split", "data.lighting_std",
)  # fmt: skip


def experiment_overrides(overrides: list[str]) -> list[str]:
    """The ``--set`` overrides (``key=value`` texts) that change the experiment."""
    out = []
    for text in overrides:
        key = text.partition("=")[0].strip()
        if any(key == k or (k.endswith((".", "_")) and key.startswith(k)) for k in EXPERIMENT_KEYS):
            out.append(text)
    return out


def budget(trials: list[dict[str, Any]]) -> str:
    """The training length the trials ran, e.g. ``200 epochs``, or several joined by ``/``."""
    seen: list[str] = []
    for t in trials:
        train = t["job"].get("train", {})
        text = f"{train['iterations']} iterations" if train.get("iterations") else f"{train.get('epochs')} epochs"
        if text not in seen:
            seen.append(text)
    return " / ".join(seen)


def _title(title: str | None, real_budget: str, comparable: bool) -> str | None:
    """The file's title, its budget in parentheses replaced by the one the trials ran."""
    if not title or comparable:
        return title
    title, n = re.subn(r"\(\d+ (?:epochs|iterations)\)", f"({real_budget})", title)
    return title if n else f"{title} ({real_budget})"


def build(store: ArtifactStore, sweep_id: str) -> dict[str, Any]:
    meta = runner.load(store, sweep_id)
    changed = experiment_overrides(meta.get("overrides") or [])
    comparable = not changed
    real_budget = budget(meta["trials"])
    states = runner.trial_states(store, meta)
    metric = meta.get("metric", "final")
    rows = []
    for row in meta["rows"]:
        trials = [t for t in meta["trials"] if t["row"] == row["index"]]
        runs, errors = [], []
        for t in trials:
            rec = states[t["run_id"]]
            status = rec.status if rec else "not started"
            err = None
            if rec is not None and rec.status == "finished":
                err = rec.final_top1_err if metric == "final" else rec.best_top1_err
                if err is not None:
                    errors.append(err)
            runs.append({"run_id": t["run_id"], "seed": t["seed"], "status": status, "top1_err": err})
        mean = statistics.fmean(errors) if errors else None
        std = statistics.stdev(errors) if len(errors) > 1 else None
        ref = row.get("reference")
        rows.append(
            {
                "row": row["label"],
                "mean": mean,
                "std": std,
                "best": min(errors) if errors else None,
                "n": len(errors),
                "trials": len(trials),
                "reference": ref,
                "diff": (mean - ref) if (comparable and mean is not None and ref is not None) else None,
                "runs": runs,
            }
        )
    done = sum(r["n"] for r in rows)
    return {
        "sweep_id": sweep_id,
        "name": meta.get("name"),
        "title": _title(meta.get("title"), real_budget, comparable),
        "file_title": meta.get("title"),
        "source": meta.get("source"),
        "budget": real_budget,
        "comparable": comparable,
        "changed_by": changed,
        "metric": metric,
        "store": store.root,
        "created": meta.get("created"),
        "complete": done == len(meta["trials"]),
        "finished_trials": done,
        "total_trials": len(meta["trials"]),
        "rows": rows,
    }


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def not_comparable_note(rep: dict[str, Any]) -> str:
    """One line saying why the diffs are withheld; empty for a sweep run as published."""
    if rep.get("comparable", True):
        return ""
    return (
        f"Not comparable with the reference: the trials ran with --set {', '.join(rep['changed_by'])} "
        f"({rep['budget']}), so no diff is given."
    )


def cells(r: dict[str, Any], comparable: bool = True) -> list[str]:
    """The displayed cells of one row: row, mean ± std, best, reference, diff, runs.

    Without a comparable experiment the diff cell reads ``n/c`` (not comparable).
    """
    if r["mean"] is None:
        err = ""
    elif r["std"] is None:
        err = _f(r["mean"])
    else:
        err = f"{_f(r['mean'])} ± {_f(r['std'])}"
    diff = _f(r["diff"], "{:+.2f}") if comparable else ("n/c" if r["reference"] is not None else "")
    return [r["row"], err, _f(r["best"]), _f(r["reference"]), diff, f"{r['n']}/{r['trials']}"]


HEADER = ["row", "test error (%)", "best", "reference", "diff", "runs"]


def markdown(rep: dict[str, Any]) -> str:
    lines = []
    if rep.get("title"):
        lines.append(f"**{rep['title']}**" + (f" (reference: {rep['source']})" if rep.get("source") else ""))
        lines.append("")
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|")
    comparable = rep.get("comparable", True)
    for r in rep["rows"]:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(r, comparable)) + " |")
    lines.append("")
    lines.append(
        f"Test error: {rep['metric']} evaluation, mean ± sample std over seeds; diff = mean − "
        f"reference. Sweep {rep['sweep_id']}, {rep['finished_trials']}/{rep['total_trials']} runs finished."
    )
    if not comparable:
        lines.append("")
        lines.append(not_comparable_note(rep))
    return "\n".join(lines) + "\n"


def to_csv(rep: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "mean", "std", "best", "n", "trials", "reference", "diff"])
    for r in rep["rows"]:
        w.writerow([r["row"], *(("" if r[k] is None else r[k]) for k in ("mean", "std", "best", "n", "trials", "reference", "diff"))])
    return buf.getvalue()


def to_json(rep: dict[str, Any]) -> str:
    return json.dumps(rep, indent=2)


def _mean_curve(curves: list[list[dict[str, Any]]], key: str) -> tuple[list[float], list[float]]:
    """The mean over seeds at the iterations every seed logged (same schedule, same points)."""
    per = [{r["iteration"]: r[key] for r in c if r.get("iteration") is not None and r.get(key) is not None} for c in curves]
    per = [p for p in per if p]
    if not per:
        return [], []
    common = sorted(set.intersection(*(set(p) for p in per)))
    return common, [statistics.fmean(p[i] for p in per) for i in common]


def plot(store: ArtifactStore, rep: dict[str, Any]) -> str | None:
    """Training loss and test error against iterations, one line per row (mean over its
    finished seeds), in one two-panel PNG saved in the sweep's folder. Returns its URI."""
    plt = pyplot()

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    drawn = 0
    for r in rep["rows"]:
        ids = [run["run_id"] for run in r["runs"] if run["status"] == "finished"]
        if not ids:
            continue
        xs, ys = _mean_curve([read_csv(store, i, layout.TRAIN_CSV) for i in ids], "loss")
        line = ax_loss.plot(xs, ys, label=r["row"], linewidth=1)[0]
        xs, ys = _mean_curve([read_csv(store, i, layout.TEST_CSV) for i in ids], "top1_err")
        ax_err.plot(xs, ys, label=r["row"], color=line.get_color(), marker="." if len(xs) < 40 else None)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax_loss.set_yscale("log")
    ax_loss.set_title("training loss")
    ax_err.set_title("test error (%)")
    for ax in (ax_loss, ax_err):
        ax.set_xlabel("iterations")
        ax.grid(True, alpha=0.3)
    ax_err.legend(fontsize=7)
    fig.suptitle(rep.get("title") or rep["sweep_id"], fontsize=10)
    fig.tight_layout()
    views = store.sweeps()
    with tempfile.TemporaryDirectory(prefix="rc-sweep-") as d:
        path = os.path.join(d, CURVES_PNG)
        fig.savefig(path)
        plt.close(fig)
        views.put_file(rep["sweep_id"], path, CURVES_PNG)
    return views.uri(rep["sweep_id"], CURVES_PNG)
