"""Where a method's time goes, verdict by verdict: ``pipesd rounds``.

A generation's TPT is the time between the verdicts the edge receives, over the tokens they commit. This
runs one method in one bench cell with ``timeline=True`` and groups the gaps between consecutive verdicts
by what the round before was (plain, pipelined or rebased; fully accepted or rejected) and what this one
is. Each group says how often it happened, its mean gap and share of the time, its NAV time (final batch
sent -> verdict back), the verifier's pass and queue time, how late the engine took the verdict up, and
the tokens it committed. The groups with the largest share are where the time goes.

    pipesd rounds --regime native --scenario s1 --pin          # PipeSD, 2 x 16 prompts of 64 tokens
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from edge_sdk.stats import RoundRecord

from .bench import PROMPTS, Bench, BenchConfig, git_commit
from .scenarios import DEVICE_VERIFIER_ARGS, REGIMES, SCENARIOS, get_scenario


def _outcome(r: RoundRecord) -> str:
    if not r.drafted:
        return "empty"
    return "all accepted" if r.accepted == r.drafted else "rejected"


def transitions(generations: list[list[RoundRecord]]) -> list[dict]:
    """Gaps between consecutive verdicts within each generation, grouped by (the round before: kind and
    outcome; this round: kind, drafted or not), largest share of the time first."""
    groups: dict[tuple, list[tuple[RoundRecord, RoundRecord]]] = defaultdict(list)
    for rounds in generations:
        for before, this in zip(rounds, rounds[1:]):
            if before.answered_at is None or this.answered_at is None:
                continue
            key = (f"{before.kind}, {_outcome(before)}", f"{this.kind}, {'drafted' if this.drafted else 'empty'}")
            groups[key].append((before, this))
    total = sum(this.answered_at - before.answered_at for pairs in groups.values() for before, this in pairs)
    rows = []
    for (before, this), pairs in groups.items():
        gaps = [t.answered_at - b.answered_at for b, t in pairs]
        rows.append({
            "before": before, "this": this, "n": len(pairs),
            "gap_ms": 1e3 * statistics.mean(gaps), "share": sum(gaps) / total if total else 0.0,
            "nav_ms": 1e3 * statistics.mean(t.answered_at - t.sent_at for _, t in pairs),
            "verify_ms": statistics.mean(t.verify_ms for _, t in pairs),
            "queue_ms": statistics.mean(t.queue_ms for _, t in pairs),
            "late_ms": 1e3 * statistics.mean(t.taken_at - t.answered_at for _, t in pairs),
            "drafted": statistics.mean(t.drafted for _, t in pairs),
            "committed": statistics.mean(t.accepted + 1 for _, t in pairs),
        })
    return sorted(rows, key=lambda r: -r["share"])


def run_rounds(regime: str, scenario: str, method: str, prompts: int, pin: bool, seed: int = 0):
    """(generations' round records, output tokens, seconds) for `method` in one bench cell."""
    from cloud_verifier import LocalVerifier

    bench = Bench(BenchConfig(pin=pin, progress=False, seed=seed))
    cpus = bench.pin_cores()
    bench.prepare("embedded")
    generations, tokens, seconds = [], 0, 0.0
    padded = list(DEVICE_VERIFIER_ARGS) if regime == "device" else []
    with LocalVerifier(model="embedded", threads=1, cpus=cpus, extra_args=padded) as verifier:
        with bench.client(verifier, "embedded", get_scenario(scenario), regime, method) as client:
            bench.tune(client, PROMPTS)
            for p in PROMPTS[-2:]:          # warm-up: the profiler and the plans
                client.generate(p, max_new_tokens=64)
            for i in range(prompts):
                stats = client.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=64, timeline=True).stats
                generations.append(stats.rounds)
                tokens += stats.output_tokens
                seconds += stats.total_s
    return generations, tokens, seconds


def rounds_markdown(rows: list[dict], command: str, tokens: int, seconds: float, verdicts: int) -> str:
    lines = [f"Command: `{command}`", "", f"Commit {git_commit()}; {tokens} tokens in {seconds:.2f} s "
             f"(TPT {1e3 * seconds / max(tokens, 1):.2f} ms), {verdicts} verdicts.", "",
             "Gaps between consecutive verdicts, by the round before and this one: how often, the mean gap and its "
             "share of the time, this round's NAV (final batch sent -> verdict back), the verifier's pass and "
             "queue, how late the engine took the verdict up, drafted and committed tokens.", "",
             "| round before | this round | n | gap ms | share | NAV ms | pass ms | queue ms | taken up late ms "
             "| drafted | committed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['before']} | {r['this']} | {r['n']} | {r['gap_ms']:.1f} | {r['share']:.1%} | "
                     f"{r['nav_ms']:.1f} | {r['verify_ms']:.1f} | {r['queue_ms']:.1f} | {r['late_ms']:.2f} | "
                     f"{r['drafted']:.1f} | {r['committed']:.2f} |")
    return "\n".join(lines) + "\n"


def add_rounds_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--regime", default="native", choices=REGIMES)
    ap.add_argument("--scenario", default="s1", choices=tuple(SCENARIOS))
    ap.add_argument("--method", default="pipesd")
    ap.add_argument("--prompts", type=int, default=32, help="generations of 64 tokens to record")
    ap.add_argument("--pin", action="store_true", help="edge and verifier on separate cores")
    ap.add_argument("--seed", type=int, default=0)


def rounds_main(args, command: str) -> list[Path]:
    from .bench import method_known

    if args.prompts < 1:
        raise ValueError("--prompts must be positive")
    if not method_known(args.method):
        raise ValueError(f"unknown method {args.method!r}")
    generations, tokens, seconds = run_rounds(args.regime, args.scenario, args.method, args.prompts, args.pin,
                                              args.seed)
    rows = transitions(generations)
    args.out.mkdir(parents=True, exist_ok=True)
    written = [args.out / "rounds.md", args.out / "rounds.json"]
    verdicts = sum(len(g) for g in generations)
    written[0].write_text(rounds_markdown(rows, command, tokens, seconds, verdicts))
    written[1].write_text(json.dumps({"command": command, "commit": git_commit(), "tokens": tokens,
                                      "seconds": seconds, "transitions": rows,
                                      "generations": [[r.__dict__ for r in g] for g in generations]}, indent=1))
    return written
