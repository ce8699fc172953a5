"""PipeSD's round controller: how a segment of rounds is shaped, priced by the link, the device and the cloud.

A *segment* runs from one rejection to the next. Its *head* round drafts m tokens and asks for NAV.
While that NAV is in flight a proactive policy drafts *rounds ahead*: each begins with the draft's
guess of the target's next token (it joins the round's prefix, which the verifier checks by hash, so
it costs no upload) and `ahead_draft` tokens more; a pipelined policy sends each as soon as it is
drafted, for the verifier to run right after the verdict it assumes, and keeps up to `ahead` of them
in flight. On a fast link with a fast draft that is a few head tokens and long rounds ahead; on a
slow device with a long round trip it is an empty head and a guess per round -- the verifier checks
one position per pass, as fast as the device drafts; where no draft pays it is the target alone.

``plan_segment`` prices every such structure. Position q of the segment is rejected first with
probability S(q - 1) - S(q), S the survival of the per-position acceptance; the segment then
commits q tokens and costs what the verdict that checks position q costs: its wall time
(``latency``), the target passes run up to it (``cloud_cost``) or the device's joules
(``edge_energy``). The verdicts follow a recurrence in the profiler's live costs: block j's verdict
comes when its upload has arrived and the verifier's previous pass is done, plus a pass and the way
back. The plan maximises E[tokens] / E[cost] (renewal-reward); at that best rate rho it then gives,
per drafted head position n, the survival S*(n) below which stopping the head beats drafting on:
drafting on to m is worth S_n (F(n, m) - F(n, n)) against (1 - S_n) rho (C(m) - C(n)) for a round
whose rejection has already happened (F: expected tokens - rho cost given the first n are right).
That is the paper's dual threshold made calibrated and priced: S_n is C_n with each confidence
replaced by the acceptance model's probability, R1 = S*(best m), R2 = S*(1).

The acceptance of tokens not yet drafted depends on where they fall in the segment
(``PositionAcceptance``): rejections cluster, and the token just after a correction is the least
likely to be accepted. The acceptance of a drafted token (``AcceptanceModel``) is a logistic
regression on the draft's own confidence and that position, fitted online from NAV verdicts and
scored prequentially (each prediction before it is learnt from), so its calibration -- Brier score,
reliability bins -- is measured on the run itself.

Plain objects, no I/O, no clocks: testable in microseconds (a plan in 1-4 ms, reused while the costs hold).
"""

from __future__ import annotations

import functools
import math
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
    """P(a draft token is accepted | the draft tokens before it in its round were): a logistic
    regression on logit(P(d)) and log(n), n the token's position in its segment (the tokens since the
    last rejection, plus one: see ``PositionAcceptance``), fitted online to NAV verdicts.

    Its prior is "the draft is calibrated" (P = the draft's own confidence), held by a ridge penalty
    that data outweigh after a few hundred tokens; the fit (a Newton step from the last fit, on the last `window`
    observed tokens) runs once per verdict. Only tokens up to the first rejection are observed: the
    ones after it say nothing about acceptance given a surviving prefix.
    """

    PRIOR = (0.0, 1.0, 0.0)

    def __init__(self, window: int = 2048, ridge: float = 4.0, bins: int = 10):
        self.w = np.array(self.PRIOR)
        self.bias = 0.0                        # a correction the tuner may add to every logit
        self.ridge, self.window = ridge, window
        # The last `window` observations, a ring of rows (numpy, so that a fit converts nothing).
        self._x, self._y = np.empty((window, 3)), np.empty(window)
        self._seen = 0
        self.calibration = Calibration(bins)
        self.positions = PositionAcceptance()

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

    def observe(self, draft: Sequence[DraftToken], accepted: int, start: int = 1) -> None:
        """A verdict: the first `accepted` tokens of `draft` were kept, the next (if any) rejected;
        `start`: the first one's position in its segment (tokens since the last rejection, plus one)."""
        for i, d in enumerate(draft[: accepted + 1]):
            y = 1.0 if i < accepted else 0.0
            self.calibration.add(self.predict(d.confidence, start + i), d.confidence, y)
            row = self._seen % self.window
            self._x[row], self._y[row] = self.features(d.confidence, start + i), y
            self._seen += 1
            self.positions.add(start + i, y)
        self._fit()

    def _fit(self, steps: int = 1) -> None:
        """Newton on the penalised log-likelihood, from the last fit: a verdict moves the optimum a little,
        and one step from close by lands on it (it runs between drafted tokens: ~50 us, not 3 steps)."""
        n = min(self._seen, self.window)
        if not n:
            return
        x, y = self._x[:n], self._y[:n]
        prior = np.array(self.PRIOR)
        w = self.w.copy()
        for _ in range(steps if self._seen > 1 else 3):
            p = 1 / (1 + np.exp(-np.clip(x @ w, -30, 30)))
            grad = x.T @ (p - y) + self.ridge * (w - prior)
            hess = (x.T * (p * (1 - p))) @ x + self.ridge * np.eye(3)
            w -= np.linalg.solve(hess, grad)
        self.w = w


