"""Residual building blocks (He et al. 2015, "Deep Residual Learning for Image Recognition").

The *basic* block of Fig. 2 / Fig. 5 (left): two 3x3 convs, BN after each conv and before the
activation (Section 3.4), the addition, then a ReLU:

    y = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))

The *bottleneck* block of Fig. 5 (right), used by ResNet-50/101/152 (Section 4.1, "Deeper
Bottleneck Architectures"): 1x1 (reduce to ``planes``), 3x3, 1x1 (restore to 4 * ``planes``).
Where the stride sits when a stage halves the map is selectable (``stride_at``):
  v1    the paper's (and Caffe's released models'): stride 2 in the first 1x1.
  v1.5  torchvision's and fb.resnet.torch's: stride 2 in the 3x3 (more multiply-adds, ~0.5%
        better top-1).

Shortcut options (Section 3.3, "Identity vs. Projection Shortcuts" in Section 4.1):
  A  identity everywhere; where the shape changes, subsample with stride 2 and zero-pad the
     extra channels. Adds no parameters, so plain and residual nets have exactly the same
     parameter count (Section 4.2, "we use identity shortcuts in all cases (i.e., option A)").
  B  projection (1x1 conv with stride s, then BN) only where the shape changes, identity
     elsewhere.
  C  projections on every shortcut (Table 3, "ResNet-34 C").
A ``plain`` block (Section 4.1, "Plain Networks") is the same stack with no shortcut at all.

Block variants (``model.block``), after gcr/torch-residual-networks' experiments:
  standard              BN before the addition, ReLU after it (the paper, Fig. 2)
  no_relu               BN before the addition, no ReLU after it
  bn_after_add          the last BN moves after the addition, then ReLU
  bn_after_add_no_relu  the last BN after the addition, no ReLU
  preact                full pre-activation (He et al. 2016, "Identity Mappings", Fig. 4e):
                        BN-ReLU-conv in the branch, nothing after the addition
                        (:class:`PreActBlock`, :class:`PreActBottleneck`).

Every block exposes ``responses()``: the modules whose forward output is the response of each
3x3 layer "after BN and before other nonlinearity (ReLU/addition)" (Section 4.2, Fig. 7), used
by :mod:`resnet_cluster.analysis.responses`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

SHORTCUTS = ("A", "B", "C")
VARIANTS = ("standard", "no_relu", "bn_after_add", "bn_after_add_no_relu")  # post-activation
BLOCKS = (*VARIANTS, "preact")
STRIDES = ("v1", "v1.5")
EXPANSION = 4  # bottleneck output channels = 4 * planes (Table 1: 64 -> 256, ...)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the BN that follows every conv (Section 3.4) has its own shift.
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def shortcut_a(x: Tensor, out_planes: int, stride: int) -> Tensor:
    """Option A shortcut (Section 3.3): subsample by ``stride``, zero-pad the extra channels.

    (N, C, H, W) -> (N, out_planes, H/stride, W/stride). The input channels keep their
    positions [0, C); channels [C, out_planes) are zeros. Parameter-free.
    """
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    extra = out_planes - x.shape[1]
    if extra < 0:
        raise ValueError(f"option A cannot shrink channels ({x.shape[1]} -> {out_planes})")
    if extra:
        # F.pad pads dims from the last one backwards: (W_left, W_right, H_top, H_bottom,
        # C_front, C_back); only the channel dim grows.
        x = F.pad(x, (0, 0, 0, 0, 0, extra))
    return x


class ShortcutA(nn.Module):
    """Module wrapper around :func:`shortcut_a` (no parameters, no buffers)."""

    def __init__(self, out_planes: int, stride: int) -> None:
        super().__init__()
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return shortcut_a(x, self.out_planes, self.stride)

    def extra_repr(self) -> str:
        return f"out_planes={self.out_planes}, stride={self.stride}"


def make_shortcut(
    kind: str, in_planes: int, out_planes: int, stride: int, *, bn: bool = True
) -> nn.Module:
    """Shortcut of option ``kind`` (A, B or C).

    A and B are the identity wherever the shape is unchanged; C projects everywhere. ``bn=False``
    gives the bare 1x1 conv that pre-activation units use (He et al. 2016: the projection reads
    the already batch-normalised input).
    """
    if kind not in SHORTCUTS:
        raise ValueError(f"unknown shortcut option {kind!r}; expected one of {SHORTCUTS}")
    same_shape = stride == 1 and in_planes == out_planes
    if kind == "A" or (kind == "B" and same_shape):
        return nn.Identity() if same_shape else ShortcutA(out_planes, stride)
    # Projection W_s x (Eq. 2): 1x1 conv with the block's stride, then BN.
    if not bn:
        return nn.Sequential(conv1x1(in_planes, out_planes, stride))
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown block variant {variant!r}; expected one of {VARIANTS}")


class BasicBlock(nn.Module):
    """The paper's basic block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU.

    ``stride`` is 2 in the first block of a stage that halves the feature map (Section 4.2).
    With ``plain=True`` there is no shortcut and the block is just the two conv layers.
    ``last_bn`` is the BN that ends the residual branch, the one ``zero_init_residual`` zeroes.
    ``variant`` is one of :data:`VARIANTS` (see the module docstring).
    """

    expansion = 1

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: str = "A",
        plain: bool = False,
        variant: str = "standard",
    ) -> None:
        super().__init__()
        _check_variant(variant)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.plain = plain
        self.variant = variant
        self.shortcut: nn.Module | None = (
            None if plain else make_shortcut(shortcut, in_planes, planes, stride)
        )

    @property
    def last_bn(self) -> nn.BatchNorm2d | None:
        # After the addition (bn_after_add*) the BN scales the whole output, not the branch.
        return None if self.variant.startswith("bn_after_add") else self.bn2

    def responses(self) -> list[nn.Module]:
        # bn_after_add*: the second 3x3 has no BN of its own before the addition, so its
        # response is the bare conv output.
        second = self.conv2 if self.variant.startswith("bn_after_add") else self.bn2
        return [self.bn1, second]

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        return _finish(self, out, x)


def _finish(block: nn.Module, out: Tensor, x: Tensor) -> Tensor:
    """Close a post-activation block: last BN, addition and ReLU in the variant's order."""
    bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    sc = block.shortcut
    if block.variant.startswith("bn_after_add"):
        out = bn(out + sc(x)) if sc is not None else bn(out)
    else:
        out = bn(out)  # BN before the addition (Fig. 2, Section 3.4)
        if sc is not None:
            out = out + sc(x)
    if block.variant in ("no_relu", "bn_after_add_no_relu"):
        return out
    return F.relu(out)  # ReLU after the addition (Eq. 1 and Fig. 2: "relu" after "+")


