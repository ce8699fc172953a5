"""Decoding policies: the strategy the engine asks, round by round. Plain objects, no I/O.

The engine never looks inside a policy; it asks four questions and reports one answer, in
the spirit of transformers' ``CandidateGenerator`` (``get_candidates`` /
``update_candidate_strategy``):

* ``start_round(link)`` -- a round begins; here is the link as profiled now (plan, tune);
* ``verify_now(draft)`` -- after each drafted token: stop and ask for NAV?
* ``closes_batch(n)`` -- if not: does the n-th token close a batch that goes up at once?
* ``on_verdict(verdict)`` -- NAV answered: learn from it (adaptive thresholds, the window, the tuner);

plus plain facts a policy may set per round in ``start_round``: ``uses_cloud``; ``proactive`` (draft
the next round while NAV is in flight); ``pipelined`` (a round drafted ahead sends its final batch as
soon as it is complete, for the verifier to run right after the verdict it assumes: pipelined NAV);
``max_draft`` (the round's length cap; 0: nothing to draft -- the target decodes alone, unless the
policy pipelines guesses on top of the empty round); ``max_ahead`` (how many rounds may be drafted
ahead, one on top of the other) and ``ahead_draft`` (the length cap of a round drafted ahead; 0: the
round is the draft's guess of the target's next token alone). So PipeSD and the paper's baselines
run on one engine:

| policy | verify when | batches | drafts during NAV |
|---|---|---|---|
| vanilla | every k tokens | whole draft at the trigger | no |
| hsl | P(d_n) < R2 | whole draft at the trigger | no |
| edgellm | C_n < adaptive threshold | whole draft at the trigger | yes (uploaded at the next trigger) |
| pipesd | a segment planned from live costs (``controller.py``): the head stops at calibrated survival < its threshold; nothing drafted where none pays | DP token batches (the head) | the planned rounds ahead, each sent once drafted |
| pipesd_bo | the paper's: C_n < R1 or P(d_n) < R2, tuned online by BO | DP token batches | yes |

and the ablations: of the controller ``pipesd_model`` (no BO correction), ``pipesd_no_pipeline``
(no pipelined NAV), ``pipesd_per_token``,
``pipesd_at_trigger`` (no DP), ``pipesd_no_proactive``; of the paper's trigger ``pipesd_fixed``
(no BO), ``pipesd_c_only``, ``pipesd_p_only`` (single threshold); ``cloud_only`` (the target alone,
the reference output) and ``edge_only`` (the draft alone).
``make_policy`` builds one by name and refuses arguments the mode has no use for.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from .autotune import CorrectionTuner, OnlineAutotuner
from .controller import OBJECTIVES, AcceptanceModel, DevicePower, RoundPlan, SegmentCosts, plan_segment
from .drafter import DraftToken
from .errors import ConfigError
from .profiler import LinkEstimate
from .scheduling import AtTrigger, DPSchedule, PerToken, UploadSchedule
from .trees import TreeShape
from .triggers import (
    DEFAULT_R1,
    DEFAULT_R2,
    AdaptiveCumulative,
    DualThreshold,
    FixedLength,
    LastTokenConfidence,
    Trigger,
)

MAX_DRAFT = 32        # a round's draft cap for adaptive policies (the verifier may allow fewer)
MAX_DRAFT_K = 64      # the longest fixed draft length a vanilla policy accepts


@dataclass(frozen=True)
class RoundVerdict:
    """What a NAV round came to, as a policy learns from it."""

    draft: tuple[DraftToken, ...]   # the tokens verified
    accepted: int                   # how many of them the target kept
    seconds: float                  # wall time from the round's start to its verdict (a kept proactive
                                    # round's drafting during the previous NAV is not in it)
    link: LinkEstimate              # the profiler's estimate once the round is counted
    token: int | None = None        # the target's own token (the correction, or the bonus token)
    guess: DraftToken | None = None  # the draft's guess of that token, when a round was drafted on top

    @property
    def committed(self) -> int:
        """Tokens the round added to the output: the accepted ones plus the target's own."""
        return self.accepted + 1


