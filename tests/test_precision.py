"""bf16 autocast, channels_last and torch.compile code paths on the CPU: they run through the
real training loop and stay close to fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from resnet_cluster.engine import WorkerContext, fit
from resnet_cluster.engine.loop import build_model
from resnet_cluster.errors import ConfigError
from resnet_cluster.models import jobs

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"
TINY = ["scaling.workers=1", "train.batch_size=32", "data.synthetic_train=128", "data.synthetic_test=64",
        "train.iterations=8", "schedule.milestones=[]", "train.log_every_iterations=4"]


pytestmark = pytest.mark.usefixtures("one_thread")


class Keep:
    def __init__(self):
        self.epochs, self.model = [], None

    def on_start(self, info): ...

    def on_log(self, record): ...

    def on_epoch_end(self, record, state):
        self.epochs.append(dict(record))

    def on_finish(self, summary, model):
        self.model = model


def run(*extra):
    keep = Keep()
    summary = fit(jobs.load(SMOKE, [*TINY, *extra]), WorkerContext(), callbacks=[keep])
    return summary, keep


def test_bf16_channels_last_step_is_close_to_fp32():
    cfg = jobs.load(SMOKE, TINY)
    torch.manual_seed(0)
    ref = build_model(cfg).train()
    low = build_model(cfg).train().to(memory_format=torch.channels_last)
    low.load_state_dict(ref.state_dict())
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    loss_ref = F.cross_entropy(ref(x), y)
    loss_ref.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = low(x.contiguous(memory_format=torch.channels_last))
        assert logits.dtype == torch.bfloat16  # autocast really ran the convs in bf16
        loss_low = F.cross_entropy(logits, y)
    loss_low.backward()
    conv_w = next(p for p in low.parameters() if p.dim() == 4)
    assert conv_w.is_contiguous(memory_format=torch.channels_last) and not conv_w.is_contiguous()
    assert loss_low.item() == pytest.approx(loss_ref.item(), rel=2e-2)
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    g_low = torch.cat([p.grad.float().flatten() for p in low.parameters()])
    assert F.cosine_similarity(g_ref, g_low, dim=0).item() > 0.99


def test_fit_bf16_channels_last_stays_close_to_fp32():
    s32, k32 = run()
    s16, k16 = run("precision.amp=bf16", "precision.channels_last=true")
    assert k16.epochs[-1]["iteration"] == k32.epochs[-1]["iteration"] == 8
    for a, b in zip(k32.epochs, k16.epochs):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=0.05)
    assert abs(s16["final_top1_err"] - s32["final_top1_err"]) <= 10.0  # 64 test images
    # the stored weights are ordinary fp32 tensors whatever the memory format in training
    assert all(t.dtype == torch.float32 for t in k16.model.state_dict().values() if t.is_floating_point())


def test_fit_with_compile_matches_eager():
    # aot_eager traces the model with dynamo and AOTAutograd exactly as inductor does, without
    # the minutes of C++ code generation inductor needs on a CPU (146 s for ResNet-20 here).
    s_eager, k_eager = run()
    s_comp, k_comp = run("precision.compile=true", "precision.compile_backend=aot_eager")
    assert hasattr(k_comp.model, "_compiled_call_impl") and k_comp.model._compiled_call_impl is not None
    assert list(k_comp.model.state_dict()) == list(k_eager.model.state_dict())  # no _orig_mod. prefix
    for a, b in zip(k_eager.epochs, k_comp.epochs):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert s_comp["final_top1_err"] == s_eager["final_top1_err"]


def test_unknown_compile_backend_is_refused():
    with pytest.raises(ConfigError, match="compile_backend"):
        jobs.load(SMOKE, [*TINY, "precision.compile=true", "precision.compile_backend=nope"])