class Bottleneck(nn.Module):
    """Bottleneck block (Fig. 5 right): 1x1 reduce, 3x3, 1x1 expand to ``4 * planes``."""

    expansion = EXPANSION

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: str = "B",
        variant: str = "standard",
        stride_at: str = "v1",
    ) -> None:
        super().__init__()
        _check_variant(variant)
        if stride_at not in STRIDES:
            raise ValueError(f"unknown stride placement {stride_at!r}; expected one of {STRIDES}")
        s1, s3 = (stride, 1) if stride_at == "v1" else (1, stride)
        out_planes = planes * EXPANSION
        self.conv1 = conv1x1(in_planes, planes, s1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, s3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.variant = variant
        self.plain = False
        self.shortcut = make_shortcut(shortcut, in_planes, out_planes, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d | None:
        return None if self.variant.startswith("bn_after_add") else self.bn3

    def responses(self) -> list[nn.Module]:
        return [self.bn2]

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.conv3(out)
        return _finish(self, out, x)


class PreActBlock(nn.Module):
    """Pre-activation basic unit (He et al. 2016, Fig. 1b / 4e): x + conv(relu(bn(conv(relu(bn(x)))))).

    Where a projection is needed it reads the pre-activated input, as in KaimingHe's
    resnet-1k-layers ("common BN, ReLU" for units that change dimensions). With
    ``preactivate=False`` the unit skips its first BN-ReLU because the stem just applied one
    (fb.resnet.torch preresnet.lua, the first unit after the ImageNet stem).
    """

    expansion = 1
    variant = "preact"
    plain = False
    last_bn = None  # the branch ends in a conv: there is no BN gamma to zero

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, *, shortcut: str = "B",
        preactivate: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes) if preactivate else None
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = make_shortcut(shortcut, in_planes, planes, stride, bn=False)

    def responses(self) -> list[nn.Module]:
        # conv1's response after BN is bn2's output; conv2 feeds the addition directly.
        return [self.bn2, self.conv2]

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x)) if self.bn1 is not None else x
        sc = self.shortcut(pre) if isinstance(self.shortcut, nn.Sequential) else self.shortcut(x)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit (He et al. 2016): BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1."""

    expansion = EXPANSION
    variant = "preact"
    plain = False
    last_bn = None

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, *, shortcut: str = "B",
        stride_at: str = "v1", preactivate: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        if stride_at not in STRIDES:
            raise ValueError(f"unknown stride placement {stride_at!r}; expected one of {STRIDES}")
        s1, s3 = (stride, 1) if stride_at == "v1" else (1, stride)
        out_planes = planes * EXPANSION
        self.bn1 = nn.BatchNorm2d(in_planes) if preactivate else None
        self.conv1 = conv1x1(in_planes, planes, s1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, s3)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.shortcut = make_shortcut(shortcut, in_planes, out_planes, stride, bn=False)

    def responses(self) -> list[nn.Module]:
        return [self.bn3]  # the 3x3's output after the BN that follows it

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x)) if self.bn1 is not None else x
        sc = self.shortcut(pre) if isinstance(self.shortcut, nn.Sequential) else self.shortcut(x)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + sc


__all__ = [
    "BLOCKS", "EXPANSION", "SHORTCUTS", "STRIDES", "VARIANTS",
    "BasicBlock", "Bottleneck", "PreActBlock", "PreActBottleneck", "ShortcutA",
    "conv1x1", "conv3x3", "make_shortcut", "shortcut_a",
]  # fmt: skip
