"""Weights people already have, in our layout: torchvision ResNet state dicts.

torchvision's ResNet (and fb.resnet.torch, whose layout it copies) is our ImageNet net with
option-B shortcuts and the stride in the bottleneck's 3x3 (``bottleneck_stride: v1.5``). Our
module names follow torchvision's, except that the projection shortcut is ``shortcut.{0,1}``
where torchvision says ``downsample.{0,1}``; the conversion renames those keys and checks every
name and shape against the net it builds, so the result gives exactly the same outputs.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import torch
from torch import Tensor

from resnet_cluster.errors import ConfigError, DataError

SOURCES = ("torchvision",)
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")


def _unwrap(obj: Any, where: str) -> dict[str, Tensor]:
    """The state dict inside a checkpoint: bare, or under "state_dict"/"model", "module." stripped."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise DataError(
            f"{where} holds no state dict of tensors (got {type(obj).__name__}). Pass a file "
            "saved with torch.save(model.state_dict(), path), such as torchvision's "
            "resnet50-0676ba61.pth."
        )
    if all(k.startswith("module.") for k in obj):  # saved from a DDP/DataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _guess_arch(sd: dict[str, Tensor]) -> str | None:
    """The torchvision name whose block counts and block type match ``sd``, if any."""
    from resnet_cluster.models.imagenet import LAYOUTS

    blocks = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(len(idx))
    bottleneck = any(".conv3." in k for k in sd)
    for depth, (layout, is_bottleneck) in LAYOUTS.items():
        if tuple(blocks) == layout and bottleneck == is_bottleneck:
            return f"resnet{depth}"
    return None


def from_torchvision(
    state_dict: dict[str, Tensor], arch: str, *, where: str = "the state dict"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Convert a torchvision-layout ResNet state dict to ours.

    Returns ``(state_dict, model_options)`` such that
    ``models.build(arch, **model_options).load_state_dict(state_dict)`` succeeds (strictly) and
    the net computes what torchvision's would. Raises DataError naming the offending keys.
    """
    from resnet_cluster.models.registry import build

    if arch not in TORCHVISION_ARCHS:
        raise ConfigError(
            f"--arch {arch!r} has no torchvision layout; choose one of {', '.join(TORCHVISION_ARCHS)}."
        )
    sd = _unwrap(state_dict, where)
    if "fc.weight" not in sd:
        raise DataError(f"{where} has no fc.weight, so it is not a torchvision ResNet state dict.")
    num_classes = int(sd["fc.weight"].shape[0])
    options = {
        "shortcut": "B",  # torchvision projects only where the shape changes (option B)
        "block": None,
        "zero_init_residual": False,
        "bottleneck_stride": "v1.5",  # torchvision's stride sits in the 3x3
        "num_classes": None if num_classes == 1000 else num_classes,
    }
    ours = {re.sub(r"\.downsample\.", ".shortcut.", k): v for k, v in sd.items()}
    with torch.device("meta"):
        target = build(arch, **options).state_dict()
    for k, v in target.items():  # checkpoints from before torch 0.4.1 lack this BN counter
        if k.endswith("num_batches_tracked") and k not in ours:
            ours[k] = torch.zeros((), dtype=v.dtype)
    missing = [k for k in target if k not in ours]
    unexpected = [k for k in ours if k not in target]
    wrong = [
        f"{k} {tuple(ours[k].shape)} (expected {tuple(v.shape)})"
        for k, v in target.items()
        if k in ours and ours[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        guess = _guess_arch(sd)
        hint = (
            f" Its blocks look like {guess}: pass --arch {guess}."
            if guess and guess != arch
            else " Is it a torchvision ResNet (not ResNeXt / Wide ResNet)?"
        )
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{label}: {', '.join(keys[:3])}{more}")
        raise DataError(f"{where} does not fit {arch} in the torchvision layout ({'; '.join(parts)}).{hint}")
    return {k: ours[k].detach().clone().to(target[k].dtype) for k in target}, options


def import_weights(path: str | os.PathLike[str], *, source: str, arch: str, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Convert the checkpoint at ``path`` and write a ``model.pt`` that ``models.load``, eval and
    fine-tuning jobs read (the format of ``models.files.save_model_file``)."""
    from resnet_cluster.models import jobs
    from resnet_cluster.models.files import save_model_file
    from resnet_cluster.models.registry import build

    if source not in SOURCES:
        raise ConfigError(f"--from {source!r} is not supported; choose one of {', '.join(SOURCES)}.")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist. Pass the path of a torchvision ResNet checkpoint (.pth).")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    try:
        # weights_only: a .pth from the internet must not run code when it is read.
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(
            f"{path} could not be read as a PyTorch state dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})."
        ) from None
    sd, options = from_torchvision(raw, arch, where=path)
    net = build(arch, **options)
    net.load_state_dict(sd, strict=True)
    cfg = jobs.from_dict(
        {"name": f"import-{arch}", "model": {"arch": arch, **options}}, source=f"import of {path}"
    )
    summary = {
        "status": "imported",
        "imported_from": source,
        "source_file": os.path.abspath(path),
        "source_sha256": digest,
        "final_top1_err": None,
        "best_top1_err": None,
    }
    out = os.fspath(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    save_model_file(tmp, net, cfg, summary)
    os.replace(tmp, out)  # never leave a half-written model.pt behind
    return {
        "arch": arch,
        "model_options": options,
        "out": os.path.abspath(out),
        "parameters": sum(p.numel() for p in net.parameters()),
        "tensors": len(sd),
        "source_sha256": digest,
    }