class Policy:
    """A decoding strategy. Subclasses answer the engine's questions; these defaults decide nothing."""

    name: str = "policy"
    uses_cloud: bool = True     # False: the draft's tokens are the output (edge_only)
    proactive: bool = False     # keep drafting the next round while NAV is in flight
    pipelined: bool = False     # ... and send its final batch then (verified as soon as the verdict allows)
    max_draft: int = MAX_DRAFT  # a round's draft cap (0: no draft, the target decodes alone)
    max_ahead: int = 1          # rounds drafted ahead, each on top of the one before (a proactive policy)
    ahead_draft: int | None = None  # a round drafted ahead: its draft cap after the guess (0: the guess
                                    # alone; None: max_draft, as for any round)
    rebases: bool = True        # set by the engine every round: the verifier answers rebased rounds
    round_sent: bool = False    # set by the engine every round: the round starting already went up (drafted
                                # ahead and sent pipelined, or answered rebased): its draft is fixed
    lookup_guesses: bool = False    # rounds drafted ahead begin with a looked-up guess (``lookup.py``), not a drafted one
    tree: TreeShape | None = None   # each round a token tree of this shape (``trees.py``) where the drafter, the
                                    # verifier and greedy decoding allow; else chains, by the rules above
    branches: TreeShape | None = None   # a chain sent whole grows branches off it, of this shape (``trees.draft_tree``
                                        # on the chain: runner-ups, and what the draft drafts after them where
                                        # ``max_depth`` > 1; greedy, a tree verifier)

    def start_round(self, link: LinkEstimate) -> None:
        """A round begins; `link` is what the profiler measures now."""

    def idle(self, link: LinkEstimate) -> None:
        """The engine waits for a verdict with nothing left to draft: work done here (planning the next
        round) is off the path that rounds wait on."""

    def verify_now(self, draft: Sequence[DraftToken], ahead: bool = False) -> bool:
        """After each drafted token (the round's draft so far): ask for NAV now? `ahead`: the round is
        one drafted ahead, during the NAV of the round before."""
        return True

    def closes_batch(self, drafted: int) -> bool:
        """The round's `drafted`-th token was not the last: send the batch it ends now?"""
        return False

    def on_verdict(self, verdict: RoundVerdict) -> None:
        """NAV answered a round of this policy's."""

    def reproducible(self) -> "Policy":
        """The policy a seeded request runs: one that decides by rules fixed for the request (an
        adaptive policy's initial state; PipeSD at the thresholds its tuner has settled on, which later
        tuning may still move) and teaches this one nothing, so the same seed gives the same text.
        The default is a deep copy as the policy is now; a policy whose state changes what it decides
        should override it to start from its initial state."""
        return copy.deepcopy(self)


class EdgeOnly(Policy):
    """The draft alone, on the device: no verifier, output not verified."""

    name, uses_cloud = "edge_only", False


class CloudOnly(Policy):
    """The target alone: an empty draft per round, one token per round trip (the reference output)."""

    name, max_draft = "cloud_only", 0


class TreeRounds(Policy):
    """Each round one token tree (``trees.py``): the draft's likeliest continuations, best-first, up to the
    shape's node budget, sent whole; the verifier accepts the longest path the target agrees with.
    Nothing is drafted during NAV yet. Where a tree cannot go (sampling, a drafter or verifier without
    trees) its rounds are chains cut by the same value rule: the draft's top token while the chain's
    value (the product of its probabilities) stays above ``min_value``, at most ``max_draft`` tokens."""

    name = "tree"

    def __init__(self, shape: TreeShape | None = None):
        self.tree = shape if shape is not None else TreeShape()
        self.max_draft = min(self.tree.max_depth, MAX_DRAFT)

    def verify_now(self, draft: Sequence[DraftToken], ahead: bool = False) -> bool:
        value = 1.0
        for d in draft:
            value *= d.confidence
        return value < self.tree.min_value


class Speculative(Policy):
    """A trigger (when to verify) and an upload schedule (which tokens go up together), with or
    without proactive drafting: the paper's baselines and PipeSD's fixed-threshold variants."""

    def __init__(self, name: str, trigger: Trigger, schedule: UploadSchedule | None = None, *,
                 proactive: bool = False, max_draft: int = MAX_DRAFT):
        self.name, self.trigger, self.proactive, self.max_draft = name, trigger, proactive, max_draft
        self.schedule = schedule if schedule is not None else AtTrigger()
        self._initial_trigger = copy.deepcopy(trigger)

    def start_round(self, link: LinkEstimate) -> None:
        self.schedule.plan(link)

    def verify_now(self, draft: Sequence[DraftToken], ahead: bool = False) -> bool:
        return self.trigger.should_verify(draft)

    def closes_batch(self, drafted: int) -> bool:
        return self.schedule.closes_batch(drafted)

    def on_verdict(self, verdict: RoundVerdict) -> None:
        self.trigger.on_round(len(verdict.draft), verdict.accepted, verdict.draft)
        self.schedule.observe(len(verdict.draft))

    def reproducible(self) -> "Speculative":
        # A fresh trigger (an adaptive one's threshold would carry earlier requests); the schedule only
        # decides which tokens travel together, never the text, so the copy keeps what it has learnt.
        clone = copy.copy(self)
        clone.trigger = copy.deepcopy(self._initial_trigger)
        clone.schedule = copy.deepcopy(self.schedule)
        return clone

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, {self.trigger!r}, {type(self.schedule).__name__}, "
                f"proactive={self.proactive}, max_draft={self.max_draft})")


