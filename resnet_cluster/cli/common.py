"""Shared CLI pieces: consoles, JSON output, the store option."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def print_json(doc: Any) -> None:
    """One JSON document on stdout, nothing else (for scripts)."""
    sys.stdout.write(json.dumps(doc, indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def fmt_err(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}%"


def fmt_num(v: float | None, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def resolve_store(store: str | None) -> str:
    from resnet_cluster.config import default_store

    return store or default_store()
