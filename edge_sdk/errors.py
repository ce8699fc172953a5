"""Exceptions the SDK raises. Every failure an app can meet has its own type."""

from __future__ import annotations

import time

from privacy import ErrorCode


class PipeSDError(Exception):
    """Base class of every error raised by edge_sdk."""


class ConfigError(PipeSDError, ValueError):
    """An argument or setting the SDK cannot work with (bad mode, k < 1, missing model file...)."""


class VerifierError(PipeSDError):
    """The verifier answered with an error.

    ``code`` is the wire's machine-readable code: an ``ErrorCode`` member when this SDK knows it
    (compare with ``is``), else the string a newer verifier sent. ``status`` is the HTTP status.
    """

    def __init__(self, status: int, code: ErrorCode | str, message: str, details: dict | None = None):
        code = _known(code)
        value = code.value if isinstance(code, ErrorCode) else code
        super().__init__(f"verifier error {status} {value}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details or {}


def _known(code: ErrorCode | str) -> ErrorCode | str:
    try:
        return ErrorCode(code)
    except ValueError:
        return code


class SessionLost(VerifierError):
    """The verifier no longer holds this edge's session (it restarted, evicted it, or another replica
    answered): open a new session and resend the committed prefix. The engine does that by itself."""

    def __init__(self, status: int, message: str):
        super().__init__(status, ErrorCode.UNAUTHENTICATED, message)


class Overloaded(VerifierError):
    """The verifier answered ``429 overloaded``: too many requests in flight there, try again later.

    ``retry_after_s``: the wait it asked for (its ``Retry-After``), None when it named none. The engine
    waits (bounded, jittered) and retries by itself; past the NAV deadline the offline policy takes over
    (``OverloadTimeout``), so an app meets this only when it calls a ``Verifier`` itself."""

    def __init__(self, status: int, code: ErrorCode | str, message: str, details: dict | None = None,
                 retry_after_s: float | None = None):
        super().__init__(status, code, message, details)
        self.retry_after_s = retry_after_s
        self.at = time.monotonic()           # when the refusal came: Retry-After counts from here


class HandshakeFailed(VerifierError):
    """The verifier answered the handshake but could not prove it holds the pinned key (or shares the
    PSK): a wrong ``verifier_key`` / PSK, or another verifier at that address."""

    def __init__(self, url: str, reason: str):
        super().__init__(0, ErrorCode.HANDSHAKE_FAILED, reason)
        self.args = (f"handshake with the verifier at {url} failed ({reason}): is the verifier key (or PSK) "
                     f"the one this verifier printed?",)


class ModelLoadError(ConfigError):
    """A model file exists but cannot be loaded (corrupt, truncated, not a model of this runtime)."""


class VocabMismatchError(VerifierError):
    """Draft and target tokenizers differ: their token ids do not mean the same text."""


class VerifierUnavailable(PipeSDError):
    """The verifier could not be reached (connection refused, timeout, broken response)."""


class VerifierTimeout(VerifierUnavailable, TimeoutError):
    """The verifier did not answer within the deadline (it may be overloaded, or the link gone)."""


class OverloadTimeout(VerifierTimeout):
    """The verifier stayed overloaded (429) past the NAV deadline, waits and retries included: the offline
    policy applies as for an overdue NAV (``offline="fail"`` raises this). ``retry_after_s``: what it
    last asked for (the prober waits that long before its first probe)."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PromptTooLongError(ConfigError):
    """The prompt leaves no room to generate within the models' context."""
