"""CIFAR-10 nets of Section 4.2: 6n+2 weighted layers, plain or residual.

    input 32x32x3
    conv3x3, 16 filters, BN, ReLU                     1 layer
    stage 1: n blocks, 16 filters, 32x32 maps         2n layers
    stage 2: n blocks, 32 filters, 16x16 maps         2n layers (first conv has stride 2)
    stage 3: n blocks, 64 filters,  8x8  maps         2n layers (first conv has stride 2)
    global average pool, fc with num_classes outputs  1 layer

The pre-activation bottleneck nets of He et al. 2016 (``cifar_preact_resnet164``/``1001``,
KaimingHe/resnet-1k-layers) have 9n+2 layers: a 3x3 conv with 16 filters, three stages of n
bottleneck units with 16, 32 and 64 bottleneck filters (64, 128 and 256 outputs), then
BN-ReLU, global average pool and fc.
"""

from __future__ import annotations

from torch import Tensor, nn

from resnet_cluster import datasets
from resnet_cluster.errors import ConfigError
from resnet_cluster.models.init import init_weights, zero_init_last_bn
from resnet_cluster.models.registry import register
from resnet_cluster.models.stages import GlobalAvgPool, make_stage, resolve, response_modules

STAGE_WIDTHS = (16, 32, 64)  # filters per stage, Section 4.2 (bottleneck filters for 9n+2)


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR net (Section 4.2); ``plain=True`` drops every shortcut.

    ``bottleneck=True`` gives the 9n+2-layer bottleneck net of He et al. 2016. ``block`` is a
    :data:`~resnet_cluster.models.blocks.BLOCKS` name; ``preact`` adds the final BN-ReLU that a
    pre-activation net needs before pooling (He et al. 2016, Section 4) and drops the stem's.
    """

    def __init__(
        self,
        n: int,
        *,
        shortcut: str | None = "A",
        block: str | None = "standard",
        plain: bool = False,
        num_classes: int | None = 10,
        zero_init_residual: bool = False,
        bottleneck: bool = False,
        bottleneck_stride: str | None = None,
        only_preact: bool = False,
        name: str = "cifar net",
    ) -> None:
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"n (blocks per stage) is {n!r}; it must be an integer >= 1.")
        opts = resolve(
            name, bottleneck=bottleneck, plain=plain, shortcut=shortcut, block=block,
            bottleneck_stride=bottleneck_stride, num_classes=num_classes,
            zero_init_residual=zero_init_residual, default_shortcut="B" if bottleneck else "A",
            default_block="preact" if only_preact else "standard", default_classes=datasets.get("cifar10").num_classes,
            only_preact=only_preact,
        )  # fmt: skip
        self.n = n
        self.plain = plain
        self.options = opts
        self.depth = (9 if bottleneck else 6) * n + 2

        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], kernel_size=3, padding=1, bias=False)
        # A pre-activation net's first unit normalises its own input ("common BN, ReLU").
        self.bn1 = None if opts.preact else nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)

        in_planes = STAGE_WIDTHS[0]
        stages = []
        for i, planes in enumerate(STAGE_WIDTHS):
            stride = 2 if i > 0 else 1  # 32 -> 16 -> 8 maps
            stage, in_planes = make_stage(
                in_planes, planes, n, stride, opts, bottleneck=bottleneck, plain=plain
            )
            stages.append(stage)
        self.layer1, self.layer2, self.layer3 = stages
        self.post_bn = nn.BatchNorm2d(in_planes) if opts.preact else None

        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(in_planes, opts.num_classes)

        init_weights(self)
        if opts.zero_init_residual:
            zero_init_last_bn(self)

    def responses(self) -> list[tuple[str, nn.Module]]:
        """Each 3x3 layer's response module in order, the stem's first (Fig. 7)."""
        stem = [("bn1", self.bn1)] if self.bn1 is not None else [("conv1", self.conv1)]
        return response_modules(self, stem)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, 3, 32, 32) -> (N, num_classes) logits
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.relu(self.bn1(x))
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64 or 256, 8, 8)
        if self.post_bn is not None:
            x = self.relu(self.post_bn(x))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


def _register_cifar(n: int, *, plain: bool, bottleneck: bool = False) -> None:
    depth = (9 if bottleneck else 6) * n + 2
    family = "plain" if plain else ("preact" if bottleneck else "resnet")
    name = f"cifar_{'preact_resnet' if bottleneck else family}{depth}"

    # Every model.* key arrives here (engine.loop.model_options); ``None`` means the net's
    # own default. Plain nets validate model.shortcut too, but it changes nothing there.
    @register(name, dataset="cifar10", depth=depth, family=family,
              block="bottleneck" if bottleneck else "basic")  # fmt: skip
    def _build(
        *,
        shortcut: str | None = None,
        block: str | None = None,
        num_classes: int | None = None,
        zero_init_residual: bool = False,
        bottleneck_stride: str | None = None,
    ) -> nn.Module:
        return CifarResNet(
            n, shortcut=shortcut, block=block, plain=plain, num_classes=num_classes,
            zero_init_residual=zero_init_residual, bottleneck=bottleneck,
            bottleneck_stride=bottleneck_stride, only_preact=bottleneck, name=name,
        )  # fmt: skip


# Table 6: n = 3, 5, 7, 9, 18, 200 -> 20, 32, 44, 56, 110, 1202 layers.
for _n in (3, 5, 7, 9, 18, 200):
    _register_cifar(_n, plain=False)
# Plain nets of Fig. 6 (left): 20 to 110 layers.
for _n in (3, 5, 7, 9, 18):
    _register_cifar(_n, plain=True)
# He et al. 2016, Table 2: pre-activation bottleneck ResNet-164 (n = 18) and ResNet-1001 (n = 111).
for _n in (18, 111):
    _register_cifar(_n, plain=False, bottleneck=True)
del _n
