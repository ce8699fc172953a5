"""The verifier under honest load and attack at once (issue 20's load benchmark): honest edges keep
generating, token-identical to the target, while other sources flood it with handshakes.

    .venv/bin/python benchmarks/verifier_load.py [--sessions 64] [--seconds 60] [--mode pipesd]
        [--flood-rate 400] [--flood-addresses 4] [--flood-conns 4] [--unfinished 8] [--slow-bodies 16]
        [--nav-deadline S] [--verifier-args "..."] [--out docs/verifier_load]

What runs, all on loopback, every loop bounded by ``--seconds`` (and every wait by a timeout):

- a real ``pipesd-verifier`` process (``LocalVerifier``: uvicorn, sealed sessions, the embedded target,
  its shipped limits unless ``--verifier-args`` says otherwise), pinned to the last core with one thread.
  Backend: transformers (``torch``, the default here) rather than llama.cpp: it runs the passes of
  concurrent sessions as one batch and keeps 64 sessions' KV in one pool, where the llama.cpp target
  runs sessions one by one through a pool of 8 contexts (64 sessions would take turns on them and
  recompute prefixes) -- on 2 cores the cheaper of the two for many sessions (``--backend`` switches);
- ``--sessions`` honest sessions: real ``EdgeClient``s (llama.cpp draft, ``--mode``, ``offline="fail"``
  so that any failure reaches the benchmark instead of being papered over by draft-only tokens), one
  thread each, spread over ``--processes`` worker processes pinned to the other core(s). Every session
  opens before the measured window (one short warm-up generation) and keeps its session through it: the
  sessions the old verifier lost to a flood are exactly these. In the window each session generates
  ``--tokens`` tokens per request, prompt after prompt, until ``--seconds`` are up; every output is
  compared with the target's own greedy output for that prompt (``cloud_only``, computed once per prompt
  before anything else starts). NAV latency: from a round's final batch handed to the transport to its
  verdict, as the edge sees it (queueing, the pass and the reply included; 429 waits are not in it, they
  are counted apart as the SDK's ``overload_waits``);
- a handshake flood from other loopback addresses (127.0.0.2 ...), ``--flood-rate`` hellos per second
  offered over ``--flood-addresses`` sources x ``--flood-conns`` keep-alive connections (paced, never
  catching up in bursts; one connection per source could offer no more than one answer time allows), each
  hello with a fresh affinity token so that only the per-IP bucket holds the flood back; a fraction
  ``--flood-malformed`` are malformed (a low-order point, an integer key): they must get 400, never 500.
  The default offers 100/s per source, twice the shipped per-IP rate (50/s): part is admitted (and
  churns the pending-handshake table, which must never touch a session), part is refused with 429,
  each of which must carry ``Retry-After``;
- ``--unfinished`` sealed sessions from 127.0.0.200 that each keep a ``max_draft``-token round staged and
  never finish it (a new one every ``--unfinished-every`` s): logits rows outside the old memory bound;
- ``--slow-bodies`` connections from 127.0.0.201 that announce a 4 kB frame and trickle one byte a
  second: each must end within the body deadline (408) or be refused at once (429 + Retry-After).

The flood and the attackers run on the edges' core(s), so what their own client side costs is taken from
the honest edges, never from the verifier's core. "64 sessions" is the issue's figure: 64 sessions held by
the verifier and all generating at once (on 2 cores each gets a share of one core for drafting).

Measured (results.json has the time series): honest generations, tokens, errors and mismatches;
NAV p50 / p99; the flood's answers by status, and whether every 429 carried Retry-After; sessions
established during the window (only the attackers' proven sessions, no honest re-handshake), evictions
by reason, the pending-handshake table against its bound, the sessions left once every client has closed
(none: no orphans), the verifier's RSS (start, max, end) and its memory gauge against the budget, any
5xx or traceback. ``checks`` lists what must hold; the exit status is 1 if one fails.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import re
import selectors
import shlex
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipesd_lab.bench import PROMPTS, git_commit  # noqa: E402
from benchmarks.timed_verifier import TimedVerifier  # noqa: E402

FLOOD_FIRST = 2                   # flood sources: 127.0.0.2, 127.0.0.3, ...
UNFINISHED_ADDRESS = "127.0.0.200"
SLOW_ADDRESS = "127.0.0.201"
MSGPACK, FRAME = "application/msgpack", "application/x-pipesd-frame"


# -- honest edges (worker processes) ------------------------------------------------------------------
def honest_process(index: int, url: str, key: str, first: int, n_sessions: int, args: dict, reference: dict,
                   cpus: set[int] | None, barrier, out) -> None:
    """`n_sessions` EdgeClients, one thread each: warm up (opens every session), wait at the barrier,
    generate until the window closes, close every client (CLOSE frames), report."""
    from edge_sdk import EdgeClient, LlamaCppDrafter
    from edge_sdk.transport import HttpVerifier
    import pipesd_models

    if cpus:
        os.sched_setaffinity(0, cpus)
    prompts, max_new = args["prompts"], args["tokens"]
    report = {"index": index, "warmup_errors": [], "errors": [], "mismatches": [], "generations": 0,
              "warmup_generations": 0, "tokens": 0, "nav_rounds": 0, "draft_n": 0, "draft_n_accepted": 0,
              "unverified_tokens": 0, "breaker_trips": 0, "overload_waits": 0, "overload_wait_s": 0.0,
              "resyncs": 0, "latencies": [], "done_at": [], "close_errors": []}
    lock = threading.Lock()

    def check(n: int, result, p: int, warm: bool) -> None:
        want = reference[p][:n]
        s = result.stats
        with lock:
            if result.tokens != want:
                diverge = next((i for i, (a, b) in enumerate(zip(result.tokens, want)) if a != b),
                               min(len(result.tokens), len(want)))
                report["mismatches"].append({"prompt": p, "warmup": warm, "at": diverge,
                                             "got": len(result.tokens), "want": len(want)})
            report["unverified_tokens"] += s.unverified_tokens
            report["breaker_trips"] += s.breaker_trips
            if not warm:                  # (a session's first request "resyncs" once: it opens the session)
                report["overload_waits"] += s.overload_waits
                report["overload_wait_s"] += s.overload_wait_s
                report["resyncs"] += s.resyncs
                report["generations"] += 1
                report["tokens"] += s.output_tokens
                report["nav_rounds"] += s.nav_rounds
                report["draft_n"] += s.draft_n
                report["draft_n_accepted"] += s.draft_n_accepted
                report["done_at"].append(time.monotonic())
            else:
                report["warmup_generations"] += 1

    def failed(where: str, exc: BaseException) -> None:
        with lock:
            report[where].append(f"{type(exc).__name__}: {exc}"[:300])

    drafters = [LlamaCppDrafter(pipesd_models.draft_path(), threads=1) for _ in range(n_sessions)]
    clients = []
    for d in drafters:
        timed = TimedVerifier(HttpVerifier(url, verifier_key=key), count_failures=False)
        clients.append((EdgeClient(verifier=timed, drafter=d, mode=args["mode"], offline="fail",
                                   nav_deadline_s=args["nav_deadline"]), timed))

    def warm(i: int) -> None:
        client, timed = clients[i]
        p = (first + i) % len(prompts)
        try:
            check(8, client.generate(prompts[p], max_new_tokens=8), p, True)
        except Exception as exc:
            failed("warmup_errors", exc)
        timed.latencies.clear()

    threads = [threading.Thread(target=warm, args=(i,)) for i in range(n_sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    barrier.wait()
    start = time.monotonic()
    deadline = start + args["seconds"]

    def session(i: int) -> None:
        client, timed = clients[i]
        j = first + i
        while time.monotonic() < deadline:
            p = j % len(prompts)
            j += 1
            try:
                check(max_new, client.generate(prompts[p], max_new_tokens=max_new), p, False)
            except Exception as exc:
                failed("errors", exc)
                time.sleep(0.1)             # an error is counted, not retried in a tight loop

    threads = [threading.Thread(target=session, args=(i,)) for i in range(n_sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report["wall_s"] = time.monotonic() - start
    report["done_at"] = [t - start for t in report["done_at"]]
    for client, timed in clients:
        report["latencies"].extend(timed.latencies)
        try:
            client.close()
        except Exception as exc:
            failed("close_errors", exc)
    out.put(report)


# -- the handshake flood (its own process) --------------------------------------------------------------
def malformed_hello(rng: random.Random, hello: dict) -> dict:
    low_order = [bytes(32), bytes([1]) + bytes(31), bytes.fromhex(
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")]
    kind = rng.randrange(4)
    if kind == 0:
        return {**hello, "e": rng.choice(low_order)}
    if kind == 1:
        return {**hello, "e": rng.choice([32, 2**40, 2**63])}
    if kind == 2:
        return {**hello, "r": hello["r"][:15]}
    return {**hello, "psk_id": "x" * 32}


def flood_process(url: str, key: str, addresses: list[str], conns: int, rate: float, malformed: float,
                  seconds: float, cpus: set[int] | None, go, out) -> None:
    """`conns` threads per source address (each its own keep-alive connection), together offering
    rate / len(addresses) hellos a second from that address until the window closes (a source needs more
    than one connection to offer more than one answer time allows). Tallies answers by (kind, status),
    429s without Retry-After, transport errors, latencies."""
    import base64

    import httpx
    import msgpack

    from privacy import AFFINITY_HEADER, ClientHandshake

    if cpus:
        os.sched_setaffinity(0, cpus)
    server_key = base64.b64decode(key)
    per_thread = rate / len(addresses) / conns
    lock = threading.Lock()
    tally: Counter = Counter()
    stats = {"sent": 0, "no_retry_after": 0, "retry_after": Counter(), "transport_errors": Counter(),
             "latencies": [], "behind": 0}
    go.wait(600)
    start = time.monotonic()
    deadline = start + seconds

    def source(k: int, address: str) -> None:
        rng = random.Random(k)
        interval = 1.0 / per_thread
        transport = httpx.HTTPTransport(local_address=address)
        with httpx.Client(base_url=url, transport=transport, timeout=10.0) as http:
            next_at = time.monotonic() + rng.uniform(0, interval)
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return
                if now < next_at:
                    time.sleep(min(next_at - now, deadline - now))
                    continue
                if now - next_at > 0.5:       # fell behind: go on from now, do not burst to catch up
                    with lock:
                        stats["behind"] += 1
                    next_at = now
                next_at += interval
                hello = ClientHandshake(server_public=server_key).hello()
                kind = "hello"
                if rng.random() < malformed:
                    hello, kind = malformed_hello(rng, hello), "malformed"
                body = msgpack.packb(hello, use_bin_type=True)
                t0 = time.perf_counter()
                try:
                    resp = http.post("/v1/handshake", content=body, headers={
                        "content-type": MSGPACK, AFFINITY_HEADER: os.urandom(8).hex()})
                except httpx.HTTPError as exc:
                    with lock:
                        stats["sent"] += 1
                        stats["transport_errors"][type(exc).__name__] += 1
                    continue
                took = time.perf_counter() - t0
                with lock:
                    stats["sent"] += 1
                    stats["latencies"].append(took)
                    tally[f"{kind} {resp.status_code}"] += 1
                    if resp.status_code == 429:
                        retry = resp.headers.get("retry-after")
                        if retry is None:
                            stats["no_retry_after"] += 1
                        else:
                            stats["retry_after"][retry] += 1

    threads = [threading.Thread(target=source, args=(k * conns + c, a))
               for k, a in enumerate(addresses) for c in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    lat = np.array(stats["latencies"]) * 1e3
    out.put({"wall_s": time.monotonic() - start, "offered_per_s": rate, "sources": addresses,
             "connections_per_source": conns, "sent": stats["sent"],
             "statuses": dict(tally), "no_retry_after": stats["no_retry_after"],
             "retry_after_values": dict(stats["retry_after"]), "transport_errors": dict(stats["transport_errors"]),
             "fell_behind": stats["behind"],
             "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                            "max": float(lat.max())} if len(lat) else {}})


# -- attackers in the main process (light) -------------------------------------------------------------
class Unfinished:
    """`n` sealed sessions that each keep one max_draft-token round staged and never finish it; an
    evicted one (401) opens again. Closed (CLOSE frames) when the window ends."""

    def __init__(self, url: str, key: str, info: dict, n: int, every: float, draft: int):
        self.url, self.key, self.info, self.n, self.every, self.draft = url, key, info, n, every, draft
        self.statuses: Counter = Counter()
        self.opened = self.reopened = self.staged = self.no_retry_after = self.unclosed = 0
        self.errors: list[str] = []

    def _open(self, http):
        import base64

        import msgpack

        from privacy import ClientHandshake, FrameType, OpenSession

        while True:
            hs = ClientHandshake(server_public=base64.b64decode(self.key))
            resp = http.post("/v1/handshake", content=msgpack.packb(hs.hello()), headers={"content-type": MSGPACK})
            self.statuses[f"handshake {resp.status_code}"] += 1
            if resp.status_code == 429:
                self.no_retry_after += "retry-after" not in resp.headers
                time.sleep(float(resp.headers.get("retry-after", "1")))
                continue
            resp.raise_for_status()
            ch = hs.finish(msgpack.unpackb(resp.content))
            status, _ = self._send(http, ch, FrameType.OPEN, OpenSession(
                self.info["vocab_fingerprint"], self.info["vocab_size"]).to_dict())
            if status == 200:
                self.opened += 1
                return ch

    def _send(self, http, ch, ftype, body):
        resp = http.post("/v1/frames", content=ch.seal(ftype, body), headers={"content-type": FRAME})
        self.statuses[f"{ftype.name.lower()} {resp.status_code}"] += 1
        if resp.status_code == 429:
            self.no_retry_after += "retry-after" not in resp.headers
        if resp.headers.get("content-type", "").startswith(FRAME):
            return resp.status_code, ch.open(resp.content)[1]
        return resp.status_code, None

    def run(self, deadline: float) -> None:
        import httpx

        from privacy import FrameType, VerifyRequest

        rng = random.Random(7)
        vocab = self.info["vocab_size"]
        transport = httpx.HTTPTransport(local_address=UNFINISHED_ADDRESS)
        with httpx.Client(base_url=self.url, transport=transport, timeout=30.0) as http:
            channels = []
            try:
                channels = [self._open(http) for _ in range(self.n)]
                rnd = 0
                while time.monotonic() < deadline:
                    rnd += 1
                    for i, ch in enumerate(channels):
                        prefix = tuple(rng.randrange(3, vocab) for _ in range(24))
                        draft = tuple(rng.randrange(3, vocab) for _ in range(self.draft))
                        status, _ = self._send(http, ch, FrameType.VERIFY, VerifyRequest(
                            0, prefix, draft, round=rnd, final=False).to_dict())
                        if status == 200:
                            self.staged += 1
                        elif status == 401:           # evicted (sessions are the verifier's to drop)
                            channels[i] = self._open(http)
                            self.reopened += 1
                    end = min(deadline, time.monotonic() + self.every)
                    while time.monotonic() < end:
                        time.sleep(min(0.2, max(0.0, end - time.monotonic())))
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            finally:
                for ch in channels:           # closed, so that what is left at the end is no attacker's
                    for _ in range(5):
                        try:
                            status, _ = self._send(http, ch, FrameType.CLOSE, {})
                        except Exception as exc:
                            self.errors.append(f"close: {type(exc).__name__}: {exc}"[:300])
                            status = None
                        if status != 429:
                            break
                        time.sleep(1.0)
                    self.unclosed += status != 200


class SlowBodies:
    """`n` connections that each announce a 4 kB frame body and send one byte a second; an answered or
    closed one is replaced until the window ends. Records each answer's status and how long it took."""

    def __init__(self, port: int, n: int):
        self.port, self.n = port, n
        self.statuses: Counter = Counter()
        self.held_s: list[float] = []
        self.no_retry_after = 0
        self.errors: list[str] = []

    def _connect(self, sel) -> None:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(SLOW_ADDRESS, 0))
        s.sendall(b"POST /v1/frames HTTP/1.1\r\nHost: x\r\nContent-Type: " + FRAME.encode()
                  + b"\r\nContent-Length: 4096\r\n\r\n")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, {"t0": time.monotonic(), "data": b""})

    def run(self, deadline: float, drain_s: float) -> None:
        """New connections until `deadline`; then up to `drain_s` more for those still open to be answered."""
        sel = selectors.DefaultSelector()
        try:
            for _ in range(self.n):
                self._connect(sel)
            last_byte = time.monotonic()
            while time.monotonic() < deadline + drain_s and (time.monotonic() < deadline or sel.get_map()):
                for key, _ in sel.select(timeout=0.2):
                    s, state = key.fileobj, key.data
                    try:
                        chunk = s.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        chunk = b""
                    state["data"] += chunk
                    if chunk and b"\r\n\r\n" not in state["data"]:
                        continue
                    head = state["data"].split(b"\r\n\r\n", 1)[0]
                    parts = head.split(b" ", 2)
                    status = parts[1].decode() if len(parts) > 1 and head.startswith(b"HTTP/") else "closed"
                    self.statuses[status] += 1
                    if status == "429" and b"retry-after" not in head.lower():
                        self.no_retry_after += 1
                    self.held_s.append(time.monotonic() - state["t0"])
                    sel.unregister(s)
                    s.close()
                    if time.monotonic() < deadline:
                        self._connect(sel)
                if time.monotonic() - last_byte >= 1.0:
                    last_byte = time.monotonic()
                    for key in list(sel.get_map().values()):
                        try:
                            key.fileobj.send(b"x")
                        except OSError:
                            pass
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()


