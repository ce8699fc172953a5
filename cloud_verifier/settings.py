"""Verifier limits: every bound is a named, documented setting (docs/protocol.md lists the errors)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VerifierSettings:
    """Every bound of the verifier. Batched NAV is the default: ``max_batch=1`` runs sessions one by one."""

    max_draft: int = 64               # draft tokens per NAV round (422 draft_too_long beyond)
    max_tree_nodes: int = 64          # nodes of a token tree (VerifyRequest.parents), at most max_draft; 0: chains
                                      # only (and so on a target that cannot verify trees: 422 tree_unsupported)
    max_append: int = 4096            # committed tokens sent in one frame: prompt or resync (422 batch_too_large)
    max_frame_bytes: int = 1 << 20    # one frame on the wire (413 payload_too_large beyond)
    max_body_bytes: int = 1 << 20     # one body after decompression (413)
    max_sessions: int = 256           # sessions held in RAM; the least recently used is evicted
    max_cached_tokens: int = 262_144  # KV-cached tokens over all sessions (kept from before the byte budget)
    max_memory_bytes: int = 2 << 30   # everything sessions hold, in bytes (cached tokens' KV, staged logits rows,
                                      # early frames, llama.cpp contexts): over it, staged rows of the least
                                      # recently used sessions go first, then those sessions (LRU)
    round_timeout_s: float = 5.0      # an unfinished round idle this long loses its staged logits rows (NAV
                                      # recomputes them from the staged tokens: lossless, no round trip)
    session_ttl_s: float = 900.0      # idle sessions are dropped after this long
    max_context: int | None = None    # cap below the target's own context length (None = the model's)
    max_in_flight: int = 32           # established sessions' frames queued or running; beyond: 429 overloaded
                                      # + Retry-After (about one model-worker cycle, at most retry_after_s)
    max_handshakes_in_flight: int = 32  # handshakes queued or running, bounded apart from max_in_flight (a
                                      # handshake flood never takes a frame's slot); beyond: 429 overloaded
    retry_after_s: int = 1            # the longest Retry-After an in-flight 429 carries; the Retry-After of
                                      # other 429s (too many requests open)
    replay_window: int = 1024         # frame sequence numbers remembered per direction
    rekey_interval: int = 1 << 16     # frames per key epoch before the channel ratchets its keys
    eager_forward: bool = True        # run the target on draft batches as they arrive, not only at NAV
    rebase: bool = True               # answer a failed conditional round (pipelined NAV) as the target's next
                                      # token instead of dropping it (VerifyRequest.after; docs/protocol.md)
    max_batch: int = 32               # sessions whose target passes run as one batch (1: one by one)
    batch_wait_s: float = 0.002       # how long a pass waits for others to join, only while more requests
                                      # are in flight than queued (a lone session never waits)
    kv_slots: int = 64                # sessions whose KV cache the torch target keeps at once (>= max_batch);
                                      # beyond, the least recently used session recomputes its prefix
    reorder_wait_s: float = 0.1       # a frame waits for the session's earlier frames (other connections) while
                                      # they make progress; a gap with no progress for this long is skipped
    llama_contexts: int = 8           # llama.cpp contexts (one per running session) the llama.cpp target keeps at
                                      # once, created lazily; beyond, the least recently used session's is taken
                                      # and that session recomputes its prefix (also capped by max_memory_bytes)
    body_timeout_s: float = 10.0      # a request body (or, on /v1/rounds, each frame of the stream) must arrive
                                      # within this; else 408 request_timeout and the connection is closed
    max_open_requests: int = 512      # POST requests open at once (reading a body or waiting for the model);
                                      # beyond: 429 overloaded + Retry-After and the connection is closed
    max_connections: int = 2048       # open connections (uvicorn's limit_concurrency: beyond it every request,
                                      # health included, gets 503); above max_open_requests so health stays up
    max_pending_handshakes: int = 1024  # handshakes answered whose client has not yet sealed a frame; held apart
                                      # from the sessions (never evicting one), the oldest dropped first
    handshake_ttl_s: float = 30.0     # a handshake whose client seals no frame within this is forgotten
    handshake_rate: float = 50.0      # handshakes per second per client IP (token bucket; 0 = no limit) ...
    handshake_burst: int = 100        # ... up to this many at once; beyond: 429 overloaded + Retry-After
    client_handshake_rate: float = 1.0  # handshakes per second per affinity token (one edge client; 0 = no limit)
    client_handshake_burst: int = 10  # ... up to this many at once

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.max_tree_nodes < 0:
            raise ValueError("max_tree_nodes must not be negative")
        if self.kv_slots < self.max_batch:
            raise ValueError(f"kv_slots ({self.kv_slots}) must be at least max_batch ({self.max_batch})")
        if self.batch_wait_s < 0:
            raise ValueError("batch_wait_s must not be negative")
        if self.max_memory_bytes < 1 << 20:
            raise ValueError("max_memory_bytes must be at least 1 MiB")
        if self.llama_contexts < 1:
            raise ValueError("llama_contexts must be at least 1")
        if not (self.round_timeout_s > 0 and self.body_timeout_s > 0):
            raise ValueError("round_timeout_s and body_timeout_s must be positive")
        if self.max_in_flight < 1 or self.max_handshakes_in_flight < 1:
            raise ValueError("max_in_flight and max_handshakes_in_flight must be at least 1")
        if self.max_open_requests < 1 or self.max_connections <= self.max_open_requests:
            raise ValueError(f"max_connections ({self.max_connections}) must exceed max_open_requests "
                             f"({self.max_open_requests}) so that health checks still get through")
