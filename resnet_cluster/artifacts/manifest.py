"""manifest.json: the list of a run's files with sizes and sha256, written last.

A run without a manifest is incomplete; one whose files no longer match it was changed after
it finished.
"""

from __future__ import annotations

import fnmatch
import hashlib
from typing import Any

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.run import utc_now
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.errors import StoreError

_CHUNK = 1 << 20  # 1 MiB: hash large checkpoints as a stream, not in memory
# Files a finished run may gain later without being part of its manifest (`resnet-cluster eval`).
ADDED_LATER = "eval-*.json"


def file_digest(store: ArtifactStore, run_id: str, relpath: str) -> tuple[int, str]:
    """``(size, sha256 hex)`` of one run file, streamed."""
    h = hashlib.sha256()
    size = 0
    with store.open_read(run_id, relpath) as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def write_manifest(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    """Hash every file of the run except manifest.json, then write manifest.json; return it.

    Call it last, after summary.json: its presence is what marks a run complete.
    """
    files = []
    for relpath, _ in store.list_files(run_id):
        if relpath == layout.MANIFEST:
            continue
        size, digest = file_digest(store, run_id, relpath)
        files.append({"path": relpath, "size": size, "sha256": digest})
    manifest = {"run_id": run_id, "created": utc_now(), "files": files}
    # Create-only: a finished run's manifest is never replaced (a second finisher fails).
    store.write_json(run_id, layout.MANIFEST, manifest, exclusive=True)
    return manifest


def read_manifest(store: ArtifactStore, run_id: str) -> dict[str, dict[str, Any]]:
    """``{relpath: {"path", "size", "sha256"}}`` from manifest.json, or a StoreError saying the
    run is not finished / the manifest is damaged."""
    if not store.exists(run_id, layout.MANIFEST):
        raise StoreError(
            f"Run {run_id} has no {layout.MANIFEST} at {store.uri(run_id, layout.MANIFEST)}: it is "
            f"still running, or it stopped before it finished, so its files cannot be verified. "
            f"Wait for it to finish, or resume it with `resnet-cluster submit <job> --name {run_id}`."
        )
    manifest = store.read_json(run_id, layout.MANIFEST)
    try:
        return {e["path"]: e for e in manifest["files"]}
    except (KeyError, TypeError):
        raise StoreError(
            f"{store.uri(run_id, layout.MANIFEST)} is malformed (no 'files' list of path/size/sha256)."
        ) from None


def verify_manifest(store: ArtifactStore, run_id: str, *, hashes: bool = True) -> list[str]:
    """Problems found comparing the run's files to its manifest; ``[]`` means intact.

    Reports a missing manifest, missing files, size or sha256 mismatches, and files that the
    manifest does not list. ``hashes=False`` compares names and sizes only (one listing, no
    reads: what ``runs show`` uses, since hashing would download every checkpoint from S3).
    """
    uri = store.uri(run_id, layout.MANIFEST)
    if not store.exists(run_id, layout.MANIFEST):
        return [f"no {layout.MANIFEST} at {uri}: the run is incomplete (still running, or it stopped before finishing)"]
    try:
        manifest = store.read_json(run_id, layout.MANIFEST)
        entries = manifest["files"]
        listed = {e["path"]: e for e in entries}
    except (StoreError, KeyError, TypeError) as exc:
        return [f"{uri} is unreadable or malformed: {exc}"]

    present = {rel: size for rel, size in store.list_files(run_id) if rel != layout.MANIFEST}
    problems: list[str] = []
    for path, entry in sorted(listed.items()):
        if path not in present:
            problems.append(f"missing file: {path}")
            continue
        if present[path] != entry.get("size"):
            problems.append(f"size mismatch: {path} is {present[path]} bytes, manifest says {entry.get('size')}")
            continue
        if not hashes:
            continue
        _, digest = file_digest(store, run_id, path)
        if digest != entry.get("sha256"):
            problems.append(f"sha256 mismatch: {path} changed since the manifest was written")
    for path in sorted(set(present) - set(listed)):
        if fnmatch.fnmatch(path, ADDED_LATER):  # `resnet-cluster eval` results, added after the run
            continue
        problems.append(f"file not in manifest: {path}")
    return problems
