"""pipesd-verifier: serve a target model over HTTP (uvicorn), sealed sessions only.

    pipesd-verifier --generate-key verifier.key        # write a key pair, print the public key, exit
    pipesd-verifier --key-file verifier.key --port 8000
    pipesd-verifier --psk-file shared.psk              # pre-shared key instead of a key pair

Without --key-file or --psk-file a fresh key pair is made for this run only. The
public key is printed at start; edges pin it (EdgeClient(verifier_key=...)). With
--port 0 the verifier binds a free port and prints the URL it listens on, so a
launcher (``LocalVerifier``) can read both lines from stdout.

The model is loaded before the verifier listens, and stdout says so ("loading model ...",
"model ready in N s"): a model that cannot load ends the process with one line on stderr
and a non-zero exit, never a server that answers ``not_ready`` forever. The libraries'
own output (transformers' progress bars, llama.cpp's log) is off unless --verbose.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .settings import VerifierSettings

if TYPE_CHECKING:
    from .target import Target

LISTENING = "pipesd-verifier listening on"
PUBLIC_KEY = "pipesd-verifier public key:"


def resolve_target(model: str) -> Path:
    from pipesd_models import PAIRS, pair_paths

    return pair_paths(model)[1] if model in PAIRS else Path(model)


def _parser() -> argparse.ArgumentParser:
    d = VerifierSettings()
    ap = argparse.ArgumentParser(prog="pipesd-verifier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded",
                    help="'embedded' (default), 'smollm2', a GGUF file or an HF model directory")
    ap.add_argument("--backend", choices=["torch", "llamacpp"], default="torch")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port and prints it")
    ap.add_argument("--threads", type=int, default=None, help="compute threads of the target")
    ap.add_argument("--key-file", type=Path, help="the verifier's X25519 private key (base64)")
    ap.add_argument("--psk-file", type=Path, help="a pre-shared key file (>= 32 bytes)")
    ap.add_argument("--generate-key", type=Path, metavar="PATH", help="write a new key pair to PATH and exit")
    ap.add_argument("--max-draft", type=int, default=d.max_draft)
    ap.add_argument("--max-sessions", type=int, default=d.max_sessions)
    ap.add_argument("--max-cached-tokens", type=int, default=d.max_cached_tokens)
    ap.add_argument("--max-in-flight", type=int, default=d.max_in_flight)
    ap.add_argument("--max-context", type=int, default=None)
    ap.add_argument("--max-frame-bytes", type=int, default=d.max_frame_bytes)
    ap.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    ap.add_argument("--session-ttl", type=float, default=d.session_ttl_s)
    ap.add_argument("--rekey-interval", type=int, default=d.rekey_interval)
    ap.add_argument("--no-eager-forward", action="store_true",
                    help="run the target only at NAV, not on draft batches as they arrive")
    ap.add_argument("--max-batch", type=int, default=d.max_batch,
                    help="sessions whose target passes run as one batch (1: one by one)")
    ap.add_argument("--batch-wait", type=float, default=d.batch_wait_s,
                    help="seconds a pass waits for other sessions to join it (only while others are in flight)")
    ap.add_argument("--kv-slots", type=int, default=d.kv_slots,
                    help="sessions whose KV cache the torch target keeps at once (at least --max-batch)")
    ap.add_argument("--reorder-wait", type=float, default=d.reorder_wait_s,
                    help="seconds a frame waits for a session's earlier frames before a gap is skipped")
    ap.add_argument("--emulate-pass-ms", metavar="FIXED,PER_TOKEN", default=None,
                    help="emulation for benchmarks: pad every target pass to FIXED + PER_TOKEN x rows ms "
                         "(e.g. 20,0.2: a 7B model on a datacenter GPU)")
    ap.add_argument("--log-level", default="warning")
    ap.add_argument("--verbose", action="store_true",
                    help="let the libraries print their own output (transformers' progress bars, llama.cpp's log)")
    return ap


def settings_from_args(args: argparse.Namespace) -> VerifierSettings:
    return VerifierSettings(max_draft=args.max_draft, max_sessions=args.max_sessions,
                            max_cached_tokens=args.max_cached_tokens, max_in_flight=args.max_in_flight,
                            max_context=args.max_context, session_ttl_s=args.session_ttl,
                            max_frame_bytes=args.max_frame_bytes, max_body_bytes=args.max_body_bytes,
                            reorder_wait_s=args.reorder_wait, eager_forward=not args.no_eager_forward,
                            rekey_interval=args.rekey_interval, max_batch=args.max_batch,
                            batch_wait_s=args.batch_wait, kv_slots=args.kv_slots)


def parse_pass_ms(text: str | None) -> tuple[float, float] | None:
    """"FIXED,PER_TOKEN" milliseconds (PER_TOKEN optional) as seconds; ValueError if malformed."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 2 or any(not (v >= 0 and v < 1e6) for v in values):
        raise ValueError(f"--emulate-pass-ms takes FIXED[,PER_TOKEN] non-negative milliseconds, not {text!r}")
    return values[0] / 1e3, (values[1] if len(values) == 2 else 0.0) / 1e3


