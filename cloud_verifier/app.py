"""FastAPI surface of the verifier: msgpack bodies in and out, JSON errors with a typed code.

Model work runs on a single worker thread (the target is not re-entrant and the
machine's cores belong to one forward pass at a time); the event loop only parses,
validates and routes. Errors from bad input are 4xx with a machine-readable code,
never a 500 or a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from privacy import ErrorCode, OpenSession, VerifyRequest, WireError, decode, encode
from privacy.codec import DecodeLimits

from .service import VerifierService
from .settings import VerifierSettings
from .target import Target

log = logging.getLogger("cloud_verifier")
MSGPACK = "application/msgpack"
ACCEPTED_TYPES = {MSGPACK, "application/x-msgpack"}


def _error(code: ErrorCode, message: str, **details) -> JSONResponse:
    return JSONResponse(WireError(code, message, **details).to_dict(), status_code=code.http_status)


class VerifierApp:
    """Owns the service, the model worker thread and the readiness flag."""

    def __init__(self, load_target: Callable[[], Target], settings: VerifierSettings):
        self.settings = settings
        self.limits = DecodeLimits(max_body_bytes=settings.max_body_bytes, max_bin_bytes=settings.max_body_bytes)
        self.service: VerifierService | None = None
        self.load_error: str | None = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target")
        self._load_target = load_target

    def load(self) -> None:
        try:
            self.service = VerifierService(self._load_target(), self.settings)
            log.info("target %s ready", self.service.target.name)
        except Exception as exc:  # reported by /health/ready, not swallowed
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the target failed")

    async def run(self, fn, *args):
        if self.service is None:
            raise WireError(ErrorCode.NOT_READY, self.load_error or "the target model is still loading")
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def body(self, request: Request) -> dict:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ACCEPTED_TYPES:
            raise WireError(ErrorCode.UNSUPPORTED_MEDIA, f"send bodies as {MSGPACK}")
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise WireError(ErrorCode.PAYLOAD_TOO_LARGE, f"body exceeds {limit} bytes", max_body_bytes=limit)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise WireError(ErrorCode.PAYLOAD_TOO_LARGE, f"body exceeds {limit} bytes", max_body_bytes=limit)
        return decode(bytes(data), self.limits)


def create_app(load_target: Callable[[], Target], settings: VerifierSettings | None = None) -> FastAPI:
    """Build the ASGI app; the target is loaded in the background so liveness answers at once."""
    state = VerifierApp(load_target, settings or VerifierSettings())

    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="load-target", daemon=True).start()
        yield
        state.worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="PipeSD verifier", lifespan=lifespan)
    app.state.verifier = state

    @app.exception_handler(WireError)
    async def wire_error(request: Request, exc: WireError):
        return JSONResponse(exc.to_dict(), status_code=exc.code.http_status)

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

    @app.get("/health/ready")
    async def ready():
        if state.service is None:
            return _error(ErrorCode.NOT_READY, state.load_error or "the target model is still loading")
        return {"status": "ready", "model": state.service.target.name}

    @app.get("/v1/info")
    async def info():
        return await state.run(lambda: state.service.info())

    @app.post("/v1/sessions")
    async def open_session(request: Request):
        req = OpenSession.from_dict(await state.body(request))
        opened = await state.run(lambda: state.service.open_session(req))
        return Response(encode(opened.to_dict()), media_type=MSGPACK)

    @app.post("/v1/sessions/{session_id}/verify")
    async def verify(session_id: str, request: Request):
        req = VerifyRequest.from_dict(await state.body(request))
        result = await state.run(lambda: state.service.verify(session_id, req))
        return Response(encode(result.to_dict()), media_type=MSGPACK)

    @app.delete("/v1/sessions/{session_id}")
    async def close_session(session_id: str):
        await state.run(lambda: state.service.close_session(session_id))
        return Response(status_code=204)

    return app
