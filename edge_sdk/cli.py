"""pipesd: the edge command line.

    pipesd generate "def fibonacci(n):" --verifier http://127.0.0.1:8000 --verifier-key <base64> -k 4
    pipesd generate "import os" --mode edge_only          # no cloud at all
    pipesd bench --quick --out /tmp/bench                  # the paper's evaluation (see bench.py)
    pipesd energy --quick --out /tmp/energy                # J per token per method (see energy_bench.py)
    pipesd link --upstream 127.0.0.1:8000 --scenario s1    # an emulated link as a TCP proxy
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from energy import MeterError

from .client import EdgeClient
from .errors import ConfigError, PipeSDError
from .policies import MODES


def _generate(args) -> int:
    psk = args.psk_file.read_bytes().strip() if args.psk_file else None
    client = EdgeClient(args.verifier, verifier_key=args.verifier_key, psk=psk, pair=args.pair,
                        draft_model=args.draft_model, draft_backend=args.draft_backend, mode=args.mode, draft_k=args.k, r1=args.r1, r2=args.r2,
                        threads=args.threads,
                        local_only=args.local_only)
    with client:
        gen = client.stream(args.prompt, max_new_tokens=args.max_new_tokens, stop=args.stop or (),
                            parse_special=args.parse_special)
        if args.json:
            r = gen.result
            print(json.dumps({"text": r.text, "tokens": r.tokens, "stats": r.stats.to_dict()}))
        else:
            for event in gen:
                print(event.text, end="", flush=True)
            print()
            print(gen.stats.summary(), file=sys.stderr)
    return 0


def _configure(config_from_args, args):
    try:
        return config_from_args(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _command_line(args) -> str:
    return "pipesd " + " ".join(sys.argv[1:] if args.argv is None else args.argv)


def _bench(args) -> int:
    from .bench import Bench, config_from_args

    bench = Bench(_configure(config_from_args, args))
    bench.run()
    for path in bench.write(_command_line(args)):
        print(path)
    failures = [t for t in bench.results + bench.sweep if t.mismatches > 0 or t.unverified]
    for t in failures:
        print(f"pipesd bench: NOT LOSSLESS: {t.method} in {t.pair}/{t.regime}/{t.scenario} "
              f"({t.mismatches} generations differ from target greedy, {t.unverified} tokens went out "
              f"unverified)", file=sys.stderr)
    return 1 if failures else 0


def _energy(args) -> int:
    from .energy_bench import EnergyBench, config_from_args

    run = EnergyBench(_configure(config_from_args, args))
    run.run()
    for path in run.write(_command_line(args)):
        print(path)
    return 0


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
    ap = argparse.ArgumentParser(prog="pipesd", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    g.add_argument("--verifier", help="verifier base URL (not needed for --mode edge_only)")
    g.add_argument("--verifier-key", help="the verifier's public key (base64, printed by pipesd-verifier)")
    g.add_argument("--psk-file", type=Path, help="pre-shared key file instead of --verifier-key")
    g.add_argument("--local-only", action="store_true", help="never contact the cloud (private request)")
    g.add_argument("--mode", choices=MODES, default="pipesd")
    g.add_argument("-k", type=int, default=4, help="draft length (vanilla)")
    g.add_argument("--r1", type=float, help="fixed C_n threshold (PipeSD policies; default: tuned online)")
    g.add_argument("--r2", type=float, help="fixed P(d_n) threshold (PipeSD policies, HSL)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    g.add_argument("--pair", default="embedded", help="model pair: embedded (default) or smollm2")
    g.add_argument("--draft-model", help="draft model path (overrides --pair): GGUF, or .onnx with --draft-backend onnx")
    g.add_argument("--draft-backend", choices=("llamacpp", "onnx"), default="llamacpp",
                   help="draft runtime: llama.cpp (GGUF, default) or onnxruntime")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--parse-special", action="store_true", help="parse control tokens in the prompt")
    g.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and stats")
    g.set_defaults(func=_generate)

    from .bench import add_arguments

    b = sub.add_parser("bench", help="the paper's evaluation: methods x scenarios x model pairs")
    add_arguments(b)
    b.set_defaults(func=_bench)

    from .energy_bench import add_arguments as add_energy_arguments

    e = sub.add_parser("energy", help="joules per output token of each method, edge and cloud, per scenario")
    add_energy_arguments(e)
    e.set_defaults(func=_energy)

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
    args = ap.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (PipeSDError, OSError, MeterError) as exc:
        print(f"pipesd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
