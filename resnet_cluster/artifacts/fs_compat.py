"""Every use of a private fsspec API, in one place, checked against the fsspec it was written for.

``AbstractFileSystem._strip_protocol`` turns what a filesystem returns (``s3://bucket/key`` or
``bucket/key``, depending on the implementation and the call) into the path form its other
methods use. fsspec has no public per-filesystem equivalent; ``fsspec.core.strip_protocol``
works from the URL's protocol rather than from the filesystem instance. It is a classmethod
every fsspec filesystem has had since fsspec 0.x
(https://filesystem-spec.readthedocs.io/en/latest/api.html#fsspec.spec.AbstractFileSystem).
Without it (another fsspec, or a filesystem that is not fsspec's), the fallback strips the
filesystem's protocols by hand, as fsspec's default implementation does for a plain URL.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# fsspec's calendar versioning: tested with 2026.9; _strip_protocol(path) has kept its
# signature since this year's releases, so newer ones use it too.
MIN_FSSPEC_YEAR = 2023


def fsspec_version() -> str:
    import fsspec

    return fsspec.__version__


def tested(version: str | None = None) -> bool:
    version = version or fsspec_version()
    try:
        return int(version.split(".")[0]) >= MIN_FSSPEC_YEAR
    except ValueError:
        return False


def strip_protocol(fs: Any, path: str, *, version: str | None = None) -> str:
    """``path`` as ``fs``'s own methods name it: no ``proto://`` prefix, no trailing slash."""
    method = getattr(fs, "_strip_protocol", None)
    if callable(method) and tested(version):
        return method(path)
    log.debug("fsspec %s untested or no _strip_protocol on %r: stripping the protocol by hand",
              version or fsspec_version(), type(fs).__name__)
    protocols = getattr(fs, "protocol", ()) or ()
    for proto in (protocols,) if isinstance(protocols, str) else protocols:
        for prefix in (f"{proto}://", f"{proto}::"):
            if path.startswith(prefix):
                path = path[len(prefix):]
                break
    return path.rstrip("/") or path
