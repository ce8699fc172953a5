"""FastAPI surface of the verifier.

Two session endpoints: ``/v1/handshake`` (plain msgpack, the key exchange) and
``/v1/frames`` (sealed frames: everything else). Model work runs on one worker
thread (``batching.py``: the target passes of concurrent sessions run as one batch;
the cores belong to one forward pass at a time); the event loop only bounds, routes,
orders and counts. Failures before a frame is
authenticated are answered in plain JSON with a code and no detail; failures after
it travel sealed. Bad input is never a 500.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from privacy import (AFFINITY_HEADER, FRAMES_PATH, HANDSHAKE_PATH, MEDIA_FRAME, MEDIA_MSGPACK, MEDIA_STREAM,
    READY_PATH, ROUNDS_PATH, ErrorCode, FrameType, StaticKey, WireError, decode, encode, parse_header)
from privacy.codec import DecodeLimits

from .batching import ModelWorker
from .metrics import Metrics
from .ratelimit import HandshakeLimiter
from .service import Early, VerifierService
from .settings import VerifierSettings
from .target import ModelLoadError, Target

log = logging.getLogger("cloud_verifier")
MIN_RETRY_AFTER_S = 0.05     # the shortest wait a 429 for the in-flight bounds asks for
HANDSHAKE_LIMITS = DecodeLimits(max_body_bytes=1024, max_bin_bytes=64, max_str_bytes=64, max_array_len=8,
                                max_map_len=8)


def _error(code: ErrorCode, message: str, headers: dict | None = None, **details) -> JSONResponse:
    return JSONResponse(WireError(code, message, **details).to_dict(), status_code=code.http_status, headers=headers)


class VerifierApp:
    """Owns the service, the model worker thread, the in-flight bound and the readiness flag."""

    def __init__(self, load_target: Callable[[], Target], settings: VerifierSettings, static_key: StaticKey | None,
                 psk: bytes | None):
        self.settings = settings
        self.metrics = Metrics()
        self.service: VerifierService | None = None
        self.load_error: str | None = None
        self.in_flight = 0                    # established sessions' frames queued or running (max_in_flight)
        self.in_flight_by = collections.Counter()   # ... per session id
        self._flight_lock = threading.Lock()  # both change on the event loop (admission) and the worker (release)
        self.handshaking = 0                  # handshakes queued or running (max_handshakes_in_flight)
        self.worker = ModelWorker(max_batch=settings.max_batch, max_wait_s=settings.batch_wait_s,
                                  in_flight=lambda: self.in_flight, metrics=self.metrics)
        self.order = asyncio.Condition()
        self.open_requests = 0                # POST requests reading a body or waiting (max_open_requests)
        self.max_open_requests = settings.max_open_requests   # the CLI lowers it if file descriptors are short
        self.early_bytes = 0                  # early frames held in in_order (counted in the memory budget)
        self.arriving: dict[bytes, collections.Counter] = {}   # session id -> seqs of its frames in in_order
        self.connections: Callable[[], object] | None = None  # the server's open connections (the CLI sets it)
        self.keep_alive_s = 5.0               # uvicorn's timeout_keep_alive (the CLI sets it)
        self.handshakes = HandshakeLimiter(settings.handshake_rate, settings.handshake_burst,
                                           settings.client_handshake_rate, settings.client_handshake_burst)
        self._load = lambda: VerifierService(load_target(), settings, static_key=static_key, psk=psk,
                                             metrics=self.metrics)

    def load(self) -> None:
        try:
            service = self._load()
            self.worker.logits_many = service.target.logits_many
            service.extra_bytes = lambda: self.early_bytes
            self.service = service
            log.info("target %s ready", self.service.target.name)
        except ModelLoadError as exc:  # a bad model file: its one line says it all, no traceback
            self.load_error = str(exc)
            log.error("%s", exc)
        except Exception as exc:  # reported by /health/ready, not swallowed
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the target failed")

    async def run(self, fn, *args, key: object | None = None):
        """Run `fn` on the model worker, refusing work beyond the in-flight bound (429).

        An established session with nothing in flight is always admitted: the bound sheds a session's
        *extra* requests (rounds drafted ahead), never its only one. Refusals by lottery starved some
        sessions under load -- at 64 sessions on two cores, a dozen generations were refused eight times
        running and missed their deadlines while others went through. In flight at most `max_in_flight`
        plus one per established session (itself bounded by `max_sessions`); `key` (the session id) counts
        only when it names an established session, so forged ids take the shared bound.

        `fn` may be a dispatch generator: its target passes are batched with other sessions'."""
        if self.service is None:
            raise WireError(ErrorCode.NOT_READY, self.load_error or "the target model is still loading")
        with self._flight_lock:
            own = key is not None and self.in_flight_by[key] == 0 and key in self.service.sessions
            if self.in_flight >= self.settings.max_in_flight and not own:
                raise self.overloaded("too many requests in flight; retry later")
            self.in_flight += 1
            self.in_flight_by[key] += 1
            self.metrics.in_flight.set(self.in_flight)
        try:
            future = self.worker.submit(fn, *args, key=key)
        except BaseException:
            self._release(key)
            raise
        # Released the moment the worker resolves it (on the worker's thread), not when this coroutine
        # resumes: the worker's next cycle must not count it as a request still coming, or it waits
        # batch_wait_s for company behind every call it just finished -- 2 ms before each of a
        # pipelining session's rounds queued behind the one before.
        future.add_done_callback(lambda _: self._release(key))
        return await asyncio.wrap_future(future)

    def _release(self, key: object | None) -> None:
        with self._flight_lock:
            self.in_flight -= 1
            self.in_flight_by[key] -= 1
            if self.in_flight_by[key] <= 0:
                del self.in_flight_by[key]
            self.metrics.in_flight.set(self.in_flight)

    async def handshake(self, hello: dict) -> dict:
        """Answer a ClientHello on the model worker, under a bound of its own (``max_handshakes_in_flight``,
        429 beyond): unproven handshakes never take the slots of established sessions' frames
        (``max_in_flight``), and they run after the worker's target passes, never ahead of a frame."""
        if self.service is None:
            raise WireError(ErrorCode.NOT_READY, self.load_error or "the target model is still loading")
        if self.handshaking >= self.settings.max_handshakes_in_flight:
            raise self.overloaded("too many handshakes in flight; retry later")
        self.handshaking += 1
        try:
            return await asyncio.wrap_future(self.worker.submit(self.service.handshake, hello, light=True))
        finally:
            self.handshaking -= 1

    def retry_after(self) -> float:
        """Seconds a request refused by an in-flight bound should wait: about how long the model worker
        takes to get through the calls ahead of it (its recent cycle time per ``max_batch`` of them), within
        [MIN_RETRY_AFTER_S, ``retry_after_s``]. A slot frees at the end of every cycle, so a fixed second
        (ten to a hundred cycles) only made refused edges miss their NAV deadlines."""
        cycles = max(1, math.ceil(self.in_flight / self.settings.max_batch))
        return min(float(self.settings.retry_after_s), max(MIN_RETRY_AFTER_S, cycles * self.worker.cycle_s))

    def overloaded(self, message: str) -> WireError:
        """429 ``overloaded`` for an in-flight bound; its ``retry_after_s`` detail is the expected wait in
        fractional seconds (the ``Retry-After`` header says it in whole seconds, rounded up, as HTTP asks)."""
        return WireError(ErrorCode.OVERLOADED, message, retry_after_s=round(self.retry_after(), 3))

    async def in_order(self, frame: bytes, more_coming: bool = False, arrived: float | None = None):
        """Authenticate a frame and run it once the session's earlier frames have run.

        A round's stream and the next (proactive) round's stream travel on different connections
        and may interleave on arrival; the edge numbers frames in the order it sends them, so
        waiting for the sequence number restores that order. The usual in-order frame is
        authenticated and dispatched in one trip to the model worker (so in one batching cycle).
        Only authenticated frames wait, and a gap (a frame that never comes) is skipped once the
        session has made no progress for ``reorder_wait_s`` while none of its earlier frames is in the
        verifier (being authenticated, waiting or running: it is coming); ``body_timeout_s`` at most.
        """
        if self.service is None:
            raise WireError(ErrorCode.NOT_READY, self.load_error or "the target model is still loading")
        # The session id and seq, unauthenticated, only schedule: one call per session per worker cycle, and
        # a frame waiting for an earlier one that is here (forged ones can only make it wait its longest).
        plain = parse_header(frame, self.service.limits)
        key = plain.session_id
        self._arrive(key, plain.seq)
        try:
            arrived = time.perf_counter() if arrived is None else arrived
            result = await self.run(self.service.open_and_dispatch, frame, more_coming, arrived, key=key)
            if isinstance(result, Early):
                session, header = result.session, result.header
                # Held frames count in the memory budget; one that would take it over is not held (it runs
                # at once, as after a gap: a batch out of order is refused and the edge resends, lossless).
                size = max(len(frame), _body_bytes(result.body))
                hold = self.service.memory_bytes + size <= self.settings.max_memory_bytes
                self.early_bytes += size if hold else 0
                try:
                    async with self.order:
                        # Wait until this session has made no progress for reorder_wait_s, counted from the
                        # later of this wait's start and the session's last progress (or the last sight of
                        # an earlier frame of it in the verifier). The condition is notified whenever any
                        # session's frame ends: those wake-ups re-check, they never restart the clock (else
                        # a gap -- a frame refused with 429 or 408 before it was authenticated never
                        # advances next_seq -- would wait for a lull of every session).
                        clock = asyncio.get_running_loop()
                        start = clock.time()
                        seen, progress = session.next_seq, start
                        while hold and session.next_seq < header.seq:
                            now = clock.time()
                            if session.next_seq != seen or self._coming(key, session.next_seq, header.seq):
                                seen, progress = session.next_seq, now
                            left = min(progress + self.settings.reorder_wait_s,
                                       start + self.settings.body_timeout_s) - now
                            if left <= 0:
                                break
                            try:
                                await asyncio.wait_for(self.order.wait(), left)
                            except TimeoutError:
                                pass
                finally:
                    self.early_bytes -= size if hold else 0
                result = await self.run(self.service.dispatch_steps, session, header, result.body, more_coming,
                                        arrived, key=key)
            return result
        finally:
            self._leave(key, plain.seq)
            async with self.order:
                self.order.notify_all()

    def _arrive(self, session_id: bytes, seq: int) -> None:
        """A frame of `session_id` numbered `seq` is in the verifier (until ``_leave``)."""
        self.arriving.setdefault(session_id, collections.Counter())[seq] += 1

    def _leave(self, session_id: bytes, seq: int) -> None:
        held = self.arriving.get(session_id)
        if held is not None:
            held[seq] -= 1
            if held[seq] <= 0:
                del held[seq]
            if not held:
                del self.arriving[session_id]

    def _coming(self, session_id: bytes, first: int, seq: int) -> bool:
        """Is a frame of `session_id` numbered from `first` (the session's next) to below `seq` in the
        verifier? It will advance the session (an older one, a replay, will not)."""
        return any(first <= s < seq for s in self.arriving.get(session_id, ()))

    async def body(self, request: Request, content_type: str, limit: int) -> bytes:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != content_type:
            raise WireError(ErrorCode.UNSUPPORTED_MEDIA, f"send this endpoint {content_type}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise WireError(ErrorCode.PAYLOAD_TOO_LARGE, f"body exceeds {limit} bytes", limit=limit)
        data = bytearray()
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):     # a trickling body holds nothing long
                async for chunk in request.stream():
                    data += chunk
                    if len(data) > limit:
                        raise WireError(ErrorCode.PAYLOAD_TOO_LARGE, f"body exceeds {limit} bytes", limit=limit)
        except TimeoutError:
            raise _body_timeout(self.settings.body_timeout_s) from None
        return bytes(data)

    async def housekeeping(self) -> None:
        """Every second: the service's timeouts and budget (no frame need arrive for an unfinished round's
        rows to go), and connections idle without a request past ``body_timeout_s`` are closed."""
        seen: dict[int, tuple] = {}
        while True:
            await asyncio.sleep(min(1.0, self.settings.round_timeout_s / 2))
            if self.service is not None:
                try:
                    await asyncio.wrap_future(self.worker.submit(self.service.housekeep))
                except RuntimeError:          # the worker has stopped: shutting down
                    return
                except Exception as exc:
                    log.error("housekeeping failed: %s: %s", type(exc).__name__, exc)
            if self.connections is not None:
                seen = self._close_idle(seen)

    def _close_idle(self, seen: dict[int, tuple]) -> dict[int, tuple]:
        """Close connections without a request in progress for too long: ``body_timeout_s`` for one that
        never sent a whole request head, that plus uvicorn's keep-alive timeout between requests (uvicorn
        closes idle keep-alive connections itself; one still open sent part of a head, which stopped
        that timer). uvicorn has no deadline on request heads of its own."""
        now, alive = time.monotonic(), {}
        for conn in list(self.connections()):
            cycle = getattr(conn, "cycle", None)
            if cycle is not None and not getattr(cycle, "response_complete", True):
                continue                      # a request in progress: the body deadline bounds it
            held = seen.get(id(conn))
            first = held[1] if held is not None and held[0] is conn and held[2] is cycle else now
            alive[id(conn)] = (conn, first, cycle)
            limit = self.settings.body_timeout_s + (self.keep_alive_s if cycle is not None else 0.0)
            transport = getattr(conn, "transport", None)
            if now - first > limit and transport is not None and not transport.is_closing():
                transport.close()
                log.info("closed a connection idle without a request for %.0f s", now - first)
        return alive


