"""Layer responses (Fig. 7): what is hooked, the numbers, the known result, and the CLI files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from resnet_cluster import models
from resnet_cluster.analysis.responses import layer_responses
from resnet_cluster.cli import app
from resnet_cluster.data.loaders import build_loaders_for
from resnet_cluster.engine import Callback, fit
from resnet_cluster.models import jobs
from resnet_cluster.models import registry
from resnet_cluster.models.cifar import CifarResNet

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_responses_are_each_3x3_layers_bn_output_in_order() -> None:
    net = models.build("cifar_resnet20")
    names = [n for n, _ in net.responses()]
    assert len(names) == 19  # the stem's 3x3 and 2 per block x 9 blocks
    assert names[:3] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"] and names[-1] == "layer3.2.bn2"
    pre = models.build("cifar_preact_resnet164")
    assert len(pre.responses()) == 1 + 54  # stem conv, then one 3x3 per bottleneck unit
    assert len(models.build("resnet50").responses()) == 16


def test_std_is_over_all_values_of_the_test_images() -> None:
    torch.manual_seed(0)
    net = models.build("cifar_plain20").eval()
    x = torch.randn(6, 3, 32, 32)
    seen = []
    h = net.layer2[0].bn2.register_forward_hook(lambda m, i, o: seen.append(o))
    rows, n = layer_responses(net, [(x[:4], None), (x[4:], None)])
    h.remove()
    assert n == 6 and len(rows) == 19
    row = next(r for r in rows if r["layer"] == "layer2.0.bn2")
    assert row["std"] == pytest.approx(torch.cat(seen).std().item(), rel=1e-6)
    assert rows[0]["layer_index"] == 1
    assert layer_responses(net, [(x, None)], max_images=2)[1] == 2


class Keep(Callback):
    def on_finish(self, summary, model):
        self.summary, self.model = summary, model


def test_residual_responses_are_smaller_than_plain_ones() -> None:
    # A tiny 14-layer pair (n = 2) trained 64 iterations on learnable synthetic data.
    names = {True: "test_resp_plain14", False: "test_resp_resnet14"}
    for plain, name in names.items():
        registry._BUILDERS.pop(name, None), registry._INFO.pop(name, None)
        models.register(name, dataset="cifar10", depth=14, family="test")(
            lambda plain=plain, **_: CifarResNet(2, plain=plain)
        )
    try:
        mean_std = {}
        for plain, name in names.items():
            cfg = jobs.load(SMOKE, [
                "scaling.workers=1", "train.batch_size=32", "data.synthetic_train=512",
                "data.synthetic_test=128", "train.iterations=64", "schedule.milestones=[1000]",
                "data.augment=none", f"model.arch={name}", "seed=1",
            ])  # fmt: skip
            keep = Keep()
            fit(cfg, callbacks=[keep])
            _, test, _ = build_loaders_for(cfg, rank=0, world_size=1)
            test.set_epoch(0)
            rows, _ = layer_responses(keep.model, test)
            mean_std[plain] = sum(r["std"] for r in rows) / len(rows)
        # He et al. 2015, Fig. 7: residual functions are generally closer to zero.
        assert mean_std[False] < 0.9 * mean_std[True], mean_std
    finally:
        for name in names.values():
            registry._BUILDERS.pop(name, None)
            registry._INFO.pop(name, None)


def test_cli_writes_csv_and_two_panel_png_for_several_runs(tmp_path) -> None:
    from resnet_cluster.models.files import save_model_file

    paths = []
    for arch in ("cifar_plain20", "cifar_resnet20"):
        cfg = jobs.load(SMOKE, ["data.synthetic_test=64", f"model.arch={arch}"])
        torch.manual_seed(0)
        path = tmp_path / "runs" / f"{arch}-run" / "model.pt"
        path.parent.mkdir(parents=True)
        save_model_file(str(path), models.build(arch), cfg, {})
        paths.append(str(path))
    out = tmp_path / "fig7"
    res = CliRunner().invoke(app, ["analyze", "responses", *paths, "--out", str(out), "--images", "32",
                                   "--label", "plain-20", "--label", "ResNet-20"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "responses.csv")))
    assert len(rows) == 2 * 19
    assert {r["label"] for r in rows} == {"plain-20", "ResNet-20"}
    assert {r["images"] for r in rows} == {"32"}
    assert sorted(int(r["sorted_rank"]) for r in rows if r["label"] == "plain-20") == list(range(1, 20))
    png = (out / "responses.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
