"""Exceptions handled on purpose leave a debug record in the module's logger; the CLI's global
--verbose shows the package's debug logs."""

from __future__ import annotations

import logging

from typer.testing import CliRunner

from resnet_cluster.artifacts import checkpoints
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.cli import app
from resnet_cluster.launch import failures


def test_swallowed_errors_leave_a_debug_record(tmp_path, caplog):
    store = ArtifactStore(str(tmp_path / "store"))
    with caplog.at_level(logging.DEBUG, logger="resnet_cluster"):
        assert checkpoints.latest(store, "r1") is None
        assert failures.lost_worker_nodes(store, "r1", {"n1": "10.0.0.1"}, {}) == {}
    names = [(r.name, r.levelno) for r in caplog.records]
    assert names == [("resnet_cluster.artifacts.checkpoints", logging.DEBUG),
                     ("resnet_cluster.launch.failures", logging.DEBUG)]  # fmt: skip
    assert "no readable checkpoint index for run r1" in caplog.records[0].getMessage()
    assert caplog.records[0].exc_info is not None


def test_verbose_flag_turns_on_debug_logs():
    logger = logging.getLogger("resnet_cluster")
    before_level, before_handlers = logger.level, list(logger.handlers)
    try:
        result = CliRunner().invoke(app, ["--verbose", "models", "list", "--json"])
        assert result.exit_code == 0, result.output
        assert logger.level == logging.DEBUG and len(logger.handlers) == len(before_handlers) + 1
        logger.handlers[:] = before_handlers
        logger.setLevel(before_level)
        result = CliRunner().invoke(app, ["models", "list", "--json"])
        assert result.exit_code == 0 and logger.level == before_level
    finally:
        logger.handlers[:] = before_handlers
        logger.setLevel(before_level)
