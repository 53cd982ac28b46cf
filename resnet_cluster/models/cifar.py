"""CIFAR-10 nets of Section 4.2: 6n+2 weighted layers, plain or residual.

    input 32x32x3
    conv3x3, 16 filters, BN, ReLU                     1 layer
    stage 1: n blocks, 16 filters, 32x32 maps         2n layers
    stage 2: n blocks, 32 filters, 16x16 maps         2n layers (first conv has stride 2)
    stage 3: n blocks, 64 filters,  8x8  maps         2n layers (first conv has stride 2)
    global average pool, fc with num_classes outputs  1 layer
"""

from __future__ import annotations

from torch import Tensor, nn

from resnet_cluster.errors import ConfigError
from resnet_cluster.models.blocks import SHORTCUTS, BasicBlock
from resnet_cluster.models.init import init_weights, zero_init_last_bn
from resnet_cluster.models.registry import check_choice, register

# Block variants accepted in model.block. Only the paper's block exists so far; the
# gcr/torch-residual-networks variants (no_relu, bn_after_add, ...) come later.
BLOCKS = ("standard",)

STAGE_WIDTHS = (16, 32, 64)  # filters per stage, Section 4.2


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR net (Section 4.2); ``plain=True`` drops every shortcut."""

    def __init__(
        self,
        n: int,
        *,
        shortcut: str = "A",
        block: str = "standard",
        plain: bool = False,
        num_classes: int = 10,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        check_choice("model.shortcut", shortcut, SHORTCUTS)
        check_choice("model.block", block, BLOCKS)
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n (blocks per stage) is {n!r}; it must be an integer >= 1.")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"model.num_classes is {num_classes!r}; it must be an integer >= 1.")
        if plain and zero_init_residual:
            raise ConfigError(
                "model.zero_init_residual is true, but a plain net has no residual branch: "
                "zeroing the last BN of each block would zero the whole signal. Set it to false."
            )
        self.n = n
        self.plain = plain
        self.depth = 6 * n + 2

        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)

        in_planes = STAGE_WIDTHS[0]
        stages = []
        for i, planes in enumerate(STAGE_WIDTHS):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1  # 32 -> 16 -> 8 maps
                blocks.append(
                    BasicBlock(in_planes, planes, stride, shortcut=shortcut, plain=plain)
                )
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)

        init_weights(self)
        if zero_init_residual:
            zero_init_last_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, 3, 32, 32) -> (N, num_classes) logits
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64, 8, 8)
        x = self.avgpool(x).flatten(1)  # (N, 64)
        return self.fc(x)


def _register_cifar(n: int, *, plain: bool) -> None:
    family = "plain" if plain else "resnet"
    depth = 6 * n + 2

    # Plain nets accept (and validate) model.shortcut too, since job files always carry it;
    # a plain net has no shortcuts, so there its value changes nothing.
    @register(f"cifar_{family}{depth}", dataset="cifar10", depth=depth, family=family)
    def _build(
        *,
        shortcut: str = "A",
        block: str = "standard",
        num_classes: int = 10,
        zero_init_residual: bool = False,
    ) -> nn.Module:
        return CifarResNet(
            n,
            shortcut=shortcut,
            block=block,
            plain=plain,
            num_classes=num_classes,
            zero_init_residual=zero_init_residual,
        )


# Table 6: n = 3, 5, 7, 9, 18, 200 -> 20, 32, 44, 56, 110, 1202 layers.
for _n in (3, 5, 7, 9, 18, 200):
    _register_cifar(_n, plain=False)
# Plain nets of Fig. 6 (left): 20 to 110 layers.
for _n in (3, 5, 7, 9, 18):
    _register_cifar(_n, plain=True)
del _n