class PaperPipeSD(Speculative):
    """The paper's PipeSD: the dual threshold C_n < R1 or P(d_n) < R2, DP token batches, proactive
    drafting (``pipesd_bo``, and the fixed-threshold ablations).

    With a ``tuner`` it owns its tuning: each round starts at the thresholds the tuner proposes
    (a candidate while it explores, the best known for the network regime once it has settled),
    and each verdict scores them by seconds per committed token. Without one the thresholds stay.
    """

    def __init__(self, name: str = "pipesd_bo", trigger: DualThreshold | None = None,
                 schedule: UploadSchedule | None = None, *, proactive: bool = True, max_draft: int = MAX_DRAFT,
                 tuner: OnlineAutotuner | None = None):
        super().__init__(name, trigger if trigger is not None else DualThreshold(),
                         schedule if schedule is not None else DPSchedule(), proactive=proactive, max_draft=max_draft)
        self.tuner = tuner

    @property
    def thresholds(self) -> tuple[float | None, float | None]:
        """(R1, R2) a request would run at now, outside exploration: the tuner's best known, else the fixed ones."""
        return self.tuner.best_thresholds() if self.tuner is not None else (self.trigger.r1, self.trigger.r2)

    def start_round(self, link: LinkEstimate) -> None:
        super().start_round(link)
        if self.tuner is not None:
            self.trigger.r1, self.trigger.r2 = self.tuner.thresholds()

    def on_verdict(self, verdict: RoundVerdict) -> None:
        super().on_verdict(verdict)
        if self.tuner is not None:
            self.tuner.record(verdict.committed, verdict.seconds, verdict.link.regime(), verdict.link.acceptance)

    def reproducible(self) -> "PaperPipeSD":
        r1, r2 = self.thresholds
        return PaperPipeSD(self.name, DualThreshold(r1, r2), copy.deepcopy(self.schedule), proactive=self.proactive,
                           max_draft=self.max_draft)