class PositionAcceptance:
    """How often a draft token is accepted at each position of its segment (the tokens since the last
    rejection), over recent verdicts: what the plan assumes of tokens not yet drafted. Rejections
    cluster -- the token after a correction is wrong more often than one deep in an accepted run -- so
    one rate for every position would overrate the tokens that matter most. Counts decay by `decay`
    per observation (a memory of a few hundred tokens) from a prior of `prior` (3 in 5) per position;
    positions from `pooled` on share one count."""

    def __init__(self, pooled: int = 8, decay: float = 0.995, prior: float = 0.6):
        self.pooled, self.decay = pooled, decay
        self.n = [5.0] * pooled
        self.k = [5.0 * prior] * pooled

    def add(self, position: int, accepted: float) -> None:
        i = min(position, self.pooled) - 1
        self.n[i] = self.n[i] * self.decay + 1.0
        self.k[i] = self.k[i] * self.decay + accepted

    def curve(self, start: int = 1, step: float = 0.02) -> tuple[float, ...]:
        """Acceptance at positions start, start + 1, ... (the last value for every later one), rounded
        to `step` so that a plan made for nearly the same curve is reused."""
        rates = [round(k / n / step) * step for k, n in zip(self.k, self.n)]
        return tuple(rates[min(start, self.pooled) - 1:])


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
    """Two significant digits: a profiled cost moves a little every round; the plan need not."""
    return float(f"{x:.2g}")


@functools.lru_cache(maxsize=256)
def _arrivals(n_max: int, batch_cost: float, beta: float, gamma: float, batching: str) -> np.ndarray:
    out = np.array(arrival_times(n_max, batch_cost, beta, gamma, batching))
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class SegmentCosts:
    """What a segment's rounds cost at the current link, in seconds (see ``plan_segment``)."""

    gamma: float            # drafting one token (a guess included)
    beta: float             # the uplink's time per drafted token
    batch_cost: float       # a non-final batch as the DP prices it (its start-up and the pass it triggers)
    latency: float          # a drafted (or streamed) round's round trip, beyond its upload and the target's pass
    empty_latency: float    # the same for an empty round sent alone (the target decoding alone: a plain request)
    pass_fixed: float       # the target's pass over a round of n drafted tokens: pass_fixed + pass_per_token * n
    pass_per_token: float
    alpha: float = 0.0      # a batch's start-up on the uplink (edge_energy prices the radio with it)

    @classmethod
    def from_link(cls, link: LinkEstimate, beta: float | None = None) -> "SegmentCosts":
        """From the profiler's estimate, rounded so that small drifts reuse a cached plan; `beta`
        overrides the uplink's time per token (a probe's "what if the uplink were free")."""
        beta = link.upload_per_token if beta is None else beta
        latency = link.nav_latency if link.nav_latency is not None else (
            link.nav_network - beta if link.nav_network is not None else 0.02)
        latency = max(latency, 0.0)
        empty = link.nav_empty if link.nav_empty is not None else latency
        fixed = link.verify_fixed if link.verify_fixed is not None else link.verify
        return cls(_q(max(link.gamma, 1e-6)), _q(beta), _q(link.batch_cost), _q(latency), _q(empty), _q(fixed),
                   _q(link.verify_per_token), _q(link.alpha))

    def passes(self, n: np.ndarray | float) -> np.ndarray | float:
        return self.pass_fixed + self.pass_per_token * n


