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
    pipesd rounds --scenario s1 --out /tmp/rounds          # where a method's time goes, verdict by verdict
    pipesd stopping --out /tmp/stopping                    # what a round's stopping rule can save in target passes
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

from .client import EdgeClient
from .controller import OBJECTIVES
from .errors import ConfigError, PipeSDError, VerifierUnavailable
from .offline import OFFLINE_POLICIES
from .policies import MODES

LAB_COMMANDS = {
    "bench": "the paper's evaluation: methods x scenarios x model pairs",
    "energy": "joules per output token of each method, edge and cloud, per scenario",
    "link": "run an emulated link as a TCP proxy in front of a verifier",
    "grid": "PipeSD vs the baselines on a grid of links and devices the bench's cells do not contain",
    "steps": "PipeSD's rounds against S4's bandwidth trace (the controller following the link)",
    "rounds": "where a method's time goes: the gaps between its verdicts, by kind of round",
    "stopping": "what a round's stopping rule can save in target passes, replayed offline",
}


def _generate(args) -> int:
    _check_generate_flags(args)
    try:
        psk = args.psk_file.read_bytes().strip() if args.psk_file else None
    except OSError as exc:
        raise CLIError(f"--psk-file: cannot read {args.psk_file}: {exc.strerror or exc}") from None
    client = EdgeClient(args.verifier, verifier_key=args.verifier_key, psk=psk, pair=args.pair,
                        draft_model=args.draft_model, draft_backend=args.draft_backend, mode=args.mode,
                        draft_k=args.k, r1=args.r1, r2=args.r2, objective=args.objective, threads=args.threads,
                        local_only=args.local_only, offline=args.offline, verbose=args.verbose)
    with client, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
        if args.chat:
            prompt = client.render_chat([{"role": "user", "content": args.prompt}])
        else:
            prompt = args.prompt
        gen = client.stream(prompt, max_new_tokens=args.max_new_tokens, stop=[*(args.stop or ()), *(
            client.chat_template.stop if args.chat else ())], parse_special=args.parse_special or args.chat,
            **sampling)
        for w in caught:
            print(f"pipesd: warning: {w.message} (--seed, --top-k, --top-p need --temperature)", file=sys.stderr)
        printed = False
        try:
            if args.json:
                r = gen.result
                print(json.dumps({"text": r.text, "tokens": r.tokens, "stats": r.stats.to_dict()}))
            else:
                for event in gen:
                    print(event.text, end="", flush=True)
                    printed = True
                print()
                print(gen.stats.summary(), file=sys.stderr)
        except VerifierUnavailable as exc:
            if printed:
                print()         # what was printed is verified; the error goes on a line of its own
            raise CLIError(f"{exc} -- stopped{' early' if printed else ''} with no unverified text (--offline "
                           f"fail, the default); --offline continue prints the draft's unverified text instead, "
                           f"--offline wait waits {client.engine.offline_wait_s:g} s for the verifier first",
                           status=3) from None
    if gen.stats.unverified_tokens:
        print(f"pipesd: warning: the verifier at {args.verifier} was unreachable for part of the generation: "
              f"{gen.stats.unverified_tokens} of {gen.stats.output_tokens} tokens are the draft's alone, unverified "
              f"(--offline fail stops instead)", file=sys.stderr)
    return 0


# The Python API's parameter names, as `pipesd generate` spells them.
_FLAGS = {"verifier_url": "--verifier", "verifier_key": "--verifier-key", "psk": "--psk-file", "draft_k": "-k",
          "max_new_tokens": "--max-new-tokens", "top_k": "--top-k", "top_p": "--top-p", "draft_model": "--draft-model",
          "draft_backend": "--draft-backend", "r1": "--r1", "r2": "--r2", "objective": "--objective",
          "temperature": "--temperature", "seed": "--seed", "offline": "--offline", "threads": "--threads"}


def _as_flags(message: str) -> str:
    """An SDK error message with its parameter names (`draft_k`, `verifier_key=...`) as CLI flags."""
    return re.sub(r"\b(" + "|".join(map(re.escape, _FLAGS)) + r")\b(=\.\.\.)?",
                  lambda m: _FLAGS[m.group(1)], message)


class CLIError(Exception):
    """A mistake on the command line, worded with its flags; exits with `status` after one line."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def _check_generate_flags(args) -> None:
    """What the Python API would say with its parameter names, said with the CLI's flags."""
    cloud = args.mode != "edge_only" and not args.local_only
    if cloud and not args.verifier:
        raise CLIError(f"--mode {args.mode} needs --verifier URL (with --verifier-key or --psk-file); "
                       f"--mode edge_only or --local-only runs on the device alone")
    if cloud and (args.verifier_key is None) == (args.psk_file is None):
        raise CLIError("give exactly one of --verifier-key KEY (printed by pipesd-verifier) or --psk-file FILE")
    if not cloud and (args.verifier_key or args.psk_file) and not args.verifier:
        raise CLIError("--verifier-key / --psk-file without --verifier: give the verifier's URL too")
    if args.draft_model is not None and not Path(args.draft_model).is_file():
        raise CLIError(f"--draft-model: no such file: {args.draft_model}")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


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
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sample from the target's distribution at this temperature (default 0: greedy)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    g.add_argument("--seed", type=int, help="seed for sampling: the same seed gives the same text")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message, rendered with the draft model's chat template")
    g.add_argument("--offline", choices=OFFLINE_POLICIES, default="fail",
                   help="when the verifier is unreachable: fail (default: exit 3, no unverified text), continue "
                        "(print the draft's unverified text), wait (5 s, then continue), verify_late")
    g.add_argument("--verbose", action="store_true", help="let llama.cpp print its own log lines")
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
    except CLIError as exc:
        print(f"pipesd: {exc}", file=sys.stderr)
        return exc.status
    except VerifierUnavailable as exc:
        print(f"pipesd: the verifier is unreachable: {exc}", file=sys.stderr)
        return 3
    except ConfigError as exc:
        print(f"pipesd: {_as_flags(str(exc))}", file=sys.stderr)
        return 2
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
