"""ImageNet nets of Table 1: ResNet-18/34/50/101/152, ResNet-200, plain-18/34.

    input 224x224x3
    conv1    7x7, 64, stride 2, BN, ReLU            112x112
             3x3 max pool, stride 2                  56x56
    conv2_x  blocks of 64 filters                    56x56
    conv3_x  blocks of 128 filters (first stride 2)  28x28
    conv4_x  blocks of 256 filters (first stride 2)  14x14
    conv5_x  blocks of 512 filters (first stride 2)   7x7
    global average pool, 1000-d fc, softmax

Basic blocks (two 3x3) for 18/34, bottlenecks (1x1, 3x3, 1x1; x4 outputs) for 50 and deeper.
ResNet-200 is fb.resnet.torch's [3, 24, 36, 3]. Module names follow torchvision's layout
(``conv1``, ``bn1``, ``layer1``..``layer4``, ``fc``; a block's ``conv1``/``bn1``...), so
:mod:`resnet_cluster.models.convert` only renames ``downsample`` to ``shortcut``.

With ``block: preact`` (and ``preact_resnet200``) the net follows fb.resnet.torch's
preresnet.lua: the stem keeps its BN-ReLU, the first unit does not pre-activate again, every
other unit is BN-ReLU-conv, and a final BN-ReLU precedes the pooling.
"""

from __future__ import annotations

from torch import Tensor, nn

from resnet_cluster import datasets
from resnet_cluster.models.init import init_weights, zero_init_last_bn
from resnet_cluster.models.registry import register
from resnet_cluster.models.stages import GlobalAvgPool, make_stage, resolve, response_modules

STAGE_WIDTHS = (64, 128, 256, 512)  # conv2_x .. conv5_x filters (bottleneck: inner width)

# Table 1 (ResNet-200: fb.resnet.torch): blocks per stage.
LAYOUTS: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}


class ImageNetResNet(nn.Module):
    def __init__(
        self,
        layers: tuple[int, int, int, int],
        *,
        bottleneck: bool,
        plain: bool = False,
        shortcut: str | None = None,
        block: str | None = None,
        bottleneck_stride: str | None = None,
        num_classes: int | None = None,
        zero_init_residual: bool = False,
        only_preact: bool = False,
        name: str = "imagenet net",
    ) -> None:
        super().__init__()
        opts = resolve(
            name, bottleneck=bottleneck, plain=plain, shortcut=shortcut, block=block,
            bottleneck_stride=bottleneck_stride, num_classes=num_classes,
            zero_init_residual=zero_init_residual,
            # torchvision and the paper's Table 3 ResNet-34 "B"; the bottleneck nets use B.
            default_shortcut="B", default_block="preact" if only_preact else "standard",
            # fb.resnet.torch (and its preresnet) put the stride in the 3x3.
            default_stride="v1.5" if only_preact else "v1", default_classes=datasets.get("imagenet").num_classes,
            only_preact=only_preact,
        )  # fmt: skip
        self.options = opts
        self.plain = plain
        per_block = 3 if bottleneck else 2
        self.depth = per_block * sum(layers) + 2

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_planes = 64
        stages = []
        for i, (planes, n) in enumerate(zip(STAGE_WIDTHS, layers)):
            stage, in_planes = make_stage(
                in_planes, planes, n, 1 if i == 0 else 2, opts, bottleneck=bottleneck,
                plain=plain, first_preactivated=(i == 0),
            )  # fmt: skip
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.post_bn = nn.BatchNorm2d(in_planes) if opts.preact else None
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(in_planes, opts.num_classes)

        init_weights(self)
        if opts.zero_init_residual:
            zero_init_last_bn(self)

    def responses(self) -> list[tuple[str, nn.Module]]:
        """Each 3x3 layer's response module in order (the 7x7 stem is not a 3x3 layer)."""
        return response_modules(self, [])

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, 3, 224, 224) -> (N, num_classes); any size >= 32 works (global pooling).
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.post_bn is not None:
            x = self.relu(self.post_bn(x))
        return self.fc(self.avgpool(x).flatten(1))


def _register(depth: int, *, plain: bool = False, preact: bool = False) -> None:
    layers, bottleneck = LAYOUTS[depth]
    family = "plain" if plain else ("preact" if preact else "resnet")
    name = f"{'preact_resnet' if preact else family}{depth}"

    @register(name, dataset="imagenet", depth=depth, family=family,
              block="bottleneck" if bottleneck else "basic")  # fmt: skip
    def _build(
        *,
        shortcut: str | None = None,
        block: str | None = None,
        num_classes: int | None = None,
        zero_init_residual: bool = False,
        bottleneck_stride: str | None = None,
    ) -> nn.Module:
        return ImageNetResNet(
            layers, bottleneck=bottleneck, plain=plain, shortcut=shortcut, block=block,
            bottleneck_stride=bottleneck_stride, num_classes=num_classes,
            zero_init_residual=zero_init_residual, only_preact=preact, name=name,
        )  # fmt: skip


for _d in LAYOUTS:
    _register(_d)
for _d in (18, 34):  # Table 1 / Fig. 4: the plain twins of ResNet-18/34
    _register(_d, plain=True)
_register(200, preact=True)  # fb.resnet.torch's pre-activation ResNet-200
del _d