@dataclass(frozen=True)
class RoundPlan:
    """What the controller decided for a segment at its start (``plan_segment``)."""

    rate: float                # rho: committed tokens per unit of cost at the best structure
    best_length: int           # the head round's drafts for a token not yet seen (0: nothing to draft)
    stop_below: np.ndarray     # S*(n): stop the head round after n drafts when the survival is below it
    acceptance: float          # the acceptance assumed for the head's first token not yet drafted
    ahead: int = 0             # rounds drafted ahead of the one being verified (0: none)
    ahead_draft: int = 0       # drafts in each of those after its guess (0: the guess alone)
    seconds_per_token: float = math.nan   # the best structure's expected wall time per committed token

    @property
    def thresholds(self) -> tuple[float, float]:
        """(R1, R2) in the paper's form on the calibrated scale: R1 the survival threshold at the
        best length, R2 the first token's acceptance threshold."""
        if len(self.stop_below) < 2:
            return math.inf, math.inf          # a plan that drafts no head token (guesses only): stop at once
        n = max(1, min(self.best_length, len(self.stop_below) - 1))
        return float(self.stop_below[n]), float(self.stop_below[1])


# Latency is priced in seconds plus this share of the target's seconds: between structures of (nearly)
# the same speed, the one that runs fewer target passes -- which other sessions would wait for.
LATENCY_TIEBREAK = 0.02
INTERRUPT_FROM_S = 0.002       # the engine interrupts drafters this slow per token (engine.Decoding)
AHEAD_DRAFTS = (0, 1, 2, 4, 8, 16)     # the chained rounds' lengths the planner considers
AHEAD_DEPTHS = (1, 2, 4, 8)            # ... and how many of them may be in flight


