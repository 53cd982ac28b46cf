"""Model registry, CIFAR nets (He et al. 2015, Section 4.2) and initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from resnet_cluster import models
from resnet_cluster.errors import ConfigError, UserError
from resnet_cluster.models import registry
from resnet_cluster.models.blocks import BasicBlock, ShortcutA, shortcut_a
from resnet_cluster.models.cifar import CifarResNet


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Table 6 of the paper, rounded as the paper rounds (2 decimals, ResNet-110 to 1 decimal).
@pytest.mark.parametrize(
    ("name", "millions", "digits", "exact"),
    [
        ("cifar_resnet20", 0.27, 2, 269_722),
        ("cifar_resnet32", 0.46, 2, 464_154),
        ("cifar_resnet44", 0.66, 2, 658_586),
        ("cifar_resnet56", 0.85, 2, 853_018),
        ("cifar_resnet110", 1.7, 1, 1_727_962),
    ],
)
def test_param_counts_match_table6(name: str, millions: float, digits: int, exact: int) -> None:
    p = n_params(models.build(name))
    assert round(p / 1e6, digits) == millions
    assert p == exact  # pins the layout: option A, no conv biases, BN affine


def test_resnet1202_param_count() -> None:
    net = models.build("cifar_resnet1202")
    p = n_params(net)
    assert round(p / 1e6, 1) == 19.4
    assert p == 19_421_274
    assert net.depth == 1202


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_plain_and_option_a_have_identical_params(depth: int) -> None:
    plain = n_params(models.build(f"cifar_plain{depth}"))
    res_a = n_params(models.build(f"cifar_resnet{depth}", shortcut="A"))
    res_b = n_params(models.build(f"cifar_resnet{depth}", shortcut="B"))
    assert plain == res_a
    # Option B adds two projections (16->32 and 32->64 1x1 convs, each followed by BN).
    assert res_b - res_a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_depth_is_6n_plus_2_weighted_layers() -> None:
    net = models.build("cifar_resnet56")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    fcs = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(fcs) == 6 * 9 + 2 == 56


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_plain20"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_forward_shape(name: str, shortcut: str) -> None:
    net = models.build(name, shortcut=shortcut).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_num_classes_option() -> None:
    net = models.build("cifar_resnet20", num_classes=100).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_stage_feature_maps() -> None:
    net = CifarResNet(1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = net.relu(net.bn1(net.conv1(x)))
        assert net.layer1(x).shape == (2, 16, 32, 32)
        assert net.layer2(net.layer1(x)).shape == (2, 32, 16, 16)
        assert net.layer3(net.layer2(net.layer1(x))).shape == (2, 64, 8, 8)


def test_option_a_shortcut_is_zero_padded_subsample() -> None:
    x = torch.randn(2, 16, 32, 32)
    y = shortcut_a(x, 32, 2)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0
    # Same shape: identity.
    assert torch.equal(shortcut_a(x, 16, 1), x)


def test_option_a_block_has_parameter_free_shortcut() -> None:
    block = BasicBlock(16, 32, 2, shortcut="A")
    assert isinstance(block.shortcut, ShortcutA)
    assert n_params(block.shortcut) == 0
    assert n_params(block) == n_params(BasicBlock(16, 32, 2, plain=True))
    # The block really adds that shortcut: with a zero residual branch, out = relu(shortcut(x)).
    nn.init.zeros_(block.bn2.weight)
    block.eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.allclose(block(x), torch.relu(shortcut_a(x, 32, 2)))


def test_option_b_projects_only_where_shape_changes() -> None:
    net = models.build("cifar_resnet20", shortcut="B")
    projections = [
        m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert [(p.in_channels, p.out_channels, p.stride) for p in projections] == [
        (16, 32, (2, 2)),
        (32, 64, (2, 2)),
    ]


def test_plain_blocks_have_no_shortcut() -> None:
    net = models.build("cifar_plain20")
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    assert all(b.shortcut is None for b in blocks)


def test_duplicate_registration_refused() -> None:
    with pytest.raises(ValueError, match="cifar_resnet20"):

        @models.register("cifar_resnet20", dataset="cifar10", depth=20, family="resnet")
        def _again() -> nn.Module:  # pragma: no cover
            return nn.Identity()


def test_register_and_build_a_new_name() -> None:
    name = "test_only_identity"
    try:

        @models.register(name, dataset="zz_test", depth=0, family="zz_test")
        def _identity() -> nn.Module:
            return nn.Identity()

        assert isinstance(models.build(name), nn.Identity)
        assert models.available()[-1] == models.ModelInfo(name, "zz_test", 0, "zz_test")
    finally:
        registry._BUILDERS.pop(name, None)
        registry._INFO.pop(name, None)


def test_unknown_name_is_config_error_listing_names() -> None:
    with pytest.raises(ConfigError) as err:
        models.build("cifar_resnet21")
    msg = str(err.value)
    assert "'cifar_resnet21'" in msg
    assert "model.arch" in msg
    assert "cifar_resnet20" in msg and "cifar_plain110" in msg
    assert "\n" not in msg
    assert isinstance(err.value, UserError)


@pytest.mark.parametrize(
    ("option", "value", "field", "allowed"),
    [
        ("shortcut", "Z", "model.shortcut", "'A', 'B', 'C'"),
        ("block", "foo", "model.block", "'standard'"),
    ],
)
def test_bad_option_value_is_config_error(
    option: str, value: str, field: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as err:
        models.build("cifar_resnet20", **{option: value})
    msg = str(err.value)
    assert field in msg and repr(value) in msg and allowed in msg


def test_unknown_option_is_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        models.build("cifar_resnet20", widen=2)
    msg = str(err.value)
    assert "model.widen" in msg and "model.shortcut" in msg


def test_zero_init_residual_on_plain_net_refused() -> None:
    with pytest.raises(ConfigError, match="model.zero_init_residual"):
        models.build("cifar_plain20", zero_init_residual=True)


def test_available_sorted_by_dataset_family_then_depth() -> None:
    infos = models.available()
    assert infos == sorted(infos, key=lambda i: (i.dataset, i.family, i.depth))
    names = [i.name for i in infos]
    assert names[:5] == [f"cifar_plain{d}" for d in (20, 32, 44, 56, 110)]
    assert names[5:7] == ["cifar_preact_resnet164", "cifar_preact_resnet1001"]
    assert names[7:13] == [f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110, 1202)]
    assert names[13:] == [
        "plain18", "plain34", "preact_resnet200",
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200",
    ]  # fmt: skip
    info = infos[7]
    assert (info.dataset, info.depth, info.family) == ("cifar10", 20, "resnet")
    with pytest.raises(AttributeError):
        info.depth = 3  # type: ignore[misc]  # frozen


def test_zero_init_residual_zeroes_exactly_last_bn_of_each_block() -> None:
    net = models.build("cifar_resnet20", shortcut="B", zero_init_residual=True)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    last_bns = {id(b.bn2) for b in blocks}
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            expected = 0.0 if id(m) in last_bns else 1.0
            assert torch.all(m.weight == expected)
            assert torch.all(m.bias == 0)
    # Default: no BN gamma is zero.
    plain_init = models.build("cifar_resnet20")
    assert all(
        torch.all(m.weight == 1) for m in plain_init.modules() if isinstance(m, nn.BatchNorm2d)
    )


def test_he_init_std() -> None:
    torch.manual_seed(0)
    net = models.build("cifar_resnet56")
    conv = net.layer3[1].conv1  # 64 -> 64, 3x3: 36,864 weights
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    expected = math.sqrt(2.0 / fan_out)
    w = conv.weight.detach()
    assert abs(w.std().item() / expected - 1) < 0.03
    assert abs(w.mean().item()) < 0.1 * expected
    assert conv.bias is None
    # Classifier: normal(0, 0.01), zero bias.
    assert abs(net.fc.weight.std().item() - 0.01) < 0.002
    assert torch.all(net.fc.bias == 0)


def test_models_are_pure_modules_on_cpu() -> None:
    net = models.build("cifar_resnet20")
    assert {p.device.type for p in net.parameters()} == {"cpu"}
    assert net.training
