"""The OpenAI-compatible HTTP surface of ``pipesd serve`` (FastAPI).

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as
server-sent events ending in ``data: [DONE]``, or whole), ``GET /health``, ``GET /metrics``.
Every answer that is not a success is OpenAI's error object with a 4xx status (5xx only for a
verifier failure or a bug, never for bad input). A request runs through the ``EdgeClient`` on the
drafter's worker (runner.py); its ``usage`` carries a ``pipesd`` object saying how it was decoded
and which output tokens the target never verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..client import EdgeClient
from ..engine import TokenEvent
from ..errors import ConfigError, OverloadTimeout, PipeSDError, PromptTooLongError, VerifierError
from ..stats import GenerationStats
from ..chat import ChatTemplate, TemplateError
from .metrics import ServeMetrics
from .requests import APIError, ChatRequest, CompletionRequest, parse
from .runner import DraftRunner, Job, QueueFull

log = logging.getLogger("pipesd.serve")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass
class ServeConfig:
    model_id: str
    mode: str
    api_key: str | None = None
    max_queue: int = 16
    max_body_bytes: int = 1 << 20


@dataclass
class _Output:
    """What a request has produced so far, and which of its tokens were verified."""

    text: list[str] = field(default_factory=list)
    tokens: int = 0
    verified: int = 0
    unverified_ranges: list[list[int]] = field(default_factory=list)   # [start, end) output token indices

    def add(self, event: TokenEvent) -> None:
        self.text.append(event.text)
        if event.token is None:
            return
        if event.verified:
            self.verified += 1
        elif self.unverified_ranges and self.unverified_ranges[-1][1] == self.tokens:
            self.unverified_ranges[-1][1] += 1
        else:
            self.unverified_ranges.append([self.tokens, self.tokens + 1])
        self.tokens += 1

    def pipesd(self, stats: GenerationStats, private: bool) -> dict:
        return {
            "mode": stats.mode, "private": private, "nav_rounds": stats.nav_rounds,
            "draft_tokens": stats.draft_n, "accepted_tokens": stats.draft_n_accepted,
            "acceptance_rate": round(stats.acceptance_rate, 4),
            "mean_acceptance_length": round(stats.mean_acceptance_length, 3),
            "verified_tokens": self.verified, "unverified_tokens": self.tokens - self.verified,
            "unverified_ranges": self.unverified_ranges, "offline_s": round(stats.offline_s, 4),
            "breaker_trips": stats.breaker_trips, "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down,
            "ttft_s": round(stats.ttft_s, 4), "total_s": round(stats.total_s, 4),
        }

    def usage(self, stats: GenerationStats, private: bool) -> dict:
        return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": self.tokens,
                "total_tokens": stats.prompt_tokens + self.tokens, "pipesd": self.pipesd(stats, private)}


def create_app(client: EdgeClient, config: ServeConfig) -> FastAPI:
    metrics = ServeMetrics(config.mode, client)
    runner = DraftRunner(client, config.max_queue, on_finish=metrics.finished)
    template = ChatTemplate.for_drafter(client.drafter)
    n_ctx = client.drafter.max_context
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        runner.close()

    app = FastAPI(title="pipesd serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.runner, app.state.metrics, app.state.template = runner, metrics, template

    # -- errors: always OpenAI's object -------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.rejected.labels(str(exc.status)).inc()
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), exc.status_code,
                            headers=exc.headers)         # a 405's Allow

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(APIError(500, "internal error", type="server_error").body(), 500)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")

    async def body_of(request: Request) -> object:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > config.max_body_bytes):
            raise APIError(413, f"the request body exceeds {config.max_body_bytes} bytes", code="body_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > config.max_body_bytes:
                    raise APIError(413, f"the request body exceeds {config.max_body_bytes} bytes",
                                   code="body_too_large")
                chunks.append(chunk)
        except ClientDisconnect:          # gone before its body was complete: nobody to answer, no crash to log
            raise APIError(400, "the client closed the connection before its body was complete",
                           code="client_disconnected") from None
        try:
            body = json.loads(b"".join(chunks))
            # JSON may spell lone surrogates ("\ud800"), which no tokenizer can encode.
            json.dumps(body, ensure_ascii=False).encode("utf-8")
            return body
        except (ValueError, RecursionError):
            raise APIError(400, "the request body is not valid JSON (or holds text that is not Unicode)",
                           code="invalid_json") from None

    def check_model(name: str) -> None:
        if name != config.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {config.model_id!r}",
                           param="model", code="model_not_found")

    # -- routes -----------------------------------------------------------------------------
    @app.get("/health")
    def health():
        return {"status": "ok", "model": config.model_id, "mode": config.mode, "verifier": metrics.verifier_state(),
                "requests_running": runner.running, "requests_waiting": runner.waiting}

    @app.get("/metrics")
    def prometheus(request: Request):
        authorize(request)
        metrics.refresh(runner)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": config.model_id, "object": "model", "created": created, "owned_by": "pipesd"}

    @app.get("/v1/models")
    def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    def model(name: str, request: Request):
        authorize(request)
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = parse(CompletionRequest, await body_of(request))
        check_model(req.model)
        if isinstance(req.prompt, str):
            ids = client.tokenize(req.prompt)
        else:
            if any(not 0 <= t < client.drafter.vocab_size for t in req.prompt):
                raise APIError(400, f"prompt token ids must lie in [0, {client.drafter.vocab_size})", param="prompt",
                               code="invalid_value")
            ids = list(req.prompt)
        return await run(request, req, ids, req.max_tokens, req.stop, "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = parse(ChatRequest, await body_of(request))
        check_model(req.model)
        try:
            text = template.render([{"role": m.role, "content": m.text()} for m in req.messages])
        except TemplateError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None
        # The template's control tokens (<|im_start|> ...) are meant as such: parse special tokens,
        # as llama-cpp-python's chat formatter does (docs/serve.md says what that implies).
        ids = client.tokenize(text, parse_special=True)
        return await run(request, req, ids, req.token_limit, [*req.stop, *template.stop], "chat.completion",
                         "chatcmpl")

    # -- one generation -----------------------------------------------------------------------
    async def run(request: Request, req, ids: list[int], limit: int | None, stop: list[str], kind: str, prefix: str):
        room = n_ctx - len(ids)
        if room < 1 or (limit is not None and limit > room):
            asked = f"{len(ids)} in the prompt" + (f" + {limit} to generate" if limit is not None else "")
            raise APIError(400, f"this model's context is {n_ctx} tokens; the request needs {asked}",
                           param="messages" if kind == "chat.completion" else "prompt", code="context_length_exceeded")
        options = dict(max_new_tokens=limit or room, stop=stop, private=req.private, temperature=req.temperature,
                       top_p=req.top_p, top_k=req.top_k, seed=None if req.seed is None else req.seed % (1 << 63))
        job = Job(ids, options, asyncio.get_running_loop())
        try:
            runner.submit(job)
        except QueueFull as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None
        watch = asyncio.ensure_future(_disconnected(request))
        meta = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_id}
        events = _events(job, watch)
        if req.stream:       # headers go now: a queued request's wait shows as its time to first token
            return StreamingResponse(_stream(events, job, watch, req, kind, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            out, stats = _Output(), None
            async for item in events:
                if item[0] == "token":
                    out.add(item[1])
                else:
                    stats = item[1]
            if stats is None:                   # the client left: nobody to answer
                return Response(status_code=499)
            text, finish = "".join(out.text), FINISH.get(stats.finish_reason, "stop")
            choice = ({"index": 0, "text": text, "logprobs": None, "finish_reason": finish} if kind == "text_completion"
                      else {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                            "finish_reason": finish})
            return {**meta, "object": kind, "choices": [choice], "usage": out.usage(stats, req.private)}
        finally:
            job.cancel()
            watch.cancel()

    async def _stream(events, job: Job, watch: asyncio.Future, req, kind: str, meta: dict):
        chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
        extra = {"usage": None} if req.include_usage else {}

        def chunk(choice: dict | None, **fields) -> str:
            body = {**meta, "object": chunk_kind, "choices": [choice] if choice else [], **extra, **fields}
            return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if kind == "text_completion":
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        out = _Output()
        try:
            if kind != "text_completion":
                yield chunk(choice(None, None, first=True))
            async for item in events:
                if item[0] == "token":
                    event = item[1]
                    out.add(event)
                    if event.text:
                        yield chunk(choice(event.text, None), pipesd={"verified": event.verified})
                    continue
                stats = item[1]
                if stats is None:              # the client left
                    return
                info = out.pipesd(stats, req.private)
                yield chunk(choice(None, FINISH.get(stats.finish_reason, "stop")), pipesd=info)
                if req.include_usage:
                    extra.pop("usage")
                    yield chunk(None, usage=out.usage(stats, req.private))
            yield "data: [DONE]\n\n"
        except APIError as exc:                # failed mid-stream: the error object as the last event
            yield f"data: {json.dumps(exc.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()
            watch.cancel()

    async def _events(job: Job, watch: asyncio.Future):
        """The job's items until it ends: ("token", event)..., then ("done", stats); ("cancelled", None)
        when the client left (the job is told to stop). A failure becomes an ``APIError``."""
        while True:
            item = asyncio.ensure_future(job.events.get())
            await asyncio.wait({item, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not item.done():
                item.cancel()
                job.cancel()
                yield ("done", None)
                return
            kind, value = item.result()
            if kind == "error":
                raise _api_error_of(value)
            if kind == "cancelled":
                yield ("done", None)
                return
            yield (kind, value)
            if kind == "done":
                return

    return app


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the ASGI server says http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _api_error_of(exc: Exception) -> APIError:
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param="prompt", code="context_length_exceeded")
    if isinstance(exc, ConfigError):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, OverloadTimeout):
        # The verifier is up but busy past the NAV deadline: what OpenAI answers an overloaded engine,
        # with the wait it last asked for, so that a client's own retry policy backs off.
        retry = exc.retry_after_s if exc.retry_after_s is not None else 1.0
        return APIError(503, str(exc), type="server_error", code="verifier_overloaded",
                        headers={"Retry-After": str(max(1, math.ceil(retry)))})
    if isinstance(exc, VerifierError):
        return APIError(502, f"the cloud verifier refused the request: {exc}", type="server_error",
                        code="verifier_error")
    if isinstance(exc, PipeSDError):
        return APIError(502, str(exc), type="server_error", code="verifier_unavailable")
    log.error("generation failed", exc_info=exc)
    return APIError(500, "internal error during generation", type="server_error")
