"""Every use of a private Ray API, in one place, each checked against the Ray it was written for.

Each function works around a Ray 2.60 behaviour described in docs/ray-notes.md ("Private Ray
APIs used here"). On another Ray version, or when the private name is gone, it falls back to
Ray's own behaviour and says so in a warning, rather than failing in a way nobody can read.
tests/test_ray_compat.py checks that the private names still exist in the installed Ray.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

TESTED_RAY = "2.60"  # major.minor these workarounds were written and tested against
ABORT_WAIT_S = 30  # Ray Train's graceful abort, before the controller is killed (< remote.STOP_WAIT_S)


def ray_version() -> str:
    import ray

    return ray.__version__


def tested(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed Ray) is the major.minor these were written for."""
    version = version or ray_version()
    return ".".join(version.split(".")[:2]) == TESTED_RAY


def _fallback(what: str, version: str) -> None:
    log.warning(
        "Ray %s is not Ray %s, which resnet-cluster was tested with: %s falls back to Ray's own "
        "behaviour (see docs/ray-notes.md, 'Private Ray APIs used here').", version, TESTED_RAY, what,
    )


def bound_sigint_abort(trainer: Any, on_stop: Callable[[], None], *, version: str | None = None) -> bool:
    """Make the first SIGINT (Ctrl-C, or `resnet-cluster stop` through the Jobs API) call
    ``on_stop`` at once and end ``trainer.fit()`` within ABORT_WAIT_S. Returns whether it did.

    Private API: ``DataParallelTrainer._register_sigint_handler(controller)``, which ``fit()``
    calls in the main thread (ray/train/v2/api/data_parallel_trainer.py in Ray 2.60,
    https://github.com/ray-project/ray/blob/ray-2.60.0/python/ray/train/v2/api/data_parallel_trainer.py).
    Ray's handler waits without a limit for the controller's ``abort``, which a controller that
    waits for resources answers only when that wait ends. Here the controller gets ABORT_WAIT_S
    and is killed if it does not answer (it was not training: nothing a checkpoint had not saved
    is lost). Other Ray versions keep Ray's handler.
    """
    version = version or ray_version()
    if not tested(version) or not callable(getattr(trainer, "_register_sigint_handler", None)):
        _fallback("the bounded SIGINT abort", version)
        return False

    def register(controller: Any) -> None:
        import ray

        def handler(signum, frame) -> None:
            first = not handler.fired
            handler.fired = True
            try:
                on_stop()
            except Exception:  # the store may be unreachable; stopping must not fail
                log.debug("recording the stop failed", exc_info=True)
            if first:
                try:
                    ray.get(controller.abort.remote(), timeout=ABORT_WAIT_S)
                    return  # aborted: fit() returns, and the run is recorded as stopped
                except ray.exceptions.GetTimeoutError:
                    ray.kill(controller)
                except ray.exceptions.RayActorError:
                    log.debug("the controller was gone at abort", exc_info=True)
            raise KeyboardInterrupt

        handler.fired = False
        signal.signal(signal.SIGINT, handler)

    trainer._register_sigint_handler = register
    return True


def _address_api() -> tuple[Any, Any] | None:
    """``(ray._private.services, ray._private.utils)`` if they have what claim_current_cluster uses."""
    try:
        from ray._private import services, utils
    except ImportError:
        return None
    needed = ((utils, "read_ray_address"), (utils, "write_ray_address"), (utils, "get_ray_address_file"),
              (services, "find_gcs_addresses"))  # fmt: skip
    return (services, utils) if all(callable(getattr(m, n, None)) for m, n in needed) else None


def claim_current_cluster(gcs_address: str, *, version: str | None = None) -> bool:
    """Make the local cluster this process started the machine's "current" Ray cluster while it
    runs, unless a live cluster already is. Returns whether it did.

    Ray Train 2.60's placement-group cleaner (an actor of every run) finds its cluster through
    the State API with no address, i.e. from ``/tmp/ray/ray_current_cluster``, which only
    ``ray start`` writes; a file left by a killed cluster makes the cleaner time out, and a
    trial that Tune stops then leaks its workers (docs/ray-notes.md). Private API:
    ``ray._private.utils.{read,write}_ray_address``, ``get_ray_address_file`` and
    ``ray._private.services.find_gcs_addresses``. The file is removed at exit if it still names
    this cluster.
    """
    import atexit

    version = version or ray_version()
    api = _address_api() if tested(version) else None
    if api is None:
        _fallback("claiming /tmp/ray/ray_current_cluster for a local cluster", version)
        return False
    services, utils = api
    try:
        current = utils.read_ray_address()
        if current and current in set(services.find_gcs_addresses()):
            return False  # a live `ray start` cluster: leave the user's pointer alone
        utils.write_ray_address(gcs_address)
    except Exception:  # without it only the cleanup of stopped trials is weaker
        log.debug("could not claim the current-cluster file", exc_info=True)
        return False

    def forget() -> None:
        try:
            if utils.read_ray_address() == gcs_address:
                os.remove(utils.get_ray_address_file(None))
        except Exception:
            log.debug("could not remove the current-cluster file", exc_info=True)

    atexit.register(forget)
    return True
