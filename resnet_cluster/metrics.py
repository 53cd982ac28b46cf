"""Training metrics in Ray's metrics system, so Prometheus and Grafana pick them up.

Ray exports a metric named ``resnet_cluster_images_per_second`` as
``ray_resnet_cluster_images_per_second`` on each node's metrics agent; infra/grafana has a
dashboard for these. Every rank reports its own series (tag ``rank``), tagged with the run id.
"""

from __future__ import annotations

from typing import Any

from resnet_cluster.engine.loop import Callback

# name -> (description, key of the loop's log record it comes from)
GAUGES: dict[str, tuple[str, str]] = {
    "resnet_cluster_images_per_second": ("Training images per second, all workers together.", "images_per_sec"),
    "resnet_cluster_train_loss": ("Training loss (mean cross-entropy) over the last log window.", "loss"),
    "resnet_cluster_train_error_percent": ("Training top-1 error over the last log window, %.", "train_err"),
    "resnet_cluster_learning_rate": ("Learning rate of the last step.", "lr"),
    "resnet_cluster_data_wait_fraction": (
        "Fraction of this worker's step time spent waiting for the next batch.",
        "data_wait_fraction",
    ),
}
EPOCH_GAUGES: dict[str, tuple[str, str]] = {
    "resnet_cluster_test_error_percent": ("Top-1 test error of the last evaluation, %.", "top1_err"),
    "resnet_cluster_epoch": ("Epochs finished.", "epoch_done"),
}
TAG_KEYS = ("run_id", "rank")


class RayMetrics(Callback):
    """Sets ``ray.util.metrics`` gauges from the loop's log and epoch records."""

    def __init__(self, run_id: str, rank: int):
        from ray.util.metrics import Gauge

        self.tags = {"run_id": run_id, "rank": str(rank)}
        self.gauges = {
            name: (Gauge(name, description=desc, tag_keys=TAG_KEYS), key)
            for name, (desc, key) in {**GAUGES, **EPOCH_GAUGES}.items()
        }

    def _set(self, names: dict[str, tuple[str, str]], record: dict[str, Any]) -> None:
        for name in names:
            gauge, key = self.gauges[name]
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                gauge.set(float(value), tags=self.tags)

    def on_log(self, record: dict[str, Any]) -> None:
        self._set(GAUGES, record)

    def on_epoch_end(self, record: dict[str, Any], state) -> None:
        self._set(EPOCH_GAUGES, {**record, "epoch_done": record["epoch"] + 1})
