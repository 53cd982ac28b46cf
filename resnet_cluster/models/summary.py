"""Counting a net: parameters, multiply-adds, and its stage table (the paper's Table 1 layout).

Multiply-adds are counted, never written down: :func:`count_macs` runs one forward pass of a
single image at the native input size under ``torch.utils.flop_counter.FlopCounterMode`` on the
``meta`` device (shapes only, no arithmetic, no memory), and halves the FLOPs it reports (it
counts a multiply-add as 2 FLOPs). Only convolutions and the fc count, as in the paper's
Table 1 and in torchvision's figures; BN, ReLU, additions and pooling are left out.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from resnet_cluster.models.registry import build, info


def _meta_net(name: str, options: dict[str, Any]) -> nn.Module:
    with torch.device("meta"):  # 19M-parameter ResNet-1202 builds in milliseconds here
        return build(name, **options).eval()


def count_macs(name: str, *, input_size: int | None = None, **options: Any) -> int:
    """Multiply-adds of one forward pass of one image at ``input_size`` (default: native)."""
    size = input_size or info(name).input_size
    net = _meta_net(name, options)
    x = torch.empty(1, 3, size, size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x)
    return counter.get_total_flops() // 2


def count_params(name: str, **options: Any) -> int:
    return sum(p.numel() for p in _meta_net(name, options).parameters())


# ``models list`` counts 22 nets; a meta-device forward of ResNet-1202 or pre-act ResNet-1001
# still walks ~3,600 modules (about 5 s on one core, 15 s for the whole list), so the counts are
# kept in a small cache file keyed by the models' source code and the torch version: the first
# listing counts, later ones read. Delete the file (or change a model) to count again.
def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resnet-cluster" / "model_counts.json"


@functools.lru_cache(maxsize=1)
def _source_key() -> str:
    h = hashlib.sha256(torch.__version__.encode())
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def counts(name: str, **options: Any) -> dict[str, int]:
    """``{"parameters", "multiply_adds"}`` of ``name`` at its native input, cached on disk."""
    key = f"{name}|{json.dumps(options, sort_keys=True)}"
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
        if cache.get("source") != _source_key():
            cache = {}
    except (OSError, ValueError):
        cache = {}
    hit = cache.get("counts", {}).get(key)
    if hit is not None:
        return dict(hit)
    result = {"parameters": count_params(name, **options), "multiply_adds": count_macs(name, **options)}
    cache = {"source": _source_key(), "counts": {**cache.get("counts", {}), key: result}}
    try:  # a cache, never required: an unwritable home only costs the recount
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        pass
    return result


def _describe_block(block: nn.Module) -> str:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    # Convs of the residual branch only, in order (the shortcut's projection is listed apart).
    shortcut = getattr(block, "shortcut", None)
    sc_ids = {id(m) for m in shortcut.modules()} if isinstance(shortcut, nn.Module) else set()
    branch = [c for c in convs if id(c) not in sc_ids]
    return "[" + "; ".join(f"{c.kernel_size[0]}x{c.kernel_size[1]}, {c.out_channels}" for c in branch) + "]"


def _options(net: nn.Module, block_kind: str, given: dict[str, Any]) -> dict[str, Any]:
    """The resolved model.* options under their job-file names."""
    o = getattr(net, "options", None)
    if o is None:
        return dict(given)
    out = {"shortcut": o.shortcut, "block": o.block}
    if block_kind == "bottleneck":
        out["bottleneck_stride"] = o.stride_at
    return {**out, "num_classes": o.num_classes, "zero_init_residual": o.zero_init_residual}


def stage_table(name: str, **options: Any) -> dict[str, Any]:
    """The net laid out like the paper's Table 1: one row per stage, plus totals.

    Returns ``{"name", "options", "rows": [{"stage", "output", "layers"}...], "parameters",
    "multiply_adds"}``; ``output`` is the feature map side after the stage at the native input.
    """
    meta = info(name)
    net = _meta_net(name, options)
    sizes: dict[str, tuple[int, ...]] = {}
    hooks = []
    stage_names = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(net, n)]
    for n in ("conv1", "maxpool", *stage_names):
        if hasattr(net, n):
            hooks.append(getattr(net, n).register_forward_hook(
                lambda m, i, o, n=n: sizes.__setitem__(n, tuple(o.shape))))  # fmt: skip
    x = torch.empty(1, 3, meta.input_size, meta.input_size, device="meta")
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()

    def side(n: str) -> str:
        s = sizes[n]
        return f"{s[2]}x{s[3]}"

    c1 = net.conv1
    stem = f"{c1.kernel_size[0]}x{c1.kernel_size[1]}, {c1.out_channels}, stride {c1.stride[0]}"
    rows = [{"stage": "conv1", "output": side("conv1"), "layers": stem}]
    if "maxpool" in sizes:
        rows.append({"stage": "", "output": side("maxpool"), "layers": "3x3 max pool, stride 2"})
    # ImageNet stages are conv2_x..conv5_x (Table 1); CIFAR's three are numbered the same way.
    for i, n in enumerate(stage_names):
        stage = getattr(net, n)
        first = stage[0]
        strided = [m for m in first.modules() if isinstance(m, nn.Conv2d) and m.stride[0] > 1]
        where = ""
        if strided and getattr(first, "shortcut", None) is not None:
            branch_strided = [m for m in strided if m is not getattr(first, "shortcut", None)]
            c = branch_strided[0]
            where = f", stride 2 in the first {c.kernel_size[0]}x{c.kernel_size[1]}"
        elif strided:
            where = ", stride 2 in the first 3x3"
        rows.append({
            "stage": f"conv{i + 2}_x ({n})",
            "output": side(n),
            "layers": f"{_describe_block(first)} x {len(stage)}{where}",
        })  # fmt: skip
    rows.append({"stage": "", "output": "1x1", "layers": f"average pool, {net.fc.out_features}-d fc, softmax"})
    return {
        "name": name,
        "dataset": meta.dataset,
        "depth": meta.depth,
        "options": _options(net, meta.block, options),
        "rows": rows,
        "parameters": sum(p.numel() for p in net.parameters()),
        "multiply_adds": count_macs(name, **options),
    }
