"""pipesd energy: what each decoding method costs in joules, on the device and in the cloud.

    pipesd energy --out docs/energy                   # S1-S4, paper regime, 5 repetitions per method
    pipesd energy --quick --out /tmp/energy           # S1 native, 3 methods, short requests

Per scenario, one ``EdgeClient`` per method on the scenario's emulated link (as ``pipesd bench``),
PipeSD's round controller corrected by its tuner first (the paper's ``pipesd_bo`` tuned, or fixed
with ``--r1/--r2``). A method may name the controller's objective: ``pipesd:cloud_cost``,
``pipesd:edge_energy``. For each method the ``energy``
harness runs a warm-up request, then >= 5 measured requests (one prompt each, prompts in turn), after
an idle baseline that it subtracts. Each request reports an ``energy.Activity``: output tokens, seconds
drafting / offline / waiting, the compute the scenario emulated by sleeping (a slow device's drafting),
and every transfer the emulated link put on the air (for the radio model).

Meters: the edge is this process (every client runs in it); the cloud is the verifier process. On a
machine without counters both are modelled (CPU time × a device's per-core power; the radio from its
transfers), and the tables say so. Device models per scenario: S1/S4 laptop, S2 phone, S3 IoT board;
the cloud is a server core. Results: ``energy.csv``, ``energy.json``, ``energy.md``, ``energy.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from energy import METERS, RADIOS, Activity, CpuClock, Harness, Transfer, detect_meter
from energy.report import markdown_table, plot, write_csv

from edge_sdk.policies import MODES

from .bench import PAPER_TRIGGER, Bench, BenchConfig, git_commit, method_known
from .scenarios import REGIMES, SCENARIOS, get_scenario

DEVICE_MODELS = {"s1": "laptop", "s2": "phone", "s3": "iot", "s4": "laptop"}
METHODS = ("cloud_only", "edge_only", "vanilla", "hsl", "edgellm", "pipesd")


@dataclass
class EnergyConfig:
    pair: str = "embedded"
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    regime: str = "paper"
    methods: tuple[str, ...] = METHODS
    repetitions: int = 5
    warmup: int = 1
    tokens: int = 64                 # output tokens per measured request
    idle_s: float = 3.0
    edge_meter: str = "auto"
    cloud_meter: str = "auto"
    radio: str = "wifi"
    r1: float | None = None          # fixed thresholds of the paper's trigger modes (default: pipesd_bo tunes them)
    r2: float | None = None
    max_tune_prompts: int = 40
    pin: bool = False
    seed: int = 0
    progress: bool = True
    out: Path = Path("energy-results")
    notes: dict = field(default_factory=dict)


class _Request:
    """One measured request of `method` through `client`: the callable the harness measures."""

    def __init__(self, client, method: str, tokens: int, prompts: list):
        self.client, self.method, self.tokens, self.prompts = client, method, tokens, prompts
        self.i = 0
        self.link = getattr(client, "verifier", None)
        self.tpt_s: list[float] = []

    def __call__(self) -> Activity:
        prompt = self.prompts[self.i % len(self.prompts)]
        self.i += 1
        up = down = None
        if self.link is not None and hasattr(self.link, "up"):
            up, down = self.link.up, self.link.down
            up.log, down.log = [], []
        drafter = self.client.drafter
        slept0 = getattr(drafter, "slept_s", 0.0)
        stats = self.client.generate(prompt, max_new_tokens=self.tokens).stats
        self.tpt_s.append(stats.total_s / max(1, stats.output_tokens))
        transfers = []
        for direction, serial in (("up", up), ("down", down)):
            if serial is not None:
                transfers += [Transfer(s, e, direction, n) for s, e, n in serial.log]
                serial.log = None
        return Activity(output_tokens=stats.output_tokens, draft_s=stats.draft_s, fallback_s=stats.offline_s,
                        wait_s=stats.wait_s, emulated_compute_s=getattr(drafter, "slept_s", 0.0) - slept0,
                        transfers=transfers, emulated_link=True)


class EnergyBench:
    def __init__(self, config: EnergyConfig):
        self.config = config
        self.rows: list[dict] = []
        self.meters: dict[str, list[str]] = {}
        self.commit = git_commit()      # taken at the start: the code that runs

    def run(self) -> None:
        from cloud_verifier import LocalVerifier

        cfg = self.config
        bench = Bench(BenchConfig(pairs=(cfg.pair,), regimes=(cfg.regime,), pin=cfg.pin, seed=cfg.seed,
                                  tokens_per_prompt=cfg.tokens, max_tune_prompts=cfg.max_tune_prompts,
                                  progress=False))
        verifier_cpus = bench.pin_cores()
        bench.prepare(cfg.pair)
        prompts = bench.prompts[cfg.pair]      # the pair's own: chat turns interleaved for SmolLM2 pairs
        with LocalVerifier(model=cfg.pair, threads=1, cpus=verifier_cpus) as v:
            for name in cfg.scenarios:
                scenario = get_scenario(name)
                device = DEVICE_MODELS.get(name, "laptop")
                edge, skipped_e = detect_meter("edge", cfg.edge_meter, cpu=CpuClock(), model=device,
                                               shared_machine=True)
                cloud, skipped_c = detect_meter("cloud", cfg.cloud_meter, cpu=CpuClock(v.proc.pid), model="server",
                                                shared_machine=True)
                self.meters[name] = [f"edge: {edge.name}", *skipped_e, f"cloud: {cloud.name}", *skipped_c]
                harness = Harness(edge, cloud, radio=cfg.radio, edge_model=device, repetitions=cfg.repetitions,
                                  warmup=cfg.warmup, idle_s=cfg.idle_s, progress=cfg.progress)
                r1, r2 = cfg.r1, cfg.r2
                clients = {}
                try:
                    paper = [m for m in cfg.methods if m in PAPER_TRIGGER]
                    if paper and r1 is None:      # the paper's trigger: BO first, as the paper did
                        clients["pipesd_bo"] = bench.client(v, cfg.pair, scenario, cfg.regime, "pipesd_bo")
                        bench.tune(clients["pipesd_bo"], prompts)
                        r1, r2 = clients["pipesd_bo"].policy().thresholds
                    for method in cfg.methods:
                        if method not in clients:
                            fixed = method in PAPER_TRIGGER and r1 is not None
                            clients[method] = bench.client(v, cfg.pair, scenario, cfg.regime, method,
                                                            *((r1, r2) if fixed else ()))
                            bench.tune(clients[method], prompts)      # pipesd's correction (others: none)
                        request = _Request(clients[method], method, cfg.tokens, prompts)
                        m = harness.measure(request, label=f"{name} {method}")
                        row = dict(scenario=name, method=method, regime=cfg.regime, pair=cfg.pair, device=device,
                                   radio=cfg.radio, r1=r1 if method in PAPER_TRIGGER else None,
                                   r2=r2 if method in PAPER_TRIGGER else None,
                                   tpt_ms=1e3 * sum(request.tpt_s[-cfg.repetitions:]) / cfg.repetitions, **m.row())
                        self.rows.append(row)
                        if cfg.progress:
                            print(f"  {name} {method}: edge {m.edge_per_token} J/token, cloud "
                                  f"{m.cloud_per_token} J/token", file=sys.stderr)
                finally:
                    for c in clients.values():
                        c.close()

    def write(self, command: str) -> list[Path]:
        out = self.config.out
        out.mkdir(parents=True, exist_ok=True)
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items()}
        meta = {"command": command, "date": time.strftime("%Y-%m-%d"), "commit": self.commit, "config": cfg,
                "meters": self.meters}
        written = [write_csv(self.rows, out / "energy.csv"), out / "energy.json", out / "energy.md"]
        written[1].write_text(json.dumps({"meta": meta, "rows": self.rows}, indent=1, default=str))
        head = (f"Command: `{command}`\n\nDate {meta['date']}, commit {meta['commit']}; pair {self.config.pair}, {self.config.regime} regime, "
                f"{self.config.repetitions} measured requests of {self.config.tokens} tokens per method (mean ± 95% "
                f"interval), idle baseline subtracted; radio model {self.config.radio}.\n\n")
        meters = "\n".join(f"- {s}: " + "; ".join(lines) for s, lines in self.meters.items())
        written[2].write_text(head + markdown_table(self.rows) + "\nMeter detection per scenario:\n\n" + meters + "\n")
        png = plot(self.rows, out / "energy.png")
        return written + ([png] if png else [])


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--pair", default="embedded")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: s1,s2,s3,s4")
    ap.add_argument("--regime", choices=REGIMES, default="paper")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=5, help="measured requests per method (>= 5)")
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--idle-s", type=float, default=3.0, help="seconds of idle baseline")
    ap.add_argument("--edge-meter", choices=METERS, default="auto")
    ap.add_argument("--cloud-meter", choices=METERS, default="auto")
    ap.add_argument("--radio", choices=sorted(RADIOS), default="wifi")
    ap.add_argument("--r1", type=float, help="fixed thresholds of the paper's trigger modes (pipesd_bo, "
                                             "pipesd_fixed, ...; default: tuned online)")
    ap.add_argument("--r2", type=float)
    ap.add_argument("--max-tune-prompts", type=int, default=40)
    ap.add_argument("--pin", action="store_true", help="edge and verifier on separate cores")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: S1 native, 3 methods, 16-token requests")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: a new temporary one)")


def config_from_args(args) -> EnergyConfig:
    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())   # noqa: E731
    cfg = EnergyConfig(pair=args.pair, scenarios=split(args.scenarios), regime=args.regime,
                       methods=split(args.methods), repetitions=args.reps, tokens=args.tokens, idle_s=args.idle_s,
                       edge_meter=args.edge_meter, cloud_meter=args.cloud_meter, radio=args.radio, r1=args.r1,
                       r2=args.r2, max_tune_prompts=args.max_tune_prompts, pin=args.pin, seed=args.seed,
                       progress=not args.no_progress, out=args.out)
    if args.quick:
        cfg.scenarios, cfg.regime, cfg.methods, cfg.tokens, cfg.idle_s = ("s1",), "native", \
            ("cloud_only", "vanilla", "pipesd_model"), 16, 0.5
    for s in cfg.scenarios:
        get_scenario(s)
    bad = [m for m in cfg.methods if not method_known(m)]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if cfg.repetitions < 5:
        raise ValueError("--reps must be >= 5")
    if cfg.tokens < 1 or cfg.idle_s <= 0:
        raise ValueError("--tokens must be >= 1 and --idle-s > 0")
    if (cfg.r1 is None) != (cfg.r2 is None):
        raise ValueError("give both --r1 and --r2, or neither")
    return cfg
