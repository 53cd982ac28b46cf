"""Names of the files in a run directory, and the run-id rules.

A run lives at ``<root>/runs/<run_id>/``. The file names below are the public layout: the
original experiments published these files under these names, and scripts read them.
"""

from __future__ import annotations

import re

from resnet_cluster.errors import StoreError

RUNS = "runs"  # runs live at <root>/RUNS/<run_id>/
SWEEPS = "sweeps"  # sweeps (their definition, trial list, report) at <root>/SWEEPS/<sweep_id>/

CONFIG = "config.yaml"  # the resolved job, exactly as run
MODEL = "model.pt"  # final weights plus the config needed to rebuild the model
TRAIN_CSV = "training_loss.csv"  # iteration, epoch, loss, lr, ...
TEST_CSV = "testing_error.csv"  # epoch, top1_err, top5_err, ...
GIT_COMMIT = "source.git-commit"  # HEAD hash (plus "# " comment lines)
GIT_PATCH = "source.git-patch"  # git diff against HEAD, untracked files included
ENVIRONMENT = "environment.json"  # versions, host, GPUs; secrets redacted
EVENTS = "events.jsonl"  # one JSON object per line: {"time", "event", ...}
SUMMARY = "summary.json"  # status + final/best metrics, written just before the manifest
MANIFEST = "manifest.json"  # sizes + sha256 of every other file; written last
CHECKPOINTS = "checkpoints"  # folder of resumable TrainState snapshots

# Prefix of the temporary names used for atomic local writes; never listed as run files.
TEMP_PREFIX = ".tmp-"

_RUN_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
_MAX_RUN_ID = 200


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` unchanged, or raise :class:`StoreError` if it cannot name a run folder.

    A run id is one path component of ``[A-Za-z0-9._-]``, not starting with ``.`` (so no
    ``..``, no hidden names), at most 200 characters.
    """
    hint = (
        "A run id is one folder name made of letters, digits, '.', '_' and '-', not starting "
        "with '.', at most 200 characters (for example 'cifar_r20-20240101-120000'); pick "
        "such a name."
    )
    if not isinstance(run_id, str) or not run_id:
        raise StoreError(f"Empty or missing run id ({run_id!r}). {hint}")
    if "/" in run_id or "\\" in run_id or ".." in run_id or run_id.startswith("."):
        raise StoreError(f"Run id {run_id!r} is a path, not a name. {hint}")
    if len(run_id) > _MAX_RUN_ID or not _RUN_ID_RE.fullmatch(run_id):
        raise StoreError(f"Run id {run_id!r} has characters or a length that are not allowed. {hint}")
    return run_id


def validate_relpath(relpath: str) -> str:
    """Normalise a path relative to a run folder (``/``-separated) or raise :class:`StoreError`.

    ``""`` means the run folder itself. Absolute paths, ``..`` components and backslashes are
    refused so that no call can reach outside its run.
    """
    if not isinstance(relpath, str):
        raise StoreError(f"Path inside a run must be a string, got {relpath!r}.")
    if relpath in ("", "."):
        return ""
    parts = relpath.split("/")
    if (
        relpath.startswith("/")
        or "\\" in relpath
        or ":" in parts[0]
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise StoreError(
            f"Path {relpath!r} inside a run is not a plain relative path; use names like "
            f"'{CONFIG}' or '{CHECKPOINTS}/epoch-0001.pt' with '/' separators, no '..'."
        )
    return relpath
