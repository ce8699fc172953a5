"""pipesd bench: the paper's evaluation (docs/design.md §4) with real models and a real verifier.

    pipesd bench --out docs/bench                  # every scenario, both regimes, >= 1000 tokens each
    pipesd bench --quick --out /tmp/bench          # one scenario, a few prompts: a smoke run

For each model pair one verifier process runs on loopback; every method is an ``EdgeClient``
of its own (own drafter, own emulated link: ``scenarios.py``). Per scenario and regime:

1. PipeSD's BO autotuner tunes online until it has finished its 16 evaluations (the paper tuned
   before measuring); the PipeSD ablations then run at the thresholds it found, so each differs
   from PipeSD in one respect only. Baselines use their own published settings.
2. One warm-up prompt per method (profiler, DP plan), not counted.
3. Methods take turns prompt by prompt until each has >= ``min_tokens`` output tokens, so machine
   drift touches all alike. TPT = total time / total output tokens.
4. Every speculative method's output is compared with the target's own greedy decoding of the
   same prompt (``cloud_only`` without an emulated link): ``lossless`` counts mismatches.

Outputs under ``--out``: ``results.csv`` (every figure of every cell), ``results.md`` (the paper's
table shape, details, lower bound), ``results.json``, and PNG plots when matplotlib is installed
(``pip install pipesd[bench]``): TPT per method and scenario, bandwidth sweep, pipeline timeline,
BO vs grid vs random search.

The analytic lower bound (``lower_bound_tpt``) is the floor for a speculative decoder of our protocol that
proposes with the draft model and one looked-up guess a round, from the cell's measured γ, one-token pass,
RTT and positions per rejection (an estimate: see there); ``efficiency`` is
bound / TPT. The *stack floor* is the same bound with each run's one unavoidable request costing, beyond its
round trip and pass, what a request costs on this stack (edge turnaround, sealing, HTTP, the verifier's
dispatch) as ``cloud_only`` pays it in the same cell: the part of the gap to the bound that no policy can
close without a faster stack. ``earlier_bound_tpt`` (the bound of the runs before the segment controller, looser) is
reported next to it so that the two can be compared.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from edge_sdk import EdgeClient, LlamaCppDrafter, make_policy
from edge_sdk.autotune import GridTuner, OnlineAutotuner, RandomTuner, SkoptTuner
from edge_sdk.chat import ChatTemplate
from edge_sdk.controller import OBJECTIVES
from edge_sdk.policies import PipeSD
from edge_sdk.policies import MODES

from .emulation import EmulatedLink, SlowedDrafter
from .scenarios import DEVICE_VERIFIER_ARGS, PAYLOADS, REGIMES, SCENARIOS, Scenario, get_scenario

PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n\n", "class Stack:\n    def __init__(self):\n",
           "    def __repr__(self):\n        return ", "for i in range(10):\n", 'if __name__ == "__main__":\n',
           "def read_file(path):\n    with open(path) as f:\n", "try:\n    import threading\nexcept ImportError:\n",
           '        raise ValueError("', '"""Utilities for', "def _check_arg(name, value):\n", "        return self._",
           "from collections import", "class Error(Exception):\n", "    @property\n    def name(self):\n",
           "def main(argv=None):\n    parser = argparse."]
# SmolLM2 is an instruct model: its pairs run chat turns (rendered by the GGUF's own template, as
# EdgeClient.chat does) between the code prompts. None is a training prompt of the SmolLM2 draft builder.
CHAT_QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a list.",
                  "Give me three ideas for a rainy afternoon.", "Explain what an API is.",
                  "What is the difference between a list and a tuple in Python?", "Name three colours.",
                  "How do I read a file line by line in Python?", "Why is the sky blue?"]
BASELINES = ("vanilla", "hsl", "edgellm")
MAIN_METHODS = ("cloud_only", "edge_only", "vanilla", "hsl", "edgellm", "pipesd")
# What each piece of PipeSD buys: the controller without its BO correction, no pipelined NAV (rounds
# drafted ahead wait for the verdict before them), the paper's BO-tuned dual threshold instead of the
# controller, no DP batches (two ways), nothing drafted ahead. The paper's
# threshold ablations (pipesd_fixed, pipesd_c_only, pipesd_p_only) run with --methods.
# The controller with chains alone and with drafted branches (issue 19), beside ``pipesd`` in every cell
# they are asked for (its runner-up siblings sit between the two).
TREE_METHODS = ("pipesd_chain", "pipesd_tree")
ABLATIONS = ("pipesd_model", "pipesd_no_pipeline", "pipesd_bo", "pipesd_per_token", "pipesd_at_trigger",
             "pipesd_no_proactive")
PAPER_TRIGGER = ("pipesd_bo", "pipesd_fixed", "pipesd_c_only", "pipesd_p_only")   # share pipesd_bo's thresholds
SWEEP_MBPS = (10.0, 20.0, 40.0, 80.0)


def _controller_counts(policy):
    """(decisions, decide_s, rounds, plan_s, idle_s, cloud-only rounds, calibration, structures) of a round
    controller, else None."""
    if not isinstance(policy, PipeSD):
        return None
    return (policy.decisions, policy.decide_s, policy.rounds, policy.plan_s, policy.idle_s, policy.cloud_only_rounds,
            copy.deepcopy(policy.model.calibration), copy.copy(policy.structures))


def _controller_report(tally: "Tally", policy, before) -> None:
    """What the controller did during the measured part of a cell (warm-up and tuning excluded)."""
    decisions, decide_s, rounds, plan_s, idle_s, cloud_rounds, cal0, structures = before
    measured = policy.model.calibration.since(cal0)
    if measured.count:
        tally.brier, tally.raw_brier = measured.brier, measured.raw_brier
        tally.reliability = [list(b) for b in measured.reliability()]
    if policy.decisions > decisions:
        tally.decide_us = 1e6 * (policy.decide_s - decide_s) / (policy.decisions - decisions)
    if policy.rounds > rounds:
        tally.plan_us = 1e6 * (policy.plan_s - plan_s) / (policy.rounds - rounds)
        tally.idle_plan_us = 1e6 * (policy.idle_s - idle_s) / (policy.rounds - rounds)
    tally.cloud_only_rounds = policy.cloud_only_rounds - cloud_rounds
    tally.r1, tally.r2 = policy.thresholds
    chosen = policy.structures - structures
    total = sum(chosen.values()) or 1
    tally.structures = [[*k, n / total] for k, n in chosen.most_common(3)]    # the top three, share of all rounds


def method_known(method: str) -> bool:
    """A mode name, or a controller mode with its objective ("pipesd:cloud_cost")."""
    mode, sep, objective = method.partition(":")
    if not sep:
        return mode in MODES
    return mode in MODES and mode.startswith("pipesd") and mode not in PAPER_TRIGGER and objective in OBJECTIVES


