"""Plain progress lines (Ray job logs, CI, | tee): whole lines with the numbers, never cut."""

from __future__ import annotations

import io
import re

from resnet_cluster.cli.progress import PlainProgress, PlainTrialLog

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def _lines(buf: io.StringIO) -> list[str]:
    text = buf.getvalue()
    assert text.endswith("\n")
    return text.splitlines()


def test_submit_progress_is_a_start_line_a_line_per_window_and_per_evaluation():
    buf = io.StringIO()
    p = PlainProgress(buf)
    uri = "s3://bucket/a/very/long/prefix/that/goes/well/past/eighty/columns/runs/smoke-20261130-093000-abcd"
    p({"kind": "cluster", "run_id": "smoke-1", "uri": uri, "dashboard_url": "127.0.0.1:8265"})
    p({"kind": "start", "total_epochs": 4, "total_iterations": 200, "start_epoch": 0, "start_iteration": 0,
       "resumed": False, "world_size": 2, "devices": ["cpu", "cpu"]})  # fmt: skip
    p({"kind": "log", "epoch": 1, "iteration": 60, "loss": 1.23456, "train_err": 45.3125, "lr": 0.1,
       "images_per_sec": 512.34, "data_wait_fraction": 0.031})  # fmt: skip
    p({"kind": "epoch", "epoch": 1, "iteration": 100, "top1_err": 40.5, "top5_err": 7.25, "test_loss": 1.1})
    p({"kind": "epoch", "epoch": 2, "iteration": 150})  # no evaluation this epoch: no line
    p.summary({"run_id": "smoke-1", "status": "finished", "final": {"top1_err": 30.0, "top5_err": 5.0, "iteration": 200},
               "best": {"top1_err": 29.5, "epoch": 3}, "images_per_sec": 600.0, "seconds": 61.2, "uri": uri})  # fmt: skip
    lines = _lines(buf)
    assert len(lines) == 5 and all(re.match(STAMP, ln) for ln in lines)
    assert uri in lines[0] and "http://127.0.0.1:8265" in lines[0]  # whole, not folded at 80 columns
    assert lines[1].endswith(f"run smoke-1 started: 2 workers on cpu, cpu; iteration 0/200, epoch 1/4; store {uri}")
    assert lines[2].endswith(
        "epoch 2/4 iter 60/200 loss 1.2346 train_err 45.31% lr 0.1 img/s 512.3 data_wait 3.1%"
    )
    assert lines[3].endswith("eval epoch 2/4 iter 100: top1_err 40.50% top5_err 7.25% test_loss 1.1000")
    assert lines[4].endswith(
        "run smoke-1 finished: final top1_err 30.00% top5_err 5.00%; best top1_err 29.50% (epoch 3); "
        f"iterations 200; img/s 600.0; 61 s; artifacts {uri}"
    )


def test_sweep_lines_change_with_state_and_a_table_comes_every_few_minutes():
    now = [0.0]
    buf = io.StringIO()
    trials = [{"run_id": "sw-01-s0", "label": "resnet20", "seed": 0}, {"run_id": "sw-02-s0", "label": "resnet32", "seed": 0}]
    log = PlainTrialLog("sw", trials, buf, table_every_s=300, clock=lambda: now[0])
    log({"kind": "cluster", "pending": 2, "concurrent": 1})
    log({"kind": "trial", "run_id": "sw-01-s0", "status": "running"})
    log({"kind": "trial", "run_id": "sw-01-s0", "status": "running", "epoch": 1, "loss": 2.0})  # no change: no line
    now[0] = 301.0
    log({"kind": "trial", "run_id": "sw-01-s0", "status": "finished", "epoch": 2, "top1_err": 12.5, "loss": 1.5})
    log({"kind": "trial", "run_id": "unknown", "status": "running"})
    lines = _lines(buf)
    assert lines[0].endswith("sweep sw: 2 trials to run, 1 at a time")
    assert lines[1].endswith("trial sw-01-s0 (resnet20, seed 0): running")
    assert lines[2].endswith("trial sw-01-s0 (resnet20, seed 0): finished at epoch 2, test error 12.50%")
    # then the table: a header with counts and one line per trial
    assert lines[3].endswith("sweep sw: 1 finished, 1 pending")
    assert lines[4].split() == ["sw-01-s0", "resnet20", "seed", "0", "finished", "epoch", "2", "iter", "-", "loss", "1.5000", "test_err", "12.50%"]
    assert lines[5].split()[:5] == ["sw-02-s0", "resnet32", "seed", "0", "pending"]
    assert len(lines) == 6  # the table is not repeated before another 300 s


def test_the_tune_callback_pickles_without_the_display_it_feeds():
    # Tune pickles its callbacks into the experiment state when the sweep starts; a display holds
    # a lock and a stream, which do not pickle (this once stopped every remote sweep).
    import ray.cloudpickle as cloudpickle

    from resnet_cluster.sweep.runner import _forward_events

    seen = []
    log = PlainTrialLog("sw", [{"run_id": "sw-01-s0", "label": "r", "seed": 0}], io.StringIO())
    cb = _forward_events(lambda ev: (seen.append(ev), log(ev)))
    copy = cloudpickle.loads(cloudpickle.dumps(cb))
    assert copy.on_event is None and cb.on_event is not None

    class Trial:
        trial_id = "t1"
        config = {"trial": {"run_id": "sw-01-s0", "label": "r", "seed": 0}}

    cb.on_trial_result(0, [], Trial(), {"epoch": 1, "loss": 0.5, "top1_err": 12.0})
    copy.on_trial_result(0, [], Trial(), {"epoch": 1})  # the copy feeds nothing
    assert seen == [{"kind": "trial", "run_id": "sw-01-s0", "row": "r", "seed": 0, "status": "running",
                     "epoch": 2, "loss": 0.5, "top1_err": 12.0}]  # fmt: skip
