"""Shared CLI pieces: consoles, JSON output, the store option."""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any

from rich.console import Console

STORE_HELP = "Artifact store: a folder or fsspec URI (default: $RESNET_CLUSTER_STORE or ./runs-store)."
# rich styles of run and trial statuses (runs list, sweep tables)
STATUS_STYLE = {"finished": "green", "running": "cyan", "failed": "red", "stopped": "yellow",
                "incomplete": "yellow", "lost": "magenta", "pending": "dim"}  # fmt: skip

console = Console()
err_console = Console(stderr=True)


_json_out: IO[str] | None = None


def reserve_stdout_for_json() -> None:
    """Keep stdout for the one JSON document: from here on, whatever else writes to file
    descriptor 1 (Ray's own warnings, from any thread, Python or C++) goes to stderr, and
    :func:`print_json` writes to the original stdout. Used before starting Ray with ``--json``."""
    global _json_out
    if _json_out is not None:
        return
    try:
        if sys.stdout.fileno() != 1:
            return
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. a test runner's buffer)
        return
    sys.stdout.flush()
    _json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)


def print_json(doc: Any) -> None:
    """One JSON document on stdout, nothing else (for scripts)."""
    out = _json_out or sys.stdout
    out.write(json.dumps(doc, indent=2, default=str, allow_nan=False) + "\n")
    out.flush()


def fmt_err(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}%"


def fmt_num(v: float | None, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def resolve_store(store: str | None) -> str:
    from resnet_cluster.config import default_store

    return store or default_store()