class PipeSD(Policy):
    """PipeSD: the model-based round controller (``controller.py``), DP token batches, rounds drafted
    and verified ahead.

    Each round starts with a plan from the profiler's live costs (``RoundPlan``): the rate to beat,
    how long the head round should be, how many rounds to draft ahead of it (each the draft's guess
    of the target's next token and ``ahead_draft`` tokens more) and a survival threshold per head
    position. After each drafted head token the acceptance model's probability for it extends the
    round's survival, and the round stops when that falls below the threshold. A plan in which no
    draft pays makes the round draft nothing (the target decodes alone). While no drafted token goes
    up (the target alone, or guesses alone) and one would pay on a faster uplink, a probe of a few
    tokens now and then (exponentially rarer, at most every ``PROBE_MAX`` rounds) re-measures the uplink.
    ``objective`` chooses what a round costs: ``latency`` (seconds), ``cloud_cost`` (target compute)
    or ``edge_energy`` (modelled device joules; no drafting ahead, which spends them on guesses).
    Without a ``schedule`` given, the objective picks it: DP token batches, except under ``cloud_cost``,
    where the whole draft goes up at the trigger (``AtTrigger``): on a verifier with eager forward (the
    default; ``--no-eager-forward`` turns it off) each batch sent ahead of the trigger buys upload time
    with a target pass of its own, which is exactly what that objective counts.
    With a ``tuner`` (``CorrectionTuner``) the plan is corrected by what BO measures.
    """

    PROBE_FIRST, PROBE_MAX, PROBE_TOKENS = 4, 256, 8
    EMPTY_EVERY = 32        # drafted rounds between empty ones, while batch sizes cannot fit the uplink

    def __init__(self, name: str = "pipesd", *, objective: str = "latency", schedule: UploadSchedule | None = None,
                 proactive: bool = True, pipelined: bool = True, max_draft: int = MAX_DRAFT,
                 tuner: CorrectionTuner | None = None, model: AcceptanceModel | None = None,
                 power: DevicePower = DevicePower(), branch_depth: int = 1):
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
        self.name, self.objective, self.power = name, objective, power
        if branch_depth < 0:
            raise ConfigError(f"branch_depth is a number of levels, at least 0, not {branch_depth!r}")
        # Rounds sent whole grow branches where they pay (``_branches``): 0 none (chains), 1 the draft's
        # runner-ups alone (no drafting), more: what the draft drafts after them, that many levels down.
        self.branch_depth = branch_depth
        self._proactive = self.proactive = proactive and objective != "edge_energy"
        self._pipelined = self.pipelined = pipelined and self.proactive
        if schedule is None:
            schedule = AtTrigger() if objective == "cloud_cost" else DPSchedule()
        self.schedule = schedule
        self.cap = self.max_draft = self.ahead_draft = max_draft
        self.max_ahead = 0
        self.tuner = tuner
        self.model = model if model is not None else AcceptanceModel()
        self.plan: RoundPlan | None = None
        self.frozen: LinkEstimate | None = None     # reproducible(): plan from this, learn nothing
        self._segment = 1          # the head round's first draft: its position in the segment
        self._plans: dict[tuple, tuple[SegmentCosts, tuple[float, ...], RoundPlan]] = {}
        self._stale: dict[tuple, int] = {}    # plans used past their tolerance (key -> rounds): re-planned in idle()
        self.plans_made = 0
        self.structures: Counter[tuple[int, int, int]] = Counter()   # (head, rounds ahead, their drafts) chosen
        self._tracked: dict[int, tuple[list, int, float]] = {}       # id -> (draft, its length, survival)
        self._stop: list[float] = []                                 # the plan's S*(n), as plain floats
        self._probe_gap, self._unsent_rounds = self.PROBE_FIRST, 0
        self._probe_len = 0        # this round is a probe of this many tokens (0: not a probe)
        self._since_empty = 0
        self.empty_probes = 0
        self.unpriced_rounds = 0   # rounds kept short and serial because no drafted token was priced yet
        self.rounds = self.cloud_only_rounds = self.probes = 0
        # What deciding costs (it runs in the per-token loop): seconds in verify_now / start_round.
        self.decisions, self.decide_s, self.plan_s = 0, 0.0, 0.0
        self.idle_s = 0.0         # ... and planning in idle(), off the path

    # -- what the controller believes --------------------------------------------------------
    @property
    def acceptance(self) -> tuple[float, ...]:
        """The acceptance of draft tokens not yet seen, from the head round's first position on: by
        position in the segment (``PositionAcceptance``; a round's guess of the target's next token
        counts as one more drafted token)."""
        return self.model.positions.curve(self._segment)

    @property
    def thresholds(self) -> tuple[float, float] | tuple[None, None]:
        """(R1, R2) of the current plan, on the calibrated scale (``RoundPlan.thresholds``)."""
        return self.plan.thresholds if self.plan is not None else (None, None)

    # A plan whose inputs moved by less than this (costs, as ``_close`` sums them; each acceptance: by
    # less than DEFER_ACCEPTANCE) is used as it is for the round starting now, and re-planned in the
    # engine's next ``idle`` -- at most DEFER_ROUNDS rounds late. A bigger move (a bandwidth step, a
    # slower device) is re-planned at once.
    DEFER_TOLERANCE, DEFER_ACCEPTANCE, DEFER_ROUNDS = 0.3, 0.15, 2

    def _plan(self, link: LinkEstimate, beta: float | None = None, *, segment: int | None = None,
              defer: bool = False) -> RoundPlan:
        segment = self._segment if segment is None else segment
        rate_scale, bias = self._correction()
        self.model.bias = bias
        a = tuple(round(1 / (1 + math.exp(-(math.log(x / (1 - x)) + bias))), 2) for x in
                  (min(max(x, 0.01), 0.99) for x in self.model.positions.curve(segment)))
        costs = SegmentCosts.from_link(link, beta)
        # Planning costs milliseconds; a plan is reused while what it was made from has not really
        # moved (``_close``; each acceptance within 0.05): rounds are re-planned when the link, the device
        # or the draft changes, not because a measurement jittered.
        key = (min(segment, self.model.positions.pooled), beta, rate_scale, self.rebases)
        kept = self._reuse(key, costs, a, defer=defer)
        if kept is not None:
            return kept
        batching = "at_trigger" if type(self.schedule) is AtTrigger else (
            "per_token" if type(self.schedule) is PerToken else "dp")
        plan = plan_segment(costs, a, self.objective, n_max=self.cap, schedule=batching, proactive=self._proactive,
                            pipelined=self._pipelined, power=self.power, rate_scale=rate_scale,
                            rebase=self.rebases)
        self._plans[key] = (costs, a, plan)
        self.plans_made += 1
        return plan

    LOOKUP_S = 2e-5      # what a looked-up guess costs the edge (a dict lookup or three)

    def _lookup_plan(self, link: LinkEstimate, *, defer: bool = False) -> RoundPlan | None:
        """The best structure with no drafting at all: the target alone, or rounds ahead of one looked-up
        guess each (``lookup.py``) -- each answered rebased when its guess is wrong, so even guesses that
        are never right make two tokens a round trip. None where that cannot happen (no pipelined NAV, a
        verifier that does not rebase, no score for the guesser yet, a frozen controller). Reused and
        deferred as ``_plan``'s plans are."""
        if not (self._pipelined and self.rebases) or link.lookup_acceptance is None or self.frozen is not None:
            return None
        rate_scale, _ = self._correction()
        a = round(min(max(link.lookup_acceptance, 0.0), 0.95) / 0.05) * 0.05     # coarse: plans are cached
        costs = dataclasses.replace(SegmentCosts.from_link(link), gamma=self.LOOKUP_S)
        key = ("lookup", rate_scale)
        kept = self._reuse(key, costs, (a,), defer=defer, tokens=1, near=0.0)    # (a is already coarse)
        if kept is not None:
            return kept
        plan = plan_segment(costs, a, self.objective, n_max=0, proactive=True, pipelined=True, power=self.power,
                            rate_scale=rate_scale, rebase=True, guesses_only=True, restart=a)
        self._plans[key] = (costs, (a,), plan)
        return plan

    def _reuse(self, key: tuple, costs: SegmentCosts, a: tuple[float, ...], *, defer: bool,
               tokens: int | None = None, near: float = 0.05) -> RoundPlan | None:
        """The plan kept under `key` while it still fits `costs` and `a` (``_close`` over `tokens`, the
        plan's own by default; each acceptance within `near`) -- or, with `defer`, fits them loosely and
        has been used so for fewer than DEFER_ROUNDS rounds (``idle`` re-plans it); else None."""
        kept = self._plans.get(key)
        if kept is not None:
            old_costs, old_a, plan = kept
            tokens = _round_tokens(plan) if tokens is None else tokens
            if _close(old_costs, costs, tokens=tokens) and _near(old_a, a, near):
                self._stale.pop(key, None)
                return plan
            if defer and self._stale.get(key, 0) < self.DEFER_ROUNDS and \
                    _close(old_costs, costs, self.DEFER_TOLERANCE, tokens) and _near(old_a, a, self.DEFER_ACCEPTANCE):
                self._stale[key] = self._stale.get(key, 0) + 1
                return plan
        self._stale.pop(key, None)
        return None

    def _correction(self) -> tuple[float, float]:
        """(rate scale, logit bias): the tuner's correction of the plan (rounded: plans are cached), or the fixed one."""
        scale, bias = self.tuner.correction() if self.tuner is not None else self.fixed_correction
        return round(math.exp(scale), 3), bias

    BRANCH_NODES = 32     # branch nodes a round may carry at most (each must also pay for itself)
    TREE_DEPTH = 4        # ``pipesd_tree``: levels of branches below a chain

    def _branches(self, link: LinkEstimate, plan: RoundPlan) -> TreeShape | None:
        """The branches a round sent whole grows (``trees.draft_tree`` on its chain). A node goes where
        its value -- its chance of being accepted, which is one more committed token -- pays for its
        verifier row (and, for latency, its upload), in committed tokens at the plan's rate; it is
        expanded where its value also pays for a level of drafting (a token's, at the plan's rate).
        None: no branches (``branch_depth`` 0, or under ``edge_energy``, where the radio's bytes are the
        cost and a token's worth is not priced)."""
        if not self.branch_depth or self.objective == "edge_energy" or not plan.rate > 0 or not math.isfinite(plan.rate):
            return None
        costs = SegmentCosts.from_link(link)
        node = costs.pass_per_token if self.objective == "cloud_cost" else costs.beta + costs.pass_per_token
        floor = min(node * plan.rate, 0.99)
        expand = min(floor + (costs.gamma if self.objective == "latency" else 0.0) * plan.rate, 0.99)
        return TreeShape(nodes=self.BRANCH_NODES, width=2, batch=4, min_value=floor,
                         max_depth=self.branch_depth, min_expand=expand)

    # -- the policy contract -------------------------------------------------------------------
    def start_round(self, link: LinkEstimate) -> None:
        t = time.perf_counter()
        link = self.frozen if self.frozen is not None else link
        self._last_link = link
        self.schedule.plan(link)
        plan = self._plan(link, defer=True)
        lookup = self._lookup_plan(link, defer=True)
        self.lookup_guesses = lookup is not None and lookup.rate > plan.rate
        plan = self.plan = lookup if self.lookup_guesses else plan
        self._stop = plan.stop_below.tolist()
        self.branches = self._branches(link, plan)
        self.rounds += 1
        # The plan's structure: a head round (capped, its thresholds stop it), rounds drafted ahead.
        self.max_ahead, self.ahead_draft = plan.ahead, plan.ahead_draft
        self.structures[(plan.best_length, plan.ahead, -1 if self.lookup_guesses else plan.ahead_draft)] += 1
        self.proactive = plan.ahead > 0
        self.pipelined = self._pipelined and self.proactive
        self.max_draft = self.cap if plan.best_length > 0 else 0
        self._probe_len = 0
        self.plan_s += time.perf_counter() - t
        if plan.best_length or plan.ahead_draft:        # tokens go up: the link's price is measured as it goes
            self._probe_gap, self._unsent_rounds = self.PROBE_FIRST, 0
            self._since_empty += 1
            if self.frozen is None and not self.round_sent and (link.nav_empty is None and self._since_empty >= 2 or (
                    link.uplink_per_token is None and self._since_empty >= self.EMPTY_EVERY)):
                # Without an empty round measured, drafting cannot be priced against not drafting; and
                # while non-final batches cannot tell what a drafted token costs on the link (one size
                # only), an empty round now and then measures the round trip without one. Not a round
                # already sent: its draft is fixed, so the probe would only stop the rounds drafted ahead
                # on it (on native S1 a fifth of the rebased rounds lost them: the next segment's head then
                # went up after the rebased answer, a pass late) and measure nothing.
                self.max_draft, self._since_empty = 0, 0
                self.proactive = self.pipelined = False
                self.empty_probes += 1
            elif self.frozen is None and link.uplink_per_token is None and link.nav_per_token is None \
                    and link.upload_last is None:
                # No drafted token has been priced on this link yet: the uplink's price is the profiler's
                # prior (0.5 ms a token), which the paper's 0.29 MB token beats 46-fold even at 100 Mbps.
                # Rounds drafted ahead would queue seconds of uploads before a verdict could say so, and
                # the round trips they inflate hide the price (an empty round queued behind them reads as
                # latency). Until a drafted round is priced, a round drafts a probe's worth at most and
                # nothing ahead: a few serial rounds at a client's start.
                self.max_draft = self._probe_len = self._probe_tokens(link)
                self.max_ahead, self.proactive, self.pipelined = 0, False, False
                self.unpriced_rounds += 1
            return
        # No drafted token goes up: the target decodes alone, or the draft's guesses ride in the rounds'
        # prefix hashes. Nothing then measures what a drafted token would cost on the link.
        self._since_empty = 0
        self._unsent_rounds += 1
        self.cloud_only_rounds += not plan.ahead
        if self.frozen is None and self._unsent_rounds >= self._probe_gap:
            free = self._plan(link, beta=0.0)
            self._unsent_rounds = 0            # asked again after the gap, not every round, whatever the answer
            if (free.best_length or free.ahead_draft) and (lookup is None or free.rate > lookup.rate):
                # Drafted tokens would pay on a faster uplink: a probe re-measures it (and nothing drafted
                # ahead of it: on this link every drafted token is a cost). As many tokens as one round trip
                # of upload at the believed price, up to PROBE_TOKENS: a round trip's jitter over one
                # token reads as a slow uplink -- and then keeps guess-only rounds that never correct it.
                self.max_draft = self._probe_len = self._probe_tokens(link)
                self.proactive = self.pipelined = False
                # Counted (and the gap doubled) once the probe has gone up (``on_verdict``): a round already
                # in flight (drafted ahead, or answered rebased) drafts nothing, and the next round tries.

    def idle(self, link: LinkEstimate) -> None:
        """Re-plan off the path: what ``start_round`` deferred, and the plan of a round that opens a
        segment (the one after a rejection, the most common next head) at what is known now."""
        if self.frozen is not None:
            return
        t = time.perf_counter()
        for key in list(self._stale):
            if key[0] == "lookup":
                self._lookup_plan(link)
            elif key[1] is None:         # (a probe's what-if plans are made when a probe is due)
                self._plan(link, segment=key[0])
        self._plan(link, segment=1)
        self.idle_s += time.perf_counter() - t

    def _probe_tokens(self, link: LinkEstimate) -> int:
        """A probe's length: one round trip of upload at the believed price, 1 to PROBE_TOKENS tokens."""
        per_token = max(link.upload_per_token, 1e-6)
        latency = link.nav_latency if link.nav_latency is not None else 0.02
        return max(1, min(self.PROBE_TOKENS, int(latency / per_token)))

    def verify_now(self, draft: Sequence[DraftToken], ahead: bool = False) -> bool:
        if ahead:
            return False          # a round drafted ahead runs to its planned length (``ahead_draft``)
        if self._probe_len:
            return len(draft) >= self._probe_len      # a probe runs to its length
        t = time.perf_counter()
        stop = self._decide(draft)
        self.decide_s += time.perf_counter() - t
        self.decisions += 1
        return stop

    def _decide(self, draft: Sequence[DraftToken]) -> bool:
        # The survival of the head round's draft, extended by one prediction per new token: the
        # decision is a product and a comparison.
        # Positions are in the segment, as the model learns them and the plan assumes them.
        n, first = len(draft), self._segment
        tracked = self._tracked.get(id(draft))
        if tracked is not None and tracked[0] is draft and tracked[1] == n:
            survival = tracked[2]
        elif tracked is not None and tracked[0] is draft and tracked[1] == n - 1:
            survival = tracked[2] * self.model.predict(draft[-1].confidence, first + n - 1)
        else:
            survival = math.prod(self.model.predict(d.confidence, first + i) for i, d in enumerate(draft))
        if len(self._tracked) > 16 and id(draft) not in self._tracked:
            self._tracked.clear()
        self._tracked[id(draft)] = (draft, n, survival)
        stop = self._stop
        return n >= len(stop) or survival < stop[n]

    def closes_batch(self, drafted: int) -> bool:
        # A probe goes up whole, in its final batch: its round trip is then one clean sample of what its
        # tokens cost (batches sent ahead would overlap it and make it no sample at all).
        return not self._probe_len and self.schedule.closes_batch(drafted)

    def on_verdict(self, verdict: RoundVerdict) -> None:
        drafted = len(verdict.draft)
        if self._probe_len:
            if drafted:
                self.probes += 1
                self._probe_gap = min(2 * self._probe_gap, self.PROBE_MAX)
            else:
                self._unsent_rounds = self._probe_gap      # the round was already in flight: probe the next
        self.schedule.observe(drafted)
        if self.frozen is not None:
            return
        draft, accepted, start = verdict.draft, verdict.accepted, self._segment
        if verdict.guess is not None and not verdict.guess.looked_up and accepted == drafted:
            # The round drafted ahead on top of this one began with the draft's guess of the target's
            # token: one more drafted token, accepted when it was the target's.
            draft, accepted = draft + (verdict.guess,), accepted + (verdict.token == verdict.guess.token)
        if draft:
            self.model.observe(draft, accepted, start)
        # The next round's first draft: after a rejection (a draft, or the guess) a segment begins again;
        # else it follows this round's drafts and the target's token. A round that checked nothing (the
        # target alone) says nothing of where the draft stands: the position stays.
        if draft:
            self._segment = 1 if accepted < len(draft) else start + drafted + 1
        if self.tuner is not None and drafted:
            self.tuner.record(verdict.committed, verdict.seconds)

    def reproducible(self) -> "PipeSD":
        """A controller frozen at what this one knows now: the same plan every round (from the link as
        last profiled), an acceptance model that no longer learns, no tuner, and no rounds drafted ahead
        (where a round ends would depend on when a verdict comes, and with sampling, a position the
        target samples itself takes another draw than one it verifies). Its decisions then depend on
        the draft's confidences alone, so a seeded request gives the same text every time."""
        tuner, self.tuner = self.tuner, None       # a tuner holds threads and locks: not copied
        try:
            clone = copy.deepcopy(self)
        finally:
            self.tuner = tuner
        clone.frozen = self._last_link if self._last_link is not None else LinkEstimate(0.005, 0.0005, 0.002, 0.005, 0.5)
        clone._proactive = clone._pipelined = clone.proactive = clone.pipelined = False
        clone._plans, clone._stale = {}, {}
        if self.tuner is not None:
            clone.fixed_correction = self.tuner.best()
        return clone

    _last_link: LinkEstimate | None = None
    fixed_correction: tuple[float, float] = (0.0, 0.0)   # (log rho scale, logit bias) without a tuner

    def __repr__(self) -> str:
        return (f"PipeSD({self.name!r}, objective={self.objective!r}, {type(self.schedule).__name__}, "
                f"proactive={self._proactive}, pipelined={self._pipelined}, tuner={type(self.tuner).__name__ if self.tuner else None})")


