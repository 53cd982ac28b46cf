"""Learning-rate schedules, evaluated per iteration.

The lr is a function of (iteration, epoch) plus a little state: whether a constant warm-up has
ended, and the plateau policy's best error, patience count and number of drops. Every input
that moves the state (the training error of a log window, the test error of an evaluation) is
all-reduced before the schedule sees it, so every DDP rank computes the same lr without talking.
The state goes into checkpoints through :meth:`LRSchedule.state_dict`.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from resnet_cluster.config import JobConfig


def scaled_lr(cfg: JobConfig) -> float:
    """``optim.lr``, times ``train.batch_size / optim.reference_batch`` under the linear scaling
    rule (Goyal et al. 2017: lr 0.1 per 256 images, so 0.4 at batch 1024)."""
    o = cfg.optim
    return o.lr * cfg.train.batch_size / o.reference_batch if o.scale_lr_with_batch else o.lr


@dataclass
class LRSchedule:
    base_lr: float
    policy: str  # multistep | constant | plateau | cosine
    milestones: list[int]
    gamma: float
    unit: str  # "iterations" | "epochs": the unit the milestones count in
    warmup_policy: str = "constant"
    warmup_lr: float | None = None  # constant: the lr held; linear: the lr the ramp starts at
    warmup_until_err: float | None = None  # percent
    warmup_iterations: int | None = None
    warmup_done: bool = True
    total_iterations: int | None = None  # cosine only
    patience: int = 2
    threshold: float = 0.1  # percentage points
    min_lr: float = 0.0
    # plateau state
    best_err: float | None = None
    bad_evals: int = 0
    drops: int = 0

    @classmethod
    def from_config(cls, cfg: JobConfig, iters_per_epoch: int | None = None) -> LRSchedule:
        """``iters_per_epoch`` turns epochs into iterations; it is needed for a cosine schedule
        and a warm-up given in epochs, and for a training length given in epochs with cosine."""
        s, w = cfg.schedule, cfg.schedule.warmup
        base = scaled_lr(cfg)

        def to_iters(epochs: float | None) -> int | None:
            if epochs is None:
                return None
            if iters_per_epoch is None:
                raise ValueError("LRSchedule.from_config needs iters_per_epoch for lengths in epochs")
            return max(1, round(epochs * iters_per_epoch))

        warm_iters = None
        warm_lr = None
        if w is not None:
            warm_iters = w.iterations if w.iterations is not None else to_iters(w.epochs)
            warm_lr = w.lr
            if w.policy == "linear" and warm_lr is None:
                warm_lr = cfg.optim.lr if cfg.optim.scale_lr_with_batch else 0.0
        total = None
        if s.policy == "cosine":
            total = cfg.train.iterations if cfg.train.iterations is not None else to_iters(cfg.train.epochs)
        return cls(
            base_lr=base,
            policy=s.policy,
            milestones=list(s.milestones),
            gamma=s.gamma,
            unit=cfg.train.unit,
            warmup_policy=w.policy if w else "constant",
            warmup_lr=warm_lr,
            warmup_until_err=w.until_train_error if w else None,
            warmup_iterations=warm_iters,
            warmup_done=w is None,
            total_iterations=total,
            patience=s.patience,
            threshold=s.threshold,
            min_lr=s.min_lr,
        )

    # ------------------------------------------------------------------ the lr
    def _after_warmup(self, iteration: int, epoch: int) -> float:
        if self.policy == "constant":
            return self.base_lr
        if self.policy == "plateau":
            return max(self.base_lr * self.gamma**self.drops, self.min_lr)
        if self.policy == "cosine":
            # Cosine from base_lr down to min_lr between the end of a linear warm-up and the
            # last iteration (Loshchilov & Hutter 2017 without restarts).
            start = self.warmup_iterations if self.warmup_policy == "linear" and self.warmup_iterations else 0
            span = max(1, (self.total_iterations or 1) - start)
            frac = min(max(iteration - start, 0) / span, 1.0)
            return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * frac))
        t = iteration if self.unit == "iterations" else epoch
        # divided by gamma^k once t reaches the k-th milestone (k milestones passed)
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, t)

    def lr(self, iteration: int, epoch: int) -> float:
        """The lr for the step that starts at ``iteration`` (0-based) inside ``epoch``."""
        if not self.warmup_done:
            if self.warmup_iterations is not None and iteration >= self.warmup_iterations:
                self.warmup_done = True
            elif self.warmup_policy == "linear":
                # Goyal et al.: from warmup_lr at iteration 0 up to the schedule's lr at the end.
                target = self._after_warmup(self.warmup_iterations, epoch)
                frac = iteration / self.warmup_iterations
                return float(self.warmup_lr + (target - self.warmup_lr) * frac)
            else:
                return float(self.warmup_lr)
        return self._after_warmup(iteration, epoch)

    # ------------------------------------------------------------------ observations
    def observe_train_error(self, err_percent: float) -> None:
        """Called with the all-reduced training error of each log window."""
        if not self.warmup_done and self.warmup_until_err is not None:
            if err_percent < self.warmup_until_err:
                self.warmup_done = True

    def observe_test_error(self, err_percent: float) -> bool:
        """Called with the all-reduced top-1 test error of each evaluation. With the plateau
        policy, returns True when this evaluation divides the lr by 1/gamma: the error has not
        improved on the best by ``threshold`` points for more than ``patience`` evaluations."""
        if self.policy != "plateau" or not self.warmup_done:
            return False
        if self.best_err is None or err_percent < self.best_err - self.threshold:
            self.best_err, self.bad_evals = err_percent, 0
            return False
        self.bad_evals += 1
        # (1 + 1e-9): 0.1 * 0.1**2 is 0.0010000000000000002 in floats, already at min_lr 0.001
        at_floor = self.base_lr * self.gamma**self.drops <= self.min_lr * (1 + 1e-9)
        if self.bad_evals > self.patience and not at_floor:
            self.drops += 1
            self.bad_evals = 0
            return True
        return False

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        state: dict = {"warmup_done": self.warmup_done}
        if self.policy == "plateau":
            state.update(best_err=self.best_err, bad_evals=self.bad_evals, drops=self.drops)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.warmup_done = bool(state["warmup_done"])
        self.best_err = state.get("best_err")
        self.bad_evals = int(state.get("bad_evals", 0))
        self.drops = int(state.get("drops", 0))
