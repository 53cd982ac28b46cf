"""A run's checkpoints as Ray Train registered them: its index
``checkpoints/checkpoint_manager_snapshot.json``.

Ray Train writes a checkpoint folder first and registers it (puts it in this index, which is
also what a restart resumes from) only once every file of it is in the store. With
``checkpoint.upload: async`` the upload runs in a thread of the worker; if it fails, the
report is never made and the error fails the worker group instead (Ray 2.60,
``ray/train/v2/_internal/execution/context.py``, ``_upload_checkpoint_and_report``). So a
folder that is not in the index is an upload that failed or was cut off: nothing here reads
from it. ``tests/test_elastic_ray.py`` fails an upload on a real cluster and checks this.
"""

from __future__ import annotations

import logging
from typing import Any

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.store import ArtifactStore

log = logging.getLogger(__name__)

INDEX = f"{layout.CHECKPOINTS}/checkpoint_manager_snapshot.json"  # Ray Train's checkpoint index


def latest(store: ArtifactStore, run_id: str) -> dict[str, Any] | None:
    """The checkpoint a resume starts from (Ray Train's latest registered one):
    ``{"dir", "path", "epochs", "iteration"}`` with ``path`` relative to the run folder, or
    None when the run has registered none (or its index cannot be read)."""
    try:
        snap = store.read_json(run_id, INDEX)
        last = snap["latest_checkpoint_result"]
        metrics = last.get("metrics") or {}
        name = last["checkpoint_dir_name"]
        return {"dir": name, "path": f"{layout.CHECKPOINTS}/{name}", "epochs": int(metrics["epoch"]) + 1,
                "iteration": int(metrics["iteration"])}  # fmt: skip
    except Exception:  # no checkpoint yet, or an index this version cannot read
        log.debug("no readable checkpoint index for run %s", run_id, exc_info=True)
        return None
