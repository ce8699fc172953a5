"""Verifier limits: every bound is a named, documented setting (docs/protocol.md lists the errors)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VerifierSettings:
    max_draft: int = 64               # draft tokens per NAV round (422 draft_too_long beyond)
    max_append: int = 4096            # committed tokens sent in one frame: prompt or resync (422 batch_too_large)
    max_frame_bytes: int = 1 << 20    # one frame on the wire (413 payload_too_large beyond)
    max_body_bytes: int = 1 << 20     # one body after decompression (413)
    max_sessions: int = 256           # sessions held in RAM; the least recently used is evicted
    max_cached_tokens: int = 262_144  # KV-cached tokens over all sessions (the memory bound); LRU eviction
    session_ttl_s: float = 900.0      # idle sessions are dropped after this long
    max_context: int | None = None    # cap below the target's own context length (None = the model's)
    max_in_flight: int = 32           # requests queued or running; beyond: 429 overloaded + Retry-After
    retry_after_s: int = 1            # the Retry-After a 429 carries
    replay_window: int = 1024         # frame sequence numbers remembered per direction
    rekey_interval: int = 1 << 16     # frames per key epoch before the channel ratchets its keys
    eager_forward: bool = True        # run the target on draft batches as they arrive, not only at NAV
    reorder_wait_s: float = 0.1       # a frame waits for the session's earlier frames (other connections) while
                                      # they make progress; a gap with no progress for this long is skipped
