"""Connect to a Ray cluster: a local one started on demand, or an existing one by address."""

from __future__ import annotations

import logging
import os
from typing import Any

from resnet_cluster.errors import ClusterError
from resnet_cluster.launch.ray_compat import claim_current_cluster

_ray_context: Any = None  # what ray.init returned in this process


def resolve_address(address: str | None) -> str | None:
    """``--address`` wins over ``RAY_ADDRESS``; neither means "start a local cluster"."""
    return address or os.environ.get("RAY_ADDRESS") or None


def require_gcs_address(address: str | None) -> None:
    """ClusterError for a Jobs API URL where a driver in this process must connect itself."""
    if address and address.startswith(("http://", "https://")):
        raise ClusterError(
            f"{address} is a Ray Jobs API (dashboard) URL, which submits through the Jobs API; a "
            "driver in this process needs the cluster's GCS address instead (HOST:6379, as "
            "printed by `ray start --head`), or no address to start a local cluster."
        )


def connect(address: str | None = None, *, num_cpus: int | None = None) -> dict[str, Any]:
    """``ray.init`` once per process. Returns a description of the cluster.

    ``address`` is already resolved (see :func:`resolve_address`): None starts a NEW local
    cluster (``address="local"``), never silently joining a `ray start` cluster that happens to
    run on this machine.

    Worker logs stay out of the terminal (``log_to_driver=False``): the live display shows the
    metrics, and the logs are in the Ray dashboard and under ``/tmp/ray/session_latest/logs``.
    """
    import ray

    require_gcs_address(address)
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "logging_level": logging.WARNING,
            "log_to_driver": False,
            "configure_logging": True,
        }
        kwargs["address"] = address or "local"
        if not address and num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        global _ray_context
        try:
            _ray_context = ray.init(**kwargs)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
            where = f"at {address}" if address else "locally"
            raise ClusterError(
                f"could not connect to a Ray cluster {where}: {str(e).splitlines()[0]}. Check that "
                "the address is right and the cluster is up (`ray status --address ...`), or leave "
                "--address and RAY_ADDRESS unset to start a local cluster."
            ) from None
        if not address:
            claim_current_cluster(ray.get_runtime_context().gcs_address)
    ctx = ray.get_runtime_context()
    return {
        "address": address or "local",
        "dashboard_url": getattr(_ray_context, "dashboard_url", None) or None,
        "resources": ray.cluster_resources(),
        "node_id": ctx.get_node_id(),
        "local": address in (None, "local"),
    }
