"""Error codes shared by both ends: the verifier sends them, the edge maps them to exceptions."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Machine-readable error codes, each with the HTTP status the verifier answers with."""

    MALFORMED = "malformed"                  # body is not a valid message
    RESYNC = "resync"                        # the verifier's committed prefix differs: resend it
    VOCAB_MISMATCH = "vocab_mismatch"        # draft and target tokenizers differ
    DRAFT_TOO_LONG = "draft_too_long"        # more draft tokens than the verifier accepts per round
    CONTEXT_OVERFLOW = "context_overflow"    # prefix + draft longer than the target's context
    BAD_TOKEN_ID = "bad_token_id"            # a token id outside the target's vocabulary
    PAYLOAD_TOO_LARGE = "payload_too_large"  # body bigger than the verifier's limit
    UNSUPPORTED_MEDIA = "unsupported_media"  # wrong content type
    NOT_READY = "not_ready"                  # model still loading
    BAD_FRAME = "bad_frame"                  # frame header or layout invalid (before authentication)
    UNAUTHENTICATED = "unauthenticated"      # unknown session or failed tag: handshake again (the edge: session lost)
    REPLAY = "replay"                        # a frame sequence number seen before or too old
    HANDSHAKE_FAILED = "handshake_failed"    # the key exchange could not complete
    OVERLOADED = "overloaded"                # too many requests in flight: retry after a delay
    BATCH_TOO_LARGE = "batch_too_large"      # more tokens in one frame than allowed
    REQUEST_TIMEOUT = "request_timeout"      # the request body did not arrive in time (the connection is closed)
    TREE_UNSUPPORTED = "tree_unsupported"    # a token tree this verifier cannot verify (its target, sampling, size)
    INTERNAL = "internal"                    # a fault of the verifier, never of the input

    @property
    def http_status(self) -> int:
        return _STATUS[self]


_STATUS = {
    ErrorCode.MALFORMED: 400,
    ErrorCode.RESYNC: 409,
    ErrorCode.VOCAB_MISMATCH: 409,
    ErrorCode.DRAFT_TOO_LONG: 422,
    ErrorCode.CONTEXT_OVERFLOW: 422,
    ErrorCode.BAD_TOKEN_ID: 422,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA: 415,
    ErrorCode.NOT_READY: 503,
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.REPLAY: 403,
    ErrorCode.HANDSHAKE_FAILED: 400,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.BATCH_TOO_LARGE: 422,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.TREE_UNSUPPORTED: 422,
    ErrorCode.INTERNAL: 500,
}


class WireError(Exception):
    """A message that cannot be decoded or violates the contract; carries its error code."""

    def __init__(self, code: ErrorCode, message: str, **details):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def to_dict(self) -> dict:
        return {"error": {"code": self.code.value, "message": self.message, **self.details}}
