"""Copy a run out of the store (checked against its manifest), and rebuild its source tree."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.manifest import read_manifest
from resnet_cluster.artifacts.registry import require_run
from resnet_cluster.artifacts.store import ArtifactStore
from resnet_cluster.errors import StoreError
from resnet_cluster.fileutil import hash_file

# `runs download --only` groups: name -> predicate on the path inside the run.
GROUPS: dict[str, Callable[[str], bool]] = {
    "model": lambda p: p == layout.MODEL,
    "csv": lambda p: p in (layout.TRAIN_CSV, layout.TEST_CSV),
    "patch": lambda p: p in (layout.GIT_PATCH, layout.GIT_COMMIT),
    "source": lambda p: p in (layout.GIT_PATCH, layout.GIT_COMMIT),
    "config": lambda p: p == layout.CONFIG,
    "environment": lambda p: p == layout.ENVIRONMENT,
    "events": lambda p: p == layout.EVENTS,
    "summary": lambda p: p == layout.SUMMARY,
    "checkpoints": lambda p: p.startswith(layout.CHECKPOINTS + "/"),
}


def select(paths: list[str], only: list[str] | None) -> list[str]:
    """The paths that fall in the ``only`` groups (all of them when ``only`` is empty)."""
    if not only:
        return list(paths)
    bad = [g for g in only if g not in GROUPS]
    if bad:
        raise StoreError(
            f"Unknown --only group {', '.join(bad)}; choose from {', '.join(GROUPS)} "
            f"(comma-separated, e.g. --only model,csv)."
        )
    return [p for p in paths if any(GROUPS[g](p) for g in only)]


def _inside(dest: str, relpath: str) -> str:
    """Absolute local path of ``relpath`` under ``dest``; StoreError if it would escape."""
    layout.validate_relpath(relpath)
    target = os.path.realpath(os.path.join(dest, *relpath.split("/")))
    root = os.path.realpath(dest)
    if os.path.commonpath([root, target]) != root or target == root:
        raise StoreError(f"Refusing to write {relpath!r}: it would land outside {dest}.")
    return target




def download_run(
    store: ArtifactStore,
    run_id: str,
    dest: str | os.PathLike[str],
    *,
    only: list[str] | None = None,
    callback_for: Callable[[str, int], Any] | None = None,
) -> list[dict[str, Any]]:
    """Copy the files of a finished run into ``dest``, each checked against manifest.json.

    Every file is downloaded to a temporary name, its sha256 compared with the manifest, and
    only then moved into place; a mismatch raises a StoreError naming the file (nothing of it
    is left in ``dest``). manifest.json itself is always copied, so the local copy can be
    checked again later. ``callback_for(relpath, size)`` may return an fsspec Callback (a
    progress bar). Returns ``[{"path", "size", "sha256", "local"}]``.
    """
    require_run(store, run_id)
    manifest = read_manifest(store, run_id)
    dest = os.path.abspath(os.fspath(dest))
    wanted = select(sorted(manifest), only)
    if only and not wanted:
        raise StoreError(f"Run {run_id} has no files in the groups {', '.join(only)}.")
    targets = {rel: _inside(dest, rel) for rel in [*wanted, layout.MANIFEST]}  # refuse first
    os.makedirs(dest, exist_ok=True)
    done = []
    for rel in wanted:
        entry = manifest[rel]
        target = targets[rel]
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=layout.TEMP_PREFIX, dir=os.path.dirname(target))
        os.close(fd)
        try:
            cb = callback_for(rel, int(entry.get("size") or 0)) if callback_for else None
            store.download(run_id, rel, tmp, callback=cb)
            digest = hash_file(tmp)
            size = os.path.getsize(tmp)
            if digest != entry.get("sha256") or size != entry.get("size"):
                raise StoreError(
                    f"Checksum error: {rel} of run {run_id} ({store.uri(run_id, rel)}) does not match "
                    f"its manifest (sha256 {digest[:16]}…, {size} bytes; manifest says "
                    f"{str(entry.get('sha256'))[:16]}…, {entry.get('size')} bytes). The stored object "
                    f"was changed or damaged after the run finished; it was not saved to {dest}."
                )
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        done.append({"path": rel, "size": size, "sha256": digest, "local": target})
    store.download(run_id, layout.MANIFEST, targets[layout.MANIFEST])
    return done


# ---------------------------------------------------------------------------- source
def _git(cwd: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(var, None)
    env["LC_ALL"] = "C"
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise StoreError("restore-source needs git, which is not installed.") from None
    if check and proc.returncode != 0:
        raise StoreError(f"git {' '.join(args)} failed in {cwd}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def restore_source(
    store: ArtifactStore, run_id: str, dest: str | os.PathLike[str], *, repo: str | os.PathLike[str] = "."
) -> dict[str, Any]:
    """Rebuild the exact source tree of a run in ``dest`` (a new folder).

    Clones the git checkout at ``repo`` (or, if it lacks the commit, the remote recorded in
    source.git-commit) into ``dest``, checks out the recorded commit (detached HEAD) and
    applies source.git-patch: modified tracked files come back as uncommitted changes and
    untracked files as untracked files, byte for byte. Returns ``{"dest", "commit", "source",
    "patched"}``.
    """
    require_run(store, run_id)
    dest = os.path.abspath(os.fspath(dest))
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise StoreError(f"{dest} already exists and is not empty; restore-source needs a new folder.")
    commit_text = store.read_text(run_id, layout.GIT_COMMIT)
    patch = store.read_bytes(run_id, layout.GIT_PATCH)
    first = commit_text.splitlines()[0].strip() if commit_text.strip() else ""
    no_commits = first.startswith("# no commits yet")
    if first.startswith("#") and not no_commits:
        raise StoreError(
            f"Run {run_id} recorded no git commit ({first.lstrip('# ')}), so its source cannot be "
            f"restored; {layout.GIT_PATCH} holds whatever was recorded."
        )
    remotes = [
        line.split(":", 1)[1].strip()
        for line in commit_text.splitlines()
        if line.startswith("# remote ") and ":" in line
    ]
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    source = None
    if no_commits:
        _git(os.path.dirname(dest), "init", "-q", dest)
        source = "(new repository: the run's checkout had no commits)"
    else:
        candidates = []
        repo_abs = os.path.abspath(os.fspath(repo))
        top = _git(repo_abs, "rev-parse", "--show-toplevel", check=False) if os.path.isdir(repo_abs) else None
        if top is not None and top.returncode == 0:
            candidates.append(top.stdout.strip())
        candidates += [r for r in remotes if "<redacted>" not in r]
        for cand in candidates:
            if os.path.isdir(cand) and _git(cand, "cat-file", "-e", f"{first}^{{commit}}", check=False).returncode:
                continue  # a local checkout without the commit: try the next source
            proc = _git(os.path.dirname(dest), "clone", "-q", "--no-checkout", cand, dest, check=False)
            if proc.returncode == 0 and _git(dest, "cat-file", "-e", f"{first}^{{commit}}", check=False).returncode == 0:
                source = cand
                break
            import shutil

            shutil.rmtree(dest, ignore_errors=True)
        if source is None:
            raise StoreError(
                f"Commit {first} of run {run_id} was found neither in {repo_abs} nor in the recorded "
                f"remotes ({', '.join(remotes) or 'none'}). Pass --repo with a checkout that has it "
                f"(git fetch first)."
            )
        _git(dest, "checkout", "-q", "--detach", first)
    patched = bool(patch.strip(b"\n") and b"diff --git" in patch)
    if patched:
        with tempfile.NamedTemporaryFile(prefix="rc-patch-", suffix=".patch", delete=False) as f:
            f.write(patch)
        try:
            proc = _git(dest, "apply", "--binary", "--whitespace=nowarn", f.name, check=False)
        finally:
            os.unlink(f.name)
        if proc.returncode != 0:
            raise StoreError(
                f"{layout.GIT_PATCH} of run {run_id} does not apply to commit {first} in {dest}: "
                f"{proc.stderr.strip()}"
            )
    return {"dest": dest, "commit": None if no_commits else first, "source": source, "patched": patched}
