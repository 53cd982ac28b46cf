"""What the CIFAR and ImageNet nets share: option checking and stacking blocks into stages.

Every builder receives every ``model.*`` key of the job file (``engine.loop.model_options``), so
the checks here turn a value that makes no sense for a given net into a ConfigError that names
the field and says what to set instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from resnet_cluster.errors import ConfigError
from resnet_cluster.models.blocks import (
    BLOCKS,
    SHORTCUTS,
    STRIDES,
    BasicBlock,
    Bottleneck,
    PreActBlock,
    PreActBottleneck,
)
from resnet_cluster.models.registry import check_choice


class GlobalAvgPool(nn.Module):
    """The global average pool before the classifier, [N, C, H, W] -> [N, C, 1, 1], any H, W.

    What ``nn.AdaptiveAvgPool2d(1)`` computes, as a mean: its backward is an expand, so it is
    deterministic on CUDA, where AdaptiveAvgPool2d's backward raises under
    ``torch.use_deterministic_algorithms(True)`` (``precision.deterministic``; PyTorch's
    documented list of such ops). No parameters or buffers, so state dicts are unchanged.
    """

    def forward(self, x):
        return x.mean((-2, -1), keepdim=True)


@dataclass(frozen=True)
class Options:
    """The resolved ``model.*`` options of one net (``None`` replaced by the net's default)."""

    shortcut: str
    block: str
    stride_at: str
    num_classes: int
    zero_init_residual: bool

    @property
    def preact(self) -> bool:
        return self.block == "preact"


def resolve(
    name: str,
    *,
    bottleneck: bool,
    plain: bool,
    shortcut: str | None,
    block: str | None,
    bottleneck_stride: str | None,
    num_classes: int | None,
    zero_init_residual: bool,
    default_shortcut: str,
    default_block: str = "standard",
    default_stride: str = "v1",
    default_classes: int,
    only_preact: bool = False,
) -> Options:
    shortcut = default_shortcut if shortcut is None else shortcut
    block = default_block if block is None else block
    stride_at = default_stride if bottleneck_stride is None else bottleneck_stride
    num_classes = default_classes if num_classes is None else num_classes
    check_choice("model.shortcut", shortcut, SHORTCUTS)
    check_choice("model.block", block, BLOCKS)
    check_choice("model.bottleneck_stride", stride_at, STRIDES)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigError(f"model.num_classes is {num_classes!r}; it must be an integer >= 1.")
    if bottleneck and shortcut == "A":
        # Section 4.1: the bottleneck nets use option B (identity where the shape holds,
        # projections to increase dimensions); zero-padding 64 -> 256 channels was never used.
        raise ConfigError(
            f"model.shortcut is 'A', but {name} is a bottleneck net and the paper builds those "
            "with projection shortcuts: set model.shortcut: B (projections where the shape "
            "changes, the paper's choice) or C (projections everywhere)."
        )
    if only_preact and block != "preact":
        raise ConfigError(
            f"model.block is {block!r}, but {name} is the pre-activation net of He et al. 2016: "
            "leave model.block unset (null) or set it to preact. For the same depth with "
            "post-activation blocks, use the net without 'preact' in its name."
        )
    if plain and block != "standard":
        raise ConfigError(
            f"model.block is {block!r}, but {name} is a plain net: its blocks have no addition, "
            "so the block variants (which move BN/ReLU around the addition) do not apply. "
            "Leave model.block unset or set it to standard."
        )
    if zero_init_residual:
        if plain:
            raise ConfigError(
                "model.zero_init_residual is true, but a plain net has no residual branch: "
                "zeroing the last BN of each block would zero the whole signal. Set it to false."
            )
        if block != "standard" and block != "no_relu":
            raise ConfigError(
                f"model.zero_init_residual is true, but with model.block {block!r} no BN ends "
                "the residual branch (pre-activation branches end in a conv; bn_after_add puts "
                "the BN after the addition, where zeroing it would zero the whole signal). Set "
                "model.zero_init_residual to false, or use block standard or no_relu."
            )
    return Options(shortcut, block, stride_at, num_classes, bool(zero_init_residual))


def block_class(bottleneck: bool, preact: bool) -> type[nn.Module]:
    if preact:
        return PreActBottleneck if bottleneck else PreActBlock
    return Bottleneck if bottleneck else BasicBlock


def make_stage(
    in_planes: int,
    planes: int,
    n: int,
    stride: int,
    opts: Options,
    *,
    bottleneck: bool,
    plain: bool,
    first_preactivated: bool = False,
) -> tuple[nn.Sequential, int]:
    """``n`` blocks of ``planes`` (x4 if bottleneck); the first carries ``stride``.

    Returns the stage and its output channels. ``first_preactivated``: the input of the stage's
    first pre-activation unit is already BN-ReLU'd by the stem (fb.resnet.torch preresnet).
    """
    cls = block_class(bottleneck, opts.preact)
    blocks = []
    for j in range(n):
        s = stride if j == 0 else 1
        kw: dict = {"shortcut": opts.shortcut}
        if opts.preact:
            if j == 0 and first_preactivated:
                kw["preactivate"] = False
        else:
            kw["variant"] = opts.block
        if bottleneck:
            kw["stride_at"] = opts.stride_at
        else:
            kw["plain"] = plain
        if opts.preact:
            kw.pop("plain", None)
        blocks.append(cls(in_planes, planes, s, **kw))
        in_planes = planes * cls.expansion
    return nn.Sequential(*blocks), in_planes


def response_modules(net: nn.Module, stem: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """(name, module) for each 3x3 layer's response, in network order (Fig. 7)."""
    names = {id(m): n for n, m in net.named_modules()}
    out = list(stem)
    for m in net.modules():
        if hasattr(m, "responses") and m is not net:
            out.extend((names[id(r)], r) for r in m.responses())
    return out
