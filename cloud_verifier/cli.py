"""pipesd-verifier: serve a target model over HTTP (uvicorn).

With --port 0 the verifier binds a free port and prints the URL it listens on,
so a launcher (``LocalVerifier``) can read it from the first line of stdout.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from .settings import VerifierSettings

LISTENING = "pipesd-verifier listening on"


def resolve_target(model: str) -> Path:
    from pipesd_models import PAIRS, pair_paths

    return pair_paths(model)[1] if model in PAIRS else Path(model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pipesd-verifier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded",
                    help="'embedded' (default), 'smollm2', a GGUF file or an HF model directory")
    ap.add_argument("--backend", choices=["torch", "llamacpp"], default="torch")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port and prints it")
    ap.add_argument("--threads", type=int, default=None, help="compute threads of the target")
    ap.add_argument("--max-draft", type=int, default=VerifierSettings.max_draft)
    ap.add_argument("--max-sessions", type=int, default=VerifierSettings.max_sessions)
    ap.add_argument("--max-context", type=int, default=None)
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)

    import uvicorn

    from pipesd_models import PairUnavailable

    from .app import create_app
    from .target import load_target

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        path = resolve_target(args.model)
    except PairUnavailable as exc:
        print(f"pipesd-verifier: {exc}", file=sys.stderr)
        return 2
    if not path.exists():
        print(f"pipesd-verifier: model not found: {path}", file=sys.stderr)
        return 2
    settings = VerifierSettings(max_draft=args.max_draft, max_sessions=args.max_sessions,
                                max_context=args.max_context)
    app = create_app(lambda: load_target(path, args.backend, threads=args.threads), settings)
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto says
    # TCP, and without it Nagle + delayed ACKs add ~40 ms to every response on loopback.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    print(f"{LISTENING} http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
