"""How much a round's stopping rule can save in target passes: ``pipesd stopping``.

A round of n drafted tokens costs the verifier one pass of ``fixed + per_token * n`` and commits its
accepted tokens plus one. Along the target's own greedy continuations the draft's proposal from any
committed prefix is known exactly (its argmax agrees with the target's token or it does not: see
``pipesd_models.build.evaluate.greedy_acceptance``), so one teacher-forced pass of each model replays
every round of every stopping rule, with no verifier and no noise. It measures what
``objective="cloud_cost"`` can save by choosing when to stop a chain, against Vanilla's fixed k = 4:

* fixed lengths k = 1..8 (Vanilla is k = 4), and the best fixed k up to 32;
* the oracle that stops exactly before the first rejected token;
* "stop when the survival falls below t", the survival being the product of the drafted tokens'
  acceptance probabilities: the draft's raw confidences, or the round controller's own
  ``AcceptanceModel`` (logistic on the confidence and the position in the segment) fitted on the other
  half of the prompts (cross-fitted). Either the token whose confidence takes the survival below t is
  left out (the rule looked at it: the most a confidence can tell) or sent (as the engine does: it
  asks ``verify_now`` after each drafted token). t is swept and the best reported: a ceiling, since
  the sweep is chosen on the scored data;
* the round controller itself: ``PipeSD`` (``pipesd_no_proactive``, no rounds ahead, which a replay of
  single rounds cannot price) with ``objective="cloud_cost"``, its acceptance model warm-started from
  the other half and learning from its own verdicts as it goes, run through ``start_round`` /
  ``verify_now`` / ``on_verdict`` as the engine runs it.

    pipesd stopping --out /tmp/stopping          # embedded pair, 26 prompts x 96 tokens: ~15 s
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edge_sdk.controller import AcceptanceModel
from edge_sdk.drafter import DraftToken
from edge_sdk.policies import RoundVerdict, make_policy
from edge_sdk.profiler import LinkEstimate

from .bench import PROMPTS, git_commit
from .scenarios import DEVICE_PASS_MS

# Prompts beyond the bench's, so that the two halves of the cross-fit have 13 prompts each.
EXTRA_PROMPTS = ("def quicksort(arr):\n", "for key, value in items:\n", "with open(path) as f:\n", "class Node:\n",
                 "def parse_args():\n", "import json\n\n", "while True:\n", "def __eq__(self, other):\n",
                 "def __init__(self, name):\n", "async def fetch(url):\n")
# The target's pass on this machine's CPU (the profiler's NAV line on the embedded pair, native S1,
# docs/energy.md), the same with the verifier's ~2.6 ms of work per request added, and the device
# regime's emulated datacenter GPU.
PASS_SHAPES = {"cpu": (9.6, 1.1), "cpu+request": (12.2, 1.1), "gpu": DEVICE_PASS_MS}
THRESHOLDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)


@dataclass
class Continuation:
    """One prompt's greedy continuation, seen from the draft: per position, its confidence and whether
    its argmax is the target's token."""

    confidence: list[float]
    agrees: list[bool]


