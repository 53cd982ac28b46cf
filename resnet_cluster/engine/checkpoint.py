"""Versioned training state: everything needed to continue a run exactly where it stopped.

A checkpoint is taken at an epoch end (``epoch`` is then the next epoch, ``epoch_step`` 0) or
mid-epoch (``checkpoint.every_iterations``; ``epoch_step`` optimizer steps of ``epoch`` are
done, and ``progress`` holds the epoch's running sums). The data order needs no saved state: it
is a function of (seed, epoch) (see ``data.loaders``), so a resumed run skips exactly the
``epoch_step`` batches of each slot it has trained on, at any world size.

Every tensor is saved as a CPU copy, so a GPU run's ``train_state.pt`` opens with a plain
``torch.load`` on a machine without CUDA, and loading it does not first allocate on the GPU
that saved it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

FORMAT_VERSION = 1
STATE_FILE = "train_state.pt"


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it (nested dicts, lists, tuples) replaced by a CPU copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """The CPU generator's state, and that of ``device``'s CUDA generator when it is a GPU.

    Only this process's own GPU: after a node loss a restarted rank may see fewer GPUs than the
    rank that saved, so a list of every visible GPU's state cannot be restored everywhere.
    (Nothing in training draws from the CUDA generator today; it is kept for exactness.)
    """
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        rng["cuda_device"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`capture_rng`'s state; the CUDA part onto ``device`` only (older
    checkpoints' every-GPU lists under ``cuda`` are ignored: see :func:`capture_rng`)."""
    torch.set_rng_state(rng["torch"])
    if "cuda_device" in rng and device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda_device"], device)


def train_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    epoch_step: int,
    iteration: int,
    history: list[dict[str, Any]],
    config: dict[str, Any],
    progress: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The TrainState dict (CPU tensors) that :func:`engine.loop.fit`'s ``resume`` takes."""
    device = next((p.device for p in model.parameters()), None)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        # fp16: the loss scale and its growth tracker, so a resumed run does not re-learn it
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": capture_rng(device),
        "epoch": epoch,
        "epoch_step": epoch_step,
        "iteration": iteration,
        "history": list(history),
        "config": config,
    }
    if progress is not None:
        state["progress"] = progress
    return to_cpu(state)


def save_train_state(directory: str | os.PathLike, state: dict[str, Any]) -> str:
    """Write ``state`` (see :func:`train_state`) as ``train_state.pt`` in ``directory``,
    with every tensor as a CPU copy."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATE_FILE)
    tmp = path + ".tmp"
    torch.save({"version": FORMAT_VERSION, **to_cpu(state)}, tmp)
    os.replace(tmp, path)
    return path


def load_train_state(directory: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(directory, STATE_FILE)
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("version") != FORMAT_VERSION:
        raise RuntimeError(f"{path}: checkpoint format {state.get('version')}, expected {FORMAT_VERSION}")
    return state
