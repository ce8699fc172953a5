"""Exceptions the SDK raises. Every failure an app can meet has its own type."""

from __future__ import annotations


class PipeSDError(Exception):
    """Base class of every error raised by edge_sdk."""


class ConfigError(PipeSDError, ValueError):
    """An argument or setting the SDK cannot work with (bad mode, k < 1, missing model file...)."""


class VerifierError(PipeSDError):
    """The verifier answered with an error; ``code`` is its machine-readable error code."""

    def __init__(self, status: int, code: str, message: str, details: dict | None = None):
        super().__init__(f"verifier error {status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details or {}


class VocabMismatchError(VerifierError):
    """Draft and target tokenizers differ: their token ids do not mean the same text."""


class VerifierUnavailable(PipeSDError):
    """The verifier could not be reached (connection refused, timeout, broken response)."""


class PromptTooLongError(ConfigError):
    """The prompt leaves no room to generate within the models' context."""
