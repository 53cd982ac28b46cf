"""Residual building blocks (He et al. 2015, "Deep Residual Learning for Image Recognition").

The CIFAR nets (Section 4.2) use the *basic* block of Fig. 2 / Fig. 5 (left): two 3x3 convs,
BN after each conv and before the activation (Section 3.4), the addition, then a ReLU:

    y = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))

Shortcut options (Section 3.3, "Identity vs. Projection Shortcuts" in Section 4.1):
  A  identity everywhere; where the shape changes, subsample with stride 2 and zero-pad the
     extra channels. Adds no parameters, so plain and residual nets have exactly the same
     parameter count (Section 4.2, "we use identity shortcuts in all cases (i.e., option A)").
  B  projection (1x1 conv with stride s, then BN) only where the shape changes, identity
     elsewhere.
A ``plain`` block (Section 4.1, "Plain Networks") is the same stack with no shortcut at all.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

SHORTCUTS = ("A", "B")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the BN that follows every conv (Section 3.4) has its own shift.
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


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


def make_shortcut(kind: str, in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Shortcut of option ``kind`` ("A" or "B"); identity wherever the shape is unchanged."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()  # both A and B are the identity here (Section 3.3)
    if kind == "A":
        return ShortcutA(out_planes, stride)
    if kind == "B":
        # Projection W_s x (Eq. 2): 1x1 conv with the block's stride, then BN.
        return nn.Sequential(
            nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_planes),
        )
    raise ValueError(f"unknown shortcut option {kind!r}; expected one of {SHORTCUTS}")


class BasicBlock(nn.Module):
    """The paper's basic block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU.

    ``stride`` is 2 in the first block of a stage that halves the feature map (Section 4.2).
    With ``plain=True`` there is no shortcut and the block is just the two conv layers.
    ``last_bn`` is the BN that ends the residual branch, the one ``zero_init_residual`` zeroes.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: str = "A",
        plain: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.plain = plain
        self.shortcut: nn.Module | None = (
            None if plain else make_shortcut(shortcut, in_planes, planes, stride)
        )

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))  # BN before the addition (Fig. 2, Section 3.4)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)  # ReLU after the addition (Eq. 1 and Fig. 2: "relu" after "+")


__all__ = ["SHORTCUTS", "BasicBlock", "ShortcutA", "conv3x3", "make_shortcut", "shortcut_a"]

