"""ImageNet nets (Table 1), block variants, pre-activation nets, counting, stage tables, load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resnet_cluster import config, models
from resnet_cluster.errors import ConfigError, StoreError
from resnet_cluster.models import jobs
from resnet_cluster.models.blocks import Bottleneck, PreActBlock, PreActBottleneck
from resnet_cluster.models.summary import count_macs, count_params, stage_table


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# torchvision's published counts (option B, stride in the 3x3): exact.
@pytest.mark.parametrize(
    ("name", "exact"),
    [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032),
     ("resnet101", 44_549_160), ("resnet152", 60_192_808)],
)  # fmt: skip
def test_param_counts_match_torchvision(name: str, exact: int) -> None:
    assert count_params(name, shortcut="B", bottleneck_stride="v1.5") == exact
    # Moving the stride does not change the parameters.
    assert count_params(name, shortcut="B", bottleneck_stride="v1") == exact


# Table 1 (v1: stride in the first 1x1) within 3%; torchvision's v1.5 GMACs within 1%.
@pytest.mark.parametrize(
    ("name", "paper_g", "torchvision_g"),
    [("resnet18", 1.8, 1.814), ("resnet34", 3.6, 3.664), ("resnet50", 3.8, 4.089),
     ("resnet101", 7.6, 7.801), ("resnet152", 11.3, 11.514)],
)  # fmt: skip
def test_multiply_adds(name: str, paper_g: float, torchvision_g: float) -> None:
    v1 = count_macs(name, bottleneck_stride="v1") / 1e9
    v15 = count_macs(name, bottleneck_stride="v1.5") / 1e9
    assert abs(v1 / paper_g - 1) < 0.03, v1
    assert abs(v15 / torchvision_g - 1) < 0.01, v15
    if models.info(name).block == "bottleneck":
        assert v15 > v1  # the 3x3 runs at the full map before the stride in v1.5
    else:
        assert v15 == v1


def test_cifar_multiply_adds_match_third_party_counts() -> None:
    # osmr/imgclsmob: ResNet-20 0.041 G, ResNet-56 0.127 G, ResNet-110 0.256 G, ResNet-1202 2.857 G
    # (theirs include a few more ops than convs + fc, so within 2%).
    for name, ref in [("cifar_resnet20", 0.041), ("cifar_resnet56", 0.127), ("cifar_resnet110", 0.256)]:
        assert abs(count_macs(name) / 1e9 / ref - 1) < 0.02


def test_plain_nets_have_option_a_twin_params_and_b_adds_projections() -> None:
    for d in (18, 34):
        plain, a, b, c = (count_params(f"plain{d}"), count_params(f"resnet{d}", shortcut="A"),
                          count_params(f"resnet{d}", shortcut="B"), count_params(f"resnet{d}", shortcut="C"))  # fmt: skip
        assert plain == a
        # B: three projections (64->128, 128->256, 256->512), each a 1x1 conv and a BN.
        assert b - a == sum(i * o + 2 * o for i, o in [(64, 128), (128, 256), (256, 512)])
        assert c > b  # C: a projection on every block


def test_cifar_option_c_projects_every_block() -> None:
    net = models.build("cifar_resnet20", shortcut="C")
    proj = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(proj) == 9
    assert n_params(net) - n_params(models.build("cifar_resnet20", shortcut="B")) == (
        7 * 0 + sum(c * c + 2 * c for c in (16, 16, 16, 32, 32, 64, 64))
    )


def test_stride_placement() -> None:
    for where, s1, s3 in (("v1", 2, 1), ("v1.5", 1, 2)):
        block = models.build("resnet50", bottleneck_stride=where).layer2[0]
        assert isinstance(block, Bottleneck)
        assert (block.conv1.stride[0], block.conv2.stride[0]) == (s1, s3)


def test_imagenet_forward_shapes_and_depth() -> None:
    net = models.build("resnet18").eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    for name, depth in [("resnet50", 50), ("resnet152", 152), ("plain34", 34), ("resnet200", 200)]:
        with torch.device("meta"):
            m = models.build(name)
        weighted = [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
        shortcut_convs = sum(1 for n, x in m.named_modules() if isinstance(x, nn.Conv2d) and ".shortcut." in n)
        assert len(weighted) - shortcut_convs == depth == m.depth


@pytest.mark.parametrize("variant", ["standard", "no_relu", "bn_after_add", "bn_after_add_no_relu"])
def test_block_variants_compute_what_they_say(variant: str) -> None:
    torch.manual_seed(0)
    net = models.build("cifar_resnet20", block=variant).eval()
    b = net.layer1[1]
    for bn in (b.bn1, b.bn2):  # non-trivial BN so the order of BN and addition matters
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        h = torch.relu(b.bn1(b.conv1(x)))
        c = b.conv2(h)
        expect = {
            "standard": torch.relu(b.bn2(c) + x),
            "no_relu": b.bn2(c) + x,
            "bn_after_add": torch.relu(b.bn2(c + x)),
            "bn_after_add_no_relu": b.bn2(c + x),
        }[variant]
        assert torch.allclose(b(x), expect, atol=1e-6)
    assert (b(x) < 0).any() == (variant in ("no_relu", "bn_after_add_no_relu"))


def test_preact_unit_computes_bn_relu_conv() -> None:
    torch.manual_seed(0)
    net = models.build("cifar_resnet20", block="preact").eval()
    b = net.layer1[1]
    assert isinstance(b, PreActBlock) and net.post_bn is not None and net.bn1 is None
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        expect = x + b.conv2(torch.relu(b.bn2(b.conv1(torch.relu(b.bn1(x))))))
        assert torch.allclose(b(x), expect, atol=1e-6)


def test_preact_cifar_bottleneck_nets() -> None:
    # He et al. 2016, Table 2: ResNet-164 1.7M, ResNet-1001 10.2M parameters (9n+2 layers).
    assert round(count_params("cifar_preact_resnet164") / 1e6, 1) == 1.7
    assert round(count_params("cifar_preact_resnet1001") / 1e6, 1) in (10.2, 10.3)
    net = models.build("cifar_preact_resnet164")
    assert net.depth == 164 and isinstance(net.layer1[0], PreActBottleneck)
    assert net.fc.in_features == 256
    with pytest.raises(ConfigError, match="model.block"):
        models.build("cifar_preact_resnet164", block="standard")


def test_preact_resnet200_is_resnet200_with_preact_blocks() -> None:
    with torch.device("meta"):
        a = models.build("preact_resnet200")
        b = models.build("resnet200", block="preact", bottleneck_stride="v1.5")
    assert a.state_dict().keys() == b.state_dict().keys()
    assert n_params(a) == n_params(b)
    assert a.layer1[0].bn1 is None  # fb.resnet.torch: the stem's BN-ReLU serves the first unit
    assert a.layer1[1].bn1 is not None


def test_deep_nets_forward_backward_on_cpu() -> None:
    # ResNet-1202 (19.4M) and pre-activation ResNet-1001 (10.3M), batch 2 at 32x32.
    for name in ("cifar_resnet1202", "cifar_preact_resnet1001"):
        torch.manual_seed(0)
        net = models.build(name)
        out = net(torch.randn(2, 3, 32, 32))
        loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 1]))
        loss.backward()
        assert torch.isfinite(loss)
        assert net.conv1.weight.grad is not None and torch.isfinite(net.conv1.weight.grad).all()
        assert net.conv1.weight.grad.abs().sum() > 0  # the signal reaches the bottom


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("resnet50", {"shortcut": "A"}, "model.shortcut"),
        ("cifar_preact_resnet164", {"shortcut": "A"}, "model.shortcut"),
        ("cifar_plain20", {"block": "no_relu"}, "model.block"),
        ("resnet18", {"block": "preact", "zero_init_residual": True}, "model.zero_init_residual"),
        ("cifar_resnet20", {"block": "bn_after_add", "zero_init_residual": True}, "model.zero_init_residual"),
        ("resnet50", {"bottleneck_stride": "v2"}, "model.bottleneck_stride"),
        ("resnet50", {"num_classes": 0}, "model.num_classes"),
    ],
)
def test_options_that_make_no_sense_are_config_errors(name: str, options: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        with torch.device("meta"):
            models.build(name, **options)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_every_net_builds_with_every_model_key_from_the_job_file() -> None:
    # config._check_model passes every ModelConfig key, on the meta device.
    for m in models.available():
        shortcut = "B" if m.block == "bottleneck" else "A"
        cfg = jobs.from_dict({"model": {"arch": m.name, "shortcut": shortcut}})
        assert cfg.model.block is None


def test_job_file_refuses_option_a_on_a_bottleneck_net_at_load() -> None:
    with pytest.raises(ConfigError, match="model.shortcut"):
        jobs.from_dict({"model": {"arch": "resnet50"}})


def test_stage_table_is_table1() -> None:
    doc = stage_table("resnet34")
    assert [r["output"] for r in doc["rows"]] == ["112x112", "56x56", "56x56", "28x28", "14x14", "7x7", "1x1"]
    assert doc["rows"][3]["layers"].startswith("[3x3, 128; 3x3, 128] x 4")
    assert doc["parameters"] == 21_797_672
    doc50 = stage_table("resnet50", bottleneck_stride="v1.5")
    assert doc50["rows"][5]["layers"] == "[1x1, 512; 3x3, 512; 1x1, 2048] x 3, stride 2 in the first 3x3"
    assert doc50["options"]["bottleneck_stride"] == "v1.5"


def test_zero_init_residual_on_bottleneck_zeroes_bn3() -> None:
    net = models.build("resnet50", zero_init_residual=True)
    for b in net.modules():
        if isinstance(b, Bottleneck):
            assert torch.all(b.bn3.weight == 0) and torch.all(b.bn2.weight == 1)


def test_load_from_model_file_run_folder_and_run_id(tmp_path, monkeypatch) -> None:
    from resnet_cluster.models.files import save_model_file

    cfg = jobs.from_dict({"model": {"arch": "cifar_resnet20", "shortcut": "B", "block": "no_relu"}})
    torch.manual_seed(3)
    net = models.build("cifar_resnet20", shortcut="B", block="no_relu")
    run = tmp_path / "runs" / "r20-test"
    run.mkdir(parents=True)
    save_model_file(str(run / "model.pt"), net, cfg, {"status": "finished"})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net.eval()(x)
    monkeypatch.setenv("RESNET_CLUSTER_STORE", str(tmp_path))
    for src in (run / "model.pt", run, "r20-test"):
        loaded = models.load(src)
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(x), ref)
    with pytest.raises(StoreError, match="no-such-run"):
        models.load("no-such-run")
    with pytest.raises(StoreError, match="does not exist"):
        models.load(str(tmp_path / "missing.pt"))
