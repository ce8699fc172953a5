"""pipesd: the edge command line.

    pipesd generate "def fibonacci(n):" --verifier http://127.0.0.1:8000 --verifier-key <base64> -k 4
    pipesd generate "import os" --mode edge_only          # no cloud at all
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .client import EdgeClient
from .errors import PipeSDError
from .policies import MODES


def _generate(args) -> int:
    psk = args.psk_file.read_bytes().strip() if args.psk_file else None
    client = EdgeClient(args.verifier, verifier_key=args.verifier_key, psk=psk, pair=args.pair,
                        draft_model=args.draft_model, mode=args.mode, draft_k=args.k, r1=args.r1, r2=args.r2,
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
    g.add_argument("--draft-model", help="GGUF draft model path (overrides --pair)")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--parse-special", action="store_true", help="parse control tokens in the prompt")
    g.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and stats")
    g.set_defaults(func=_generate)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (PipeSDError, OSError) as exc:
        print(f"pipesd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