@dataclass
class Tally:
    """Sums over the generations of one method in one cell (pair x regime x scenario)."""

    pair: str
    regime: str
    scenario: str
    method: str
    generations: int = 0
    tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    rollbacks: int = 0
    batches: int = 0
    passes: int = 0                # target passes the verifier ran for this method's verdicts
    guesses: int = 0               # guesses of the target's next token a verdict checked (pipelined rounds)
    guesses_right: int = 0
    lookups: int = 0               # of those, looked up (edge_sdk.lookup), not drafted
    lookups_right: int = 0
    # Token trees: branch nodes sent with chains, rounds that kept a branch, branch nodes those kept
    # (``GenerationStats.leaves_*``), and the nodes of whole-tree rounds (the ``tree`` mode).
    branch_nodes: int = 0
    branches_taken: int = 0
    branch_nodes_kept: int = 0
    tree_nodes: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    draft_s: float = 0.0
    upload_s: float = 0.0
    wait_s: float = 0.0
    verify_s: float = 0.0
    mismatches: int = 0            # generations whose tokens differ from target greedy (-1: not checked)
    unverified: int = 0            # tokens emitted by the draft alone after a failed NAV (offline fallback)
    lower_bound_ms: float = 0.0
    no_rebase_bound_ms: float = 0.0    # lower_bound_tpt without rebased rounds: the bound of the runs before them
    earlier_bound_ms: float = 0.0  # earlier_bound_tpt: the looser bound of the earlier runs, for comparison
    stack_floor_ms: float = math.nan   # the bound with this stack's own cost per request (see Bench._bound)
    ttft_s: float = 0.0
    r1: float | None = None
    r2: float | None = None
    # The round controller's (pipesd and its controller ablations): acceptance-model calibration over
    # the cell (prequential: Brier, the raw confidence's Brier, reliability bins), what deciding cost.
    brier: float | None = None
    raw_brier: float | None = None
    reliability: list | None = None
    decide_us: float | None = None       # per drafted token (verify_now)
    plan_us: float | None = None         # per round (start_round: on the path)
    idle_plan_us: float | None = None    # per round (PipeSD.idle: while the engine waits for a verdict)
    cloud_only_rounds: int = 0
    structures: list | None = None       # the controller's top three (head, rounds ahead, their drafts, share of rounds)

    def add(self, stats, matches: bool | None) -> None:
        self.generations += 1
        self.tokens += stats.output_tokens
        self.seconds += stats.total_s
        self.ttft_s += stats.ttft_s
        self.drafted += stats.draft_n
        self.accepted += stats.draft_n_accepted
        self.rounds += stats.nav_rounds
        self.rollbacks += stats.rollback_rounds
        self.batches += stats.batches_sent
        self.passes += stats.target_passes
        self.guesses += stats.guesses_checked
        self.guesses_right += stats.guesses_right
        self.lookups += stats.lookups_checked
        self.lookups_right += stats.lookups_right
        self.bytes_up += stats.bytes_up
        self.bytes_down += stats.bytes_down
        self.draft_s += stats.draft_s
        self.upload_s += stats.upload_s
        self.wait_s += stats.wait_s
        self.verify_s += stats.verify_s
        self.unverified += stats.unverified_tokens if self.method != "edge_only" else 0
        self.branch_nodes += stats.leaves_sent
        self.branches_taken += stats.leaves_accepted
        self.branch_nodes_kept += stats.leaves_kept
        self.tree_nodes += stats.tree_nodes
        if matches is None:
            self.mismatches = -1
        elif not matches:
            self.mismatches += 1

    @property
    def tpt_ms(self) -> float:
        return 1e3 * self.seconds / self.tokens if self.tokens else math.nan

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def positions_per_rejection(self) -> float:
        """Draft positions checked per rejection: drafted tokens up to each round's first rejection and
        the drafted guesses verdicts checked, over the rejections among them (1 / (1 - a), a the
        per-position acceptance as a geometric model would fit it). Looked-up guesses: their own figure."""
        return _runs(self.accepted + self.guesses_right - self.lookups_right,
                     self.rollbacks + (self.guesses - self.lookups) - (self.guesses_right - self.lookups_right))

    @property
    def lookup_positions_per_rejection(self) -> float:
        """The same for looked-up guesses (each checks one position)."""
        return _runs(self.lookups_right, self.lookups - self.lookups_right)

    @property
    def rollback_rate(self) -> float:
        return self.rollbacks / self.rounds if self.rounds else math.nan

    @property
    def efficiency(self) -> float:
        return self.lower_bound_ms / self.tpt_ms if self.tokens and self.lower_bound_ms else math.nan

    @property
    def no_rebase_efficiency(self) -> float:
        return self.no_rebase_bound_ms / self.tpt_ms if self.tokens and self.no_rebase_bound_ms else math.nan

    @property
    def stack_efficiency(self) -> float:
        return self.stack_floor_ms / self.tpt_ms if self.tokens and self.stack_floor_ms > 0 else math.nan

    @property
    def earlier_efficiency(self) -> float:
        return self.earlier_bound_ms / self.tpt_ms if self.tokens and self.earlier_bound_ms else math.nan

    def row(self) -> dict:
        d = asdict(self)
        per_token = lambda x: x / self.tokens if self.tokens else math.nan   # noqa: E731
        d.update(tpt_ms=self.tpt_ms, acceptance=self.acceptance, rollback_rate=self.rollback_rate,
                 mean_draft_len=self.drafted / self.rounds if self.rounds else math.nan,
                 committed_per_round=self.tokens / self.rounds if self.rounds else math.nan,
                 up_bytes_per_token=per_token(self.bytes_up), down_bytes_per_token=per_token(self.bytes_down),
                 draft_ms_per_token=1e3 * per_token(self.draft_s), upload_ms_per_token=1e3 * per_token(self.upload_s),
                 wait_ms_per_token=1e3 * per_token(self.wait_s), verify_ms_per_token=1e3 * per_token(self.verify_s),
                 efficiency=self.efficiency, no_rebase_efficiency=self.no_rebase_efficiency, earlier_efficiency=self.earlier_efficiency,
                 stack_efficiency=self.stack_efficiency,
                 passes_per_token=per_token(self.passes), batches_per_token=per_token(self.batches),
                 positions_per_rejection=self.positions_per_rejection)
        return d


def _runs(right: int, rejections: int) -> float:
    """Positions per rejection from positions found right and rejections (inf: never rejected; nan: none)."""
    if not rejections:
        return math.inf if right else math.nan
    return (right + rejections) / rejections