def _close(a: SegmentCosts, b: SegmentCosts, tolerance: float = 0.1, tokens: int = 16) -> bool:
    """Do two cost estimates price a round alike: do their costs differ, summed over every cost (the
    per-token ones over a round of `tokens` drafted tokens: the plan's, at most 16), by at most
    `tolerance` of what such a round costs? A plan is a few ms of numpy; a draft token's time that
    jitters by 0.2 ms, or an uplink at 30 us a token that reads 90 us, moves a 60 ms round by less than
    what re-planning costs -- a bandwidth step, a slower device or target move it by far more. (A plan
    that drafts nothing is priced as a round of one token: else a slow draft's 16 tokens -- half a
    second at 30 ms -- made a round trip that tripled look like jitter.)"""
    gap = scale = 0.0
    per_token = min(max(tokens, 1), 16)
    for name in _COST_NAMES:
        weight = per_token if name in _PER_TOKEN else 1
        x, y = weight * getattr(a, name), weight * getattr(b, name)
        gap += abs(x - y)
        scale += max(x, y)
    return gap <= tolerance * scale


def _round_tokens(plan: RoundPlan) -> int:
    """The tokens a segment's rounds draft under `plan`: the head, and the rounds ahead with their guesses."""
    return plan.best_length + plan.ahead * (plan.ahead_draft + 1)


