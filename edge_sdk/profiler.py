"""Online estimates of the link and the device: alpha, beta, gamma, verify time, acceptance.

Pure bookkeeping, no clocks of its own: the engine reports what it measured. alpha and beta
come from a least-squares fit of send time against batch size over recent non-final sends
(NAV replies include verification and are excluded); gamma is an exponential moving average
of the time to draft one token. The NAV round trip is fitted against the size of the final batch
(its intercept: the round trip with nothing to upload; its slope: the upload time of a final-batch
token) and verification time against the draft length, for the round controller.

Every fit weighs a sample by ``recency ** age`` (newest first): a link that changes is followed
within a few rounds, not after a window's worth of them.
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
    nav_latency: float | None = None   # s: the NAV line at zero final-batch tokens (the median of recent rounds
                                       # that uploaded no draft token: target-alone and guess-only rounds)
    nav_per_token: float | None = None  # s: what each final-batch token adds to a NAV round trip
    nav_empty: float | None = None     # s: the same rounds' recency-weighted mean (follows a change sooner)
    verify_fixed: float | None = None  # s: target compute of a NAV round, its fixed part ...
    verify_per_token: float = 0.0      # ... and per drafted token
    uplink_per_token: float | None = None   # s per token of non-final batches, when sizes varied enough to fit
    upload_last: float | None = None   # s per token: the last time recent uploads said (kept while none do)
    lookup_acceptance: float | None = None   # how often a looked-up guess was the target's token, recently

    @property
    def upload_per_token(self) -> float:
        """The best estimate of a drafted token's uplink time: the larger of what non-final sends and
        final batches say now (each can lag: sends of one size only keep an old slope); while neither says
        anything (nothing drafted went up lately, or a jump cleared them), the last thing they said; the
        prior beta only before any upload was measured. Falling back to the prior instead made a
        controller that had stopped uploading (a 0.29 MB token on a 100 Mbps uplink: 23 ms) price a token
        at 0.5 ms again, draft fat rounds, queue seconds of uploads and go offline."""
        known = [v for v in (self.uplink_per_token, self.nav_per_token) if v is not None]
        if known:
            return max(known)
        return self.upload_last if self.upload_last is not None else self.beta

    @property
    def batch_cost(self) -> float:
        """What one more batch costs the round's pipeline: its start-up on the link, and the target
        pass the verifier runs on it as it arrives (eager forward: one pass per batch, on a worker the
        round's later batches queue behind). The DP plans with this, not with alpha alone: on a fast
        link alpha is ~0 and a batch per token would queue a pass per token at the cloud."""
        return self.alpha + (self.verify_fixed if self.verify_fixed is not None else self.verify)

    def verify_time(self, drafted: int) -> float:
        """Expected target compute of a NAV round over `drafted` tokens."""
        if self.verify_fixed is None:
            return self.verify
        return self.verify_fixed + self.verify_per_token * drafted

    def drifted_from(self, other: "LinkEstimate", tolerance: float = 0.3) -> bool:
        """Has a batch's cost, beta or gamma moved by more than `tolerance` (relative) since `other`?"""
        def moved(a, b, floor):
            return abs(a - b) > tolerance * max(abs(b), floor)
        return (moved(self.batch_cost, other.batch_cost, 1e-3) or moved(self.beta, other.beta, 1e-4)
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


def weighted_line(points, recency: float, min_spread: float = 0.1) -> tuple[float, float | None, float]:
    """(intercept, slope, weighted mean x) of a least-squares line through (x, y) pairs, oldest first,
    each weighted ``recency ** age``. The slope is None when the xs' weighted variance is below
    `min_spread` (nothing recent to fit it by)."""
    n = len(points)
    weights = [recency ** (n - 1 - i) for i in range(n)]
    total = sum(weights)
    mx = sum(w * x for w, (x, _) in zip(weights, points)) / total
    my = sum(w * y for w, (_, y) in zip(weights, points)) / total
    sxx = sum(w * (x - mx) ** 2 for w, (x, _) in zip(weights, points))
    if sxx < min_spread * total:     # the recent xs hardly vary: a slope would rest on old samples
        return my, None, mx
    slope = sum(w * (x - mx) * (y - my) for w, (x, y) in zip(weights, points)) / sxx
    return my - slope * mx, slope, mx


def weighted_median(pairs) -> float:
    """The value at which half the total weight of (value, weight) pairs lies on either side (the lower
    of the two middle values at an exact tie)."""
    ordered = sorted(pairs)
    half, acc = sum(w for _, w in ordered) / 2, 0.0
    for value, weight in ordered:
        acc += weight
        if acc >= half:
            return value
    return ordered[-1][0]


def _jumped(predicted: float | None, observed: float, relative: float = 0.4, floor: float = 0.005) -> bool:
    """A sample this far from the fit means the link changed: start the fit again from it (a slow
    sample among fast ones, or a fast one among slow, after a bandwidth step or a fade)."""
    if predicted is None:
        return False
    gap = abs(observed - predicted)
    return gap > floor and gap > relative * min(predicted, observed)


class LinkProfiler:
    def __init__(self, alpha: float = 0.001, beta: float = 0.0005, gamma: float = 0.002, window: int = 32,
                 smoothing: float = 0.2, acceptance_window: int = 64, recency: float = 0.8,
                 draft_smoothing: float = 0.05, verify_recency: float = 0.95):
        self._prior = (alpha, beta)
        self._sends: deque[tuple[int, float]] = deque(maxlen=window)
        self._rounds: deque[tuple[int, int]] = deque(maxlen=acceptance_window)
        self._navs: deque[tuple[int, float]] = deque(maxlen=32)        # (final batch tokens, network s)
        self._baseline: float | None = None     # the round trip without an upload, kept across an upload's jump
        self._suspect: dict[bool, float] = {}   # a slow round off the line, per kind (drafted or not), awaiting a second
        self._verifies: deque[tuple[int, float]] = deque(maxlen=32)
        self.gamma = gamma
        self.lookup_acceptance: float | None = None   # set by the engine from its LookupGuesser
        self.verify = 0.005
        self._smoothing = smoothing
        self.recency = recency
        # The device's and the target's own speeds move slowly (a clock, a load), and one drafted token
        # or one pass is a noisy sample of them: they are averaged over more samples than the link.
        self._draft_smoothing, self._verify_recency = draft_smoothing, verify_recency
        self._drafted = 0
        self._rounds_since_send = 0
        # estimate() runs several times a round, on the engine's thread, between drafted tokens: its fits
        # (medians, weighted lines) are kept until a send, a round or a NAV changes what they are fitted to.
        self._version = 0
        self._fitted: tuple[int, tuple] | None = None
        self._upload_last: float | None = None       # LinkEstimate.upload_last

    # -- observations ---------------------------------------------------------------
    def observe_send(self, tokens: int, seconds: float) -> None:
        alpha, beta, fitted = self._send_line()
        same = all(k == tokens for k, _ in self._sends)
        if self._sends and (fitted or same) and _jumped(alpha + beta * tokens, seconds):
            self._sends.clear()
        self._sends.append((tokens, seconds))
        self._rounds_since_send = 0
        self._version += 1

    def observe_draft(self, seconds_per_token: float) -> None:
        # The first measurement replaces the prior outright: a prior 10x off would otherwise take
        # a dozen tokens to forget, and a controller that stops drafting stops measuring it.
        if not self._drafted:
            self.gamma = seconds_per_token
        self._drafted += 1
        self.gamma += self._draft_smoothing * (seconds_per_token - self.gamma)

    def observe_round(self, drafted: int, accepted: int, verify_seconds: float) -> None:
        self.verify += self._smoothing * (verify_seconds - self.verify)
        self._rounds.append((drafted, accepted))
        self._rounds_since_send += 1
        self._verifies.append((drafted, verify_seconds))
        self._version += 1

    def observe_nav(self, network_seconds: float, final_tokens: int = 1) -> None:
        """A NAV round trip minus the verifier's compute: latency plus sending the final batch of
        `final_tokens` draft tokens (0: an empty draft -- the target decoding alone, or a round that
        checks a guess alone)."""
        n, t = max(0, final_tokens), max(0.0, network_seconds)
        line = self.nav_line()
        predicted = None if line is None or (n > 0 and line[1] is None) else line[0] + (line[1] or 0.0) * n
        kind = n > 0
        suspect = self._suspect.pop(kind, None)
        if predicted is not None and _jumped(predicted, t):
            if t > predicted and suspect is None:
                # Slower than the line: a round trip only ever meets extra delays (a busy moment, a queue),
                # so one slow round is a suspect until the next of its kind is slow too. A faster one is
                # news at once.
                self._suspect[kind] = t - predicted
            else:
                # The link changed: fit it again from here. Rounds that uploaded nothing moved: the
                # latency did, forget everything; rounds that did: their upload did, keep the rounds that
                # did not (the round trip without an upload).
                confirmed = suspect is not None and t > predicted      # two slow in a row: the suspect is news
                previous = [(k, y) for k, y in self._navs if (k > 0) == kind][-1:] if confirmed else []
                kept = [(k, y) for k, y in self._navs if k == 0] if kind else []
                self._baseline = line[0] if kind else None
                self._navs.clear()
                self._navs.extend(kept + previous)
                self._sends.clear()            # the uplink's per-token time is to be measured again too
        self._navs.append((n, t))
        self._version += 1

    def nav_empty(self) -> float | None:
        """The recent round trip of a round without a draft (recency-weighted mean), None before any."""
        empty = [t for n, t in tuple(self._navs) if n == 0]
        if not empty:
            return None
        weights = [self.recency ** (len(empty) - 1 - i) for i in range(len(empty))]
        return sum(w * t for w, t in zip(weights, empty)) / sum(weights)

    def nav_line(self) -> tuple[float, float | None] | None:
        """(round trip at zero tokens, seconds per final-batch token) of the recent NAVs, or None before
        any. Robust rather than least squares: the base is the median of the recent rounds that uploaded
        no draft token, the slope the median of what each recent drafted round took beyond it per token
        (weighted by its tokens and by recency, 0.8 a round) -- a round that queued behind another's upload,
        or met a slow moment, moves neither. The slope is None while no drafted round (or no base) says
        anything."""
        navs = tuple(self._navs)      # a snapshot: round streams append from their own threads
        if not navs:
            return None
        empty = [t for k, t in navs if k == 0][-8:]
        drafted = [(k, t) for k, t in navs if k > 0][-9:]
        base = statistics.median(empty) if empty else self._baseline
        if base is None and len({k for k, _ in drafted}) >= 2:
            # Drafted rounds only, of several sizes: the median of the pairwise slopes (Theil-Sen).
            slope = max(0.0, statistics.median((t2 - t1) / (k2 - k1) for i, (k1, t1) in enumerate(drafted)
                                               for k2, t2 in drafted[i + 1:] if k2 != k1))
            return max(0.0, statistics.median(t - slope * k for k, t in drafted)), slope
        if base is not None and drafted:
            # Each round's slope weighted by the tokens it sent (a one-token round's slope is its whole
            # noise: a 3 ms hiccup reads as 3 ms a token, an eight-token round's an eighth of it) and by
            # recency: a plain median of nine rounds took five to move after a 30% bandwidth step (too
            # small a step for a jump), the weighted one takes about three. One odd round among rounds of
            # its size moves nothing (a round much larger than the rest weighs as several of them).
            slopes = [((t - base) / k, k * self.recency ** (len(drafted) - 1 - i)) for i, (k, t) in enumerate(drafted)]
            return base, max(0.0, weighted_median(slopes))
        if base is not None:
            return base, None
        mx = sum(k for k, _ in drafted) / len(drafted)
        return max(0.0, statistics.median(t for _, t in drafted) - mx * self.alpha_beta()[1]), None

    def nav_network(self) -> float | None:
        """Seconds a NAV round trip with a one-token final batch spends on the network: the NAV line
        read at one token (the profiled per-token upload time where the line has no slope)."""
        line = self.nav_line()
        if line is None:
            return None
        latency, slope = line
        return latency + (slope if slope is not None else self.alpha_beta()[1])

    def verify_line(self) -> tuple[float, float] | None:
        """(fixed, per drafted token) seconds of target compute per NAV round, or None before any."""
        rounds = tuple(self._verifies)
        if not rounds:
            return None
        intercept, slope, _ = weighted_line(rounds, self._verify_recency)
        if slope is None:
            return intercept, 0.0
        slope = max(0.0, slope)
        return max(0.0, intercept), slope

    @property
    def acceptance(self) -> float:
        """Accepted / drafted over the last rounds (a window: one round says little)."""
        rounds = tuple(self._rounds)
        drafted = sum(d for d, _ in rounds)
        return sum(a for _, a in rounds) / drafted if drafted else 0.5

    # -- estimates ------------------------------------------------------------------
    def alpha_beta(self) -> tuple[float, float]:
        return self._send_line()[:2]

    def _send_line(self) -> tuple[float, float, bool]:
        """(alpha, beta, whether beta was fitted) from the recent non-final sends."""
        sends = tuple(self._sends)    # a snapshot: the uploader's threads append while the engine reads
        if not sends:
            return (*self._prior, False)
        intercept, slope, mx = weighted_line(sends, self.recency)
        if slope is None:   # one batch size only: keep the prior slope, fit the intercept
            beta = self._prior[1]
            return max(0.0, intercept - beta * mx), beta, False
        beta = max(0.0, slope)
        return max(0.0, intercept), beta, True

    def estimate(self) -> LinkEstimate:
        version, kept = self._version, self._fitted   # the version read first: a later observation refits
        if kept is None or kept[0] != version:
            alpha, beta, fitted = self._send_line()
            line, verify = self.nav_line(), self.verify_line()
            uplink = beta if fitted and self._rounds_since_send <= 3 else None
            fresh = [v for v in (uplink, line[1] if line else None) if v is not None]
            if fresh:
                self._upload_last = max(fresh)
            network = None if line is None else line[0] + (line[1] if line[1] is not None else beta)   # nav_network()
            kept = self._fitted = (version, (alpha, beta, self.verify, self.acceptance, network, dict(
                nav_latency=line[0] if line else None, nav_per_token=line[1] if line else None,
                nav_empty=self.nav_empty(), verify_fixed=verify[0] if verify else None,
                verify_per_token=verify[1] if verify else 0.0, uplink_per_token=uplink,
                upload_last=self._upload_last)))
        alpha, beta, verify, acceptance, network, rest = kept[1]
        return LinkEstimate(alpha, beta, self.gamma, verify, acceptance, network, **rest,
                            lookup_acceptance=self.lookup_acceptance)
