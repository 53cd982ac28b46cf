"""Small helpers on local files shared by the data and artifacts packages."""

from __future__ import annotations

import hashlib
import os


def hash_file(path: str | os.PathLike, algorithm: str = "sha256", *, chunk: int = 1 << 20) -> str:
    """Hex digest of a local file, read in 1 MiB chunks (checkpoints and shards are large)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
