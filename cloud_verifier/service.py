"""The verifier's core: sealed sessions and NAV rounds, independent of HTTP.

Sessions are a cache, not state. Each holds a channel (keys from the handshake), the
committed tokens and the target's KV cache for them. A request names the committed
length and the hash of the committed prefix; a session that holds anything else (or
no session at all: restart, eviction, another replica) makes the edge resend its
prefix, and the KV cache keeps whatever common prefix it has, so that costs little.
Nothing here is written to disk, and no token content is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Generator

import numpy as np

from privacy import (
    BatchAck,
    ChannelLimits,
    SamplingParams,
    SparseDist,
    ErrorCode,
    FrameType,
    OpenSession,
    SecureChannel,
    SessionOpened,
    StaticKey,
    VerifyRequest,
    VerifyResponse,
    WireError,
    parse_header,
    prefix_hash,
    server_handshake,
)
from privacy.channel import Header
from privacy.messages import vocab_fingerprint

from .metrics import Metrics
from .nav import greedy_accept, greedy_accept_tree, speculative_accept
from .settings import VerifierSettings
from .target import PassJob, Target, TargetState

log = logging.getLogger("cloud_verifier")

# The memory budget's estimates of what Python objects cost (numpy rows and the target's KV are exact).
TOKEN_BYTES = 36            # one token id in a Python list: the pointer and the int object
SESSION_BYTES = 4096        # a session's fixed part: channel keys, replay windows, the objects themselves


@dataclass
class PendingRound:
    """Draft batches of a round that arrived before its final batch (the pipelined upload)."""

    round: int
    base: list[int]                                          # the committed prefix the round builds on
    named: tuple[int, bytes]                                 # (base_len, prefix_hash) its first batch named
    tokens: list[int] = field(default_factory=list)          # draft tokens staged so far
    parents: tuple[int, ...] = ()                            # a token tree's parent indices (empty: a chain)
    rows: list[np.ndarray] = field(default_factory=list)     # logits computed as batches arrived
    sampling: SamplingParams | None = None                    # the round's sampling (None: greedy)
    q: list[SparseDist] = field(default_factory=list)        # per staged token: the q it was drawn from
    touched: float = field(default_factory=time.monotonic)   # when a batch last arrived (round timeout)
    busy: bool = False                                       # a target pass for it is under way: rows stay
    rows_bytes: int = 0                                      # bytes of `rows` (the budget reads it per frame)
    q_bytes: int = 0                                         # bytes of `q`

    @property
    def rows_held(self) -> int:
        return sum(len(r) for r in self.rows)

    @property
    def staged_bytes(self) -> int:
        """What the round holds besides its logits rows: prefix and draft token ids, the draft's q."""
        return (len(self.base) + len(self.tokens)) * TOKEN_BYTES + self.q_bytes

    def add_rows(self, rows: np.ndarray) -> None:
        self.rows.append(rows)
        self.rows_bytes += rows.nbytes

    def drop_rows(self) -> bool:
        """Forget the logits computed so far (NAV recomputes them from the staged tokens); False if a
        pass is under way for this round (its rows will append to the list: it must not change)."""
        if self.busy or not self.rows:
            return False
        self.rows.clear()
        self.rows_bytes = 0
        return True


@dataclass
class Forward:
    """A target pass a dispatch needs: the worker runs those of concurrent sessions as one batch."""

    state: TargetState
    tokens: list[int]
    first_row: int
    parents: tuple[int, ...] = ()       # the last len(parents) tokens are a token tree (target.PassJob)


Steps = Generator[Forward, np.ndarray, tuple[int, bytes, FrameType]]


@dataclass
class Early:
    """An authenticated frame that overtook earlier frames of its session (another connection)."""

    session: "Session"
    header: Header
    body: dict


@dataclass
class Session:
    channel: SecureChannel
    state: TargetState | None = None          # set once the edge's OPEN is accepted
    committed: list[int] = field(default_factory=list)
    pending: PendingRound | None = None
    next_seq: int = 1                          # the frame sequence number the session expects next
    last_answer: tuple[int, bool] | None = None   # the last round answered: (its id, answered rebased?)
    last_used: float = field(default_factory=time.monotonic)


