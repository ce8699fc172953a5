"""The verifier on Ray Serve: N replicas behind Ray's HTTP proxy, for when one process is not enough.

    pip install 'pipesd[ray]'
    pipesd-verifier-ray --replicas 2 --key-file verifier.key --port 8000            # a local Ray
    pipesd-verifier-ray --address auto --autoscale 1,8 --key-file verifier.key     # an existing cluster

Each replica is the same FastAPI app as ``pipesd-verifier`` (sealed sessions, batched NAV,
every bound), built on the replica (``__serve_build_asgi_app__``) with its target loaded
before the replica reports ready. Replicas share the key pair, so an edge pins one public
key for the whole fleet.

Sessions live in one replica's memory. Ray's consistent-hash router (experimental in Ray
2.60) sends every request carrying the same ``x-pipesd-affinity`` header (a random token
each edge client sends, ``privacy.AFFINITY_HEADER``) to the same replica; the router reads
the header named by ``RAY_SERVE_SESSION_ID_HEADER_KEY``, which this command sets for a
local Ray (set it yourself when you ``ray start`` a cluster). Correctness never depends on
it: a replica that does not hold the session answers "unknown session", and the edge
handshakes again and resends its prefix (resync). When a replica dies, its in-flight
requests fail, the edge does exactly that, and the ring sends it to a live replica.

When Ray is worth it: Ray adds a few milliseconds per request (proxy hop, router, actor
call) -- more than a whole verification of the embedded ~12M target takes. It pays for
large targets (one GPU per replica) and many machines, not for the embedded demo, which
plain ``pipesd-verifier`` serves better.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from .cli import (LISTENING, PUBLIC_KEY, _parser as verifier_parser, resolve_target, settings_from_args, target_loader,
                  warn_exposed_keys)
from .settings import VerifierSettings

APP_NAME = "pipesd"
ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"


class VerifierReplica:
    """One Serve replica: loads the target in its constructor, then serves the verifier app."""

    def __init__(self, model: str, backend: str, threads: int | None, settings: VerifierSettings,
                 key_file: str | None, psk_file: str | None, verbose: bool = False):
        from privacy import StaticKey, parse_psk

        from .app import create_app
        from .target import quiet_libraries

        if not verbose:                  # as pipesd-verifier: the libraries' own output off, unless --verbose
            quiet_libraries(backend)

        if threads:
            import torch

            torch.set_num_threads(threads)
        # Secrets travel as file paths, never as deployment arguments: Serve checkpoints those in the
        # cluster's shared store. Each node that runs a replica needs the file (same path).
        static_key = StaticKey.load(key_file) if key_file else None
        psk = parse_psk(Path(psk_file).read_bytes()) if psk_file else None
        self._verifier_app = create_app(target_loader(resolve_target(model), backend, threads, settings), settings,
                              static_key=static_key, psk=psk)
        state = self._verifier_app.state.verifier
        state.load()                     # before Serve routes anything here: no "still loading" replies
        if state.service is None:
            raise RuntimeError(f"the target did not load: {state.load_error}")

    def __serve_build_asgi_app__(self):
        return self._verifier_app

    def check_health(self) -> None:
        """Serve's health probe: a replica whose model worker died is replaced."""
        if not self._verifier_app.state.verifier.worker.alive:
            raise RuntimeError("the model worker has stopped")


