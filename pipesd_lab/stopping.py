"""How much a round's stopping rule can save in target passes: ``pipesd stopping``.

A round of n drafted tokens costs the verifier one pass of ``fixed + per_token * n`` and commits its
accepted tokens plus one. Along the target's own greedy continuations the draft's proposal from any
committed prefix is known exactly (its argmax agrees with the target's token or it does not: see
``pipesd_models.build.evaluate.greedy_acceptance``), so one teacher-forced pass of each model replays
every round of every stopping rule, with no verifier and no noise. This is the ceiling of what
``objective="cloud_cost"`` can save by choosing when to stop a chain, against Vanilla's fixed k = 4:

* fixed lengths k = 1..8 (Vanilla is k = 4);
* the oracle that stops exactly before the first rejected token;
* "stop when the survival falls below t", the survival being the product of the drafted tokens'
  acceptance probabilities, either the draft's raw confidences or the round controller's own
  ``AcceptanceModel`` (logistic on the confidence and the position in the segment), fitted on the other
  half of the prompts (cross-fitted, so it is not scored on what it learnt); t swept, the best one reported
  (a ceiling: the sweep is chosen on the scored data).

    pipesd stopping --out /tmp/stopping          # embedded pair, 26 prompts x 96 tokens: ~15 s
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edge_sdk.controller import AcceptanceModel, SegmentCosts, plan_segment
from edge_sdk.drafter import DraftToken

from .bench import PROMPTS, git_commit
from .scenarios import DEVICE_PASS_MS

# Prompts beyond the bench's, so that the two halves of the cross-fit have 13 prompts each.
EXTRA_PROMPTS = ("def quicksort(arr):\n", "for key, value in items:\n", "with open(path) as f:\n", "class Node:\n",
                 "def parse_args():\n", "import json\n\n", "try:\n    ", "def __eq__(self, other):\n",
                 "if __name__ == '__main__':\n", "async def fetch(url):\n")
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


# A rule: (the continuation, the first position of the round, its position in the segment) -> tokens to draft.
Rule = Callable[[Continuation, int, int], int]


def replay(continuations: Sequence[Continuation], rule: Rule, fixed: float, per_token: float) -> dict:
    """Every round of `rule` along the continuations: target ms per committed token, and what it drafted."""
    cost = committed = drafted = rounds = 0
    for c in continuations:
        i, segment = 0, 1
        while i < len(c.agrees):
            n = max(0, min(rule(c, i, segment), len(c.agrees) - i))
            window = c.agrees[i:i + n]
            accepted = window.index(False) if False in window else n
            cost += fixed + per_token * n
            committed, drafted, rounds = committed + accepted + 1, drafted + n, rounds + 1
            segment = 1 if accepted < n else segment + n + 1
            i += accepted + 1
    return {"ms_per_token": cost / committed, "drafted_per_round": drafted / rounds,
            "committed_per_round": committed / rounds}


def fixed_length(k: int) -> Rule:
    return lambda c, i, segment: k


def oracle(c: Continuation, i: int, segment: int) -> int:
    rest = c.agrees[i:]
    return rest.index(False) if False in rest else len(rest)


def survival_below(threshold: float, acceptance: Callable[[float, int], float], n_max: int = 32) -> Rule:
    """Draft on while the product of the drafted tokens' acceptance stays at or above `threshold`
    (a token is drafted, its confidence seen, and kept only if the survival with it holds)."""

    def rule(c: Continuation, i: int, segment: int) -> int:
        survival, n = 1.0, 0
        while i + n < len(c.agrees) and n < n_max:
            survival *= acceptance(c.confidence[i + n], segment + n)
            if survival < threshold:
                break
            n += 1
        return n
    return rule


def controller(model: AcceptanceModel, fixed: float, per_token: float) -> Rule:
    """The round controller's own rule under ``objective="cloud_cost"``: the head round of its plan for this
    pass (one batch at the trigger, no rounds ahead), drafted until the survival of the tokens drafted so far,
    the last one included, falls below the plan's threshold for that length (``PipeSD._decide``)."""
    costs = SegmentCosts(gamma=0.036, beta=0.116, batch_cost=0.0, latency=0.02, empty_latency=0.02,
                         pass_fixed=fixed / 1e3, pass_per_token=per_token / 1e3)

    def rule(c: Continuation, i: int, segment: int) -> int:
        plan = plan_segment(costs, model.positions.curve(segment), "cloud_cost", schedule="at_trigger",
                            proactive=False)
        if not plan.best_length:
            return 0
        survival, n = 1.0, 0
        while i + n < len(c.agrees):
            survival *= model.predict(c.confidence[i + n], segment + n)
            n += 1
            if n >= len(plan.stop_below) or survival < plan.stop_below[n]:
                break
        return n
    return rule


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
    half = [continuations[0::2], continuations[1::2]]
    models = [fitted_model(half[1]), fitted_model(half[0])]      # each half scored by the other's fit

    rules = {"raw confidence": lambda t: [(continuations, survival_below(t, lambda p, n: p))],
             "AcceptanceModel, cross-fitted": lambda t: [(h, survival_below(t, m.predict)) for h, m in zip(half, models)]}
    out = {}
    for name, (fixed, per) in shapes.items():
        rules["the round controller (cloud_cost plan)"] = lambda t, fixed=fixed, per=per: [
            (h, controller(m, fixed, per)) for h, m in zip(half, models)]
        base = replay(continuations, fixed_length(4), fixed, per)["ms_per_token"]
        rows = [{"rule": f"fixed k = {k}", **replay(continuations, fixed_length(k), fixed, per)} for k in range(1, 9)]
        rows.append({"rule": "oracle (stops before the first rejection)", **replay(continuations, oracle, fixed, per)})
        for label, make in rules.items():
            sweep = []
            for t in THRESHOLDS if not label.startswith("the round") else (None,):
                parts = [replay(c, rule, fixed, per) for c, rule in make(t)]
                sweep.append((float(np.mean([p["ms_per_token"] for p in parts])), t, parts))
            best, t, parts = min(sweep, key=lambda x: x[0])
            rows.append({"rule": f"{label}, its own thresholds" if label.startswith("the round") else
                         f"survival >= {t} ({label}; best of {len(THRESHOLDS)} thresholds)",
                         "ms_per_token": best, "drafted_per_round": float(np.mean([p["drafted_per_round"] for p in parts])),
                         "committed_per_round": float(np.mean([p["committed_per_round"] for p in parts]))})
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
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: a new temporary one)")


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
