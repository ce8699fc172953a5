"""Prometheus metrics of one verifier (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pipesd_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.nav_rounds = Counter("pipesd_nav_rounds", "NAV rounds run", registry=r)
        self.draft_tokens = Counter("pipesd_draft_tokens", "draft tokens verified", registry=r)
        self.accepted_tokens = Counter("pipesd_accepted_tokens", "draft tokens accepted", registry=r)
        self.resyncs = Counter("pipesd_resyncs", "rounds answered with resync", registry=r)
        self.conditional_rebased = Counter("pipesd_conditional_rebased",
                                           "pipelined rounds whose assumption failed, answered as the target's "
                                           "next token on the committed sequence instead", registry=r)
        self.conditional_dropped = Counter("pipesd_conditional_dropped",
                                           "pipelined rounds dropped because the round before them was not "
                                           "accepted whole (or the target's token was another)", registry=r)
        self.rejections = Counter("pipesd_rejections", "requests refused, by error code", ["cause"], registry=r)
        self.sessions_opened = Counter("pipesd_sessions_opened", "sessions established (a handshake whose client "
                                       "then sealed a frame)", registry=r)
        self.handshakes_unproven = Counter("pipesd_handshakes_unproven", "handshakes forgotten before their client "
                                           "sealed a frame (expired, or pushed out of the pending table)",
                                           registry=r)
        self.pending_handshakes = Gauge("pipesd_pending_handshakes", "handshakes waiting for their client's first "
                                        "frame (held apart from sessions)", registry=r)
        self.evictions = Counter("pipesd_session_evictions", "sessions evicted", ["reason"], registry=r)
        self.nav_seconds = Histogram("pipesd_nav_seconds", "target compute per NAV round", buckets=LATENCY_BUCKETS,
                                     registry=r)
        self.batch_rows = Histogram("pipesd_batch_rows", "sessions per batched target pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.request_seconds = Histogram("pipesd_request_seconds", "request latency inside the verifier",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.sessions = Gauge("pipesd_sessions", "sessions held", registry=r)
        self.cached_tokens = Gauge("pipesd_cached_tokens", "KV-cached tokens over all sessions", registry=r)
        self.kv_slots_used = Gauge("pipesd_kv_slots_used", "KV pool slots held by sessions (torch target)",
                                   registry=r)
        self.kv_slot_evictions = Gauge("pipesd_kv_slot_evictions", "sessions that lost their KV slot to another "
                                       "and recomputed their prefix (cumulative)", registry=r)
        self.in_flight = Gauge("pipesd_in_flight", "requests queued or running", registry=r)
        self.memory = Gauge("pipesd_memory_bytes", "bytes held for sessions, by part (their sum is bounded by "
                            "pipesd_memory_budget_bytes)", ["part"], registry=r)
        self.memory_budget = Gauge("pipesd_memory_budget_bytes", "the memory budget (--max-memory-mb)", registry=r)
        self.rows_dropped = Counter("pipesd_staged_rows_dropped", "unfinished rounds whose staged logits rows were "
                                    "dropped (NAV recomputes them), by reason: timeout or memory", ["reason"],
                                    registry=r)
        self.open_requests = Gauge("pipesd_open_requests", "POST requests open (reading a body or waiting)",
                                   registry=r)
        self.disconnects = Counter("pipesd_client_disconnects", "requests whose client went away before the "
                                   "answer (counted under status 499 in pipesd_requests, never as 500)", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
