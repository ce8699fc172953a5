"""When to stop drafting and ask the cloud to verify: the NAV triggers, pure objects with no I/O.

Each trigger sees the tokens drafted since the last NAV (with their confidences) and is told
how each round ended. ``DualThreshold`` is PipeSD's; the others are the paper's baselines. A
round's length cap (the policy's ``max_draft``, the verifier's limit, the token budget) is the
engine's, not the trigger's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

from .drafter import DraftToken


# Starting thresholds (R1 on C_n, R2 on P(d_n)) before online tuning, chosen for the embedded pair's
# under-confident draft (docs/pipeline.md); the autotuner moves them per deployment.
DEFAULT_R1, DEFAULT_R2 = 0.05, 0.2


class Trigger(Protocol):
    def should_verify(self, draft: Sequence[DraftToken]) -> bool:
        """After each drafted token: verify now?"""

    def on_round(self, drafted: int, accepted: int, draft: Sequence[DraftToken]) -> None:
        """Feedback after each NAV round (adaptive triggers update here)."""


def cumulative_confidence(draft: Sequence[DraftToken]) -> float:
    """C_n: the product of the draft's per-token confidences since the last NAV."""
    return math.prod(d.confidence for d in draft)


@dataclass
class FixedLength:
    """Vanilla: verify every k tokens."""

    k: int = 4

    def should_verify(self, draft) -> bool:
        return len(draft) >= self.k

    def on_round(self, drafted, accepted, draft) -> None:
        pass


@dataclass
class LastTokenConfidence:
    """HSL: verify when the newest token's confidence P(d_n) drops below R2."""

    r2: float = 0.7

    def should_verify(self, draft) -> bool:
        return draft[-1].confidence < self.r2

    def on_round(self, drafted, accepted, draft) -> None:
        pass


@dataclass
class DualThreshold:
    """PipeSD: verify when C_n < R1 or P(d_n) < R2 (either threshold may be disabled with None)."""

    r1: float | None = DEFAULT_R1
    r2: float | None = DEFAULT_R2

    def should_verify(self, draft) -> bool:
        if self.r2 is not None and draft[-1].confidence < self.r2:
            return True
        return self.r1 is not None and cumulative_confidence(draft) < self.r1

    def on_round(self, drafted, accepted, draft) -> None:
        pass


@dataclass
class AdaptiveCumulative:
    """EdgeLLM: verify when C_n < a threshold that adapts to how rounds end.

    After a fully accepted round the threshold is multiplied by 0.95 (draft longer next
    time); after a partial acceptance of a out of n it is divided by C^((n - a) / n) (the
    confidence mass that was wrong), capped at `cap`.
    """

    threshold: float = 0.5
    floor: float = 0.01
    cap: float = 0.95

    def should_verify(self, draft) -> bool:
        return cumulative_confidence(draft) < self.threshold

    def on_round(self, drafted, accepted, draft) -> None:
        if drafted == 0:
            return
        if accepted >= drafted:
            self.threshold = max(self.floor, self.threshold * 0.95)
        else:
            c = max(cumulative_confidence(draft[:drafted]), 1e-12)
            self.threshold = min(self.cap, self.threshold / c ** ((drafted - accepted) / drafted))
