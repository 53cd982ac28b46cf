"""torchvision-layout weights -> ours: exact, checked against an independent reference forward.

torchvision is not installed here, so the fixture is a state dict built from torchvision's
layout rules (key names and shapes) with random values, and the reference is a functional
forward pass over those raw tensors written below, independent of resnet_cluster.models.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from resnet_cluster import models
from resnet_cluster.cli import app
from resnet_cluster.errors import DataError
from resnet_cluster.models import jobs
from resnet_cluster.models.convert import from_torchvision

LAYERS = {"resnet18": ([2, 2, 2, 2], False), "resnet50": ([3, 4, 6, 3], True)}


pytestmark = pytest.mark.usefixtures("one_thread")


def torchvision_state_dict(arch: str, num_classes: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keys and shapes of torchvision.models.resnetXX().state_dict(), random values."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, o: int, i: int, k: int) -> None:
        sd[name] = torch.randn(o, i, k, k, generator=g) * math.sqrt(2.0 / (i * k * k))

    def bn(name: str, c: int) -> None:
        sd[f"{name}.weight"] = 1 + 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    layers, bottleneck = LAYERS[arch]
    exp = 4 if bottleneck else 1
    conv("conv1.weight", 64, 3, 7)
    bn("bn1", 64)
    inp = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            stride = 2 if i > 0 and j == 0 else 1
            if bottleneck:
                conv(f"{p}.conv1.weight", planes, inp, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2.weight", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3.weight", planes * 4, planes, 1)
                bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1.weight", planes, inp, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2.weight", planes, planes, 3)
                bn(f"{p}.bn2", planes)
            if stride != 1 or inp != planes * exp:
                conv(f"{p}.downsample.0.weight", planes * exp, inp, 1)
                bn(f"{p}.downsample.1", planes * exp)
            inp = planes * exp
    sd["fc.weight"] = 0.01 * torch.randn(num_classes, inp, generator=g)
    sd["fc.bias"] = 0.01 * torch.randn(num_classes, generator=g)
    return sd


def reference_forward(sd: dict[str, torch.Tensor], arch: str, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ResNet forward (eval mode), written with functional ops on raw tensors."""
    layers, bottleneck = LAYERS[arch]

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], training=False, eps=1e-5)  # fmt: skip

    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for i, n in enumerate(layers):
        for j in range(n):
            p, s = f"layer{i + 1}.{j}", (2 if i > 0 and j == 0 else 1)
            if bottleneck:  # torchvision: the stride sits in the 3x3 (v1.5)
                o = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
                o = F.relu(bn(F.conv2d(o, sd[f"{p}.conv2.weight"], stride=s, padding=1), f"{p}.bn2"))
                o = bn(F.conv2d(o, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            else:
                o = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=s, padding=1), f"{p}.bn1"))
                o = bn(F.conv2d(o, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            idt = x
            if f"{p}.downsample.0.weight" in sd:
                idt = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=s), f"{p}.downsample.1")
            x = F.relu(o + idt)
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_conversion_gives_the_reference_logits(arch: str) -> None:
    tv = torchvision_state_dict(arch)
    ours, options = from_torchvision(tv, arch)
    assert options["shortcut"] == "B" and options["bottleneck_stride"] == "v1.5"
    net = models.build(arch, **options)
    net.load_state_dict(ours, strict=True)
    net.eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference_forward(tv, arch, x)
        got = net(x)
    assert ref.shape == (2, 1000)
    assert ref.std() > 1e-3  # the logits carry signal, so equality means something
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_v1_net_would_not_match() -> None:
    # The stride placement matters: the same weights in a v1 net give other logits.
    tv = torchvision_state_dict("resnet50")
    ours, options = from_torchvision(tv, "resnet50")
    v1 = models.build("resnet50", **{**options, "bottleneck_stride": "v1"}).eval()
    v1.load_state_dict(ours)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(v1(x), reference_forward(tv, "resnet50", x), atol=1e-3)


def test_cli_import_writes_a_loadable_model_file(tmp_path) -> None:
    tv = {f"module.{k}": v for k, v in torchvision_state_dict("resnet18", num_classes=10).items()}
    src, out = tmp_path / "r18.pth", tmp_path / "out" / "model.pt"
    torch.save({"state_dict": tv}, src)  # wrapped and DDP-prefixed, as training scripts save
    res = CliRunner().invoke(app, ["models", "import", str(src), "--from", "torchvision",
                                   "--arch", "resnet18", "--out", str(out), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    net = models.load(out)
    assert not net.training and net.fc.out_features == 10
    doc = torch.load(out, weights_only=False)
    assert set(doc) >= {"format", "arch", "model_options", "state_dict", "config", "summary"}
    # The stored job validates, and its model section is what the model was built from.
    cfg = jobs.from_dict(doc["config"])
    assert cfg.model.model_dump(exclude={"arch"}) == doc["model_options"]
    assert cfg.model.num_classes == 10 and cfg.model.bottleneck_stride == "v1.5"
    x = torch.randn(1, 3, 64, 64)
    plain = {k.removeprefix("module."): v for k, v in tv.items()}
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference_forward(plain, "resnet18", x), rtol=1e-4, atol=1e-5)


def test_wrong_arch_is_a_clear_error_naming_the_right_one(tmp_path) -> None:
    tv = torchvision_state_dict("resnet50")
    with pytest.raises(DataError) as err:
        from_torchvision(tv, "resnet101", where="r50.pth")
    msg = str(err.value)
    assert "r50.pth" in msg and "missing" in msg and "--arch resnet50" in msg
    src = tmp_path / "bad.pth"
    src.write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(app, ["models", "import", str(src), "--arch", "resnet50", "--out",
                                   str(tmp_path / "m.pt")])  # fmt: skip
    # The console script turns a UserError into exit code 2 (cli.main); here it surfaces as is.
    assert isinstance(res.exception, DataError) and "could not be read" in str(res.exception)
    assert not (tmp_path / "m.pt").exists()
