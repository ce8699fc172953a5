"""Per-request statistics, named as llama.cpp / vLLM name them (DESIGN.md §7)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GenerationStats:
    mode: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    draft_n: int = 0               # draft tokens sent for verification
    draft_n_accepted: int = 0      # of those, accepted by the target
    nav_rounds: int = 0            # verification requests
    rollback_rounds: int = 0       # rounds in which at least one draft token was rejected
    resyncs: int = 0               # times the prefix was resent (verifier restart, eviction, mismatch)
    ttft_s: float = 0.0            # request start -> first output token
    total_s: float = 0.0           # request start -> last output token
    draft_s: float = 0.0           # edge compute: prefill + drafting
    network_s: float = 0.0         # NAV requests, wall time minus the verifier's compute (upload + wait + download)
    verify_s: float = 0.0          # the verifier's compute, as it reports it
    bytes_up: int = 0              # request bodies
    bytes_down: int = 0            # response bodies
    finish_reason: str = ""        # eos | length | stop | context

    @property
    def acceptance_rate(self) -> float:
        return self.draft_n_accepted / self.draft_n if self.draft_n else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per NAV round: 1 + accepted / rounds."""
        return 1.0 + self.draft_n_accepted / self.nav_rounds if self.nav_rounds else 0.0

    @property
    def rollback_rate(self) -> float:
        return self.rollback_rounds / self.nav_rounds if self.nav_rounds else 0.0

    @property
    def tpt_ms(self) -> float:
        """Time per output token: end-to-end time / output tokens (a.k.a. TPOT)."""
        return 1e3 * self.total_s / self.output_tokens if self.output_tokens else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(acceptance_rate=self.acceptance_rate, mean_acceptance_length=self.mean_acceptance_length,
                 rollback_rate=self.rollback_rate, tpt_ms=self.tpt_ms)
        return d

    def summary(self) -> str:
        s = (f"mode={self.mode} out={self.output_tokens} TTFT={self.ttft_s * 1e3:.1f}ms TPT={self.tpt_ms:.2f}ms")
        if self.nav_rounds:
            s += (f" nav_rounds={self.nav_rounds} draft_n={self.draft_n} draft_n_accepted={self.draft_n_accepted}"
                  f" acceptance={self.acceptance_rate:.3f} mean_accept_len={self.mean_acceptance_length:.2f}"
                  f" rollback_rate={self.rollback_rate:.2f} up={self.bytes_up}B down={self.bytes_down}B")
        return s + f" finish={self.finish_reason}"