def build(model: str = "embedded", backend: str = "torch", threads: int | None = 1,
          settings: VerifierSettings | None = None, *, key_file: str | None = None, psk_file: str | None = None,
          replicas: int = 1, autoscale: tuple[int, int] | None = None, cpus_per_replica: float = 0.5,
          max_ongoing_requests: int | None = None, max_queued_requests: int = 256, affinity: bool = True,
          verbose: bool = False):
    """The Serve application (``serve.run`` it). ``autoscale=(min, max)`` scales on ongoing requests."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    settings = settings or VerifierSettings()
    ongoing = max_ongoing_requests or 2 * (settings.max_in_flight + settings.max_handshakes_in_flight)
    scaling = ({"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                       "target_ongoing_requests": max(1, settings.max_in_flight // 2)}}
               if autoscale else {"num_replicas": replicas})
    # The router's fallback (the next replicas on the ring) is for a primary that is gone or refuses;
    # Serve's own "busy" refusal is kept out of the way by allowing twice the app's in-flight bounds
    # (frames and handshakes), so that overload is answered by the replica (429 overloaded + Retry-After),
    # not by a hop to a replica that does not hold the session.
    router = {"request_router_config": RequestRouterConfig(request_router_class=ROUTER)} if affinity else {}
    deployment = serve.deployment(serve.ingress()(VerifierReplica), name="verifier",
                                  ray_actor_options={"num_cpus": cpus_per_replica},
                                  max_ongoing_requests=ongoing, max_queued_requests=max_queued_requests,
                                  health_check_period_s=2, graceful_shutdown_timeout_s=5,
                                  graceful_shutdown_wait_loop_s=1, **scaling, **router)
    return deployment.bind(model, backend, threads, settings, key_file, psk_file, verbose)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _parser() -> argparse.ArgumentParser:
    ap = verifier_parser()
    ap.prog = "pipesd-verifier-ray"
    ap.description = __doc__
    ray = ap.add_argument_group("Ray Serve")
    ray.add_argument("--address", default=None,
                     help="an existing Ray cluster ('auto' or host:port); default: start a private local one")
    ray.add_argument("--replicas", type=int, default=2, help="fixed number of replicas (default 2)")
    ray.add_argument("--autoscale", default=None, metavar="MIN,MAX",
                     help="scale between MIN and MAX replicas on ongoing requests instead")
    ray.add_argument("--cpus-per-replica", type=float, default=0.5,
                     help="Ray CPUs each replica reserves (fractional: two replicas fit on two cores)")
    ray.add_argument("--max-queued", type=int, default=256, help="requests queued at the router; beyond: 503")
    ray.add_argument("--deploy-timeout", type=float, default=300.0,
                     help="seconds to wait for every replica to load its model")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if importlib.util.find_spec("ray") is None:
        print("pipesd-verifier-ray: Ray is not installed: pip install 'pipesd[ray]'", file=sys.stderr)
        return 2
    from privacy import AFFINITY_HEADER, StaticKey, parse_psk

    try:
        settings = settings_from_args(args)
        autoscale = tuple(int(x) for x in args.autoscale.split(",")) if args.autoscale else None
        if autoscale is not None and (len(autoscale) != 2 or not 1 <= autoscale[0] <= autoscale[1]):
            raise ValueError("--autoscale takes MIN,MAX with 1 <= MIN <= MAX")
        if args.replicas < 1 or args.cpus_per_replica <= 0:
            raise ValueError("--replicas must be at least 1 and --cpus-per-replica positive")
        key_file = args.key_file.resolve() if args.key_file else None
        static_key = StaticKey.load(key_file) if key_file else None
        psk_file = args.psk_file.resolve() if args.psk_file else None
        if psk_file is not None:
            parse_psk(psk_file.read_bytes())          # refuse a short key here, not in every replica
        if not resolve_target(args.model).exists():
            raise ValueError(f"model not found: {resolve_target(args.model)}")
    except (OSError, ValueError, LookupError) as exc:     # LookupError: a model pair that is not installed
        print(f"pipesd-verifier-ray: {exc}", file=sys.stderr)
        return 2
    warn_exposed_keys(key_file, psk_file)
    port = args.port or _free_port(args.host)

    # A private directory for a run-only key pair and for a local cluster's files; removed at exit.
    needs_key = static_key is None and psk_file is None
    tmp = tempfile.mkdtemp(prefix="pipesd-ray-") if needs_key or args.address is None else None
    if needs_key:
        static_key = StaticKey.generate()
        key_file = Path(tmp) / "verifier.key"
        static_key.save(key_file)
    if args.address is None:
        # A private local cluster: no usage reporting, no dashboard, our own temp dir and a small
        # object store; token auth on, with a token that lives in this process tree only (not ~/.ray).
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if os.environ["RAY_AUTH_MODE"] == "token":
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        os.environ.setdefault("RAY_SERVE_SESSION_ID_HEADER_KEY", AFFINITY_HEADER)
    import ray                           # after the environment above: Ray reads it at import
    from ray import serve

    if args.address is None:
        ray.init(include_dashboard=False, _temp_dir=tmp, object_store_memory=80 * 1024 * 1024,
                 log_to_driver=args.log_level == "debug", configure_logging=False)
    else:
        ray.init(address=args.address, log_to_driver=False)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": port})
        app = build(args.model, args.backend, args.threads, settings,
                    key_file=str(key_file) if key_file else None, psk_file=str(psk_file) if psk_file else None,
                    replicas=args.replicas, autoscale=autoscale, cpus_per_replica=args.cpus_per_replica,
                    max_queued_requests=args.max_queued, verbose=args.verbose)
        failure: list[BaseException] = []

        def deploy_app():
            try:
                serve.run(app, name=APP_NAME, route_prefix="/")
            except BaseException as exc:   # reported below, with the replica's own error inside
                failure.append(exc)

        deploy = threading.Thread(target=deploy_app, daemon=True)
        deploy.start()
        deploy.join(args.deploy_timeout)   # serve.run has no deadline of its own (it waits for CPUs forever)
        if deploy.is_alive():
            print(f"pipesd-verifier-ray: the replicas were not ready within {args.deploy_timeout:.0f} s "
                  "(too few CPUs for --replicas x --cpus-per-replica?)", file=sys.stderr)
            return 1
        if failure:
            print(f"pipesd-verifier-ray: deploying the verifier failed: {failure[0]}", file=sys.stderr)
            return 1
        if static_key is not None:
            print(f"{PUBLIC_KEY} {static_key.public_b64}", flush=True)
        print(f"{LISTENING} http://{args.host}:{port}", flush=True)
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