def lower_bound_tpt(gamma: float, verify: float, rtt: float, positions: float, rebased: float = 1.0) -> float:
    """Seconds per output token no speculative decoder of our protocol can beat, in expectation, for
    runs of `positions` between rejections, each followed by up to `rebased` rebased tokens.

    The protocol: the edge proposes tokens, and every verdict adds the target's own token after what it
    verified. Along the target's output, count the positions from one rejection to the next (the draft
    proposes a token the target would not have produced): `positions` of them on average, the last
    being the target's correction. Each of the others must be known at the cloud before the correction
    can be computed, either drafted by the edge -- one at a time, at least gamma each (sent as a guess
    it needs no upload at all: the verifier checks it by the prefix hash) --, or guessed at no cost by
    lookup (``edge_sdk.lookup``: one guess a round, so each verified in a pass of its own, after the
    pass that checks the position before it), or as the target's own token, one per verdict, a round
    trip each (the verdict that holds it cannot leave before the one holding the token before it came
    back). The correction comes in a verdict that leaves no earlier than the token before it, and takes a
    round trip: rtt plus one pass. So a run of p positions takes at least (p - 1) min(gamma, verify) +
    rtt + verify, whatever the batching, the pipelining or the stopping rule; the target alone
    (positions = 1) is the special case. Pipelined NAV cannot beat it: it overlaps rounds, not a round
    trip with the token it waits for. (Before looked-up guesses the per-position term was min(gamma,
    rtt + verify): a draft slower than a pass bounded its cell by drafting, which a free guess undercuts.)

    Rebased rounds (``VerifyRequest.after``) add tokens, not speed: a round sent on one whose verdict
    then rejects is answered with the target's next token one pass after that verdict, without a
    round trip of its own -- at most one such token per verdict (rebased answers never chain), so at
    most one per rejection, and it takes nothing off the run's serial path above. A run then commits
    up to p + `rebased` tokens in that time: the bound divides by that (rebased=0: the bound before
    them, which the bench reports next to it).

    What makes it an estimate rather than a certainty is `positions`: the bench measures it on the
    positions the cell's methods checked (``Tally.positions_per_rejection``, or the looked-up guesses'
    figure where their runs are longer), not on every position of the target's output, so a method that
    checks where the draft is surer could see longer runs. inf (never rejected) gives min(gamma, verify)
    per token; NaN (nothing checked) the target alone (its round trip over 1 + `rebased` tokens).

    Its scope is this SDK's proposers: the draft model, and one looked-up guess a round. A decoder that
    sent several looked-up tokens in one round (a prompt-lookup drafter) would have positions at no
    cost and no pass of their own, and could go below it.
    """
    round_trip, per_position = rtt + verify, min(gamma, verify)
    if math.isinf(positions):
        return per_position
    p = max(1.0, positions) if math.isfinite(positions) else 1.0
    return ((p - 1) * per_position + round_trip) / (p + rebased)


def earlier_bound_tpt(gamma: float, beta: float, verify: float, rtt: float, a: float, max_n: int = 64) -> float:
    """The bound the bench reported before ``lower_bound_tpt``: kept for comparison only.

    A round drafts n tokens, taking at least max(nγ, nβ); a rejection (probability 1 - a^n for a
    geometric per-token acceptance a) exposes verify + a round trip; a fully accepted round hides them
    and its bonus token comes free. Best n, n = 0 (the target alone) included. A floor too, but a loose
    one: once the next round is pipelined on a guess, the bonus token must itself be drafted (γ), which
    this bound never charges.
    """
    a = min(max(a, 0.0), 0.999)
    best = verify + rtt
    for n in range(1, max_n + 1):
        accepted = a * (1 - a ** n) / (1 - a) if a > 0 else 0.0
        cost = max(n * gamma, n * beta) + (1 - a ** n) * (verify + rtt)
        best = min(best, cost / (accepted + 1))
    return best


def draft_seconds_per_token(drafter) -> float:
    """Real seconds per drafted token of `drafter` on this machine: 64 tokens after 8 of warm-up."""
    drafter.set_context(drafter.tokenize(PROMPTS[0]))
    for _ in range(8):
        drafter.next_token()
    t = time.perf_counter()
    for _ in range(64):
        drafter.next_token()
    return (time.perf_counter() - t) / 64


@dataclass
class BenchConfig:
    pairs: tuple[str, ...] = ("embedded",)
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    regimes: tuple[str, ...] = REGIMES
    methods: tuple[str, ...] = MAIN_METHODS + ABLATIONS
    ablation_scenarios: tuple[str, ...] = ("s1",)   # where the pipesd_* ablations run (all: every scenario)
    payload: str = "ids"
    objective: str = "latency"        # what PipeSD's controller (and its controller ablations) minimise
    min_tokens: int = 1000
    tokens_per_prompt: int = 64
    max_tune_prompts: int = 60
    warmup: int = 1
    seed: int = 0
    pin: bool = False
    sweep: bool = True
    sweep_regime: str = "paper"
    sweep_tokens: int = 300
    timeline: bool = True
    tuners: bool = True
    tuner_regime: str = "paper"
    verifier_threads: int = 1
    out: Path = Path("bench-results")
    progress: bool = True
    extra: dict = field(default_factory=dict)


