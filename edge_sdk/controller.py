"""PipeSD's round controller: draft on, or verify now, priced by the link, the device and the cloud.

A round that drafts n tokens commits, in expectation, 1 + S_1 + ... + S_n tokens, where S_i is the
probability that the first i draft tokens are all accepted, and costs C(n): seconds of wall time
(``latency``), seconds of target compute (``cloud_cost``) or device joules (``edge_energy``). The
controller maximises committed tokens per unit of cost over a whole generation. By renewal-reward
(Dinkelbach), that is: at the best rate rho, a round should stop at the n that maximises
E[tokens] - rho * E[cost]. After the n-th drafted token, drafting on to n + k adds S_n * G(k)
tokens (G(k) = a + a^2 + ... + a^k, with a the acceptance of a draft token not yet seen) and
C(n + k) - C(n) of cost, so it pays exactly when

    S_n  >  S*(n) = min over k of  rho * (C(n + k) - C(n)) / G(k)

-- a threshold on the calibrated survival S_n, one per position, computed once per round from the
profiler's live costs. That is the paper's dual threshold made calibrated and priced: S_n is C_n
with each confidence replaced by the acceptance model's probability, R1 = S*(n) follows the link,
and R2 = S*(1) is the per-token acceptance below which a round's first token ends it. When no
draft length beats an empty one (rho is reached at n = 0), the round drafts nothing and the
target decodes alone; the controller keeps checking, every round, whether drafting pays again.

What the cost model sees (``RoundCosts``): gamma per drafted token; the arrival of the round's last
token at the cloud as the upload schedule batches it (the DP's F(n), or one batch at the trigger);
the NAV round trip of a drafted round (its line in the final batch's size) and of an empty one
(measured apart: another request path); verification time as a line in the draft length; and,
for a proactive policy, the drafting that a fully accepted round hides behind its NAV. The
acceptance model (``AcceptanceModel``) is a logistic regression on the draft's own signals, fitted
online from NAV verdicts and scored prequentially (each prediction before it is learnt from), so
its calibration -- Brier score, reliability bins -- is measured on the run itself.

Plain objects, no I/O, no clocks: testable in microseconds.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .drafter import DraftToken
from .errors import ConfigError
from .profiler import LinkEstimate
from .scheduling import AtTrigger, PerToken, UploadSchedule, arrival_times

OBJECTIVES = ("latency", "cloud_cost", "edge_energy")


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z > -60 else 0.0


class AcceptanceModel:
    """P(the n-th draft token is accepted | the n - 1 before it were): a logistic regression on
    logit(P(d_n)) and log(n), fitted online to NAV verdicts.

    Its prior is "the draft is calibrated" (P = the draft's own confidence), held by a ridge penalty
    that data outweigh after a few hundred tokens; the fit (a few Newton steps on the last `window`
    observed tokens) runs once per verdict. Only tokens up to the first rejection are observed: the
    ones after it say nothing about acceptance given a surviving prefix.
    """

    PRIOR = (0.0, 1.0, 0.0)

    def __init__(self, window: int = 2048, ridge: float = 4.0, bins: int = 10):
        self.w = np.array(self.PRIOR)
        self.bias = 0.0                        # a correction the tuner may add to every logit
        self.ridge, self.window = ridge, window
        self._x: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._y: deque[float] = deque(maxlen=window)
        self.calibration = Calibration(bins)

    @staticmethod
    def features(confidence: float, position: int) -> tuple[float, float, float]:
        return 1.0, _logit(confidence), math.log(position)

    def predict(self, confidence: float, position: int) -> float:
        w0, w1, w2 = self._weights
        return _sigmoid(w0 + w1 * _logit(confidence) + w2 * math.log(position) + self.bias)

    @property
    def w(self) -> np.ndarray:
        return np.array(self._weights)

    @w.setter
    def w(self, value) -> None:
        self._weights = tuple(float(v) for v in value)      # plain floats: predict runs per drafted token

    def observe(self, draft: Sequence[DraftToken], accepted: int) -> None:
        """A verdict: the first `accepted` tokens of `draft` were kept, the next (if any) rejected."""
        for i, d in enumerate(draft[: accepted + 1]):
            y = 1.0 if i < accepted else 0.0
            self.calibration.add(self.predict(d.confidence, i + 1), d.confidence, y)
            self._x.append(self.features(d.confidence, i + 1))
            self._y.append(y)
        self._fit()

    def _fit(self, steps: int = 3) -> None:
        if not self._y:
            return
        x, y = np.array(self._x), np.array(self._y)
        prior = np.array(self.PRIOR)
        w = self.w.copy()
        for _ in range(steps):             # Newton on the penalised log-likelihood
            p = 1 / (1 + np.exp(-np.clip(x @ w, -30, 30)))
            grad = x.T @ (p - y) + self.ridge * (w - prior)
            hess = (x.T * (p * (1 - p))) @ x + self.ridge * np.eye(3)
            w -= np.linalg.solve(hess, grad)
        self.w = w


@dataclass
class Calibration:
    """Prequential calibration of the acceptance model: every prediction scored before it is learnt.
    Kept as sums, so it costs nothing to keep for a whole run."""

    bins: int = 10
    count: int = 0
    brier_sum: float = 0.0           # the model's (p - y)^2
    raw_brier_sum: float = 0.0       # the draft's own confidence as the prediction
    bin_n: list[int] = field(default_factory=list)
    bin_p: list[float] = field(default_factory=list)
    bin_y: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.bin_n, self.bin_p, self.bin_y = [0] * self.bins, [0.0] * self.bins, [0.0] * self.bins

    def add(self, p: float, confidence: float, y: float) -> None:
        self.count += 1
        self.brier_sum += (p - y) ** 2
        self.raw_brier_sum += (confidence - y) ** 2
        b = min(self.bins - 1, int(p * self.bins))
        self.bin_n[b] += 1
        self.bin_p[b] += p
        self.bin_y[b] += y

    @property
    def brier(self) -> float:
        return self.brier_sum / self.count if self.count else math.nan

    @property
    def raw_brier(self) -> float:
        return self.raw_brier_sum / self.count if self.count else math.nan

    def reliability(self) -> list[tuple[float, float, int]]:
        """(mean predicted, observed frequency, tokens) per non-empty bin."""
        return [(p / n, y / n, n) for n, p, y in zip(self.bin_n, self.bin_p, self.bin_y) if n]

    def since(self, earlier: "Calibration") -> "Calibration":
        """What was scored after `earlier` (a copy of this one taken before): e.g. a benchmark's measured part."""
        out = Calibration(self.bins)
        out.count, out.brier_sum = self.count - earlier.count, self.brier_sum - earlier.brier_sum
        out.raw_brier_sum = self.raw_brier_sum - earlier.raw_brier_sum
        out.bin_n = [a - b for a, b in zip(self.bin_n, earlier.bin_n)]
        out.bin_p = [a - b for a, b in zip(self.bin_p, earlier.bin_p)]
        out.bin_y = [a - b for a, b in zip(self.bin_y, earlier.bin_y)]
        return out


@dataclass(frozen=True)
class DevicePower:
    """The device model ``edge_energy`` prices a round with: CPU power while drafting, the device's
    idle power while it waits, the radio's power while it uploads. Defaults: the ``laptop`` CPU model
    and the Wi-Fi radio model of ``energy/`` (Huang et al., MobiSys 2012) at a 20 Mbps uplink; a test
    keeps them equal to energy/'s numbers."""

    active_w: float = 7.0          # W per busy core (energy.meters.CPU_MODELS["laptop"])
    idle_w: float = 2.0            # W for the device while idle (same)
    radio_w: float = 0.13286 + 0.28317 * 20    # W while uploading: beta + alpha_up * Mbps (energy.radio, wifi)


def _q(x: float) -> float:
    """Three significant digits: a profiled cost moves a little every round; the plan need not."""
    return float(f"{x:.3g}")


@functools.lru_cache(maxsize=256)
def _arrivals(n_max: int, batch_cost: float, beta: float, gamma: float, batching: str) -> np.ndarray:
    out = np.array(arrival_times(n_max, batch_cost, beta, gamma, batching))
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class RoundCosts:
    """A round's cost curve at the current link, for n = 0 .. len - 1 drafted tokens."""

    time: np.ndarray           # s from the round's start to its verdict
    cost: np.ndarray           # the objective's cost (s, target s, or J)
    hidden: np.ndarray         # what a fully accepted round's NAV hides of the next round's drafting (cost units)


def round_costs(link: LinkEstimate, n_max: int, objective: str, schedule: UploadSchedule, proactive: bool,
                mean_draft: float, power: DevicePower = DevicePower(), beta: float | None = None, *,
                pipelined: bool = False) -> RoundCosts:
    """The cost model (module docstring); `beta` overrides the link's uplink time per token.

    What a fully accepted round hides of the next (of `mean_draft` tokens): its drafting, up to the
    time this round's verdict takes after its last token; with pipelined NAV its final batch goes up
    as soon as it is drafted and is verified right after ours, so its round trip hides too, up to that
    same exposed time."""
    gamma = max(link.gamma, 1e-6)
    beta = link.upload_per_token if beta is None else beta
    latency = link.nav_latency if link.nav_latency is not None else (
        link.nav_network - beta if link.nav_network is not None else 0.02)
    latency = max(latency, 0.0)
    empty = link.nav_empty if link.nav_empty is not None else latency
    batching = "at_trigger" if type(schedule) is AtTrigger else ("per_token" if type(schedule) is PerToken else "dp")
    arrival = _arrivals(n_max, _q(link.batch_cost), _q(beta), _q(gamma), batching)
    n = np.arange(n_max + 1)
    verify = np.array([link.verify_time(int(k)) for k in n])
    # The final batch's own start-up and pass are in the NAV round trip and the verify time.
    time = np.where(n > 0, arrival - link.batch_cost + latency, empty) + verify
    exposed = time - n * gamma                       # from the last drafted token to the verdict
    length = max(1, min(n_max, round(mean_draft)))
    next_drafting = length * gamma
    hidden = np.minimum(exposed, next_drafting) if proactive else np.zeros(n_max + 1)
    if proactive and pipelined:
        # The next round's verdict then comes about one target pass after ours instead of a whole round
        # trip after it: it hides its drafting and its round trip, never more than our own exposed time.
        # The uplink is one serial resource: the next round's upload queues behind ours, so only its
        # drafting and its round trip's latency hide.
        hidden = np.minimum(exposed, next_drafting + latency)
    hidden[0] = 0.0                                  # an empty round drafts nothing ahead
    if objective == "latency":
        return RoundCosts(time, time, hidden)
    if objective == "cloud_cost":
        return RoundCosts(time, verify, np.zeros(n_max + 1))
    if objective == "edge_energy":
        upload = n * beta + np.where(n > 0, link.alpha, 0.0)
        energy = power.active_w * gamma * n + power.idle_w * time + power.radio_w * upload
        return RoundCosts(time, energy, np.zeros(n_max + 1))
    raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")


@dataclass(frozen=True)
class RoundPlan:
    """What the controller decided at a round's start."""

    rate: float                # rho: committed tokens per unit of cost at the best fixed length
    best_length: int           # that length (0: the target alone)
    stop_below: np.ndarray     # S*(n) for n = 0 .. n_max (inf: stop)
    acceptance: float          # a: the acceptance assumed for tokens not yet drafted

    @property
    def thresholds(self) -> tuple[float, float]:
        """(R1, R2) in the paper's form on the calibrated scale: R1 the survival threshold at the
        best length, R2 the first token's acceptance threshold."""
        n = max(1, min(self.best_length, len(self.stop_below) - 1))
        return float(self.stop_below[n]), float(self.stop_below[1]) if len(self.stop_below) > 1 else math.inf


def plan_round(costs: RoundCosts, a: float, rate_scale: float = 1.0) -> RoundPlan:
    """rho and S*(n) from a cost curve and the acceptance `a` of an unseen draft token."""
    a = min(max(a, 1e-3), 0.999)
    n_max = len(costs.cost) - 1
    n = np.arange(n_max + 1)
    survive = a ** n                                            # S_n for unseen tokens
    tokens = 1 + np.concatenate(([0.0], np.cumsum(survive[1:])))
    expected_cost = costs.cost - survive * a * costs.hidden    # a kept proactive round saves its next round
    rates = tokens / np.maximum(expected_cost, 1e-9)
    best = int(np.argmax(rates))
    rho = float(rates[best]) * rate_scale
    gains = np.concatenate(([0.0], np.cumsum(survive[1:])))      # G(k) = a + ... + a^k
    # All (i, k) at once: drafting on from i to j = i + k earns S_i * (G(k) + rho * a^(k+1) * hidden(j)
    # - rho * a * hidden(i)) - rho * (C(j) - C(i)), which beats stopping at i exactly when S_i > B / A.
    i, j = np.meshgrid(n, n, indexing="ij")
    k = j - i
    valid = (k >= 1) & (i >= 1)
    kk = np.where(valid, k, 0)
    gain = gains[kk] + rho * (a ** (kk + 1) * costs.hidden[j] - a * costs.hidden[i])
    extra = rho * (costs.cost[j] - costs.cost[i])
    ok = valid & (gain > 0)
    ratio = np.where(ok, extra / np.where(ok, gain, 1.0), math.inf)
    stop = np.maximum(ratio.min(axis=1), 0.0)
    stop[0] = math.inf
    return RoundPlan(rho, best, stop, a)
