"""Synthetic data for smoke jobs, tests and GPU benchmarks: instant and learnable, CIFAR-shaped
(32x32) by default or ImageNet-shaped (``data.synthetic_size: 224``).

Each class has a fixed random low-frequency colour template (a 3x4x4 Gaussian grid upsampled
bilinearly to size x size, so each cell spans a quarter of the side, 8 pixels at 32, and survives
the paper's 4-pixel crop jitter). An image is its class template plus independent per-pixel noise. Templates are made
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


def _templates(num_classes: int, seed: int, size: int = 32) -> torch.Tensor:
    g = _generator(seed, 0)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
    coarse = (coarse + coarse.flip(-1)) / 2**0.5  # mirror-symmetric, unit variance
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _draw(templates: torch.Tensor, n: int, g: torch.Generator, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    num_classes, size = templates.shape[0], templates.shape[-1]
    # Balanced labels in a random order: every class appears n // num_classes or one more times.
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    # In chunks, so 224x224 sets never hold float32 copies of the whole set (6.4x the uint8);
    # the generator's stream is the same as one draw of all the noise.
    x = np.empty((n, 3, size, size), np.uint8)
    for i in range(0, n, chunk):
        j = min(n, i + chunk)
        noise = torch.randn(j - i, 3, size, size, generator=g) * NOISE_STD
        block = 127.5 + TEMPLATE_SCALE * templates[labels[i:j]] + noise
        x[i:j] = block.round().clamp(0, 255).to(torch.uint8).numpy()
    return x, labels.to(torch.int64).numpy()


def make_synthetic(
    num_train: int, num_test: int, *, num_classes: int = 10, seed: int = 0, size: int = 32
) -> CifarArrays:
    """``num_train``/``num_test`` uint8 [n, 3, size, size] images from one distribution.

    Deterministic for ``seed`` (and ``size``): the same seed gives the same templates, images
    and labels.
    """
    if num_train < 0 or num_test < 0 or num_classes < 1 or size < 4:
        raise ValueError("num_train and num_test must be >= 0, num_classes >= 1 and size >= 4")
    templates = _templates(num_classes, seed, size)
    train_x, train_y = _draw(templates, num_train, _generator(seed, 1))
    test_x, test_y = _draw(templates, num_test, _generator(seed, 2))
    classes = [f"class{i}" for i in range(num_classes)]
    return CifarArrays(train_x, train_y, test_x, test_y, classes)
