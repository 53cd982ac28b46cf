"""Learning-rate schedules, evaluated per iteration.

The schedule is a pure function of (iteration, epoch) plus one piece of state, whether the
warm-up has ended, so it is cheap to checkpoint and identical on every DDP rank as long as the
ranks see the same (all-reduced) training error.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from resnet_cluster.config import JobConfig


@dataclass
class LRSchedule:
    base_lr: float
    policy: str
    milestones: list[int]
    gamma: float
    unit: str  # "iterations" | "epochs": the unit the milestones count in
    warmup_lr: float | None = None
    warmup_until_err: float | None = None  # percent
    warmup_iterations: int | None = None
    warmup_done: bool = True

    @classmethod
    def from_config(cls, cfg: JobConfig) -> LRSchedule:
        s, w = cfg.schedule, cfg.schedule.warmup
        return cls(
            base_lr=cfg.optim.lr,
            policy=s.policy,
            milestones=list(s.milestones),
            gamma=s.gamma,
            unit=cfg.train.unit,
            warmup_lr=w.lr if w else None,
            warmup_until_err=w.until_train_error if w else None,
            warmup_iterations=w.iterations if w else None,
            warmup_done=w is None,
        )

    def lr(self, iteration: int, epoch: int) -> float:
        """The lr for the step that starts at ``iteration`` (0-based) inside ``epoch``."""
        if not self.warmup_done:
            if self.warmup_iterations is not None and iteration >= self.warmup_iterations:
                self.warmup_done = True
            else:
                return float(self.warmup_lr)
        if self.policy == "constant":
            return self.base_lr
        t = iteration if self.unit == "iterations" else epoch
        # divided by gamma^k once t reaches the k-th milestone (k milestones passed)
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, t)

    def observe_train_error(self, err_percent: float) -> None:
        """Called with the all-reduced training error of each log window."""
        if not self.warmup_done and self.warmup_until_err is not None:
            if err_percent < self.warmup_until_err:
                self.warmup_done = True

    def state_dict(self) -> dict:
        return {"warmup_done": self.warmup_done}

    def load_state_dict(self, state: dict) -> None:
        self.warmup_done = bool(state["warmup_done"])
