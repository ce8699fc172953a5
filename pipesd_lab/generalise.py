"""Beyond the bench's cells: a grid of links and devices, and a link that changes under PipeSD.

    pipesd grid --pin --out docs/bench/grid       # 27 points, PipeSD vs the baselines (~40 min)
    pipesd steps --pin --out docs/bench/steps     # S4's bandwidth trace, PipeSD's rounds against it

``grid``: each point is a round-trip time (10, 40, 150 ms, each way jittered by a twentieth of it), a
device (a draft of 0.3 -- this machine's -- 5 or 40 ms per token) and a link (token ids at 1 Mbps, or
the paper's 0.29 MB per drafted token at 100 or 40 Mbps). On every point the same procedure as the
bench: one verifier process on loopback, every method an ``EdgeClient`` of its own with its own
emulated link, methods taking turns prompt by prompt, every output compared with the target's own
greedy decoding. Nothing is tuned per point: PipeSD runs as ``pipesd_model``, the round controller
without its online BO correction (which would take a few hundred tokens per point to settle).
Writes ``grid.md`` / ``grid.json`` and the heat map ``grid.png`` (PipeSD's speed-up over the best
of Vanilla/HSL/EdgeLLM).

``steps``: PipeSD (``pipesd``) generating on S4's seeded bandwidth trace (uplink 10-80 Mbps, a new
value every 20 s) with a payload whose upload matters (the draft's full distribution, 8 KB per
drafted token, in the native regime) for ``--seconds``; every round's time, drafted tokens and
the plan's structure against the uplink in force. Writes ``steps.md`` / ``steps.json`` and
``steps.png``, and for each bandwidth step the rounds it took the head's length to settle.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_sdk import EdgeClient, LlamaCppDrafter, make_policy

from .bench import BASELINES, PROMPTS, Tally, _fmt, _progress, draft_seconds_per_token, git_commit
from .emulation import EmulatedLink, LinkProfile, SlowedDrafter
from .scenarios import PAPER_PAYLOAD_BYTES, get_scenario, payload_bytes

GRID_RTT_MS = (10.0, 40.0, 150.0)
GRID_DRAFT_MS = (None, 5.0, 40.0)            # None: this machine's draft as it is
GRID_LINKS = (("ids", 1.0), ("paper", 100.0), ("paper", 40.0))
GRID_METHODS = ("cloud_only",) + BASELINES + ("pipesd_model",)


@dataclass(frozen=True)
class GridPoint:
    rtt_ms: float
    draft_ms: float | None
    payload: str
    up_mbps: float

    @property
    def name(self) -> str:
        draft = "native" if self.draft_ms is None else f"{self.draft_ms:g}ms"
        return f"rtt{self.rtt_ms:g}/draft {draft}/{self.payload}@{self.up_mbps:g}Mbps"

    def link(self, vocab_size: int, seed: int) -> LinkProfile:
        extra = PAPER_PAYLOAD_BYTES if self.payload == "paper" else payload_bytes(self.payload, vocab_size)
        return LinkProfile(self.up_mbps, max(10 * self.up_mbps, 100.0), self.rtt_ms, extra,
                           jitter_ms=self.rtt_ms / 20, seed=seed)


def grid_points() -> list[GridPoint]:
    return [GridPoint(r, d, p, u) for p, u in GRID_LINKS for r in GRID_RTT_MS for d in GRID_DRAFT_MS]


@dataclass
class GridConfig:
    tokens: int = 192
    tokens_per_prompt: int = 64
    seed: int = 0
    pin: bool = False
    out: Path = Path("grid-results")
    progress: bool = True
    points: list = field(default_factory=grid_points)


class _Lab:
    """What both experiments share: the verifier process, the measured draft, references, clients."""

    def __init__(self, pin: bool, seed: int):
        self.pin, self.seed = pin, seed
        self._references: dict[str, list[int]] = {}

    def __enter__(self):
        from cloud_verifier import LocalVerifier

        cores = sorted(os.sched_getaffinity(0))
        verifier_cpus = None
        if self.pin and len(cores) >= 2:
            os.sched_setaffinity(0, cores[:-1])
            verifier_cpus = {cores[-1]}
        self.verifier = LocalVerifier(model="embedded", threads=1, cpus=verifier_cpus).__enter__()
        self.reference_client = EdgeClient(self.verifier.url, verifier_key=self.verifier.public_key,
                                           pair="embedded", mode="cloud_only", threads=1)
        self.gamma, self.vocab = self._measure_gamma()
        return self

    def __exit__(self, *exc):
        self.reference_client.close()
        self.verifier.__exit__(*exc)

    @staticmethod
    def _measure_gamma() -> tuple[float, int]:
        from pipesd_models import draft_path

        d = LlamaCppDrafter(draft_path(), threads=1)
        return draft_seconds_per_token(d), d.vocab_size

    def client(self, method: str, profile: LinkProfile, draft_s: float | None) -> EdgeClient:
        from pipesd_models import draft_path

        added = 0.0 if draft_s is None else max(0.0, draft_s - self.gamma)
        drafter = SlowedDrafter(LlamaCppDrafter(draft_path(), threads=1), added)
        return EdgeClient(verifier=EmulatedLink.http(self.verifier.url, profile, verifier_key=self.verifier.public_key),
                          drafter=drafter, mode=make_policy(method))

    def reference(self, prompt: str, n: int) -> list[int]:
        if prompt not in self._references:
            self._references[prompt] = self.reference_client.generate(prompt, max_new_tokens=n,
                                                                       mode="cloud_only").tokens
        return self._references[prompt]


def run_grid(cfg: GridConfig) -> list[dict]:
    rows = []
    bar = _progress(len(cfg.points) * len(GRID_METHODS) * cfg.tokens, cfg.progress)
    with _Lab(cfg.pin, cfg.seed) as lab:
        for point in cfg.points:
            if bar is not None:
                bar.set_description(point.name)
            draft_s = None if point.draft_ms is None else point.draft_ms / 1e3
            profile = point.link(lab.vocab, cfg.seed)
            clients = {m: lab.client(m, profile, draft_s) for m in GRID_METHODS}
            tallies = {m: Tally("embedded", "grid", point.name, m) for m in GRID_METHODS}
            try:
                for c in clients.values():                   # warm-up: the profiler, the plans
                    c.generate(PROMPTS[-1], max_new_tokens=cfg.tokens_per_prompt)
                i = 0
                while any(t.tokens < cfg.tokens for t in tallies.values()):
                    prompt = PROMPTS[i % len(PROMPTS)]
                    i += 1
                    for m, c in clients.items():
                        if tallies[m].tokens >= cfg.tokens:
                            continue
                        r = c.generate(prompt, max_new_tokens=cfg.tokens_per_prompt)
                        tallies[m].add(r.stats, r.tokens == lab.reference(prompt, cfg.tokens_per_prompt))
                        if bar is not None:
                            bar.update(r.stats.output_tokens)
            finally:
                for c in clients.values():
                    c.close()
            tpt = {m: t.tpt_ms for m, t in tallies.items()}
            best = min(tpt[m] for m in BASELINES)
            rows.append({**asdict(point), "name": point.name, "gamma_ms": 1e3 * (draft_s or lab.gamma),
                         "tpt_ms": tpt, "best_baseline_ms": best, "speedup": best / tpt["pipesd_model"],
                         "vs_cloud_only": tpt["cloud_only"] / tpt["pipesd_model"],
                         "mismatches": {m: t.mismatches for m, t in tallies.items()},
                         "passes_per_token": {m: t.row()["passes_per_token"] for m, t in tallies.items()}})
    if bar is not None:
        bar.close()
    return rows


def grid_markdown(rows: list[dict], command: str, cfg: GridConfig) -> str:
    speedups = [r["speedup"] for r in rows]
    over = sum(s >= 1.1 for s in speedups)
    lines = [f"Command: `{command}`", "",
             f"Date {time.strftime('%Y-%m-%d')}, commit {git_commit()}; {len(rows)} points, >= {cfg.tokens} output "
             f"tokens per method and point ({cfg.tokens_per_prompt} per prompt). PipeSD = `pipesd_model` (nothing "
             "tuned per point). TPT in ms per output token.", "",
             f"PipeSD vs the best of Vanilla/HSL/EdgeLLM: min {min(speedups):.2f}x, median "
             f"{statistics.median(speedups):.2f}x; >= 1.1x at {over} of {len(rows)} points; below 1.0x at "
             f"{sum(s < 1.0 for s in speedups)}.", "",
             "| point | draft ms/token | cloud_only | vanilla | hsl | edgellm | PipeSD | vs best baseline "
             "| vs cloud_only | lossless |", "|" + "---|" * 10]
    for r in rows:
        t = r["tpt_ms"]
        lossless = "yes" if all(v == 0 for v in r["mismatches"].values()) else f"NO {r['mismatches']}"
        lines.append(f"| {r['name']} | {r['gamma_ms']:.1f} | {_fmt(t['cloud_only'])} | {_fmt(t['vanilla'])} "
                     f"| {_fmt(t['hsl'])} | {_fmt(t['edgellm'])} | {_fmt(t['pipesd_model'])} | {r['speedup']:.2f}x "
                     f"| {r['vs_cloud_only']:.2f}x | {lossless} |")
    return "\n".join(lines) + "\n"


def grid_plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    links = list(dict.fromkeys((r["payload"], r["up_mbps"]) for r in rows))
    cols = list(dict.fromkeys((r["rtt_ms"], r["draft_ms"]) for r in rows))
    grid = [[math.nan] * len(cols) for _ in links]
    for r in rows:
        grid[links.index((r["payload"], r["up_mbps"]))][cols.index((r["rtt_ms"], r["draft_ms"]))] = r["speedup"]
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2, 0.8 * len(links) + 1.8))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.8, vmax=2.0, aspect="auto")
    for i in range(len(links)):
        for j in range(len(cols)):
            if not math.isnan(grid[i][j]):
                ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(cols)), [f"RTT {r:g}\ndraft {'native' if d is None else f'{d:g}ms'}" for r, d in cols],
                  fontsize=7)
    ax.set_yticks(range(len(links)), [f"{p} @ {u:g} Mbps" for p, u in links], fontsize=8)
    ax.set_title("PipeSD speed-up over the best of Vanilla / HSL / EdgeLLM")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- steps: a bandwidth trace under PipeSD ----------------------------------------------------------
@dataclass
class StepsConfig:
    seconds: float = 120.0
    payload: str = "full"
    seed: int = 0
    pin: bool = False
    out: Path = Path("steps-results")


def run_steps(cfg: StepsConfig) -> dict:
    with _Lab(cfg.pin, cfg.seed) as lab:
        scenario = get_scenario("s4")
        profile = scenario.link("native", cfg.payload, seed=cfg.seed, vocab_size=lab.vocab)
        client = lab.client("pipesd", profile, None)
        policy = client.policy()
        rounds = []
        start_round, on_verdict = policy.start_round, policy.on_verdict
        link = client.engine.cloud.verifier

        def record_start(estimate):
            start_round(estimate)
            plan = policy.plan
            rounds.append({"t": time.perf_counter(), "head_cap": policy.max_draft, "plan_head": plan.best_length,
                           "ahead": plan.ahead, "ahead_draft": plan.ahead_draft,
                           "beta_ms": 1e3 * estimate.upload_per_token})

        def record_verdict(verdict):
            on_verdict(verdict)
            if rounds:
                rounds[-1]["drafted"] = len(verdict.draft)

        policy.start_round, policy.on_verdict = record_start, record_verdict
        try:
            t0 = link.up.t0
            i, mismatches, tokens = 0, 0, 0
            while time.perf_counter() - t0 < cfg.seconds:
                prompt = PROMPTS[i % len(PROMPTS)]
                i += 1
                r = client.generate(prompt, max_new_tokens=64)
                mismatches += r.tokens != lab.reference(prompt, 64)
                tokens += r.stats.output_tokens
        finally:
            client.close()
    trace = profile.trace
    rounds = [r for r in rounds if "drafted" in r]          # rounds that got their verdict
    for r in rounds:
        r["t"] -= t0
        r["up_mbps"] = trace.mbps(r["t"], 1)[0]
    return {"rounds": rounds, "segments": [list(s) for s in trace.segments], "mismatches": mismatches,
            "payload_bytes": profile.payload_bytes_per_token,
            "tokens": tokens, "payload": cfg.payload, "seconds": cfg.seconds,
            "steps": _step_response(rounds, payload_bytes=profile.payload_bytes_per_token)}


def _step_response(rounds: list[dict], window: int = 5, payload_bytes: int = 0) -> list[dict]:
    """For each bandwidth change: drafted tokens per round before it (median of the 30 rounds before)
    and after it (median of rounds 10-40 after), the rounds it took a running median of `window` rounds
    to come within one token of the latter, the rounds until the controller's per-token upload time is
    within 30% of the new link's (when `payload_bytes` says what that is), and the structure it planned
    most before and after."""
    out = []
    marks = [i for i in range(1, len(rounds)) if rounds[i]["up_mbps"] != rounds[i - 1]["up_mbps"]]
    for k, i in enumerate(marks):
        end = marks[k + 1] if k + 1 < len(marks) else len(rounds)
        before = [r["drafted"] for r in rounds[max(0, i - 30): i]]
        after = [r["drafted"] for r in rounds[i + 10: min(end, i + 40)]]
        if len(before) < window or len(after) < window:
            continue
        settled = statistics.median(after)
        took = next((j for j in range(0, end - i - window)
                     if abs(statistics.median(r["drafted"] for r in rounds[i + j: i + j + window]) - settled) <= 1),
                    None)
        truth = payload_bytes * 8 / (rounds[i]["up_mbps"] * 1e6) * 1e3 if payload_bytes else None
        seen = None if truth is None else next(
            (j for j in range(0, end - i) if abs(rounds[i + j]["beta_ms"] - truth) <= 0.3 * truth), None)
        structure = lambda rs: Counter((r["plan_head"], r["ahead"], r["ahead_draft"]) for r in rs).most_common(1)[0][0]
        out.append({"at_s": rounds[i]["t"], "from_mbps": rounds[i - 1]["up_mbps"], "to_mbps": rounds[i]["up_mbps"],
                    "before": statistics.median(before), "after": settled, "rounds_to_settle": took,
                    "true_beta_ms": truth, "rounds_to_price": seen,
                    "plan_before": structure(rounds[max(0, i - 30): i]),
                    "plan_after": structure(rounds[i + 10: min(end, i + 40)])})
    return out


def steps_markdown(result: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Date {time.strftime('%Y-%m-%d')}, commit {git_commit()}; S4's trace (seed 0), native regime, payload "
             f"`{result['payload']}`, {result['seconds']:g} s, {len(result['rounds'])} rounds, {result['tokens']} tokens, "
             f"{result['mismatches']} generations differing from target greedy.", "",
             "Around each change of the uplink: the drafted tokens per round (a head's, or a round ahead's; median of "
             "30 rounds before and of rounds 10-40 after) and the rounds until a running median of 5 is within one "
             "token of where it settles; the controller's upload time per drafted token against the new link's, and "
             "the rounds until it is within 30% of it; the structure planned most (head + rounds ahead × their "
             "drafts) before and after.", "",
             "| at s | uplink Mbps | drafted / round before → after | rounds to settle | link's ms / token "
             "| rounds to price it | structure before → after |", "|---|---|---|---|---|---|---|"]
    for s in result["steps"]:
        pb, pa = s["plan_before"], s["plan_after"]
        lines.append(f"| {s['at_s']:.1f} | {s['from_mbps']:g} → {s['to_mbps']:g} | {s['before']:g} → {s['after']:g} "
                     f"| {s['rounds_to_settle']} | {_fmt(s['true_beta_ms'], 2)} | {s['rounds_to_price']} "
                     f"| {pb[0]} + {pb[1]}×{pb[2]} → {pa[0]} + {pa[1]}×{pa[2]} |")
    return "\n".join(lines) + "\n"


def steps_plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rounds = result["rounds"]
    if not rounds:
        return None
    t = [r["t"] for r in rounds]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    truth = [result["payload_bytes"] * 8 / (r["up_mbps"] * 1e6) * 1e3 for r in rounds]
    top.plot(t, truth, color="tab:red", label="the link's upload time per drafted token")
    top.plot(t, [r["beta_ms"] for r in rounds], ".", markersize=2, color="tab:gray", label="the controller's estimate")
    top.set_ylabel("ms per drafted token")
    top.set_ylim(0, 3 * max(truth))
    top.legend(fontsize=8, loc="upper right")
    top.set_title(f"PipeSD on S4's bandwidth trace ({result['payload']} payload): the link, and what the controller "
                  "plans on it", fontsize=10)
    bottom.scatter(t, [r["drafted"] for r in rounds], s=3, color="tab:blue", alpha=0.3, label="drafted tokens in the round")
    run = [statistics.median(r["drafted"] for r in rounds[max(0, i - 10): i + 1]) for i in range(len(rounds))]
    bottom.plot(t, run, color="tab:blue", label="running median (11 rounds)")
    bottom.plot(t, [r["ahead_draft"] if r["ahead"] else math.nan for r in rounds], color="tab:green", linewidth=1,
                label="planned drafts per round ahead")
    bottom.set_ylabel("drafted tokens per round")
    bottom.set_xlabel("seconds")
    bottom.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_grid_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tokens", type=int, default=192, help="output tokens per method and point")
    ap.add_argument("--quick", action="store_true", help="three points, 64 tokens each")
    ap.add_argument("--pin", action="store_true", help="edge and verifier on separate cores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")


def add_steps_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seconds", type=float, default=120.0, help="how long to generate on the trace")
    ap.add_argument("--payload", default="full", choices=("ids", "topk", "full"))
    ap.add_argument("--pin", action="store_true", help="edge and verifier on separate cores")
    ap.add_argument("--seed", type=int, default=0)


def grid_main(args, command: str) -> list[Path]:
    if args.tokens < 1:
        raise ValueError("--tokens must be positive")
    cfg = GridConfig(tokens=args.tokens, seed=args.seed, pin=args.pin, out=args.out, progress=not args.no_progress)
    if args.quick:
        cfg.tokens, cfg.tokens_per_prompt = 64, 32
        cfg.points = [GridPoint(40.0, None, "ids", 1.0), GridPoint(10.0, 40.0, "paper", 100.0),
                      GridPoint(150.0, 5.0, "ids", 1.0)]
    rows = run_grid(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    written = [cfg.out / "grid.md", cfg.out / "grid.json"]
    written[0].write_text(grid_markdown(rows, command, cfg))
    written[1].write_text(json.dumps({"command": command, "commit": git_commit(), "rows": rows}, indent=1))
    png = grid_plot(rows, cfg.out / "grid.png")
    return written + ([png] if png else [])


def steps_main(args, command: str) -> list[Path]:
    if not args.seconds > 0:
        raise ValueError("--seconds must be positive")
    cfg = StepsConfig(seconds=args.seconds, payload=args.payload, seed=args.seed, pin=args.pin, out=args.out)
    result = run_steps(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    written = [cfg.out / "steps.md", cfg.out / "steps.json"]
    written[0].write_text(steps_markdown(result, command))
    written[1].write_text(json.dumps({"command": command, "commit": git_commit(), **result}, indent=1))
    png = steps_plot(result, cfg.out / "steps.png")
    return written + ([png] if png else [])
