"""Decode a JPEG and produce the paper's training crops and the evaluation views, on uint8 HWC;
and the CIFAR-10 pad-and-crop, drawn per image and applied on the device.

The JPEG functions work on one encoded image and return uint8 numpy arrays (HWC, RGB), so the
DataLoader workers send 1 byte per value and the float conversion, mean subtraction and PCA
lighting happen once per batch on the target device (:mod:`resnet_cluster.data.streaming`).
CIFAR-10's augmentation pads the mean-subtracted image with zeros (= the mean), so it runs after
normalisation, on the device: the workers only draw its offsets (:func:`pad_crop_params`).

Speed (docs/references.md section 5: one core decodes about 300-470 640x480 JPEGs/s with PIL):

- Random crops are cut and resized in ONE resample: ``Image.resize(size, box=...)`` reads only
  the crop's source region, instead of resizing the whole image to the random scale and then
  cropping it (what torchvision's Resize + RandomCrop does).
- ``Image.draft`` asks libjpeg for a DCT-domain reduced decode (1/2, 1/4 or 1/8 of each side)
  whenever the reduced image is still at least as large as what the crop needs, so no pixel is
  upsampled that a full decode would not also have upsampled.

Random draws come from a per-image ``numpy.random.Generator``; callers seed it from
(seed, epoch, image id), so an image's augmentation does not depend on rank, worker or order.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CIFAR_PAD = 4  # paper section 4.2: "4 pixels are padded on each side, and a 32x32 crop is randomly sampled"
CROP = 224  # paper section 3.4: "a 224x224 crop is randomly sampled"
PAPER_SCALE = (256, 480)  # paper section 3.4 (from [41]): shorter side sampled in [256, 480]
EVAL_SIZE = 256  # 1-crop / 10-crop: shorter side 256, then 224 crops
MULTISCALE = (224, 256, 384, 480, 640)  # paper section 3.4: fully-convolutional multi-scale test
INCEPTION_SCALE = (0.08, 1.0)  # fraction of the image area (fb.resnet.torch, torchvision)
INCEPTION_RATIO = (3 / 4, 4 / 3)


def open_image(data: bytes) -> Image.Image:
    """A lazily decoded PIL image from encoded bytes (nothing is decoded until it is used)."""
    return Image.open(io.BytesIO(data))


def _decode(img: Image.Image, need_w: float, need_h: float) -> tuple[Image.Image, float]:
    """Decode ``img`` at the smallest DCT scale whose size is still >= (need_w, need_h).

    Returns the decoded RGB image and its scale relative to the stored size (1, 1/2, 1/4 or
    1/8). ``draft`` only applies to JPEGs and only before the first load.
    """
    w0 = img.size[0]
    if img.format == "JPEG" and need_w < w0 and need_h < img.size[1]:
        img.draft("RGB", (max(1, math.ceil(need_w)), max(1, math.ceil(need_h))))
    if img.mode != "RGB":
        img = img.convert("RGB")
    else:
        img.load()
    return img, img.size[0] / w0


def _crop_resize(img: Image.Image, box: tuple[float, float, float, float], out: int,
                 flip: bool) -> np.ndarray:
    """Resample ``box`` (stored-image coordinates) of the undecoded ``img`` to out x out."""
    x0, y0, x1, y1 = box
    # The crop needs at least `out` pixels across its narrower side after decoding.
    need = out / min(x1 - x0, y1 - y0)
    dec, s = _decode(img, img.size[0] * need, img.size[1] * need)
    crop = dec.resize((out, out), Image.BILINEAR, box=(x0 * s, y0 * s, x1 * s, y1 * s),
                      reducing_gap=None)
    if flip:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


def paper_train(data: bytes, rng: np.random.Generator, *, scale=PAPER_SCALE,
                size: int = CROP) -> np.ndarray:
    """Paper section 3.4: shorter side resized to S ~ U{256..480}, random 224 crop, random flip.

    The crop is sampled in the coordinates of the image resized to shorter side S (as
    fb.resnet.torch's RandomScale + RandomCrop do) and mapped back to the stored image, so the
    result equals resize-then-crop up to resampling at the crop's border.
    """
    img = open_image(data)
    w, h = img.size
    s_short = int(rng.integers(scale[0], scale[1] + 1))
    f = s_short / min(w, h)  # resize factor stored -> scaled
    sw, sh = max(size, int(w * f)), max(size, int(h * f))
    cx = int(rng.integers(0, sw - size + 1))
    cy = int(rng.integers(0, sh - size + 1))
    flip = bool(rng.random() < 0.5)
    box = (cx / f, cy / f, (cx + size) / f, (cy + size) / f)
    return _crop_resize(img, box, size, flip)


def inception_box(w: int, h: int, rng: np.random.Generator, *, scale=INCEPTION_SCALE,
                  ratio=INCEPTION_RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: (x0, y0, cw, ch) in image pixels.

    Up to 10 tries for a crop of area fraction U(scale) and aspect ratio log-uniform in
    ``ratio``; then the whole image centre-cropped to the nearest allowed ratio.
    """
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def inception_train(data: bytes, rng: np.random.Generator, *, size: int = CROP) -> np.ndarray:
    """Random-resized crop (area 8%-100%, ratio 3/4-4/3) to 224x224, then a random flip."""
    img = open_image(data)
    x0, y0, cw, ch = inception_box(*img.size, rng)
    flip = bool(rng.random() < 0.5)
    return _crop_resize(img, (x0, y0, x0 + cw, y0 + ch), size, flip)


def _resize_short(data: bytes, short: int) -> Image.Image:
    """Decode and resize so the shorter side is ``short`` (DCT-reduced decode when possible)."""
    img = open_image(data)
    w, h = img.size
    f = short / min(w, h)
    nw, nh = max(short, round(w * f)), max(short, round(h * f))
    if w < h:
        nw = short
    else:
        nh = short
    dec, _ = _decode(img, nw, nh)
    if dec.size == (nw, nh):
        return dec
    return dec.resize((nw, nh), Image.BILINEAR, reducing_gap=None)


def center_crop(data: bytes, *, short: int = EVAL_SIZE, size: int = CROP) -> np.ndarray:
    """1-crop view: shorter side 256, the centre 224x224 (uint8 HWC)."""
    img = open_image(data)
    w, h = img.size
    f = short / min(w, h)
    sw, sh = max(short, round(w * f)), max(short, round(h * f))
    cx, cy = (sw - size) // 2, (sh - size) // 2
    return _crop_resize(img, (cx / f, cy / f, (cx + size) / f, (cy + size) / f), size, False)


def ten_crop_boxes(sw: int, sh: int, size: int = CROP) -> list[tuple[int, int]]:
    """Top-left corners of the 5 crops, in the order top-left, top-right, bottom-left,
    bottom-right, centre (torchvision's FiveCrop order)."""
    return [(0, 0), (sw - size, 0), (0, sh - size), (sw - size, sh - size),
            ((sw - size) // 2, (sh - size) // 2)]


def ten_crop(data: bytes, *, short: int = EVAL_SIZE, size: int = CROP) -> np.ndarray:
    """10-crop view [10, 224, 224, 3]: the 5 crops of the image resized to shorter side 256,
    then the same 5 crops mirrored (view 5 + k is view k flipped left-right)."""
    img = np.asarray(_resize_short(data, short))
    sh, sw = img.shape[:2]
    out = np.empty((10, size, size, 3), np.uint8)
    for k, (x, y) in enumerate(ten_crop_boxes(sw, sh, size)):
        out[k] = img[y : y + size, x : x + size]
        out[5 + k] = out[k, :, ::-1]
    return out


def multiscale(data: bytes, scales=MULTISCALE) -> list[np.ndarray]:
    """Fully-convolutional views: the whole image at each shorter side in ``scales``."""
    return [np.asarray(_resize_short(data, s)) for s in scales]


def lighting_shift(rng: np.random.Generator, eigval: np.ndarray, eigvec: np.ndarray,
                   std: float) -> np.ndarray:
    """AlexNet's PCA lighting (Krizhevsky et al. 2012, section 4.1): add
    ``eigvec @ (alpha * eigval)`` to every RGB pixel, alpha ~ N(0, std) per image.

    ``eigval``/``eigvec`` are those of the covariance of training RGB values in [0, 1] units
    (as fb.resnet.torch's constants are), so the shift is in [0, 1] units too.
    """
    if std <= 0:
        return np.zeros(3, np.float32)
    alpha = rng.normal(0.0, std, size=3)
    return (eigvec @ (alpha * eigval)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# CIFAR-10: pad 4, random 32x32 crop, horizontal flip (paper section 4.2)
# --------------------------------------------------------------------------------------------


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a well-mixed bijection."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def pad_crop_params(seed: int, epoch: int, ids: np.ndarray, pad: int = CIFAR_PAD) -> np.ndarray:
    """int64 [B, 3]: (dy, dx, flip) for each image id, dy and dx in 0..2*pad, flip in {0, 1}.

    A hash of (seed, epoch, image id), so an image's crop depends on nothing else (not the rank,
    worker or batch), like the per-image generators of the ImageNet crops, but for a whole batch
    in a few numpy operations (a generator per 32x32 image would cost more than the crop).
    """
    key = np.random.SeedSequence([int(seed), int(epoch), 0xC1FA]).generate_state(1, np.uint64)
    h = _mix64(np.asarray(ids, np.int64).astype(np.uint64) ^ key[0])
    span = np.uint64(2 * pad + 1)
    out = np.empty((len(h), 3), np.int64)
    out[:, 0] = h % span
    out[:, 1] = (h // span) % span
    out[:, 2] = (h // (span * span)) % np.uint64(2)
    return out


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor,
              pad: int = CIFAR_PAD, *, channels_last: bool = False) -> torch.Tensor:
    """Zero-pad ``x`` [b, c, h, w] by ``pad`` on each side, cut the h x w crop at ``offsets``
    [b, (dy, dx)] and mirror it where ``flip`` [b] is true.

    ``x`` is expected mean-subtracted, so zero padding pads with the mean. One gather with
    per-image row/column index grids, no per-image loop; runs on x's device. The result is
    contiguous NCHW, or with ``channels_last`` the gathered NHWC tensor itself (no copy).
    ``offsets`` and ``flip`` on the CPU are copied without blocking the host: from pinned
    memory when x is on a GPU.
    """
    b, c, h, w = x.shape
    offsets, flip = to_device(offsets, x.device), to_device(flip, x.device)
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # [b, h+2p, w+2p, c]
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # [b, h]
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # [b, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads columns backwards
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, rows[:, :, None], cols[:, None, :]]  # [b, h, w, c]
    out = out.permute(0, 3, 1, 2)  # NCHW sizes, NHWC strides: already channels_last
    return out if channels_last else out.contiguous()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without a host sync: a CPU tensor bound for a GPU is staged in pinned
    memory (PyTorch's caching host allocator keeps the block until the copy has run) and copied
    with ``non_blocking``; a plain ``.to()`` from pageable memory waits for the copy."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)
