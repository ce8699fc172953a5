"""Per-request statistics, named as llama.cpp / vLLM name them (docs/design.md §7)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RoundRecord:
    """One verdict, as the edge saw it (recorded with ``timeline=True``): what the round was, when its
    final batch left and its verdict came back (perf_counter seconds), when the engine took the verdict
    up (later than `answered_at` when it was busy drafting or planning), and what the verifier reported."""

    kind: str              # "plain" (sent at the trigger), "pipelined" (sent before the verdict it builds
                           # on) or "rebased" (a pipelined round answered as the target's next token)
    drafted: int
    accepted: int
    sent_at: float
    answered_at: float | None    # None where a resend answered (the request's own reply failed, was refused
                                 # or did not fit the round)
    taken_at: float
    verify_ms: float
    queue_ms: float


@dataclass
class GenerationStats:
    mode: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    draft_n: int = 0               # draft tokens sent for verification
    draft_n_accepted: int = 0      # of those, accepted by the target
    nav_rounds: int = 0            # verification requests
    rollback_rounds: int = 0       # rounds whose target token was a correction: a drafted token rejected (in a
                                   # tree, or a chain with leaves: and none of its siblings the target's)
    resyncs: int = 0               # times the prefix was resent (verifier restart, eviction, mismatch)
    ttft_s: float = 0.0            # request start -> first output token
    total_s: float = 0.0           # request start -> last output token
    draft_s: float = 0.0           # edge compute: prefill + drafting (proactive drafting included)
    upload_s: float = 0.0          # sending non-final draft batches (on the uploader thread, overlapping drafting)
    wait_s: float = 0.0            # the generation blocked on the cloud (NAV round trips, session set-up)
    verify_s: float = 0.0          # the verifier's NAV compute, as it reports it (part of wait_s)
    bytes_up: int = 0              # sealed frames sent
    bytes_down: int = 0            # sealed frames received
    batch_sizes: list[int] = field(default_factory=list)   # draft tokens in each batch sent, final batches
                                                           # included (cloud_only: an empty final per round)
    proactive_kept: int = 0        # tokens drafted during NAV that became the next round's draft
    proactive_discarded: int = 0   # tokens drafted during NAV and thrown away (rejection, other target token)
    rebased_rounds: int = 0        # pipelined rounds whose assumption failed, answered as the target's next token
    pipelined_rounds: int = 0      # rounds verified on a final batch sent before the verdict they built on
                                   # (rebased rounds included)
    target_passes: int = 0         # target passes asked for by rounds that got a verdict: each batch sent
                                   # for verification, plus each resend (a batch the verifier merges with
                                   # the next, or runs without eager forward, costs less: an upper bound;
                                   # a dropped pipelined round asked for none)
    drafts_interrupted: int = 0    # tokens given up midway because a verdict made them useless (slow drafters)
    guesses_checked: int = 0       # guesses of the target's next token (drafted or looked up) a verdict checked
    guesses_right: int = 0         # ... and found to be the target's (the rounds drafted on them went on)
    lookups_checked: int = 0       # of those, guesses looked up in the output (lookup.py) rather than drafted
    lookups_right: int = 0
    unverified_tokens: int = 0     # tokens emitted by the draft alone while the cloud was unreachable
    offline_s: float = 0.0         # time spent generating offline (circuit breaker open)
    breaker_trips: int = 0         # times a failed or overdue NAV sent the generation offline
    revisions: int = 0             # verify_late: times the target replaced an unverified tail
    overload_waits: int = 0        # requests the verifier refused as overloaded (429), waited out and retried
    overload_wait_s: float = 0.0   # time spent in those waits (part of wait_s)
    tree_rounds: int = 0           # verified rounds sent as a token tree (trees.py)
    tree_nodes: int = 0            # nodes those trees held (draft_n counts them too)
    tree_fallback: str = ""        # why a tree policy's rounds went as chains ("" where trees went)
    leaves_sent: int = 0           # branch nodes sent with the chains of verified rounds (policy.branches; in draft_n)
    leaves_accepted: int = 0       # rounds that kept a branch: the chain rejected there, the branch's token was the target's
    leaves_kept: int = 0           # branch nodes those rounds kept (more than leaves_accepted once branches are drafted)
    finish_reason: str = ""        # eos | length | stop
    # (kind, start, end) perf_counter spans of "draft", "upload" and "nav", when the request asked for
    # them (``timeline=True``): what overlapped what, for plots.
    timeline: list[tuple[str, float, float]] | None = None
    rounds: list[RoundRecord] | None = None   # every verdict, in order (``timeline=True``)

    @property
    def acceptance_rate(self) -> float:
        return self.draft_n_accepted / self.draft_n if self.draft_n else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per NAV round: 1 + accepted / rounds."""
        return 1.0 + self.draft_n_accepted / self.nav_rounds if self.nav_rounds else 0.0

    @property
    def mean_draft_length(self) -> float:
        return self.draft_n / self.nav_rounds if self.nav_rounds else 0.0

    @property
    def batches_sent(self) -> int:
        return len(self.batch_sizes)

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
                 mean_draft_length=self.mean_draft_length, batches_sent=self.batches_sent,
                 rollback_rate=self.rollback_rate, tpt_ms=self.tpt_ms)
        return d

    def summary(self) -> str:
        s = (f"mode={self.mode} out={self.output_tokens} TTFT={self.ttft_s * 1e3:.1f}ms TPT={self.tpt_ms:.2f}ms")
        if self.nav_rounds:
            s += (f" nav_rounds={self.nav_rounds} draft_n={self.draft_n} draft_n_accepted={self.draft_n_accepted}"
                  f" acceptance={self.acceptance_rate:.3f} mean_accept_len={self.mean_acceptance_length:.2f}"
                  f" rollback_rate={self.rollback_rate:.2f} batches={self.batches_sent}"
                  f" up={self.bytes_up}B down={self.bytes_down}B"
                  f" time(draft/upload/wait/verify)={self.draft_s * 1e3:.0f}/{self.upload_s * 1e3:.0f}/"
                  f"{self.wait_s * 1e3:.0f}/{self.verify_s * 1e3:.0f}ms")
        if self.breaker_trips or self.unverified_tokens:
            s += (f" offline: trips={self.breaker_trips} unverified={self.unverified_tokens}"
                  f" offline_time={self.offline_s * 1e3:.0f}ms revisions={self.revisions}")
        if self.overload_waits:
            s += f" overloaded: waits={self.overload_waits} wait_time={self.overload_wait_s * 1e3:.0f}ms"
        return s + f" finish={self.finish_reason}"
