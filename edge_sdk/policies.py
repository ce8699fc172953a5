"""Decoding policies: the strategy the engine asks, round by round. Plain objects, no I/O.

The engine never looks inside a policy; it asks four questions and reports one answer, in
the spirit of transformers' ``CandidateGenerator`` (``get_candidates`` /
``update_candidate_strategy``):

* ``start_round(link)`` -- a round begins; here is the link as profiled now (plan, tune);
* ``verify_now(draft)`` -- after each drafted token: stop and ask for NAV?
* ``closes_batch(n)`` -- if not: does the n-th token close a batch that goes up at once?
* ``on_verdict(verdict)`` -- NAV answered: learn from it (adaptive thresholds, the window, the tuner);

plus three plain facts: ``uses_cloud``, ``proactive`` (draft the next round while NAV is in
flight) and ``max_draft`` (a round's length cap; 0: the target decodes alone). So PipeSD and the
paper's baselines run on one engine:

| policy | verify when | batches | drafts during NAV |
|---|---|---|---|
| vanilla | every k tokens | whole draft at the trigger | no |
| hsl | P(d_n) < R2 | whole draft at the trigger | no |
| edgellm | C_n < adaptive threshold | whole draft at the trigger | yes (uploaded at the next trigger) |
| pipesd | C_n < R1 or P(d_n) < R2, tuned online by BO | DP token batches | yes, uploaded as drafted |

and the ablations ``pipesd_per_token``, ``pipesd_at_trigger`` (no DP), ``pipesd_c_only``,
``pipesd_p_only`` (single threshold), ``pipesd_no_proactive`` and ``pipesd_fixed`` (no BO);
``cloud_only`` (the target alone, the reference output) and ``edge_only`` (the draft alone).
``make_policy`` builds one by name and refuses arguments the mode has no use for.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

from .autotune import OnlineAutotuner
from .drafter import DraftToken
from .errors import ConfigError
from .profiler import LinkEstimate
from .scheduling import AtTrigger, DPSchedule, PerToken, UploadSchedule
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

    @property
    def committed(self) -> int:
        """Tokens the round added to the output: the accepted ones plus the target's own."""
        return self.accepted + 1


class Policy:
    """A decoding strategy. Subclasses answer the engine's questions; these defaults decide nothing."""

    name: str = "policy"
    uses_cloud: bool = True     # False: the draft's tokens are the output (edge_only)
    proactive: bool = False     # keep drafting the next round while NAV is in flight
    max_draft: int = MAX_DRAFT  # a round's draft cap (0: no draft, the target decodes alone)

    def start_round(self, link: LinkEstimate) -> None:
        """A round begins; `link` is what the profiler measures now."""

    def verify_now(self, draft: Sequence[DraftToken]) -> bool:
        """After each drafted token (the round's draft so far): ask for NAV now?"""
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

    def verify_now(self, draft: Sequence[DraftToken]) -> bool:
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


class PipeSD(Speculative):
    """PipeSD: the dual threshold C_n < R1 or P(d_n) < R2, DP token batches, proactive drafting.

    With a ``tuner`` it owns its tuning: each round starts at the thresholds the tuner proposes
    (a candidate while it explores, the best known for the network regime once it has settled),
    and each verdict scores them by seconds per committed token. Without one the thresholds stay.
    """

    def __init__(self, name: str = "pipesd", trigger: DualThreshold | None = None,
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

    def reproducible(self) -> "PipeSD":
        r1, r2 = self.thresholds
        return PipeSD(self.name, DualThreshold(r1, r2), copy.deepcopy(self.schedule), proactive=self.proactive,
                      max_draft=self.max_draft)


MODES = ("pipesd", "vanilla", "hsl", "edgellm", "cloud_only", "edge_only", "pipesd_fixed", "pipesd_per_token",
         "pipesd_at_trigger", "pipesd_c_only", "pipesd_p_only", "pipesd_no_proactive")

# PipeSD's variants: (upload schedule, proactive, which thresholds the trigger uses).
_PIPESD = {
    "pipesd": (DPSchedule, True, "r1 r2"),
    "pipesd_fixed": (DPSchedule, True, "r1 r2"),
    "pipesd_per_token": (PerToken, True, "r1 r2"),
    "pipesd_at_trigger": (AtTrigger, True, "r1 r2"),
    "pipesd_c_only": (DPSchedule, True, "r1"),
    "pipesd_p_only": (DPSchedule, True, "r2"),
    "pipesd_no_proactive": (DPSchedule, False, "r1 r2"),
}


def make_policy(mode: str, *, draft_k: int | None = None, r1: float | None = None, r2: float | None = None,
                tuner: OnlineAutotuner | None = None) -> Policy:
    """A fresh policy by name. Each mode takes only the arguments it uses; any other is a ConfigError.

    ``draft_k``: vanilla's draft length (default 4). ``r1`` / ``r2``: the thresholds of the PipeSD
    modes (fixing either switches ``pipesd``'s online tuning off), ``r2`` also HSL's (default 0.7).
    ``tuner``: the online autotuner ``pipesd`` uses (default: a fresh ``OnlineAutotuner``).
    """
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    given = {name for name, value in (("draft_k", draft_k), ("r1", r1), ("r2", r2), ("tuner", tuner))
             if value is not None}
    uses = {"vanilla": {"draft_k"}, "hsl": {"r2"}, "pipesd": {"r1", "r2", "tuner"}}.get(mode, set())
    if mode in _PIPESD and mode != "pipesd":
        uses = set(_PIPESD[mode][2].split())
    if given - uses:
        unused = ", ".join(sorted(given - uses))
        takes = ", ".join(sorted(uses - {"tuner"})) or "no settings"
        raise ConfigError(f"mode {mode!r} has no use for {unused} (it takes {takes})")
    for name, value in (("r1", r1), ("r2", r2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not (0 < value <= 1 and math.isfinite(value))):
            raise ConfigError(f"{name} is a confidence threshold in (0, 1], not {value!r}")
    if mode == "edge_only":
        return EdgeOnly()
    if mode == "cloud_only":
        return CloudOnly()
    if mode == "vanilla":
        k = 4 if draft_k is None else draft_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_K:
            raise ConfigError(f"vanilla needs a draft length k in [1, {MAX_DRAFT_K}], got {k!r}")
        return Speculative(mode, FixedLength(k), max_draft=k)
    if mode == "hsl":
        return Speculative(mode, LastTokenConfidence(0.7 if r2 is None else r2))
    if mode == "edgellm":
        return Speculative(mode, AdaptiveCumulative(), proactive=True)
    schedule, proactive, thresholds = _PIPESD[mode]
    trigger = DualThreshold(DEFAULT_R1 if r1 is None else r1, DEFAULT_R2 if r2 is None else r2)
    if "r1" not in thresholds:
        trigger.r1 = None
    if "r2" not in thresholds:
        trigger.r2 = None
    if mode == "pipesd" and (r1 is not None or r2 is not None):
        if tuner is not None:
            raise ConfigError("pipesd takes fixed thresholds (r1, r2) or a tuner, not both")
    elif mode == "pipesd":
        tuner = tuner if tuner is not None else OnlineAutotuner()
    return PipeSD(mode, trigger, schedule(), proactive=proactive, tuner=tuner)
