"""The lab's commands, run as ``pipesd bench | energy | link`` (the edge CLI hands them over).

    pipesd bench --quick --out /tmp/bench                  # the paper's evaluation (bench.py)
    pipesd energy --quick --out /tmp/energy                # J per token per method (energy_bench.py)
    pipesd link --upstream 127.0.0.1:8000 --scenario s1    # an emulated link as a TCP proxy
    pipesd grid --quick --out /tmp/grid                    # beyond the bench's cells (generalise.py)
    pipesd steps --seconds 60 --out /tmp/steps             # PipeSD on S4's bandwidth trace (generalise.py)
    pipesd rounds --scenario s1 --out /tmp/rounds          # where a method's time goes, verdict by verdict (rounds.py)
    pipesd stopping --out /tmp/stopping                    # what a stopping rule can save in target passes (stopping.py)
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import tempfile
from pathlib import Path

import cloud_verifier.app  # noqa: F401  (the lab runs verifiers: fail here, where the CLI names the extra)
from edge_sdk.errors import ConfigError, PipeSDError
from energy import MeterError


def _configure(config_from_args, args):
    try:
        return config_from_args(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _command_line(args) -> str:
    return "pipesd " + " ".join(args.argv)


def _out(command: str) -> Path:
    """Where results go without --out: a new temporary folder, named at once (not the working tree)."""
    out = Path(tempfile.mkdtemp(prefix=f"pipesd-{command}-"))
    print(f"pipesd {command}: writing to {out} (--out DIR to choose)", file=sys.stderr, flush=True)
    return out


def _bench(args) -> int:
    from .bench import Bench, config_from_args

    cfg = _configure(config_from_args, args)
    cfg.out = cfg.out or _out("bench")
    bench = Bench(cfg)
    bench.run()
    written = bench.write(_command_line(args))
    print("\n".join(bench.headline()))
    print(f"written: {', '.join(p.name for p in written)} in {bench.config.out}")
    failures = [t for t in bench.results + bench.sweep if t.mismatches > 0 or t.unverified]
    for t in failures:
        print(f"pipesd bench: NOT LOSSLESS: {t.method} in {t.pair}/{t.regime}/{t.scenario} "
              f"({t.mismatches} generations differ from target greedy, {t.unverified} tokens went out "
              f"unverified)", file=sys.stderr)
    return 1 if failures else 0


def _energy(args) -> int:
    from .energy_bench import EnergyBench, config_from_args

    cfg = _configure(config_from_args, args)
    cfg.out = cfg.out or _out("energy")
    run = EnergyBench(cfg)
    run.run()
    for path in run.write(_command_line(args)):
        print(path)
    return 0


def _written_by(main, name: str, args) -> int:
    """Run a lab command's ``main(args, command)`` into ``args.out`` (a new temporary folder by default),
    its bad arguments a ConfigError, and print the files it wrote."""
    args.out = args.out or _out(name)
    try:
        written = main(args, _command_line(args))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for path in written:
        print(path)
    return 0


# The lab commands that write their results into --out: (module, its add-arguments function, its
# main(args, command), help), registered by ``main`` and run by ``_written_by``.
WRITTEN = {
    "grid": ("generalise", "add_grid_arguments", "grid_main",
             "PipeSD vs the baselines on a grid of links and devices beyond the bench's"),
    "steps": ("generalise", "add_steps_arguments", "steps_main", "PipeSD's rounds against S4's bandwidth trace"),
    "rounds": ("rounds", "add_rounds_arguments", "rounds_main",
               "where a method's time goes: the gaps between its verdicts, by kind of round"),
    "stopping": ("stopping", "add_stopping_arguments", "stopping_main",
                 "what a round's stopping rule can save in target passes, replayed offline"),
}


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


def _link(args) -> int:
    from .emulation import BandwidthTrace, LinkProfile
    from .linkproxy import LinkProxy
    from .scenarios import get_scenario

    try:
        if args.scenario:
            profile = get_scenario(args.scenario).link("native", seed=args.seed)
        else:
            trace = BandwidthTrace.from_file(args.trace) if args.trace else None
            profile = LinkProfile(args.up, args.down, args.rtt, jitter_ms=args.jitter, loss=args.loss,
                                  trace=trace, seed=args.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    proxy = LinkProxy(args.upstream, profile, listen=args.listen)
    proxy.start()
    print(f"link {profile.describe()}: {proxy.url} -> {args.upstream[0]}:{args.upstream[1]}", flush=True)
    proxy.serve_forever()
    return 0


def main(argv=None) -> int:
    from .bench import add_arguments
    from .energy_bench import add_arguments as add_energy_arguments

    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="pipesd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="the paper's evaluation: methods x scenarios x model pairs")
    add_arguments(b)
    b.set_defaults(func=_bench)
    e = sub.add_parser("energy", help="joules per output token of each method, edge and cloud, per scenario")
    add_energy_arguments(e)
    e.set_defaults(func=_energy)
    for name, (module, add, run, help_text) in WRITTEN.items():
        lab = importlib.import_module(f".{module}", __package__)
        sp = sub.add_parser(name, help=help_text)
        getattr(lab, add)(sp)
        sp.add_argument("--out", type=Path, default=None, help="results folder (default: a new temporary one)")
        sp.set_defaults(func=functools.partial(_written_by, getattr(lab, run), name))
    lk = sub.add_parser("link", help="run an emulated link as a TCP proxy in front of a verifier")
    lk.add_argument("--upstream", type=_hostport, required=True, help="the verifier, HOST:PORT")
    lk.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0), help="HOST:PORT (default: a free port)")
    lk.add_argument("--scenario", help="s1..s4 (overrides the figures below)")
    lk.add_argument("--up", type=float, default=20.0, help="uplink Mbps")
    lk.add_argument("--down", type=float, default=200.0, help="downlink Mbps")
    lk.add_argument("--rtt", type=float, default=20.0, help="round-trip time, ms")
    lk.add_argument("--jitter", type=float, default=0.0, help="one-way jitter, ms")
    lk.add_argument("--loss", type=float, default=0.0, help="probability a chunk is lost once (arrives an RTO late)")
    lk.add_argument("--trace", type=Path, help="CSV of seconds,up_mbps,down_mbps segments (repeats)")
    lk.add_argument("--seed", type=int, default=0)
    lk.set_defaults(func=_link)
    ap.set_defaults(argv=argv)      # recorded with the results
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (PipeSDError, OSError, MeterError) as exc:
        print(f"pipesd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