class Bench:
    """Runs a ``BenchConfig``; see the module docstring for the procedure."""

    def __init__(self, config: BenchConfig):
        self.config = config
        self.results: list[Tally] = []
        self.sweep: list[Tally] = []
        self.timelines: dict[str, list] = {}
        self.tuner_runs: dict[str, list] = {}
        self.tuned: dict[tuple, tuple[float, float]] = {}
        self.gamma: dict[str, float] = {}
        self.vocab: dict[str, int] = {}
        self.prompts: dict[str, list] = {}   # per pair: text, or token ids where the prompt has control tokens
        self._references: dict[tuple, list[int]] = {}
        self._ref_clients: dict = {}
        self.commit = git_commit()      # the code that runs, not whatever is checked out when it ends

    # -- building blocks ----------------------------------------------------------------
    def pin_cores(self):
        """Edge on all cores but the last, verifier on the last: they do not steal each other's CPU."""
        cores = sorted(os.sched_getaffinity(0))
        if not self.config.pin or len(cores) < 2:
            return None
        os.sched_setaffinity(0, cores[:-1])
        return {cores[-1]}

    def _drafter(self, pair: str, added_s: float):
        from pipesd_models import pair_paths

        return SlowedDrafter(LlamaCppDrafter(pair_paths(pair)[0], threads=1), added_s)

    def prepare(self, pair: str) -> None:
        """What every run on `pair` needs, measured once: its draft's real seconds per token on this machine
        (``gamma``, 1 thread), its vocabulary size and its prompts (chat turns between code prompts for
        SmolLM2 pairs)."""
        drafter = self._drafter(pair, 0.0).inner
        self.vocab[pair] = drafter.vocab_size
        self.prompts[pair] = self._pair_prompts(pair, drafter)
        self.gamma[pair] = draft_seconds_per_token(drafter)

    @staticmethod
    def _pair_prompts(pair: str, drafter) -> list:
        if not pair.startswith("smollm2"):
            return list(PROMPTS)
        # a chat turn, then a code prompt, ..., then the other code prompts
        template = ChatTemplate.for_drafter(drafter)
        chats = [tuple(drafter.tokenize(template.render([{"role": "user", "content": q}]), special=True))
                 for q in CHAT_QUESTIONS]
        return [p for turn in zip(chats, PROMPTS) for p in turn] + PROMPTS[len(chats):]

    def client(self, verifier, pair: str, scenario: Scenario, regime: str, method: str, r1=None, r2=None,
               up_mbps: float | None = None, make_tuner=None) -> EdgeClient:
        """An edge client of its own for `method`: its own drafter (slowed to the scenario's device) and
        its own emulated link to `verifier`. ``make_tuner``: PipeSD's tuner backend (BO, grid, random)."""
        drafter = self._drafter(pair, scenario.added_draft_seconds(regime, self.gamma[pair]))
        link = scenario.link(regime, self.config.payload, seed=self.config.seed, up_mbps=up_mbps,
                             vocab_size=drafter.vocab_size)
        thresholds = {"r1": r1, "r2": r2} if r1 is not None and method in PAPER_TRIGGER else {}
        if method == "pipesd_c_only":
            thresholds.pop("r2", None)
        elif method == "pipesd_p_only":
            thresholds.pop("r1", None)
        tuner = OnlineAutotuner(make_tuner=make_tuner) if make_tuner is not None else None
        mode, _, objective = method.partition(":")           # "pipesd:cloud_cost": the controller's objective
        if not objective and mode.startswith("pipesd") and mode not in PAPER_TRIGGER:
            objective = self.config.objective
        policy = make_policy(mode, tuner=tuner, objective=objective or None, **thresholds)
        return EdgeClient(verifier=EmulatedLink.http(verifier.url, link, verifier_key=verifier.public_key),
                          drafter=drafter, mode=policy)

    def _reference(self, pair: str, prompt: str) -> list[int]:
        """The target's own greedy decoding of `prompt` (cloud_only, no emulated link), cached."""
        key = (pair, prompt)
        if key not in self._references:
            self._references[key] = self._ref_clients[pair].generate(prompt, max_new_tokens=self.config.tokens_per_prompt,
                                                        mode="cloud_only").tokens
        return self._references[key]

    def tune(self, client, prompts, bar=None) -> int:
        """Generate with a tuning policy until its tuner has finished (or the prompt cap): pipesd_bo's
        OnlineAutotuner, pipesd's CorrectionTuner."""
        policy, used = client.policy(), 0
        tuner = getattr(policy, "tuner", None)
        if tuner is None:
            return 0
        busy = (lambda: tuner.tuning or not tuner.memory) if isinstance(tuner, OnlineAutotuner) else (lambda: tuner.tuning)
        while busy() and used < self.config.max_tune_prompts:
            client.generate(prompts[used % len(prompts)], max_new_tokens=self.config.tokens_per_prompt)
            used += 1
            tuner.wait()
            if bar is not None:
                done = tuner.trials_done if isinstance(tuner, OnlineAutotuner) else len(tuner.evaluations)
                bar.set_postfix_str(f"tuning {policy.name}: {done} candidates")
        return used

    def _interleave(self, pair: str, clients: dict, tallies: dict, min_tokens: int, bar=None) -> None:
        """Methods take turns, prompt by prompt, until each has `min_tokens` output tokens."""
        i = 0
        prompts = self.prompts[pair]
        while any(t.tokens < min_tokens for t in tallies.values()):
            prompt = prompts[i % len(prompts)]
            i += 1
            for method, client in clients.items():
                tally = tallies[method]
                if tally.tokens >= min_tokens:
                    continue
                result = client.generate(prompt, max_new_tokens=self.config.tokens_per_prompt)
                matches = None if method == "edge_only" else result.tokens == self._reference(tally.pair, prompt)
                tally.add(result.stats, matches)
                if bar is not None:
                    bar.update(min(result.stats.output_tokens, max(0, min_tokens - tally.tokens
                                                                     + result.stats.output_tokens)))

    # -- one cell -------------------------------------------------------------------------
    def methods_in(self, scenario: str) -> tuple[str, ...]:
        ablate = "all" in self.config.ablation_scenarios or scenario in self.config.ablation_scenarios
        return tuple(m for m in self.config.methods if ablate or not m.startswith("pipesd_") or m in TREE_METHODS)

    def run_cell(self, verifier, pair: str, scenario: Scenario, regime: str, bar=None) -> list[Tally]:
        methods = self.methods_in(scenario.name)
        tallies = {m: Tally(pair, regime, scenario.name, m) for m in methods}
        clients = {}
        try:
            r1 = r2 = None
            for m in ("pipesd",) + TREE_METHODS:     # the controller's BO correction settles first
                if m in methods:
                    clients[m] = self.client(verifier, pair, scenario, regime, m)
                    self.tune(clients[m], self.prompts[pair], bar)
            if any(m in PAPER_TRIGGER for m in methods):    # the paper's trigger: BO first, as the paper did
                clients["pipesd_bo"] = self.client(verifier, pair, scenario, regime, "pipesd_bo")
                self.tune(clients["pipesd_bo"], self.prompts[pair], bar)
                r1, r2 = clients["pipesd_bo"].policy().thresholds
                self.tuned[(pair, regime, scenario.name)] = (r1, r2)
            for m in methods:
                if m not in clients:
                    fixed = m in PAPER_TRIGGER and r1 is not None
                    clients[m] = self.client(verifier, pair, scenario, regime, m, *((r1, r2) if fixed else ()))
                if m in PAPER_TRIGGER:
                    tallies[m].r1, tallies[m].r2 = r1, r2
            if "pipesd_bo" not in methods and "pipesd_bo" in clients:   # tuned only for the ablations' thresholds
                clients.pop("pipesd_bo").close()
            for m, client in clients.items():   # warm-up: the profiler and the DP plan
                for p in self.prompts[pair][-self.config.warmup:] if self.config.warmup else ():
                    client.generate(p, max_new_tokens=self.config.tokens_per_prompt)
            before = {m: _controller_counts(c.policy()) for m, c in clients.items()}
            self._interleave(pair, clients, tallies, self.config.min_tokens, bar)
            for m, c in clients.items():
                if m in tallies and before[m] is not None:
                    _controller_report(tallies[m], c.policy(), before[m])
        finally:
            for c in clients.values():
                c.close()
        self._bound(tallies, scenario, regime)
        return list(tallies.values())

    def _bound(self, tallies: dict, scenario: Scenario, regime: str) -> None:
        """The analytic lower bound from this cell's measurements, and each method's efficiency."""
        # The chain protocol's bound: a tree method (several candidates a position) is measured against it
        # but does not set it.
        sd = [t for t in tallies.values() if (t.drafted or t.guesses) and t.method not in ("edge_only", "tree")]
        if not sd:
            return
        pooled = Tally(sd[0].pair, regime, scenario.name, "pooled")
        for t in sd:
            for name in ("accepted", "rollbacks", "guesses", "guesses_right", "lookups", "lookups_right"):
                setattr(pooled, name, getattr(pooled, name) + getattr(t, name))
        # The device's draft time per token as the scenario sets it (draft_s also holds prefill and
        # discarded proactive drafting, which would inflate the bound).
        measured = self.gamma.get(sd[0].pair, 0.0)
        gamma = measured + scenario.added_draft_seconds(regime, measured)
        link = scenario.link(regime, self.config.payload, seed=self.config.seed,
                             vocab_size=self.vocab.get(sd[0].pair, 2048))
        # The fastest pass the cell saw: cloud_only's one-token pass if it ran, else the smallest mean
        # pass per round of a speculative method (longer than a one-token pass: the bound is then higher).
        passes = [t.verify_s / t.rounds for t in tallies.values() if t.rounds and t.method == "cloud_only"]
        verify = passes[0] if passes else min(t.verify_s / t.rounds for t in sd if t.rounds)
        # Runs as long as the draft's or as the lookup's, whichever is longer: either source may fill a position.
        runs = [x for x in (pooled.positions_per_rejection, pooled.lookup_positions_per_rejection) if not math.isnan(x)]
        p = max(runs) if runs else math.nan
        bound = 1e3 * lower_bound_tpt(gamma, verify, link.rtt_ms / 1e3, p)
        no_rebase = 1e3 * lower_bound_tpt(gamma, verify, link.rtt_ms / 1e3, p, 0.0)
        # The earlier bound, as it was computed: geometric acceptance, β from the sealed bytes up per
        # drafted token at the fastest uplink, the mean pass per round.
        drafted = sum(t.drafted for t in sd)
        a = pooled.accepted / max(1, pooled.accepted + pooled.rollbacks)
        up_mbps = max(s[1] for s in link.trace.segments) if link.trace else link.up_mbps
        beta = (sum(t.bytes_up for t in sd) / max(1, drafted) + link.payload_bytes_per_token) * 8 / (up_mbps * 1e6)
        mean_pass = sum(t.verify_s for t in sd) / max(1, sum(t.rounds for t in sd))
        earlier = 1e3 * earlier_bound_tpt(gamma, beta, mean_pass, link.rtt_ms / 1e3, a)
        # The stack's floor (an estimate): the bound with each run's one unavoidable request (the one that
        # brings its correction: whatever went up before the edge knew the token before it was built on a
        # wrong one) costing what a request costs on this stack beyond its round trip and pass -- the edge's
        # turnaround, sealing, HTTP both ways, the verifier's dispatch, the link's transfer of its bytes -- as
        # `cloud_only` pays it in this cell: its time per request after each generation's first token
        # (prefill and session opening left out), less RTT and its mean pass (prefill passes included, so
        # the figure errs low). Where cloud_only did not run: not reported.
        alone = [t for t in tallies.values() if t.method == "cloud_only" and t.rounds > t.generations]
        stack = math.nan
        if alone:
            a = alone[0]
            per_request = max(0.0, (a.seconds - a.ttft_s) / (a.rounds - a.generations) - link.rtt_ms / 1e3
                              - a.verify_s / a.rounds)
            stack = 1e3 * lower_bound_tpt(gamma, verify, link.rtt_ms / 1e3 + per_request, p)
        for t in tallies.values():
            if t.method == "cloud_only" and t.rounds:    # its own bound: a round trip + verify per token
                t.lower_bound_ms = t.no_rebase_bound_ms = t.earlier_bound_ms = link.rtt_ms + 1e3 * t.verify_s / t.rounds
            elif t.method != "edge_only":
                t.lower_bound_ms, t.no_rebase_bound_ms, t.earlier_bound_ms = bound, no_rebase, earlier
                t.stack_floor_ms = stack

    # -- extras: sweep, timeline, tuners -----------------------------------------------------
    def run_sweep(self, verifier, pair: str, bar=None) -> None:
        s1, regime = get_scenario("s1"), self.config.sweep_regime
        r1, r2 = self.tuned.get((pair, regime, "s1"), (None, None))
        methods = [m for m in ("vanilla", "hsl", "edgellm", "pipesd_fixed", "pipesd") if m in self.config.methods
                   or m == "pipesd_fixed"]
        for mbps in SWEEP_MBPS:
            sc = s1.with_uplink(mbps)
            clients = {m: self.client(verifier, pair, sc, regime, m, *((r1, r2) if m == "pipesd_fixed" else ()))
                       for m in methods}
            tallies = {m: Tally(pair, regime, sc.name, m) for m in methods}
            try:
                self._interleave(pair, clients, tallies, self.config.sweep_tokens, bar)
            finally:
                for c in clients.values():
                    c.close()
            self._bound(tallies, sc, regime)
            self.sweep.extend(tallies.values())

    def run_timeline(self, verifier, pair: str) -> None:
        s1, regime = get_scenario("s1"), self.config.sweep_regime
        r1, r2 = self.tuned.get((pair, regime, "s1"), (None, None))
        for method in ("vanilla", "pipesd_fixed"):
            with self.client(verifier, pair, s1, regime, method,
                              *((r1, r2) if method == "pipesd_fixed" else ())) as client:
                client.generate(self.prompts[pair][1], max_new_tokens=self.config.tokens_per_prompt)   # warm
                t0 = time.perf_counter()
                spans = client.generate(self.prompts[pair][0], max_new_tokens=24, timeline=True).stats.timeline
                self.timelines[method] = [(k, s - t0, e - t0) for k, s, e in spans]

    def run_tuners(self, verifier, pair: str, bar=None) -> None:
        """BO vs grid vs random search: the same budget of 16 candidates, scored live on S1."""
        s1, regime = get_scenario("s1"), self.config.tuner_regime
        makers = {"bo": partial(SkoptTuner, seed=self.config.seed), "grid": GridTuner,
                  "random": partial(RandomTuner, seed=self.config.seed)}
        for name, make in makers.items():
            with self.client(verifier, pair, s1, regime, "pipesd_bo", make_tuner=make) as client:
                self.tune(client, self.prompts[pair], bar)
                self.tuner_runs[name] = [(list(p), 1e3 * obj) for p, obj in client.policy().tuner.evaluations]

    # -- the whole run -------------------------------------------------------------------------
    def run(self) -> None:
        from cloud_verifier import LocalVerifier

        cfg = self.config
        verifier_cpus = self.pin_cores()
        cells = [(p, r, s) for p in cfg.pairs for r in cfg.regimes for s in cfg.scenarios]
        total = sum(len(self.methods_in(s)) for _, _, s in cells) * cfg.min_tokens
        if cfg.sweep:
            total += len(cfg.pairs) * len(SWEEP_MBPS) * 4 * cfg.sweep_tokens
        bar = _progress(total, cfg.progress)
        try:
            for pair in cfg.pairs:
                self.prepare(pair)
                with LocalVerifier(model=pair, threads=cfg.verifier_threads, cpus=verifier_cpus) as v, \
                        EdgeClient(v.url, verifier_key=v.public_key, pair=pair, mode="cloud_only",
                                   threads=1) as ref, contextlib.ExitStack() as padded:
                    self._ref_clients[pair] = ref
                    device_verifier = None
                    for _, regime, name in [c for c in cells if c[0] == pair]:
                        if bar is not None:
                            bar.set_description(f"{pair} {regime} {name}")
                        verifier = v
                        if regime == "device":    # its own verifier: every target pass padded to a GPU's
                            if device_verifier is None:
                                device_verifier = padded.enter_context(LocalVerifier(
                                    model=pair, threads=cfg.verifier_threads, cpus=verifier_cpus,
                                    extra_args=list(DEVICE_VERIFIER_ARGS)))
                            verifier = device_verifier
                        self.results.extend(self.run_cell(verifier, pair, get_scenario(name), regime, bar))
                    if cfg.sweep:
                        if bar is not None:
                            bar.set_description(f"{pair} bandwidth sweep")
                        self.run_sweep(v, pair, bar)
                    if cfg.timeline:
                        self.run_timeline(v, pair)
                    if cfg.tuners:
                        if bar is not None:
                            bar.set_description(f"{pair} BO vs grid vs random")
                        self.run_tuners(v, pair, bar)
        finally:
            if bar is not None:
                bar.close()

    # -- reports -------------------------------------------------------------------------
    def write(self, command: str) -> list[Path]:
        out = self.config.out
        out.mkdir(parents=True, exist_ok=True)
        rows = [t.row() for t in self.results]
        written = [out / "results.csv", out / "results.json", out / "results.md"]
        with open(written[0], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["method"])
            w.writeheader()
            w.writerows(rows)
        meta = {"command": command, "date": time.strftime("%Y-%m-%d"), "commit": self.commit, "gamma_s": self.gamma,
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items()},
                "tuned": {"/".join(k): v for k, v in self.tuned.items()}}
        written[1].write_text(json.dumps({"meta": meta, "results": rows, "sweep": [t.row() for t in self.sweep],
                                          "timelines": self.timelines, "tuners": self.tuner_runs},
                                         indent=1, default=str))
        written[2].write_text(self.markdown(command))
        written += plot_all(self, out)
        return written

    def headline(self) -> list[str]:
        """The bench's answer in a few terminal lines: per cell, PipeSD against the fastest baseline."""
        lines = ["TPT: ms per output token (lower is faster); speed-up: the fastest baseline's TPT / PipeSD's "
                 "(above 1: PipeSD is faster)."]
        if self.config.min_tokens < 1000:
            lines.append(f"(A short run, {self.config.min_tokens} tokens per method: the controller has had little "
                         f"time to learn the link; docs/bench holds a full run.)")
        for t in self.results:
            if t.method != "pipesd":
                continue
            cell = {u.method: u for u in self.results if (u.pair, u.regime, u.scenario) == (t.pair, t.regime, t.scenario)}
            base = min((cell[b] for b in BASELINES if b in cell), key=lambda u: u.tpt_ms, default=None)
            cloud = cell.get("cloud_only")
            lines.append(f"  {t.pair}/{t.regime}/{t.scenario}: pipesd {_fmt(t.tpt_ms)}"
                         + (f", best baseline {base.method} {_fmt(base.tpt_ms)}: {base.tpt_ms / t.tpt_ms:.2f}x"
                            if base else "")
                         + (f", cloud_only {_fmt(cloud.tpt_ms)}" if cloud else ""))
        return lines

    def markdown(self, command: str) -> str:
        lines = [f"Command: `{command}`", "",
                 f"Date {time.strftime('%Y-%m-%d')}; measured draft time per token (1 thread): "
                 + ", ".join(f"{p} {g * 1e3:.2f} ms" for p, g in self.gamma.items())
                 + f"; native payload: `{self.config.payload}`; >= {self.config.min_tokens} output tokens per "
                 f"method and cell, {self.config.tokens_per_prompt} per prompt.", ""]
        for pair in self.config.pairs:
            for regime in self.config.regimes:
                cell = [t for t in self.results if t.pair == pair and t.regime == regime]
                if not cell:
                    continue
                scen = list(dict.fromkeys(t.scenario for t in cell))
                by = {(t.scenario, t.method): t for t in cell}
                lines += [f"### {pair}, {regime} regime: TPT (ms per output token)", "",
                          "| method | " + " | ".join(scen) + " |", "|---|" + "---|" * len(scen)]
                for m in dict.fromkeys(t.method for t in cell):
                    lines.append(f"| {m} | " + " | ".join(_fmt(by[(s, m)].tpt_ms) if (s, m) in by else "-"
                                                          for s in scen) + " |")
                for ref in BASELINES + ("best baseline",):
                    vals = []
                    for s in scen:
                        base = (min((by[(s, b)].tpt_ms for b in BASELINES if (s, b) in by), default=math.nan)
                                if ref == "best baseline" else by[(s, ref)].tpt_ms if (s, ref) in by else math.nan)
                        p = by.get((s, "pipesd"))
                        vals.append(f"{base / p.tpt_ms:.2f}x" if p and not math.isnan(base) else "-")
                    lines.append(f"| PipeSD speed-up vs {ref} | " + " | ".join(vals) + " |")
                lines.append("")
                lines += [f"Details ({pair}, {regime}):", "",
                          "| scenario | method | TPT ms | bound ms | efficiency | (bound without rebasing) | (stack floor) | acceptance "
                          "| positions / rejection | NAV rounds | committed / round | target passes / token | rollback rate | mean draft | sealed up B/tok "
                          "| down B/tok | draft / upload (non-final batches) / wait / verify ms/tok | R1 / R2 | lossless |",
                          "|" + "---|" * 19]
                for t in cell:
                    r = t.row()
                    thr = f"{t.r1:.3g} / {t.r2:.3g}" if t.r1 is not None else "-"
                    lossless = "n/a" if t.mismatches < 0 else ("yes" if t.mismatches == 0
                                                                else f"NO ({t.mismatches})")
                    if t.unverified:
                        lossless += f", {t.unverified} tokens unverified (went offline)"
                    lines.append(
                        f"| {t.scenario} | {t.method} | {_fmt(t.tpt_ms)} | {_fmt(t.lower_bound_ms)} "
                        f"| {_fmt(t.efficiency, 2)} | {_fmt(t.no_rebase_bound_ms)} ms, {_fmt(t.no_rebase_efficiency, 2)} "
                        f"| {_fmt(t.stack_floor_ms)} ms, {_fmt(t.stack_efficiency, 2)} "
                        f"| {_fmt(t.acceptance, 2)} | {_fmt(t.positions_per_rejection, 2)} "
                        f"| {t.rounds} | {_fmt(r['committed_per_round'], 2)} | {_fmt(r['passes_per_token'], 2)} "
                        f"| {_fmt(t.rollback_rate, 2)} "
                        f"| {_fmt(r['mean_draft_len'])} | {_fmt(r['up_bytes_per_token'], 0)} "
                        f"| {_fmt(r['down_bytes_per_token'], 0)} | {_fmt(r['draft_ms_per_token'])} / "
                        f"{_fmt(r['upload_ms_per_token'])} / {_fmt(r['wait_ms_per_token'])} / "
                        f"{_fmt(r['verify_ms_per_token'])} | {thr} | {lossless} |")
                lines.append("")
                shaped = [t for t in cell if t.branch_nodes or t.tree_nodes or t.method in TREE_METHODS + ("pipesd", "tree")]
                if shaped:
                    lines += [f"Token trees ({pair}, {regime}): the shapes sent, per NAV round (a chain's branch nodes; "
                              "a `tree` round's nodes), rounds whose verdict kept a branch, the branch nodes kept:", "",
                              "| scenario | method | committed / round | branch nodes / round | rounds keeping a branch "
                              "| branch nodes kept / round | tree nodes / round | sealed up B / committed token |",
                              "|" + "---|" * 8]
                    per_round = lambda x, t: x / t.rounds if t.rounds else math.nan   # noqa: E731
                    lines += [f"| {t.scenario} | {t.method} | {_fmt(t.row()['committed_per_round'], 2)} "
                              f"| {_fmt(per_round(t.branch_nodes, t), 2)} | {_fmt(per_round(t.branches_taken, t), 3)} "
                              f"| {_fmt(per_round(t.branch_nodes_kept, t), 3)} | {_fmt(per_round(t.tree_nodes, t), 2)} "
                              f"| {_fmt(t.row()['up_bytes_per_token'], 0)} |" for t in shaped]
                    lines.append("")
                ctl = [t for t in cell if t.decide_us is not None]
                if ctl:
                    lines += [f"Round controller ({pair}, {regime}; R1 / R2 above are its thresholds on the "
                              "calibrated scale, inf: stop after one token):", "",
                              "| scenario | method | cloud-only rounds | acceptance model Brier | draft confidence "
                              "as the prediction: Brier | decide µs / token | plan µs / round (on the path / while waiting) | "
                              "structures chosen (head + rounds ahead × their drafts: share of rounds) |", "|" + "---|" * 8]
                    lines += [f"| {t.scenario} | {t.method} | {t.cloud_only_rounds} / {t.rounds} | {_fmt(t.brier, 3)} "
                              f"| {_fmt(t.raw_brier, 3)} | {_fmt(t.decide_us, 1)} | {_fmt(t.plan_us, 0)} / {_fmt(t.idle_plan_us, 0)} "
                              f"| {_structures(t)} |" for t in ctl]
                    lines.append("")
        if self.sweep:
            lines += ["### Bandwidth sweep (S1, uplink Mbps): TPT ms", ""]
            cols = list(dict.fromkeys(t.scenario for t in self.sweep))
            meths = list(dict.fromkeys(t.method for t in self.sweep))
            by = {(t.scenario, t.method): t for t in self.sweep}
            lines += ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
            lines += [f"| {m} | " + " | ".join(_fmt(by[(c, m)].tpt_ms) for c in cols) + " |" for m in meths]
            lines.append("")
        if self.tuner_runs:
            lines += ["### BO vs grid vs random (16 candidates each, S1, scored live)", "",
                      "| search | best TPT ms | at (R1, R2) | candidates |", "|---|---|---|---|"]
            for name, ev in self.tuner_runs.items():
                if ev:
                    p, v = min(ev, key=lambda e: e[1])
                    lines.append(f"| {name} | {v:.1f} | ({p[0]:.3g}, {p[1]:.3g}) | {len(ev)} |")
            lines.append("")
        return "\n".join(lines)


