"""pipesd: the edge command line.

    pipesd generate "def fibonacci(n):" --verifier http://127.0.0.1:8000 --verifier-key <base64> --mode vanilla -k 4
    pipesd generate "import os" --mode edge_only          # no cloud at all
    pipesd serve --verifier http://127.0.0.1:8000 --verifier-key <base64>   # OpenAI API on 127.0.0.1:8080

and the lab's commands, when the lab's extra is installed (pip install 'pipesd[bench]'):

    pipesd bench --quick --out /tmp/bench                  # the paper's evaluation (pipesd_lab/bench.py)
    pipesd energy --quick --out /tmp/energy                # J per token per method (pipesd_lab/energy_bench.py)
    pipesd link --upstream 127.0.0.1:8000 --scenario s1    # an emulated link as a TCP proxy
    pipesd grid --quick --out /tmp/grid                    # PipeSD on links and devices beyond the bench's
    pipesd steps --seconds 60 --out /tmp/steps             # PipeSD's rounds on S4's bandwidth trace
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .client import EdgeClient
from .errors import PipeSDError
from .controller import OBJECTIVES
from .policies import MODES

LAB_COMMANDS = {
    "bench": "the paper's evaluation: methods x scenarios x model pairs",
    "energy": "joules per output token of each method, edge and cloud, per scenario",
    "link": "run an emulated link as a TCP proxy in front of a verifier",
    "grid": "PipeSD vs the baselines on a grid of links and devices the bench's cells do not contain",
    "steps": "PipeSD's rounds against S4's bandwidth trace (the controller following the link)",
}


def _generate(args) -> int:
    psk = args.psk_file.read_bytes().strip() if args.psk_file else None
    client = EdgeClient(args.verifier, verifier_key=args.verifier_key, psk=psk, pair=args.pair,
                        draft_model=args.draft_model, draft_backend=args.draft_backend, mode=args.mode, draft_k=args.k, r1=args.r1, r2=args.r2,
                        objective=args.objective,
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in LAB_COMMANDS:          # the lab parses its own arguments
        return _lab(argv[0], argv[1:])
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
    g.add_argument("-k", type=int, help="draft length (vanilla; default 4)")
    g.add_argument("--r1", type=float, help="fixed C_n threshold (PipeSD policies; default: tuned online)")
    g.add_argument("--r2", type=float, help="fixed P(d_n) threshold (PipeSD policies, HSL)")
    g.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="what PipeSD's round controller minimises per token (default latency)")
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

    from . import serve          # its arguments only: FastAPI and uvicorn are imported when it runs
    sv = sub.add_parser("serve", help="an OpenAI-compatible endpoint on the device (pip install 'pipesd[serve]')",
                        description=serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_arguments(sv)
    sv.set_defaults(func=serve.run)

    for name, help_text in LAB_COMMANDS.items():   # listed here, parsed by the lab (pipesd_lab.cli)
        sub.add_parser(name, help=help_text + " (pip install 'pipesd[bench]')")
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (PipeSDError, OSError) as exc:
        print(f"pipesd: {exc}", file=sys.stderr)
        return 2


def _lab(command: str, args: list[str]) -> int:
    """Hand a lab command over to ``pipesd_lab``, which needs the verifier and the energy harness."""
    try:
        from pipesd_lab.cli import main as lab_main
    except ImportError as exc:
        print(f"pipesd {command}: the lab needs its extra: pip install 'pipesd[bench]' ({exc})", file=sys.stderr)
        return 2
    return lab_main([command, *args])


if __name__ == "__main__":
    sys.exit(main())
