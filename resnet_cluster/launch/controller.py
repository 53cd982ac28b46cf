"""What runs in Ray Train's controller (``RunConfig(callbacks=...)``), not on the workers.

:class:`FailureRecorder` writes each failure of the run's worker group to the run's
``events.jsonl``, so ``runs show`` says why a run restarted (a lost node, a crashed worker, a
checkpoint upload that failed) and not only that it did.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.train import UserCallback

from resnet_cluster.artifacts.run import RunWriter
from resnet_cluster.artifacts.store import ArtifactStore

log = logging.getLogger(__name__)


def one_line(e: BaseException, limit: int = 300) -> str:
    """The line a traceback ends with (``Type: message``). Ray Train hands the controller a
    worker's error as its formatted traceback (``UserExceptionWithTraceback``), whose text
    ends with that line."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if len(lines) > 1:  # a traceback
        text = lines[-1]
    else:
        text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class FailureRecorder(UserCallback):
    """A ``worker_failed`` event for each failure of a worker group: the ranks that raised and
    each one's error in one line. Ray calls ``after_exception`` at every poll of a group that
    has errors, until the controller acts on them; each distinct set is recorded once.

    It lives in the controller actor, so it holds plain values only (the store's root and
    endpoint: credentials come from the node's environment or instance role). A store that
    cannot be written to loses the event with a warning; it never fails the controller.
    """

    def __init__(self, store_root: str, endpoint_url: str | None, run_id: str, submission: str | None):
        self.store_root, self.endpoint_url = store_root, endpoint_url
        self.run_id, self.submission = run_id, submission
        self.seen: set[tuple] = set()

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        errors = {int(rank): one_line(e) for rank, e in worker_exceptions.items()}
        key = tuple(sorted(errors.items()))
        if not errors or key in self.seen:
            return
        self.seen.add(key)
        try:
            store = ArtifactStore(self.store_root, endpoint_url=self.endpoint_url)
            RunWriter(store, self.run_id).event(
                "worker_failed",
                submission=self.submission,
                ranks=sorted(errors),
                errors={str(rank): text for rank, text in sorted(errors.items())},
            )
        except Exception:
            log.warning("could not record the worker group's failure in run %s", self.run_id, exc_info=True)