def git_commit() -> str | None:
    """The checked-out revision (with "+dirty" when the tree has changes), when run from a git checkout."""
    import subprocess

    try:
        here = Path(__file__).parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def _structures(t: Tally) -> str:
    """The controller's structures, e.g. "4 + 2×16: 61%, 0 + 4×0: 30%, 0 + 4×lookup: 9%" (rounds ahead of a
    looked-up guess each are recorded with -1 drafts)."""
    if not t.structures:
        return "-"
    return ", ".join(f"{h} + {a}×{'lookup' if k < 0 else k}: {100 * share:.0f}%" if a else f"{h} alone: {100 * share:.0f}%"
                     for h, a, k, share in t.structures)


def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", file=sys.stderr, dynamic_ncols=True)


def plot_all(bench: Bench, out: Path) -> list[Path]:
    """PNG plots; skipped (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed (pip install 'pipesd[bench]'): no plots", file=sys.stderr)
        return []
    written = []
    for pair in bench.config.pairs:
        for regime in bench.config.regimes:
            cell = [t for t in bench.results if t.pair == pair and t.regime == regime and t.method != "edge_only"]
            if not cell:
                continue
            scen = list(dict.fromkeys(t.scenario for t in cell))
            meths = list(dict.fromkeys(t.method for t in cell))
            by = {(t.scenario, t.method): t.tpt_ms for t in cell}
            fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(scen) * len(meths) / 4), 4))
            width = 0.8 / len(meths)
            for i, m in enumerate(meths):
                ax.bar([j + i * width for j in range(len(scen))], [by.get((s, m), 0) for s in scen], width, label=m)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scen))], scen)
            ax.set_ylabel("TPT (ms per output token)")
            ax.set_title(f"{pair}, {regime} regime")
            ax.legend(fontsize=7, ncol=2)
            path = out / f"tpt_{pair}_{regime}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    if bench.sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in dict.fromkeys(t.method for t in bench.sweep):
            pts = [t for t in bench.sweep if t.method == m]
            ax.plot(SWEEP_MBPS[: len(pts)], [t.tpt_ms for t in pts], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("uplink Mbps (S1)")
        ax.set_ylabel("TPT (ms)")
        ax.set_title(f"bandwidth sweep, {bench.config.sweep_regime} regime")
        ax.legend()
        fig.tight_layout()
        written.append(out / "sweep.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if bench.timelines:
        fig, axes = plt.subplots(len(bench.timelines), 1, figsize=(9, 1.6 * len(bench.timelines) + 0.6),
                                 sharex=True, squeeze=False)
        colours = {"draft": "tab:blue", "upload": "tab:orange", "nav": "tab:green"}
        for ax, (method, spans) in zip(axes[:, 0], bench.timelines.items()):
            for row, kind in enumerate(("draft", "upload", "nav")):
                bars = [(s, e - s) for k, s, e in spans if k == kind]
                ax.broken_barh(bars, (row - 0.4, 0.8), color=colours[kind])
            ax.set_yticks(range(3), ["draft", "upload", "NAV"])
            ax.set_title(f"{method}: 24 tokens", fontsize=9)
        axes[-1, 0].set_xlabel("seconds")
        fig.tight_layout()
        written.append(out / "timeline.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    path = plot_reliability([t.row() for t in bench.results], out / "reliability.png")
    if path is not None:
        written.append(path)
    if bench.tuner_runs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, ev in bench.tuner_runs.items():
            best, curve = math.inf, []
            for _, v in ev:
                best = min(best, v)
                curve.append(best)
            ax.plot(range(1, len(curve) + 1), curve, marker=".", label=name)
        ax.set_xlabel("candidates evaluated")
        ax.set_ylabel("best TPT so far (ms)")
        ax.set_title("BO vs grid vs random (S1)")
        ax.legend()
        fig.tight_layout()
        written.append(out / "tuners.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def plot_reliability(rows: list[dict], path: Path, method: str = "pipesd") -> Path | None:
    """The acceptance model's reliability curve per regime (pooled over scenarios): predicted acceptance
    against the observed rate per bin, prequential (each prediction made before the verdict it scores).
    `rows`: ``Tally.row()`` dicts (a results.json's "results")."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    regimes = [r for r in REGIMES if any(x["regime"] == r and x["method"] == method and x.get("reliability")
                                         for x in rows)]
    if not regimes:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfectly calibrated")
    for regime in regimes:
        bins: dict[int, list[float]] = {}
        briers = []
        for x in rows:
            if x["regime"] == regime and x["method"] == method and x.get("reliability"):
                for predicted, observed, n in x["reliability"]:
                    b = bins.setdefault(min(9, int(predicted * 10)), [0.0, 0.0, 0.0])
                    b[0] += predicted * n
                    b[1] += observed * n
                    b[2] += n
                briers.append(x["brier"])
        pts = sorted((p / n, o / n, n) for p, o, n in bins.values() if n)
        ax.plot([p for p, _, _ in pts], [o for _, o, _ in pts], marker="o",
                label=f"{regime} (Brier {sum(briers) / len(briers):.3f})")
    ax.set_xlabel("predicted P(accepted)")
    ax.set_ylabel("observed acceptance")
    ax.set_title(f"{method}: acceptance model, prequential", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--pairs", default="embedded", help="comma-separated model pairs (embedded, smollm2)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: s1,s2,s3,s4")
    ap.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated: paper, native, device")
    ap.add_argument("--objective", default="latency", choices=OBJECTIVES,
                    help="what PipeSD's round controller minimises per token")
    ap.add_argument("--methods", default=",".join(MAIN_METHODS + ABLATIONS))
    ap.add_argument("--ablation-scenarios", default="s1", help="scenarios where the pipesd_* ablations run, or all")
    ap.add_argument("--payload", default="ids", choices=PAYLOADS, help="native regime payload per token")
    ap.add_argument("--min-tokens", type=int, default=1000, help="output tokens per method and cell")
    ap.add_argument("--tokens-per-prompt", type=int, default=64)
    ap.add_argument("--max-tune-prompts", type=int, default=60)
    ap.add_argument("--sweep-tokens", type=int, default=300)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-timeline", action="store_true")
    ap.add_argument("--no-tuners", action="store_true", help="skip BO vs grid vs random")
    ap.add_argument("--pin", action="store_true", help="edge and verifier on separate cores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: S1 native, main methods, 96 tokens each, no extras")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: a new temporary one)")


