"""A worker's device setup: the CUDA check before ``set_device``, the determinism switches,
and cudnn's autotuner (``cudnn.benchmark``) where it pays.

``worker.py`` calls :func:`setup_device` once per process, before anything touches CUDA;
:func:`cudnn_benchmark_off` is for the multi-scale test, whose batches change shape every call.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator

import torch

from resnet_cluster.errors import DeviceError

# cuBLAS picks its reduction split per stream workspace; with a fixed workspace configuration
# its results repeat bit for bit (CUDA >= 10.2; PyTorch's "Reproducibility" notes and
# https://docs.nvidia.com/cuda/cublas/#results-reproducibility). ":16:8" is the other accepted
# value (less memory, may be slower). cuBLAS reads it when its first handle is made.
CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = ":4096:8"
_CUBLAS_OK = (":4096:8", ":16:8")
_PROC_DRIVER = "/proc/driver/nvidia/version"


def driver_version(proc_file: str = _PROC_DRIVER) -> str | None:
    """The NVIDIA kernel driver's version on this node ("550.54.15"), or None without one.

    Read from the kernel module's file (no CUDA call: the point is to name the driver when
    CUDA does not start), else from ``nvidia-smi``.
    """
    try:
        with open(proc_file) as f:
            m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]*)", f.read())
        if m:
            return m.group(1)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            first = out.stdout.strip().splitlines()
            if out.returncode == 0 and first:
                return first[0].strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def cuda_problem(driver: str | None = None, *, asked: str = "scaling.use_gpu is true",
                 fallback: str = "set scaling.use_gpu: false") -> str | None:
    """Why this process cannot use CUDA (one paragraph naming torch's CUDA and the driver), or
    None when ``torch.cuda.is_available()``. Without this check a mismatch (a wheel built for
    a newer CUDA than the node's driver supports) surfaces as a bare traceback from
    ``torch.cuda.set_device`` on every worker."""
    if torch.cuda.is_available():
        return None
    host = socket.gethostname()
    driver = driver or driver_version()
    have = f"NVIDIA driver {driver}" if driver else (
        f"no NVIDIA driver ({_PROC_DRIVER} is missing and nvidia-smi does not answer)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    if torch.version.cuda is None:
        return (
            f"{asked}, but torch {torch.__version__} on {host} is a CPU-only "
            f"build (torch.version.cuda is None; the node has {have}{seen}). Install a CUDA "
            "build of torch on the GPU nodes (`pip install torch` on Linux x86_64 installs one), "
            f"or {fallback}."
        )
    return (
        f"{asked}, but CUDA does not start on {host}: torch "
        f"{torch.__version__} is built for CUDA {torch.version.cuda} and the node has {have}"
        f"{seen}, so torch.cuda.is_available() is false. Most often the driver is older than "
        f"CUDA {torch.version.cuda} needs (NVIDIA's table of minimum drivers: "
        "https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/index.html#id5); install the "
        "torch wheel for the node's CUDA (e.g. `pip install torch --index-url "
        "https://download.pytorch.org/whl/cu121`), or a newer driver. `nvidia-smi` on that "
        f"node shows the driver and the highest CUDA it supports. Or {fallback}."
    )


def set_determinism(deterministic: bool) -> None:
    """``precision.deterministic``: deterministic kernels or an error, fixed cudnn algorithms,
    a fixed cuBLAS workspace. Call it before the process first uses cuBLAS."""
    if deterministic and os.environ.get(CUBLAS_ENV) not in _CUBLAS_OK:
        os.environ[CUBLAS_ENV] = CUBLAS_DETERMINISTIC
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic


def setup_device(device: torch.device, *, deterministic: bool = False) -> None:
    """Make ``device`` this process's device, or raise :class:`DeviceError` saying why not.

    cudnn.benchmark (try each convolution algorithm once per input shape, keep the fastest) is
    on for CUDA training, whose batches keep one shape, and off when ``deterministic`` (the
    fastest algorithm may differ between runs).
    """
    set_determinism(deterministic)
    if device.type != "cuda":
        return
    problem = cuda_problem()
    if problem:
        raise DeviceError(problem)
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = not deterministic


@contextlib.contextmanager
def cudnn_benchmark_off() -> Iterator[None]:
    """cudnn.benchmark off inside: for inputs whose shape changes every call (the multi-scale
    test, one image at five sizes each of a different aspect ratio), where autotuning runs
    for every new shape and never pays back."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old