# -- the verifier's own view ----------------------------------------------------------------------------
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)$", re.M)


def scrape(url: str) -> dict[str, dict[str, float]]:
    """/metrics as {name: {labels: value}} (labels as the text shows them, "" for none)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, dict[str, float]] = {}
    for name, labels, value in SAMPLE.findall(text):
        out.setdefault(name, {})[labels or ""] = float(value)
    return out


def value(m: dict, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return m.get(name, {}).get(want, 0.0)


def by_label(m: dict, name: str, label: str) -> dict[str, float]:
    out = {}
    for labels, v in m.get(name, {}).items():
        found = re.search(rf'{label}="([^"]*)"', labels)
        if found:
            out[found.group(1)] = v
    return out


def delta(after: dict, before: dict, name: str) -> dict[str, float]:
    keys = set(after.get(name, {})) | set(before.get(name, {}))
    return {k: after.get(name, {}).get(k, 0.0) - before.get(name, {}).get(k, 0.0) for k in sorted(keys)}


def hist_percentile(before: dict, after: dict, name: str, q: float) -> float | None:
    """Upper bound (s) of the histogram bucket holding the q-th percentile of what was observed in between."""
    d = {float(re.search(r'le="([^"]+)"', k).group(1)): v for k, v in delta(after, before, name + "_bucket").items()}
    total = d.get(float("inf"), 0.0)
    if not total:
        return None
    return next(le for le in sorted(d) if d[le] >= q / 100 * total)


class Monitor:
    """Samples the verifier's RSS and gauges every `every` seconds (RSS: psutil; the rest: /metrics, which
    is never behind the in-flight bound, unlike /v1/info)."""

    def __init__(self, url: str, pid: int, every: float):
        import psutil

        self.url, self.proc, self.every = url, psutil.Process(pid), every
        self.samples: list[dict] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, t0: float) -> "Monitor":
        self.t0 = t0
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss
                m = scrape(self.url)
                self.samples.append({
                    "t": round(time.monotonic() - self.t0, 2), "rss_mb": rss / 2**20,
                    "sessions": value(m, "pipesd_sessions"), "pending": value(m, "pipesd_pending_handshakes"),
                    "memory_mb": sum(by_label(m, "pipesd_memory_bytes", "part").values()) / 2**20,
                    "staged_rows_mb": value(m, "pipesd_memory_bytes", part="staged_rows") / 2**20,
                    "in_flight": value(m, "pipesd_in_flight"), "open_requests": value(m, "pipesd_open_requests")})
            except Exception:
                self.errors += 1
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def info(url: str, tries: int = 20) -> dict:
    """/v1/info (it runs on the model worker, behind the in-flight bound: retried on 429)."""
    import httpx

    for _ in range(tries):
        resp = httpx.get(f"{url}/v1/info", timeout=10)
        if resp.status_code == 200:
            return resp.json()
        time.sleep(float(resp.headers.get("retry-after", "0.5")))
    resp.raise_for_status()
    return resp.json()


# -- the run ----------------------------------------------------------------------------------------------
def percentiles(values: list[float], scale: float = 1e3) -> dict:
    if not values:
        return {}
    a = np.asarray(values) * scale
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "max": float(a.max()),
            "n": int(len(a))}


def run(args) -> dict:
    from cloud_verifier import LocalVerifier
    from cloud_verifier.cli import _parser, settings_from_args
    from edge_sdk import EdgeClient, LlamaCppDrafter
    import pipesd_models

    verifier_args = shlex.split(args.verifier_args)
    settings = settings_from_args(_parser().parse_args(verifier_args))
    cores = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(cores) >= 2
    verifier_cpus = {cores[-1]} if pin else None
    edge_cpus = set(cores[:-1]) if pin else None
    prompts = PROMPTS[: args.prompts]
    meta = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "backend": args.backend,
            "mode": args.mode, "sessions": args.sessions, "processes": min(args.processes, args.sessions),
            "seconds": args.seconds,
            "tokens": args.tokens, "prompts": len(prompts), "flood_rate": args.flood_rate,
            "flood_addresses": args.flood_addresses, "flood_conns": args.flood_conns,
            "flood_malformed": args.flood_malformed, "nav_deadline_s": args.nav_deadline,
            "unfinished": args.unfinished, "slow_bodies": args.slow_bodies, "verifier_args": verifier_args,
            "pinned": {"verifier": sorted(verifier_cpus), "edges_and_attackers": sorted(edge_cpus)} if pin else None,
            "command": "benchmarks/verifier_load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "limits": {k: getattr(settings, k) for k in (
                "max_sessions", "max_pending_handshakes", "handshake_ttl_s", "handshake_rate", "handshake_burst",
                "client_handshake_rate", "client_handshake_burst", "max_memory_bytes", "round_timeout_s",
                "body_timeout_s", "max_open_requests", "max_connections", "max_in_flight", "kv_slots",
                "max_batch", "max_draft", "session_ttl_s")}}
    if pin:
        os.sched_setaffinity(0, edge_cpus)
    with LocalVerifier(model="embedded", backend=args.backend, threads=1, cpus=verifier_cpus,
                       extra_args=verifier_args) as v:
        print(f"verifier {v.url} ({args.backend}); reference outputs for {len(prompts)} prompts...", flush=True)
        import psutil

        meta["rss_at_ready_mb"] = psutil.Process(v.proc.pid).memory_info().rss / 2**20
        vinfo = info(v.url)
        drafter = LlamaCppDrafter(pipesd_models.draft_path(), threads=1)
        with EdgeClient(v.url, verifier_key=v.public_key, drafter=drafter, offline="fail") as ref:
            reference = {i: ref.generate(p, max_new_tokens=args.tokens, mode="cloud_only").tokens
                         for i, p in enumerate(prompts)}
        del drafter
        n_proc = min(args.processes, args.sessions)
        shares = [args.sessions // n_proc + (1 if i < args.sessions % n_proc else 0) for i in range(n_proc)]
        ctx = mp.get_context("spawn")
        barrier, honest_q, flood_q, go = ctx.Barrier(n_proc + 1), ctx.Queue(), ctx.Queue(), ctx.Event()
        wargs = {"prompts": prompts, "tokens": args.tokens, "mode": args.mode, "seconds": args.seconds,
                 "nav_deadline": args.nav_deadline}
        procs, first = [], 0
        for i, share in enumerate(shares):
            p = ctx.Process(target=honest_process, args=(i, v.url, v.public_key, first, share, wargs, reference,
                                                         edge_cpus, barrier, honest_q), daemon=True)
            p.start()
            procs.append(p)
            first += share
        flood = None
        if args.flood_rate > 0:
            addresses = [f"127.0.0.{FLOOD_FIRST + k}" for k in range(args.flood_addresses)]
            flood = ctx.Process(target=flood_process, args=(v.url, v.public_key, addresses, args.flood_conns,
                                                            args.flood_rate, args.flood_malformed, args.seconds,
                                                            edge_cpus, go, flood_q), daemon=True)
            flood.start()
        print(f"opening {args.sessions} honest sessions in {n_proc} processes (one warm-up generation each)...",
              flush=True)
        barrier.wait(timeout=600)                       # every honest session is open
        before = scrape(v.url)
        info_before = info(v.url)
        t0 = time.monotonic()
        deadline = t0 + args.seconds
        go.set()
        monitor = Monitor(v.url, v.proc.pid, args.sample).start(t0)
        attackers = []
        unfinished = slow = None
        if args.unfinished:
            unfinished = Unfinished(v.url, v.public_key, vinfo, args.unfinished, args.unfinished_every,
                                    min(args.unfinished_draft, settings.max_draft))
            attackers.append(threading.Thread(target=unfinished.run, args=(deadline,), daemon=True))
        if args.slow_bodies:
            slow = SlowBodies(v.port, args.slow_bodies)
            attackers.append(threading.Thread(target=slow.run, args=(deadline, settings.body_timeout_s + 3),
                                              daemon=True))
        for t in attackers:
            t.start()
        print(f"window: {args.seconds:g} s, flood {args.flood_rate:g}/s from {args.flood_addresses} sources, "
              f"{args.unfinished} unfinished-round sessions, {args.slow_bodies} slow bodies", flush=True)
        reports, hung = [], 0
        for _ in procs:
            try:
                reports.append(honest_q.get(timeout=args.seconds + 300))
            except Exception:
                hung += 1
        flood_report = None
        if flood is not None:
            try:
                flood_report = flood_q.get(timeout=120)
            except Exception:
                hung += 1
        for t in attackers:
            t.join(settings.body_timeout_s + 60)
        window = time.monotonic() - t0
        for p in procs + ([flood] if flood else []):
            p.join(30)
            if p.is_alive():
                p.terminate()
                hung += 1
        after = scrape(v.url)                            # every client has closed by now
        time.sleep(1.5)                                  # a housekeeping tick
        monitor.stop()
        info_after = info(v.url)
        log = list(v.output)

    return summarise(args, meta, settings, reports, hung, flood_report, unfinished, slow, monitor, before, after,
                     info_before, info_after, log, window)


def summarise(args, meta, settings, reports, hung, flood, unfinished, slow, monitor, before, after,
              info_before, info_after, log, window) -> dict:
    def total(key):
        return sum(r[key] for r in reports)

    lat = [x for r in reports for x in r["latencies"]]
    done = sorted(t for r in reports for t in r["done_at"])
    errors = [e for r in reports for e in r["errors"]]
    warm_errors = [e for r in reports for e in r["warmup_errors"] + r["close_errors"]]
    mismatches = [m for r in reports for m in r["mismatches"]]
    honest = {
        "sessions": args.sessions, "worker_processes_reporting": len(reports), "hung": hung,
        "generations": total("generations"), "warmup_generations": total("warmup_generations"),
        "tokens": total("tokens"),
        "tokens_per_s": total("tokens") / max([r["wall_s"] for r in reports] or [args.seconds]),
        "errors": len(errors), "error_samples": sorted(Counter(errors).items(), key=lambda kv: -kv[1])[:8],
        "warmup_or_close_errors": warm_errors[:8], "mismatches": len(mismatches), "mismatch_samples": mismatches[:8],
        "unverified_tokens": total("unverified_tokens"), "breaker_trips": total("breaker_trips"),
        "overload_waits": total("overload_waits"), "overload_wait_s": total("overload_wait_s"),
        "resyncs": total("resyncs"), "nav_rounds": total("nav_rounds"),
        "acceptance": total("draft_n_accepted") / total("draft_n") if total("draft_n") else 0.0,
        "nav_ms": percentiles(lat),
        "generations_per_5s": np.histogram(done, bins=np.arange(0, args.seconds + 10, 5))[0].tolist() if done else [],
    }
    opened = value(after, "pipesd_sessions_opened_total") - value(before, "pipesd_sessions_opened_total")
    attacker_opened = unfinished.opened if unfinished else 0
    samples = monitor.samples
    inside = [x for x in samples if x["t"] <= args.seconds] or samples      # the window (not the closes after it)
    requests = {k: v for k, v in delta(after, before, "pipesd_requests_total").items() if v}
    statuses = Counter()
    for labels, n in requests.items():
        statuses[re.search(r'status="(\d+)"', labels).group(1)] += n
    server = {
        "sessions_at_start": value(before, "pipesd_sessions"), "info_at_start": info_before,
        "sessions_opened_in_window": opened, "of_them_attackers": attacker_opened,
        "honest_reopens": opened - attacker_opened,
        "evictions": {k: v for k, v in delta(after, before, "pipesd_session_evictions_total").items() if v},
        "handshakes_unproven": value(after, "pipesd_handshakes_unproven_total")
        - value(before, "pipesd_handshakes_unproven_total"),
        "pending_max": max((s["pending"] for s in samples), default=None),
        "pending_bound": settings.max_pending_handshakes,
        "sessions_max": max((s["sessions"] for s in inside), default=None),
        "sessions_min": min((s["sessions"] for s in inside), default=None),
        "sessions_left_after_close": info_after["sessions"], "pending_left": info_after["pending_handshakes"],
        "requests_by_status": dict(statuses), "requests": requests,
        "rejections": {k: v for k, v in delta(after, before, "pipesd_rejections_total").items() if v},
        "client_disconnects": value(after, "pipesd_client_disconnects_total")
        - value(before, "pipesd_client_disconnects_total"),
        "staged_rows_dropped": {k: v for k, v in delta(after, before, "pipesd_staged_rows_dropped_total").items() if v},
        "kv_slot_evictions": value(after, "pipesd_kv_slot_evictions") - value(before, "pipesd_kv_slot_evictions"),
        "nav_in_verifier_ms_le": {q: (lambda s: s * 1e3 if s is not None else None)(
            hist_percentile(before, after, "pipesd_nav_seconds", q)) for q in (50, 99)},
        "log_tracebacks": sum("Traceback" in line for line in log),
        "log_internal_errors": sum("internal error" in line for line in log),
        "log_tail": log[-10:],
    }
    memory = {
        "rss_mb": {"ready": meta.get("rss_at_ready_mb"), "start": samples[0]["rss_mb"],
                   "max": max(s["rss_mb"] for s in samples), "end": samples[-1]["rss_mb"]} if samples else {},
        "gauge_max_mb": max((s["memory_mb"] for s in samples), default=None),
        "staged_rows_max_mb": max((s["staged_rows_mb"] for s in samples), default=None),
        "budget_mb": settings.max_memory_bytes / 2**20,
        "gauge_by_part_end_mb": {k: v / 2**20 for k, v in by_label(after, "pipesd_memory_bytes", "part").items()},
        "in_flight_max": max((s["in_flight"] for s in samples), default=None),
        "open_requests_max": max((s["open_requests"] for s in samples), default=None),
        "samples": len(samples), "sample_errors": monitor.errors,
    }
    attacks = {"flood": flood}
    if unfinished:
        attacks["unfinished"] = {"sessions": args.unfinished, "opened": unfinished.opened,
                                 "reopened_after_eviction": unfinished.reopened, "rounds_staged": unfinished.staged,
                                 "statuses": dict(unfinished.statuses), "no_retry_after": unfinished.no_retry_after,
                                 "unclosed": unfinished.unclosed,
                                 "errors": unfinished.errors}
    if slow:
        attacks["slow_bodies"] = {"connections": args.slow_bodies, "statuses": dict(slow.statuses),
                                  "held_s": percentiles(slow.held_s, 1.0), "no_retry_after": slow.no_retry_after,
                                  "errors": slow.errors}
    flood_statuses = flood["statuses"] if flood else {}
    checks = [
        ("honest errors are 0", honest["errors"] == 0 and not hung and not warm_errors,
         f"{honest['errors']} errors, {len(warm_errors)} at warm-up/close, {hung} hung"),
        ("honest outputs equal the target's greedy output", honest["mismatches"] == 0 and honest["generations"] > 0,
         f"{honest['mismatches']} mismatches in {honest['generations']} generations"),
        ("every token verified (no offline tokens)", honest["unverified_tokens"] == 0 and honest["breaker_trips"] == 0,
         f"{honest['unverified_tokens']} unverified, {honest['breaker_trips']} breaker trips"),
        ("every 429 carries Retry-After",
         (not flood or flood["no_retry_after"] == 0) and (not slow or slow.no_retry_after == 0)
         and (not unfinished or unfinished.no_retry_after == 0),
         f"flood 429s: {sum(n for k, n in flood_statuses.items() if k.endswith(' 429'))}, without: "
         f"{flood['no_retry_after'] if flood else 0}"),
        ("malformed hellos get 400, honest ones 200 or 429",
         all(k in ("hello 200", "hello 429", "malformed 400", "malformed 429") for k in flood_statuses),
         ", ".join(f"{k}: {n}" for k, n in sorted(flood_statuses.items()))),
        ("no 5xx", not any(s.startswith("5") for s in statuses) and not (flood and flood["transport_errors"]),
         f"statuses {dict(statuses)}; flood transport errors {flood['transport_errors'] if flood else {}}"),
        ("no session evicted for room, no honest session re-opened",
         not server["evictions"].get('reason="sessions"') and server["honest_reopens"] == 0,
         f"evictions {server['evictions']}, honest re-opens {server['honest_reopens']:.0f}"),
        ("pending handshakes within their bound",
         server["pending_max"] is not None and server["pending_max"] <= settings.max_pending_handshakes,
         f"max {server['pending_max']} of {settings.max_pending_handshakes}"),
        ("established sessions only the honest ones and the attackers' proven ones",
         server["sessions_max"] is not None and server["sessions_max"] <= args.sessions + args.unfinished,
         f"max {server['sessions_max']} (honest {args.sessions} + unfinished {args.unfinished})"),
        ("no orphaned sessions once every client has closed",
         server["sessions_left_after_close"] == (unfinished.unclosed if unfinished else 0),
         f"{server['sessions_left_after_close']} left, of them attackers' whose CLOSE failed: "
         f"{unfinished.unclosed if unfinished else 0}"),
        ("memory gauge within the budget",
         memory["gauge_max_mb"] is not None and memory["gauge_max_mb"] <= memory["budget_mb"],
         f"max {memory['gauge_max_mb']:.1f} MB of {memory['budget_mb']:.0f} MB" if memory["gauge_max_mb"] else ""),
        ("no traceback or internal error in the verifier's log",
         server["log_tracebacks"] == 0 and server["log_internal_errors"] == 0,
         f"{server['log_tracebacks']} tracebacks, {server['log_internal_errors']} internal errors"),
    ]
    if slow:
        checks.append(("slow bodies end within the body deadline (408) or are refused (429)",
                       set(slow.statuses) <= {"408", "429"} and bool(slow.statuses)
                       and (not slow.held_s or max(slow.held_s) <= settings.body_timeout_s + 3),
                       f"{dict(slow.statuses)}, held max {max(slow.held_s, default=0):.1f} s"))
    return {"meta": meta, "window_s": window, "honest": honest, "attacks": attacks, "server": server,
            "memory": memory, "checks": [{"check": c, "ok": bool(ok), "detail": d} for c, ok, d in checks],
            "series": monitor.samples}


def write(out: Path, r: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(r, indent=2, default=str))
    m, h, s, mem, a = r["meta"], r["honest"], r["server"], r["memory"], r["attacks"]
    pin = m["pinned"]
    lines = [f"Commit {m['commit']}, {m['date']}, {m['machine']}; verifier: embedded target, {m['backend']}, 1 thread"
             + (f", pinned to core {pin['verifier'][0]} (edges and attackers on {pin['edges_and_attackers']})"
                if pin else "") + ".", "",
             f"    .venv/bin/python {m['command']}", "",
             f"{m['sessions']} honest sessions ({m['mode']}, {m['tokens']} tokens a request, offline=\"fail\", "
             f"NAV deadline {m['nav_deadline_s'] or 'the SDK default'}"
             f"{' s' if m['nav_deadline_s'] else ''}, {m['processes']} processes) for {m['seconds']:g} s, with a "
             f"handshake flood of {m['flood_rate']:g}/s offered from {m['flood_addresses']} loopback sources x "
             f"{m['flood_conns']} connections ({m['flood_malformed']:.0%} malformed), "
             f"{m['unfinished']} unfinished-round sessions and {m['slow_bodies']} slow bodies. Verifier limits: "
             + ", ".join(f"{k} {v}" for k, v in m["limits"].items() if k in (
                 "max_sessions", "max_pending_handshakes", "handshake_rate", "handshake_burst", "max_memory_bytes",
                 "body_timeout_s", "max_in_flight", "kv_slots")) + ".", "",
             "| honest | |", "|---|---:|",
             f"| generations completed (warm-up excluded) | {h['generations']} |",
             f"| output tokens (tok/s) | {h['tokens']} ({h['tokens_per_s']:.0f}) |",
             f"| honest errors | {h['errors']} |",
             f"| mismatches vs target greedy | {h['mismatches']} |",
             f"| unverified tokens / breaker trips | {h['unverified_tokens']} / {h['breaker_trips']} |",
             f"| 429s waited out by the SDK (s waited) | {h['overload_waits']} ({h['overload_wait_s']:.1f}) |",
             f"| resyncs | {h['resyncs']} |",
             f"| NAV rounds, acceptance | {h['nav_rounds']}, {h['acceptance']:.2f} |"]
    if h["nav_ms"]:
        lines.append(f"| NAV round trip p50 / p99 / max (ms) | {h['nav_ms']['p50']:.1f} / {h['nav_ms']['p99']:.1f} / "
                     f"{h['nav_ms']['max']:.0f} |")
    nv = s["nav_in_verifier_ms_le"]
    if nv.get(50) is not None:
        lines.append(f"| NAV in the verifier p50 / p99 (≤, histogram buckets, ms) | {nv[50]:.0f} / {nv[99]:.0f} |")
    f = a.get("flood")
    if f:
        lines += ["", "| handshake flood | |", "|---|---:|",
                  f"| sent (offered {f['offered_per_s']:g}/s, achieved {f['sent'] / f['wall_s']:.0f}/s) | {f['sent']} |"]
        lines += [f"| answered {k} | {n} |" for k, n in sorted(f["statuses"].items())]
        lines += [f"| 429 without Retry-After | {f['no_retry_after']} |",
                  f"| transport errors | {sum(f['transport_errors'].values())} |"]
        if f["latency_ms"]:
            lines.append(f"| answer p50 / p99 (ms) | {f['latency_ms']['p50']:.1f} / {f['latency_ms']['p99']:.1f} |")
    u = a.get("unfinished")
    if u:
        lines += ["", "| unfinished rounds | |", "|---|---:|",
                  f"| sessions (opened, re-opened after eviction) | {u['sessions']} ({u['opened']}, "
                  f"{u['reopened_after_eviction']}) |", f"| rounds staged, never finished | {u['rounds_staged']} |",
                  f"| answers | {', '.join(f'{k}: {n}' for k, n in sorted(u['statuses'].items()))} |"]
    sb = a.get("slow_bodies")
    if sb:
        held = sb["held_s"]
        lines += ["", "| slow bodies | |", "|---|---:|", f"| connections at once | {sb['connections']} |",
                  f"| answers | {', '.join(f'{k}: {n}' for k, n in sorted(sb['statuses'].items()))} |"]
        if held:
            lines.append(f"| held p50 / max (s) | {held['p50']:.1f} / {held['max']:.1f} |")
    lines += ["", "| verifier | |", "|---|---:|",
              f"| sessions at start / min / max in the window | {s['sessions_at_start']:.0f} / {s['sessions_min']:.0f} / "
              f"{s['sessions_max']:.0f} |",
              f"| sessions opened in the window (attackers' / honest re-opens) | {s['sessions_opened_in_window']:.0f} "
              f"({s['of_them_attackers']} / {s['honest_reopens']:.0f}) |",
              f"| evictions | {', '.join(f'{k}: {v:.0f}' for k, v in s['evictions'].items()) or 'none'} |",
              f"| handshakes never proven (expired or pushed out of the pending table) | {s['handshakes_unproven']:.0f} |",
              f"| pending handshakes max (bound) / left at the end | {s['pending_max']:.0f} ({s['pending_bound']}) / "
              f"{s['pending_left']} |",
              f"| sessions left after every client closed | {s['sessions_left_after_close']} |",
              f"| requests by status | {', '.join(f'{k}: {v:.0f}' for k, v in sorted(s['requests_by_status'].items()))} |",
              f"| KV slot evictions (prefix recomputed) | {s['kv_slot_evictions']:.0f} |"]
    if mem["rss_mb"]:
        lines += [f"| RSS at ready / window start / max / end (MB) | {mem['rss_mb']['ready']:.0f} / "
                  f"{mem['rss_mb']['start']:.0f} / {mem['rss_mb']['max']:.0f} / {mem['rss_mb']['end']:.0f} |",
                  f"| memory gauge max / budget (MB) | {mem['gauge_max_mb']:.1f} / {mem['budget_mb']:.0f} |",
                  f"| staged logits rows max (MB) | {mem['staged_rows_max_mb']:.1f} |",
                  f"| in flight max / open requests max | {mem['in_flight_max']:.0f} / {mem['open_requests_max']:.0f} |"]
    lines += ["", "Checks:", ""]
    lines += [f"- {'PASS' if c['ok'] else 'FAIL'}: {c['check']} ({c['detail']})" for c in r["checks"]]
    if h["error_samples"]:
        lines += ["", "Honest errors:", ""] + [f"- {n} x {e}" for e, n in h["error_samples"]]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=64, help="honest sessions (EdgeClients), all generating at once")
    ap.add_argument("--processes", type=int, default=4, help="worker processes the honest sessions are spread over")
    ap.add_argument("--seconds", type=float, default=60.0, help="the measured window")
    ap.add_argument("--mode", default="pipesd", help="the honest edges' mode (pipesd, vanilla, ...)")
    ap.add_argument("--tokens", type=int, default=48, help="max_new_tokens of each honest request")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the bench prompts to cycle")
    ap.add_argument("--backend", choices=["torch", "llamacpp"], default="torch")
    ap.add_argument("--nav-deadline", type=float, default=None,
                    help="the honest edges' nav_deadline_s (default: the SDK's, 8x recent NAV and at least 2 s)")
    ap.add_argument("--flood-rate", type=float, default=400.0, help="handshakes a second offered in all (0: none)")
    ap.add_argument("--flood-addresses", type=int, default=4, help="flood sources: 127.0.0.2 ...")
    ap.add_argument("--flood-conns", type=int, default=4, help="connections (threads) per flood source")
    ap.add_argument("--flood-malformed", type=float, default=0.1, help="fraction of the flood's hellos malformed")
    ap.add_argument("--unfinished", type=int, default=8, help="sessions holding an unfinished round (0: none)")
    ap.add_argument("--unfinished-every", type=float, default=2.0, help="seconds between their staged rounds")
    ap.add_argument("--unfinished-draft", type=int, default=64, help="draft tokens staged per round (<= max_draft)")
    ap.add_argument("--slow-bodies", type=int, default=16, help="connections trickling a body (0: none)")
    ap.add_argument("--verifier-args", default="", help="extra pipesd-verifier flags, e.g. '--max-memory-mb 256'")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin the verifier to the last core and everything else to the others")
    ap.add_argument("--sample", type=float, default=0.5, help="seconds between RSS / gauge samples")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "verifier_load")
    args = ap.parse_args()
    if not 1 <= args.flood_addresses <= 190 or args.flood_conns < 1:
        ap.error("--flood-addresses takes 1 to 190 sources, --flood-conns at least 1")
    if args.sessions < 1 or args.seconds <= 0:
        ap.error("--sessions and --seconds must be positive")
    r = run(args)
    write(args.out, r)
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out}")
    return 0 if all(c["ok"] for c in r["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