def config_from_args(args) -> BenchConfig:
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())   # noqa: E731
    cfg = BenchConfig(pairs=split(args.pairs), scenarios=split(args.scenarios), regimes=split(args.regimes),
                      methods=split(args.methods), ablation_scenarios=split(args.ablation_scenarios),
                      payload=args.payload, objective=args.objective, min_tokens=args.min_tokens,
                      tokens_per_prompt=args.tokens_per_prompt, max_tune_prompts=args.max_tune_prompts,
                      sweep=not args.no_sweep, sweep_tokens=args.sweep_tokens, timeline=not args.no_timeline,
                      tuners=not args.no_tuners, pin=args.pin, seed=args.seed, out=args.out,
                      progress=not args.no_progress)
    if args.quick:
        cfg.scenarios, cfg.regimes, cfg.min_tokens, cfg.tokens_per_prompt = ("s1",), ("native",), 96, 32
        cfg.methods = MAIN_METHODS
        cfg.sweep = cfg.timeline = cfg.tuners = False
        cfg.max_tune_prompts = 4
    for s in cfg.scenarios:
        get_scenario(s)
    for s in cfg.ablation_scenarios:
        if s != "all":
            get_scenario(s)
    from pipesd_models import PairUnavailable, pair_paths

    for pair in cfg.pairs:
        try:
            missing = [f for f in pair_paths(pair) if not f.is_file()]
        except PairUnavailable as exc:
            raise ValueError(str(exc)) from None
        if missing:
            raise ValueError(f"the {pair!r} pair's file is missing: {missing[0]}")
    for m in cfg.methods:
        if not method_known(m):
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(MODES)} (a controller mode may name "
                             f"its objective: pipesd:{'|'.join(OBJECTIVES)})")
    for r in cfg.regimes:
        if r not in REGIMES:
            raise ValueError(f"unknown regime {r!r}; choose from {', '.join(REGIMES)}")
    if cfg.min_tokens < 1 or cfg.tokens_per_prompt < 1:
        raise ValueError("--min-tokens and --tokens-per-prompt must be positive")
    return cfg
