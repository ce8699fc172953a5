"""The OpenAI request bodies ``pipesd serve`` accepts, and the error object it answers with.

Every field of the OpenAI API is either honoured, or refused with a 400 naming it: a client
must never believe a setting took effect when it did not. The only field accepted without
effect is ``user`` (an end-user id that OpenAI keeps for abuse monitoring; there is nobody to
report to here). Two extensions: ``private`` (keep this request on the device) and ``top_k``
(as llama.cpp's server has it).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class APIError(Exception):
    """An error answered as OpenAI answers them: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Unsupported(ValueError):
    """Raised inside validation for a field whose value this server cannot honour."""


def _refuse(name: str, value: Any, honoured: tuple) -> None:
    if value not in honoured:
        raise Unsupported(f"{name}={value!r} is not supported by pipesd serve")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)     # OpenAI's default: requests without it sample
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1 << 31)             # extension (llama.cpp's server); 0: off
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)     # int64 or uint64, as clients send them
    stop: str | list[str] = Field(default_factory=list)
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    private: bool = False                               # extension: no socket for this request

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _number(cls, v):         # strict mode refuses 1 for a float; JSON clients write 1 for 1.0
        if isinstance(v, int) and not isinstance(v, bool):
            try:
                return float(v)
            except OverflowError:    # 10**400: not a float at all; the range check names the field
                return float("inf") if v > 0 else float("-inf")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or ())
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence cannot be empty")
        return stops

    @model_validator(mode="after")
    def _honoured(self):
        _refuse("n", self.n, (1,))
        _refuse("presence_penalty", self.presence_penalty, (0.0,))
        _refuse("frequency_penalty", self.frequency_penalty, (0.0,))
        _refuse("logit_bias", self.logit_bias or None, (None,))
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)            # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise Unsupported("a list of several prompts (a batch) is not supported: send one per request")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v

    @model_validator(mode="after")
    def _completion_honoured(self):
        _refuse("echo", self.echo, (False,))
        _refuse("best_of", self.best_of, (None, 1))
        _refuse("suffix", self.suffix, (None,))
        _refuse("logprobs", self.logprobs, (None,))
        return self


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A turn of the conversation. ``name`` (a participant's name) is refused: neither the embedded pair's
    template nor SmolLM2's can show it, and dropping it would change what the model is told."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    @model_validator(mode="after")
    def _no_name(self):
        _refuse("name", self.name, (None,))
        return self

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)           # None: as much as the context leaves
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: Any = None

    @model_validator(mode="after")
    def _chat_honoured(self):
        _refuse("logprobs", self.logprobs, (False,))
        _refuse("top_logprobs", self.top_logprobs, (None,))
        for name in ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"):
            if getattr(self, name) not in (None, [], "none"):
                raise Unsupported(f"{name}: tool and function calling are not supported by pipesd serve")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse(model: type[BaseModel], body: Any) -> BaseModel:
    """Validate a decoded JSON body; the first problem becomes a 400 that names its field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        # loc names the field, then (in a union) the branch pydantic tried: "prompt", not "prompt.str".
        param = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or p.isidentifier()
                         and p not in _TYPE_NAMES) or None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        if err["type"] == "missing":
            raise APIError(400, f"missing required parameter: {param}", param=param,
                           code="missing_required_parameter") from None
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, Unsupported):
            param = ".".join(p for p in (param, _field_of(str(cause))) if p) or None     # messages.0.name
            raise APIError(400, str(cause), param=param,
                           code="unsupported_parameter") from None
        what = f"invalid value for {param}: " if param else "invalid request: "
        raise APIError(400, what + err["msg"].removeprefix("Value error, "), param=param,
                       code="invalid_value") from None


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_of(message: str) -> str | None:
    head = message.split("=", 1)[0].split(":", 1)[0]
    return head if head.isidentifier() else None
