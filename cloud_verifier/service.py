"""The verifier's core: sessions and NAV rounds, independent of HTTP.

Sessions are a cache: each holds the committed tokens and the target's KV cache for
them. A request that disagrees with what the session holds gets RESYNC and the edge
resends its prefix; the KV cache keeps the common prefix, so a resync costs little.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from privacy import ErrorCode, OpenSession, SessionOpened, VerifyRequest, VerifyResponse, WireError
from privacy.messages import vocab_fingerprint

from .nav import greedy_accept
from .settings import VerifierSettings
from .target import Target, TargetState


@dataclass
class Session:
    state: TargetState
    committed: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class ServiceCounters:
    sessions_opened: int = 0
    nav_rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    resyncs: int = 0


class VerifierService:
    """Not thread-safe: the HTTP layer runs every call on one model worker thread."""

    def __init__(self, target: Target, settings: VerifierSettings | None = None):
        self.target = target
        self.settings = settings or VerifierSettings()
        self.max_context = min(target.max_context, self.settings.max_context or target.max_context)
        self.fingerprint = vocab_fingerprint(target.vocab_tokens)
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.counters = ServiceCounters()

    def info(self) -> dict:
        return {"model": self.target.name, "vocab_size": self.target.vocab_size,
                "vocab_fingerprint": self.fingerprint, "max_draft": self.settings.max_draft,
                "max_context": self.max_context, "sessions": len(self.sessions)}

    # -- sessions ---------------------------------------------------------
    def open_session(self, req: OpenSession) -> SessionOpened:
        if req.vocab_fingerprint != self.fingerprint or req.vocab_size != self.target.vocab_size:
            raise WireError(ErrorCode.VOCAB_MISMATCH,
                            f"the draft's vocabulary (size {req.vocab_size}) differs from the target's "
                            f"(size {self.target.vocab_size}, model {self.target.name}): token ids would not mean "
                            "the same text", target_fingerprint=self.fingerprint)
        self._expire()
        while len(self.sessions) >= self.settings.max_sessions:
            self.sessions.popitem(last=False)
        session_id = secrets.token_hex(16)
        self.sessions[session_id] = Session(state=self.target.new_state())
        self.counters.sessions_opened += 1
        return SessionOpened(session_id, self.target.name, self.fingerprint, self.target.vocab_size,
                             self.target.eos_token_ids, self.settings.max_draft, self.max_context)

    def close_session(self, session_id: str) -> None:
        if self.sessions.pop(session_id, None) is None:
            raise WireError(ErrorCode.UNKNOWN_SESSION, "no such session on this verifier")

    def _session(self, session_id: str) -> Session:
        self._expire()
        session = self.sessions.get(session_id)
        if session is None:
            raise WireError(ErrorCode.UNKNOWN_SESSION, "no such session on this verifier (expired, evicted or "
                            "never opened): open a new one")
        self.sessions.move_to_end(session_id)
        session.last_used = time.monotonic()
        return session

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.settings.session_ttl_s
        for sid in [sid for sid, s in self.sessions.items() if s.last_used < cutoff]:
            del self.sessions[sid]

    # -- NAV ----------------------------------------------------------------
    def verify(self, session_id: str, req: VerifyRequest) -> VerifyResponse:
        session = self._session(session_id)
        self._check(session, req)
        t0 = time.perf_counter()
        committed = (session.committed[: req.base_len] if req.base_len else []) + list(req.append)
        logits = self.target.logits(session.state, committed + list(req.draft), first_row=len(committed) - 1)
        accepted, token = greedy_accept(req.draft, logits)
        # Rollback: the cache keeps the committed prefix and the accepted draft tokens; the
        # target's own token is fed at the start of the next round.
        self.target.rollback(session.state, len(committed) + accepted)
        session.committed = committed + list(req.draft[:accepted]) + [token]
        c = self.counters
        c.nav_rounds, c.draft_tokens, c.accepted_tokens = c.nav_rounds + 1, c.draft_tokens + len(req.draft), \
            c.accepted_tokens + accepted
        return VerifyResponse(accepted, token, len(session.committed), (time.perf_counter() - t0) * 1e3)

    def _check(self, session: Session, req: VerifyRequest) -> None:
        if req.base_len not in (0, len(session.committed)):
            self.counters.resyncs += 1
            raise WireError(ErrorCode.RESYNC, "the verifier holds a different committed prefix: resend it from 0",
                            committed_len=len(session.committed))
        if req.base_len + len(req.append) == 0:
            raise WireError(ErrorCode.MALFORMED, "a round needs at least one committed token")
        if len(req.draft) > self.settings.max_draft:
            raise WireError(ErrorCode.DRAFT_TOO_LONG,
                            f"{len(req.draft)} draft tokens exceed the limit of {self.settings.max_draft}",
                            max_draft=self.settings.max_draft)
        total = req.base_len + len(req.append) + len(req.draft)
        if total + 1 > self.max_context:
            raise WireError(ErrorCode.CONTEXT_OVERFLOW,
                            f"prefix and draft ({total} tokens) leave no room in the target's context of "
                            f"{self.max_context}", max_context=self.max_context)
        vocab = self.target.vocab_size
        if any(t >= vocab for t in req.append) or any(t >= vocab for t in req.draft):
            raise WireError(ErrorCode.BAD_TOKEN_ID, f"token ids must be below the vocabulary size {vocab}",
                            vocab_size=vocab)
