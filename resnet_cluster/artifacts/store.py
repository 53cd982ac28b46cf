"""ArtifactStore: run files on a local folder or any fsspec URI (``s3://`` through s3fs).

Every write is atomic per file: a reader sees the old file or the new one, never a prefix.
Locally that is a temp file in the same folder plus ``os.replace``; on object stores it is one
``fs.put_file`` of a finished local file (a plain ``fs.open(path, "wb")`` commits a partial
object on S3 when the writer raises, see docs/ray-notes.md "S3").

For S3 the endpoint comes from ``endpoint_url=`` (the job's ``artifacts.endpoint_url`` or
``$RESNET_CLUSTER_STORE_ENDPOINT``), else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, and the
credentials from the usual AWS variables, profiles or instance roles. Large files go up as
multipart uploads (s3fs: parts of ``MULTIPART_CHUNK`` bytes, ``MAX_CONCURRENCY`` at once, each
part retried by s3fs); an upload that fails or is interrupted is aborted, so no invisible,
billed parts are left behind.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any

from resnet_cluster.artifacts import layout
from resnet_cluster.artifacts.fs_compat import strip_protocol
from resnet_cluster.errors import StoreError

log = logging.getLogger(__name__)
_CHUNK = 1 << 20  # 1 MiB
# S3 multipart: 16 MiB parts (S3's minimum is 5 MiB, at most 10,000 parts, so one object can
# reach 156 GiB at this size; s3fs raises the part size beyond that), 10 parts in flight.
MULTIPART_CHUNK = 16 * 2**20
MAX_CONCURRENCY = 10
ENDPOINT_ENV = "RESNET_CLUSTER_STORE_ENDPOINT"


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

    def __init__(
        self, root: str | os.PathLike[str], *, endpoint_url: str | None = None, **storage_options: Any
    ) -> None:
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
            # s3fs/botocore read the AWS variables too, but only when the client is first built
            # and s3fs caches instances; passing it makes the cache key follow the environment.
            endpoint = (
                endpoint_url
                or os.environ.get(ENDPOINT_ENV)
                or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL")
            )
            if endpoint:
                if not endpoint.startswith(("http://", "https://")):
                    raise StoreError(
                        f"S3 endpoint URL {endpoint!r} for artifact store {raw} is not an http(s) "
                        f"URL. Set artifacts.endpoint_url (or ${ENDPOINT_ENV} / AWS_ENDPOINT_URL) "
                        f"to something like http://minio.local:9000."
                    )
                storage_options["endpoint_url"] = endpoint
        elif endpoint_url and protocol not in ("s3", "s3a"):
            raise StoreError(
                f"artifacts.endpoint_url ({endpoint_url}) only applies to s3:// stores, but the "
                f"store is {raw}. Remove it, or use an s3://bucket/prefix store."
            )
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
        self._endpoint = storage_options.get("endpoint_url")
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

    @classmethod
    def from_config(cls, artifacts: Any) -> "ArtifactStore":
        """The store of a job's ``artifacts`` section (``store`` and ``endpoint_url``)."""
        return cls(artifacts.store, endpoint_url=getattr(artifacts, "endpoint_url", None))

    @property
    def endpoint_url(self) -> str | None:
        """The S3 endpoint this store talks to (None: AWS's default, or not S3)."""
        return self._endpoint

    @property
    def is_s3(self) -> bool:
        protocol = self._fs.protocol
        protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
        return any(p in ("s3", "s3a") for p in protocols)

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

    _ns = layout.RUNS  # the folder under the root whose entries this store addresses

    def sweeps(self) -> "ArtifactStore":
        """The same store addressing ``<root>/sweeps/<sweep_id>/`` instead of runs: every
        method then takes a sweep id where it takes a run id."""
        view = copy.copy(self)
        view._ns = layout.SWEEPS
        return view

    def _runs_path(self) -> str:
        return posixpath.join(self._base, self._ns)

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
                f" Check that the endpoint ({self._endpoint or 'the AWS default; set AWS_ENDPOINT_URL or artifacts.endpoint_url for another'}) "
                "is reachable, the network, and the credentials."
            )
            raise StoreError(
                f"Could not {action} {uri}: {_describe(exc)}.{where} The artifact store root "
                f"is {self._root}."
            ) from None

    # ------------------------------------------------------------------ writes
    def _local_temp_name(self, target: str) -> str:
        d, name = os.path.split(target)
        return os.path.join(d, f"{layout.TEMP_PREFIX}{name}.{uuid.uuid4().hex[:12]}")

    def _local_replace_from(self, target: str, fill, *, exclusive: bool = False) -> None:
        """Create ``target`` atomically: ``fill(fileobj)`` writes a same-folder temp file.

        ``exclusive``: publish with ``os.link``, which fails if ``target`` exists (create-only).
        """
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = self._local_temp_name(target)
        try:
            with open(tmp, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    raise StoreError(
                        f"{target} already exists and is written only once; refusing to replace "
                        f"it (the run was finished by another process?)."
                    ) from None
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
            else:
                os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def put_file(
        self,
        run_id: str,
        local_path: str | os.PathLike[str],
        relpath: str,
        *,
        callback: Any = None,
        exclusive: bool = False,
    ) -> None:
        """Copy a finished local file into the run, atomically (all or nothing).

        ``callback`` is an ``fsspec.callbacks.Callback`` (progress bars). With ``exclusive``
        the write fails with a StoreError when the file already exists (create-only: ``O_EXCL``
        locally, a checked create on S3; see :meth:`_put_remote`).
        """
        target = self._path(run_id, relpath)
        if not layout.validate_relpath(relpath):
            raise StoreError(f"put_file needs a file name inside run {run_id!r}, got {relpath!r}.")
        local_path = os.fspath(local_path)
        if not os.path.isfile(local_path):
            raise StoreError(
                f"Cannot upload {local_path} to {self._uri(target)}: it is not a file on this machine."
            )
        with self._errors(self._uri(target), "write"):
            if exclusive and not self._is_local and self._fs.exists(target):
                raise StoreError(
                    f"{self._uri(target)} already exists and is written only once; refusing to "
                    f"replace it (the run was finished by another process?)."
                )
            if self._is_local:
                size = os.path.getsize(local_path)
                with open(local_path, "rb") as src:
                    self._local_replace_from(
                        target, lambda dst: _copy(src, dst, callback, size), exclusive=exclusive
                    )
            else:
                self._put_remote(local_path, target, callback)

    def _put_remote(self, local_path: str, target: str, callback: Any) -> None:
        """One PUT, or a multipart upload completed only at the end: atomic on S3.

        s3fs retries each request and aborts its multipart upload when a part fails with an
        Exception. A KeyboardInterrupt/SystemExit (Ctrl-C, Ray stopping the worker) is not an
        Exception, so the uploads this call started are aborted here too. No makedirs: on s3fs
        it would create a missing bucket.
        """
        from fsspec.callbacks import DEFAULT_CALLBACK

        kwargs: dict[str, Any] = {"callback": callback or DEFAULT_CALLBACK}
        if self.is_s3:
            kwargs.update(chunksize=MULTIPART_CHUNK, max_concurrency=MAX_CONCURRENCY)
        started = None
        if self.is_s3 and os.path.getsize(local_path) >= 2 * MULTIPART_CHUNK:
            from datetime import datetime, timedelta, timezone

            started = datetime.now(timezone.utc) - timedelta(seconds=5)  # clock skew margin
        try:
            self._fs.put_file(local_path, target, **kwargs)
        except BaseException:
            if started is not None:
                self.abort_uploads(target, since=started)
            raise
        finally:
            self._fs.invalidate_cache(posixpath.dirname(target))

    def abort_uploads(self, fs_path: str, *, since: Any = None) -> int:
        """Abort unfinished S3 multipart uploads of one key (those begun after ``since``).

        Returns how many were aborted; errors are swallowed (this runs while another error is
        already on its way up). S3 keeps unfinished parts, billed and invisible, until aborted.
        """
        if not self.is_s3:
            return 0
        bucket, key, _ = self._fs.split_path(fs_path)
        aborted = 0
        try:
            listing = self._fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
            for up in listing.get("Uploads", []):
                if up.get("Key") != key or (since is not None and up.get("Initiated") and up["Initiated"] < since):
                    continue
                self._fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=up["UploadId"])
                aborted += 1
        except BaseException:  # noqa: BLE001 - best effort, see docstring
            log.debug("listing or aborting multipart uploads of %s failed", key, exc_info=True)
        return aborted

    def write_bytes(self, run_id: str, relpath: str, data: bytes) -> None:
        self._write_bytes(run_id, relpath, data)

    def _write_bytes(self, run_id: str, relpath: str, data: bytes, *, exclusive: bool = False) -> None:
        target = self._path(run_id, relpath)
        if self._is_local and not exclusive:
            with self._errors(self._uri(target), "write"):
                self._local_replace_from(target, lambda f: f.write(data))
            return
        fd, tmp = tempfile.mkstemp(prefix="resnet-cluster-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self.put_file(run_id, tmp, relpath, exclusive=exclusive)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def write_text(self, run_id: str, relpath: str, text: str) -> None:
        # surrogateescape round-trips bytes that were decoded the same way (git patches).
        self.write_bytes(run_id, relpath, text.encode("utf-8", "surrogateescape"))

    def write_json(self, run_id: str, relpath: str, obj: Any, *, exclusive: bool = False) -> None:
        text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
        self._write_bytes(run_id, relpath, text.encode("utf-8"), exclusive=exclusive)

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

    def download(
        self, run_id: str, relpath: str, local_path: str | os.PathLike[str], *, callback: Any = None
    ) -> None:
        """Copy one run file to ``local_path`` (atomically replaced); ``callback`` as in put_file."""
        path = self._path(run_id, relpath)
        local_path = os.path.abspath(os.fspath(local_path))
        os.makedirs(os.path.dirname(local_path), exist_ok=True)
        tmp = self._local_temp_name(local_path)
        try:
            with self._errors(self._uri(path), "download", missing=self._missing_msg(run_id, relpath)):
                if self._is_local:
                    if not os.path.isfile(path):
                        raise FileNotFoundError(path)
                    with open(path, "rb") as src, open(tmp, "wb") as dst:
                        _copy(src, dst, callback, os.path.getsize(path))
                else:
                    from fsspec.callbacks import DEFAULT_CALLBACK

                    kwargs: dict[str, Any] = {"callback": callback or DEFAULT_CALLBACK}
                    if self.is_s3:
                        kwargs.update(chunksize=MULTIPART_CHUNK, max_concurrency=MAX_CONCURRENCY)
                    self._fs.get_file(path, tmp, **kwargs)
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

    def delete_run(self, run_id: str) -> int:
        """Delete every object of one run (and nothing else); returns how many files went."""
        files = self.list_files(run_id)  # raises a StoreError naming the run if it is missing
        base = self._path(run_id)
        with self._errors(self._uri(base), "delete"):
            self._fs.rm(base, recursive=True)
            if not self._is_local:
                self._fs.invalidate_cache(self._runs_path())
        if self.is_s3:  # parts of uploads cut off by a killed process (SIGKILL cannot abort)
            self.abort_uploads_under(base)
        return len(files)

    def abort_uploads_under(self, fs_path: str) -> int:
        """Abort every unfinished multipart upload whose key starts with ``fs_path/``."""
        if not self.is_s3:
            return 0
        bucket, key, _ = self._fs.split_path(fs_path)
        prefix = key.rstrip("/") + "/"
        aborted = 0
        with self._errors(self._uri(fs_path), "abort unfinished uploads under"):
            listing = self._fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
            for up in listing.get("Uploads", []):
                if up.get("Key", "").startswith(prefix):
                    self._fs.call_s3(
                        "abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"]
                    )
                    aborted += 1
        return aborted

    def check(self) -> None:
        """Fail fast, with one StoreError naming the root, if the store cannot be used.

        Locally: the root is (or can become) a writable folder. On object stores: the endpoint
        answers, the credentials are accepted and the bucket exists (one listing request, with
        few retries so that an unreachable endpoint is reported in seconds, not minutes).
        """
        if self._is_local:
            probe = self._base
            while not os.path.exists(probe):
                probe = os.path.dirname(probe)
            if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
                raise StoreError(
                    f"Artifact store {self._root} cannot be created or written: {probe} is not "
                    f"a writable folder. Set artifacts.store (or $RESNET_CLUSTER_STORE) to a "
                    f"folder you can write, or an s3://bucket/prefix URI."
                )
            return
        fs = self._fs
        if self.is_s3:
            import fsspec

            opts = dict(self._fs.storage_options)
            opts.update(skip_instance_cache=True)
            opts["config_kwargs"] = {
                **opts.get("config_kwargs", {}),
                "connect_timeout": 5,  # seconds
                "read_timeout": 20,
                "retries": {"max_attempts": 2, "mode": "standard"},
            }
            fs = fsspec.filesystem("s3", **opts)
            fs.retries = 1  # s3fs's own retry loop (class attribute; 5 by default)
        bucket = self._base.split("/", 1)[0]
        with self._errors(self._root, "use the artifact store"):
            try:
                fs.ls(self._runs_path(), detail=False)
            except FileNotFoundError:
                if not fs.exists(bucket):
                    raise StoreError(
                        f"The bucket of artifact store {self._root} does not exist (or these "
                        f"credentials cannot see it). Create it (aws s3 mb s3://{bucket}) or fix "
                        f"artifacts.store."
                    ) from None

    def read_many(self, items: list[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        """Read many small run files at once: ``{(run_id, relpath): bytes}``; missing ones are
        left out. On S3 the reads run concurrently (s3fs batches them), which is what keeps
        ``runs list`` fast with thousands of runs."""
        paths = {self._path(run_id, rel): (run_id, rel) for run_id, rel in items}
        if not paths:
            return {}
        with self._errors(self._uri(self._runs_path()), "read runs in"):
            if self._is_local:
                out = {}
                for path, key in paths.items():
                    try:
                        with open(path, "rb") as f:
                            out[key] = f.read()
                    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                        pass
                return out
            got = self._fs.cat(list(paths), on_error="return")
        out = {}
        for path, data in got.items():
            key = paths.get(strip_protocol(self._fs, path)) or paths.get(path)
            if key is None or isinstance(data, BaseException):
                if isinstance(data, (PermissionError,)) or type(data).__name__ == "NoCredentialsError":
                    with self._errors(self._uri(path), "read"):
                        raise data
                continue
            out[key] = data
        return out

    def list_tops(self) -> dict[str, list[str]]:
        """``{run_id: names directly inside the run}`` for every run, from as few listing
        requests as the filesystem allows (one paginated recursive listing on S3)."""
        if self._is_local:
            return {rid: self.list_top(rid) for rid in self.list_run_ids()}
        runs = self._runs_path()
        prefix = runs.rstrip("/") + "/"
        with self._errors(self._uri(runs), "list runs in"):
            self._fs.invalidate_cache(runs)
            try:
                found = self._fs.find(runs, detail=False)
            except FileNotFoundError:
                found = []
            if not found:
                self.list_run_ids()  # raises the clear "bucket does not exist" error if so
        tops: dict[str, set[str]] = {}
        for path in found:
            path = strip_protocol(self._fs, path)
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            if len(parts) < 2 or parts[1].startswith(layout.TEMP_PREFIX):
                continue
            try:
                layout.validate_run_id(parts[0])
            except StoreError:
                continue
            tops.setdefault(parts[0], set()).add(parts[1])
        return {rid: sorted(names) for rid, names in sorted(tops.items())}

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
            path = path if self._is_local else strip_protocol(self._fs, path)
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


def _copy(src: IO[bytes], dst: IO[bytes], callback: Any, size: int) -> None:
    """copyfileobj with an optional fsspec callback (progress)."""
    if callback is not None:
        callback.set_size(size)
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            break
        dst.write(chunk)
        if callback is not None:
            callback.relative_update(len(chunk))


class _UploadOnClose(io.RawIOBase):
    """A write-only file that spools to a local temp file and uploads it whole on close().

    What pyarrow (Ray Train's checkpoint upload) writes through it reaches the object store as
    one atomic put (a multipart upload, aborted if it fails) instead of a stream whose partial
    object would be committed if the writer died half-way.
    """

    def __init__(self, store: "ArtifactStore", path: str) -> None:
        super().__init__()
        self._store, self._path = store, path
        fd, self._tmp = tempfile.mkstemp(prefix="rc-upload-")
        self._file = os.fdopen(fd, "wb")

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        return self._file.write(b)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        if not self._file.closed:  # RawIOBase.close() flushes after our close() ran
            self._file.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._file.close()
            with self._store._errors(self._store._uri(self._path), "write"):
                self._store._put_remote(self._tmp, self._path, None)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            super().close()


def pyarrow_filesystem(store: "ArtifactStore"):
    """A ``pyarrow.fs.PyFileSystem`` over the store's fsspec filesystem, for Ray Train's
    ``RunConfig(storage_filesystem=...)``: same endpoint and credentials as the store, and every
    file written through it is uploaded whole (see :class:`_UploadOnClose`)."""
    import pyarrow.fs

    class _Handler(pyarrow.fs.FSSpecHandler):
        def __init__(self, fs, root: str, endpoint: str | None) -> None:
            super().__init__(fs)
            self._root, self._endpoint = root, endpoint

        def __reduce__(self):  # pickled to Ray's controller and workers
            return (_make_handler, (self._root, self._endpoint))

        def open_output_stream(self, path, metadata):
            from pyarrow import PythonFile

            return PythonFile(_UploadOnClose(ArtifactStore(self._root, endpoint_url=self._endpoint), path), mode="w")

    return pyarrow.fs.PyFileSystem(_Handler(store.fs, store.root, store.endpoint_url))


def _make_handler(root: str, endpoint: str | None):
    return pyarrow_filesystem(ArtifactStore(root, endpoint_url=endpoint)).handler
