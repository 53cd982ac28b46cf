"""What code and machine produced a run: git commit + patch, and an environment snapshot.

The patch is enough to rebuild the exact tree: ``git checkout <commit> && git apply
source.git-patch`` (tracked changes plus every untracked, non-ignored file as a new file).
Nothing matched by .gitignore is included, and secrets are redacted from the environment.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL|AUTH|SESSION", re.IGNORECASE)
ENV_PREFIXES = ("RAY_", "CUDA", "NCCL_", "OMP_", "AWS_", "RESNET_CLUSTER_", "PYTHON", "TORCH")
PACKAGES = ("torch", "torchvision", "ray", "numpy", "pyarrow", "fsspec", "s3fs", "pydantic", "PyYAML")

# Untracked files above this size are named in a comment instead of inlined (a stray dataset
# or checkpoint that is not git-ignored would otherwise be copied into every run).
MAX_UNTRACKED_BYTES = 20 * 1024 * 1024


# ---------------------------------------------------------------------------- redaction
def strip_url_userinfo(value: str) -> str:
    """``scheme://user:pass@host/x`` -> ``scheme://<redacted>@host/x``; other text unchanged."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if parts.scheme and "@" in parts.netloc:
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{REDACTED}@{host}"))
    return value


def redact(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of ``mapping`` with secret-looking keys' values replaced by ``"<redacted>"``.

    A key is secret when its name contains KEY, SECRET, TOKEN, PASSWORD, CREDENTIAL, AUTH or
    SESSION (any case). Nested mappings are redacted too; credentials embedded in URL values
    (``user:pass@host``) are stripped.
    """
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if SECRET_NAME.search(str(key)):
            out[key] = REDACTED
        elif isinstance(value, Mapping):
            out[key] = redact(value)
        elif isinstance(value, str):
            out[key] = strip_url_userinfo(value)
        else:
            out[key] = value
    return out


def filtered_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The run-relevant environment variables (RAY_, CUDA*, NCCL_, OMP_, AWS_, ...), redacted."""
    env = os.environ if environ is None else environ
    picked = {k: v for k, v in env.items() if k.startswith(ENV_PREFIXES)}
    return dict(sorted(redact(picked).items()))


# ---------------------------------------------------------------------------- environment
def _package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _cuda_info() -> dict[str, Any]:
    info: dict[str, Any] = {"torch_cuda": None, "cudnn": None, "available": False, "gpus": []}
    try:
        import torch
    except ImportError:
        info["torch_cuda"] = "torch not installed"
        return info
    try:
        info["torch_cuda"] = torch.version.cuda
        info["available"] = bool(torch.cuda.is_available())
        if info["available"]:
            info["cudnn"] = torch.backends.cudnn.version()
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as exc:  # a broken driver must not stop a run from recording itself
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def environment_snapshot() -> dict[str, Any]:
    """Python, platform, host, CPU count, package versions, CUDA/GPUs and filtered env vars."""
    return {
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "packages": {name: _package_version(name) for name in PACKAGES},
        "cuda": _cuda_info(),
        "env": filtered_environ(),
    }


# ---------------------------------------------------------------------------- git
class _NoGit(Exception):
    pass


def _git(cwd: str, *args: str, ok: tuple[int, ...] = (0,)) -> bytes:
    env = dict(os.environ)
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(var, None)
    env["GIT_OPTIONAL_LOCKS"] = "0"  # never take index.lock: other processes may be committing
    env["LC_ALL"] = "C"
    try:
        proc = subprocess.run(
            ["git", "-c", "core.quotepath=off", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            check=False,
        )
    except FileNotFoundError:
        raise _NoGit("git is not installed") from None
    if proc.returncode not in ok:
        raise subprocess.CalledProcessError(proc.returncode, ["git", *args], proc.stdout, proc.stderr)
    return proc.stdout


_DIFF_FLAGS = ("--binary", "--no-color", "--no-ext-diff", "--no-textconv", "--src-prefix=a/", "--dst-prefix=b/")


def _new_file_diffs(top: str, files: list[str]) -> tuple[bytes, list[str]]:
    chunks: list[bytes] = []
    notes: list[str] = []
    for rel in files:
        full = os.path.join(top, rel)
        if not os.path.lexists(full) or os.path.isdir(full) and not os.path.islink(full):
            continue
        try:
            size = os.lstat(full).st_size
        except OSError:
            continue
        if size > MAX_UNTRACKED_BYTES and not os.path.islink(full):
            notes.append(f"# untracked file not included ({size} bytes > {MAX_UNTRACKED_BYTES}): {rel}")
            continue
        # Exit status 1 means "files differ", which is always the case against /dev/null.
        try:
            chunks.append(_git(top, "diff", "--no-index", *_DIFF_FLAGS, "--", "/dev/null", rel, ok=(0, 1)))
        except subprocess.CalledProcessError as exc:
            err = exc.stderr.decode("utf-8", "replace").strip().splitlines()
            notes.append(f"# untracked file could not be diffed: {rel} ({err[-1] if err else exc.returncode})")
    return b"".join(chunks), notes


def _split_z(out: bytes) -> list[str]:
    names = [n.decode("utf-8", "surrogateescape") for n in out.split(b"\0") if n]
    return [n for n in names if not n.endswith("/")]  # "sub/" = nested repository


def _remote_lines(top: str) -> list[str]:
    lines = []
    try:
        branch = _git(top, "rev-parse", "--abbrev-ref", "HEAD").decode().strip()
        lines.append(f"# branch: {branch}")
    except subprocess.CalledProcessError:
        pass
    try:
        remotes = _git(top, "remote").decode().split()
        for name in remotes:
            url = _git(top, "remote", "get-url", name).decode().strip()
            lines.append(f"# remote {name}: {strip_url_userinfo(url)}")
    except subprocess.CalledProcessError:
        pass
    return lines


def git_provenance(path: str | os.PathLike[str] = ".") -> tuple[str, str]:
    """Return ``(commit_text, patch_text)`` for the git checkout containing ``path``.

    ``commit_text`` is the HEAD hash and a newline, then ``# `` comment lines (branch, remotes
    without credentials, whether the tree is dirty). ``patch_text`` is ``git diff HEAD
    --binary`` plus each untracked, non-ignored file as a new-file diff; empty for a clean
    tree. Without commits the patch holds every non-ignored file. Outside a checkout, or
    without git, both texts say so in one ``# `` line. Decoded with ``surrogateescape``; write
    it with ``ArtifactStore.write_text`` to keep the bytes exact.
    """
    where = os.path.abspath(os.fspath(path))
    if shutil.which("git") is None:
        msg = f"# git is not installed; no source provenance for {where}\n"
        return msg, msg
    if not os.path.isdir(where):
        msg = f"# not a git checkout (no such folder): {where}\n"
        return msg, msg
    try:
        top = _git(where, "rev-parse", "--show-toplevel").decode("utf-8", "surrogateescape").strip()
    except (subprocess.CalledProcessError, _NoGit):
        msg = f"# not a git checkout: {where}\n"
        return msg, msg

    try:
        head = _git(top, "rev-parse", "--verify", "-q", "HEAD^{commit}").decode().strip()
    except subprocess.CalledProcessError:
        head = ""

    if not head:
        files = _split_z(_git(top, "ls-files", "--cached", "--others", "--exclude-standard", "-z"))
        patch, notes = _new_file_diffs(top, sorted(set(files)))
        commit_text = f"# no commits yet in {top}; source.git-patch holds every non-ignored file\n"
        return commit_text, _join(notes, patch)

    tracked = _git(top, "diff", "HEAD", *_DIFF_FLAGS)
    untracked = _split_z(_git(top, "ls-files", "--others", "--exclude-standard", "-z"))
    new, notes = _new_file_diffs(top, untracked)
    patch = tracked + new
    lines = [head, *_remote_lines(top), f"# dirty: {'yes, see source.git-patch' if patch else 'no'}"]
    if notes:
        lines.append("# some untracked files are not in source.git-patch; see its first lines")
    return "\n".join(lines) + "\n", _join(notes, patch)


def _join(notes: list[str], patch: bytes) -> str:
    # Leading "# " lines are commentary to `git apply`, which skips text before the first diff.
    head = "".join(n + "\n" for n in notes)
    return head + patch.decode("utf-8", "surrogateescape")
