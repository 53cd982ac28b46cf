"""Synthetic CIFAR-shaped data for smoke jobs and tests: small, instant, and learnable.

Each class has a fixed random low-frequency colour template (a 3x4x4 Gaussian grid upsampled
bilinearly to 32x32, so each cell spans about 8 pixels and survives the paper's 4-pixel crop
jitter). An image is its class template plus independent per-pixel noise. Templates are made
left-right symmetric so the paper's random horizontal flip does not change the class signal.
A ResNet-20 at batch 32 separates the classes within about 100 SGD steps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from resnet_cluster.data.cifar import CifarArrays

# In 0..255 units: templates have std ~TEMPLATE_SCALE around mid-grey; the noise is comparable,
# so single pixels are unreliable but the low-frequency pattern is easy to find.
TEMPLATE_SCALE = 50.0
NOISE_STD = 40.0


def _generator(*parts: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed & ((1 << 63) - 1))


def _templates(num_classes: int, seed: int) -> torch.Tensor:
    g = _generator(seed, 0)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
    coarse = (coarse + coarse.flip(-1)) / 2**0.5  # mirror-symmetric, unit variance
    return F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)


def _draw(templates: torch.Tensor, n: int, g: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    num_classes = templates.shape[0]
    # Balanced labels in a random order: every class appears n // num_classes or one more times.
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    noise = torch.randn(n, 3, 32, 32, generator=g) * NOISE_STD
    x = 127.5 + TEMPLATE_SCALE * templates[labels] + noise
    x = x.round().clamp(0, 255).to(torch.uint8)
    return x.numpy(), labels.to(torch.int64).numpy()


def make_synthetic(
    num_train: int, num_test: int, *, num_classes: int = 10, seed: int = 0
) -> CifarArrays:
    """``num_train``/``num_test`` uint8 [n, 3, 32, 32] images from one distribution.

    Deterministic for ``seed``: the same seed gives the same templates, images and labels.
    """
    if num_train < 0 or num_test < 0 or num_classes < 1:
        raise ValueError("num_train and num_test must be >= 0 and num_classes >= 1")
    templates = _templates(num_classes, seed)
    train_x, train_y = _draw(templates, num_train, _generator(seed, 1))
    test_x, test_y = _draw(templates, num_test, _generator(seed, 2))
    classes = [f"class{i}" for i in range(num_classes)]
    return CifarArrays(train_x, train_y, test_x, test_y, classes)
