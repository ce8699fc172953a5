"""Verifier limits: every bound is a named, documented setting (docs/protocol.md lists the errors)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VerifierSettings:
    """Every bound of the verifier. Batched NAV is the default: ``max_batch=1`` runs sessions one by one."""

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
    max_batch: int = 32               # sessions whose target passes run as one batch (1: one by one)
    batch_wait_s: float = 0.002       # how long a pass waits for others to join, only while more requests
                                      # are in flight than queued (a lone session never waits)
    kv_slots: int = 64                # sessions whose KV cache the torch target keeps at once (>= max_batch);
                                      # beyond, the least recently used session recomputes its prefix
    reorder_wait_s: float = 0.1       # a frame waits for the session's earlier frames (other connections) while
                                      # they make progress; a gap with no progress for this long is skipped

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.kv_slots < self.max_batch:
            raise ValueError(f"kv_slots ({self.kv_slots}) must be at least max_batch ({self.max_batch})")
        if self.batch_wait_s < 0:
            raise ValueError("batch_wait_s must not be negative")
