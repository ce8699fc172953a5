"""Online estimates of the link and the device: alpha, beta, gamma, verify time, acceptance.

Pure bookkeeping, no clocks of its own: the engine reports what it measured. alpha and beta
come from a least-squares fit of send time against batch size over recent non-final sends
(NAV replies include verification and are excluded); gamma is an exponential moving average
of the time to draft one token.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkEstimate:
    alpha: float      # s per batch
    beta: float       # s per token
    gamma: float      # s per drafted token
    verify: float     # s of target compute per NAV round
    acceptance: float
    nav_network: float | None = None   # s: a NAV round trip with a one-token final batch, minus verification

    def drifted_from(self, other: "LinkEstimate", tolerance: float = 0.3) -> bool:
        """Has alpha, beta or gamma moved by more than `tolerance` (relative) since `other`?"""
        def moved(a, b, floor):
            return abs(a - b) > tolerance * max(abs(b), floor)
        return (moved(self.alpha, other.alpha, 1e-3) or moved(self.beta, other.beta, 1e-4)
                or moved(self.gamma, other.gamma, 1e-4))

    def regime(self) -> int | None:
        """A coarse network bucket for per-regime memory: log2 of the NAV round trip in ms (network
        part) for a one-token final batch. Measured every round whatever the policy batches, unlike
        alpha and beta, and normalised to one token so that the thresholds being tuned (which set
        the final batch's size) do not move it. None before the first round. Neighbouring buckets
        count as the same regime (see OnlineAutotuner), so a regime changes only with a 4x change."""
        if self.nav_network is None:
            return None
        return round(math.log2(max(self.nav_network * 1e3, 0.25)))


class LinkProfiler:
    def __init__(self, alpha: float = 0.005, beta: float = 0.0005, gamma: float = 0.002, window: int = 32,
                 smoothing: float = 0.2, acceptance_window: int = 64):
        self._prior = (alpha, beta)
        self._sends: deque[tuple[int, float]] = deque(maxlen=window)
        self._rounds: deque[tuple[int, int]] = deque(maxlen=acceptance_window)
        self._navs: deque[tuple[int, float]] = deque(maxlen=16)
        self.gamma = gamma
        self.verify = 0.005
        self._smoothing = smoothing

    # -- observations ---------------------------------------------------------------
    def observe_send(self, tokens: int, seconds: float) -> None:
        self._sends.append((tokens, seconds))

    def observe_draft(self, seconds_per_token: float) -> None:
        self.gamma += self._smoothing * (seconds_per_token - self.gamma)

    def observe_round(self, drafted: int, accepted: int, verify_seconds: float) -> None:
        self.verify += self._smoothing * (verify_seconds - self.verify)
        self._rounds.append((drafted, accepted))

    def observe_nav(self, network_seconds: float, final_tokens: int = 1) -> None:
        """A NAV round trip minus the verifier's compute: latency plus sending the final batch of
        `final_tokens` draft tokens."""
        self._navs.append((max(1, final_tokens), max(0.0, network_seconds)))

    def nav_network(self) -> float | None:
        """Seconds a NAV round trip with a one-token final batch spends on the network: a least-squares
        line through the recent (final batch size, time) pairs, read at one token; with one batch size
        only, its median less the profiled per-token upload time of the extra tokens."""
        navs = tuple(self._navs)      # a snapshot: round streams append from their own threads
        if not navs:
            return None
        xs = [float(n) for n, _ in navs]
        ys = [t for _, t in navs]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx == 0:
            one = statistics.median(ys) - (mx - 1) * self.alpha_beta()[1]
        else:
            slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx)
            one = my + slope * (1 - mx)
        return one if one > 0 else min(ys)

    @property
    def acceptance(self) -> float:
        """Accepted / drafted over the last rounds (a window: one round says little)."""
        rounds = tuple(self._rounds)
        drafted = sum(d for d, _ in rounds)
        return sum(a for _, a in rounds) / drafted if drafted else 0.5

    # -- estimates ------------------------------------------------------------------
    def alpha_beta(self) -> tuple[float, float]:
        sends = tuple(self._sends)    # a snapshot: the uploader's threads append while the engine reads
        if not sends:
            return self._prior
        xs = [float(n) for n, _ in sends]
        ys = [t for _, t in sends]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        if sxx == 0:   # one batch size only: keep the prior slope, fit the intercept
            beta = self._prior[1]
            return max(0.0, my - beta * mx), beta
        beta = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx)
        return max(0.0, my - beta * mx), beta

    def estimate(self) -> LinkEstimate:
        alpha, beta = self.alpha_beta()
        return LinkEstimate(alpha, beta, self.gamma, self.verify, self.acceptance, self.nav_network())