def target_loader(path: Path, backend: str, threads: int | None, settings: VerifierSettings,
                  emulate_pass: tuple[float, float] | None = None, verbose: bool = False):
    """A function that loads the target: ``main`` calls it before listening, a Ray replica in its constructor."""
    from .target import PaddedTarget, load_target

    extra = {"kv_slots": settings.kv_slots} if backend == "torch" else {"verbose": verbose}

    def load():
        target = load_target(path, backend, threads=threads, max_context=settings.max_context, **extra)
        return PaddedTarget(target, *emulate_pass) if emulate_pass else target
    return load


def load_model(path: Path, backend: str, loader: Callable[[], "Target"], verbose: bool = False) -> "Target":
    """Load the target before serving, saying so on stdout (next to the ``listening`` line launchers read).

    Loading first means a model that cannot load ends the process with its one-line reason instead of
    a server that answers ``not_ready`` forever, and a load of several seconds is not silence. Without
    `verbose` the libraries' own output is off; transformers' GGUF converter writes its progress bar
    to stderr with tqdm directly, past its logging switches, so the load's stderr is set aside too
    (an unexpected exception still reaches stderr: it leaves the block first). Raises ModelLoadError.
    """
    from .target import quiet_libraries

    print(f"pipesd-verifier: loading model {path} ({backend})...", flush=True)
    t0 = time.perf_counter()
    if verbose:
        target = loader()
    else:
        quiet_libraries(backend)
        with contextlib.redirect_stderr(io.StringIO()):
            target = loader()
    print(f"pipesd-verifier: model ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return target


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn (OSError if the address is taken or not ours)."""
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto says
    # TCP, and without it Nagle + delayed ACKs add ~40 ms to every response on loopback.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:         # Ctrl-C while loading or serving (uvicorn has shut down): no traceback
        return 130


def _main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from privacy import StaticKey, parse_psk

    if args.generate_key:
        key = StaticKey.generate()
        key.save(args.generate_key)
        print(f"{PUBLIC_KEY} {key.public_b64}")
        return 0

    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:          # an edge-only install: the verifier's libraries are an extra
        print(f"pipesd-verifier: the verifier needs its extra: pip install 'pipesd[verifier]' ({exc})",
              file=sys.stderr)
        return 2
    from pipesd_models import PairUnavailable

    from .target import ModelLoadError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        path = resolve_target(args.model)
        static_key = StaticKey.load(args.key_file) if args.key_file else None
        psk = parse_psk(args.psk_file.read_bytes()) if args.psk_file else None
    except (PairUnavailable, OSError, ValueError) as exc:
        print(f"pipesd-verifier: {exc}", file=sys.stderr)
        return 2
    if static_key is None and psk is None:
        static_key = StaticKey.generate()
    if not path.exists():             # before binding or loading anything: a typo fails at once
        print(f"pipesd-verifier: {ModelLoadError(path, 'no such file or directory', args.backend)}",
              file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
        emulate_pass = parse_pass_ms(args.emulate_pass_ms)
    except ValueError as exc:
        print(f"pipesd-verifier: {exc}", file=sys.stderr)
        return 2
    try:
        sock = listen_socket(args.host, args.port)   # bound before the (slow) load: a taken port fails fast
    except OSError as exc:
        print(f"pipesd-verifier: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    loader = target_loader(path, args.backend, args.threads, settings, emulate_pass, verbose=args.verbose)
    try:
        target = load_model(path, args.backend, loader, verbose=args.verbose)
    except ModelLoadError as exc:
        sock.close()
        print(f"pipesd-verifier: {exc}", file=sys.stderr)
        return 2
    app = create_app(lambda: target, settings, static_key=static_key, psk=psk)
    state = app.state.verifier
    state.load()                      # the service around the loaded target: ready before the first request
    if state.service is None:
        sock.close()
        print(f"pipesd-verifier: {state.load_error}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    if static_key is not None:
        print(f"{PUBLIC_KEY} {static_key.public_b64}", flush=True)
    print(f"{LISTENING} http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
