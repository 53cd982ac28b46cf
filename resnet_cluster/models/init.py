"""Weight initialisation.

He et al. 2015 ("Delving Deep into Rectifiers", the "MSRA" init) is what the ResNet paper uses
(Section 3.4: "We initialize the weights as in [13]").
"""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module) -> None:
    """He-initialise convs, reset BN to the identity affine map, small-normal the classifier."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # std = sqrt(2 / fan_out), fan_out = out_channels * k * k. The sqrt(2) undoes the
            # ReLU halving the variance; fan_out (not fan_in) keeps the backward-pass gradient
            # variance constant, which is the form torchvision and fb.resnet.torch use.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            # The fc feeds the softmax, not a ReLU, so the He rule does not apply to it. A
            # Caffe-style gaussian(0, 0.01) with zero bias keeps the initial logits near 0, so
            # the first loss is about ln(num_classes) whatever the depth.
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            nn.init.zeros_(m.bias)


def zero_init_last_bn(model: nn.Module) -> None:
    """Set gamma of the last BN in every residual branch to 0 (Goyal et al. 2017, Section 5.1).

    Each residual block then starts as the identity, which eases early training of deep nets.
    Blocks expose that BN as ``last_bn``.
    """
    for m in model.modules():
        last_bn = getattr(m, "last_bn", None)
        if isinstance(last_bn, nn.BatchNorm2d):
            nn.init.zeros_(last_bn.weight)