_COST_NAMES = tuple(f.name for f in dataclasses.fields(SegmentCosts))
_PER_TOKEN = ("gamma", "beta", "pass_per_token")


def _near(a: tuple[float, ...], b: tuple[float, ...], tolerance: float) -> bool:
    """Two acceptance curves of the same length, each position within `tolerance`."""
    return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b))


MODES = ("pipesd", "vanilla", "hsl", "edgellm", "cloud_only", "edge_only", "tree", "pipesd_tree", "pipesd_chain",
         "pipesd_model", "pipesd_no_pipeline",
         "pipesd_bo",
         "pipesd_fixed", "pipesd_per_token", "pipesd_at_trigger", "pipesd_no_proactive", "pipesd_c_only",
         "pipesd_p_only")

# The controller's variants: (upload schedule, proactive, pipelined NAV, BO correction, branch depth). Schedule
# None: the objective's own (``PipeSD``: DP batches, at the trigger under cloud_cost); the ablations fix theirs.
# Branch depth (``PipeSD.branch_depth``): 0 chains alone, 1 the draft's runner-ups, more: drafted branches.
_CONTROLLED = {
    "pipesd": (None, True, True, True, 1),
    "pipesd_tree": (None, True, True, True, PipeSD.TREE_DEPTH),   # branches drafted under the runner-ups
    "pipesd_chain": (None, True, True, True, 0),                  # chains alone: the controller without trees
    "pipesd_model": (None, True, True, False, 1),           # the model alone, no BO correction
    "pipesd_no_pipeline": (None, True, False, False, 1),    # a kept proactive round waits for its own NAV
    "pipesd_per_token": (PerToken, True, True, False, 1),
    "pipesd_at_trigger": (AtTrigger, True, True, False, 1),
    "pipesd_no_proactive": (None, False, False, False, 1),
}
# The paper's dual threshold: which thresholds the trigger uses (pipesd_bo tunes both online).
_PAPER = {"pipesd_bo": "r1 r2", "pipesd_fixed": "r1 r2", "pipesd_c_only": "r1", "pipesd_p_only": "r2"}