class VerifierService:
    """Not thread-safe: the HTTP layer runs every call on one model worker thread (``batching.py``).

    Target passes are not run here but yielded (``dispatch_steps``), so that the worker can
    run the passes of several sessions' frames as one batch; ``dispatch`` runs them one by one.
    """

    def __init__(self, target: Target, settings: VerifierSettings | None = None, *,
                 static_key: StaticKey | None = None, psk: bytes | None = None, metrics: Metrics | None = None):
        if static_key is None and psk is None:
            raise ValueError("the verifier needs a static key or a pre-shared key")
        self.target = target
        self.settings = s = settings or VerifierSettings()
        self.static_key, self.psk = static_key, psk
        self.metrics = metrics or Metrics()
        self.metrics.memory_budget.set(s.max_memory_bytes)
        self.limits = ChannelLimits(max_frame_bytes=s.max_frame_bytes, max_body_bytes=s.max_body_bytes,
                                    replay_window=s.replay_window, rekey_interval=s.rekey_interval)
        self.max_context = min(target.max_context, s.max_context or target.max_context)
        self.fingerprint = vocab_fingerprint(target.vocab_tokens)
        self.sessions: OrderedDict[bytes, Session] = OrderedDict()
        self.extra_bytes: Callable[[], int] = lambda: 0   # early frames the HTTP layer holds (app.py sets it)
        self.memory_bytes = 0                               # the last total (read by the HTTP layer's thread)
        self._fit_pool()
        # Handshakes answered whose client has not yet sealed a frame: (channel, when), oldest first.
        self.pending: OrderedDict[bytes, tuple[SecureChannel, float]] = OrderedDict()

    def info(self) -> dict:
        return {"model": self.target.name, "vocab_size": self.target.vocab_size,
                "vocab_fingerprint": self.fingerprint, "max_draft": self.settings.max_draft,
                "max_context": self.max_context, "sessions": len(self.sessions),
                "pending_handshakes": len(self.pending),
                "public_key": self.static_key.public_b64 if self.static_key else None}

    # -- handshake and frames ---------------------------------------------------------
    def expected_seq(self, session_id: bytes) -> int | None:
        """The next frame sequence number a session expects (None: no such session)."""
        session = self.sessions.get(session_id)
        return None if session is None else session.next_seq

    def handshake(self, hello: dict) -> dict:
        """Answer a ClientHello (WireError handshake_failed if it is malformed or refused).

        No state before proof: a handshake proves nothing about the client (anyone can send one, and
        a sniffed PSK hello can be replayed), so its channel does not become a session here. It waits
        in ``pending``, a table of its own bounded by ``max_pending_handshakes`` (the oldest dropped
        first) and ``handshake_ttl_s``, until the first frame sealed under its keys arrives
        (``open_frame``): that frame proves the client holds the keys (in PSK mode, the PSK), and only
        then is a session made, under the sessions' own eviction policy. A flood of handshakes can
        therefore push out other unproven handshakes, at worst, never an established session; its rate
        per client IP and per affinity token is bounded in front of this (``app.py``, 429).
        """
        reply, channel = server_handshake(hello, static=self.static_key, psk=self.psk, limits=self.limits)
        self._expire_pending()
        while len(self.pending) >= max(1, self.settings.max_pending_handshakes):
            self.pending.popitem(last=False)
            self.metrics.handshakes_unproven.inc()
        self.pending[channel.session_id] = (channel, time.monotonic())
        self._gauges()
        return reply

    def _expire_pending(self) -> None:
        cutoff = time.monotonic() - self.settings.handshake_ttl_s
        while self.pending and next(iter(self.pending.values()))[1] < cutoff:
            self.pending.popitem(last=False)
            self.metrics.handshakes_unproven.inc()

    def _establish(self, frame: bytes, session_id: bytes) -> tuple[Session, Header, dict]:
        """The first frame of a pending handshake: if it authenticates, the channel becomes a session.
        A frame that does not authenticate (or a session id never handed out) changes nothing."""
        self._expire_pending()
        entry = self.pending.get(session_id)
        if entry is None:
            raise WireError(ErrorCode.UNAUTHENTICATED, "unknown session: handshake again")
        header, body = entry[0].open(frame)
        del self.pending[session_id]
        self._evict(incoming=1)
        session = self.sessions[session_id] = Session(entry[0])
        self.metrics.sessions_opened.inc()
        return session, header, body

    def handle_frame(self, frame: bytes) -> tuple[int, bytes, FrameType]:
        """(HTTP status, sealed reply, reply type). Raises WireError before authentication (answered in plain text)."""
        return self.dispatch(*self.open_frame(frame))

    def dispatch(self, session: Session, header: Header, body: dict,
                 more_coming: bool = False, arrived: float | None = None) -> tuple[int, bytes, FrameType]:
        """``dispatch_steps`` with each target pass run on its own."""
        steps = self.dispatch_steps(session, header, body, more_coming, arrived)
        rows = None
        try:
            while True:
                job = steps.send(rows)
                rows = self.target.logits_many([PassJob(job.state, job.tokens, job.first_row, job.parents)])[0]
                if isinstance(rows, Exception):
                    raise rows
        except StopIteration as done:
            return done.value

    def open_and_dispatch(self, frame: bytes, more_coming: bool = False,
                          arrived: float | None = None) -> "Steps | Early":
        """Authenticate a frame and, if the session's earlier frames have all run, start dispatching it
        (returns the dispatch generator: one trip to the model worker, not two); an early frame comes
        back as ``Early`` for the caller to hold until its predecessors have run."""
        session, header, body = self.open_frame(frame)
        if session.next_seq < header.seq:
            return Early(session, header, body)
        return self.dispatch_steps(session, header, body, more_coming, arrived)

    def open_frame(self, frame: bytes) -> tuple[Session, Header, dict]:
        """Authenticate and decode a frame of a known session (WireError otherwise)."""
        header = parse_header(frame, self.limits)
        self._expire()
        session = self.sessions.get(header.session_id)
        if session is None:
            session, header, body = self._establish(frame, header.session_id)
        else:
            header, body = session.channel.open(frame)
        self.sessions.move_to_end(header.session_id)
        session.last_used = time.monotonic()
        return session, header, body

    def dispatch_steps(self, session: Session, header: Header, body: dict, more_coming: bool = False,
                       arrived: float | None = None) -> Steps:
        """Act on an authenticated frame; failures travel sealed in an ERROR frame.

        A generator: it yields each ``Forward`` it needs and is sent back the logits rows;
        its return value is (HTTP status, sealed reply, reply type).

        ``more_coming``: the next batch of the same stream has already arrived, so running the
        target on this one now would only add a forward pass: it is staged and run with the next.
        ``arrived``: when the frame reached the server (perf_counter), for the result's ``queue_ms``.
        """
        if self.sessions.get(header.session_id) is not session:   # dropped while this frame waited
            raise WireError(ErrorCode.UNAUTHENTICATED, "unknown session: handshake again")   # plain 401, as for any
        session.next_seq = max(session.next_seq, header.seq + 1)
        try:
            if header.type == FrameType.OPEN:
                reply_type, reply = FrameType.OPENED, self._open(session, OpenSession.from_dict(body)).to_dict()
            elif header.type == FrameType.VERIFY:
                result = yield from self._verify(session, VerifyRequest.from_dict(body), eager=not more_coming,
                                                 arrived=arrived)
                reply_type = FrameType.ACK if isinstance(result, BatchAck) else FrameType.RESULT
                reply = result.to_dict()
            elif header.type == FrameType.CLOSE:
                self._drop(header.session_id)
                reply_type, reply = FrameType.CLOSED, {}
            else:
                raise WireError(ErrorCode.BAD_FRAME, "this frame type is not accepted by the verifier")
            status = 200
        except WireError as exc:
            self.metrics.rejections.labels(exc.code.value).inc()
            status, reply_type, reply = exc.code.http_status, FrameType.ERROR, exc.to_dict()
        finally:
            self._gauges()
        return status, session.channel.seal(reply_type, reply, ack=header.seq), reply_type

    # -- sessions ---------------------------------------------------------------------
    def _open(self, session: Session, req: OpenSession) -> SessionOpened:
        if req.vocab_fingerprint != self.fingerprint or req.vocab_size != self.target.vocab_size:
            raise WireError(ErrorCode.VOCAB_MISMATCH,
                            f"the draft's vocabulary (size {req.vocab_size}) differs from the target's "
                            f"(size {self.target.vocab_size}, model {self.target.name}): token ids would not mean "
                            "the same text", target_fingerprint=self.fingerprint)
        if session.state is None:
            session.state = self.target.new_state()
        return SessionOpened(session.channel.session_id.hex(), self.target.name, self.fingerprint,
                             self.target.vocab_size, self.target.eos_token_ids, self.settings.max_draft,
                             self.max_context, self.settings.rebase, self.tree_nodes)

    @property
    def tree_nodes(self) -> int:
        """The most nodes of a token tree this verifier verifies (0: chains only)."""
        if not getattr(self.target, "supports_trees", False):
            return 0
        return min(self.settings.max_tree_nodes, self.settings.max_draft)

    def _expire(self) -> None:
        """Drop idle sessions (TTL) and the staged logits rows of rounds idle past ``round_timeout_s``."""
        now = time.monotonic()
        cutoff = now - self.settings.session_ttl_s
        for sid in [sid for sid, s in self.sessions.items() if s.last_used < cutoff]:
            self._drop(sid, "ttl")
        stale = now - self.settings.round_timeout_s
        for s in self.sessions.values():
            if s.pending is not None and s.pending.touched < stale and s.pending.drop_rows():
                self.metrics.rows_dropped.labels("timeout").inc()

    def housekeep(self) -> None:
        """Timeouts and the budget without waiting for a frame (the HTTP layer calls it every second)."""
        self._expire()
        self._evict()
        self._gauges()

    def _drop(self, sid: bytes, reason: str | None = None) -> None:
        session = self.sessions.pop(sid, None)
        if session is not None and session.state is not None:
            self.target.release(session.state)
        if session is not None and reason:
            self.metrics.evictions.labels(reason).inc()

    def _cached_tokens(self) -> int:
        return sum(len(s.state.tokens) for s in self.sessions.values() if s.state is not None)

    def _evict(self, incoming: int = 0, keep: bytes | None = None) -> None:
        """LRU eviction down to the session-count, cached-token and memory bounds (never the session in use)."""
        while len(self.sessions) + incoming > self.settings.max_sessions:
            self._drop(next(iter(self.sessions)), "sessions")
        while self._cached_tokens() > self.settings.max_cached_tokens:
            victim = next((sid for sid in self.sessions if sid != keep), None)
            if victim is None:
                break
            self._drop(victim, "memory")
        self._fit_budget(keep)

    # -- the memory budget --------------------------------------------------------------
    def _session_bytes(self, session: Session) -> tuple[int, int]:
        """(token ids and fixed part, staged logits rows): what dropping the session frees. Its KV is not
        in it: the target's pool (torch slots, llama.cpp contexts) keeps its allocation for the next one."""
        held, rows = SESSION_BYTES + len(session.committed) * TOKEN_BYTES, 0
        if session.state is not None:
            held += len(session.state.tokens) * TOKEN_BYTES
        if session.pending is not None:
            held += session.pending.staged_bytes
            rows = session.pending.rows_bytes
        return held, rows

    def memory(self) -> dict[str, int]:
        """Bytes held for sessions, by part (the budget ``max_memory_bytes`` bounds their sum): torch's KV
        pool as allocated (every slot at the longest row's capacity; llama.cpp's KV is inside its
        contexts), token ids and sessions' fixed parts,
        staged logits rows of unfinished rounds, early frames waiting for their predecessors (held by the
        HTTP layer), llama.cpp contexts (allocated, in use or free) and unproven handshakes."""
        cached = tokens = rows = other = 0             # the loop of _session_bytes, inlined: it runs per frame
        for session in self.sessions.values():
            tokens += len(session.committed)
            if session.state is not None:
                cached += len(session.state.tokens)
            pending = session.pending
            if pending is not None:
                tokens += len(pending.base) + len(pending.tokens)
                rows += pending.rows_bytes
                other += pending.q_bytes
        kv = getattr(getattr(self.target, "pool", None), "allocated_bytes", 0)
        held = len(self.sessions) * SESSION_BYTES + (tokens + cached) * TOKEN_BYTES + other
        contexts = getattr(self.target, "held_bytes", None)
        return {"kv": kv, "sessions": held, "staged_rows": rows, "early_frames": self.extra_bytes(),
                "contexts": contexts() if contexts is not None else 0,
                "handshakes": len(getattr(self, "pending", ())) * SESSION_BYTES}

    def _fit_budget(self, keep: bytes | None = None) -> None:
        """Over the budget: drop the staged rows of unfinished rounds (least recently used sessions first;
        NAV recomputes them), then evict least recently used sessions, never `keep` (the one in use).
        The target's cache pool stays (torch's KV slots, llama.cpp's contexts: at most half the budget,
        ``_fit_pool``), and so do early frames (they wait
        ``reorder_wait_s`` at most; the HTTP layer holds none past the budget)."""
        parts = self.memory()
        # Unproven handshakes have their own bound (max_pending_handshakes) and never evict a session.
        over = sum(parts.values()) - parts["handshakes"] - self.settings.max_memory_bytes
        if over <= 0:
            return
        for sid, session in self.sessions.items():
            if over <= 0:
                return
            if sid != keep and session.pending is not None:
                freed = session.pending.rows_bytes
                if session.pending.drop_rows():
                    over -= freed
                    self.metrics.rows_dropped.labels("memory").inc()
        for sid in [sid for sid in self.sessions if sid != keep]:
            if over <= 0:
                return
            over -= sum(self._session_bytes(self.sessions[sid]))
            self._drop(sid, "memory")

    def _fit_pool(self) -> None:
        """The target's cache pool stays within half the budget: llama.cpp's contexts (fewer of them) or
        torch's KV pool (fewer slots as its rows lengthen; sessions no longer than one slot can hold)."""
        pool, size = getattr(self.target, "pool", None), getattr(self.target, "context_bytes", 0)
        half = self.settings.max_memory_bytes // 2
        if size and hasattr(pool, "max_contexts"):
            fit = max(1, half // size)
            if pool.max_contexts > fit:
                log.info("%d llama.cpp contexts of %.0f MB would take more than half the memory budget of "
                            "%.0f MB: keeping %d", pool.max_contexts, size / 2**20,
                            self.settings.max_memory_bytes / 2**20, fit)
                pool.max_contexts = fit
        elif hasattr(pool, "limit_bytes"):
            pool.limit_bytes(half)
            longest = pool.longest_row()
            if longest < 1:
                raise ValueError(f"a memory budget of {self.settings.max_memory_bytes / 2**20:.0f} MB leaves "
                                 f"the KV cache less than one session of {pool.start_len} tokens needs "
                                 f"({pool.start_len * pool.position_bytes / 2**20:.1f} MB): raise it")
            if longest < self.max_context:
                log.info("half the memory budget of %.0f MB holds the KV of %d tokens per session: the "
                         "context offered is %d tokens, not %d", self.settings.max_memory_bytes / 2**20,
                         longest, longest, self.max_context)
                self.max_context = longest

    def _gauges(self) -> None:
        parts = self.memory()
        self.memory_bytes = sum(parts.values())
        for part, size in parts.items():
            self.metrics.memory.labels(part).set(size)
        self.metrics.sessions.set(len(self.sessions))
        self.metrics.pending_handshakes.set(len(self.pending))
        self.metrics.cached_tokens.set(self._cached_tokens())
        pool = getattr(self.target, "pool", None)
        if pool is not None:
            self.metrics.kv_slots_used.set(len(pool.owners))
            self.metrics.kv_slot_evictions.set(pool.evictions)

    # -- NAV ------------------------------------------------------------------------
    def _verify(self, session: Session, req: VerifyRequest, eager: bool = True,
                arrived: float | None = None) -> Generator[Forward, np.ndarray, VerifyResponse | BatchAck]:
        """Stage a non-final batch, or run NAV over the round when its final batch arrives."""
        if session.state is None:
            raise WireError(ErrorCode.MALFORMED, "open the session (vocabulary check) before verifying")
        self._check_limits(req)
        pending = self._round_for(session, req)
        rebased = pending is None and self._rebases(session, req)
        if rebased:
            # Pipelined NAV whose assumption failed, right after the round it was drafted on: the edge saw
            # the same verdict and waits for this round as an empty one on what we hold -- the target's
            # next token, with no round trip of its own.
            pending = PendingRound(req.round, list(session.committed), (len(session.committed),
                                                                        prefix_hash(session.committed)))
            req = dataclasses.replace(req, draft=(), q=(), parents=())
            self.metrics.conditional_rebased.inc()
        if pending is None:      # a stale or out-of-order batch: refused, nothing changes
            held = session.pending
            log.debug("batch refused: round %d offset %d final %s; holding round %s with %s tokens, committed %d",
                      req.round, req.offset, req.final, held.round if held else None,
                      len(held.tokens) if held else None, len(session.committed))
            if req.final:
                if req.conditional:      # pipelined NAV whose assumption failed: the edge dropped it already
                    self.metrics.conditional_dropped.inc()
                else:
                    self.metrics.resyncs.inc()
                raise WireError(ErrorCode.RESYNC, "the verifier holds a different committed prefix or round: "
                                "resend the round from offset 0", committed_len=len(session.committed))
            same = session.pending is not None and session.pending.round == req.round
            return BatchAck(req.round, False, len(session.pending.tokens) if same else 0)
        total = len(pending.base) + len(pending.tokens) + len(req.draft)
        if total + 1 > self.max_context:
            raise WireError(ErrorCode.CONTEXT_OVERFLOW,
                            f"prefix and draft ({total} tokens) leave no room in the target's context of "
                            f"{self.max_context}", max_context=self.max_context)
        if pending.tokens and pending.sampling != req.sampling:
            raise WireError(ErrorCode.MALFORMED, "every batch of a round must carry the same sampling parameters")
        pending.sampling = req.sampling
        pending.parents = req.parents
        pending.tokens.extend(req.draft)
        pending.q.extend(req.q)
        pending.q_bytes += sum(q.ids.nbytes + q.p16.nbytes for q in req.q)
        t0 = time.perf_counter()
        pending.touched = time.monotonic()
        if not req.final:
            session.pending = pending
            if self.settings.eager_forward and eager and req.draft:
                # Start the target on what has arrived, so NAV at the trigger runs on the last batch only.
                yield from self._forward(session.state, pending)
                self.metrics.nav_seconds.observe(time.perf_counter() - t0)
            self._evict(keep=session.channel.session_id)       # staged rows count in the budget
            return BatchAck(req.round, True, len(pending.tokens))
        session.pending = None
        if pending.rows_held < len(pending.tokens) + 1:
            yield from self._forward(session.state, pending)
        rows = np.concatenate(pending.rows)
        node = None
        if pending.parents:
            path, token = greedy_accept_tree(pending.tokens, pending.parents, rows)
            self.target.keep_path(session.state, path)       # the cache: prefix + the path, as a sequence
            accepted, node = len(path), (path[-1] if path else None)
            kept = [pending.tokens[i] for i in path]
        else:
            if pending.sampling is None:
                accepted, token = greedy_accept(pending.tokens, rows)
            else:
                accepted, token = speculative_accept(pending.tokens, pending.q, rows, pending.sampling,
                                                     len(pending.base))
            kept = pending.tokens[:accepted]
        # Rollback: the cache keeps the committed prefix and the accepted draft tokens; the
        # target's own token is fed at the start of the next round.
        self.target.rollback(session.state, len(pending.base) + accepted)
        session.committed = pending.base + kept + [token]
        session.last_answer = (req.round, rebased)
        elapsed = time.perf_counter() - t0
        m = self.metrics
        m.nav_rounds.inc()
        m.draft_tokens.inc(len(pending.tokens))
        m.accepted_tokens.inc(accepted)
        m.nav_seconds.observe(elapsed)
        self._evict(keep=session.channel.session_id)
        queued = max(0.0, t0 - arrived) * 1e3 if arrived is not None else 0.0
        return VerifyResponse(accepted, token, len(session.committed), elapsed * 1e3, round(queued, 3), rebased, node)

    def _rebases(self, session: Session, req: VerifyRequest) -> bool:
        """Is this refused batch a conditional round to answer rebased: its final, drafted on top of exactly
        the round answered last, which was answered as drafted (rebased answers never chain: the target
        does not decode on its own), on a session that holds a sequence?"""
        return (self.settings.rebase and req.final and req.conditional and req.after is not None
                and session.last_answer == (req.after, False) and bool(session.committed)
                and len(session.committed) + 1 <= self.max_context)

    def _forward(self, state: TargetState, pending: PendingRound):
        """Logits rows for the staged tokens not yet run (row 0 predicts the round's first token)."""
        first = len(pending.base) - 1 + pending.rows_held
        pending.busy = True             # the budget leaves these rows alone until the pass has answered
        try:
            pending.add_rows((yield Forward(state, pending.base + pending.tokens, first, pending.parents)))
        finally:
            pending.busy = False

    def _round_for(self, session: Session, req: VerifyRequest) -> PendingRound | None:
        """The round this batch joins, or None when it does not fit what the session holds."""
        if req.offset == 0:
            if req.base_len and (req.base_len != len(session.committed)
                                 or req.prefix_hash != prefix_hash(session.committed)):
                return None
            base = session.committed[: req.base_len] + list(req.append)
            if not base:
                raise WireError(ErrorCode.MALFORMED, "a round needs at least one committed token")
            return PendingRound(req.round, base, (req.base_len, req.prefix_hash))
        p = session.pending
        if (p is None or p.round != req.round or len(p.tokens) != req.offset or req.append
                or (req.base_len, req.prefix_hash) != p.named):
            return None
        return p

    def _check_limits(self, req: VerifyRequest) -> None:
        if req.parents:
            if not self.tree_nodes:
                raise WireError(ErrorCode.TREE_UNSUPPORTED, "this verifier verifies chains only (its target "
                                f"{self.target.name} cannot run token trees, or they are turned off)", tree_nodes=0)
            if req.sampling is not None:
                raise WireError(ErrorCode.TREE_UNSUPPORTED, "token trees are verified greedily only: send a "
                                "sampled draft as a chain", tree_nodes=self.tree_nodes)
            if len(req.draft) > self.tree_nodes:
                raise WireError(ErrorCode.DRAFT_TOO_LONG, f"a token tree of {len(req.draft)} nodes exceeds the "
                                f"limit of {self.tree_nodes}", tree_nodes=self.tree_nodes)
        if len(req.draft) > self.settings.max_draft or req.offset + len(req.draft) > self.settings.max_draft:
            raise WireError(ErrorCode.DRAFT_TOO_LONG,
                            f"a round of {req.offset + len(req.draft)} draft tokens exceeds the limit of "
                            f"{self.settings.max_draft}", max_draft=self.settings.max_draft)
        if len(req.append) > self.settings.max_append:
            raise WireError(ErrorCode.BATCH_TOO_LARGE,
                            f"{len(req.append)} prefix tokens in one frame exceed {self.settings.max_append}",
                            max_append=self.settings.max_append)
        vocab = self.target.vocab_size
        if (any(t >= vocab for t in req.append) or any(t >= vocab for t in req.draft)
                or any(len(q.ids) and int(q.ids.max()) >= vocab for q in req.q)):
            raise WireError(ErrorCode.BAD_TOKEN_ID, f"token ids must be below the vocabulary size {vocab}",
                            vocab_size=vocab)
