"""Verifier limits: every bound is a named, documented setting."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VerifierSettings:
    max_draft: int = 64              # draft tokens per NAV round (422 draft_too_long beyond)
    max_body_bytes: int = 1 << 20    # request body (413 payload_too_large beyond)
    max_sessions: int = 256          # sessions held in RAM; the least recently used is evicted
    session_ttl_s: float = 900.0     # idle sessions are dropped after this long
    max_context: int | None = None   # cap below the target's own context length (None = the model's)
