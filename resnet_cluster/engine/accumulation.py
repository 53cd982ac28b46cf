"""How one optimizer step is split over the workers a run has now, keeping the recipe exact.

A job is written for N workers (``scaling.workers``, or its ``max``): every optimizer step is
N micro-batches of ``train.batch_size / N`` images, micro-batch ``k`` being what rank ``k``
of an N-worker run trains on (the data side defines it from (seed, epoch) alone, see
``data.loaders``). With W workers:

- ``active`` = the largest divisor d of N with d <= W ranks train; each accumulates
  ``accumulate`` = N / d consecutive micro-batches (slots ``rank * N/d .. rank * N/d + N/d - 1``)
  and the DDP all-reduce runs once, after the last of them (``no_sync`` before it).
- The other W - d ranks are spares: DDP needs every rank of the process group in each
  all-reduce (and in each forward's buffer broadcast), so a spare runs the same number of
  forward/backward passes on slot-group 0's data with a loss weight of 0. A world size that
  does not divide N is thus used at d workers' speed, never with a different recipe.

DDP averages gradients over all W ranks, so a training rank weights each micro-batch's mean
loss by W / N: (1/W) * sum over ranks and micro-batches of (W/N) g_k = (1/N) sum_k g_k, the
gradient of the global batch's mean loss, whatever W is. At W = N this is the plain DDP step.

BatchNorm sees one micro-batch per forward, as on N workers. Its running statistics, which
DDP broadcasts from rank 0 before every forward, are updated on the first micro-batch of each
step only (see :func:`engine.loop.accumulate_step`): on N workers rank 0 updates them from
micro-batch 0 alone, and so does rank 0 here.
"""

from __future__ import annotations

from dataclasses import dataclass


def usable_world_size(n: int, w: int) -> int:
    """The largest divisor of ``n`` that is at most ``w``: the workers that can train exactly."""
    return max(d for d in range(1, min(n, w) + 1) if n % d == 0)


@dataclass(frozen=True)
class StepPlan:
    micro_batches: int  # N: micro-batches per optimizer step, all ranks together
    world_size: int  # W: ranks in the process group
    rank: int
    active: int  # d: ranks that train

    @classmethod
    def for_world(cls, micro_batches: int, world_size: int, rank: int) -> StepPlan:
        if world_size > micro_batches:
            raise ValueError(
                f"{world_size} workers for a recipe of {micro_batches} micro-batches per step: "
                "a run never has more workers than scaling.workers (max)"
            )
        return cls(micro_batches, world_size, rank, usable_world_size(micro_batches, world_size))

    @property
    def accumulate(self) -> int:
        """Micro-batches (forward/backward passes) per optimizer step on every rank."""
        return self.micro_batches // self.active

    @property
    def spare(self) -> bool:
        return self.rank >= self.active

    @property
    def slot_group(self) -> int:
        """Which group of ``accumulate`` consecutive micro-batch slots this rank reads (spares
        read group 0 and weight it 0)."""
        return 0 if self.spare else self.rank

    @property
    def loss_weight(self) -> float:
        """Factor on each micro-batch's mean loss; see the module docstring."""
        return 0.0 if self.spare else self.world_size / self.micro_batches
