"""Token-batch scheduling: which drafted tokens go up together, so that drafting and uploading overlap.

Pure functions and plain objects, no I/O (docs/design.md §3). The link is a serial resource: a
batch of n tokens occupies it for alpha + beta * n, and it can start once its last token has
been drafted and the previous batch has gone. With token i ready at r_i = sum(gamma[:i]),

    F(0) = 0,   F(i) = min over 1 <= j <= i of  max(F(j - 1), r_i) + alpha + beta * (i - j + 1)

is the earliest time the first i tokens can all have arrived when the last batch holds
tokens j..i; backtracking the argmins gives the batch sizes (e.g. [1, 1, 4, 14]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Protocol, Sequence

from .profiler import LinkEstimate


def plan_batches(n: int, alpha: float, beta: float, gamma: float | Sequence[float]) -> list[int]:
    """Batch sizes (summing to n) that minimise the arrival time of the n-th token. O(n^2)."""
    if n <= 0:
        return []
    gammas = [float(gamma)] * n if isinstance(gamma, (int, float)) else [float(g) for g in gamma]
    if len(gammas) != n:
        raise ValueError(f"need {n} per-token draft times, got {len(gammas)}")
    ready = list(accumulate(gammas))
    best = [0.0] + [float("inf")] * n
    start = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(1, i + 1):
            t = max(best[j - 1], ready[i - 1]) + alpha + beta * (i - j + 1)
            if t < best[i]:
                best[i], start[i] = t, j
    sizes, i = [], n
    while i > 0:
        sizes.append(i - start[i] + 1)
        i = start[i] - 1
    return sizes[::-1]


def arrival_times(n_max: int, alpha: float, beta: float, gamma: float, batching: str = "dp") -> list[float]:
    """F(0..n_max): when the i-th drafted token can have reached the cloud, for every i at once, as
    `batching` sends them: "dp" (the DP's F(i), each i batched at its best), "per_token" or
    "at_trigger" (all i in one batch). The round controller prices a round's uploads with it."""
    if batching == "at_trigger":
        return [0.0] + [i * gamma + alpha + beta * i for i in range(1, n_max + 1)]
    best = [0.0] * (n_max + 1)
    for i in range(1, n_max + 1):
        ready = i * gamma
        if batching == "per_token":
            best[i] = max(best[i - 1], ready) + alpha + beta
            continue
        # The last batch holds tokens j..i; with one gamma the best j is the first whose predecessor
        # batch is done by the time token i is ready (later j only add start-ups), or the one before it.
        cands = []
        for j in range(i, 0, -1):
            cands.append(max(best[j - 1], ready) + alpha + beta * (i - j + 1))
            if best[j - 1] <= ready:
                break
        best[i] = min(cands)
    return best


def arrival_time(sizes: Sequence[int], alpha: float, beta: float, gamma: float | Sequence[float]) -> float:
    """When the last token of a schedule reaches the cloud (the quantity plan_batches minimises)."""
    n = sum(sizes)
    gammas = [float(gamma)] * n if isinstance(gamma, (int, float)) else list(gamma)
    ready = list(accumulate(gammas))
    t, end = 0.0, 0
    for size in sizes:
        end += size
        t = max(t, ready[end - 1]) + alpha + beta * size
    return t


@dataclass
class BatchPlan:
    """A planned window, repeated when the draft runs past it; tells the uploader where batches end."""

    sizes: list[int]

    def boundaries(self) -> set[int]:
        return set(accumulate(self.sizes))

    def ends_batch(self, drafted: int) -> bool:
        """Does the `drafted`-th token of this round close a planned batch? A plan of one batch says
        that batching does not pay on this link (each batch costs more than its upload overlaps): the
        whole round goes up at the trigger, however long it runs."""
        window = sum(self.sizes)
        return len(self.sizes) > 1 and ((drafted - 1) % window) + 1 in self.boundaries()


class WindowEstimator:
    """N-hat: the predicted draft length per round. Starts at 20, then a moving average of recent rounds."""

    def __init__(self, initial: int = 20, history: int = 8, minimum: int = 1, maximum: int = 64):
        self.initial, self.history, self.minimum, self.maximum = initial, history, minimum, maximum
        self.lengths: list[int] = []

    def observe(self, drafted: int) -> None:
        self.lengths = (self.lengths + [drafted])[-self.history:]

    @property
    def value(self) -> int:
        if not self.lengths:
            return self.initial
        return max(self.minimum, min(self.maximum, round(sum(self.lengths) / len(self.lengths))))


# -- upload schedules: what a policy answers when asked "does this token close a batch?" -------------
class UploadSchedule(Protocol):
    def plan(self, link: LinkEstimate) -> None:
        """Before a round: (re)plan from the link as profiled now."""

    def closes_batch(self, drafted: int) -> bool:
        """Does the `drafted`-th token of the round close a (non-final) batch?"""

    def observe(self, drafted: int) -> None:
        """After a round: it drafted this many tokens."""


class AtTrigger:
    """The whole draft goes up in the final batch, when the trigger fires (the paper's baselines)."""

    def plan(self, link: LinkEstimate) -> None:
        pass

    def closes_batch(self, drafted: int) -> bool:
        return False

    def observe(self, drafted: int) -> None:
        pass


class PerToken(AtTrigger):
    """Every token goes up as soon as it is drafted (the ``pipesd_per_token`` ablation)."""

    def closes_batch(self, drafted: int) -> bool:
        return True


@dataclass
class DPSchedule:
    """PipeSD's token batches: the DP plan over the predicted window N-hat, repeated past it, re-planned
    when N-hat or the link (alpha, beta, gamma) drifts."""

    window: WindowEstimator = field(default_factory=lambda: WindowEstimator())
    _plan: BatchPlan | None = field(default=None, init=False, repr=False)
    _basis: tuple[LinkEstimate, int] | None = field(default=None, init=False, repr=False)

    def plan(self, link: LinkEstimate) -> None:
        n = self.window.value
        if self._basis is None or self._basis[1] != n or link.drifted_from(self._basis[0]):
            self._plan = BatchPlan(plan_batches(n, link.batch_cost, link.beta, link.gamma))
            self._basis = (link, n)

    @property
    def sizes(self) -> list[int]:
        """The batch sizes planned now (empty before the first round)."""
        return list(self._plan.sizes) if self._plan else []

    def closes_batch(self, drafted: int) -> bool:
        return self._plan is not None and self._plan.ends_batch(drafted)

    def observe(self, drafted: int) -> None:
        self.window.observe(drafted)