def collect(prompts: Sequence[str], new_tokens: int) -> list[Continuation]:
    """Teacher-forced draft confidences along the target's greedy continuations (llama.cpp, embedded pair)."""
    from llama_cpp import Llama

    from pipesd_models import draft_path, target_path

    target = Llama(model_path=str(target_path()), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    draft = Llama(model_path=str(draft_path()), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    out = []
    for prompt in prompts:
        ids = target.tokenize(prompt.encode(), add_bos=True)
        target.reset()
        target.eval(ids)
        seq = list(ids)
        for _ in range(new_tokens):
            seq.append(int(np.argmax(target.scores[len(seq) - 1])))
            target.eval(seq[-1:])
        draft.reset()
        draft.eval(seq)
        logits = np.asarray(draft.scores[len(ids) - 1:len(seq) - 1], dtype=np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out.append(Continuation(p.max(-1).tolist(), (p.argmax(-1) == np.array(seq[len(ids):])).tolist()))
    return out


# A rule: (the continuation, the first position of the round, its position in the segment) -> tokens to
# draft. A rule that learns from its verdicts also has ``observe(continuation, position, drafted, accepted)``.
Rule = Callable[[Continuation, int, int], int]


@dataclass
class Totals:
    """What a rule's rounds cost and committed (pooled over continuations, or over the cross-fit's halves)."""

    cost: float = 0.0
    committed: int = 0
    drafted: int = 0
    rounds: int = 0

    def __add__(self, other: "Totals") -> "Totals":
        return Totals(self.cost + other.cost, self.committed + other.committed, self.drafted + other.drafted,
                      self.rounds + other.rounds)

    def row(self) -> dict:
        return {"ms_per_token": self.cost / self.committed, "drafted_per_round": self.drafted / self.rounds,
                "committed_per_round": self.committed / self.rounds}


def replay(continuations: Sequence[Continuation], rule: Rule, fixed: float, per_token: float) -> Totals:
    """Every round of `rule` along the continuations, with its target pass (ms) and committed tokens."""
    out = Totals()
    for c in continuations:
        i, segment = 0, 1
        while i < len(c.agrees):
            n = max(0, min(rule(c, i, segment), len(c.agrees) - i))
            window = c.agrees[i:i + n]
            accepted = window.index(False) if False in window else n
            if hasattr(rule, "observe"):
                rule.observe(c, i, n, accepted)
            # (A round accepted to the continuation's end: its bonus token lies beyond it, not counted.)
            out += Totals(fixed + per_token * n, min(accepted + 1, len(c.agrees) - i), n, 1)
            if n:                       # a round that drafted nothing leaves the segment where it was
                segment = 1 if accepted < n else segment + n + 1
            i += accepted + 1
    return out


def fixed_length(k: int) -> Rule:
    return lambda c, i, segment: k


def oracle(c: Continuation, i: int, segment: int) -> int:
    rest = c.agrees[i:]
    return rest.index(False) if False in rest else len(rest)


def survival_below(threshold: float, acceptance: Callable[[float, int], float], send_crossing: bool = False,
                   n_max: int = 32) -> Rule:
    """Draft on while the product of the drafted tokens' acceptance stays at or above `threshold`. The
    token that takes it below is left out, or with `send_crossing` sent (the engine's order: a token is
    drafted, then ``verify_now`` asks whether to stop after it)."""

    def rule(c: Continuation, i: int, segment: int) -> int:
        survival, n = 1.0, 0
        while i + n < len(c.agrees) and n < n_max:
            survival *= acceptance(c.confidence[i + n], segment + n)
            if survival < threshold:
                return n + 1 if send_crossing else n
            n += 1
        return n
    return rule


class Controller:
    """The round controller deciding each round's length as the engine asks it (see the module docstring).
    The link is fixed: a round trip and an upload that ``cloud_cost`` does not price, the pass given."""

    def __init__(self, model: AcceptanceModel, fixed: float, per_token: float):
        self.policy = make_policy("pipesd_no_proactive", objective="cloud_cost")
        self.policy.model = copy.deepcopy(model)
        f, p = fixed / 1e3, per_token / 1e3
        self.link = LinkEstimate(alpha=0.0, beta=0.116, gamma=0.036, verify=f, acceptance=0.6, nav_network=0.02,
                                 nav_latency=0.02, nav_per_token=0.116, nav_empty=0.02, verify_fixed=f,
                                 verify_per_token=p, uplink_per_token=0.116)
        self._draft: list[DraftToken] = []

    def __call__(self, c: Continuation, i: int, segment: int) -> int:
        policy = self.policy
        policy.start_round(self.link)
        self._draft = []
        while i + len(self._draft) < len(c.agrees) and len(self._draft) < policy.max_draft:
            p = c.confidence[i + len(self._draft)]
            self._draft.append(DraftToken(0, p, p))
            if policy.verify_now(self._draft):
                break
        return len(self._draft)

    def observe(self, c: Continuation, i: int, n: int, accepted: int) -> None:
        self.policy.on_verdict(RoundVerdict(tuple(self._draft[:n]), accepted, 0.0, self.link))


def fitted_model(continuations: Sequence[Continuation]) -> AcceptanceModel:
    """The round controller's acceptance model, fed the verdicts Vanilla's k = 4 rounds would get."""
    model = AcceptanceModel()
    for c in continuations:
        i, segment = 0, 1
        while i < len(c.agrees):
            window = c.agrees[i:i + 4]
            accepted = window.index(False) if False in window else len(window)
            model.observe([DraftToken(0, p, p) for p in c.confidence[i:i + len(window)]], accepted, segment)
            segment = 1 if accepted < len(window) else segment + len(window) + 1
            i += accepted + 1
    return model


def evaluate(continuations: Sequence[Continuation], shapes: dict[str, tuple[float, float]]) -> dict:
    """Every rule's rows per pass shape, each with its change against Vanilla's k = 4."""
    halves = [continuations[0::2], continuations[1::2]]
    models = [fitted_model(halves[1]), fitted_model(halves[0])]      # each half scored by the other's fit

    def crossfit(make_rule: Callable[[AcceptanceModel], Rule], fixed: float, per: float) -> Totals:
        return sum((replay(h, make_rule(m), fixed, per) for h, m in zip(halves, models)), Totals())

    out = {}
    for name, (fixed, per) in shapes.items():
        fixed_k = {k: replay(continuations, fixed_length(k), fixed, per) for k in range(1, 33)}
        best_k = min(fixed_k, key=lambda k: fixed_k[k].row()["ms_per_token"])
        rows = [{"rule": f"fixed k = {k}", **fixed_k[k].row()} for k in range(1, 9)]
        if best_k > 8:
            rows.append({"rule": f"best fixed k (1-32): k = {best_k}", **fixed_k[best_k].row()})
        rows.append({"rule": "oracle (stops before the first rejection)", **replay(continuations, oracle, fixed, per).row()})
        sweeps = {
            "raw confidence, crossing token left out": lambda t: replay(
                continuations, survival_below(t, lambda p, n: p), fixed, per),
            "AcceptanceModel cross-fitted, crossing token left out": lambda t: crossfit(
                lambda m: survival_below(t, m.predict), fixed, per),
            "AcceptanceModel cross-fitted, crossing token sent": lambda t: crossfit(
                lambda m: survival_below(t, m.predict, send_crossing=True), fixed, per)}
        for label, run in sweeps.items():
            t, totals = min(((t, run(t)) for t in THRESHOLDS), key=lambda x: x[1].row()["ms_per_token"])
            rows.append({"rule": f"survival >= {t} ({label}; best of {len(THRESHOLDS)} thresholds)", **totals.row()})
        rows.append({"rule": "the round controller (pipesd_no_proactive, objective cloud_cost)",
                     **crossfit(lambda m: Controller(m, fixed, per), fixed, per).row()})
        base = fixed_k[4].row()["ms_per_token"]
        for r in rows:
            r["vs_k4"] = r["ms_per_token"] / base - 1
        out[name] = {"pass_ms": [fixed, per], "rows": rows}
    return out


def stopping_markdown(result: dict, command: str, positions: int) -> str:
    lines = [f"Command: `{command}`", "", f"Commit {git_commit()}; embedded pair, {positions} positions along the "
             "target's greedy continuations; no verifier: every round replayed from one teacher-forced pass of each "
             "model (pipesd_lab/stopping.py).", ""]
    for name, r in result.items():
        fixed, per = r["pass_ms"]
        lines += [f"#### pass {name}: {fixed:g} ms + {per:g} ms per drafted token", "",
                  "| rule | target ms per committed token | vs Vanilla's k = 4 | drafted per round | committed per round |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['rule']} | {x['ms_per_token']:.3f} | {x['vs_k4']:+.1%} | {x['drafted_per_round']:.2f} "
                  f"| {x['committed_per_round']:.2f} |" for x in r["rows"]]
        lines.append("")
    return "\n".join(lines)


def _shape(text: str) -> tuple[str, tuple[float, float]]:
    name, _, numbers = text.partition("=")
    try:
        fixed, per = (float(x) for x in numbers.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=FIXED_MS,PER_TOKEN_MS, not {text!r}") from None
    if not name or fixed < 0 or per < 0:
        raise argparse.ArgumentTypeError(f"expected NAME=FIXED_MS,PER_TOKEN_MS with both >= 0, not {text!r}")
    return name, (fixed, per)


def add_stopping_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tokens", type=int, default=96, help="greedy tokens per prompt")
    ap.add_argument("--pass", dest="shapes", type=_shape, action="append", default=None,
                    help="a target pass to price, NAME=FIXED_MS,PER_TOKEN_MS (repeatable; default: "
                    + ", ".join(f"{k}={a:g},{b:g}" for k, (a, b) in PASS_SHAPES.items()) + ")")


def stopping_main(args, command: str) -> list[Path]:
    if not 8 <= args.tokens <= 400:
        raise ValueError("--tokens must be in 8..400")
    shapes = dict(args.shapes) if args.shapes else PASS_SHAPES
    continuations = collect(list(PROMPTS) + list(EXTRA_PROMPTS), args.tokens)
    result = evaluate(continuations, shapes)
    positions = sum(len(c.agrees) for c in continuations)
    args.out.mkdir(parents=True, exist_ok=True)
    written = [args.out / "stopping.md", args.out / "stopping.json"]
    written[0].write_text(stopping_markdown(result, command, positions))
    written[1].write_text(json.dumps({"command": command, "commit": git_commit(), "positions": positions,
                                      "shapes": result}, indent=1))
    return written