def _whole_seconds(seconds: object, default: int) -> int:
    """A ``Retry-After`` header value: `seconds` rounded up to a whole number (`default` if not a number)."""
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds):
        return max(0, math.ceil(seconds))
    return default


def _body_timeout(seconds: float) -> WireError:
    return WireError(ErrorCode.REQUEST_TIMEOUT, f"the request body did not arrive within {seconds:g} s")


def _body_bytes(obj, depth: int = 0) -> int:
    """About what a decoded frame body holds (its bytes and strings; bodies are bounded by the codec)."""
    if isinstance(obj, (bytes, bytearray, str)):
        return len(obj)
    if depth > 8:
        return 0
    if isinstance(obj, dict):
        return sum(_body_bytes(k, depth + 1) + _body_bytes(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_body_bytes(v, depth + 1) for v in obj) + 8 * len(obj)
    return 8


def create_app(load_target: Callable[[], Target], settings: VerifierSettings | None = None, *,
               static_key: StaticKey | None = None, psk: bytes | None = None) -> FastAPI:
    """Build the ASGI app; the target is loaded in the background so liveness answers at once."""
    settings = settings or VerifierSettings()
    if static_key is None and psk is None:
        raise ValueError("create_app needs static_key (edges pin its public half) or psk")
    state = VerifierApp(load_target, settings, static_key, psk)

    async def lifespan(app: FastAPI):
        if state.service is None:     # not loaded beforehand (a Ray replica loads before serving)
            threading.Thread(target=state.load, name="load-target", daemon=True).start()
        housekeeping = asyncio.get_running_loop().create_task(state.housekeeping())
        yield
        housekeeping.cancel()
        state.worker.stop()

    app = FastAPI(title="PipeSD verifier", lifespan=lifespan)
    app.state.verifier = state

    class RequestAccounting:
        """The bound on open POSTs and the request counters, as plain ASGI middleware: Starlette's
        ``@app.middleware("http")`` (BaseHTTPMiddleware) runs every request as a task of its own behind
        memory streams, which costs each of a session's rounds a little on its round trip."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            t0, status = time.perf_counter(), 500      # 500 until a response starts (the app raised)

            async def sending(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                if scope["method"] != "POST":   # health, metrics, info: never held back by the bound below
                    await self.app(scope, receive, sending)
                elif state.open_requests >= state.max_open_requests:
                    # Bodies still arriving (or waiting for the model) are bounded: refuse before reading this
                    # one, and close the connection so that its file descriptor is free at once.
                    state.metrics.rejections.labels(ErrorCode.OVERLOADED.value).inc()
                    refusal = _error(ErrorCode.OVERLOADED, "too many requests open; retry later",
                                     headers={"Retry-After": str(settings.retry_after_s), "Connection": "close"})
                    await refusal(scope, receive, sending)
                else:
                    state.open_requests += 1
                    state.metrics.open_requests.set(state.open_requests)
                    try:
                        await self.app(scope, receive, sending)
                    finally:
                        state.open_requests -= 1
                        state.metrics.open_requests.set(state.open_requests)
            finally:
                endpoint = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
                state.metrics.requests.labels(endpoint, str(status)).inc()
                state.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t0)

    app.add_middleware(RequestAccounting)

    @app.exception_handler(WireError)
    async def wire_error(request: Request, exc: WireError):
        state.metrics.rejections.labels(exc.code.value).inc()
        headers = None
        if exc.code is ErrorCode.OVERLOADED:   # HTTP's Retry-After is whole seconds; the body says it exactly
            headers = {"Retry-After": str(_whole_seconds(exc.details.get("retry_after_s"), settings.retry_after_s))}
        if exc.code is ErrorCode.REQUEST_TIMEOUT:   # the rest of the body is not read: the connection goes
            headers = {"Connection": "close"}
        return JSONResponse(exc.to_dict(), status_code=exc.code.http_status, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, exc: ClientDisconnect):
        # The client went away mid-request: its fault or its network's, not ours. One line, no traceback,
        # counted under 499 (nginx's "client closed request"), never as a 500.
        state.metrics.disconnects.inc()
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(ErrorCode.MALFORMED, "request does not match the endpoint")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__)
        return _error(ErrorCode.INTERNAL, "internal verifier error")

    @app.get("/health/live")
    async def live():
        return {"status": "live"}

    @app.get(READY_PATH)
    async def ready():
        if state.service is None:
            return _error(ErrorCode.NOT_READY, state.load_error or "the target model is still loading")
        return {"status": "ready", "model": state.service.target.name}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/info")
    async def info():
        return await state.run(lambda: state.service.info())

    @app.post(HANDSHAKE_PATH)
    async def handshake(request: Request):
        # Per-source rate limits first (service.py holds no state for a handshake until its client proves
        # its keys; this bounds the work and the pending table a single source can take).
        retry = state.handshakes.admit(request.client.host if request.client else None,
                                       request.headers.get(AFFINITY_HEADER))
        if retry:
            state.metrics.rejections.labels(ErrorCode.OVERLOADED.value).inc()
            return _error(ErrorCode.OVERLOADED, "too many handshakes from this client; retry later",
                          headers={"Retry-After": str(retry)})
        hello = decode(await state.body(request, MEDIA_MSGPACK, HANDSHAKE_LIMITS.max_body_bytes), HANDSHAKE_LIMITS)
        return Response(encode(await state.handshake(hello)), media_type=MEDIA_MSGPACK)

    @app.post(FRAMES_PATH)
    async def frames(request: Request):
        frame = await state.body(request, MEDIA_FRAME, settings.max_frame_bytes)
        status, reply, _ = await state.in_order(frame)
        return Response(reply, status_code=status, media_type=MEDIA_FRAME)

    @app.post(ROUNDS_PATH)
    async def rounds(request: Request):
        """A round streamed as length-prefixed frames in one request body: batches are staged as they
        arrive, and the reply to the first frame that is not acknowledged (the final batch's RESULT,
        or an ERROR) answers the request. Each frame must arrive within ``body_timeout_s`` of the request's
        start or of the frame before it (the stream lasts as long as the edge drafts; a trickle does not)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != MEDIA_STREAM:
            raise WireError(ErrorCode.UNSUPPORTED_MEDIA, f"send this endpoint {MEDIA_STREAM}")
        buf, frames = bytearray(), 0
        stream, clock = request.stream(), asyncio.get_running_loop()
        deadline = clock.time() + settings.body_timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(stream, None)
            except TimeoutError:
                raise _body_timeout(settings.body_timeout_s) from None
            if chunk is None:
                break
            buf += chunk
            # A frame completed by this chunk arrived now, though it may wait in `buf` behind an earlier
            # frame's pass: that wait is the verifier's (queue_ms), not the link's.
            arrived = time.perf_counter()
            while len(buf) >= 4:
                size = int.from_bytes(buf[:4], "big")
                if size > settings.max_frame_bytes:
                    raise WireError(ErrorCode.PAYLOAD_TOO_LARGE, "frame exceeds the size limit")
                if len(buf) < 4 + size:
                    break
                frame, buf = bytes(buf[4: 4 + size]), buf[4 + size:]
                frames += 1
                if frames > settings.max_draft + 1:
                    raise WireError(ErrorCode.BATCH_TOO_LARGE, "more frames in one round than draft tokens allowed")
                # Batches that arrived while the target was busy are staged together and run once.
                more = len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big")
                status, reply, kind = await state.in_order(frame, more_coming=more, arrived=arrived)
                if kind != FrameType.ACK:
                    return Response(reply, status_code=status, media_type=MEDIA_FRAME)
                deadline = clock.time() + settings.body_timeout_s
            if len(buf) > settings.max_frame_bytes + 4:
                raise WireError(ErrorCode.PAYLOAD_TOO_LARGE, "frame exceeds the size limit")
        raise WireError(ErrorCode.BAD_FRAME, "the round ended before its final batch")

    return app


KNOWN_PATHS = {HANDSHAKE_PATH, FRAMES_PATH, ROUNDS_PATH, "/v1/info", "/metrics", "/health/live", READY_PATH}
