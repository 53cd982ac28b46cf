"""ArtifactStore: run files on a local folder or any fsspec URI (``s3://`` through s3fs).

Every write is atomic per file: a reader sees the old file or the new one, never a prefix.
Locally that is a temp file in the same folder plus ``os.replace``; on object stores it is one
``fs.put_file`` of a finished local file (a plain ``fs.open(path, "wb")`` commits a partial
object on S3 when the writer raises, see RAY-NOTES.md "S3").

For S3 the endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and the
credentials from the usual AWS variables, profiles or instance roles.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any

from resnet_cluster.errors import StoreError
from resnet_cluster.artifacts import layout

_CHUNK = 1 << 20  # 1 MiB


def _remote_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "store unreachable / credentials wrong", not a bug."""
    types: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        import botocore.exceptions as bex

        types += [bex.BotoCoreError, bex.ClientError]
    except ImportError:
        pass
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(types)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


class ArtifactStore:
    """Runs under ``<root>/runs/<run_id>/``; all paths given to methods are relative to a run."""

    def __init__(self, root: str | os.PathLike[str], **storage_options: Any) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        raw = os.fspath(root)
        if not raw:
            raise StoreError(
                "Empty artifact store root. Set artifacts.store in the job file to a folder "
                "(for example ./runs-store) or an fsspec URI such as s3://bucket/prefix."
            )
        if "://" not in raw:
            raw = os.path.abspath(os.path.expanduser(raw))
        protocol = raw.split("://", 1)[0] if "://" in raw else "file"
        if protocol in ("s3", "s3a") and "endpoint_url" not in storage_options:
            # s3fs/botocore read these too, but only when the client is first built and
            # s3fs caches instances; passing it makes the cache key follow the environment.
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                storage_options["endpoint_url"] = endpoint
        try:
            fs, path = fsspec.core.url_to_fs(raw, **storage_options)
        except ImportError as exc:
            raise StoreError(
                f"Artifact store {raw} needs a filesystem package that is not installed "
                f"({exc}). For s3:// install s3fs (pip install s3fs), or use a local folder."
            ) from None
        except (ValueError, TypeError) as exc:
            raise StoreError(
                f"Artifact store URI {raw!r} is not understood by fsspec ({exc}). Use a local "
                f"folder or a URI such as s3://bucket/prefix."
            ) from None
        self._fs = fs
        self._is_local = isinstance(fs, LocalFileSystem)
        self._base = path.rstrip("/") or path  # filesystem path of the root, no protocol
        if self._is_local:
            self._root = self._base
        else:
            self._root = fs.unstrip_protocol(self._base).rstrip("/")
        if not self._is_local and not self._base.strip("/"):
            raise StoreError(
                f"Artifact store URI {raw!r} names no bucket. Use s3://bucket or s3://bucket/prefix."
            )

    # ------------------------------------------------------------------ properties / paths
    @property
    def root(self) -> str:
        """Normalised root: an absolute local path, or ``protocol://bucket/prefix``."""
        return self._root

    @property
    def is_local(self) -> bool:
        return self._is_local

    @property
    def fs(self):  # fsspec.AbstractFileSystem
        return self._fs

    def __repr__(self) -> str:
        return f"ArtifactStore({self._root!r})"

    def _runs_path(self) -> str:
        return posixpath.join(self._base, layout.RUNS)

    def _path(self, run_id: str, relpath: str = "") -> str:
        """Filesystem path (no protocol) of ``relpath`` inside run ``run_id``."""
        layout.validate_run_id(run_id)
        rel = layout.validate_relpath(relpath)
        run = posixpath.join(self._runs_path(), run_id)
        return posixpath.join(run, rel) if rel else run

    def _uri(self, fs_path: str) -> str:
        return fs_path if self._is_local else self._fs.unstrip_protocol(fs_path)

    def run_uri(self, run_id: str) -> str:
        """Absolute path (local) or URI (remote) of the run folder."""
        return self._uri(self._path(run_id))

    def uri(self, run_id: str, relpath: str = "") -> str:
        """Absolute path or URI of one file of a run."""
        return self._uri(self._path(run_id, relpath))

    # ------------------------------------------------------------------ error translation
    @contextlib.contextmanager
    def _errors(self, uri: str, action: str, *, missing: str | None = None) -> Iterator[None]:
        """Turn filesystem/network/credential failures into one-paragraph StoreErrors."""
        try:
            yield
        except StoreError:
            raise
        except FileNotFoundError as exc:
            if missing is not None:
                raise StoreError(missing) from None
            raise StoreError(
                f"Could not {action} {uri}: it (or its bucket/folder) does not exist "
                f"({_describe(exc)}). Check the artifacts.store setting ({self._root}) and, for "
                f"S3, that the bucket exists."
            ) from None
        except PermissionError as exc:
            raise StoreError(
                f"Permission denied to {action} {uri} ({_describe(exc)}). Check the credentials "
                f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role) "
                f"and that they may read and write under {self._root}."
            ) from None
        except _remote_error_types() as exc:
            if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
                raise StoreError(
                    f"No usable credentials to {action} {uri} ({_describe(exc)}). Set "
                    f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run where "
                    f"an instance role is available."
                ) from None
            where = "" if self._is_local else (
                " Check that the endpoint is reachable (AWS_ENDPOINT_URL is "
                f"{os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL') or 'unset'}), "
                "the network, and the credentials."
            )
            raise StoreError(
                f"Could not {action} {uri}: {_describe(exc)}.{where} The artifact store root "
                f"is {self._root}."
            ) from None

    # ------------------------------------------------------------------ writes
    def _local_temp_name(self, target: str) -> str:
        d, name = os.path.split(target)
        return os.path.join(d, f"{layout.TEMP_PREFIX}{name}.{uuid.uuid4().hex[:12]}")

    def _local_replace_from(self, target: str, fill) -> None:
        """Create ``target`` atomically: ``fill(fileobj)`` writes a same-folder temp file."""
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = self._local_temp_name(target)
        try:
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def put_file(self, run_id: str, local_path: str | os.PathLike[str], relpath: str) -> None:
        """Copy a finished local file into the run, atomically (all or nothing)."""
        target = self._path(run_id, relpath)
        if not layout.validate_relpath(relpath):
            raise StoreError(f"put_file needs a file name inside run {run_id!r}, got {relpath!r}.")
        local_path = os.fspath(local_path)
        if not os.path.isfile(local_path):
            raise StoreError(
                f"Cannot upload {local_path} to {self._uri(target)}: it is not a file on this machine."
            )
        with self._errors(self._uri(target), "write"):
            if self._is_local:
                with open(local_path, "rb") as src:
                    self._local_replace_from(target, lambda dst: shutil.copyfileobj(src, dst, _CHUNK))
            else:
                # One PUT (or a multipart upload completed only at the end): atomic on S3.
                # No makedirs here: on s3fs it would create a missing bucket.
                self._fs.put_file(local_path, target)
                self._fs.invalidate_cache(posixpath.dirname(target))

    def write_bytes(self, run_id: str, relpath: str, data: bytes) -> None:
        target = self._path(run_id, relpath)
        if self._is_local:
            with self._errors(self._uri(target), "write"):
                self._local_replace_from(target, lambda f: f.write(data))
            return
        fd, tmp = tempfile.mkstemp(prefix="resnet-cluster-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self.put_file(run_id, tmp, relpath)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def write_text(self, run_id: str, relpath: str, text: str) -> None:
        # surrogateescape round-trips bytes that were decoded the same way (git patches).
        self.write_bytes(run_id, relpath, text.encode("utf-8", "surrogateescape"))

    def write_json(self, run_id: str, relpath: str, obj: Any) -> None:
        text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
        self.write_text(run_id, relpath, text)

    def append_lines(self, run_id: str, relpath: str, lines: list[str]) -> None:
        """Append lines (a newline is added to each that lacks one).

        Local: append + fsync. Remote: read, then rewrite the whole object atomically; two
        writers appending to the same remote file at once can lose lines, so keep one writer
        per file (the rank-0 driver).
        """
        if isinstance(lines, str):
            raise TypeError("append_lines takes a list of lines, not a string")
        data = "".join(l if l.endswith("\n") else l + "\n" for l in lines).encode(
            "utf-8", "surrogateescape"
        )
        target = self._path(run_id, relpath)
        if not data:
            return
        if self._is_local:
            with self._errors(target, "append to"):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            return
        old = self.read_bytes(run_id, relpath) if self.exists(run_id, relpath) else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        self.write_bytes(run_id, relpath, old + data)

    # ------------------------------------------------------------------ reads
    def _missing_msg(self, run_id: str, relpath: str) -> str:
        uri = self._uri(self._path(run_id, relpath))
        return (
            f"No file {uri} in the artifact store. Check the run id {run_id!r} and the store "
            f"root {self._root} (list runs with `resnet-cluster runs list --store {self._root}`); "
            f"a run that is still going or failed early may not have written it yet."
        )

    def read_bytes(self, run_id: str, relpath: str) -> bytes:
        path = self._path(run_id, relpath)
        with self._errors(self._uri(path), "read", missing=self._missing_msg(run_id, relpath)):
            if self._is_local and os.path.isdir(path):
                raise IsADirectoryError(path)
            return self._fs.cat_file(path)

    def read_text(self, run_id: str, relpath: str) -> str:
        return self.read_bytes(run_id, relpath).decode("utf-8", "surrogateescape")

    def read_json(self, run_id: str, relpath: str) -> Any:
        text = self.read_text(run_id, relpath)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(
                f"{self.uri(run_id, relpath)} is not valid JSON ({exc}); the file is damaged or "
                f"was cut short. Remove or rewrite it."
            ) from None

    @contextlib.contextmanager
    def open_read(self, run_id: str, relpath: str) -> Iterator[IO[bytes]]:
        """Binary read stream of one run file (for hashing large files without loading them)."""
        path = self._path(run_id, relpath)
        with self._errors(self._uri(path), "read", missing=self._missing_msg(run_id, relpath)):
            with self._fs.open(path, "rb") as f:
                yield f

    def exists(self, run_id: str, relpath: str = "") -> bool:
        path = self._path(run_id, relpath)
        with self._errors(self._uri(path), "check"):
            if not self._is_local:
                self._fs.invalidate_cache(posixpath.dirname(path))
            return bool(self._fs.exists(path))

    def download(self, run_id: str, relpath: str, local_path: str | os.PathLike[str]) -> None:
        """Copy one run file to ``local_path`` (atomically replaced)."""
        path = self._path(run_id, relpath)
        local_path = os.path.abspath(os.fspath(local_path))
        os.makedirs(os.path.dirname(local_path), exist_ok=True)
        tmp = self._local_temp_name(local_path)
        try:
            with self._errors(self._uri(path), "download", missing=self._missing_msg(run_id, relpath)):
                if self._is_local and not os.path.isfile(path):
                    raise FileNotFoundError(path)
                self._fs.get_file(path, tmp)
            os.replace(tmp, local_path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def remove(self, run_id: str, relpath: str) -> None:
        """Delete one file or folder (recursively) of a run; missing is not an error."""
        if not layout.validate_relpath(relpath):
            raise StoreError(
                f"remove() needs a path inside run {run_id!r}; refusing to delete the whole run."
            )
        path = self._path(run_id, relpath)
        with self._errors(self._uri(path), "remove"):
            try:
                self._fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass
            if not self._is_local:
                self._fs.invalidate_cache(posixpath.dirname(path))

    # ------------------------------------------------------------------ listings
    def list_files(self, run_id: str) -> list[tuple[str, int]]:
        """Every file of a run, recursively, as sorted ``(relpath, size)``; temp files skipped."""
        base = self._path(run_id)
        with self._errors(self._uri(base), "list"):
            if not self._is_local:
                self._fs.invalidate_cache(base)
            found = self._fs.find(base, detail=True)
            if not found and not self._fs.exists(base):
                raise StoreError(
                    f"No run {run_id!r} at {self._uri(base)}. See the runs in this store with "
                    f"`resnet-cluster runs list --store {self._root}`."
                )
        out: list[tuple[str, int]] = []
        prefix = base.rstrip("/") + "/"
        for path, info in found.items():
            if info.get("type", "file") != "file":
                continue
            path = path if self._is_local else self._fs._strip_protocol(path)
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            if posixpath.basename(rel).startswith(layout.TEMP_PREFIX):
                continue
            out.append((rel, int(info.get("size") or 0)))
        out.sort()
        return out

    def list_top(self, run_id: str) -> list[str]:
        """Names directly inside a run folder (files and folders); [] if the run is missing."""
        base = self._path(run_id)
        with self._errors(self._uri(base), "list"):
            if not self._is_local:
                self._fs.invalidate_cache(base)
            try:
                entries = self._fs.ls(base, detail=False)
            except FileNotFoundError:
                return []
        names = [posixpath.basename(str(p).rstrip("/")) for p in entries]
        return sorted(n for n in names if n and not n.startswith(layout.TEMP_PREFIX))

    def list_run_ids(self) -> list[str]:
        """Sorted ids of the runs in this store ([] for a store with no runs yet)."""
        runs = self._runs_path()
        with self._errors(self._uri(runs), "list runs in"):
            if not self._is_local:
                self._fs.invalidate_cache(runs)
            try:
                entries = self._fs.ls(runs, detail=True)
            except FileNotFoundError:
                entries = []
            if not entries and not self._is_local and self._fs.protocol and "s3" in self._fs.protocol:
                bucket = self._base.split("/", 1)[0]
                if not self._fs.exists(bucket):
                    raise StoreError(
                        f"The bucket of artifact store {self._root} does not exist (or these "
                        f"credentials cannot see it). Create it (aws s3 mb s3://{bucket}) or fix "
                        f"artifacts.store."
                    )
        ids = []
        for e in entries:
            if e.get("type") != "directory":
                continue
            name = posixpath.basename(str(e["name"]).rstrip("/"))
            try:
                layout.validate_run_id(name)
            except StoreError:
                continue
            ids.append(name)
        return sorted(set(ids))
