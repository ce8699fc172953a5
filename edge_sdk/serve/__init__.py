"""``pipesd serve``: an OpenAI-compatible endpoint on the device (docs/serve.md).

    pipesd serve --verifier http://cloud:8000 --verifier-key <base64>      # loopback :8080
    pipesd serve --mode edge_only                                          # no cloud at all

Needs the ``serve`` extra (``pip install 'pipesd[serve]'``: FastAPI, uvicorn, prometheus-client, Jinja2).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from pathlib import Path

LISTENING = "pipesd serve listening on"
# verify_late revises text already sent, which an OpenAI stream cannot express: refused here.
SERVE_OFFLINE = ("continue", "wait")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    from ..controller import OBJECTIVES
    from ..policies import MODES

    ap.add_argument("--verifier", help="verifier base URL (not needed for --mode edge_only)")
    ap.add_argument("--verifier-key", help="the verifier's public key (base64, printed by pipesd-verifier)")
    ap.add_argument("--psk-file", type=Path, help="pre-shared key file instead of --verifier-key")
    ap.add_argument("--model", default="embedded",
                    help="the draft: a model pair ('embedded', default, or 'smollm2') or a draft GGUF file")
    ap.add_argument("--served-model-name", help="the model id clients name (default: --model, a file's stem)")
    ap.add_argument("--mode", choices=MODES, default="pipesd", help="decoding policy (default pipesd)")
    ap.add_argument("-k", type=int, help="draft length (vanilla; default 4)")
    ap.add_argument("--objective", choices=OBJECTIVES, default=None,
                    help="what PipeSD's round controller minimises per token (default latency)")
    ap.add_argument("--offline", choices=SERVE_OFFLINE, default="continue",
                    help="when the verifier is unreachable: continue on the draft (tokens marked unverified) "
                         "or wait --offline-wait seconds first; verify_late cannot be served (see docs/serve.md)")
    ap.add_argument("--offline-wait", type=float, default=5.0)
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    ap.add_argument("--port", type=int, default=8080, help="0 picks a free port and prints it")
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (required off loopback)")
    ap.add_argument("--api-key-file", type=Path, help="read the API key from a file")
    ap.add_argument("--max-queue", type=int, default=16,
                    help="requests that may wait for the drafter; past it 429 with Retry-After (default 16)")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20)
    ap.add_argument("--threads", type=int, default=None, help="draft compute threads")
    ap.add_argument("--n-ctx", type=int, default=None, help="draft context (default: the model's trained one)")
    ap.add_argument("--log-level", default="warning")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    """Load the draft, open the verifier session lazily, and serve until interrupted."""
    try:
        import uvicorn

        from .app import ServeConfig, create_app
    except ImportError as exc:
        print(f"pipesd serve: needs its extra: pip install 'pipesd[serve]' ({exc})", file=sys.stderr)
        return 2
    from pipesd_models import PAIRS

    from ..client import EdgeClient
    from ..errors import PipeSDError
    from ..policies import make_policy

    def fail(message: str) -> int:
        print(f"pipesd serve: {message}", file=sys.stderr)
        return 2

    api_key = args.api_key
    if args.api_key_file:
        api_key = args.api_key_file.read_text().strip()
    if api_key is not None and len(api_key) < 16:
        return fail("an API key needs at least 16 characters")
    if not _is_loopback(args.host) and api_key is None:
        return fail(f"binding {args.host} (not loopback) needs --api-key: anyone who reaches the port could use "
                    "the drafter and your verifier session")
    if args.max_queue < 0 or args.max_body_bytes < 1024:
        return fail("--max-queue must be >= 0 and --max-body-bytes >= 1024")
    pair, draft = (args.model, None) if args.model in PAIRS else ("embedded", args.model)
    model_id = args.served_model_name or (args.model if draft is None else Path(draft).stem)
    backend = "onnx" if draft is not None and draft.endswith(".onnx") else "llamacpp"
    try:
        if make_policy(args.mode, draft_k=args.k, objective=args.objective).uses_cloud and not args.verifier:
            return fail(f"mode {args.mode} needs --verifier URL (or serve --mode edge_only)")
        psk = args.psk_file.read_bytes().strip() if args.psk_file else None
        client = EdgeClient(args.verifier, verifier_key=args.verifier_key, psk=psk, pair=pair, draft_model=draft,
                            draft_backend=backend, mode=args.mode, draft_k=args.k, objective=args.objective,
                            threads=args.threads, n_ctx=args.n_ctx, offline=args.offline,
                            offline_wait_s=args.offline_wait, local_only=not args.verifier)
    except (PipeSDError, OSError) as exc:
        return fail(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(client, ServeConfig(model_id=model_id, mode=args.mode, api_key=api_key,
                                         max_queue=args.max_queue, max_body_bytes=args.max_body_bytes))
    # As the verifier does: bind first (port 0 -> a free one), print the URL a launcher waits for.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        return fail(f"cannot bind {args.host}:{args.port}: {exc.strerror}")
    host, port = sock.getsockname()[:2]
    print(f"{LISTENING} http://{host}:{port}", flush=True)
    print(f"pipesd serve: model {model_id!r}, mode {args.mode}, verifier {args.verifier or 'none'}", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
