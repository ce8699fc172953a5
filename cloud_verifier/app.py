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
import logging
import threading
import time
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from privacy import (FRAMES_PATH, HANDSHAKE_PATH, MEDIA_FRAME, MEDIA_MSGPACK, MEDIA_STREAM, READY_PATH,
    ROUNDS_PATH, ErrorCode, FrameType, StaticKey, WireError, decode, encode, parse_header)
from privacy.codec import DecodeLimits

from .batching import ModelWorker
from .metrics import Metrics
from .service import Early, VerifierService
from .settings import VerifierSettings
from .target import ModelLoadError, Target

log = logging.getLogger("cloud_verifier")
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
        self.in_flight = 0
        self.worker = ModelWorker(max_batch=settings.max_batch, max_wait_s=settings.batch_wait_s,
                                  in_flight=lambda: self.in_flight, metrics=self.metrics)
        self.order = asyncio.Condition()
        self._load = lambda: VerifierService(load_target(), settings, static_key=static_key, psk=psk,
                                             metrics=self.metrics)

    def load(self) -> None:
        try:
            service = self._load()
            self.worker.logits_many = service.target.logits_many
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

        `fn` may be a dispatch generator: its target passes are batched with other sessions'."""
        if self.service is None:
            raise WireError(ErrorCode.NOT_READY, self.load_error or "the target model is still loading")
        if self.in_flight >= self.settings.max_in_flight:
            raise WireError(ErrorCode.OVERLOADED, "too many requests in flight; retry later")
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        try:
            return await asyncio.wrap_future(self.worker.submit(fn, *args, key=key))
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)

    async def in_order(self, frame: bytes, more_coming: bool = False, arrived: float | None = None):
        """Authenticate a frame and run it once the session's earlier frames have run.

        A round's stream and the next (proactive) round's stream travel on different connections
        and may interleave on arrival; the edge numbers frames in the order it sends them, so
        waiting for the sequence number restores that order. The usual in-order frame is
        authenticated and dispatched in one trip to the model worker (so in one batching cycle).
        Only authenticated frames wait, and a gap (a frame that never comes) is skipped once the
        session has made no progress for ``reorder_wait_s``.
        """
        if self.service is None:
            raise WireError(ErrorCode.NOT_READY, self.load_error or "the target model is still loading")
        # The session id, unauthenticated, only schedules: one call per session per worker cycle.
        key = parse_header(frame, self.service.limits).session_id
        try:
            arrived = time.perf_counter() if arrived is None else arrived
            result = await self.run(self.service.open_and_dispatch, frame, more_coming, arrived, key=key)
            if isinstance(result, Early):
                session, header = result.session, result.header
                async with self.order:
                    while session.next_seq < header.seq:
                        before = session.next_seq
                        try:
                            await asyncio.wait_for(self.order.wait(), self.settings.reorder_wait_s)
                        except asyncio.TimeoutError:
                            if session.next_seq == before:
                                break
                result = await self.run(self.service.dispatch_steps, session, header, result.body, more_coming,
                                        arrived, key=key)
            return result
        finally:
            async with self.order:
                self.order.notify_all()

    async def body(self, request: Request, content_type: str, limit: int) -> bytes:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != content_type:
            raise WireError(ErrorCode.UNSUPPORTED_MEDIA, f"send this endpoint {content_type}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise WireError(ErrorCode.PAYLOAD_TOO_LARGE, f"body exceeds {limit} bytes", limit=limit)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise WireError(ErrorCode.PAYLOAD_TOO_LARGE, f"body exceeds {limit} bytes", limit=limit)
        return bytes(data)


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
        yield
        state.worker.stop()

    app = FastAPI(title="PipeSD verifier", lifespan=lifespan)
    app.state.verifier = state

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path if request.url.path in KNOWN_PATHS else "other"
        state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        state.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(WireError)
    async def wire_error(request: Request, exc: WireError):
        state.metrics.rejections.labels(exc.code.value).inc()
        headers = {"Retry-After": str(settings.retry_after_s)} if exc.code is ErrorCode.OVERLOADED else None
        return JSONResponse(exc.to_dict(), status_code=exc.code.http_status, headers=headers)

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
        hello = decode(await state.body(request, MEDIA_MSGPACK, HANDSHAKE_LIMITS.max_body_bytes), HANDSHAKE_LIMITS)
        return Response(encode(await state.run(lambda: state.service.handshake(hello))), media_type=MEDIA_MSGPACK)

    @app.post(FRAMES_PATH)
    async def frames(request: Request):
        frame = await state.body(request, MEDIA_FRAME, settings.max_frame_bytes)
        status, reply, _ = await state.in_order(frame)
        return Response(reply, status_code=status, media_type=MEDIA_FRAME)

    @app.post(ROUNDS_PATH)
    async def rounds(request: Request):
        """A round streamed as length-prefixed frames in one request body: batches are staged as they
        arrive, and the reply to the first frame that is not acknowledged (the final batch's RESULT,
        or an ERROR) answers the request."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != MEDIA_STREAM:
            raise WireError(ErrorCode.UNSUPPORTED_MEDIA, f"send this endpoint {MEDIA_STREAM}")
        buf, frames = bytearray(), 0
        async for chunk in request.stream():
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
            if len(buf) > settings.max_frame_bytes + 4:
                raise WireError(ErrorCode.PAYLOAD_TOO_LARGE, "frame exceeds the size limit")
        raise WireError(ErrorCode.BAD_FRAME, "the round ended before its final batch")

    return app


KNOWN_PATHS = {HANDSHAKE_PATH, FRAMES_PATH, ROUNDS_PATH, "/v1/info", "/metrics", "/health/live", READY_PATH}
