"""Prometheus metrics of ``pipesd serve``.

Named as llama.cpp's server and vLLM name theirs, with a ``pipesd:`` prefix (``pipesd:prompt_tokens_total``,
``pipesd:num_requests_running``, ``pipesd:time_to_first_token_seconds``, vLLM's
``spec_decode_num_draft_tokens`` / ``spec_decode_num_accepted_tokens``), plus what only PipeSD has: NAV
rounds, seconds generated offline, tokens the target never verified, and whether the verifier is reachable.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()        # no *_created series: scrapers of llama.cpp / vLLM do not expect them

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServeMetrics:
    def __init__(self, mode: str, client):
        self.client = client
        r = self.registry = CollectorRegistry()
        p = "pipesd:"
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "output tokens generated", registry=r)
        self.success = Counter(p + "request_success", "finished requests by finish reason", ["finished_reason"],
                               registry=r)
        self.cancelled = Counter(p + "requests_cancelled", "requests whose client left before the end", registry=r)
        self.failed = Counter(p + "requests_failed", "requests that ended in an error", registry=r)
        self.rejected = Counter(p + "requests_rejected", "requests refused, by HTTP status", ["status"], registry=r)
        self.running = Gauge(p + "num_requests_running", "generations running on the drafter", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "requests queued for the drafter", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "generation start -> first token", buckets=LATENCY,
                              registry=r)
        self.tpot = Histogram(p + "time_per_output_token_seconds", "generation time / output tokens",
                              buckets=PER_TOKEN, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "generation start -> end", buckets=LATENCY,
                             registry=r)
        self.draft_tokens = Counter(p + "spec_decode_num_draft_tokens", "draft tokens sent for verification",
                                    registry=r)
        self.accepted_tokens = Counter(p + "spec_decode_num_accepted_tokens", "draft tokens the target accepted",
                                       registry=r)
        self.acceptance = Gauge(p + "spec_decode_draft_acceptance_rate", "accepted / draft tokens so far",
                                registry=r)
        self.nav_rounds = Counter(p + "nav_rounds", "NAV rounds (verification requests)", registry=r)
        self.offline_seconds = Counter(p + "offline_seconds", "seconds generated on the device alone while the "
                                       "verifier was unreachable", registry=r)
        self.unverified = Counter(p + "unverified_tokens", "output tokens the target never verified (offline, "
                                  "private or edge_only)", registry=r)
        self.verifier_online = Gauge(p + "verifier_online", "1 while the verifier counts as reachable", registry=r)
        self.info = Gauge(p + "serve_info", "the served decoding mode", ["mode"], registry=r)
        self.info.labels(mode).set(1)
        self._drafted = self._accepted = 0

    def verifier_state(self) -> str:
        if self.client.engine.cloud is None:
            return "none"
        return "offline" if self.client.is_offline else "online"

    def refresh(self, runner) -> None:
        self.running.set(runner.running)
        self.waiting.set(runner.waiting)
        self.verifier_online.set(1 if self.verifier_state() == "online" else 0)

    def finished(self, job, stats, outcome: str) -> None:
        """Called on the drafter's worker when a job ends (done, cancelled or failed)."""
        if outcome == "cancelled":
            self.cancelled.inc()
        elif outcome == "error":
            self.failed.inc()
        if stats is None:
            return
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.generation_tokens.inc(stats.output_tokens)
        self.draft_tokens.inc(stats.draft_n)
        self.accepted_tokens.inc(stats.draft_n_accepted)
        self._drafted += stats.draft_n
        self._accepted += stats.draft_n_accepted
        self.acceptance.set(self._accepted / self._drafted if self._drafted else 0.0)
        self.unverified.inc(job.unverified)
        self.nav_rounds.inc(stats.nav_rounds)
        self.offline_seconds.inc(stats.offline_s)
        if outcome == "done":
            self.success.labels(stats.finish_reason or "stop").inc()
            self.ttft.observe(stats.ttft_s)
            self.e2e.observe(stats.total_s)
            if stats.output_tokens:
                self.tpot.observe(stats.total_s / stats.output_tokens)