@functools.lru_cache(maxsize=512)
def plan_segment(costs: SegmentCosts, a: float | tuple[float, ...], objective: str = "latency", *, n_max: int = 32,
                 schedule: str = "dp", proactive: bool = True, pipelined: bool = True,
                 power: DevicePower = DevicePower(), rate_scale: float = 1.0, rebase: bool = True,
                 guesses_only: bool = False, restart: float | None = None) -> RoundPlan:
    """The best segment structure and the head round's stopping thresholds (module docstring).

    `a`: the acceptance of the segment's positions from the head's first draft on (the last value for
    every later position), or one value for all. Structures searched: the head alone (m = 0: the target
    alone), and a head with rounds ahead of ``AHEAD_DRAFTS`` tokens, ``AHEAD_DEPTHS`` of them in flight
    (one, sent only once the verdict before says so, when not `pipelined`; none when not `proactive`).
    `rebase`: the verifier answers a pipelined round whose assumption failed as the target's next token
    (``VerifyRequest.after``): a rejection found while the next block is already sent commits one more
    token, for one more target pass and no wall time (it is verified while the next round is drafted) --
    unless the guess that begins the next segment's first round (drafted on the rebased one before its
    answer) is wrong: that round is refused, and the segment starts again when the answer comes, a pass
    later. `restart`: that guess's acceptance (default: the first of `a`).
    `guesses_only`: no drafted tokens at all, only rounds ahead of a guess each (looked-up guesses:
    ``lookup.py``; `costs.gamma` is then a guess's cost) or the target alone.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    if guesses_only:
        n_max = 0
    S, reach = _survival((a,) if isinstance(a, (int, float)) else tuple(a))
    g = costs.gamma
    m = np.arange(n_max + 1, dtype=float)
    # The head round: its last token's arrival as the schedule batches it, its pass, its verdict.
    arrival = _arrivals(n_max, costs.batch_cost, costs.beta, g, schedule) - costs.batch_cost
    up0 = np.where(m > 0, arrival, 0.0)
    fin0 = up0 + costs.latency / 2 + costs.passes(m)
    v0 = fin0 + costs.latency / 2
    # Structures: (ahead_draft, ahead) pairs; (0, 0) is the head round alone.
    if not proactive:
        structs = [(0, 0)]
    elif guesses_only:
        structs = [(0, 0)] + [(0, d) for d in AHEAD_DEPTHS]
    elif not pipelined:
        structs = [(0, 0)] + [(k, 1) for k in AHEAD_DRAFTS]
    else:
        structs = [(0, 0)] + [(k, d) for k in AHEAD_DRAFTS for d in AHEAD_DEPTHS]
    K = len(structs)
    kk = np.array([s[0] for s in structs], dtype=float)[:, None]      # [K, 1]
    dd = np.array([s[1] for s in structs])[:, None]
    chained = dd > 0
    positions = int(min(len(S) - 2, reach + n_max + 2))
    blocks = int(min(64, reach + 1))
    M, KM, lead = n_max + 1, K * (n_max + 1), max(AHEAD_DEPTHS) + 1
    short = int(kk[chained[:, 0], 0].min()) + 1 if chained.any() else 1    # the shortest chained round
    # (Two blocks at least where a round ahead may be answered rebased: a sure rejection still pays there.)
    used = min(max(blocks, 2), max(2 if rebase and pipelined else 1, math.ceil(reach / short))) \
        if chained.any() else 1
    # V[lead + j]: block j's verdict, flat over (structure, head length); the `lead` blocks before
    # block 0 are -inf, so that "block j - 1 - depth has been verified" needs no test. The recurrence is
    # the costly part of planning: a few whole-array operations per block, in place.
    V = np.full((lead + used, KM), -np.inf)
    V[lead] = np.tile(v0, K)
    ready, up_end, fin = np.tile(m * g, K), np.tile(up0, K), np.tile(fin0, K)
    step, load, pass_k = (np.repeat(kk[:, 0], M) + 1) * g, np.repeat(kk[:, 0], M) * costs.beta, \
        np.repeat(costs.passes(kk[:, 0]), M)
    gate = (lead - 1 - np.repeat(dd[:, 0], M)) * KM + np.arange(KM)
    half = costs.latency / 2
    sent, uploaded = np.empty((used, KM)), np.empty((used, KM))     # when each block's upload began, and ended
    sent[0], uploaded[0] = ready, up_end
    for j in range(1, used):
        np.maximum(ready, V.ravel()[gate + j * KM], out=ready)      # the window: drafted once that verdict is in
        ready += step
        np.maximum(ready if pipelined else np.maximum(ready, V[lead + j - 1]), up_end, out=up_end)
        sent[j] = up_end                                              # its upload starts
        up_end += load
        uploaded[j] = up_end
        np.maximum(up_end + half, fin, out=fin)
        fin += pass_k
        np.add(fin, half, out=V[lead + j])
    V = V[lead:]
    # Rebased rounds: block j + 1 went up before block j's verdict came (chained structures only).
    rebased = np.zeros((used, KM))
    if rebase and pipelined and used > 1:
        rebased[:-1] = (sent[1:] < V[:-1]) & (np.repeat(dd[:, 0], M) > 0)
    # A rejection checked by block j leaves the blocks after it that already went up on the uplink: the
    # next segment's head waits for the one still being sent (up to `depth` of them were in flight).
    residual = np.zeros_like(V)
    depth = np.repeat(dd[:, 0], M)
    # (Skipped where even the largest block uploads in under half a millisecond: nothing to wait for.)
    for o in range(1, min(max(AHEAD_DEPTHS), used - 1) + 1 if costs.beta * max(AHEAD_DRAFTS) > 5e-4 else 1):
        busy = (o <= depth) & (sent[o:] < V[:-o])
        np.maximum(residual[:-o], np.where(busy, uploaded[o:] - V[:-o], 0.0), out=residual[:-o])
    rebased = rebased.reshape(used, K, M)
    # After a rebased answer, a wrong guess at the head of the next segment's first round costs it a pass.
    a_restart = (a if isinstance(a, (int, float)) else a[0]) if restart is None else restart
    V = (V + residual).reshape(used, K, M) + rebased * (1.0 - a_restart) * costs.passes(0)
    V[1:, 0] = V[0, 0]                                   # structure 0, the head alone: block 0 only
    V[0, 0, 0] = costs.empty_latency + costs.passes(0)    # a lone empty round is a plain request
    # A verdict that comes while the device drafts ahead waits for the token being drafted, half of one on
    # average -- unless the engine interrupts the drafter, which it does from INTERRUPT_FROM_S per token.
    V[:, 1:] += min(g, INTERRUPT_FROM_S) / 2
    # Block j's last position and the target passes up to it (structure 0: the head's, whatever j).
    j = np.arange(used)[:, None, None]
    E = m + 1 + j * (kk + 1)
    E[:, 0] = m + 1
    P = costs.passes(m) + j * costs.passes(kk)
    P[:, 0] = costs.passes(m)
    # The objective's cost when the segment's verdict comes from block j.
    if objective == "latency":
        C = V + LATENCY_TIEBREAK * P
    elif objective == "cloud_cost":
        C = P
    else:
        C = power.active_w * g * m + power.idle_w * V + power.radio_w * (costs.alpha + m * costs.beta)
    Ei = np.minimum(E, len(S) - 1).astype(np.intp)
    survive = S[Ei]                                                           # P(no rejection through block j)
    p_block = -np.diff(survive, axis=0, prepend=1.0)
    tail = survive[-1]
    # T[k] = sum over q > k of q P(p = q): the rejection's position p, weighted by its probability.
    q_all = np.arange(1, len(S))
    T = np.concatenate([np.cumsum((q_all * (S[:-1] - S[1:]))[::-1])[::-1], [0.0]])
    if objective == "cloud_cost":
        C = C + rebased * costs.passes(0)
    tokens = T[0] - T[Ei[-1]] + tail * E[-1] + (p_block * rebased).sum(0)
    cost = (p_block * C).sum(0) + tail * C[-1]
    if not pipelined:     # an empty head cannot start a chain that waits for its verdict
        cost[chained[:, 0], 0] = np.inf
    rates = tokens / np.maximum(cost, 1e-12)
    k_best, m_best = np.unravel_index(int(np.argmax(rates)), rates.shape)
    rho = float(rates[k_best, m_best]) * rate_scale
    spt = float(((p_block * V).sum(0) + tail * V[-1])[k_best, m_best] / tokens[k_best, m_best])
    # Thresholds for the head round, at the chosen structure: F(n, m') = E[tokens - rho cost | the
    # first n positions correct, the head stops at m'] (rows n, columns m').
    Vk, Ek, Ck = V[:, k_best], E[:, k_best], C[:, k_best]                    # [J, M]
    q = np.arange(1, positions + 1)
    blk = (q[:, None] > Ek[:, None, :]).sum(0).clip(max=len(Ek) - 1)         # [Q, M]: block that checks q
    covered = q[:, None] <= Ek[-1][None, :]
    h = np.where(covered, q[:, None] - rho * np.take_along_axis(Ck, blk, 0), 0.0)
    end_value = Ek[-1] - rho * Ck[-1]                                         # nothing rejected: the segment ends
    n = np.arange(n_max + 1)
    offs = q[None, :] - n[:, None]                                            # [N, Q]
    w = np.where(offs >= 1, (S[q - 1] - S[q])[None, :] / S[n][:, None], 0.0)   # P(p = q | first n correct)
    # Positions beyond a column's coverage carry nothing in h: their probability is the tail's.
    last = np.minimum(Ek[-1], len(S) - 1).astype(int)
    F = w @ h + (S[last][None, :] / S[n][:, None]) * end_value[None, :]
    dF = F - np.diag(F)[:, None]                                              # [n, m']: F(n, m') - F(n, n)
    dT = rho * (Ck[0][None, :] - Ck[0][:, None])
    later = (n[None, :] > n[:, None]) & (dF > 0)
    ratio = np.where(later, dT / np.where(later, dF + np.maximum(dT, 0), 1.0), np.inf)
    stop = np.maximum(ratio.min(axis=1), 0.0)
    stop[0] = math.inf
    stop.flags.writeable = False              # the plan is cached (lru_cache) and shared: read-only
    k_draft, depth = structs[k_best]
    return RoundPlan(rho, int(m_best), stop, float(S[1]), depth, k_draft, spt)


_TAIL_CAP = 0.995


def _survival(acceptance: tuple[float, ...], limit: int = 300) -> tuple[np.ndarray, int]:
    """(S, reach): S[q] = P(the first q positions are all accepted), position i accepted with
    probability acceptance[i - 1] (the last value for every later position), and the position past
    which a rejection is all but sure."""
    acc = np.clip(np.array(acceptance, dtype=float), 1e-3, _TAIL_CAP)
    tail = acc[-1]
    reach = len(acc) + math.ceil(math.log(2e-3) / math.log(tail))
    size = int(min(limit, reach + 70))
    per = np.concatenate([acc, np.full(max(0, size - len(acc)), tail)])[:size]
    S = np.concatenate([[1.0], np.cumprod(per)])
    below = np.nonzero(S < 2e-3)[0]
    return S, int(below[0]) if len(below) else size
