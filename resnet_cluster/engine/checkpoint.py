"""Versioned training state: everything needed to continue a run exactly where it stopped.

Checkpoints are taken at epoch ends, so ``epoch`` is the next epoch to run. The data order needs
no saved state: it is a function of (seed, epoch, rank) (see ``data.loaders``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

FORMAT_VERSION = 1
STATE_FILE = "train_state.pt"


def capture_rng() -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_train_state(directory: str | os.PathLike, state: dict[str, Any]) -> str:
    """Write ``state`` (see :func:`engine.loop.fit`) as ``train_state.pt`` in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATE_FILE)
    tmp = path + ".tmp"
    torch.save({"version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_train_state(directory: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(directory, STATE_FILE)
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("version") != FORMAT_VERSION:
        raise RuntimeError(f"{path}: checkpoint format {state.get('version')}, expected {FORMAT_VERSION}")
    return state
