"""pipesd-verifier: serve a target model over HTTP (uvicorn), sealed sessions only.

    pipesd-verifier --generate-key verifier.key        # write a key pair, print the public key, exit
    pipesd-verifier --key-file verifier.key --port 8000
    pipesd-verifier --generate-psk shared.psk          # write a new pre-shared key (32 random bytes), exit
    pipesd-verifier --psk-file shared.psk              # pre-shared key instead of a key pair

Key files are created with mode 0600 and never overwritten (--force replaces one); a key file that
group or others can read or write is used, with a warning on stderr. A PSK must be 32 random bytes
or more (base64 in its file, as --generate-psk writes it): a passphrase is refused.

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
    ap.add_argument("--psk-file", type=Path,
                    help="a pre-shared key file: base64 of >= 32 random bytes (--generate-psk); passphrases refused")
    ap.add_argument("--generate-key", type=Path, metavar="PATH", help="write a new key pair to PATH and exit")
    ap.add_argument("--generate-psk", type=Path, metavar="PATH",
                    help="write a new pre-shared key (32 random bytes, base64) to PATH and exit")
    ap.add_argument("--force", action="store_true", help="let --generate-key / --generate-psk replace an existing file")
    ap.add_argument("--max-draft", type=int, default=d.max_draft)
    ap.add_argument("--max-tree-nodes", type=int, default=d.max_tree_nodes,
                    help="nodes of a token tree a round may send (0: chains only); the llama.cpp backend verifies chains only")
    ap.add_argument("--max-sessions", type=int, default=d.max_sessions)
    ap.add_argument("--max-cached-tokens", type=int, default=d.max_cached_tokens)
    ap.add_argument("--max-memory-mb", type=float, default=d.max_memory_bytes / 2**20,
                    help="memory budget for everything sessions hold (KV of cached tokens, staged logits rows, "
                         "early frames, llama.cpp contexts); over it the least recently used give way")
    ap.add_argument("--round-timeout", type=float, default=d.round_timeout_s,
                    help="seconds an unfinished round may sit idle before its staged logits rows are dropped")
    ap.add_argument("--llama-contexts", type=int, default=d.llama_contexts,
                    help="llama.cpp contexts kept at once (--backend llamacpp); beyond, sessions take turns")
    ap.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                    help="seconds to receive a request body (or each frame of a round's stream); then 408")
    ap.add_argument("--max-open-requests", type=int, default=d.max_open_requests,
                    help="POST requests open at once; beyond: 429 overloaded")
    ap.add_argument("--max-connections", type=int, default=d.max_connections,
                    help="open connections (uvicorn's limit_concurrency); above --max-open-requests")
    ap.add_argument("--max-in-flight", type=int, default=d.max_in_flight)
    ap.add_argument("--max-handshakes-in-flight", type=int, default=d.max_handshakes_in_flight,
                    help="handshakes queued or running at once, apart from --max-in-flight; beyond: 429 overloaded")
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
    ap.add_argument("--handshake-rate", type=float, default=d.handshake_rate,
                    help="handshakes per second per client IP (0: no limit); beyond the burst: 429 + Retry-After")
    ap.add_argument("--handshake-burst", type=int, default=d.handshake_burst)
    ap.add_argument("--client-handshake-rate", type=float, default=d.client_handshake_rate,
                    help="handshakes per second per edge client (its x-pipesd-affinity token; 0: no limit)")
    ap.add_argument("--client-handshake-burst", type=int, default=d.client_handshake_burst)
    ap.add_argument("--max-pending-handshakes", type=int, default=d.max_pending_handshakes,
                    help="handshakes held until their client's first sealed frame (never evicting a session)")
    ap.add_argument("--emulate-pass-ms", metavar="FIXED,PER_TOKEN", default=None,
                    help="emulation for benchmarks: pad every target pass to FIXED + PER_TOKEN x rows ms "
                         "(e.g. 20,0.2: a 7B model on a datacenter GPU)")
    ap.add_argument("--log-level", default="warning")
    ap.add_argument("--verbose", action="store_true",
                    help="let the libraries print their own output (transformers' progress bars, llama.cpp's log)")
    return ap


def settings_from_args(args: argparse.Namespace) -> VerifierSettings:
    return VerifierSettings(max_draft=args.max_draft, max_tree_nodes=args.max_tree_nodes, max_sessions=args.max_sessions,
                            max_cached_tokens=args.max_cached_tokens, max_in_flight=args.max_in_flight,
                            max_context=args.max_context, session_ttl_s=args.session_ttl,
                            max_frame_bytes=args.max_frame_bytes, max_body_bytes=args.max_body_bytes,
                            reorder_wait_s=args.reorder_wait, eager_forward=not args.no_eager_forward,
                            rekey_interval=args.rekey_interval, max_batch=args.max_batch,
                            batch_wait_s=args.batch_wait, kv_slots=args.kv_slots,
                            max_memory_bytes=int(args.max_memory_mb * 2**20), round_timeout_s=args.round_timeout,
                            llama_contexts=args.llama_contexts, body_timeout_s=args.body_timeout,
                            max_open_requests=args.max_open_requests, max_connections=args.max_connections,
                            handshake_rate=args.handshake_rate, handshake_burst=args.handshake_burst,
                            client_handshake_rate=args.client_handshake_rate,
                            client_handshake_burst=args.client_handshake_burst,
                            max_pending_handshakes=args.max_pending_handshakes,
                            max_handshakes_in_flight=args.max_handshakes_in_flight)


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

    extra = ({"kv_slots": settings.kv_slots} if backend == "torch"
             else {"verbose": verbose, "contexts": settings.llama_contexts})

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


def parse_psk_file(path: Path) -> bytes:
    """The PSK in `path` (``privacy.parse_psk``); OSError or ValueError naming the file."""
    from privacy import parse_psk

    try:
        return parse_psk(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"--psk-file {path}: {exc}") from None


def warn_exposed_keys(*paths: Path | None) -> None:
    """A warning line on stderr for each key file that group or others may read (the key is still used)."""
    from privacy import key_file_exposure

    for path in paths:
        warning = key_file_exposure(path) if path is not None else None
        if warning:
            print(f"pipesd-verifier: warning: {warning}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:         # Ctrl-C while loading or serving (uvicorn has shut down): no traceback
        return 130


def _main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from privacy import StaticKey, generate_psk, write_key_file

    if args.generate_key or args.generate_psk:
        path = args.generate_key or args.generate_psk
        try:
            if args.generate_key and args.generate_psk:
                raise ValueError("give one of --generate-key and --generate-psk")
            if args.generate_key:
                key = StaticKey.generate()
                key.save(path, force=args.force)
            else:
                write_key_file(path, generate_psk(), force=args.force)
        except FileExistsError:
            print(f"pipesd-verifier: {path} exists: not overwriting a key file (--force replaces it)", file=sys.stderr)
            return 2
        except (OSError, ValueError) as exc:
            print(f"pipesd-verifier: cannot write {path}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
            return 2
        if args.generate_key:
            print(f"{PUBLIC_KEY} {key.public_b64}")
        else:
            print(f"pipesd-verifier: wrote a pre-shared key to {path} (mode 0600); give the same file to the "
                  f"verifier and the edge (--psk-file), over a channel you trust")
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
        psk = parse_psk_file(args.psk_file) if args.psk_file else None
    except (PairUnavailable, OSError, ValueError) as exc:
        print(f"pipesd-verifier: {exc}", file=sys.stderr)
        return 2
    warn_exposed_keys(args.key_file, args.psk_file)
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
    limit = connection_limit(settings.max_connections)
    if limit < settings.max_connections:      # few file descriptors: open requests keep below the limit
        state.max_open_requests = min(state.max_open_requests, max(1, limit * 3 // 4))
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on",
                            limit_concurrency=limit)
    server = uvicorn.Server(config)
    # The model worker runs Python-heavy target passes while the event loop writes the verdict of the pass
    # before: at Python's default 5 ms switch interval a verdict could wait most of the next pass for
    # the GIL. This process is the verifier's own, so it sets the interpreter's knob (A/B on native S1,
    # one edge, two verifiers alternated: PipeSD 11.37 -> 11.19 ms/token, cloud_only 36.2 -> 35.9).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    state.connections = lambda: server.server_state.connections   # idle ones are closed (app.py)
    state.keep_alive_s = config.timeout_keep_alive
    server.run(sockets=[sock])
    return 0


GIL_SWITCH_INTERVAL_S = 0.0005        # see _main: the event loop gets the GIL back within 0.5 ms of asking
FD_RESERVE = 128                      # file descriptors beyond connections: the model, its threads, logs


def connection_limit(wanted: int) -> int:
    """uvicorn's ``limit_concurrency``: `wanted`, raising the soft limit on open files to fit it if the
    hard limit allows; else what the hard limit leaves (with a warning). Past the limit uvicorn answers
    503 to every request; running out of file descriptors instead would fail accept() and health checks."""
    try:
        import resource
    except ImportError:               # not POSIX
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (OSError, ValueError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        limit = max(16, soft - FD_RESERVE)
        print(f"pipesd-verifier: only {soft} open files allowed (ulimit -n): serving at most {limit} "
              f"connections instead of {wanted}", file=sys.stderr)
        return limit
    return wanted


if __name__ == "__main__":
    sys.exit(main())