def make_policy(mode: str, *, draft_k: int | None = None, r1: float | None = None, r2: float | None = None,
                tuner: OnlineAutotuner | CorrectionTuner | None = None, objective: str | None = None) -> Policy:
    """A fresh policy by name. Each mode takes only the arguments it uses; any other is a ConfigError.

    ``draft_k``: vanilla's draft length (default 4). ``r1`` / ``r2``: the thresholds of the paper's
    dual-threshold modes (``pipesd_bo``: fixing either switches its BO off; ``pipesd_fixed``,
    ``pipesd_c_only``, ``pipesd_p_only``), ``r2`` also HSL's (default 0.7). ``objective``: what the
    round controller minimises per token (``pipesd`` and its controller variants; default
    ``latency``). ``tuner``: ``pipesd``'s ``CorrectionTuner`` or ``pipesd_bo``'s ``OnlineAutotuner``
    (default: a fresh one).
    """
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    given = {name for name, value in (("draft_k", draft_k), ("r1", r1), ("r2", r2), ("tuner", tuner),
                                      ("objective", objective)) if value is not None}
    uses = {"vanilla": {"draft_k"}, "hsl": {"r2"}, "pipesd": {"tuner", "objective"},
            "pipesd_bo": {"r1", "r2", "tuner"}}.get(mode, set())
    if mode in _CONTROLLED and mode != "pipesd":
        uses = {"objective"}
    elif mode in _PAPER and mode != "pipesd_bo":
        uses = set(_PAPER[mode].split())
    if given - uses:
        unused = ", ".join(sorted(given - uses))
        takes = ", ".join(sorted(uses - {"tuner"})) or "no settings"
        hint = (" (its thresholds come from the round controller; fixed thresholds: mode 'pipesd_fixed')"
                if mode in _CONTROLLED and {"r1", "r2"} & given else "")
        raise ConfigError(f"mode {mode!r} has no use for {unused} (it takes {takes}){hint}")
    for name, value in (("r1", r1), ("r2", r2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not (0 < value <= 1 and math.isfinite(value))):
            raise ConfigError(f"{name} is a confidence threshold in (0, 1], not {value!r}")
    if objective is not None and objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, not {objective!r}")
    if mode == "edge_only":
        return EdgeOnly()
    if mode == "cloud_only":
        return CloudOnly()
    if mode == "tree":
        return TreeRounds()
    if mode == "vanilla":
        k = 4 if draft_k is None else draft_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_K:
            raise ConfigError(f"vanilla needs a draft length k in [1, {MAX_DRAFT_K}], got {k!r}")
        return Speculative(mode, FixedLength(k), max_draft=k)
    if mode == "hsl":
        return Speculative(mode, LastTokenConfidence(0.7 if r2 is None else r2))
    if mode == "edgellm":
        return Speculative(mode, AdaptiveCumulative(), proactive=True)
    if mode in _CONTROLLED:
        schedule, proactive, pipelined, corrected, branch_depth = _CONTROLLED[mode]
        objective = objective or "latency"
        if tuner is not None and not isinstance(tuner, CorrectionTuner):
            raise ConfigError("pipesd's tuner is a CorrectionTuner (an OnlineAutotuner tunes pipesd_bo)")
        if corrected and tuner is None and objective == "latency":
            tuner = CorrectionTuner()      # it scores seconds per token: a correction for latency only
        return PipeSD(mode, objective=objective, schedule=schedule() if schedule is not None else None,
                      proactive=proactive, pipelined=pipelined, tuner=tuner, branch_depth=branch_depth)
    thresholds = _PAPER[mode]
    trigger = DualThreshold(DEFAULT_R1 if r1 is None else r1, DEFAULT_R2 if r2 is None else r2)
    if "r1" not in thresholds:
        trigger.r1 = None
    if "r2" not in thresholds:
        trigger.r2 = None
    if tuner is not None and not isinstance(tuner, OnlineAutotuner):
        raise ConfigError("pipesd_bo's tuner is an OnlineAutotuner")
    if mode == "pipesd_bo" and (r1 is not None or r2 is not None):
        if tuner is not None:
            raise ConfigError("pipesd_bo takes fixed thresholds (r1, r2) or a tuner, not both")
    elif mode == "pipesd_bo":
        tuner = tuner if tuner is not None else OnlineAutotuner()
    return PaperPipeSD(mode, trigger, DPSchedule(), tuner=tuner)
